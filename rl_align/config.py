"""Configuration is data: preset YAML + ``--set`` overrides -> validated dataclasses.

Presets live in the repository's top-level ``envs/`` and ``agents/`` folders (one YAML file each);
a name on the command line resolves to ``<folder>/<name>.yaml``, a path to a ``.yaml`` file is read
as is, and an env name that is no preset is taken as a Gymnasium task id.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rl_align.errors import UserError

PRESET_ROOT = Path(__file__).resolve().parent.parent


def preset_dir(kind: str) -> Path:
    """``envs`` or ``agents`` preset folder of the repository."""
    return PRESET_ROOT / kind


def read_yaml(path: Path) -> dict:
    """Safe-load a YAML mapping; malformed files give a one-line :class:`UserError`."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"malformed YAML in {path}{where}: {getattr(exc, 'problem', exc)}; fix the file") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a YAML mapping (key: value lines), not a {type(data).__name__}")
    return data


def list_presets(kind: str) -> dict[str, str]:
    """Preset name -> its one-line description."""
    out = {}
    for path in sorted(preset_dir(kind).glob("*.yaml")):
        try:
            out[path.stem] = str(read_yaml(path).get("description", "")).strip()
        except UserError as exc:
            out[path.stem] = f"(broken: {exc})"
    return out


def load_preset(kind: str, name: str, _chain: tuple[str, ...] = ()) -> tuple[str, dict] | None:
    """``(preset name, data)`` for a preset name or a YAML path, or None when there is no such file.
    ``base: <preset>`` in a file starts it from that preset of the same kind (its description aside):
    the file lists only what differs."""
    path = Path(name)
    if name.endswith((".yaml", ".yml")):
        if not path.exists():
            raise UserError(f"preset file {name} does not exist")
        stem = path.stem
    else:
        path, stem = preset_dir(kind) / f"{name}.yaml", name
        if not path.exists():
            return None
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return stem, data
    chain = (*_chain, stem)
    if Path(str(base)).stem in chain:
        raise UserError(f"preset {stem}: base {base} leads back to itself ({' -> '.join([*chain, str(base)])})")
    found = load_preset(kind, str(base), chain)
    if found is None:
        raise UserError(f"preset {stem}: base {base} is not a preset in {kind}/ ({', '.join(list_presets(kind))})")
    return stem, merge({k: v for k, v in found[1].items() if k != "description"}, data)


# ---- dataclass <-> dict ------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if errors else f"{key} cannot be null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping of fields of {tp.__name__}, got {value!r}")
        if hasattr(tp, "variant"):  # a section whose class depends on one of its values (the constraint's rule)
            tp = tp.variant(value, key)
        return build(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        return _finite_float(value, key)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is int and isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise UserError(f"{key} must be {_type_name(tp)}, got {value!r}")


def _finite_float(value: Any, key: str) -> float:
    """Every float of a config is a rate, coefficient, limit or threshold: nan or inf in one would only
    surface deep in a run (a torch error, a limit that never binds), so it is refused here, once, for all.
    A quantity that means "no limit" is spelled ``null`` (``float | None`` fields), never ``inf``."""
    out = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = float(value)
    elif isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            out = float(value)
        except ValueError:
            pass
    if out is None:
        raise UserError(f"{key} must be float, got {value!r}")
    if not math.isfinite(out):
        raise UserError(f"{key} must be a finite number, got {value!r}; give a real value (or null where the field allows it)")
    return out


def build(cls: type, data: dict, prefix: str) -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and values of the wrong type;
    range checks run in the dataclass's ``__post_init__`` and raise :class:`UserError` too."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise UserError(f"unknown key {prefix}.{unknown[0]}; valid keys of {prefix}: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``section.key=value`` (YAML value syntax) merged into a nested dict; sections ``env``, ``agent``, ``run``."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r} must look like section.key=value, e.g. agent.lr=3e-4")
        parts = key.strip().split(".")
        if parts[0] not in data or len(parts) < 2:
            raise UserError(f"--set {key}: the key must start with one of {', '.join(data)} and name a field, e.g. agent.lr")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise UserError(f"--set {key}: cannot parse value {raw!r}") from None
        node = data
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise UserError(f"--set {key}: {p} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return data


def merge(base: dict, extra: dict) -> dict:
    """Recursive dict merge, ``extra`` wins."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class TrainConfig:
    """How long and how a run goes, whatever the agent."""

    steps: int = 50_000
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 0  # env steps between evaluations; 0: at the start and the end only
    eval_episodes: int = 10
    checkpoint_every: int = 0  # env steps between checkpoints; 0: every 10% of the run
    torch_threads: int = 1  # small MLPs run fastest single-threaded on a laptop CPU
    out_dir: str = "runs"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UserError(f"run.steps must be a positive number of env steps, got {self.steps}")
        if self.seed < 0:
            raise UserError(f"run.seed must be >= 0, got {self.seed}")
        for k in ("eval_every", "checkpoint_every"):
            if getattr(self, k) < 0:
                raise UserError(f"run.{k} must be >= 0, got {getattr(self, k)}")
        if self.eval_episodes < 1:
            raise UserError(f"run.eval_episodes must be >= 1, got {self.eval_episodes}")
        if self.torch_threads < 1:
            raise UserError(f"run.torch_threads must be >= 1, got {self.torch_threads}")
        if not (self.device == "cpu" or self.device.startswith("cuda") or self.device == "mps"):
            raise UserError(f"run.device must be cpu, cuda, cuda:N or mps, got {self.device!r}")
