"""``rl-align label <store>``: the labelling page, served by Starlette through uvicorn.

The page (``static/index.html``) shows the oldest queued pair's two clips side by side, looping in sync,
with buttons and arrow keys (left, right, up: equal, down: can't tell), the progress and the store's
prompt. Each answer is one transaction in the store before the reply goes out, so a reload, a crash or a
killed server loses nothing. The reply to an answer carries the next pair, whose clips a render thread
has already made (it keeps the next ``prefetch`` queued pairs rendered), so a person does not wait.

Bound to 127.0.0.1 by default, and then every request from another address is refused (403). Binding to
another interface (``--host``) is the explicit choice to accept other machines; ``--token`` then makes
every request carry ``?token=...`` (the page passes it on).
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import queue
import re
import secrets
import socket
import sys
import threading
from pathlib import Path

from rl_align.errors import UserError
from rl_align.labels.store import CHOICES, LabelStore

STATIC = Path(__file__).parent / "static"
CLIP_NAME = re.compile(r"^\d+\.webm$")


def is_loopback(host: str | None) -> bool:
    if host in ("localhost", "testclient"):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class RenderWorker:
    """One thread that owns the offscreen renderer (a GL context belongs to its thread) and makes the
    clips of the pairs it is asked for, the page's current pair first, then the next queued ones."""

    def __init__(self, store: LabelStore, prefetch: int = 2, size: tuple[int, int] | None = None) -> None:
        self.store, self.prefetch, self.size = store, prefetch, size
        self.jobs: queue.PriorityQueue = queue.PriorityQueue()
        self.count = 0
        self.error: UserError | None = None
        self.thread = threading.Thread(target=self._run, name="clip-renderer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from rl_align.labels.render import ClipRenderer, ensure_clips

        renderer = None  # made on the first job: a page with nothing to render never opens a GL context
        while True:
            _, _, pair, fut = self.jobs.get()
            if fut is not None and fut.done():
                continue
            try:
                if self.error is not None:
                    raise self.error
                if renderer is None:
                    try:
                        renderer = ClipRenderer(self.store.meta["task"], *(self.size or ()))
                    except UserError as exc:
                        self.error = exc
                        raise
                out = ensure_clips(self.store, renderer, pair)
                if fut is not None:
                    fut.set_result(out)
            except Exception as exc:  # handed to the request that waits on it
                if fut is not None:
                    fut.set_exception(exc)

    def clips(self, pair: dict, urgent: bool) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.count += 1
        self.jobs.put((0 if urgent else 1, self.count, pair, fut))
        return fut

    def ready(self, pair: dict) -> dict:
        """``pair`` with its clips made (now, ahead of any prefetch), then the next queued pairs scheduled."""
        if not all(pair[f"clip{s}"] and (self.store.path.parent / pair[f"clip{s}"]).exists() for s in "12"):
            pair = self.clips(pair, urgent=True).result(timeout=120)
        for nxt in self.store.queued(limit=self.prefetch, exclude=(pair["id"],)):
            if not all(nxt[f"clip{s}"] for s in "12"):
                self.clips(nxt, urgent=False)
        return pair


def create_app(store: LabelStore, labeller: str, token: str | None = None, allow_remote: bool = False,
               prefetch: int = 3, size: tuple[int, int] | None = None):
    """The Starlette app of the page for ``store``; answers are recorded as ``labeller``."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse
    from starlette.routing import Route

    worker = RenderWorker(store, prefetch, size)
    for pair in store.queued(limit=prefetch + 1):  # the first pairs are rendered before anyone asks
        if not all(pair[f"clip{s}"] for s in "12"):
            worker.clips(pair, urgent=False)

    class Guard(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            if not allow_remote and not is_loopback(request.client.host if request.client else None):
                return PlainTextResponse("this labelling page only serves this machine (start it with --host to share it)", 403)
            if token is not None and not secrets.compare_digest(request.query_params.get("token", ""), token):
                return PlainTextResponse("missing or wrong ?token=", 401)
            return await call_next(request)

    def state(current: dict | None) -> dict:
        c = store.counts()
        pair = None
        if current is not None:
            q = f"?token={token}" if token else ""
            pair = {"id": current["id"], "left": f"/clips/{Path(current['clip1']).name}{q}", "right": f"/clips/{Path(current['clip2']).name}{q}"}
        return {"pair": pair, **c, "prompt": store.meta["prompt"], "task": store.meta["task"]}

    def next_pair() -> dict:
        pending = store.queued(limit=1)
        return state(worker.ready(pending[0]) if pending else None)

    async def index(request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def api_next(request):
        from starlette.concurrency import run_in_threadpool

        return JSONResponse(await run_in_threadpool(next_pair))

    async def api_label(request):
        from starlette.concurrency import run_in_threadpool

        try:
            body = await request.json()
            pair_id, choice = int(body["id"]), str(body["choice"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "send {\"id\": <pair id>, \"choice\": one of " + ", ".join(CHOICES) + "}"}, 400)
        if choice not in CHOICES or store.pair(pair_id) is None:
            return JSONResponse({"error": f"unknown pair {pair_id} or choice {choice!r}"}, 400)
        await run_in_threadpool(store.set_label, pair_id, choice, labeller)
        return JSONResponse(await run_in_threadpool(next_pair))

    async def clip(request):
        name = request.path_params["name"]
        path = store.clip_dir / name
        if not CLIP_NAME.match(name) or not path.is_file():
            return PlainTextResponse("no such clip", 404)
        return FileResponse(path, media_type="video/webm")

    routes = [Route("/", index), Route("/api/next", api_next), Route("/api/label", api_label, methods=["POST"]),
              Route("/clips/{name}", clip)]
    app = Starlette(routes=routes, middleware=[Middleware(Guard)])
    app.state.worker = worker
    return app


def serve(store_path: Path, host: str = "127.0.0.1", port: int = 8765, token: str | None = None, labeller: str | None = None,
          prefetch: int = 3, size: tuple[int, int] | None = None) -> None:
    """Run the page until interrupted; prints its address (with the token) on the first line."""
    import getpass

    try:
        import uvicorn
        import starlette  # noqa: F401
    except ImportError:
        raise UserError("the labelling page needs starlette and uvicorn: pip install 'rl-align[label]'") from None
    from rl_align.envs.backend import choose_gl

    store = LabelStore(store_path)
    choose_gl()  # before the render thread builds its context
    local = is_loopback(host) or host == "localhost"
    if token is not None and not token:
        raise UserError("--token must not be empty")
    app = create_app(store, labeller or f"{getpass.getuser()}@page", token, allow_remote=not local, prefetch=prefetch, size=size)
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)  # connections wait in the backlog from the moment the address is printed
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    port = sock.getsockname()[1]
    c = store.counts()
    shown = f"[{host}]" if ":" in host else host
    print(f"labelling page: http://{shown}:{port}/{'?token=' + token if token else ''}  "
          f"({c['labelled']} of {c['total']} labelled, {c['queued']} queued; Ctrl-C stops it, every answer is already saved)", flush=True)
    if not local and token is None:
        print(f"warning: listening on {host} without --token: anyone who reaches this address can label", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
