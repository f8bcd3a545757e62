"""MuJoCo's process-wide settings, made once: the offscreen OpenGL backend and its warning printer.

Offscreen rendering (``rl-align eval --video``) needs a GL backend. A user's own ``MUJOCO_GL`` is always
respected; when it is unset on a Linux machine without a display, :func:`choose_gl` probes EGL, then
OSMesa, each in a short subprocess (creating a real MuJoCo GL context, ~0.5 s, only when rendering is
asked for), and sets ``MUJOCO_GL`` to the first that works. The probe runs outside this process because
PyOpenGL binds its platform once per process: a failed EGL attempt here would rule out OSMesa. Setting
``MUJOCO_GL`` after ``import mujoco`` is fine as long as nothing has imported PyOpenGL yet: Gymnasium's
renderer reads the variable when the first frame is drawn, and ``import mujoco`` with it unset loads GLFW
only.

MuJoCo 3.3+ warns that Gymnasium's XML attribute ``settotalmass`` is deprecated each time a model is
compiled (once per env made: 125 lines in one ``make train``). :func:`quiet_deprecations` routes MuJoCo's
warnings through a printer that shows each deprecation text once per process and every other warning
each time, as MuJoCo itself would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager

from rl_align.errors import UserError

GL_BACKENDS = ("egl", "osmesa")
GL_HINT = ("offscreen rendering needs EGL (apt-get install libegl1) or OSMesa (apt-get install libosmesa6); "
           "or set MUJOCO_GL=glfw on a machine with a display")
_PROBE = "import mujoco; c = mujoco.GLContext(16, 16); c.make_current(); c.free()"


def gl_works(backend: str, timeout: float = 60.0) -> str | None:
    """None when a MuJoCo GL context can be made with ``MUJOCO_GL=backend``; otherwise the last line of why not."""
    env = {**os.environ, "MUJOCO_GL": backend}
    env.pop("PYOPENGL_PLATFORM", None)
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    return None if r.returncode == 0 else ((r.stderr.strip().splitlines() or ["exit status %d" % r.returncode])[-1])


def choose_gl() -> str:
    """The offscreen backend this process renders with, chosen (and put in ``MUJOCO_GL``) when the user
    has not (once: the choice then reads as the user's); a one-line :class:`UserError` naming what to
    install when no backend works."""
    user = os.environ.get("MUJOCO_GL")
    if user:
        check_mujoco_loads()
        return user
    if not sys.platform.startswith("linux") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return "default"  # macOS (CGL) or a desktop session (GLFW): MuJoCo's own choice works
    if "OpenGL" in sys.modules:  # PyOpenGL already bound to a platform in this process: keep it
        return os.environ.get("PYOPENGL_PLATFORM", "default")
    why = {}
    for backend in GL_BACKENDS:
        why[backend] = gl_works(backend)
        if why[backend] is None:
            os.environ["MUJOCO_GL"] = backend
            check_mujoco_loads()
            return backend
    detail = "; ".join(f"{b}: {w[:80]}" for b, w in why.items())
    raise UserError(f"no offscreen OpenGL works on this machine ({detail}); {GL_HINT}")


@contextmanager
def gl_errors(what: str = "render"):
    """Inside, any failure but a UserError is the offscreen GL failing (EGL / OSMesa missing or unusable
    raise many exception types, one cause): one line naming ``MUJOCO_GL`` and the fix."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot {what} with MUJOCO_GL={os.environ.get('MUJOCO_GL', '(unset)')} ({detail}); {GL_HINT}") from None


def check_mujoco_loads() -> None:
    """A ``MUJOCO_GL`` MuJoCo rejects, or a GL library that cannot load, as one line instead of a traceback."""
    try:
        import mujoco  # noqa: F401
    except Exception as exc:  # RuntimeError for a bad value, AttributeError / ImportError from PyOpenGL
        raise UserError(f"MuJoCo cannot load with MUJOCO_GL={os.environ.get('MUJOCO_GL', '(unset)')} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {GL_HINT}") from None


_seen_deprecations: set[str] = set()


def _print_warning(text: str) -> None:
    if "deprecated" in text:
        if text in _seen_deprecations:
            return
        _seen_deprecations.add(text)
    print(f"WARNING: {text}", file=sys.stderr)


def quiet_deprecations() -> None:
    """Show each MuJoCo deprecation warning once per process (other warnings unchanged). Leaves a
    handler the user installed alone."""
    import mujoco

    if mujoco.get_mju_user_warning() is None:
        mujoco.set_mju_user_warning(_print_warning)


class _OncePerText:
    """A ``logging`` filter that lets each deprecation text through once per process."""

    def filter(self, record) -> bool:
        text = record.getMessage()
        if "deprecated" not in text:
            return True
        if text in _seen_deprecations:
            return False
        _seen_deprecations.add(text)
        return True


def quiet_absl_deprecations() -> None:
    """dm_control reports MuJoCo's compiler deprecations through absl's logger, once per model compiled
    (once per env made): show each text once per process, as :func:`quiet_deprecations` does."""
    import logging

    logger = logging.getLogger("absl")
    if not any(isinstance(f, _OncePerText) for f in logger.filters):
        logger.addFilter(_OncePerText())
