"""Bad input: one line naming the problem and the fix, exit code 2, no traceback, no run folder."""

import subprocess
import sys

import pytest


def rl_align(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "rl_align.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


BAD = [
    (["--env", "nosuchenv"], "unknown env"),
    (["--env", "NoSuch-v5"], "unknown task"),
    (["--agent", "nosuchagent"], "unknown agent"),
    (["--set", "agent.nosuchkey=1"], "unknown key agent.nosuchkey"),
    (["--set", "agent.lr=fast"], "agent.lr must be float"),
    (["--steps", "-5"], "run.steps must be a positive"),
    (["--set", "env.oracle.temperature=-1"], "temperature must be >= 0"),
    (["--set", "env.cost.limit=-3"], "limit must be >= 0"),
    (["--set", "agent.n_steps=0"], "agent.n_steps must be >= 1"),
    (["--set", "nokey"], "must look like section.key=value"),
    (["--env", "Reacher-v5", "--agent", "ppo-lag"], "Reacher has no default velocity threshold; set env.cost.threshold="),
    # one name for one thing: the old names are refused with the new one
    (["--env", "halfcheetah-pref", "--agent", "rlhf", "--set", "agent.kl_coef=0.05"], "agent.kl_coef is agent.revkl_coef"),
    (["--env", "halfcheetah-pref", "--agent", "rlhf", "--set", "agent.kl_coef=0.05"], "use --set agent.revkl_coef=0.05"),
    (["--env", "halfcheetah-pref", "--agent", "sail-revkl", "--set", "agent.minibatch=50"], "use --set agent.minibatch_pairs=50"),
    (["--env", "halfcheetah-cyclic", "--agent", "comal", "--set", "agent.minibatch=50"], "use --set agent.minibatch_pairs=50"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_one_line_exit_2_no_folder(tmp_path, args, message):
    out = tmp_path / "runs"
    res = rl_align("train", "--steps", "100", *args, "--set", f"run.out_dir={out}") if "--steps" not in args else \
        rl_align("train", *args, "--set", f"run.out_dir={out}")
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()


# every kind of float field: plain (agent.lr, a coefficient), optional (limits, thresholds), list (weights)
FLOAT_FIELDS = [("ppo", "agent.lr"), ("ppo", "agent.ent_coef"), ("ppo", "agent.target_kl"), ("ppo-lag", "agent.constraint.limit"),
                ("ppo-lag", "agent.constraint.lam_lr"), ("ppo", "env.cost.threshold"), ("ppo", "env.cost.limit"),
                ("sail-revkl", "agent.revkl_coef"), ("sail-revkl", "env.oracle.temperature"), ("sail-revkl", "env.oracle.weights")]


@pytest.mark.parametrize("agent,key", FLOAT_FIELDS)
def test_nan_and_inf_in_any_float_field_are_refused_before_anything_runs(tmp_path, capsys, agent, key):
    from rl_align.cli import main

    out = tmp_path / "runs"
    for raw in ("nan", "inf", "-inf", ".nan", "-.inf"):
        value = f"[1.0, {raw}, 0.0]" if key.endswith("weights") else raw
        assert main(["train", "--env", "halfcheetah-pref", "--agent", agent, "--steps", "100", "--set", f"{key}={value}",
                     "--set", f"run.out_dir={out}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "must be a finite number" in err[0] and key in err[0], err
    assert not out.exists()


def test_malformed_yaml_preset(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("algo: ppo\nlr: [1, 2\n")
    res = rl_align("train", "--agent", str(bad), "--set", f"run.out_dir={tmp_path / 'runs'}")
    assert res.returncode == 2 and "malformed YAML" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()


def commands() -> list[list[str]]:
    """Every command line that names a (sub-)command: argparse's sub-parsers, walked recursively, and the
    words ``rl-align label`` reads itself (``label collect``, ``label answer``)."""
    import argparse

    from rl_align.cli import build_parser
    from rl_align.labels.cli import SUBCOMMANDS

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
        out = [prefix]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out += walk(sub, prefix + [name])
        return out

    found = walk(build_parser(), [])
    return found + [["label", name] for name in SUBCOMMANDS]


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_on_every_command(capsys, flag):
    from rl_align.cli import main

    cmds = commands()
    assert ["label"] in cmds and ["label", "collect"] in cmds and ["train"] in cmds and len(cmds) > 8
    for cmd in cmds:
        with pytest.raises(SystemExit) as exc:
            main([*cmd, flag])
        out = capsys.readouterr().out
        assert exc.value.code == 0 and out.startswith(f"usage: {' '.join(['rl-align', *cmd])}"), (cmd, out[:200])


def test_list_shows_presets_with_descriptions():
    res = rl_align("list")
    assert res.returncode == 0
    assert "halfcheetah" in res.stdout and "Safety-Gymnasium" in res.stdout and "ppo" in res.stdout


def test_a_command_imports_only_what_it_runs():
    """`rl-align list` and `train --help` answer without torch, and `train` without scipy.stats or
    stable-baselines3: the CLI imports the module of the sub-command it was given, not every tool's."""
    probe = ("import sys; from rl_align.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'scipy.stats', 'stable_baselines3') if m in sys.modules))")

    def loaded(*args):
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
        return out.stdout.strip().splitlines()[-1]

    assert loaded("list") == "[]"
    assert loaded("train", "--help") == "[]"
    train = loaded("train", "--env", "nosuchenv")
    assert "scipy.stats" not in train and "stable_baselines3" not in train
    assert loaded("report", "--help") == "['scipy.stats']"
