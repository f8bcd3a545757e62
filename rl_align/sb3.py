"""stable-baselines3 in and out, without unpickling anything a file brings.

In: an SB3 PPO / A2C ``MlpPolicy`` model zip (and its ``vecnormalize.pkl``) becomes rl-align's
``GaussianPolicy`` + observation normalizer, for ``agent.ref=sb3:<zip>`` (SAIL family) and
``agent.init=sb3:<zip>`` (PPO / RLHF); an SB3 SAC ``MlpPolicy`` zip becomes a ``SquashedGaussianPolicy``
for ``agent.ref=sb3:<zip>`` of the sac agents (PEBBLE, SAIL-RevKL off-policy). ``PPO.load`` would run ``cloudpickle.loads`` on the zip's ``data``
blobs and ``VecNormalize.load`` is a raw ``pickle.load``: here ``data`` is read as JSON only (the blobs
stay base64 text), ``policy.pth`` with ``torch.load(weights_only=True)``, and ``vecnormalize.pkl`` with
:class:`SafeUnpickler`, which admits numpy's array reconstruction and inert records of the few classes the
file names and refuses every other callable.

Tensor mapping (SB3 ``ActorCriticPolicy`` -> ``GaussianPolicy``): ``mlp_extractor.policy_net.{0,2,..}``
-> ``mean.{0,2,..}`` (hidden layers), ``action_net`` -> the mean's output layer, ``log_std`` -> ``log_std``;
``mlp_extractor.value_net`` + ``value_net`` -> ``ValueNet.net`` on export. SB3 SAC's ``Actor`` ->
``SquashedGaussianPolicy``: ``actor.latent_pi.{0,2,..}`` -> ``trunk.{0,2,..}``, ``actor.mu`` and
``actor.log_std`` stacked into the trunk's output layer (mean first), the log-std clipped to SB3's
``[-20, 2]`` (``log_std_bound: clip``); the critics are not read.

Out: :class:`PolicyView` gives any rl-align checkpoint SB3's ``predict`` signature (``evaluate_policy`` and
SB3-style scripts run on it); ``rl-align export --sb3 <run folder> <out.zip>`` writes a zip that SB3's own
``PPO.load`` reads (plus ``vecnormalize.pkl``), written by SB3 itself, so it needs stable-baselines3.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rl_align.errors import UserError
from rl_align.nets import ACTIVATIONS, SquashedGaussianPolicy

SUPPORTED = ("supported: SB3 PPO / A2C 'MlpPolicy' (ActorCriticPolicy, flat Box observations, separate pi / vf "
             "layers, Tanh or ReLU activation, no gSDE)")
SUPPORTED_SAC = "supported for the sac agents' agent.ref: SB3 SAC 'MlpPolicy' (flat Box observations, no gSDE, no VecNormalize)"
SB3_SAC_LOG_STD = (-20.0, 2.0)  # stable_baselines3.sac.policies: LOG_STD_MIN, LOG_STD_MAX


# ---- reading vecnormalize.pkl ---------------------------------------------------------------------
class Record:
    """Inert stand-in for a class a pickle names: it keeps the arguments and state it is given, runs no
    code of that class. ``origin`` is the ``module.name`` the pickle asked for."""

    origin = ""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        self.args = args

    def __setstate__(self, state) -> None:
        self.state = state[0] if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict) else state


_NUMPY_ARRAYS = {("numpy", "ndarray"), ("numpy", "dtype")} | {  # numpy 1 and 2 module names; _frombuffer: pickle protocol 5
    (f"numpy.{core}.{mod}", fn) for core in ("core", "_core") for mod, fn in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}
_RECORDS = {  # what VecNormalize.save writes besides arrays: the wrapper, its running stats, the spaces' seeded generators
    ("stable_baselines3.common.vec_env.vec_normalize", "VecNormalize"), ("stable_baselines3.common.running_mean_std", "RunningMeanStd"),
    ("gymnasium.spaces.box", "Box"), ("gym.spaces.box", "Box"), ("numpy.random._pickle", "__generator_ctor"),
    ("numpy.random._pickle", "__bit_generator_ctor"), ("numpy.random._pickle", "__randomstate_ctor"), ("numpy.random._pcg64", "PCG64"),
    ("numpy.random._mt19937", "MT19937"), ("numpy.random.bit_generator", "SeedSequence"), ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"),
}


class SafeUnpickler(pickle.Unpickler):
    """``find_class`` admits numpy's array-reconstruction callables and inert :class:`Record` types for the
    classes ``VecNormalize.save`` names; anything else (``os.system``, ``builtins.eval``, ...) is refused."""

    def __init__(self, file, path: Path) -> None:
        super().__init__(file)
        self.path, self.records = path, {}

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_ARRAYS:
            return super().find_class(module, name)
        if (module, name) in _RECORDS:
            return self.records.setdefault((module, name), type(name, (Record,), {"origin": f"{module}.{name}"}))
        raise UserError(f"{self.path} asks to load {module}.{name}, which a VecNormalize file never holds; refused "
                        "(only numpy arrays and VecNormalize's own fields are read)")


def read_vecnormalize(path: Path) -> dict | None:
    """``RunningMeanStd`` state (``mean``, ``var``, ``count``) of an SB3 ``vecnormalize.pkl``; None when it
    does not normalize observations. Its clip and epsilon must be rl-align's (10, 1e-8)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no VecNormalize file at {path}; name it as sb3:<model.zip>:<vecnormalize.pkl>")
    try:
        with path.open("rb") as f:
            top = SafeUnpickler(f, path).load()
    except UserError:
        raise
    except Exception as exc:  # truncated or foreign files raise many types
        raise UserError(f"{path} is not a readable VecNormalize file ({type(exc).__name__}); give the vecnormalize.pkl SB3 saved") from None
    state = getattr(top, "state", None)
    if not isinstance(top, Record) or not top.origin.endswith(".VecNormalize") or not isinstance(state, dict):
        raise UserError(f"{path} does not hold a VecNormalize; give the vecnormalize.pkl that VecNormalize.save wrote")
    if not state.get("norm_obs", False):
        return None
    rms = getattr(state.get("obs_rms"), "state", None)
    if not isinstance(rms, dict) or not {"mean", "var", "count"} <= rms.keys():
        raise UserError(f"{path} normalizes a dict observation space; {SUPPORTED}")
    clip, eps = float(state.get("clip_obs", 10.0)), float(state.get("epsilon", 1e-8))
    if clip != 10.0 or eps != 1e-8:
        raise UserError(f"{path} uses clip_obs={clip:g}, epsilon={eps:g}; rl-align's normalizer clips at 10 with epsilon 1e-8 (SB3's defaults)")
    return {"mean": torch.as_tensor(np.asarray(rms["mean"], dtype=np.float64)),
            "var": torch.as_tensor(np.asarray(rms["var"], dtype=np.float64)), "count": float(rms["count"])}


# ---- reading the model zip ------------------------------------------------------------------------
@dataclass
class SB3Policy:
    """An SB3 Gaussian MLP policy in rl-align's shapes: ``policy`` is a ``GaussianPolicy`` state dict."""

    source: str
    hidden: list[int]
    activation: str
    obs_dim: int
    act_dim: int
    policy: dict[str, torch.Tensor]
    obs_rms: dict | None  # RunningMeanStd state; None: trained on raw observations
    squashed: bool = False  # an SB3 SAC actor: ``policy`` is a SquashedGaussianPolicy state dict


def split_spec(spec: str) -> tuple[Path, Path | None]:
    """``<zip>`` or ``<zip>:<pkl>`` -> paths. Without a pkl, ``vecnormalize.pkl`` beside the zip or in the
    RL-Zoo layout (``<folder>/<zip stem>/vecnormalize.pkl``) is used when present."""
    zip_part, sep, pkl_part = spec.partition(".zip:")
    if sep:
        return Path(zip_part + ".zip"), Path(pkl_part)
    zip_path = Path(spec)
    for cand in (zip_path.parent / "vecnormalize.pkl", zip_path.parent / zip_path.stem / "vecnormalize.pkl"):
        if cand.is_file():
            return zip_path, cand
    return zip_path, None


def _read_zip(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise UserError(f"no SB3 model at {path}; give the .zip that model.save() wrote")
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if not {"data", "policy.pth"} <= names:
                raise UserError(f"{path} is not an SB3 model zip (it has no data / policy.pth)")
            data = json.loads(z.read("data"))  # JSON only: the ':serialized:' cloudpickle blobs stay text
            raw = z.read("policy.pth")
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"{path} is not a readable SB3 model zip ({type(exc).__name__})") from None
    try:
        weights = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise UserError(f"{path}: policy.pth holds more than tensors and was refused by torch's weights_only loader "
                        f"({type(exc).__name__})") from None
    if not isinstance(data, dict) or not isinstance(weights, dict):
        raise UserError(f"{path} is not an SB3 model zip (unexpected data / policy.pth layout)")
    return data, weights


def _activation(data: dict, path: Path, default: str = "tanh") -> str:
    """The activation's name from ``policy_kwargs``: SB3 stores a class as its ``str()`` beside the blob.
    Absent, the policy's default: ``tanh`` for ActorCriticPolicy, ``relu`` for SACPolicy."""
    kwargs = data.get("policy_kwargs") or {}
    fn = kwargs.get("activation_fn") if isinstance(kwargs, dict) else None
    if fn is None:
        return default
    m = re.fullmatch(r"<class 'torch\.nn\.modules\.activation\.(\w+)'>", str(fn))
    if m is None or m.group(1).lower() not in ACTIVATIONS:
        raise UserError(f"{path} uses activation {fn}; {SUPPORTED}")
    return m.group(1).lower()


def _layers(weights: dict, prefix: str) -> list[int]:
    idx = sorted({int(k[len(prefix):].split(".")[0]) for k in weights if k.startswith(prefix)})
    if idx != list(range(0, 2 * len(idx), 2)):
        raise UserError(f"unexpected layer layout {prefix}{idx}; {SUPPORTED}")
    return idx


def read_sb3(spec: str) -> SB3Policy:
    """Parse an SB3 model zip (and normalizer) named by ``spec`` (see :func:`split_spec`) into rl-align shapes."""
    zip_path, pkl_path = split_spec(spec)
    data, w = _read_zip(zip_path)
    pc = data.get("policy_class")
    init = str(pc.get("__init__", "")) if isinstance(pc, dict) else ""
    if init.startswith("<function SACPolicy.__init__ ") and pc.get("__module__") == "stable_baselines3.sac.policies":
        return _read_sac(zip_path, pkl_path, data, w)
    if not init.startswith("<function ActorCriticPolicy.__init__ ") or pc.get("__module__") != "stable_baselines3.common.policies":
        name = re.match(r"<function (\w+)\.", init)
        raise UserError(f"{zip_path} holds a {name.group(1) if name else 'non actor-critic'} policy; {SUPPORTED}")
    if data.get("use_sde"):
        raise UserError(f"{zip_path} uses gSDE exploration (use_sde=True); {SUPPORTED}")
    pi, vf = _layers(w, "mlp_extractor.policy_net."), _layers(w, "mlp_extractor.value_net.")
    expected = {"log_std", "action_net.weight", "action_net.bias", "value_net.weight", "value_net.bias"}
    expected |= {f"mlp_extractor.{net}.{i}.{p}" for net, idx in (("policy_net", pi), ("value_net", vf)) for i in idx for p in ("weight", "bias")}
    if set(w) != expected:
        extra = sorted(set(w) - expected) or sorted(expected - set(w))
        raise UserError(f"{zip_path} has tensors this mapping does not know ({', '.join(extra[:3])}); {SUPPORTED}")
    if w["log_std"].dim() != 1:
        raise UserError(f"{zip_path} has a state-dependent log-std; {SUPPORTED}")
    hidden = [int(w[f"mlp_extractor.policy_net.{i}.weight"].shape[0]) for i in pi]
    act_dim, obs_dim = w["action_net.weight"].shape[0], (w["mlp_extractor.policy_net.0.weight"] if pi else w["action_net.weight"]).shape[1]
    policy = {f"mean.{i}.{p}": w[f"mlp_extractor.policy_net.{i}.{p}"].float() for i in pi for p in ("weight", "bias")}
    policy.update({f"mean.{2 * len(pi)}.weight": w["action_net.weight"].float(), f"mean.{2 * len(pi)}.bias": w["action_net.bias"].float(),
                   "log_std": w["log_std"].float()})
    obs_rms = read_vecnormalize(pkl_path) if pkl_path is not None else None
    if obs_rms is not None and tuple(obs_rms["mean"].shape) != (obs_dim,):
        raise UserError(f"{pkl_path} normalizes {tuple(obs_rms['mean'].shape)} observations but {zip_path} takes ({obs_dim},); pair the files SB3 saved together")
    return SB3Policy(str(zip_path), hidden, _activation(data, zip_path), int(obs_dim), int(act_dim), policy, obs_rms)


def _read_sac(zip_path: Path, pkl_path: Path | None, data: dict, w: dict) -> SB3Policy:
    """An SB3 SAC actor as a ``SquashedGaussianPolicy`` state dict (see the module's mapping)."""
    if data.get("use_sde"):
        raise UserError(f"{zip_path} uses gSDE exploration (use_sde=True); {SUPPORTED_SAC}")
    if pkl_path is not None and read_vecnormalize(pkl_path) is not None:
        raise UserError(f"{zip_path} comes with a VecNormalize ({pkl_path}); {SUPPORTED_SAC}")
    hid = _layers(w, "actor.latent_pi.")
    actor = {k for k in w if k.startswith("actor.")}
    expected = {f"actor.{n}.{p}" for n in ["mu", "log_std"] + [f"latent_pi.{i}" for i in hid] for p in ("weight", "bias")}
    if actor != expected:
        extra = sorted(actor - expected) or sorted(expected - actor)
        raise UserError(f"{zip_path} has actor tensors this mapping does not know ({', '.join(extra[:3])}); {SUPPORTED_SAC}")
    out = 2 * len(hid)  # the trunk's output layer: [mu; log_std]
    policy = {f"trunk.{i}.{p}": w[f"actor.latent_pi.{i}.{p}"].float() for i in hid for p in ("weight", "bias")}
    policy.update({f"trunk.{out}.{p}": torch.cat([w[f"actor.mu.{p}"], w[f"actor.log_std.{p}"]]).float() for p in ("weight", "bias")})
    first = w["actor.latent_pi.0.weight"] if hid else w["actor.mu.weight"]
    return SB3Policy(str(zip_path), [int(w[f"actor.latent_pi.{i}.weight"].shape[0]) for i in hid], _activation(data, zip_path, "relu"),
                     int(first.shape[1]), int(w["actor.mu.weight"].shape[0]), policy, None, squashed=True)


def agent_state(spec: str, agent) -> dict:
    """``{"policy", "obs_rms"}`` for a start named ``sb3:<spec>`` (``train.prepare`` hands it to ``Agent.prepare``). The agent's network must have the
    imported shape: a mismatch names the ``--set`` fields that make it so."""
    m = read_sb3(spec)
    c = agent.config
    obs_dim, act_dim = agent.obs_rms.mean.shape[0], agent.act_low.shape[0]
    if (m.obs_dim, m.act_dim) != (obs_dim, act_dim):
        raise UserError(f"{m.source} maps {m.obs_dim} observations to {m.act_dim} actions, this env {obs_dim} to {act_dim}; train it on the same task")
    sac_agent = isinstance(agent.policy, SquashedGaussianPolicy)
    if m.squashed != sac_agent:
        raise UserError(f"{m.source} holds an SB3 {'SAC' if m.squashed else 'PPO / A2C'} policy; "
                        f"{SUPPORTED_SAC if sac_agent else SUPPORTED.replace('supported:', 'supported for this agent:')}")
    if m.squashed:  # a reference of its own network; the sac agent sees raw observations unless told otherwise
        if c.normalize_obs:
            raise UserError(f"{m.source} was trained on raw observations (no VecNormalize); set agent.normalize_obs=false")
        net = {"hidden": m.hidden, "activation": m.activation, "log_std_bounds": SB3_SAC_LOG_STD, "log_std_bound": "clip"}
        return {"policy": m.policy, "net": net}
    if list(c.hidden) != m.hidden or c.activation != m.activation:
        hidden = "[" + ",".join(map(str, m.hidden)) + "]"
        raise UserError(f"{m.source} holds a {hidden} {m.activation} policy; set agent.hidden={hidden} agent.activation={m.activation}")
    if m.obs_rms is None and c.normalize_obs:  # the zip says it: trained on raw observations, so the agent sees them raw too
        c.normalize_obs = False  # (the run's config.yaml, written after this, records it: a resumed run agrees)
        print(f"reference: {m.source} comes without a VecNormalize: observations are used raw (agent.normalize_obs=false; "
              "name a normalizer as sb3:<model.zip>:<vecnormalize.pkl>)", file=sys.stderr)
    if m.obs_rms is not None and not c.normalize_obs:
        raise UserError(f"{m.source} was trained on VecNormalize-d observations; set agent.normalize_obs=true")
    rms = m.obs_rms or {"mean": torch.zeros(obs_dim, dtype=torch.float64), "var": torch.ones(obs_dim, dtype=torch.float64), "count": 1e-4}
    return {"policy": m.policy, "obs_rms": rms}


# ---- rl-align policies in SB3's tools --------------------------------------------------------------
class PolicyView:
    """SB3's ``BasePolicy.predict`` over an rl-align checkpoint: raw observations in (the checkpoint's own
    normalizer is applied), env-ready actions out (clipped to the bounds, as SB3 does)."""

    def __init__(self, agent) -> None:
        self.agent = agent
        self._actor = agent.actor()

    @classmethod
    def from_run(cls, folder) -> "PolicyView":
        from rl_align.evaluation import load_agent

        return cls(load_agent(Path(folder))[1])

    def predict(self, observation: np.ndarray, state=None, episode_start: np.ndarray | None = None,
                deterministic: bool = False) -> tuple[np.ndarray, None]:
        """``(actions [N, act_dim] or [act_dim], state)``; the policy is memoryless, so ``state`` comes back as given."""
        obs = np.asarray(observation, dtype=np.float32)
        single = obs.ndim == 1
        actions = self.agent.act(obs[None] if single else obs, deterministic=deterministic, actor=self._actor)
        return (actions[0] if single else actions), state


def sb3_state_dict(agent) -> dict[str, torch.Tensor]:
    """The agent's actor and critic under SB3 ``ActorCriticPolicy`` names (the import mapping reversed)."""
    out_idx = 2 * len(agent.config.hidden)  # the output layer's index in both MLPs
    sd = {"log_std": agent.policy.log_std}
    for mlp, hidden, head in ((agent.policy.mean, "mlp_extractor.policy_net", "action_net"), (agent.value.net, "mlp_extractor.value_net", "value_net")):
        for i, layer in enumerate(mlp):
            if isinstance(layer, torch.nn.Linear):
                name = head if i == out_idx else f"{hidden}.{i}"
                sd[f"{name}.weight"], sd[f"{name}.bias"] = layer.weight, layer.bias
    return sd


def export_sb3(folder, out) -> tuple[Path, Path | None]:
    """Write the run's policy, critic and normalizer as an SB3 PPO zip (``out``) and ``vecnormalize.pkl``
    beside it (when the run normalizes observations). Never overwrites a file."""
    from rl_align.envs import make_env
    from rl_align.evaluation import load_agent

    folder, out = Path(folder), Path(out)
    if out.suffix != ".zip":
        raise UserError(f"{out}: the SB3 model file must end in .zip")
    pkl = out.with_name("vecnormalize.pkl")
    for p in (out, pkl):
        if p.exists():
            raise UserError(f"{p} exists; choose another output name (an export never overwrites)")
    try:
        from stable_baselines3 import PPO
        from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize
    except ImportError:
        raise UserError("rl-align export --sb3 writes the zip with stable-baselines3 itself: pip install 'stable-baselines3>=2.9'") from None
    cfg, agent = load_agent(folder)
    c = agent.config
    venv = DummyVecEnv([lambda: make_env(cfg.env)])
    model = PPO("MlpPolicy", venv, device="cpu", gamma=c.gamma, gae_lambda=c.gae_lambda, n_epochs=c.epochs, clip_range=c.clip,
                max_grad_norm=c.max_grad_norm, learning_rate=c.lr,
                policy_kwargs=dict(net_arch=dict(pi=list(c.hidden), vf=list(c.hidden)), activation_fn=ACTIVATIONS[c.activation], ortho_init=False))
    model.policy.load_state_dict({k: v.detach().cpu().float() for k, v in sb3_state_dict(agent).items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".partial.zip")
    model.save(tmp)
    written = None
    if c.normalize_obs:
        vn = VecNormalize(venv, training=False, norm_obs=True, norm_reward=False, clip_obs=agent.obs_rms.clip, epsilon=agent.obs_rms.eps)
        vn.obs_rms.mean, vn.obs_rms.var, vn.obs_rms.count = agent.obs_rms.mean.copy(), agent.obs_rms.var.copy(), agent.obs_rms.count
        tmp_pkl = pkl.with_name(pkl.name + ".partial")
        vn.save(tmp_pkl)
        os.replace(tmp_pkl, pkl)
        written = pkl
    os.replace(tmp, out)
    venv.close()
    return out, written


def _export(args: argparse.Namespace) -> int:
    out, pkl = export_sb3(args.folder, args.out)
    print(f"wrote {out}" + (f" and {pkl}" if pkl else " (the run uses raw observations: no VecNormalize)"))
    load = f"VecNormalize.load('{pkl}', venv)" if pkl else "venv"
    print(f"  in SB3: env = {load}; env.training = False; env.norm_reward = False; model = PPO.load('{out}', env=env)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run's policy in another library's format (--sb3: a stable-baselines3 PPO zip)",
                       description="Write checkpoints/last.pt of a run folder as a stable-baselines3 PPO zip that PPO.load reads, "
                                   "plus vecnormalize.pkl beside it when the run normalizes observations (needs stable-baselines3).")
    p.add_argument("--sb3", action="store_true", required=True, help="stable-baselines3 format (the only one so far)")
    p.add_argument("folder", help="a run folder (runs/<env>/<agent>/<stamp>)")
    p.add_argument("out", help="the .zip to write (vecnormalize.pkl goes beside it)")
    p.set_defaults(func=_export)
