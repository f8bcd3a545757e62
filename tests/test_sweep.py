"""Sweeps: a 2x2 grid of tiny real runs, one setting diverging on purpose; the index records it, the
others finish, re-running skips finished trials; the same sweep on a real local Ray instance."""

import csv
import json

import pytest

from rl_align.cli import main
from rl_align.errors import UserError
from rl_align.sweep import SweepSpec, expand, parse_grid, run_sweep
from rl_align.train import train  # noqa: F401  (imported here, not first inside a capsys test: Progress binds sys.stderr at import)

TINY = ["agent.n_steps=128", "agent.epochs=2", "run.eval_episodes=2", "env.max_episode_steps=100"]
ARGS = ["--env", "inverted-pendulum", "--agent", "ppo", "--steps", "512", "--grid", "agent.lr=3e-4,1e12", "--seeds", "0,1"]


def read_index(folder):
    with (folder / "index.csv").open(newline="") as f:
        return {r["trial"]: r for r in csv.DictReader(f)}


def spec():
    return SweepSpec(env="inverted-pendulum", agent="ppo", steps=512, sets=list(TINY), grid=parse_grid(["agent.lr=3e-4,1e12"]), seeds=[0, 1])


def check_index(folder):
    rows = read_index(folder)
    assert set(rows) == {"lr=3e-4-s0", "lr=3e-4-s1", "lr=1e12-s0", "lr=1e12-s1"}
    for name, r in rows.items():
        if name.startswith("lr=3e-4"):
            assert r["status"] == "finished" and r["error"] == "" and r["env_steps"] == "512"
            assert float(r["eval/return_det"]) > 0
            assert (folder / r["run_folder"] / "summary.json").exists()
        else:  # lr = 1e12 diverges in the first update: recorded with the quantity and step, not raised
            assert r["status"] == "failed" and "became nan at env step 128" in r["error"], r
            assert r["eval/return_det"] == ""
    return rows


def test_local_pool_sweep_records_failure_and_rerun_skips_finished(tmp_path, capsys):
    sets = [x for item in TINY for x in ("--set", item)]
    rc = main(["sweep", *ARGS, *sets, "--workers", "2", "--name", "grid", "--root", str(tmp_path)])
    assert rc == 1  # some trials failed
    folder = tmp_path / "grid"
    rows = check_index(folder)
    out = capsys.readouterr()
    assert "2/4 trials finished" in out.out and "lr=1e12-s0: failed" in out.err
    stamps = {n: (folder / r["run_folder"] / "summary.json").stat().st_mtime_ns for n, r in rows.items() if r["status"] == "finished"}

    log = []
    _, again = run_sweep(spec(), name="grid", root=tmp_path, workers=1, log=log.append)
    assert "2 already finished, 2 to run" in log[0]
    assert sum("lr=3e-4" in line for line in log[1:]) == 0  # finished trials were not run again
    rows2 = check_index(folder)
    for n, stamp in stamps.items():
        assert rows2[n]["run_folder"] == rows[n]["run_folder"]
        assert (folder / rows2[n]["run_folder"] / "summary.json").stat().st_mtime_ns == stamp
    assert json.loads((folder / "sweep.json").read_text())["grid"] == [["agent.lr", ["3e-4", "1e12"]]]


def test_whole_grid_is_validated_before_anything_runs(tmp_path):
    bad = SweepSpec(env="inverted-pendulum", agent="ppo", steps=512, grid=parse_grid(["agent.clip=0.2,-1"]), seeds=[0])
    with pytest.raises(UserError, match=r"trial agent.clip=-1 seed 0: agent.clip must be > 0.*nothing was started"):
        run_sweep(bad, name="bad", root=tmp_path)
    assert not (tmp_path / "bad").exists()
    for item, msg in (("agent.lr", "key=v1,v2"), ("lr=1,2", "section.field"), ("agent.lr=1,1", "repeats")):
        with pytest.raises(UserError, match=msg):
            parse_grid([item])


def test_grid_can_vary_the_preset_itself(tmp_path):
    s = SweepSpec(env="inverted-pendulum", agent="ppo", grid=parse_grid(["env=inverted-pendulum,Swimmer-v5", "agent.gamma=0.9,0.99"]), seeds=[3])
    trials = expand(s, tmp_path)
    assert [(t.env, t.overrides, t.seed) for t in trials] == [
        ("inverted-pendulum", ["agent.gamma=0.9"], 3), ("inverted-pendulum", ["agent.gamma=0.99"], 3),
        ("Swimmer-v5", ["agent.gamma=0.9"], 3), ("Swimmer-v5", ["agent.gamma=0.99"], 3)]
    assert len({t.root for t in trials}) == 4


def test_same_name_with_other_options_is_refused(tmp_path):
    run_sweep(SweepSpec(env="inverted-pendulum", agent="ppo", steps=128, sets=["agent.n_steps=128", "run.eval_episodes=1"]),
              name="x", root=tmp_path, workers=1, log=lambda s: None)
    with pytest.raises(UserError, match="holds a different sweep .*steps"):
        run_sweep(SweepSpec(env="inverted-pendulum", agent="ppo", steps=256, sets=["agent.n_steps=128", "run.eval_episodes=1"]),
                  name="x", root=tmp_path)


def test_same_sweep_on_a_local_ray_instance(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'rl-align[ray]'); the Ray backend is untested here")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        log = []
        folder, rows = run_sweep(spec(), name="ray", root=tmp_path, backend="ray", log=log.append)
        assert "on ray" in log[0]
        check_index(folder)
    finally:
        ray.shutdown()


def test_sigterm_stops_the_sweep_and_rerun_resumes_the_interrupted_trial(tmp_path, sigterm_cli):
    args = ["sweep", "--env", "inverted-pendulum", "--agent", "ppo", "--steps", "6144",
            "--grid", "agent.gamma=0.99", "--seeds", "0", "--workers", "1", "--name", "cut", "--root", str(tmp_path),
            *[x for item in [*TINY, "run.checkpoint_every=256"] for x in ("--set", item)]]
    returncode, err, _ = sigterm_cli(args, tmp_path / "cut", "trials/*/*/*/*/progress.csv")
    assert returncode == 143, err
    assert "re-run the same sweep command to resume" in err.strip().splitlines()[-1]
    row = read_index(tmp_path / "cut")["gamma=0.99-s0"]
    assert row["status"] == "interrupted" and "SIGTERM" in row["error"]
    folder = tmp_path / "cut" / row["run_folder"]
    from rl_align.checkpoints import load_checkpoint

    assert 0 < load_checkpoint(folder)["env_steps"] < 6144

    log = []
    s = SweepSpec(env="inverted-pendulum", agent="ppo", steps=6144, sets=[*TINY, "run.checkpoint_every=256"],
                  grid=parse_grid(["agent.gamma=0.99"]), seeds=[0])
    _, rows = run_sweep(s, name="cut", root=tmp_path, workers=1, log=log.append)
    assert rows[0]["status"] == "finished" and rows[0]["env_steps"] == 6144, rows[0]["error"]
    assert tmp_path / "cut" / rows[0]["run_folder"] == folder  # resumed in place, not restarted
