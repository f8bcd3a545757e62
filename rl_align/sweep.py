"""``rl-align sweep``: a grid of settings x seeds, each trial one ordinary run folder.

``runs/sweeps/<name>/`` holds ``sweep.json`` (what was asked), ``index.csv`` (one row per trial: its
settings, seed, status, error, final metrics, run folder) and ``trials/<trial>/...`` (the run folders).
Trials run in a local process pool (spawn; default) or as Ray tasks (``--backend ray``). A failed trial
is recorded and the others go on; running the same command again skips finished trials, resumes
interrupted ones from their checkpoint and retries failed ones.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import os
import re
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rl_align.errors import UserError
from rl_align.signals import DeferredSignals

PRESET_KEYS = ("env", "agent")  # grid keys that vary the preset itself
HEAD_METRICS = ("eval/return_det", "eval/return_stoch", "eval/cost_det", "eval/violation", "eval/win_rate_vs_ref", "eval/kl_to_ref")


@dataclass
class Trial:
    trial: str
    seed: int
    settings: dict[str, str]  # grid key -> value as written on the command line
    env: str
    agent: str
    overrides: list[str]
    steps: int | None
    device: str | None
    root: str  # trials/<trial>: the run folder is made under it (absolute: Ray workers have their own cwd)
    out_dir: str = "runs"  # the config's run.out_dir, absolute: where cached references are found

    def settings_label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings.items()) or "base"


@dataclass
class SweepSpec:
    """What defines a sweep; re-running with the same spec resumes it."""

    env: str
    agent: str
    steps: int | None = None
    sets: list[str] = field(default_factory=list)
    grid: list[tuple[str, list[str]]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str | None = None

    def key(self) -> dict:
        d = asdict(self)
        d["grid"] = [[k, list(v)] for k, v in self.grid]
        return d

    def default_name(self) -> str:
        digest = hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:8]
        return f"{Path(self.agent).stem}-{Path(self.env).stem}-{digest}"


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["agent.lr=1e-4,3e-4", "agent=sail,sail-revkl"]`` -> ``[(key, [values])]`` (order kept)."""
    grid, seen = [], set()
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        values = [v.strip() for v in raw.split(",")]
        if not sep or not key or not raw.strip() or any(v == "" for v in values):
            raise UserError(f"--grid {item!r} must look like key=v1,v2,... e.g. agent.revkl_coef=0,0.01")
        if key not in PRESET_KEYS and not re.fullmatch(r"(env|agent|run)(\.[A-Za-z_][A-Za-z0-9_]*)+", key):
            raise UserError(f"--grid key {key!r} must be env, agent (the preset) or section.field such as agent.lr or env.cost.limit")
        if key in seen:
            raise UserError(f"--grid {key} is given twice; list all its values in one --grid")
        if len(set(values)) != len(values):
            raise UserError(f"--grid {key} repeats a value: {raw}")
        seen.add(key)
        grid.append((key, values))
    return grid


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip() != ""]
    except ValueError:
        raise UserError(f"--seeds {text!r} must be comma-separated integers, e.g. 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r} must be distinct integers >= 0, e.g. 0,1,2")
    return seeds


def _slug(settings: dict[str, str]) -> str:
    if not settings:
        return "base"
    text = "_".join(f"{k.split('.')[-1]}={v}" for k, v in settings.items())
    text = re.sub(r"[^A-Za-z0-9._=+-]", "-", text)
    if len(text) > 80:
        text = text[:60] + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return text


def expand(spec: SweepSpec, sweep_dir: Path) -> list[Trial]:
    """The cartesian product of the grid, times the seeds; each trial's config is resolved here, so a
    bad value anywhere stops the sweep before anything runs."""
    from rl_align.runs import resolve_config

    keys = [k for k, _ in spec.grid]
    trials, names = [], set()
    for combo in itertools.product(*[v for _, v in spec.grid]):
        settings = dict(zip(keys, combo))
        for seed in spec.seeds:
            name = f"{_slug(settings)}-s{seed}"
            if name in names:
                name = f"{name}-{len(names)}"
            names.add(name)
            env, agent = settings.get("env", spec.env), settings.get("agent", spec.agent)
            overrides = list(spec.sets) + [f"{k}={v}" for k, v in settings.items() if k not in PRESET_KEYS]
            t = Trial(name, seed, settings, env, agent, overrides, spec.steps, spec.device, str((sweep_dir / "trials" / name).resolve()))
            try:
                cfg = resolve_config(t.env, t.agent, t.overrides, steps=t.steps, seed=seed)
                if t.device:
                    cfg.run.device = t.device
            except UserError as exc:
                raise UserError(f"trial {t.settings_label()} seed {seed}: {exc} (nothing was started)") from None
            t.out_dir = str(Path(cfg.run.out_dir).resolve())
            trials.append(t)
    return trials


def find_run_folder(root: Path) -> Path | None:
    """The newest run folder under a trial's root (``<env>/<agent>/<stamp>-s<seed>``)."""
    found = sorted((p.parent for p in Path(root).glob("*/*/*/config.yaml")), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def run_trial(t: Trial) -> dict:
    """Run (or skip, or resume) one trial; never raises: failures come back as a row with the error."""
    from rl_align.checkpoints import load_checkpoint
    from rl_align.errors import Interrupted
    from rl_align.runs import create_run_folder, resolve_config
    from rl_align.train import resume, train

    row = {"trial": t.trial, "seed": t.seed, **t.settings, "status": "failed", "error": "", "run_folder": ""}
    folder = find_run_folder(Path(t.root))
    try:
        if folder is not None and (folder / "summary.json").exists():
            summary = json.loads((folder / "summary.json").read_text())
        elif folder is not None and (folder / "checkpoints" / "last.pt").exists() and "loop" in load_checkpoint(folder):
            folder, summary = resume(folder, quiet=True)
        else:
            cfg = resolve_config(t.env, t.agent, t.overrides, steps=t.steps, seed=t.seed)
            # run.out_dir stays where cached references (runs/_refs) live, shared by all trials
            cfg.run.out_dir, cfg.run.progress = t.out_dir, False
            if t.device:
                cfg.run.device = t.device
            folder = create_run_folder(cfg, root=Path(t.root))
            folder, summary = train(cfg, folder=folder, quiet=True)
        row.update(status="finished", **summary_metrics(summary))
    except Interrupted as exc:
        row.update(status="interrupted", error=str(exc), exit_code=exc.exit_code)
    except UserError as exc:
        row["error"] = str(exc)
    except Exception as exc:  # a bug or a crash in one trial must not stop the others
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    folder = folder or find_run_folder(Path(t.root))
    row["run_folder"] = os.path.relpath(folder, Path(t.root).parent.parent) if folder is not None else ""  # relative to the sweep folder
    return row


def _rel(t: Trial) -> str:
    folder = find_run_folder(Path(t.root))
    return os.path.relpath(folder, Path(t.root).parent.parent) if folder is not None else ""


def summary_metrics(summary: dict) -> dict:
    out = {k: v for k, v in summary.get("final", {}).items() if isinstance(v, (int, float))}
    out.update({k: summary.get(k) for k in ("queries_used", "env_steps", "wall_time_s")})
    return out


def write_index(path: Path, rows: list[dict], grid_keys: list[str]) -> None:
    """``index.csv``: trial, seed, settings, status, error, the headline metrics, the rest, run folder."""
    from rl_align.checkpoints import write_text_atomic

    fixed = ["trial", "seed", *grid_keys, "status", "error"]
    extra = sorted({k for r in rows for k in r} - set(fixed) - set(HEAD_METRICS) - {"run_folder"})
    head = [k for k in HEAD_METRICS if any(k in r for r in rows)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fixed + head + extra + ["run_folder"], extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    write_text_atomic(path, buf.getvalue())


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def run_sweep(spec: SweepSpec, name: str | None = None, root: Path | str = "runs/sweeps", workers: int | None = None,
              backend: str = "local", address: str | None = None, log=print) -> tuple[Path, list[dict]]:
    """Validate every trial, then run the unfinished ones; returns ``(sweep folder, index rows)``.
    Ctrl-C / SIGTERM: running trials checkpoint, the index is written, :class:`Interrupted` is raised."""
    with DeferredSignals("sweep") as stop:
        folder, rows = _run_sweep(spec, name, root, workers, backend, address, log, stop)
    if stop.signum is not None:
        raise SweepInterrupted(stop.signum)
    return folder, rows


def _run_sweep(spec: SweepSpec, name: str | None, root: Path | str, workers: int | None, backend: str, address: str | None,
               log, stop: DeferredSignals) -> tuple[Path, list[dict]]:
    if backend not in ("local", "ray"):
        raise UserError(f"--backend must be local or ray, got {backend!r}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    name = name or spec.default_name()
    if not re.fullmatch(r"[A-Za-z0-9._+=-]+", name):
        raise UserError(f"--name {name!r} may hold only letters, digits and . _ + = -")
    sweep_dir = Path(root) / name
    spec_file = sweep_dir / "sweep.json"
    if spec_file.exists():
        old = json.loads(spec_file.read_text())
        if old != json.loads(json.dumps(spec.key())):
            diff = sorted(k for k in old if old.get(k) != json.loads(json.dumps(spec.key())).get(k))
            raise UserError(f"{sweep_dir} holds a different sweep (its {', '.join(diff)} differ); use another --name or the same options")
    trials = expand(spec, sweep_dir)  # validates everything before a folder is made
    if backend == "ray":
        ray = _import_ray()
    from rl_align.checkpoints import write_text_atomic

    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(spec_file, json.dumps(spec.key(), indent=2))
    grid_keys = [k for k, _ in spec.grid]
    rows = {t.trial: {"trial": t.trial, "seed": t.seed, **t.settings, "status": "pending", "error": "", "run_folder": ""} for t in trials}
    todo = []
    for t in trials:
        folder = find_run_folder(Path(t.root))
        if folder is not None and (folder / "summary.json").exists():
            rows[t.trial] = run_trial(t)  # reads the summary only
        else:
            todo.append(t)
    index = sweep_dir / "index.csv"
    write_index(index, list(rows.values()), grid_keys)
    skipped = len(trials) - len(todo)
    workers = min(workers or default_workers(), max(1, len(todo)))
    log(f"sweep {name}: {len(trials)} trials ({skipped} already finished, {len(todo)} to run) on {backend}"
        f"{'' if backend == 'ray' else f' with {workers} worker(s)'}; index: {index}")

    done = 0
    interrupted: list[int] = []

    def record(row: dict) -> None:
        nonlocal done
        done += 1
        exit_code = row.pop("exit_code", None)
        if exit_code is not None:
            interrupted.append(exit_code - 128)
        rows[row["trial"]] = row
        write_index(index, list(rows.values()), grid_keys)
        what = f"return {row['eval/return_det']:.1f}" if row["status"] == "finished" and "eval/return_det" in row else row["error"]
        log(f"[{done}/{len(todo)}] {row['trial']}: {row['status']}  {what}")

    if todo:
        if backend == "ray":
            _run_ray(ray, todo, workers, address, record, stop)
        elif workers == 1:
            for t in todo:
                if stop.signum is not None:
                    break
                record(run_trial(t))
                if interrupted:
                    stop.signum = stop.signum or interrupted[0]
        else:
            _run_pool(todo, workers, record, stop)
    return sweep_dir, list(rows.values())


def _run_pool(todo: list[Trial], workers: int, record, stop: DeferredSignals) -> None:
    """A spawn-context process pool; SIGTERM to the sweep is passed on to the running trials, which
    checkpoint and stop (Ctrl-C reaches them directly through the terminal's process group)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    futures: dict = {}

    def on_signal(signum: int) -> None:
        for f in futures:
            f.cancel()
        if signum == signal.SIGTERM:
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                try:
                    proc.terminate()  # SIGTERM: the trial finishes its iteration and checkpoints
                except OSError:
                    pass

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        if stop.signum is None:
            futures.update({pool.submit(run_trial, t): t for t in todo})
        stop.callback = on_signal
        try:
            for f in as_completed(futures):
                t = futures[f]
                if f.cancelled():
                    continue
                try:
                    record(f.result())
                except BrokenProcessPool as exc:
                    status, why = ("interrupted", "stopped by a signal") if stop.signum else ("failed", f"worker process died: {exc}")
                    record({"trial": t.trial, "seed": t.seed, **t.settings, "status": status, "error": why, "run_folder": _rel(t)})
        finally:
            stop.callback = None


def SweepInterrupted(signum: int) -> Exception:
    """The sweep's own interruption: exit 128 + signum with the way to resume."""
    from rl_align.errors import Interrupted

    exc = Interrupted.__new__(Interrupted)
    Exception.__init__(exc, f"{signal.Signals(signum).name}: running trials wrote checkpoints; re-run the same sweep command to resume")
    exc.exit_code = 128 + signum
    return exc


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--backend ray needs Ray: pip install 'rl-align[ray]' (or pip install 'ray[default]')") from None
    return ray


def _run_ray(ray, todo: list[Trial], workers: int, address: str | None, record, stop: DeferredSignals) -> None:
    """Each trial is one Ray task (1 CPU). ``--address`` joins a running cluster; the nodes need rl-align
    installed and the sweep folder on a shared filesystem. Without it, a local Ray instance is started."""
    if not ray.is_initialized():
        try:
            ray.init(address=address) if address else ray.init(num_cpus=workers, include_dashboard=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {str(exc).splitlines()[0]}") from None
    remote = ray.remote(num_cpus=1)(run_trial)
    pending = {remote.remote(t): t for t in todo}
    while pending:
        if stop.signum is not None:  # no checkpoint at the cut: these trials resume from their last periodic one
            for ref, t in pending.items():
                ray.cancel(ref)
                record({"trial": t.trial, "seed": t.seed, **t.settings, "status": "interrupted", "error": "cancelled by a signal",
                        "run_folder": _rel(t)})
            return
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        if not ready:
            continue
        t = pending.pop(ready[0])
        try:
            record(ray.get(ready[0]))
        except Exception as exc:  # the worker died (e.g. out of memory) rather than the trial failing
            record({"trial": t.trial, "seed": t.seed, **t.settings, "status": "failed",
                    "error": f"Ray task failed: {type(exc).__name__}", "run_folder": _rel(t)})


# ---- command line --------------------------------------------------------------------------------

def _sweep(args: argparse.Namespace) -> int:
    spec = SweepSpec(env=args.env, agent=args.agent, steps=args.steps, sets=list(args.set), grid=parse_grid(args.grid),
                     seeds=parse_seeds(args.seeds), device=args.device)
    folder, rows = run_sweep(spec, name=args.name, root=args.root, workers=args.workers, backend=args.backend, address=args.address)
    failed = [r for r in rows if r["status"] != "finished"]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} trials finished; index: {folder / 'index.csv'}")
    if failed:
        for r in failed:
            print(f"  {r['trial']}: {r['status']}: {r['error']}", file=sys.stderr)
        print("  re-run the same command to resume (finished trials are skipped)", file=sys.stderr)
        return 1
    print(f"plots and table: rl-align report {folder}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of settings x seeds (local pool or Ray)",
                       description="Train every combination of --grid values for every seed; writes runs/sweeps/<name>/ with index.csv. "
                                   "Re-running the same command resumes: finished trials are skipped.")
    p.add_argument("--env", default="halfcheetah", help="env preset, .yaml path or Gymnasium id (as for train)")
    p.add_argument("--agent", default="ppo", help="agent preset or .yaml path (as for train)")
    p.add_argument("--steps", type=int, default=None, help="env steps per trial (default: the preset's run.steps)")
    p.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for every trial (repeatable)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="values to sweep (repeatable; the cartesian product); KEY is section.field (agent.revkl_coef) or env / agent to vary the preset")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2 (default 0)")
    p.add_argument("--workers", type=int, default=None, help="parallel trials (default: the machine's CPU count)")
    p.add_argument("--name", default=None, help="sweep folder name under --root (default: agent-env-<hash of the options>)")
    p.add_argument("--root", default="runs/sweeps", help="where sweep folders go (default runs/sweeps)")
    p.add_argument("--backend", choices=("local", "ray"), default="local", help="local process pool (default) or Ray tasks")
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. ray://head:10001 or auto); default: a local Ray instance")
    p.set_defaults(func=_sweep)
