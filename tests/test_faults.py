"""A run folder under concurrency and faults: one writer at a time (a second process is refused while the
first holds the folder and accepted once it is killed), one progress row per step across a resume, a
read-only or full disk in one line with no temporary file left, and a second Ctrl-C without a traceback."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fault_helpers import in_namespace
from rl_align.checkpoints import load_checkpoint
from rl_align.runs import resolve_config
from rl_align.train import resume, train

TINY = ["agent.n_steps=128", "agent.epochs=2", "run.eval_episodes=2", "env.max_episode_steps=100", "run.progress=false"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def steps(folder: Path) -> list[int]:
    with (folder / "progress.csv").open(newline="") as f:
        return [int(float(r["step"])) for r in csv.DictReader(f)]


def cli_args(out: Path, n: int, extra=()) -> list[str]:
    args = [sys.executable, "-m", "rl_align.cli", "train", "--env", "halfcheetah", "--agent", "ppo", "--steps", str(n)]
    for item in [*TINY, f"run.out_dir={out}", *extra]:
        args += ["--set", item]
    return args


def wait_for(predicate, timeout=180.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out")


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if not line.startswith("WARNING: ")]  # MuJoCo's own, once


def test_a_second_writer_is_refused_while_the_first_holds_the_folder_and_accepted_after_sigkill(tmp_path):
    out = tmp_path / "runs"
    first = subprocess.Popen(cli_args(out, 2048, ["run.checkpoint_every=256"]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    try:
        ckpt = wait_for(lambda: next(out.glob("*/*/*/checkpoints/last.pt"), None))
        folder = ckpt.parent.parent
        os.kill(first.pid, signal.SIGSTOP)  # alive and holding the folder, but not racing to its end meanwhile
        second = subprocess.run([sys.executable, "-m", "rl_align.cli", "train", "--resume", str(folder)], capture_output=True, text=True, env=ENV)
        assert second.returncode == 2, second.stderr
        err = errors(second.stderr)
        assert len(err) == 1 and f"pid {first.pid}" in err[0] and str(folder) in err[0], err
        assert "Traceback" not in second.stderr
    finally:
        first.kill()  # SIGKILL: no cleanup runs in it; the OS drops its lock
        first.wait()
    assert not (folder / "summary.json").exists()
    third = subprocess.run([sys.executable, "-m", "rl_align.cli", "train", "--resume", str(folder)], capture_output=True, text=True, env=ENV)
    assert third.returncode == 0, third.stderr
    seen = steps(folder)
    assert seen == sorted(set(seen)) and seen[-1] == 2048  # every step once, in order, to the end
    assert json.loads((folder / "summary.json").read_text())["env_steps"] == 2048


def test_one_progress_row_per_step_also_when_resumed_after_the_final_row(tmp_path):
    cfg = resolve_config("halfcheetah", "ppo", [*TINY, f"run.out_dir={tmp_path}", "run.eval_every=256", "run.checkpoint_every=256"],
                         steps=768, seed=1)
    folder, summary = train(cfg, quiet=True)
    straight = steps(folder)
    assert straight == [0, 128, 256, 384, 512, 640, 768]  # the final evaluation shares the last iteration's row
    rows = (folder / "progress.csv").read_text()
    with (folder / "progress.csv").open(newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert last["train/policy_loss"] and last["eval/return_det"] and last["rollout/x_velocity"]  # the update's and the evaluation's
    # killed after the final row and the last checkpoint, before summary.json: resume logs nothing twice
    (folder / "summary.json").unlink()
    again_folder, again = resume(folder, quiet=True)
    assert steps(folder) == straight and (folder / "progress.csv").read_text() == rows
    assert again["final"] == summary["final"] and again["env_steps"] == 768


def test_a_read_only_output_folder_is_one_line_exit_2(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    args = cli_args(ro / "runs", 256)[3:]
    r = in_namespace(f"read_only({str(ro)!r}); print(cli(*{args!r}))")
    assert r.returncode == 0, r.stderr
    code, err = eval(r.stdout.strip().splitlines()[-1])
    assert code == 2 and len(err) == 1, err
    assert str(ro / "runs") in err[0] and "Read-only file system" in err[0] and "Traceback" not in err[0]
    assert not list(ro.iterdir())


def test_a_full_disk_before_the_run_is_one_line_exit_2_and_leaves_no_run_folder(tmp_path):
    disk = tmp_path / "disk"
    args = cli_args(disk / "runs", 256)[3:]
    r = in_namespace(f"import glob; tmpfs({str(disk)!r}, '64k'); fill({str(disk)!r}); print((cli(*{args!r}), glob.glob({str(disk)!r} + '/runs/*/*/*')))")
    assert r.returncode == 0, r.stderr
    (code, err), folders = eval(r.stdout.strip().splitlines()[-1])
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0] and str(disk / "runs") in err[0], err
    assert folders == []


_FULL = """
import glob, json, signal, time
disk = {disk!r}
tmpfs(disk, "6m")
proc = subprocess.Popen([sys.executable, "-m", "rl_align.cli", *{args!r}], stderr=subprocess.PIPE, text=True,
                        env={{**os.environ, "PYTHONWARNINGS": "ignore"}})
while not glob.glob(disk + "/runs/*/*/*/checkpoints/last.pt") and proc.poll() is None:
    time.sleep(0.02)
fill(disk)
_, err = proc.communicate()
folder = glob.glob(disk + "/runs/*/*/*")[0]
left = [p for p in glob.glob(folder + "/**", recursive=True) if p.endswith((".tmp", ".partial"))]
from rl_align.checkpoints import load_checkpoint
step = load_checkpoint(folder)["env_steps"]
os.remove(disk + "/filler")
again = cli("train", "--resume", folder)
import csv
seen = [int(float(r["step"])) for r in csv.DictReader(open(folder + "/progress.csv"))]
print(json.dumps({{"code": proc.returncode, "err": [l for l in err.splitlines() if not l.startswith("WARNING: ")], "left": left,
                  "step": step, "again": again, "steps": seen, "folder": folder}}))
"""


def test_a_full_disk_mid_run_is_one_line_exit_1_keeps_the_last_checkpoint_and_resumes(tmp_path):
    disk = tmp_path / "disk"
    args = cli_args(disk / "runs", 4096, ["run.checkpoint_every=256"])[3:]
    r = in_namespace(_FULL.format(disk=str(disk), args=args))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["code"] == 1 and len(got["err"]) == 1, got["err"]
    line = got["err"][0]
    assert "No space left on device" in line and got["folder"] in line and "--resume" in line and "Traceback" not in line, line
    assert got["left"] == []  # no temporary file, no half-written one
    assert 0 < got["step"] < 4096  # the checkpoint before the fault loads
    assert got["again"][0] == 0, got["again"]  # and with space freed the run resumes to its end
    assert got["steps"] == sorted(set(got["steps"])) and got["steps"][-1] == 4096


def test_a_second_ctrl_c_exits_at_once_with_the_resume_hint(tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.Popen(cli_args(out, 200_000, ["agent.n_steps=2048", "run.checkpoint_every=2048"]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        ckpt = wait_for(lambda: next(out.glob("*/*/*/checkpoints/last.pt"), None))
        time.sleep(0.3)  # into the next iteration
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    folder = ckpt.parent.parent
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = errors(err)[-1]
    assert last.startswith("rl-align: interrupted: SIGINT") and f"rl-align train --resume {folder}" in last, last
    assert load_checkpoint(folder)["env_steps"] >= 2048 and not list(folder.rglob("*.tmp"))
