"""``rl-align eval``: metrics of a run's checkpoint on fresh envs, the reference metrics of a preference
agent, and an offscreen video when this machine can render (EGL)."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from rl_align.cli import main
from rl_align.evaluation import evaluate_run, load_agent
from rl_align.runs import resolve_config
from rl_align.evaluation import evaluate
from rl_align.train import train

TINY = ["agent.n_steps=128", "agent.epochs=2", "run.eval_episodes=2", "env.max_episode_steps=100", "run.progress=false"]


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    cfg = resolve_config("inverted-pendulum", "ppo", [*TINY, f"run.out_dir={tmp_path_factory.mktemp('runs')}"], steps=1024, seed=0)
    return train(cfg, quiet=True)[0]


def test_eval_prints_the_metrics_of_the_checkpoint(ppo_run, capsys):
    assert main(["eval", str(ppo_run), "--episodes", "3", "--seed", "50"]) == 0
    out = capsys.readouterr().out
    cfg, agent = load_agent(ppo_run)
    assert agent.env_steps == 1024
    ref = evaluate(agent, cfg.env, 3, seed=50, deterministic=True)  # the same episodes, computed directly
    assert "3 deterministic episodes (env seeds 50..52)" in out
    assert f"{ref['return'].mean():.1f} ± {ref['return'].std():.1f}" in out
    assert "episode cost" in out and "(limit d = 25)" in out and "violation" in out
    assert "win rate" not in out  # PPO has no reference

    det = evaluate_run(ppo_run, episodes=3, seed=50)
    stoch = evaluate_run(ppo_run, episodes=3, seed=50, deterministic=False)
    assert det["eval/return_det"] == pytest.approx(float(ref["return"].mean()))
    assert det["eval/violation"] == max(0.0, det["eval/cost_det"] - 25.0) and 0 <= det["eval/over_budget_det"] <= 1
    assert stoch["eval/return_stoch"] != det["eval/return_det"]


def test_eval_of_a_preference_run_reports_win_rate_and_kl(tmp_path, capsys):
    cfg = resolve_config("inverted-pendulum", "sail", [
        "agent.ref=init", "agent.n_envs=2", "agent.n_steps=100", "agent.segment_len=5", "agent.epochs=2", "agent.win_rate_episodes=2",
        "run.eval_episodes=2", "env.max_episode_steps=100", "run.progress=false", f"run.out_dir={tmp_path}"], steps=600, seed=0)
    folder, _ = train(cfg, quiet=True)
    m = evaluate_run(folder, episodes=2)
    assert 0.0 <= m["eval/win_rate_vs_ref"] <= 1.0 and m["eval/kl_to_ref"] >= 0.0
    assert main(["eval", str(folder), "--episodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "win rate vs reference" in out and "KL to reference" in out


def test_bad_video_name_and_bad_folder_are_one_line_errors(ppo_run, tmp_path, capsys):
    assert main(["eval", str(ppo_run), "--video", str(tmp_path / "x.avi")]) == 2
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rl-align: error: --video {tmp_path / 'x.avi'}: use a .mp4 or .gif file name",
                   f"rl-align: error: {tmp_path} is not a run folder (no config.yaml); give a folder written by rl-align train"]


def _gl_works() -> str | None:
    """None when some offscreen backend (EGL or OSMesa) renders a frame here, probed independently of rl_align."""
    code = ("import gymnasium as gym; e = gym.make('InvertedPendulum-v5', render_mode='rgb_array'); e.reset(seed=0); "
            "assert e.render().std() > 0")
    why = []
    for backend in ("egl", "osmesa"):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "MUJOCO_GL": backend})
        if r.returncode == 0:
            return None
        why.append(f"{backend}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return "; ".join(why)


def test_eval_writes_a_video_choosing_the_gl_backend_itself(ppo_run, tmp_path, monkeypatch):
    why = _gl_works()
    if why is not None:
        pytest.skip(f"no offscreen GL on this machine ({why}); install libegl1 or libosmesa6")
    imageio = pytest.importorskip("imageio.v2", reason="imageio not installed (pip install 'rl-align[video]')")
    out = tmp_path / "episode.gif"
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}  # as the README runs it
    r = subprocess.run([sys.executable, "-m", "rl_align.cli", "eval", str(ppo_run), "--episodes", "1", "--video", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    frames = imageio.mimread(out)
    n = int(r.stdout.split("(")[-1].split(" frames")[0])
    assert len(frames) == (n + 1) // 2 and frames[0].ndim == 3  # every other frame of the episode
    assert not np.array_equal(frames[0], frames[-1])  # the pendulum moved
    if importlib.util.find_spec("imageio_ffmpeg"):  # MP4 needs the ffmpeg plugin (in the video extra)
        # in this process too, where MuJoCo is already imported; setenv+delenv makes the teardown remove
        # the MUJOCO_GL that the eval chooses, so later tests see the environment they started with
        monkeypatch.setenv("MUJOCO_GL", "")
        monkeypatch.delenv("MUJOCO_GL")
        monkeypatch.delenv("PYOPENGL_PLATFORM", raising=False)
        mp4 = tmp_path / "episode.mp4"
        assert main(["eval", str(ppo_run), "--episodes", "1", "--video", str(mp4)]) == 0
        assert mp4.stat().st_size > 1000


def test_a_users_mujoco_gl_is_respected(ppo_run, tmp_path):
    env = {**os.environ, "MUJOCO_GL": "no-such-backend"}
    r = subprocess.run([sys.executable, "-m", "rl_align.cli", "eval", str(ppo_run), "--video", str(tmp_path / "v.gif")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "MUJOCO_GL=no-such-backend" in r.stderr and "apt-get install libegl1" in r.stderr
    assert not (tmp_path / "v.gif").exists()


def test_no_working_gl_backend_is_one_line_naming_what_to_install(monkeypatch):
    from rl_align.envs import backend

    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(backend, "GL_BACKENDS", ("no-such-backend",))  # a backend MuJoCo refuses: the probe fails
    monkeypatch.delitem(sys.modules, "OpenGL", raising=False)  # as in a fresh process (the probe itself is a subprocess)
    if not sys.platform.startswith("linux"):
        pytest.skip("the probe runs on headless Linux only")
    with pytest.raises(backend.UserError, match=r"^no offscreen OpenGL works on this machine \(no-such-backend: .*apt-get install "
                                                r"libegl1.*apt-get install libosmesa6") as info:
        backend.choose_gl()
    assert "\n" not in str(info.value) and "MUJOCO_GL" not in os.environ


def test_evaluation_episodes_start_from_distinct_states():
    """Each evaluation episode has its own reset seed: two deterministic episodes of the same policy start
    from different states (HalfCheetah's reset noise is small but not zero) and so return different sums."""
    from rl_align.envs import make_vec_env

    cfg = resolve_config("halfcheetah", "ppo", ["run.progress=false", "env.max_episode_steps=50"])
    first = make_vec_env(cfg.env, 2, seed=100_000).reset()
    assert not np.allclose(first[0], first[1])
    from rl_align.runs import build_agent
    from rl_align.train import prepare

    agent, env = build_agent(cfg)
    env.close()
    res = evaluate(agent, cfg.env, 2, seed=100_000, deterministic=True)
    assert len(res["return"]) == 2 and res["return"][0] != res["return"][1]
