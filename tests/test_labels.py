"""The label store, the human oracle, the synthetic labeller, the server's guard and the agents' hooks."""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fault_helpers import in_namespace
from label_helpers import SMALL, forward_choice, small_store
from rl_align.cli import main
from rl_align.errors import UserError
from rl_align.labels.collect import answer_queued, synthetic_oracle
from rl_align.labels.store import LABEL_VALUE, SEGMENT_FIELDS, LabelStore
from rl_align.runs import resolve_config
from rl_align.train import train


def _segments(M, H=5, seed=0):
    rng = np.random.default_rng(seed)
    return {"obs": rng.normal(size=(M, H, 17)).astype(np.float32), "actions": rng.normal(size=(M, H, 6)).astype(np.float32),
            "mask": np.ones((M, H), bool), "logp": rng.normal(size=(M, H)).astype(np.float32), "ref_logp": rng.normal(size=(M, H)).astype(np.float32),
            "rewards": rng.normal(size=(M, H)).astype(np.float32), "features": rng.normal(size=(M, H, 3)).astype(np.float32)}


def test_store_keeps_pairs_labels_and_who_labelled(tmp_path):
    store = LabelStore.create(tmp_path / "s.sqlite", "HalfCheetah-v5", "forward", 5, 20.0)
    segs = _segments(4)
    ids = store.add_pairs(segs, np.array([0, 2, 3]), np.array([1, 0, 1]), source="test")
    assert store.counts() == {"labelled": 0, "queued": 3, "total": 3}
    assert [p["id"] for p in store.queued(limit=10)] == ids
    store.set_label(ids[1], "right", "ada")
    store.set_label(ids[0], "equal", "bob")
    with pytest.raises(UserError, match="not one of"):
        store.set_label(ids[2], "maybe", "ada")
    assert store.counts() == {"labelled": 2, "queued": 1, "total": 3}
    assert [p["id"] for p in store.queued(limit=10)] == [ids[2]]
    got = store.labelled()
    assert got["pair_id"].tolist() == [ids[1], ids[0]]  # in the order the labels arrived
    assert got["label"].tolist() == [LABEL_VALUE["right"], LABEL_VALUE["equal"]] == [0.0, 0.5]
    for f in SEGMENT_FIELDS:  # pair ids[1] is (segment 2, segment 0)
        np.testing.assert_array_equal(got["first"][f][0], segs[f][2])
        np.testing.assert_array_equal(got["second"][f][0], segs[f][0])
    assert store.pair(ids[1])["labeller"] == "ada" and store.pair(ids[1])["labelled_at"] > 0
    assert sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # trainer and page at once
    assert store.check() == "ok"


_WRITER = """
import sys, numpy as np
from rl_align.labels.store import LabelStore
store = LabelStore(sys.argv[1])
for p in store.queued(limit=10_000):
    store.set_label(p["id"], "left", "writer")
    print(p["id"], flush=True)
"""


def test_a_killed_writer_loses_no_label_and_leaves_none_half_written(tmp_path):
    store = LabelStore.create(tmp_path / "s.sqlite", "HalfCheetah-v5", "forward", 5, 20.0)
    store.add_pairs(_segments(40), *np.triu_indices(40, k=1), source="test")  # 780 pairs
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(store.path)], stdout=subprocess.PIPE, text=True)
    confirmed = [int(proc.stdout.readline()) for _ in range(30)]  # each line comes after its commit
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert store.check() == "ok"
    rows = sqlite3.connect(store.path).execute("SELECT id, label, labeller, labelled_at, label_seq FROM pairs").fetchall()
    labelled = {r[0] for r in rows if r[1] is not None}
    assert set(confirmed) <= labelled  # nothing committed was lost
    assert all(r[1:] == ("left", "writer", r[3], r[4]) and r[3] and r[4] for r in rows if r[1] is not None)  # whole labels only
    assert all(r[1:] == (None, None, None, None) for r in rows if r[1] is None)
    assert store.counts()["labelled"] == len(labelled) < 780


@pytest.mark.parametrize("content, message", [
    (b"this is a text file, not a database\n", "is not an SQLite file"),
    (b"SQLite format 3\x00" + bytes(range(256)) * 16, "malformed SQLite file"),
    (None, "not an rl-align label store"),
])
def test_malformed_or_foreign_files_get_one_line_and_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "x.sqlite"
    if content is None:
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, data BLOB)")
        db.commit()
        db.close()
    else:
        path.write_bytes(content)
    assert main(["label", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    runs = tmp_path / "runs"  # the trainer refuses it the same way, before any run folder exists
    assert main(["train", "--env", "halfcheetah-pref", "--agent", "sail", "--steps", "200", "--set", "env.oracle.kind=human",
                 "--set", f"env.oracle.store={path}", "--set", f"run.out_dir={runs}"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("WARNING: ")]  # MuJoCo's own, once
    assert len(err) == 1 and message in err[0], err
    assert not runs.exists()


def test_human_oracle_needs_a_store_and_a_matching_segment_length(tmp_path):
    with pytest.raises(UserError, match="needs env.oracle.store"):
        resolve_config("halfcheetah-pref", "sail", SMALL + ["env.oracle.kind=human"])
    store = LabelStore.create(tmp_path / "s.sqlite", "HalfCheetah-v5", "forward", 5, 20.0)
    store.add_pairs(_segments(2), np.array([0]), np.array([1]), source="test")
    store.set_label(1, "left", "ada")
    cfg = resolve_config("halfcheetah-pref", "sail", SMALL + ["env.oracle.kind=human", f"env.oracle.store={store.path}",
                                                              f"run.out_dir={tmp_path / 'runs'}"], steps=200)
    with pytest.raises(UserError, match="holds 5-step segments; set agent.segment_len=5"):
        train(cfg, quiet=True)


def test_synthetic_labeller_answers_as_its_oracle_through_the_store(tmp_path, capsys):
    store = small_store(tmp_path / "s.sqlite", 12)
    expected = {p["id"]: forward_choice(store, p) for p in store.queued(limit=100)}
    assert main(["label", "answer", str(store.path), "--score", "forward", "--limit", "10"]) == 0
    assert "answered 10 pairs; 10 of 12 labelled, 2 queued" in capsys.readouterr().out
    got = store.labelled()
    assert {int(i): store.pair(int(i))["label"] for i in got["pair_id"]} == {i: expected[i] for i in list(expected)[:10]}
    assert {store.pair(int(i))["labeller"] for i in got["pair_id"]} == {"synthetic:forward"}


def _client(app, host):
    from starlette.testclient import TestClient

    return TestClient(app, client=(host, 50000))


def test_server_refuses_non_local_clients_unless_told_otherwise(tmp_path):
    from rl_align.labels.server import create_app

    store = LabelStore.create(tmp_path / "s.sqlite", "HalfCheetah-v5", "forward", 5, 20.0)
    local_only = create_app(store, "t")
    assert _client(local_only, "127.0.0.1").get("/api/next").status_code == 200
    assert _client(local_only, "::1").get("/").status_code == 200
    for host in ("203.0.113.9", "192.168.1.20", "10.0.0.7"):
        r = _client(local_only, host).get("/api/next")
        assert r.status_code == 403 and "only serves this machine" in r.text
    shared = create_app(store, "t", token="s3cret", allow_remote=True)
    assert _client(shared, "203.0.113.9").get("/api/next").status_code == 401
    assert _client(shared, "203.0.113.9").get("/api/next?token=wrong").status_code == 401
    r = _client(shared, "203.0.113.9").get("/api/next?token=s3cret")
    assert r.status_code == 200 and r.json()["total"] == 0


def _outside_address():
    """This machine's address on a non-loopback interface, or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def test_the_real_server_listens_on_loopback_only_by_default(tmp_path):
    """``rl-align label <store>`` binds 127.0.0.1: the same port on this machine's network address refuses."""
    store = LabelStore.create(tmp_path / "s.sqlite", "HalfCheetah-v5", "forward", 5, 20.0)
    proc = subprocess.Popen([sys.executable, "-m", "rl_align.cli", "label", str(store.path), "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("labelling page: http://127.0.0.1:"), line
        port = int(line.split()[2].rsplit(":", 1)[1].strip("/"))
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/next", timeout=30) as r:
            assert r.status == 200
        outside = _outside_address()
        if outside is not None:
            with pytest.raises(OSError):
                socket.create_connection((outside, port), timeout=5).close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_online_trainer_queues_pairs_within_budget_and_learns_from_labels_as_they_arrive(tmp_path):
    """SAIL with ``post_pairs``: every rollout queues pairs until the budget is spent; a labeller thread
    answers them while training goes on, and the updates after the first answers use them."""
    store = LabelStore.create(tmp_path / "s.sqlite", "HalfCheetah-v5", "forward", 20, 20.0)
    stop = threading.Event()

    def labeller():
        oracle = synthetic_oracle("forward", 0.0, 0)
        while not stop.is_set():
            answer_queued(store, oracle, "thread")
            time.sleep(0.02)

    thread = threading.Thread(target=labeller, daemon=True)
    thread.start()
    cfg = resolve_config("halfcheetah-pref", "sail-revkl", SMALL + [
        "env.oracle.kind=human", f"env.oracle.store={store.path}", "env.oracle.post_pairs=4", "env.oracle.budget=14",
        f"run.out_dir={tmp_path / 'runs'}"], steps=200 * 8)
    try:
        folder, summary = train(cfg, quiet=True)
    finally:
        stop.set()
        thread.join()
    assert store.counts()["total"] == 14 == summary["queries_used"]  # 4 + 4 + 4 + 2, then the budget is spent
    import csv

    rows = list(csv.DictReader(open(folder / "progress.csv")))
    used = [float(r["train/valid_pairs"]) for r in rows if r.get("train/valid_pairs")]
    assert used and max(used) > 0  # labels that arrived during training were learned from
    first_update = next(r for r in rows if r.get("train/queries_used"))
    assert float(first_update.get("train/skipped") or 0) == 1.0  # nothing was labelled before the first update


def test_rlhf_reward_model_dataset_is_the_stored_labels_without_skips(tmp_path):
    store = small_store(tmp_path / "s.sqlite", 30)
    answer_queued(store, synthetic_oracle("forward", 0.0, 0), "synthetic", limit=24)
    cfg = resolve_config("halfcheetah-pref", "rlhf", [
        "agent.n_envs=2", "agent.n_steps=100", "agent.segment_len=20", "agent.minibatch=50", "run.progress=false", "run.eval_episodes=1",
        "env.oracle.kind=human", f"env.oracle.store={store.path}", f"run.out_dir={tmp_path / 'runs'}"], steps=400)
    folder, _ = train(cfg, quiet=True)
    import csv

    rows = [r for r in csv.DictReader(open(folder / "progress.csv")) if r.get("rlhf/pairs")]
    assert float(rows[0]["rlhf/pairs"]) == 24 - sum(1 for p in store.labelled()["label"] if np.isnan(p))
    assert float(rows[-1]["rlhf/pairs"]) == float(rows[0]["rlhf/pairs"])  # no new label arrived after the first read


def test_clips_are_rebuilt_from_stored_observations_as_the_simulator_showed_them(tmp_path):
    """The frames rebuilt from a segment's observations and x-velocities are those of the simulator's own
    states (the root's x shifted to start at 0), and the clip is a WebM file (rendered in a subprocess:
    label_helpers.rebuild_frames)."""
    code = "import sys; sys.path.insert(0, sys.argv[1]); import label_helpers; label_helpers.rebuild_frames(sys.argv[2])"
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    z = np.load(tmp_path / "frames.npz")
    rebuilt, truth = z["rebuilt"].astype(int), z["truth"].astype(int)
    assert rebuilt.shape == (6, 72, 96, 3)
    assert np.abs(rebuilt - truth).mean(axis=(1, 2, 3)).max() < 1.0
    assert np.abs(rebuilt[0] - rebuilt[-1]).mean() > 1.0  # the body moved on screen
    assert (tmp_path / "c.webm").read_bytes()[:4] == b"\x1a\x45\xdf\xa3"  # EBML: a WebM file


def test_collect_cli_queues_pairs_from_a_run_folder(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["train", "--env", "halfcheetah-pref", "--agent", "sail-revkl", "--steps", "200", *sum((["--set", o] for o in SMALL), []),
                 "--set", f"run.out_dir={runs}"]) == 0
    run = next(runs.glob("*/*/*"))
    for length in ("100000", "0"):  # refused before anything is written, so a plain retry works
        assert main(["label", "collect", "--run", str(run), "--pairs", "7", "--no-render", "--segment-len", length]) == 2
        assert "--segment-len" in capsys.readouterr().err and not (run / "labels.sqlite").exists()
    ro = tmp_path / "ro"
    ro.mkdir()
    r = in_namespace(f"read_only({str(ro)!r}); print(cli('label', 'collect', '--run', {str(run)!r}, '--pairs', '2', '--no-render', "
                     f"'--store', {str(ro / 'new.sqlite')!r}))")
    code, err = eval(r.stdout.strip().splitlines()[-1])
    assert code == 2 and len(err) == 1 and "Read-only file system" in err[0] and str(ro / "new.sqlite") in err[0], err
    assert not list(ro.iterdir())
    assert main(["label", "collect", "--run", str(run), "--pairs", "7", "--no-render", "--prompt", "Run forward."]) == 0
    store = LabelStore(run / "labels.sqlite")
    assert store.counts() == {"labelled": 0, "queued": 7, "total": 7}
    assert store.meta["prompt"] == "Run forward." and store.segment_len == 20
    seg = store.segment(store.queued()[0]["seg1"])
    assert seg["obs"].shape == (20, 17) and seg["actions"].shape == (20, 6) and np.abs(seg["obs"]).max() > 0
    assert main(["label", "collect", "--run", str(run), "--pairs", "2", "--no-render", "--segment-len", "10"]) == 2  # one length per store
    assert "holds 20-step segments" in capsys.readouterr().err


def test_a_human_oracle_run_resumed_on_a_store_that_lost_its_labels_stops_in_one_line(tmp_path, capsys):
    store = small_store(tmp_path / "s.sqlite", 6)
    before = tmp_path / "before.sqlite"
    before.write_bytes(store.path.read_bytes())  # a copy from before any label
    answer_queued(store, synthetic_oracle("forward", 0.0, 0), "ada")
    runs = tmp_path / "runs"
    args = ["train", "--env", "halfcheetah-pref", "--agent", "sail-revkl", "--steps", "200", *sum((["--set", o] for o in SMALL), []),
            "--set", "env.oracle.kind=human", "--set", f"env.oracle.store={store.path}", "--set", f"run.out_dir={runs}"]
    assert main(args) == 0
    folder = next(runs.glob("*/*/*"))
    (folder / "summary.json").unlink()  # stopped before its end
    for f in tmp_path.glob("s.sqlite*"):
        if f.is_file():
            f.unlink()
    store.path.write_bytes(before.read_bytes())  # the same store, without its labels (an old backup put back)
    assert main(["train", "--resume", str(folder)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("WARNING: ")]
    assert len(err) == 1 and "lost" in err[-1] and str(store.path) in err[-1], err
    store.path.unlink()
    small_store(store.path, 3, seed=1)  # another store under the same name
    assert main(["train", "--resume", str(folder)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("WARNING: ")]
    assert len(err) == 1 and "not the label store this run read" in err[-1], err
    assert not (folder / "summary.json").exists()
