"""Human preferences: what a person waits for, and what labels at a person's rate buy.

    python benchmarks/labels.py pipeline --pairs 12 --pace 3 [--prerender]   # render time, page latency (headless Chromium)
    python benchmarks/labels.py learn --agent sail-revkl --steps 100000 --interval 3 --seed 0
    python benchmarks/labels.py offline --agent sail-revkl --labels 100 --steps 20000 --seed 0

``pipeline``: a store of ``--pairs`` pairs of 50-step HalfCheetah segments from the shipped seed-0
reference; (1) seconds to render one pair's two clips (320x240, the page's default); with ``--prerender``
every pair's, before the page opens (the offline path: ``label collect`` renders), otherwise 4 probe pairs
and the page renders on demand, 3 pairs ahead (the online path); (2) the real page (``rl-align label``, uvicorn) in headless Chromium answered with the arrow keys every
``--pace`` seconds: the latency from the key press to both next clips playing, per label.

``learn``: online, as Christiano et al.: the trainer (``env.oracle.kind=human``, ``post_pairs``) queues pairs
of its rollouts in a fresh store while ``rl-align label answer --follow --interval 3`` (the Bradley-Terry
teacher on the true reward, the preset's oracle) answers one every ``--interval`` seconds; prints the
stochastic return at the start and end, the labels that arrived, and the gain per 100 labels. One JSON
line per run is appended to ``benchmarks/labels.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def pipeline(args) -> dict:
    from label_helpers import agent_for
    from test_label_page import Page

    from rl_align.labels.collect import collect_from_agent
    from rl_align.labels.render import ClipRenderer
    from rl_align.labels.store import LabelStore

    tmp = Path(tempfile.mkdtemp(prefix="labels-bench-"))
    cfg, agent = agent_for(["run.progress=false"], seed=0)
    store = LabelStore.create(tmp / "s.sqlite", cfg.env.task, "Prefer the clip that runs forward faster.", 50, 20.0)
    collect_from_agent(agent, cfg.env, store, args.pairs, seed=400_000, segment_len=50)
    from rl_align.labels.render import ensure_clips

    renderer = ClipRenderer(cfg.env.task)
    per_pair = []
    for pair in store.queued(limit=args.pairs if args.prerender else 4):  # offline: what label collect does before the page opens
        t0 = time.perf_counter()
        if args.prerender:
            ensure_clips(store, renderer, pair)
        else:
            for s in "12":
                renderer.write(store.segment(pair[f"seg{s}"]), tmp / "probe" / f"{pair['id']}-{s}.webm")
        per_pair.append(time.perf_counter() - t0)
    renderer.close()
    page = Page(store.path)
    latencies = []
    try:
        first = page.playing_pair(timeout=120)
        for k in range(args.pairs - 1):
            time.sleep(args.pace)
            page.key("ARROW_LEFT")
            page.playing_pair(timeout=120)
            latencies.append(page.js("const s = window.labelState; return s.playingAt - s.answeredAt") / 1000)
    finally:
        page.close()
    out = {"bench": "pipeline", "prerendered": args.prerender, "pairs": args.pairs, "pace_s": args.pace, "clip_s": 50 / 20.0, "clip_size": "320x240",
           "render_s_per_pair": per_pair, "latency_s": latencies, "latency_median_s": statistics.median(latencies),
           "latency_max_s": max(latencies), "first_pair_id": first}
    print(f"render: {statistics.median(per_pair):.2f} s per pair (median of {len(per_pair)}: {', '.join(f'{x:.2f}' for x in per_pair)}); "
          f"clips of 2.5 s")
    print(f"page latency ({'clips rendered by collect' if args.prerender else 'clips rendered by the page, 3 ahead'}), key press -> both next clips playing, one label every {args.pace:g} s: median {statistics.median(latencies):.3f} s, "
          f"max {max(latencies):.3f} s over {len(latencies)} labels")
    return out


def learn(args) -> dict:
    from rl_align.labels.store import LabelStore
    from rl_align.runs import resolve_config
    from rl_align.train import train

    tmp = Path(tempfile.mkdtemp(prefix="labels-learn-"))
    store = LabelStore.create(tmp / "s.sqlite", "HalfCheetah-v5", "Prefer the clip with more reward.", 50, 20.0)
    labeller = subprocess.Popen([sys.executable, "-m", "rl_align.cli", "label", "answer", str(store.path), "--follow",
                                 "--interval", str(args.interval), "--score", "reward"], cwd=ROOT, stdout=subprocess.DEVNULL)
    overrides = ["env.oracle.kind=human", f"env.oracle.store={store.path}", f"env.oracle.post_pairs={args.post_pairs}",
                 f"run.out_dir={tmp / 'runs'}", "run.progress=false"]
    cfg = resolve_config("halfcheetah-pref", args.agent, overrides + (["agent.init=auto"] if args.agent == "rlhf" else []),
                         steps=args.steps, seed=args.seed)
    t0 = time.time()
    try:
        folder, summary = train(cfg, quiet=True)
    finally:
        labeller.terminate()
        labeller.wait()
    wall = time.time() - t0
    labels = store.counts()["labelled"]
    i, f = summary["initial"], summary["final"]
    gain = f["eval/return_stoch"] - i["eval/return_stoch"]
    out = {"bench": "learn", "agent": args.agent, "seed": args.seed, "steps": args.steps, "interval_s": args.interval,
           "post_pairs": args.post_pairs, "wall_s": wall, "labels": labels, "queued": store.counts()["total"],
           "return_stoch_start": i["eval/return_stoch"], "return_stoch_end": f["eval/return_stoch"],
           "return_det_start": i["eval/return_det"], "return_det_end": f["eval/return_det"],
           "gain_per_100_labels": 100 * gain / labels if labels else None, "eval_episodes": summary.get("eval_episodes")}
    print(json.dumps(out))
    return out


def offline(args) -> dict:
    """``--labels`` labels, as a person would give them before training (at 3 s each: ``labels * 3`` s of their
    time): pairs of the shipped reference's rollouts answered by the preset's teacher (Bradley-Terry, T = 0,
    true reward), then ``--steps`` of training from the store alone."""
    from label_helpers import agent_for

    from rl_align.labels.collect import answer_queued, collect_from_agent, synthetic_oracle
    from rl_align.labels.store import LabelStore
    from rl_align.runs import resolve_config
    from rl_align.train import train

    tmp = Path(tempfile.mkdtemp(prefix="labels-offline-"))
    cfg, agent = agent_for(["run.progress=false"], seed=args.seed)
    store = LabelStore.create(tmp / "s.sqlite", cfg.env.task, "Prefer the clip with more reward.", 50, 20.0)
    collect_from_agent(agent, cfg.env, store, args.labels, seed=args.seed + 400_000, segment_len=50)
    answer_queued(store, synthetic_oracle("reward", 0.0, args.seed), "synthetic:reward")
    overrides = ["env.oracle.kind=human", f"env.oracle.store={store.path}", f"run.out_dir={tmp / 'runs'}", "run.progress=false"]
    run = resolve_config("halfcheetah-pref", args.agent, overrides + (["agent.init=auto"] if args.agent == "rlhf" else []),
                         steps=args.steps, seed=args.seed)
    t0 = time.time()
    folder, summary = train(run, quiet=True)
    i, f = summary["initial"], summary["final"]
    gain = f["eval/return_stoch"] - i["eval/return_stoch"]
    out = {"bench": "offline", "agent": args.agent, "seed": args.seed, "steps": args.steps, "labels": args.labels,
           "wall_s": time.time() - t0, "return_stoch_start": i["eval/return_stoch"], "return_stoch_end": f["eval/return_stoch"],
           "return_det_start": i["eval/return_det"], "return_det_end": f["eval/return_det"],
           "gain_per_100_labels": 100 * gain / args.labels, "eval_episodes": summary.get("eval_episodes")}
    print(json.dumps(out))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("pipeline")
    a.add_argument("--pairs", type=int, default=12)
    a.add_argument("--pace", type=float, default=3.0)
    a.add_argument("--prerender", action="store_true", help="render every clip first, as label collect does (offline path)")
    b = sub.add_parser("learn")
    b.add_argument("--agent", default="sail-revkl")
    b.add_argument("--steps", type=int, default=60_000)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--interval", type=float, default=3.0)
    b.add_argument("--post-pairs", type=int, default=20)
    c = sub.add_parser("offline")
    c.add_argument("--agent", default="sail-revkl")
    c.add_argument("--labels", type=int, default=100)
    c.add_argument("--steps", type=int, default=20_000)
    c.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = {"pipeline": pipeline, "learn": learn, "offline": offline}[args.what](args)
    out["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with open(ROOT / "benchmarks" / "labels.jsonl", "a") as fh:
        fh.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
