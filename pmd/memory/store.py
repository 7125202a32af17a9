"""PMD's procedural memory: experience (L1), insight (L2) and behavior (L3) entries in one SQLite file.

The store lives in the run folder (`<run>/memory.sqlite`), uses WAL mode so read-only connections (an
exporter, a dashboard, a test) see a consistent state while the trainer writes, and runs every mutation in
one transaction. Text written by the model is untrusted: it only ever reaches SQLite as a bound parameter.

Schema
------
entries  one row per live entry of any level; ids are unique across levels, so counters take plain ids.
    id                   INTEGER PRIMARY KEY
    level                'experience' | 'insight' | 'behavior'
    kind                 experience: 'pass' | 'fail';  insight: 'strategy' | 'lesson';  behavior: 'behavior'
    problem              problem id as text; NULL for behaviors (they are global)
    text                 rollout text / insight sentence / behavior instruction
    norm                 dedup key: normalize_text(text), for behaviors of "name: instruction"
    name, cue            behavior only: short name and applicability cue ("WHEN: ...")
    reward, feedback     experience only: verifier reward and feedback (feedback may be empty)
    support              insight: times proposed; behavior: number of distinct problems; experience: 1
    problem_ids          behavior only: JSON list of the problems it was abstracted from
    source_rollouts      JSON list of the rollout ids (or other source ids) the entry came from
    tokens               approximate tokens the entry costs to show (count_tokens)
    created_step, last_confirmed_step
    uses, helpful        usage counters; utility u = helpful / (uses + 2)
    dedup_vec, search_vec  float32 embeddings, NULL without an embed function. Insight: of the text.
                         Behavior: dedup_vec of "name: instruction", search_vec of "cue instruction".
visits   one row per problem: the last step it was trained on, its pass rate then, the memory ids in its
         teacher context then (for the utility credit at the next visit), and the step of its last reflection.
events   append-only history: id, step, action ('add'|'merge'|'prune'|'use'|'credit'), entry_id, level,
         detail (JSON: the merged-in text, or the full pruned entry so deleted content stays inspectable).

Rules
-----
- Experience, per problem. Passing rollouts: at most `l1_max_pass`. A rollout whose normalised text is
  already stored (same problem, same pass/fail) only refreshes that entry's last_confirmed_step. Eviction
  ignores utility (stored passes are all verified): oldest last_confirmed_step first, among equally old the
  longest text, then the newer id. Failing rollouts: the latest `l1_max_fail` are kept.
- Insight, per problem: at most `l2_max_strategies` strategies and `l2_max_lessons` lessons, each at most
  `l2_entry_max_tokens` tokens (longer text is rejected, never cut).
- Behavior, global: at most `l3_max_behaviors`; support = number of distinct problems in problem_ids.
- Near-duplicates merge instead of adding: normalised text equal, or (with `embed`) cosine >=
  `dedup_threshold`. A merge increments support (behavior: unites problem ids, support = their count), sets
  last_confirmed_step and unites source_rollouts.
- Insight and behavior caps drop the lowest utility first; ties go to lower support, then older
  last_confirmed_step, then the older id. Entries created at the current step are protected, but a cap is
  hard: when protected entries alone exceed it, protection yields in the same order.
- Optional token budgets use the same order after the count cap. They apply where the count cap does: per
  problem for experience and insight (pass and fail, strategy and lesson together), to the whole level for
  behaviors. An experience budget evicts in the L1 order (oldest, then longest) across passes and failures.
- One MemoryStore object per thread (sqlite3 connections are not shared across threads). Any valid unicode
  text round-trips unchanged; lone surrogates raise (they cannot be encoded as UTF-8).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sqlite3
import string
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pmd.memory.config import MemoryConfig

MEMORY_FILENAME = "memory.sqlite"
LEVELS = ("experience", "insight", "behavior")
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id                  INTEGER PRIMARY KEY,
    level               TEXT NOT NULL CHECK (level IN ('experience', 'insight', 'behavior')),
    kind                TEXT NOT NULL CHECK (kind IN ('pass', 'fail', 'strategy', 'lesson', 'behavior')),
    problem             TEXT,
    text                TEXT NOT NULL,
    norm                TEXT NOT NULL,
    name                TEXT,
    cue                 TEXT,
    reward              REAL,
    feedback            TEXT,
    support             INTEGER NOT NULL DEFAULT 1,
    problem_ids         TEXT,
    source_rollouts     TEXT NOT NULL DEFAULT '[]',
    tokens              INTEGER NOT NULL,
    created_step        INTEGER NOT NULL,
    last_confirmed_step INTEGER NOT NULL,
    uses                INTEGER NOT NULL DEFAULT 0,
    helpful             REAL NOT NULL DEFAULT 0,
    dedup_vec           BLOB,
    search_vec          BLOB
);
CREATE INDEX IF NOT EXISTS entries_by_problem ON entries (level, problem, kind);
CREATE TABLE IF NOT EXISTS events (
    id       INTEGER PRIMARY KEY,
    step     INTEGER,
    action   TEXT NOT NULL CHECK (action IN ('add', 'merge', 'prune', 'use', 'credit')),
    entry_id INTEGER,
    level    TEXT,
    detail   TEXT
);
CREATE INDEX IF NOT EXISTS events_by_entry ON events (entry_id);
CREATE TABLE IF NOT EXISTS visits (
    problem        TEXT PRIMARY KEY,
    step           INTEGER NOT NULL,
    pass_rate      REAL NOT NULL,
    entry_ids      TEXT NOT NULL DEFAULT '[]',
    reflected_step INTEGER
);
"""

Embed = Callable[[list[str]], Sequence[Sequence[float]]]


# ---------------------------------------------------------------------------------------------- helpers
def approx_tokens(text: str) -> int:
    """A tokenizer-free token estimate: whitespace words x 1.3, rounded up (subword tokenizers split words)."""
    return math.ceil(len(text.split()) * 1.3)


def _is_edge_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def normalize_text(text: str) -> str:
    """The dedup key: lowercase, whitespace collapsed, punctuation stripped at both ends."""
    text = re.sub(r"\s+", " ", text.lower()).strip()
    start, end = 0, len(text)
    while start < end and (_is_edge_punctuation(text[start]) or text[start].isspace()):
        start += 1
    while end > start and (_is_edge_punctuation(text[end - 1]) or text[end - 1].isspace()):
        end -= 1
    return text[start:end]


def utility(helpful: float, uses: int) -> float:
    """u = helpful / (uses + 2): rarely used entries shrink toward the neutral value 0."""
    return helpful / (uses + 2)


def _unique(items: Iterable) -> list:
    """Items in first-seen order without repeats."""
    return list(dict.fromkeys(items))


def _unit_rows(vectors: Sequence[Sequence[float]]) -> np.ndarray:
    """float32 rows scaled to unit length, so cosine is a dot product (zero rows stay zero)."""
    matrix = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


def _vec_from_blob(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32)


@dataclass(frozen=True)
class Rollout:
    """One verified rollout offered to the experience level (thinking already stripped by the caller)."""

    text: str
    reward: float
    passed: bool
    feedback: str = ""
    rollout_id: str | int | None = None


@dataclass
class _BehaviorIndex:
    """Cached search matrix: one unit row per behavior that has a search vector."""

    ids: np.ndarray
    support: np.ndarray
    matrix: np.ndarray
    data_version: int  # PRAGMA data_version when built: it changes when another connection commits


# ---------------------------------------------------------------------------------------------- the store
class MemoryStore:
    """The three-level memory of one run. See the module docstring for the schema and the rules."""

    def __init__(self, path: str | Path, limits: MemoryConfig | None = None, *, embed: Embed | None = None,
                 count_tokens: Callable[[str], int] = approx_tokens, readonly: bool = False):
        self.path = Path(path)
        self.limits = limits or MemoryConfig()
        self.embed = embed
        self.count_tokens = count_tokens
        self.readonly = readonly
        self._behavior_index: _BehaviorIndex | None = None
        self._conn = self._connect()

    @classmethod
    def for_run(cls, run_dir: str | Path, limits: MemoryConfig | None = None, **kwargs) -> MemoryStore:
        """The store of a run folder, `<run>/memory.sqlite`."""
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        return cls(Path(run_dir) / MEMORY_FILENAME, limits, **kwargs)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; _write/_read open them explicitly.
        if self.readonly:
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30)
        else:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # a power cut may lose the last commits, never corrupts
            conn.executescript(SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.row_factory = sqlite3.Row
        return conn

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is committed, or none of it."""
        if self.readonly:
            raise PermissionError(f"{self.path} is open read-only")
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            self._behavior_index = None  # it may have been invalidated by rolled-back work; rebuild lazily
            raise
        self._conn.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction, so several SELECTs see the same committed state."""
        self._conn.execute("BEGIN")
        try:
            yield self._conn
        finally:
            self._conn.execute("COMMIT")

    # ------------------------------------------------------------------------------------------ low level
    def _log(self, step: int | None, action: str, entry_id: int | None, level: str | None,
             detail: dict | None = None) -> None:
        self._conn.execute(
            "INSERT INTO events (step, action, entry_id, level, detail) VALUES (?, ?, ?, ?, ?)",
            (step, action, entry_id, level, json.dumps(detail, ensure_ascii=False) if detail else None))

    def _insert(self, step: int, fields: dict) -> int:
        """Insert one entry (fields' keys are our own column names) and log the addition."""
        fields = {**fields, "created_step": step, "last_confirmed_step": step}
        columns = ", ".join(fields)
        marks = ", ".join("?" * len(fields))
        cursor = self._conn.execute(f"INSERT INTO entries ({columns}) VALUES ({marks})", tuple(fields.values()))
        self._log(step, "add", cursor.lastrowid, fields["level"])
        if fields["level"] == "behavior":
            self._behavior_index = None
        return cursor.lastrowid

    def _rows(self, where: str, params: tuple = (), order: str = "id") -> list[sqlite3.Row]:
        return self._conn.execute(f"SELECT * FROM entries WHERE {where} ORDER BY {order}", params).fetchall()

    def _delete(self, step: int, rows: Iterable[sqlite3.Row], reason: str) -> None:
        """Prune entries; the event keeps the whole entry so the log still shows what was lost."""
        for row in rows:
            self._log(step, "prune", row["id"], row["level"], {"reason": reason, "entry": _entry_dict(row)})
            self._conn.execute("DELETE FROM entries WHERE id = ?", (row["id"],))
            if row["level"] == "behavior":
                self._behavior_index = None

    def _embed(self, texts: list[str]) -> np.ndarray | None:
        if self.embed is None or not texts:
            return None
        vectors = _unit_rows(self.embed(texts))
        if vectors.shape[0] != len(texts):
            raise ValueError(f"embed returned {vectors.shape[0]} vectors for {len(texts)} texts")
        return vectors

    def _find_duplicate(self, candidates: list[sqlite3.Row], norm: str, vec: np.ndarray | None,
                        ) -> sqlite3.Row | None:
        """The entry a new text merges into: equal normalised text first, else the most similar vector."""
        for row in candidates:
            if row["norm"] == norm:
                return row
        if vec is None:
            return None
        best, best_sim = None, self.limits.dedup_threshold
        for row in candidates:
            if row["dedup_vec"] is not None:
                sim = float(_vec_from_blob(row["dedup_vec"]) @ vec)
                if sim >= best_sim:
                    best, best_sim = row, sim
        return best

    # ------------------------------------------------------------------------------------------ pruning
    @staticmethod
    def _prune_order(rows: Iterable[sqlite3.Row], step: int) -> list[sqlite3.Row]:
        """Rows in dropping order: unprotected first, then lowest utility, lower support, older confirmation."""
        return sorted(rows, key=lambda r: (r["created_step"] == step, utility(r["helpful"], r["uses"]),
                                           r["support"], r["last_confirmed_step"], r["id"]))

    @staticmethod
    def _l1_eviction_order(rows: Iterable[sqlite3.Row]) -> list[sqlite3.Row]:
        """Experience dropping order: oldest confirmation first, among equally old the longest, then newer id."""
        return sorted(rows, key=lambda r: (r["last_confirmed_step"], -len(r["text"]), -r["id"]))

    def _enforce(self, step: int, ordered: list[sqlite3.Row], cap: int | None, budget: int | None) -> None:
        """Drop from the front of `ordered` until at most `cap` rows and `budget` tokens remain."""
        drop = max(0, len(ordered) - cap) if cap is not None else 0
        self._delete(step, ordered[:drop], "cap")
        kept = ordered[drop:]
        if budget is None:
            return
        total = sum(r["tokens"] for r in kept)
        over = []
        while kept and total > budget:
            row = kept.pop(0)
            total -= row["tokens"]
            over.append(row)
        self._delete(step, over, "token_budget")

    def _surviving(self, ids: list[int | None]) -> list[int | None]:
        """The ids that still exist after pruning; pruned ones become None."""
        wanted = [i for i in ids if i is not None]
        alive = {r["id"] for r in self._conn.execute(
            f"SELECT id FROM entries WHERE id IN ({', '.join('?' * len(wanted))})", wanted)} if wanted else set()
        return [i if i in alive else None for i in ids]

    # ------------------------------------------------------------------------------------------ L1 experience
    def add_rollouts(self, step: int, problem: str, rollouts: Iterable[Rollout]) -> list[int | None]:
        """Offer one problem's verified rollouts; returns each one's entry id (None if it was evicted)."""
        problem = str(problem)
        with self._write():
            ids = [self._add_rollout(step, problem, r) for r in rollouts]
            self._evict_experience(step, problem)
            return self._surviving(ids)

    def _add_rollout(self, step: int, problem: str, rollout: Rollout) -> int:
        kind = "pass" if rollout.passed else "fail"
        norm = normalize_text(rollout.text)
        same = self._conn.execute(
            "SELECT id FROM entries WHERE level = 'experience' AND problem = ? AND kind = ? AND norm = ?",
            (problem, kind, norm)).fetchone()
        if same is not None:  # seen before: only re-confirm it
            self._conn.execute("UPDATE entries SET last_confirmed_step = ? WHERE id = ?", (step, same["id"]))
            self._log(step, "merge", same["id"], "experience")
            return same["id"]
        sources = [rollout.rollout_id] if rollout.rollout_id is not None else []
        return self._insert(step, {
            "level": "experience", "kind": kind, "problem": problem, "text": rollout.text, "norm": norm,
            "reward": float(rollout.reward), "feedback": rollout.feedback or "",
            "tokens": self.count_tokens(rollout.text) + self.count_tokens(rollout.feedback or ""),
            "source_rollouts": json.dumps(sources, ensure_ascii=False)})

    def _evict_experience(self, step: int, problem: str) -> None:
        where = "level = 'experience' AND problem = ? AND kind = ?"
        passes = self._rows(where, (problem, "pass"))
        self._enforce(step, self._l1_eviction_order(passes), self.limits.l1_max_pass, None)
        # Failures keep the latest: drop by oldest confirmation, then older id.
        fails = self._rows(where, (problem, "fail"), order="last_confirmed_step, id")
        self._enforce(step, fails, self.limits.l1_max_fail, None)
        if self.limits.l1_token_budget is not None:
            everything = self._rows("level = 'experience' AND problem = ?", (problem,))
            self._enforce(step, self._l1_eviction_order(everything), None, self.limits.l1_token_budget)

    # ------------------------------------------------------------------------------------------ L2 insight
    def add_insights(self, step: int, problem: str, strategies: Iterable[str] = (), lessons: Iterable[str] = (),
                     source_rollouts: Iterable = ()) -> list[int | None]:
        """Add or merge a reflection's strategies then lessons; one id per input, None if rejected or pruned.

        Text longer than `l2_entry_max_tokens` (or empty once normalised) is rejected, never cut.
        """
        problem = str(problem)
        items = [("strategy", t) for t in strategies] + [("lesson", t) for t in lessons]
        sources = _unique(source_rollouts)
        vectors = self._embed([text for _, text in items])
        with self._write():
            ids = [self._add_insight(step, problem, kind, text, None if vectors is None else vectors[i], sources)
                   for i, (kind, text) in enumerate(items)]
            self._enforce_insight_caps(step, problem)
            return self._surviving(ids)

    def _add_insight(self, step: int, problem: str, kind: str, text: str, vec: np.ndarray | None,
                     sources: list) -> int | None:
        norm = normalize_text(text)
        tokens = self.count_tokens(text)
        if not norm or tokens > self.limits.l2_entry_max_tokens:
            return None
        existing = self._rows("level = 'insight' AND problem = ? AND kind = ?", (problem, kind))
        duplicate = self._find_duplicate(existing, norm, vec)
        if duplicate is not None:
            self._merge(step, duplicate, text, sources)
            return duplicate["id"]
        return self._insert(step, {
            "level": "insight", "kind": kind, "problem": problem, "text": text, "norm": norm, "tokens": tokens,
            "source_rollouts": json.dumps(sources, ensure_ascii=False),
            "dedup_vec": None if vec is None else vec.tobytes()})

    def _merge(self, step: int, row: sqlite3.Row, text: str, sources: list, problems: list | None = None) -> None:
        """Fold a near-duplicate into `row`: more support, re-confirmed now, sources (and problems) united."""
        united_sources = _unique(json.loads(row["source_rollouts"]) + sources)
        if problems is None:
            support, problem_ids = row["support"] + 1, row["problem_ids"]
        else:
            united = _unique(json.loads(row["problem_ids"]) + problems)
            support, problem_ids = len(united), json.dumps(united, ensure_ascii=False)
        self._conn.execute(
            "UPDATE entries SET support = ?, problem_ids = ?, last_confirmed_step = ?, source_rollouts = ? "
            "WHERE id = ?", (support, problem_ids, step, json.dumps(united_sources, ensure_ascii=False), row["id"]))
        self._log(step, "merge", row["id"], row["level"], {"text": text})
        if row["level"] == "behavior":
            self._behavior_index = None

    def _enforce_insight_caps(self, step: int, problem: str) -> None:
        where = "level = 'insight' AND problem = ? AND kind = ?"
        for kind, cap in (("strategy", self.limits.l2_max_strategies), ("lesson", self.limits.l2_max_lessons)):
            rows = self._rows(where, (problem, kind))
            self._enforce(step, self._prune_order(rows, step), cap, None)
        if self.limits.l2_token_budget is not None:
            rows = self._rows("level = 'insight' AND problem = ?", (problem,))
            self._enforce(step, self._prune_order(rows, step), None, self.limits.l2_token_budget)

    # ------------------------------------------------------------------------------------------ L3 behavior
    def add_behavior(self, step: int, name: str, instruction: str, cue: str, problems: Iterable,
                     source_rollouts: Iterable = ()) -> int | None:
        """Add or merge one abstracted behavior; returns its id (None if the cap pruned it at once)."""
        key = f"{name}: {instruction}"
        problems = _unique(str(p) for p in problems)
        sources = _unique(source_rollouts)
        vectors = self._embed([key, f"{cue} {instruction}"])
        dedup_vec, search_vec = (None, None) if vectors is None else (vectors[0], vectors[1])
        with self._write():
            duplicate = self._find_duplicate(self._rows("level = 'behavior'"), normalize_text(key), dedup_vec)
            if duplicate is not None:
                self._merge(step, duplicate, key, sources, problems)
                entry_id = duplicate["id"]
            else:
                entry_id = self._insert(step, {
                    "level": "behavior", "kind": "behavior", "problem": None, "text": instruction,
                    "norm": normalize_text(key), "name": name, "cue": cue, "support": len(problems),
                    "problem_ids": json.dumps(problems, ensure_ascii=False), "tokens": self.count_tokens(key),
                    "source_rollouts": json.dumps(sources, ensure_ascii=False),
                    "dedup_vec": None if dedup_vec is None else dedup_vec.tobytes(),
                    "search_vec": None if search_vec is None else search_vec.tobytes()})
            rows = self._prune_order(self._rows("level = 'behavior'"), step)
            self._enforce(step, rows, self.limits.l3_max_behaviors, self.limits.l3_token_budget)
            return self._surviving([entry_id])[0]

    # ------------------------------------------------------------------------------------------ counters
    def record_usage(self, step: int, entry_ids: Iterable[int]) -> int:
        """uses += 1 for each distinct id (call once per step for "once per step"). Returns how many exist."""
        return self._bump(step, entry_ids, "uses = uses + 1", (), "use", None)

    def credit(self, entry_ids: Iterable[int], delta: float, step: int | None = None) -> int:
        """helpful += delta for each distinct id; ids pruned meanwhile are skipped. Returns how many exist."""
        return self._bump(step, entry_ids, "helpful = helpful + ?", (float(delta),), "credit", {"delta": delta})

    def _bump(self, step: int | None, entry_ids: Iterable[int], assignment: str, params: tuple, action: str,
              detail: dict | None) -> int:
        updated = 0
        with self._write():
            for entry_id in _unique(int(i) for i in entry_ids):
                row = self._conn.execute("SELECT level FROM entries WHERE id = ?", (entry_id,)).fetchone()
                if row is None:
                    continue
                self._conn.execute(f"UPDATE entries SET {assignment} WHERE id = ?", (*params, entry_id))
                self._log(step, action, entry_id, row["level"], detail)
                updated += 1
        return updated

    # ------------------------------------------------------------------------------------------ visits
    def last_visit(self, problem: str) -> dict | None:
        """{step, pass_rate, entry_ids, reflected_step} of the problem's last visit, or None."""
        row = self._conn.execute("SELECT * FROM visits WHERE problem = ?", (str(problem),)).fetchone()
        if row is None:
            return None
        return {"step": row["step"], "pass_rate": row["pass_rate"], "entry_ids": json.loads(row["entry_ids"]),
                "reflected_step": row["reflected_step"]}

    def record_visit(self, step: int, problem: str, pass_rate: float, entry_ids: Iterable[int]) -> None:
        """Remember this visit (replacing the previous one); the reflection step is kept."""
        with self._write():
            self._conn.execute(
                "INSERT INTO visits (problem, step, pass_rate, entry_ids) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (problem) DO UPDATE SET step = excluded.step, pass_rate = excluded.pass_rate, "
                "entry_ids = excluded.entry_ids",
                (str(problem), step, float(pass_rate), json.dumps(_unique(int(i) for i in entry_ids))))

    def mark_reflected(self, step: int, problem: str) -> None:
        with self._write():
            self._conn.execute(
                "INSERT INTO visits (problem, step, pass_rate, reflected_step) VALUES (?, ?, 0, ?) "
                "ON CONFLICT (problem) DO UPDATE SET reflected_step = excluded.reflected_step",
                (str(problem), step, step))

    # ------------------------------------------------------------------------------------------ reading
    def experience(self, problem: str) -> list[dict]:
        """A problem's stored rollouts, passes first, each group newest first."""
        rows = self._rows("level = 'experience' AND problem = ?", (str(problem),),
                          order="kind = 'fail', last_confirmed_step DESC, id DESC")
        return [_entry_dict(r) for r in rows]

    def passes_of_others(self, exclude: str) -> dict[str, list[dict]]:
        """Every other problem's stored passes, oldest id first, by problem id."""
        rows = self._rows("level = 'experience' AND kind = 'pass' AND problem != ?", (str(exclude),),
                          order="problem, id")
        out: dict[str, list[dict]] = {}
        for row in rows:
            out.setdefault(row["problem"], []).append(_entry_dict(row))
        return out

    def insights(self, problem: str, kind: str | None = None) -> list[dict]:
        """A problem's insights, best utility first (ties: higher support, then older id)."""
        where, params = "level = 'insight' AND problem = ?", (str(problem),)
        if kind is not None:
            where, params = where + " AND kind = ?", (*params, kind)
        rows = self._rows(where, params, order="helpful / (uses + 2.0) DESC, support DESC, id")
        return [_entry_dict(r) for r in rows]

    def behaviors(self) -> list[dict]:
        """All behaviors, highest support first (ties: higher utility, then older id)."""
        rows = self._rows("level = 'behavior'", order="support DESC, helpful / (uses + 2.0) DESC, id")
        return [_entry_dict(r) for r in rows]

    def get(self, ids: Iterable[int]) -> list[dict]:
        """Entries by id, in the order asked; ids that no longer exist are skipped."""
        ids = _unique(int(i) for i in ids)
        if not ids:
            return []
        rows = self._rows(f"id IN ({', '.join('?' * len(ids))})", tuple(ids))
        by_id = {r["id"]: _entry_dict(r) for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    def stats(self) -> dict[str, dict[str, int]]:
        """Per level: number of entries and their total tokens."""
        rows = self._conn.execute(
            "SELECT level, COUNT(*) AS n, COALESCE(SUM(tokens), 0) AS t FROM entries GROUP BY level").fetchall()
        found = {r["level"]: {"count": r["n"], "tokens": r["t"]} for r in rows}
        return {level: found.get(level, {"count": 0, "tokens": 0}) for level in LEVELS}

    def entries(self, level: str | None = None, problem: str | None = None) -> Iterator[dict]:
        """Entries as JSON-ready dicts (for `pmd memory export`), read as one consistent snapshot."""
        clauses, params = [], []
        if level is not None:
            clauses.append("level = ?")
            params.append(level)
        if problem is not None:
            clauses.append("problem = ?")
            params.append(str(problem))
        where = " AND ".join(clauses) or "1"
        with self._read():
            rows = self._rows(where, tuple(params), order="id")
        for row in rows:
            yield _entry_dict(row)

    def events(self, entry_id: int | None = None) -> list[dict]:
        """The event log (all of it, or one entry's history), oldest first."""
        sql, params = "SELECT * FROM events", ()
        if entry_id is not None:
            sql, params = sql + " WHERE entry_id = ?", (entry_id,)
        rows = self._conn.execute(sql + " ORDER BY id", params).fetchall()
        return [{**dict(r), "detail": json.loads(r["detail"]) if r["detail"] else None} for r in rows]

    def insight_vectors(self, limit: int | None = None) -> tuple[list[dict], np.ndarray | None]:
        """Insights that have an embedding (most supported first, at most `limit`) and their unit vectors."""
        sql = ("SELECT * FROM entries WHERE level = 'insight' AND dedup_vec IS NOT NULL "
               "ORDER BY support DESC, last_confirmed_step DESC, id")
        rows = self._conn.execute(sql + (" LIMIT ?" if limit else ""), (limit,) if limit else ()).fetchall()
        if not rows:
            return [], None
        matrix = np.frombuffer(b"".join(r["dedup_vec"] for r in rows), dtype=np.float32).reshape(len(rows), -1)
        return [_entry_dict(r) for r in rows], matrix

    # ------------------------------------------------------------------------------------------ retrieval
    def _data_version(self) -> int:
        return self._conn.execute("PRAGMA data_version").fetchone()[0]

    def _index(self) -> _BehaviorIndex:
        """The cached search matrix; rebuilt after our own behavior changes or any other writer's commit."""
        index = self._behavior_index
        if index is None or index.data_version != self._data_version():
            # Version first: a commit landing while we read then only causes one extra rebuild, never a stale cache.
            version = self._data_version()
            with self._read():
                rows = self._conn.execute("SELECT id, support, search_vec FROM entries WHERE level = 'behavior' "
                                          "AND search_vec IS NOT NULL ORDER BY id").fetchall()
            ids = np.array([r["id"] for r in rows], dtype=np.int64)
            support = np.array([r["support"] for r in rows], dtype=np.int64)
            # One join + one frombuffer: far faster than stacking 100k small arrays.
            matrix = (np.frombuffer(b"".join(r["search_vec"] for r in rows), dtype=np.float32).reshape(len(rows), -1)
                      if rows else np.zeros((0, 0), dtype=np.float32))
            self._behavior_index = _BehaviorIndex(ids, support, matrix, version)
        return self._behavior_index

    def search_behaviors(self, query_vec: Sequence[float] | None, k: int = 4, min_sim: float = 0.3) -> list[dict]:
        """The k behaviors most similar to the query (cosine >= min_sim), best first, ties to higher support.

        Each result is an entry dict plus `score`. Without a query or without stored embeddings, the k
        highest-support behaviors are returned with score None.
        """
        if k <= 0:
            return []
        index = self._index()
        if query_vec is None or len(index.ids) == 0:
            return [{**e, "score": None} for e in self.behaviors()[:k]]
        query = _unit_rows([query_vec])[0]
        if query.shape[0] != index.matrix.shape[1]:
            raise ValueError(f"query has {query.shape[0]} dims, behaviors have {index.matrix.shape[1]}")
        # An exact scan: behaviors are capped (l3_max_behaviors), and 20k x 384 still takes ~3 ms.
        # einsum, not BLAS: multithreaded BLAS gemv stalls on a busy CPU; this single-threaded SIMD loop doesn't.
        scores = np.einsum("ij,j->i", index.matrix, query)
        hits = np.flatnonzero(scores >= min_sim)
        if hits.size > k:  # keep everything tied with the k-th best, so support can break the tie exactly
            kth_best = np.partition(scores[hits], hits.size - k)[hits.size - k]
            hits = hits[scores[hits] >= kth_best]
        best = hits[np.lexsort((index.ids[hits], -index.support[hits], -scores[hits]))][:k]
        found = {e["id"]: e for e in self.get(index.ids[best].tolist())}
        return [{**found[i], "score": float(scores[j])} for i, j in zip(index.ids[best].tolist(), best)
                if i in found]

    # ------------------------------------------------------------------------------------------ persistence
    def snapshot(self, path: str | Path) -> Path:
        """Write a consistent copy of the whole database (SQLite backup API), atomically replacing `path`."""
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        partial.unlink(missing_ok=True)
        target = sqlite3.connect(partial)
        try:
            self._conn.backup(target)
        finally:
            target.close()
        os.replace(partial, path)
        return path

    @classmethod
    def restore(cls, snapshot_path: str | Path, live_path: str | Path, limits: MemoryConfig | None = None,
                **kwargs) -> MemoryStore:
        """Replace the live database with a snapshot and open it. Close any store on `live_path` first.

        The copy goes through the backup API rather than a file copy, so a stale -wal file next to the
        live database can never be replayed over the restored content.
        """
        source = sqlite3.connect(f"{Path(snapshot_path).resolve().as_uri()}?mode=ro", uri=True)
        target = sqlite3.connect(live_path)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        return cls(live_path, limits, **kwargs)


def _entry_dict(row: sqlite3.Row) -> dict:
    """A JSON-ready view of one entry: common fields, provenance, counters, then level-specific fields."""
    entry = {
        "level": row["level"], "id": row["id"], "kind": row["kind"], "problem": row["problem"],
        "text": row["text"], "tokens": row["tokens"],
        "source_rollouts": json.loads(row["source_rollouts"]),
        "created_step": row["created_step"], "last_confirmed_step": row["last_confirmed_step"],
        "uses": row["uses"], "helpful": row["helpful"], "utility": utility(row["helpful"], row["uses"]),
    }
    if row["level"] == "experience":
        entry.update(passed=row["kind"] == "pass", reward=row["reward"], feedback=row["feedback"])
    elif row["level"] == "insight":
        entry.update(support=row["support"])
    else:
        entry.update(text=f"{row['name']}: {row['text']}", name=row["name"], instruction=row["text"],
                     cue=row["cue"], support=row["support"], problem_ids=json.loads(row["problem_ids"]))
    return entry
