"""The label store: one SQLite file per labelling project (standard library only).

Tables: ``meta`` (format marker, task, what to prefer, segment length, clip frame rate), ``segments``
(each segment's raw observations, actions, mask, behaviour and reference log-probs, and for the synthetic
labeller and diagnostics only its rewards and features, as one ``.npz`` blob; the path of its clip),
``pairs`` (two segments, when and from where they were queued, the label that counts ``left`` / ``right`` /
``equal`` / ``skip``, who labelled and when, and ``label_seq``, the order labels arrived in), ``answers``
(every accepted answer: pair, label, labeller, client, when) and ``leases`` (which labeller holds which
unlabelled pair, until when).

Several labellers share a store through leases: :meth:`LabelStore.claim` hands each labeller (a name and a
client, e.g. one browser tab) its own pair for a bounded time. The first answer to a pair counts; an answer
to a pair someone else answered is refused (:class:`AnswerConflict`), and only the labeller who gave the
counting answer may replace it, explicitly (``change=True``).

Every write is one transaction; the file is in WAL mode with ``synchronous=FULL``, so a killed writer
loses no committed label and leaves no half-written one, and the trainer and the page can use the file
at the same time (each call opens its own short-lived connection, so threads and processes share it).
"""

from __future__ import annotations

import io
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from rl_align.errors import UserError

FORMAT = "rl-align-labels"
VERSION = "1"
CHOICES = ("left", "right", "equal", "skip")
LABEL_VALUE = {"left": 1.0, "right": 0.0, "equal": 0.5, "skip": float("nan")}  # P(first segment preferred), as the oracles'
SEGMENT_FIELDS = ("obs", "actions", "mask", "logp", "ref_logp", "rewards", "features")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE segments (id INTEGER PRIMARY KEY, data BLOB NOT NULL, clip TEXT);
CREATE TABLE pairs (
    id INTEGER PRIMARY KEY,
    seg1 INTEGER NOT NULL REFERENCES segments(id),
    seg2 INTEGER NOT NULL REFERENCES segments(id),
    created REAL NOT NULL,
    source TEXT NOT NULL,
    label TEXT CHECK (label IN ('left', 'right', 'equal', 'skip')),
    labeller TEXT,
    labelled_at REAL,
    label_seq INTEGER UNIQUE,
    CHECK ((label IS NULL) = (labeller IS NULL) AND (label IS NULL) = (labelled_at IS NULL) AND (label IS NULL) = (label_seq IS NULL))
);
CREATE INDEX pairs_unlabelled ON pairs(id) WHERE label IS NULL;
"""
# added after version 1's first release; a store without them gets them when first opened for writing
_SHARING = """
CREATE TABLE IF NOT EXISTS leases (pair_id INTEGER PRIMARY KEY REFERENCES pairs(id), holder TEXT NOT NULL, until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY,
    pair_id INTEGER NOT NULL REFERENCES pairs(id),
    label TEXT NOT NULL CHECK (label IN ('left', 'right', 'equal', 'skip')),
    labeller TEXT NOT NULL,
    client TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_pair ON answers(pair_id);
"""
_PAIR_SQL = ("SELECT p.id, p.seg1, p.seg2, s1.clip, s2.clip FROM pairs p JOIN segments s1 ON s1.id = p.seg1 "
             "JOIN segments s2 ON s2.id = p.seg2 WHERE p.label IS NULL")


class AnswerConflict(UserError):
    """An answer to a pair whose counting answer is someone else's (or one's own, without ``change``)."""


class UnknownPair(UserError):
    """An answer to a pair id the store does not hold."""


class StoreUnavailable(UserError):
    """The store's file cannot be used now: a read-only folder, a full disk, a lock held too long, an I/O error."""


def explain(path: Path, exc: sqlite3.Error) -> UserError:
    """What an SQLite error on ``path`` means for the user, in one line (never "malformed" for a sound file)."""
    code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF  # the primary result code
    folder = path.parent
    if code in (11, 26):  # SQLITE_CORRUPT, SQLITE_NOTADB
        return UserError(f"{path} is a malformed SQLite file ({exc}); give a label store written by rl-align label collect")
    if code in (3, 8, 14) and not os.access(folder, os.W_OK):  # SQLITE_PERM, SQLITE_READONLY, SQLITE_CANTOPEN
        return StoreUnavailable(f"{path}: its folder {folder} is read-only and SQLite writes {path.name}-wal and -shm beside the store "
                                f"({exc}); copy the store to a writable folder")
    if code in (3, 8) or (code == 14 and path.exists() and not os.access(path, os.R_OK | os.W_OK)):
        return StoreUnavailable(f"{path} cannot be written ({exc}); check its permissions or copy it to a writable folder")
    if code == 13 or (code == 10 and _no_space(folder)):  # SQLITE_FULL, or an I/O error that is a full disk (tmpfs)
        return StoreUnavailable(f"{path}: the disk is full ({getattr(exc, 'sqlite_errorname', '')}: {exc}); free some space, then retry")
    if code in (5, 6):  # SQLITE_BUSY, SQLITE_LOCKED
        return StoreUnavailable(f"{path} stayed locked by another process for 30 s ({exc}); retry when it is done")
    if code == 10:  # SQLITE_IOERR
        return StoreUnavailable(f"{path}: disk I/O error ({exc}); check the disk, then retry")
    return StoreUnavailable(f"{path}: SQLite cannot use it ({exc})")


def _pair(r: tuple) -> dict:
    return {"id": r[0], "seg1": r[1], "seg2": r[2], "clip1": r[3], "clip2": r[4]}


def _no_space(folder: Path) -> bool:
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


def holder(labeller: str, client: str = "") -> str:
    """Who holds a lease or gave an answer: a labeller's name, and the client (a browser tab, a process) it used."""
    return f"{labeller}#{client}" if client else labeller


def _pack(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _unpack(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class LabelStore:
    """A labelling project on disk. ``LabelStore.create`` makes one; ``LabelStore(path)`` opens one and
    refuses (one line, :class:`UserError`) a missing, malformed or foreign file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"no label store at {self.path}; make one with rl-align label collect --run <run folder> --store {self.path}")
        try:
            with open(self.path, "rb") as f:
                head = f.read(16)
        except OSError as exc:
            raise UserError(f"cannot read {self.path}: {exc.strerror}") from None
        if head != b"SQLite format 3\x00":
            raise UserError(f"{self.path} is not an SQLite file; give a label store written by rl-align label collect")
        with self._connect() as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"meta", "segments", "pairs"} <= tables:
                raise UserError(f"{self.path} is an SQLite file but not an rl-align label store (tables: {', '.join(sorted(tables)) or 'none'})")
            self.meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if self.meta.get("format") != FORMAT:
            raise UserError(f"{self.path} is an SQLite file but not an rl-align label store (no format marker {FORMAT!r})")
        if self.meta.get("version") != VERSION:
            raise UserError(f"{self.path} is a label store of version {self.meta.get('version')}; this rl-align reads version {VERSION}")
        self.sharing = {"leases", "answers"} <= tables

    def _share(self, db) -> None:
        """Add the lease and answer tables to a store made before they existed (inside a write transaction)."""
        if not self.sharing:
            for statement in filter(str.strip, _SHARING.split(";")):
                db.execute(statement)
            self.sharing = True

    @classmethod
    def create(cls, path: str | Path, task: str, prompt: str, segment_len: int, fps: float) -> "LabelStore":
        """A new, empty store (refuses to overwrite a file)."""
        path = Path(path)
        if path.exists():
            raise UserError(f"{path} exists; give a new file name, or add pairs to it with rl-align label collect --store {path}")
        tmp = path.with_name(path.name + ".partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            db = sqlite3.connect(tmp, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode = DELETE")
                db.executescript(_SCHEMA + _SHARING)
                meta = {"format": FORMAT, "version": VERSION, "task": task, "prompt": prompt, "segment_len": str(segment_len),
                        "fps": repr(float(fps)), "created": repr(time.time())}
                db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            finally:
                db.close()
            tmp.replace(path)  # a store appears whole or not at all
            with sqlite3.connect(path) as db:
                db.execute("PRAGMA journal_mode = WAL")  # persistent: readers and one writer at once
            db.close()
        except OSError as exc:
            _remove(tmp)
            raise UserError(f"cannot create the label store {path}: {exc.filename or path}: {exc.strerror}") from None
        except sqlite3.Error as exc:
            _remove(tmp)
            raise explain(path, exc) from None
        return cls(path)

    @contextmanager
    def _connect(self):
        """A short-lived connection; SQLite's errors come out as one line saying what happened (:func:`explain`)."""
        try:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            try:
                db.execute("PRAGMA synchronous = FULL")
                db.execute("PRAGMA foreign_keys = ON")
                yield db
            finally:
                db.close()
        except sqlite3.DatabaseError as exc:  # OperationalError included; IntegrityError is a bug, raised as is
            if isinstance(exc, sqlite3.IntegrityError):
                raise
            raise explain(self.path, exc) from None

    @contextmanager
    def _transaction(self):
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @property
    def clip_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".clips")

    @property
    def segment_len(self) -> int:
        return int(self.meta["segment_len"])

    # ---- writing ------------------------------------------------------------------------------------
    def add_pairs(self, segments: dict[str, np.ndarray], i: np.ndarray, j: np.ndarray, source: str) -> list[int]:
        """Queue pairs ``(i[k], j[k])`` of ``M`` segments (``segments[f]`` shaped ``[M, H, ...]`` for every
        field of ``SEGMENT_FIELDS``) in one transaction; returns the pair ids. Only the segments that some
        pair uses are stored."""
        missing = [f for f in SEGMENT_FIELDS if f not in segments]
        if missing:
            raise ValueError(f"segments lack {missing}")
        used = sorted(set(np.asarray(i).tolist()) | set(np.asarray(j).tolist()))
        now = time.time()
        with self._transaction() as db:
            seg_id = {}
            for m in used:
                cur = db.execute("INSERT INTO segments (data) VALUES (?)", (_pack({f: np.asarray(segments[f][m]) for f in SEGMENT_FIELDS}),))
                seg_id[m] = cur.lastrowid
            ids = []
            for a, b in zip(np.asarray(i).tolist(), np.asarray(j).tolist()):
                ids.append(db.execute("INSERT INTO pairs (seg1, seg2, created, source) VALUES (?, ?, ?, ?)",
                                      (seg_id[a], seg_id[b], now, source)).lastrowid)
        return ids

    def set_label(self, pair_id: int, choice: str, labeller: str, client: str = "", change: bool = False) -> bool:
        """Record ``choice`` (left = the first clip preferred) for a pair, as ``labeller`` on ``client``, and end
        the pair's lease. The first answer counts: an answer to a pair someone else answered raises
        :class:`AnswerConflict`, as does a different answer of the same labeller and client without ``change``.
        Returns False when the answer is the one already counted (a retried request), True when stored."""
        return self.answer_and_claim(pair_id, choice, labeller, client, change, lease=None)[0]

    def answer_and_claim(self, pair_id: int, choice: str, labeller: str, client: str = "", change: bool = False,
                         lease: float | None = 120.0) -> tuple[bool, dict | None]:
        """:meth:`set_label`, then (unless ``lease`` is None) :meth:`claim` of the next pair, in one transaction:
        one disk sync per answer. Returns ``(stored, next pair or None)``."""
        if choice not in CHOICES:
            raise UserError(f"label {choice!r} is not one of {', '.join(CHOICES)}")
        who, now = holder(labeller, client), time.time()
        with self._transaction() as db:
            self._share(db)
            stored = self._answer(db, int(pair_id), choice, labeller, client, change, now)
            return stored, (self._claim(db, who, now, lease) if lease is not None else None)

    def _answer(self, db, pair_id: int, choice: str, labeller: str, client: str, change: bool, now: float) -> bool:
        row = db.execute("SELECT label, labeller FROM pairs WHERE id = ?", (pair_id,)).fetchone()
        if row is None:
            raise UnknownPair(f"no pair {pair_id} in {self.path}")
        if row[0] is not None:
            last = db.execute("SELECT labeller, client FROM answers WHERE pair_id = ? ORDER BY id DESC LIMIT 1", (pair_id,)).fetchone()
            if (holder(*last) if last else row[1]) != holder(labeller, client):
                other = f"{row[1]} (another client)" if row[1] == labeller else row[1]
                raise AnswerConflict(f"pair {pair_id} was already answered by {other}; its answer counts")
            if row[0] == choice:
                return False
            if not change:
                raise AnswerConflict(f"pair {pair_id} already has your answer {row[0]!r}; send change=true to replace it")
        seq = db.execute("SELECT COALESCE(MAX(label_seq), 0) + 1 FROM pairs").fetchone()[0]
        db.execute("UPDATE pairs SET label = ?, labeller = ?, labelled_at = ?, label_seq = ? WHERE id = ?", (choice, labeller, now, seq, pair_id))
        db.execute("INSERT INTO answers (pair_id, label, labeller, client, at) VALUES (?, ?, ?, ?, ?)", (pair_id, choice, labeller, client, now))
        db.execute("DELETE FROM leases WHERE pair_id = ?", (pair_id,))
        return True

    def claim(self, labeller: str, client: str = "", lease: float = 120.0) -> dict | None:
        """The unlabelled pair this labeller and client hold, its lease renewed for ``lease`` seconds (unless more
        than half of it is left: then nothing is written); else the oldest unlabelled pair nobody holds, now leased
        to them; None when every queued pair is held or none is left. Returns ``id``, ``seg1``, ``seg2`` and the
        clip paths, as :meth:`queued`."""
        who, now = holder(labeller, client), time.time()
        if self.sharing:
            with self._connect() as db:
                r = db.execute(_PAIR_SQL + " AND p.id IN (SELECT pair_id FROM leases WHERE holder = ? AND until > ?) ORDER BY p.id LIMIT 1",
                               (who, now + lease / 2)).fetchone()
            if r is not None:
                return _pair(r)
        with self._transaction() as db:
            self._share(db)
            return self._claim(db, who, now, lease)

    @staticmethod
    def _claim(db, who: str, now: float, lease: float) -> dict | None:
        db.execute("DELETE FROM leases WHERE until <= ?", (now,))
        r = db.execute(_PAIR_SQL + " AND p.id IN (SELECT pair_id FROM leases WHERE holder = ?) ORDER BY p.id LIMIT 1", (who,)).fetchone()
        if r is None:
            r = db.execute(_PAIR_SQL + " AND p.id NOT IN (SELECT pair_id FROM leases) ORDER BY p.id LIMIT 1").fetchone()
        if r is None:
            return None
        db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)", (r[0], who, now + lease))
        return _pair(r)

    def release(self, pair_id: int, labeller: str, client: str = "") -> None:
        """End this labeller's lease on a pair without answering (a closed page), so others get it at once."""
        with self._transaction() as db:
            self._share(db)
            db.execute("DELETE FROM leases WHERE pair_id = ? AND holder = ?", (int(pair_id), holder(labeller, client)))

    def set_clip(self, segment_id: int, clip: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE segments SET clip = ? WHERE id = ?", (clip, int(segment_id)))

    def release_all(self, labeller: str) -> int:
        """End every lease of ``labeller`` on any client (a page server that stops); returns how many."""
        with self._transaction() as db:
            self._share(db)
            return db.execute("DELETE FROM leases WHERE holder = ? OR substr(holder, 1, ?) = ?",
                              (labeller, len(labeller) + 1, labeller + "#")).rowcount

    # ---- reading ------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """``labelled`` (skips included), ``queued`` (waiting for a label) and ``total`` pairs."""
        with self._connect() as db:
            total, labelled = db.execute("SELECT COUNT(*), COUNT(label) FROM pairs").fetchone()
        return {"labelled": labelled, "queued": total - labelled, "total": total}

    def queued(self, limit: int = 1, exclude: tuple[int, ...] = ()) -> list[dict]:
        """The oldest unlabelled pairs: ``id``, ``seg1``, ``seg2`` and their clip paths (None until rendered)."""
        marks = ",".join("?" * len(exclude))
        sql = _PAIR_SQL + (f" AND p.id NOT IN ({marks})" if exclude else "") + " ORDER BY p.id LIMIT ?"
        with self._connect() as db:
            rows = db.execute(sql, (*map(int, exclude), int(limit))).fetchall()
        return [_pair(r) for r in rows]

    def pair(self, pair_id: int) -> dict | None:
        with self._connect() as db:
            r = db.execute("SELECT id, seg1, seg2, label, labeller, labelled_at FROM pairs WHERE id = ?", (int(pair_id),)).fetchone()
        return None if r is None else dict(zip(("id", "seg1", "seg2", "label", "labeller", "labelled_at"), r))

    def answers(self, pair_id: int | None = None) -> list[dict]:
        """Every accepted answer (of one pair, or all), oldest first: ``pair_id``, ``label``, ``labeller``, ``client``, ``at``.
        The counting one of a pair is its latest (only the first answerer may replace it)."""
        if not self.sharing:
            return []
        where, args = ("WHERE pair_id = ?", (int(pair_id),)) if pair_id is not None else ("", ())
        with self._connect() as db:
            rows = db.execute(f"SELECT pair_id, label, labeller, client, at FROM answers {where} ORDER BY id", args).fetchall()
        return [dict(zip(("pair_id", "label", "labeller", "client", "at"), r)) for r in rows]

    def segment(self, segment_id: int) -> dict[str, np.ndarray]:
        with self._connect() as db:
            r = db.execute("SELECT data FROM segments WHERE id = ?", (int(segment_id),)).fetchone()
        if r is None:
            raise UserError(f"no segment {segment_id} in {self.path}")
        return _unpack(r[0])

    def labelled(self, after_seq: int = 0) -> dict[str, np.ndarray]:
        """Every pair labelled after ``after_seq``, in the order the labels arrived: ``first`` / ``second``
        (segment fields stacked ``[P, H, ...]``), ``label`` ``[P]`` (1 / 0 / 0.5 / nan as the oracles'),
        ``seq`` ``[P]`` and ``pair_id`` ``[P]``."""
        with self._connect() as db:
            rows = db.execute("SELECT p.id, p.label, p.label_seq, s1.data, s2.data FROM pairs p JOIN segments s1 ON s1.id = p.seg1 "
                              "JOIN segments s2 ON s2.id = p.seg2 WHERE p.label_seq > ? ORDER BY p.label_seq", (int(after_seq),)).fetchall()
        out = {"pair_id": np.array([r[0] for r in rows], dtype=np.int64), "label": np.array([LABEL_VALUE[r[1]] for r in rows]),
               "seq": np.array([r[2] for r in rows], dtype=np.int64)}
        for side, col in (("first", 3), ("second", 4)):
            segs = [_unpack(r[col]) for r in rows]
            out[side] = {f: np.stack([s[f] for s in segs]) for f in SEGMENT_FIELDS} if segs else {}
        return out

    def check(self) -> str:
        """SQLite's own integrity check (``ok`` when the file is sound)."""
        with self._connect() as db:
            return db.execute("PRAGMA integrity_check").fetchone()[0]


class LabelFeed:
    """What a trainer has read of a store: every labelled pair so far, decoded once (``data``, in arrival
    order, as :meth:`LabelStore.labelled` returns them), and where the next read starts. A component with
    its own state: a resumed run re-reads the labels it had seen and treats later ones as new."""

    def __init__(self, store: LabelStore) -> None:
        self.store = store
        self.seq = 0
        self.data = store.labelled(after_seq=10**18)  # empty, with the right keys

    @property
    def path(self) -> Path:
        return self.store.path

    @property
    def segment_len(self) -> int:
        """H of the store's segments."""
        return self.store.segment_len

    def queue(self, segments: dict[str, np.ndarray], i: np.ndarray, j: np.ndarray, source: str) -> list[int]:
        """Queue the pairs ``(segments[i[k]], segments[j[k]])`` for a person to label; returns their ids."""
        return self.store.add_pairs(segments, i, j, source=source)

    def poll(self) -> int:
        """Read the labels that arrived since the last poll; returns how many."""
        new = self.store.labelled(after_seq=self.seq)
        n = len(new["label"])
        if n:
            self.data = new if not len(self.data["label"]) else {
                k: ({f: np.concatenate([self.data[k][f], v[f]]) for f in v} if isinstance(v, dict) else np.concatenate([self.data[k], v]))
                for k, v in new.items()}
            self.seq = int(new["seq"][-1])
        return n

    def progress(self) -> dict[str, float]:
        """For the trainer's status line: labels that arrived, and pairs queued but not yet labelled."""
        c = self.store.counts()
        return {"labelled": float(c["labelled"]), "pending labels": float(c["queued"])}

    def state_dict(self) -> dict:
        return {"seq": self.seq, "store_created": self.store.meta.get("created", "")}

    def load_state_dict(self, state: dict) -> None:
        """Re-read the labels the saved run had read; a store that is not the one it read from, or that lost
        those labels (replaced by another file), stops the resume with one line."""
        seq, path = int(state["seq"]), self.store.path
        if state.get("store_created", self.store.meta.get("created")) != self.store.meta.get("created"):
            raise UserError(f"{path} is not the label store this run read its labels from (the file was replaced); "
                            "put the original store back, or start a new run")
        self.seq, self.data = 0, self.store.labelled(after_seq=10**18)
        old = self.store.labelled(after_seq=0)
        if seq > 0 and (len(old["seq"]) == 0 or int(old["seq"].max()) < seq):
            raise UserError(f"{path} holds {len(old['seq'])} labels but this run had read labels up to number {seq}: the store lost "
                            "them; put the original store back, or start a new run")
        keep = old["seq"] <= int(state["seq"])
        if keep.any():
            self.data = {k: ({f: a[keep] for f, a in v.items()} if isinstance(v, dict) else v[keep]) for k, v in old.items()}
            self.seq = int(state["seq"])
