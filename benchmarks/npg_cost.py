"""What one SAC gradient step costs with the natural-gradient actor step (``agent.actor_step=npg``) against
Adam, side by side in one process, at the batch the lab samples uniformly and at the npg script's newest
transitions (``agent.recent_batch``). The agent is the ``pebble-revkl-npg`` preset's on an env preset; its
replay buffer is filled with random transitions (the step's cost does not depend on what they hold).

    python benchmarks/npg_cost.py                                   # cheetah-run-pref, 128x128 nets
    python benchmarks/npg_cost.py --env walker-walk-pref --steps 20 --recent 0 4096
    python benchmarks/npg_cost.py --fvp                             # the Fisher-vector product, four ways

Prints the CPU milliseconds of one gradient step (process time, one thread, mean over ``--steps`` after
three warm-up steps) for each actor step and batch, and the ratio to Adam at the uniform batch. ``--fvp``
times one product ``F v`` (128x128 policy, batch 256, 17 observations, 6 actions) computed as the paper's
code does (the KL's Hessian, its graph rebuilt for each product), with that graph built once, by
``torch.func`` jvp and vjp of ``(mu, log_std)``, and as the agent does (the Gaussian's Fisher in closed
form, ``J v`` from differentiating ``J^T u`` in ``u``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rl_align.agents.sac import fisher_product  # noqa: E402
from rl_align.nets import SquashedGaussianPolicy, gaussian_kl  # noqa: E402
from rl_align.runs import build_agent, resolve_config  # noqa: E402


def fvp_ms(repeats: int = 20) -> dict[str, float]:
    """Milliseconds per Fisher-vector product, four ways (the module docstring); all four agree."""
    torch.manual_seed(0)
    pol, obs = SquashedGaussianPolicy(17, 6, [128, 128]), torch.randn(256, 17)
    params, names = list(pol.parameters()), [n for n, _ in pol.named_parameters()]
    sizes, shapes = [p.numel() for p in params], [p.shape for p in params]
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    with torch.no_grad():
        mu0, ls0 = pol(obs)
    fisher = torch.cat([torch.exp(-2 * ls0), torch.full_like(ls0, 2.0)], -1) / len(obs)

    def rebuilt():
        def f(v):
            grad_kl = flat(torch.autograd.grad(gaussian_kl(mu0, ls0, *pol(obs)).mean(), params, create_graph=True))
            return flat(torch.autograd.grad(grad_kl @ v, params))
        return f

    def built_once():
        grad_kl = flat(torch.autograd.grad(gaussian_kl(mu0, ls0, *pol(obs)).mean(), params, create_graph=True))
        return lambda v: flat(torch.autograd.grad(grad_kl @ v, params, retain_graph=True))

    def func_jvp():
        P = {k: p.detach() for k, p in pol.named_parameters()}
        out = lambda p: torch.cat(torch.func.functional_call(pol, p, (obs,)), -1)  # noqa: E731
        _, jt = torch.func.vjp(out, P)

        def f(v):
            _, jv = torch.func.jvp(out, (P,), (dict(zip(names, (x.reshape(s) for x, s in zip(v.split(sizes), shapes)))),))
            return flat(jt(fisher * jv)[0].values())
        return f

    def closed_form():
        return fisher_product(pol, obs, damping=0.0)[0]

    v, times, results = torch.randn(sum(sizes)), {}, []
    for name, make in (("Hessian, rebuilt per product (the paper's code)", rebuilt), ("Hessian, graph built once", built_once),
                       ("torch.func jvp + vjp", func_jvp), ("closed-form Fisher, two backward passes (the agent)", closed_form)):
        f = make()
        for _ in range(3):
            f(v)
        t = time.process_time()
        for _ in range(repeats):
            r = f(v)
        times[name] = (time.process_time() - t) / repeats * 1e3
        results.append(r)
    assert all(torch.allclose(r, results[0], rtol=1e-3, atol=1e-5) for r in results), "the four products disagree"
    return times


def step_ms(env: str, sets: list[str], steps: int, fill: int = 5000) -> float:
    agent, vec = build_agent(resolve_config(env, "pebble-revkl-npg", [*sets, "agent.unsup_steps=0", "agent.learning_starts=0"],
                                            steps=max(fill, 10_000), seed=0))
    vec.close()
    rng = np.random.default_rng(0)
    for _ in range(fill):
        o = rng.standard_normal((1, agent.obs_dim)).astype(np.float32)
        agent.replay.add(o, o, rng.uniform(-1, 1, (1, agent.act_dim)), np.ones(1), np.zeros(1), np.zeros((1, 3)),
                         np.zeros(1, bool), np.zeros(1, bool), learned=0.5)
    agent.env_steps = fill  # past the unsupervised phase: the recent batch applies
    for _ in range(3):
        agent.gradient_step()
    t = time.process_time()
    for _ in range(steps):
        agent.gradient_step()
    return (time.process_time() - t) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env", default="cheetah-run-pref")
    ap.add_argument("--steps", type=int, default=10, help="timed gradient steps per setting")
    ap.add_argument("--recent", type=int, nargs="+", default=[0, 1024, 4096], help="recent_batch values (0: uniform batch)")
    ap.add_argument("--fvp", action="store_true", help="time the Fisher-vector product four ways instead")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.fvp:
        for name, ms in fvp_ms().items():
            print(f"{ms:7.2f} ms  {name}")
        return
    base = step_ms(args.env, ["agent.actor_step=adam", "agent.recent_batch=0"], args.steps)
    print(f"{'actor step':>10} {'batch':>14} {'ms / step':>10} {'x adam@uniform':>15}")
    print(f"{'adam':>10} {'uniform':>14} {base:10.1f} {1.0:15.2f}", flush=True)
    for recent in args.recent:
        for step in ("npg", "adam") if recent else ("npg",):
            ms = step_ms(args.env, [f"agent.actor_step={step}", f"agent.recent_batch={recent}"], args.steps)
            print(f"{step:>10} {f'newest {recent}' if recent else 'uniform':>14} {ms:10.1f} {ms / base:15.2f}", flush=True)


if __name__ == "__main__":
    main()
