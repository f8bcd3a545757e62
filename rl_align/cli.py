"""The ``rl-align`` command. User mistakes and disk faults print one line and exit 2 (1 for a disk fault mid-run);
no tracebacks for them."""

from __future__ import annotations

import argparse
import sys

from rl_align.errors import DiskFault, Interrupted, UserError


def _train(args: argparse.Namespace) -> int:
    from rl_align.runs import resolve_config
    from rl_align.train import resume, train

    if args.resume:
        given = [f"--{k}" for k in ("env", "agent", "steps", "seed", "device", "set") if getattr(args, k)]
        if given:
            raise UserError(f"--resume continues a run with its saved config; drop {', '.join(given)}")
        folder, summary = resume(args.resume)
        print_summary(folder, summary)
        return 0
    cfg = resolve_config(args.env or "halfcheetah", args.agent or "ppo", args.set, steps=args.steps, seed=args.seed)
    if args.device:
        cfg.run.device = args.device
    folder, summary = train(cfg)
    print_summary(folder, summary)
    return 0


def print_summary(folder, summary: dict) -> None:
    """What the run achieved, over how many evaluation episodes, and where its logs are."""
    from rl_align.evaluation import SUMMARY, print_metrics

    n = summary.get("eval_episodes", "?")
    print(f"\n{summary['agent']} on {summary['env']} (seed {summary['seed']}): {summary['env_steps']:,} env steps in {summary['wall_time_s']:.0f} s"
          f" (evaluation: mean ± std over {n} episodes each)")
    print_metrics({"start": summary["initial"], "end": summary["final"]}, keys=SUMMARY)
    if summary.get("queries_used"):
        print(f"  {'preference queries':<24}{'':>18}{summary['queries_used']:>10,d}")
    for note in summary.get("notes", []):
        print(f"  note: {note}")
    print(f"  logs: {folder}   (tensorboard --logdir {folder}/tb)")


def _list(args: argparse.Namespace) -> int:
    from rl_align.config import list_presets

    for kind in ("envs", "agents"):
        print(f"{kind}:")
        for name, desc in list_presets(kind).items():
            print(f"  {name:<26} {desc}")
    return 0


# sub-command -> the module whose ``add_parser`` defines it, in the order ``rl-align --help`` lists them
TOOLS = {"eval": "rl_align.evaluation", "sweep": "rl_align.sweep", "report": "rl_align.report", "tournament": "rl_align.tournament",
         "game": "rl_align.games.cli", "export": "rl_align.sb3", "label": "rl_align.labels.cli"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or, given the sub-command a command line names, only the part it needs."""
    parser = argparse.ArgumentParser(prog="rl-align", description="Preference alignment and safe policy optimization on MuJoCo.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train an agent on an env", description="Train an agent; writes a run folder under runs/<env>/<agent>/.")
    p.add_argument("--env", default=None, help="env preset name (rl-align list), a .yaml path, or a Gymnasium id like Hopper-v5 (default halfcheetah)")
    p.add_argument("--agent", default=None, help="agent preset name (rl-align list) or a .yaml path (default ppo)")
    p.add_argument("--resume", default=None, metavar="RUN_FOLDER", help="continue an interrupted run from its last checkpoint (same config, same result)")
    p.add_argument("--steps", type=int, default=None, help="env steps to train (default: the preset's run.steps)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field, e.g. --set agent.lr=1e-4 --set env.cost.limit=10 (repeatable)")
    p.set_defaults(func=_train)

    p = sub.add_parser("list", help="list env and agent presets", description="List env and agent presets with their descriptions.")
    p.set_defaults(func=_list)

    # each tool module contributes its sub-command through ``add_parser(sub)``; a command line that names one
    # imports only that module (scipy.stats and stable-baselines3 cost seconds that `train` never needs)
    if command in TOOLS:
        modules = [TOOLS[command]]
    elif command in ("train", "list"):
        modules = []
    else:  # --help, no command or a misspelt one: every command, so that argparse can list them
        modules = TOOLS.values()
    for module in modules:
        try:
            __import__(module, fromlist=["add_parser"]).add_parser(sub)
        except ModuleNotFoundError as exc:
            if not (exc.name == module or module.startswith(f"{exc.name}.")):
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    from rl_align.signals import ignore_further

    try:
        return int(args.func(args) or 0)
    except Interrupted as exc:
        ignore_further()
        print(f"rl-align: interrupted: {exc}", file=sys.stderr)
        return exc.exit_code
    except DiskFault as exc:
        print(f"rl-align: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except UserError as exc:
        print(f"rl-align: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only folder, a full disk: before anything ran, nothing is half-written
        from rl_align.checkpoints import DISK_ERRNOS, disk_message

        if exc.errno not in DISK_ERRNOS:
            raise
        print(f"rl-align: error: {disk_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        ignore_further()
        print("rl-align: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
