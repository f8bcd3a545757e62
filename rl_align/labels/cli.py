"""``rl-align label``: serve the labelling page, queue pairs from a run, or answer them synthetically.

    rl-align label <store> [--host H] [--port P] [--token T]        the page (127.0.0.1 by default)
    rl-align label collect --run <run folder> --pairs N [--store S]  queue pairs from a policy's rollouts
    rl-align label answer <store> --score forward [--interval 3]     a built-in oracle answers for a person
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rl_align.errors import UserError

USAGE = __doc__.split("\n\n", 1)[1]


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clip-size takes WIDTHxHEIGHT such as 320x240, got {text!r}") from None
    if not (16 <= w <= 1920 and 16 <= h <= 1080):
        raise argparse.ArgumentTypeError(f"--clip-size {text}: width in 16..1920 and height in 16..1080")
    return w, h


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rl-align label", description="Serve the labelling page of a label store.")
    p.add_argument("store", help="a label store file (rl-align label collect makes one)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--token", default=None, help="require ?token=... on every request (for --host other than 127.0.0.1)")
    p.add_argument("--labeller", default=None, help="name stored with each answer (default: <user>@page)")
    p.add_argument("--prefetch", type=int, default=3, help="queued pairs whose clips are rendered ahead (default 3)")
    p.add_argument("--lease", type=float, default=120.0, help="seconds a page holds its pair before another labeller may get it (default 120)")
    p.add_argument("--clip-size", type=_size, default=None, metavar="WxH", help="clip size for clips rendered here (default 320x240)")
    return p


def collect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rl-align label collect", description="Queue pairs of segments from a policy's stochastic rollouts.")
    p.add_argument("--run", required=True, help="a run folder (rl-align train wrote it): its last checkpoint's policy plays")
    p.add_argument("--pairs", type=int, required=True, help="pairs to queue")
    p.add_argument("--store", default=None, help="label store file (default <run>/labels.sqlite; created if new, else added to)")
    p.add_argument("--segment-len", type=int, default=None, help="steps per segment (default: the run's agent.segment_len, else 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the rollouts' envs (default 0, offset from training's)")
    p.add_argument("--prompt", default=None, help="what to prefer, shown on the page (for a new store)")
    p.add_argument("--no-render", action="store_true", help="queue only; the page renders clips when it shows them")
    return p


def answer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rl-align label answer", description="Answer queued pairs with a built-in oracle, through the same store path as the page.")
    p.add_argument("store", help="a label store file")
    p.add_argument("--score", default="reward", help="reward | forward | backward | package.module:function (default reward)")
    p.add_argument("--temperature", type=float, default=0.0, help="Bradley-Terry temperature (default 0: the deterministic teacher)")
    p.add_argument("--interval", type=float, default=0.0, help="seconds before each answer, e.g. 3 for a human-like rate (default 0)")
    p.add_argument("--limit", type=int, default=None, help="answer at most this many pairs")
    p.add_argument("--follow", action="store_true", help="keep answering pairs as they are queued (until Ctrl-C or --limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labeller", default=None, help="name stored with each answer (default synthetic:<score>)")
    return p


def _label(args: argparse.Namespace) -> int:
    rest = list(args.rest)
    if not rest or rest[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if rest[0] == "collect":
        from rl_align.labels.collect import collect_pairs

        a = collect_parser().parse_args(rest[1:])
        run = Path(a.run)
        collect_pairs(run, Path(a.store) if a.store else run / "labels.sqlite", a.pairs, a.segment_len, a.seed, a.prompt, not a.no_render)
        return 0
    if rest[0] == "answer":
        from rl_align.labels.collect import answer_queued, synthetic_oracle
        from rl_align.labels.store import LabelStore

        a = answer_parser().parse_args(rest[1:])
        if a.interval < 0 or a.temperature < 0:
            raise UserError("--interval and --temperature must be >= 0")
        store = LabelStore(a.store)
        try:
            n = answer_queued(store, synthetic_oracle(a.score, a.temperature, a.seed), a.labeller or f"synthetic:{a.score}",
                              a.interval, a.limit, a.follow, out=sys.stdout)
        except KeyboardInterrupt:  # --follow runs until Ctrl-C; every answer given is already stored
            n = len([r for r in store.answers() if r["client"] == f"pid{os.getpid()}"])
        c = store.counts()
        print(f"answered {n} pairs; {c['labelled']} of {c['total']} labelled, {c['queued']} queued")
        return 0
    from rl_align.labels.server import serve

    a = serve_parser().parse_args(rest)
    if a.prefetch < 0 or not 0 <= a.port <= 65535 or not 0 < a.lease <= 86400:
        raise UserError("--prefetch must be >= 0, --port in 0..65535 and --lease in (0, 86400] seconds")
    try:
        serve(Path(a.store), a.host, a.port, a.token, a.labeller, a.prefetch, a.clip_size, a.lease)
    except KeyboardInterrupt:
        pass
    return 0


# the words after ``rl-align label`` that name a sub-command (anything else is a store to serve)
SUBCOMMANDS = {"collect": collect_parser, "answer": answer_parser}


def add_parser(sub) -> None:
    p = sub.add_parser("label", help="label pairs of clips yourself: the page, collect, answer",
                       description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="STORE | collect | answer ...",
                   help="a label store to serve, or a sub-command (each takes -h)")
    p.set_defaults(func=_label)
