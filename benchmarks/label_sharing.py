"""Several labellers on one label store: N clients answering as fast as they can through the real page
server for a bounded time, then every acknowledged answer checked against the store.

    python benchmarks/label_sharing.py --labellers 1 2 4 8 --seconds 20 --pairs 4000

For each N: a fresh store of ``--pairs`` pairs of 5-step segments whose clips are stand-in files (the
server renders nothing: what is measured is the server, the leases and the store's transactions, not
MuJoCo rendering), the real server (``rl-align label <store> --port 0``, uvicorn on 127.0.0.1), and N
labeller processes, each one HTTP/1.1 connection with its own client id, looping ``GET /api/next`` (timed)
then ``POST /api/label`` with a random choice until ``--seconds`` have passed. Reported: answers
acknowledged (200), answers stored (rows of the store's ``answers`` table; must be equal, and every
acknowledged answer must be the stored one of its pair), 409s, answers per second, and the median and
p95 latency of ``/api/next`` over all labellers. One JSON line per N is appended to
``benchmarks/label_sharing.jsonl``.

``--server-src DIR`` runs the server of another checkout's ``rl_align`` (e.g. ``git archive <commit> rl_align``
unpacked in DIR) against the same store and clients, for a before/after; a server without the ``answers``
table keeps one answer per pair, so its stored answers are its labelled pairs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHOICES = ("left", "right", "equal", "skip")


def labeller(port: int, client: str, start: float, seconds: float, seed: int) -> None:
    """One labeller process: prints ``{"acks": [[id, choice], ...], "next_s": [...], "conflicts": n}``."""
    import random

    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    acks, next_s, conflicts = [], [], 0
    time.sleep(max(0.0, start - time.time()))
    end = start + seconds
    while time.time() < end:
        t0 = time.perf_counter()
        conn.request("GET", f"/api/next?client={client}")
        r = conn.getresponse()
        state = json.loads(r.read())
        next_s.append(time.perf_counter() - t0)
        if state["pair"] is None:
            break
        choice = rng.choice(CHOICES)
        body = json.dumps({"id": state["pair"]["id"], "choice": choice, "client": client})
        conn.request("POST", "/api/label", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        if r.status == 200:
            acks.append([state["pair"]["id"], choice])
        elif r.status == 409:
            conflicts += 1
        else:
            raise SystemExit(f"unexpected status {r.status}")
    print(json.dumps({"acks": acks, "next_s": next_s, "conflicts": conflicts}))


def run(n: int, seconds: float, n_pairs: int, server_src: str | None = None) -> dict:
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    from label_helpers import clipped_store  # the tests' store of random segments with stand-in clips

    tmp = Path(tempfile.mkdtemp(prefix="label-sharing-"))
    store = clipped_store(tmp / "s.sqlite", n_pairs)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **({"PYTHONPATH": server_src} if server_src else {})}
    server = subprocess.Popen([sys.executable, "-m", "rl_align.cli", "label", str(store.path), "--port", "0"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=server_src or ROOT)
    port = int(server.stdout.readline().split()[2].rsplit(":", 1)[1].split("/")[0])
    start = time.time() + 2.0  # every labeller starts at once
    procs = [subprocess.Popen([sys.executable, __file__, "--labeller", str(port), f"c{k}", repr(start), repr(seconds), str(k)],
                              stdout=subprocess.PIPE, text=True) for k in range(n)]
    results = [json.loads(p.communicate()[0]) for p in procs]
    server.terminate()
    _, err = server.communicate(timeout=60)
    acks = [(pid, choice, f"c{k}") for k, r in enumerate(results) for pid, choice in r["acks"]]
    rows = store.answers()
    stored = len(rows) if not server_src else store.counts()["labelled"]
    by_pair: dict[int, list] = {}
    for a in rows:
        by_pair.setdefault(a["pair_id"], []).append((a["label"], a["client"]))
    once = len({pid for pid, _, _ in acks}) == len(acks)
    exact = once and all(store.pair(pid)["label"] == choice and (server_src or by_pair.get(pid) == [(choice, client)])
                         for pid, choice, client in acks)
    lat = np.array([x for r in results for x in r["next_s"]])
    return {"labellers": n, "seconds": seconds, "pairs": n_pairs, "server_src": server_src, "acknowledged": len(acks), "stored": stored,
            "labelled": store.counts()["labelled"], "every_ack_stored_as_given": exact, "conflicts_409": sum(r["conflicts"] for r in results),
            "answers_per_s": len(acks) / seconds, "next_median_s": float(np.median(lat)), "next_p95_s": float(np.percentile(lat, 95)),
            "next_requests": int(lat.size), "server_traceback": "Traceback" in err, "loadavg": os.getloadavg()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--labeller":
        port, client, start, seconds, seed = sys.argv[2:7]
        labeller(int(port), client, float(start), float(seconds), int(seed))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labellers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--pairs", type=int, default=4000)
    p.add_argument("--server-src", default=None, help="a folder holding another checkout's rl_align package (a before/after)")
    args = p.parse_args()
    for n in args.labellers:
        out = run(n, args.seconds, args.pairs, args.server_src)
        out["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        print(json.dumps(out), flush=True)
        with open(ROOT / "benchmarks" / "label_sharing.jsonl", "a") as fh:
            fh.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
