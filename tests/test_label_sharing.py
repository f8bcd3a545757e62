"""Several labellers on one store, through the real page server (``rl-align label``, uvicorn on 127.0.0.1)
and real HTTP clients: leased pairs, no acknowledged answer lost or replaced, 409 for a pair someone else
answered, requests checked (400 / 413, never 500), URL-escaped tokens, loopback told by address; and the
store's errors on a read-only or full disk (in the test's own mount namespace) saying what happened."""

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np
import pytest

from fault_helpers import in_namespace
from label_helpers import clipped_store
from rl_align.labels.store import LabelStore

CHOICES = ("left", "right", "equal", "skip")


class Server:
    """``rl-align label <store> --port 0 ARGS`` as a user starts it; its first line gives the address."""

    def __init__(self, store_path, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "rl_align.cli", "label", str(store_path), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        self.line = self.proc.stdout.readline()
        assert self.line.startswith("labelling page: http://"), (self.line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.url = urllib.parse.urlsplit(self.line.split()[2])
        self.port = self.url.port

    def stop(self) -> str:
        """Stop it; returns what it wrote to stderr."""
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        return err


class Client:
    """One labeller: an HTTP/1.1 connection kept open, a client id of its own, as a browser tab has."""

    def __init__(self, port, client, query=""):
        self.conn, self.client, self.query = http.client.HTTPConnection("127.0.0.1", port, timeout=60), client, query

    def request(self, method, path, body=None, headers=None):
        sep = "&" if "?" in path else "?"
        self.conn.request(method, path + (f"{sep}{self.query}" if self.query else ""), body=body, headers=headers or {})
        r = self.conn.getresponse()
        data = r.read()
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, data

    def next(self):
        return self.request("GET", f"/api/next?client={self.client}")

    def answer(self, pair_id, choice, change=None):
        body = {"id": pair_id, "choice": choice, "client": self.client}
        if change is not None:
            body["change"] = change
        return self.request("POST", "/api/label", json.dumps(body), {"Content-Type": "application/json"})


def test_page_clients_and_label_answer_at_once_lose_and_replace_no_acknowledged_answer(tmp_path):
    store = clipped_store(tmp_path / "s.sqlite", 150)
    server = Server(store.path)
    acked, conflicts, lock = [], [], threading.Lock()

    def labeller(k):
        client, rng = Client(server.port, f"tab{k}"), np.random.default_rng(k)
        status, state = client.next()
        while state["pair"] is not None:
            pair_id, choice = state["pair"]["id"], CHOICES[rng.integers(4)]
            status, state = client.answer(pair_id, choice)
            with lock:
                (acked if status == 200 else conflicts).append((pair_id, choice, f"tab{k}", status))
            assert status in (200, 409), (status, state)

    cli = subprocess.Popen([sys.executable, "-m", "rl_align.cli", "label", "answer", str(store.path), "--score", "forward",
                            "--interval", "0.05", "--labeller", "cli"], stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not store.answers() and time.time() < deadline:  # the command has started answering: now all at once
        time.sleep(0.02)
    threads = [threading.Thread(target=labeller, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    out, _ = cli.communicate(timeout=300)
    err = server.stop()
    n_cli = int(out.split("answered ")[-1].split()[0])
    assert cli.returncode == 0 and "Traceback" not in err, err
    assert not conflicts  # leased pairs: nobody was handed a pair another labeller holds
    assert len(acked) + n_cli == 150 == store.counts()["labelled"]  # every pair answered once, by exactly one labeller
    assert len({a[0] for a in acked}) == len(acked)
    for pair_id, choice, client, _ in acked:  # each acknowledged answer is in the store exactly as acknowledged
        assert store.pair(pair_id)["label"] == choice
        assert [(a["label"], a["client"]) for a in store.answers(pair_id)] == [(choice, client)]
    cli_answers = [a for a in store.answers() if a["labeller"] == "cli"]
    assert len(cli_answers) == n_cli and len(store.answers()) == 150
    assert n_cli > 0 and len(acked) > 0  # both kinds of labeller took part


def test_leases_409_and_an_explicit_change(tmp_path):
    store = clipped_store(tmp_path / "s.sqlite", 5)
    server = Server(store.path, "--lease", "1.5")
    try:
        a, b, c = (Client(server.port, name) for name in ("a", "b", "c"))
        assert a.next()[1]["pair"]["id"] == 1 and b.next()[1]["pair"]["id"] == 2  # different pairs
        assert a.next()[1]["pair"]["id"] == 1  # asking again renews one's own lease
        status, state = b.answer(1, "left")  # b answers a's pair first (it knew the id): the first answer counts
        assert status == 200
        status, state = a.answer(1, "right")
        assert status == 409 and "already answered" in state["error"] and state["pair"]["id"] == 3  # and the next pair comes along
        assert store.pair(1)["label"] == "left"
        assert b.answer(1, "left")[0] == 200  # the same answer again (a retried request) changes nothing
        status, state = b.answer(1, "right")
        assert status == 409 and "change=true" in state["error"]
        assert b.answer(1, "right", change=True)[0] == 200  # one's own answer, changed explicitly
        assert store.pair(1)["label"] == "right"
        assert [(x["label"], x["client"]) for x in store.answers(1)] == [("left", "b"), ("right", "b")]  # every answer kept
        time.sleep(1.6)  # a's lease on pair 3 runs out: the pair goes to the next labeller who asks
        assert c.next()[1]["pair"]["id"] == 2  # b's lease on 2 ran out too; the oldest free pair
        assert c.request("POST", "/api/release", json.dumps({"id": 2, "client": "c"}))[0] == 200  # handed back at once
        assert b.next()[1]["pair"]["id"] == 2
    finally:
        assert "Traceback" not in server.stop()
    import sqlite3

    assert sqlite3.connect(store.path).execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0  # a stopped page (SIGTERM) holds no pair
    assert store.claim("cli", "x")["id"] == 2


@pytest.mark.parametrize("body, status", [
    (b'{"id": Infinity, "choice": "left"}', 400), (b'{"id": NaN, "choice": "left"}', 400),
    (b'{"id": 100000000000000000000000, "choice": "left"}', 400), (b'{"id": 1.9, "choice": "left"}', 400),
    (b'{"id": true, "choice": "left"}', 400), (b'{"id": 0, "choice": "left"}', 400), (b'{"id": -1, "choice": "left"}', 400),
    (b'{"id": "1", "choice": "left"}', 400), (b'{"id": 99999, "choice": "left"}', 400), (b'{"id": 1, "choice": "maybe"}', 400),
    (b'{"id": 1}', 400), (b'[1, "left"]', 400), (b"not json", 400), (b"\xff\xfe\x00", 400), (b"[" * 3000, 400),
    (b'{"id": 1, "choice": "left", "client": "../x"}', 400), (b'{"id": 1, "choice": "left", "change": "yes"}', 400),
    (b'{"id": 1, "choice": "left", "pad": "' + b"x" * 5000 + b'"}', 413),
])
def test_bad_requests_are_400_or_413_and_change_nothing(server_and_store, body, status):
    server, store = server_and_store
    client = Client(server.port, "v")
    got, reply = client.request("POST", "/api/label", body, {"Content-Type": "application/json"})
    assert got == status and "error" in reply, (got, reply)
    assert store.counts()["labelled"] == 0


def test_a_chunked_body_over_the_cap_is_413_and_a_bad_client_id_400(server_and_store):
    server, store = server_and_store
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/api/label", body=iter([b'{"id": 1, "choice": "left", "pad": "', b"x" * 8000, b'"}']), encode_chunked=True)
    assert conn.getresponse().status == 413
    assert Client(server.port, "bad%20id!").next()[0] == 400
    assert store.counts()["labelled"] == 0


@pytest.fixture(scope="module")
def server_and_store(tmp_path_factory):
    store = clipped_store(tmp_path_factory.mktemp("v") / "s.sqlite", 3)
    server = Server(store.path)
    yield server, store
    err = server.stop()
    assert "Traceback" not in err and "Exception" not in err, err  # no 500 behind any of them


def test_tokens_are_url_escaped_and_127_1_is_loopback(tmp_path):
    store = clipped_store(tmp_path / "s.sqlite", 2)
    token = "a&b#c d/é"
    server = Server(store.path, "--host", "127.1", "--token", token)
    try:
        assert server.line.startswith(f"labelling page: http://127.0.0.1:{server.port}/?token=")
        assert urllib.parse.parse_qs(server.url.query) == {"token": [token]}  # the printed URL carries the token whole
        client = Client(server.port, "t", server.url.query)
        status, state = client.next()
        assert status == 200
        clip = urllib.parse.urlsplit(state["pair"]["left"])
        assert urllib.parse.parse_qs(clip.query) == {"token": [token]}
        client.conn.request("GET", state["pair"]["left"])  # the clip URL as the page gets it, used as is
        assert client.conn.getresponse().status == 200
        assert Client(server.port, "t").next()[0] == 401  # still required
    finally:
        err = server.stop()
    assert "warning" not in err  # 127.1 resolves to loopback: nothing to warn about


def test_a_store_on_a_read_only_or_full_disk_says_so(tmp_path):
    ro, full = tmp_path / "ro", tmp_path / "full"
    ro.mkdir()
    clipped_store(ro / "s.sqlite", 3)
    script = f"""
read_only({str(ro)!r})
print(cli("label", "answer", {str(ro / 's.sqlite')!r}))
tmpfs({str(full)!r}, "1m")
sys.path.insert(0, {os.path.dirname(__file__)!r})
from label_helpers import clipped_store
clipped_store({str(full / 's.sqlite')!r}, 3)
fill({str(full)!r})
print(cli("label", "answer", {str(full / 's.sqlite')!r}))
"""
    r = in_namespace(script)
    assert r.returncode == 0, r.stderr
    (code_ro, err_ro), (code_full, err_full) = (eval(line) for line in r.stdout.strip().splitlines()[-2:])
    assert code_ro == 2 and len(err_ro) == 1 and "read-only" in err_ro[0] and "malformed" not in err_ro[0], err_ro
    assert code_full == 2 and len(err_full) == 1 and "disk is full" in err_full[0] and "malformed" not in err_full[0], err_full
