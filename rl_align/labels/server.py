"""``rl-align label <store>``: the labelling page, served by Starlette through uvicorn.

The page (``static/index.html``) shows a queued pair's two clips side by side, looping in sync, with
buttons and arrow keys (left, right, up: equal, down: can't tell), the progress and the store's prompt.
Each page (browser tab) is a client with its own id; ``/api/next`` leases it the oldest pair nobody holds
(``--lease`` seconds, renewed while it asks again; released when answered or when the page closes), so
several people label different pairs. Each answer is one transaction in the store before the reply goes
out, so a reload, a crash or a killed server loses nothing; an answer to a pair someone else answered
first is refused (409) and the reply carries the next pair. The reply to an answer carries the next pair,
whose clips a render thread has already made (it keeps the next ``prefetch`` queued pairs rendered).

Requests are checked before anything is done: ids are JSON integers in 1..2**63-1, bodies above
``MAX_BODY`` bytes get 413, anything malformed 400 with what to send; a store that cannot be written
(full disk, read-only folder) gives 503 with the reason.

Bound to 127.0.0.1 by default, and then every request from another address is refused (403). Binding to
another interface (``--host``; loopback is told by the address it resolves to, so ``127.1`` and
``localhost`` are local) is the explicit choice to accept other machines; ``--token`` then makes every
request carry ``?token=...`` (URL-escaped wherever the server prints or builds a URL; the page passes it on).
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import queue
import re
import secrets
import signal
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import quote

from rl_align.errors import UserError
from rl_align.labels.store import CHOICES, AnswerConflict, LabelStore, UnknownPair

STATIC = Path(__file__).parent / "static"
CLIP_NAME = re.compile(r"^\d+\.webm$")
CLIENT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_BODY = 4096  # bytes: an answer is about 60
MAX_ID = 2**63 - 1  # SQLite's largest integer


def is_loopback(address: str | None) -> bool:
    """Whether a numeric address (as a connection reports its peer) is this machine's loopback."""
    try:
        ip = ipaddress.ip_address((address or "").split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def listen_address(host: str, port: int) -> tuple[int, int, tuple, bool]:
    """``(family, proto, sockaddr, local)`` for ``--host``: resolved as the OS resolves it (``127.1``,
    ``localhost``, a name), local when every address it resolves to is loopback."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"--host {host}: cannot resolve it ({getattr(exc, 'strerror', None) or exc}); give an address such as 127.0.0.1") from None
    family, _, proto, _, sockaddr = infos[0]
    return family, proto, sockaddr, all(is_loopback(info[4][0]) for info in infos)


def token_query(token: str | None) -> str:
    return f"?token={quote(token, safe='')}" if token else ""


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_answer(request) -> dict:
    """The JSON object of a POST, at most ``MAX_BODY`` bytes: ``id`` (an integer in 1..MAX_ID), ``choice``, and
    optionally ``client`` (the page's id) and ``change`` (true to replace one's own earlier answer)."""
    length = request.headers.get("content-length")
    digits = length is not None and length.isascii() and length.isdigit()
    if length is not None and (not digits or int(length) > MAX_BODY):
        raise BadRequest(413 if digits else 400, f"a request body is at most {MAX_BODY} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BadRequest(413, f"a request body is at most {MAX_BODY} bytes")
    usage = "send {\"id\": <pair id>, \"choice\": one of " + ", ".join(CHOICES) + "}"

    def no_constant(name):
        raise ValueError(name)

    try:
        data = json.loads(body, parse_constant=no_constant)
    except (ValueError, RecursionError):
        raise BadRequest(400, f"the body is not JSON; {usage}") from None
    if not isinstance(data, dict):
        raise BadRequest(400, usage)
    pair_id, choice, client, change = data.get("id"), data.get("choice"), data.get("client", ""), data.get("change", False)
    if type(pair_id) is not int or not 1 <= pair_id <= MAX_ID:
        raise BadRequest(400, f"id must be a pair id, a whole number from 1 to {MAX_ID}; {usage}")
    if choice is not None and choice not in CHOICES:
        raise BadRequest(400, f"choice must be one of {', '.join(CHOICES)}")
    if not isinstance(client, str) or (client and not CLIENT.match(client)):
        raise BadRequest(400, "client must be 1-64 letters, digits, '-' or '_'")
    if type(change) is not bool:
        raise BadRequest(400, "change must be true or false")
    return {"id": pair_id, "choice": choice, "client": client, "change": change}


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
               prefetch: int = 3, size: tuple[int, int] | None = None, lease: float = 120.0):
    """The Starlette app of the page for ``store``; answers are recorded as ``labeller`` (with each page's client id)."""
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
            if token is not None and not secrets.compare_digest(request.query_params.get("token", "").encode(), token.encode()):  # bytes: any token
                return PlainTextResponse("missing or wrong ?token=", 401)
            return await call_next(request)

    q = token_query(token)

    def state(current: dict | None) -> dict:
        c = store.counts()
        pair = None
        if current is not None:
            pair = {"id": current["id"], "left": f"/clips/{Path(current['clip1']).name}{q}", "right": f"/clips/{Path(current['clip2']).name}{q}"}
        return {"pair": pair, **c, "prompt": store.meta["prompt"], "task": store.meta["task"]}

    def next_pair(client: str) -> dict:
        pair = store.claim(labeller, client, lease)
        return state(worker.ready(pair) if pair is not None else None)

    def answer(body: dict) -> JSONResponse:
        """Store the answer, then lease the next pair; 409 (with the next pair) when someone else's answer counts."""
        if body["choice"] is None:
            raise BadRequest(400, "choice is missing: one of " + ", ".join(CHOICES))
        try:
            _, pair = store.answer_and_claim(body["id"], body["choice"], labeller, body["client"], body["change"], lease)
        except AnswerConflict as exc:
            return JSONResponse({"error": str(exc), "conflict": True, **next_pair(body["client"])}, 409)
        return JSONResponse(state(worker.ready(pair) if pair is not None else None))

    def guarded(handler):
        """Run ``handler(request)`` in the thread pool: bad input is 400 / 413, an unusable store 503, never 500."""
        from starlette.concurrency import run_in_threadpool

        async def endpoint(request):
            try:
                return await handler(request, run_in_threadpool)
            except BadRequest as exc:
                return JSONResponse({"error": str(exc)}, exc.status)
            except UnknownPair as exc:
                return JSONResponse({"error": str(exc)}, 400)
            except UserError as exc:  # the store cannot be written (a full disk), clips cannot be rendered here
                return JSONResponse({"error": str(exc)}, 503)

        return endpoint

    def client_of(request) -> str:
        client = request.query_params.get("client", "")
        if client and not CLIENT.match(client):
            raise BadRequest(400, "client must be 1-64 letters, digits, '-' or '_'")
        return client

    async def index(request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def api_next(request, pool):
        return JSONResponse(await pool(next_pair, client_of(request)))

    async def api_label(request, pool):
        return await pool(answer, await read_answer(request))

    async def api_release(request, pool):
        body = await read_answer(request)
        await pool(store.release, body["id"], labeller, body["client"])
        return JSONResponse({})

    async def clip(request):
        name = request.path_params["name"]
        path = store.clip_dir / name
        if not CLIP_NAME.match(name) or not path.is_file():
            return PlainTextResponse("no such clip", 404)
        return FileResponse(path, media_type="video/webm")

    routes = [Route("/", index), Route("/api/next", guarded(api_next)), Route("/api/label", guarded(api_label), methods=["POST"]),
              Route("/api/release", guarded(api_release), methods=["POST"]), Route("/clips/{name}", clip)]
    app = Starlette(routes=routes, middleware=[Middleware(Guard)])
    app.state.worker = worker
    return app


def serve(store_path: Path, host: str = "127.0.0.1", port: int = 8765, token: str | None = None, labeller: str | None = None,
          prefetch: int = 3, size: tuple[int, int] | None = None, lease: float = 120.0) -> None:
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
    if token is not None and not token:
        raise UserError("--token must not be empty")
    family, proto, sockaddr, local = listen_address(host, port)
    labeller = labeller or f"{getpass.getuser()}@page"
    app = create_app(store, labeller, token, allow_remote=not local, prefetch=prefetch, size=size, lease=lease)
    try:
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets, and without it every reply on a
        # kept-alive connection waited ~40 ms for the browser's delayed ACK (measured: 44 ms -> 0.5 ms a request)
        sock = socket.socket(family, socket.SOCK_STREAM, proto or socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(128)  # connections wait in the backlog from the moment the address is printed
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    address, port = sock.getsockname()[:2]
    c = store.counts()
    shown = f"[{address}]" if ":" in address else address
    print(f"labelling page: http://{shown}:{port}/{token_query(token)}  "
          f"({c['labelled']} of {c['total']} labelled, {c['queued']} queued; Ctrl-C stops it, every answer is already saved)", flush=True)
    if not local and token is None:
        print(f"warning: listening on {host} without --token: anyone who reaches this address can label", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    if threading.current_thread() is threading.main_thread():  # uvicorn re-raises SIGTERM after its shutdown: end like Ctrl-C
        signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT))
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:  # a stopped page holds no pair: `label answer` or another page may take its pairs at once
        try:
            store.release_all(labeller)
        except UserError:
            pass
