"""Clips of stored segments, rendered offscreen by the renderer ``rl-align eval --video`` uses.

A segment holds observations, not simulator states, so the clip is rebuilt from them: the MuJoCo tasks
observe their joint positions without the first one or two (the x, or x and y, of the root), so
``qpos = [x_t, (y = 0), obs_t[:nq - k]]`` with ``x_t`` the integral of the segment's x-velocity feature.
The camera follows the body as in the task's own rendering. Shadows and floor reflections are switched off
(measured: 75 ms -> 15 ms a 320x240 frame with software EGL); clips are VP8 WebM, which every Chromium
plays, encoded at the fastest real-time setting (measured 0.5 s a 50-frame clip, against 3.2 s at -cpu-used 8).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from rl_align.envs.backend import gl_errors
from rl_align.errors import UserError

WIDTH, HEIGHT = 320, 240


def check_writer() -> None:
    try:
        import imageio.v2  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise UserError("writing clips needs imageio and imageio-ffmpeg: pip install 'rl-align[video]'") from None


class ClipRenderer:
    """One offscreen env of ``task`` that turns stored segments into ``.webm`` clips. Not thread-safe:
    a GL context belongs to the thread that made it, so one renderer serves one thread."""

    def __init__(self, task: str, width: int = WIDTH, height: int = HEIGHT) -> None:
        from rl_align.envs import make_env

        check_writer()
        with gl_errors(f"render clips of {task}"):
            self.env = make_env(task, render_mode="rgb_array")
            obs, _ = self.env.reset(seed=0)
            u = self.env.unwrapped
            u.mujoco_renderer.width, u.mujoco_renderer.height = width, height
            u.model.vis.quality.shadowsize = 0
            u.model.mat_reflectance[:] = 0
            self.env.render()
        self.u = u
        self.nq = u.model.nq
        self.hidden = next((k for k in (0, 1, 2) if np.allclose(obs[: self.nq - k], u.data.qpos[k:], atol=1e-6)), None)
        if self.hidden is None:
            raise UserError(f"cannot rebuild clips of {task}: its observation does not start with the joint positions")
        self.fps = 1.0 / u.dt

    def frames(self, seg: dict[str, np.ndarray]) -> list[np.ndarray]:
        """RGB frames ``[h, w, 3]`` of a segment's real steps (the padding after a fall is not shown)."""
        u, k = self.u, self.hidden
        n = int(np.asarray(seg["mask"]).sum())
        obs = np.asarray(seg["obs"], dtype=np.float64)[:n]
        x = np.concatenate([[0.0], np.cumsum(np.asarray(seg["features"], dtype=np.float64)[: n - 1, 0]) * u.dt])
        out = []
        for t in range(n):
            qpos = np.zeros(self.nq)
            if k >= 1:
                qpos[0] = x[t]
            qpos[k:] = obs[t, : self.nq - k]
            u.set_state(qpos, np.zeros(u.model.nv))
            out.append(self.env.render())
        return out

    def write(self, seg: dict[str, np.ndarray], path: Path) -> float:
        """Render ``seg`` into ``path`` (VP8 WebM, looped by the page); returns the seconds it took."""
        import imageio.v2 as imageio

        t0 = time.perf_counter()
        frames = self.frames(seg)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".partial" + path.suffix)
        imageio.mimsave(tmp, frames, fps=self.fps, codec="libvpx", macro_block_size=1, ffmpeg_log_level="error",
                        output_params=["-deadline", "realtime", "-cpu-used", "16", "-b:v", "800k", "-threads", "2"])
        os.replace(tmp, path)  # a clip appears whole or not at all
        return time.perf_counter() - t0

    def close(self) -> None:
        self.env.close()


def ensure_clips(store, renderer: ClipRenderer, pair: dict) -> dict:
    """A copy of the pair with both clip paths (relative to the store's folder), rendering the missing ones
    (the store records each new clip)."""
    out = dict(pair)
    for side in ("1", "2"):
        if out[f"clip{side}"] is None or not (store.path.parent / out[f"clip{side}"]).exists():
            seg_id = out[f"seg{side}"]
            rel = f"{store.clip_dir.name}/{seg_id}.webm"
            renderer.write(store.segment(seg_id), store.path.parent / rel)
            store.set_clip(seg_id, rel)
            out[f"clip{side}"] = rel
    return out
