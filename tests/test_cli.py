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
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_one_line_exit_2_no_folder(tmp_path, args, message):
    out = tmp_path / "runs"
    res = rl_align("train", "--steps", "100", *args, "--set", f"run.out_dir={out}") if "--steps" not in args else \
        rl_align("train", *args, "--set", f"run.out_dir={out}")
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip() and "WARNING" not in l and "settotalmass" not in l]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()


def test_malformed_yaml_preset(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("algo: ppo\nlr: [1, 2\n")
    res = rl_align("train", "--agent", str(bad), "--set", f"run.out_dir={tmp_path / 'runs'}")
    assert res.returncode == 2 and "malformed YAML" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()


def test_help_on_every_command():
    for cmd in ([], ["train"], ["list"]):
        res = rl_align(*cmd, "--help")
        assert res.returncode == 0 and "usage: rl-align" in res.stdout


def test_list_shows_presets_with_descriptions():
    res = rl_align("list")
    assert res.returncode == 0
    assert "halfcheetah" in res.stdout and "Safety-Gymnasium" in res.stdout and "ppo" in res.stdout
