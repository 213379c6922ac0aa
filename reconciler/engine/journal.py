"""The journal: an SQLite file (WAL) in the state directory that survives a crash.

It records every run (revision, plan, start, end, result), every step (its
intent written before it runs, its before-state for rollback, its outcome and
health results), the inventory of what the reconciler created or adopted, and
the revisions that failed (not retried until something changes).

Who writes it: the applier, before and after each step. Who reads it:
`history` and `status`, the planner's Inventory, and crash recovery, which
finds a run still marked `running`. Nothing secret is ever written here: a
plan carries only the names of the variables that hold secrets (and stand-ins
for live values, see planning.plan), and error texts are scrubbed of every
secret the process holds (`reconciler.redact`).

A journal that cannot be used (its folder is a file, it is not an SQLite
database, or not a journal) is a StateError naming the file and what to do;
it is never deleted or replaced.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler import redact
from reconciler.engine.lock import ensure_state_dir
from reconciler.errors import StateError, TemporaryError
from reconciler.planning.inventory import Inventory

__all__ = ["Journal", "RunRecord", "RunResult", "StepOutcome", "StepRecord"]

# SQLite's primary result codes (sqlite3.h) that say something other than "this file is damaged".
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN = 10, 13, 14

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    revision TEXT,
    plan TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    result TEXT NOT NULL,
    message TEXT,
    resumed_from INTEGER
);
CREATE TABLE IF NOT EXISTS steps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    seq INTEGER NOT NULL,
    phase TEXT NOT NULL,
    address TEXT NOT NULL,
    action TEXT NOT NULL,
    intent TEXT NOT NULL,
    before TEXT,
    started REAL NOT NULL,
    ended REAL,
    outcome TEXT NOT NULL,
    error TEXT,
    health TEXT
);
CREATE INDEX IF NOT EXISTS steps_by_run ON steps(run_id, seq);
CREATE TABLE IF NOT EXISTS inventory (
    address TEXT PRIMARY KEY,
    resource TEXT NOT NULL,
    backend TEXT NOT NULL,
    spec_hash TEXT,
    protected INTEGER NOT NULL DEFAULT 0,
    vmid INTEGER,
    run_id INTEGER,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS failed_revisions (
    revision TEXT PRIMARY KEY,
    run_id INTEGER NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS provision_steps (
    address TEXT NOT NULL,
    step TEXT NOT NULL,
    hash TEXT NOT NULL,
    outcome TEXT NOT NULL,
    exit_code INTEGER,
    tail TEXT,
    run_id INTEGER,
    at REAL NOT NULL,
    PRIMARY KEY (address, step)
);
"""


class RunResult(enum.StrEnum):
    RUNNING = "running"  # started and not ended: a crash if found by another process
    APPLIED = "applied"  # every step done, every health check passed
    NOTHING = "nothing"  # the plan was empty
    ROLLED_BACK = "rolled-back"  # a step or health check failed; every applied step was undone
    ROLLBACK_FAILED = "rollback-failed"  # undoing did not complete: the lab needs a person
    INTERRUPTED = "interrupted"  # found running after a crash; resumed by a later run


class StepOutcome(enum.StrEnum):
    PENDING = "pending"  # intent written; the step may or may not have happened
    OK = "ok"
    FAILED = "failed"
    UNDONE = "undone"  # rolled back


@dataclass(frozen=True)
class RunRecord:
    id: int
    revision: str | None
    started: float
    ended: float | None
    result: RunResult
    message: str | None
    plan: dict[str, Any]
    resumed_from: int | None


@dataclass(frozen=True)
class StepRecord:
    id: int
    run_id: int
    seq: int
    phase: str
    address: str
    action: str
    intent: dict[str, Any]
    before: dict[str, Any] | None
    outcome: StepOutcome
    error: str | None
    health: list[dict[str, Any]] | None


class _JournalFile:
    """The journal's SQLite file: opened (WAL, synchronous), checked to be a journal, its errors translated,
    one lock and one transaction at a time. `Journal` adds what is recorded in it."""

    def __init__(self, path: Path) -> None:
        """Open (or make) the journal at `path`. StateError, naming the file and what to do, when it cannot be
        used: its folder is a file, it is not an SQLite database, or not a journal. It is never replaced."""
        ensure_state_dir(path.parent)
        self.path = path
        self._lock = threading.RLock()
        with self._sqlite_errors():
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        try:
            with self._sqlite_errors():
                self._check_tables()  # before anything is written: another program's database stays as it was
                self._db.row_factory = sqlite3.Row
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")  # a step's intent must be on disk before the step runs
                self._db.executescript(SCHEMA)
        except BaseException:
            self._db.close()
            raise

    def _check_tables(self) -> None:
        """A file that is not a journal (another program's database, a damaged one) is refused, not written into.

        A new file has no tables; a journal has `runs`, and each of its tables has at least the columns of SCHEMA.
        """
        present = _table_names(self._db)
        if not present:
            return
        if "runs" not in present:
            raise self._broken(f"it holds tables {', '.join(sorted(present))} and no runs")
        reference = sqlite3.connect(":memory:")
        try:
            reference.executescript(SCHEMA)
            for table in sorted(_table_names(reference) & present):
                wanted = {row[1] for row in reference.execute(f"PRAGMA table_info({table})")}
                columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                if not wanted <= columns:
                    raise self._broken(f"its table {table} lacks {', '.join(sorted(wanted - columns))}")
        finally:
            reference.close()

    def _broken(self, why: str) -> StateError:
        return StateError(
            f"{self.path} is not a journal this reconciler can use ({why})",
            hint=f"the reconciler never repairs or replaces it: move it aside (mv {self.path} {self.path}.broken) "
            "to start an empty journal, which forgets the history and the inventory of what the reconciler "
            f"created and protects; `sqlite3 {self.path} .recover` may rescue what it holds",
        )

    @contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        """SQLite's errors as the project's, by error code: busy is temporary, anything else needs a person."""
        try:
            yield
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
                raise TemporaryError(
                    f"the journal {self.path} is busy", hint="another process holds it; try again"
                ) from exc
            if code in (_SQLITE_CANTOPEN, _SQLITE_READONLY, _SQLITE_PERM, _SQLITE_IOERR, _SQLITE_FULL):
                raise StateError(
                    f"the journal {self.path} cannot be opened or written ({exc})",
                    hint="it must be a file this user may read and write, on a disk with room",
                ) from exc
            raise self._broken(str(exc)) from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._sqlite_errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, query: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock, self._sqlite_errors():
            return self._db.execute(query, params).fetchall()


class Journal(_JournalFile):
    """One SQLite database; safe to use from several threads of one process."""

    # ---- runs ---------------------------------------------------------------------------

    def start_run(self, *, revision: str | None, plan: Mapping[str, Any], resumed_from: int | None = None) -> int:
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO runs (revision, plan, started, result, resumed_from) VALUES (?, ?, ?, ?, ?)",
                (revision, json.dumps(plan), time.time(), RunResult.RUNNING, resumed_from),
            )
            return int(cursor.lastrowid or 0)

    def end_run(self, run_id: int, result: RunResult, message: str | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET ended = ?, result = ?, message = ? WHERE id = ?",
                (time.time(), result, redact.scrub(message) if message else message, run_id),
            )

    def unfinished_runs(self) -> list[RunRecord]:
        rows = self._rows("SELECT * FROM runs WHERE result = ? ORDER BY id", (RunResult.RUNNING,))
        return [self._run(row) for row in rows]

    def runs(self, limit: int = 20) -> list[RunRecord]:
        rows = self._rows("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (limit,))
        return [self._run(row) for row in rows]

    def run(self, run_id: int) -> RunRecord | None:
        rows = self._rows("SELECT * FROM runs WHERE id = ?", (run_id,))
        return self._run(rows[0]) if rows else None

    def last_run(self, *, applied: bool = False) -> RunRecord | None:
        query = (
            "SELECT * FROM runs WHERE result = ? ORDER BY id DESC LIMIT 1"
            if applied
            else "SELECT * FROM runs ORDER BY id DESC LIMIT 1"
        )
        rows = self._rows(query, (RunResult.APPLIED,) if applied else ())
        return self._run(rows[0]) if rows else None

    @staticmethod
    def _run(row: sqlite3.Row) -> RunRecord:
        return RunRecord(
            row["id"],
            row["revision"],
            row["started"],
            row["ended"],
            RunResult(row["result"]),
            row["message"],
            json.loads(row["plan"]),
            row["resumed_from"],
        )

    # ---- steps -------------------------------------------------------------------------------

    def begin_step(
        self,
        run_id: int,
        *,
        seq: int,
        phase: str,
        address: str,
        action: str,
        intent: Mapping[str, Any],
        before: Mapping[str, Any] | None,
    ) -> int:
        """Write the intent (and the state to restore) before the step touches anything."""
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO steps (run_id, seq, phase, address, action, intent, before, started, outcome)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    seq,
                    phase,
                    address,
                    action,
                    json.dumps(intent),
                    json.dumps(before) if before is not None else None,
                    time.time(),
                    StepOutcome.PENDING,
                ),
            )
            return int(cursor.lastrowid or 0)

    def end_step(
        self,
        step_id: int,
        outcome: StepOutcome,
        *,
        error: str | None = None,
        health: list[dict[str, Any]] | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE steps SET ended = ?, outcome = ?, error = COALESCE(?, error), health = COALESCE(?, health)"
                " WHERE id = ?",
                (
                    time.time(),
                    outcome,
                    redact.scrub(error) if error else error,
                    json.dumps(_scrubbed(health)) if health is not None else None,
                    step_id,
                ),
            )

    def steps(self, run_id: int) -> list[StepRecord]:
        rows = self._rows("SELECT * FROM steps WHERE run_id = ? ORDER BY seq, id", (run_id,))
        return [
            StepRecord(
                row["id"],
                row["run_id"],
                row["seq"],
                row["phase"],
                row["address"],
                row["action"],
                json.loads(row["intent"]),
                json.loads(row["before"]) if row["before"] else None,
                StepOutcome(row["outcome"]),
                row["error"],
                json.loads(row["health"]) if row["health"] else None,
            )
            for row in rows
        ]

    # ---- inventory and failed revisions ----------------------------------------------------------

    def record_owned(
        self,
        address: str,
        *,
        resource: str,
        backend: str,
        spec_hash: str | None,
        protected: bool,
        run_id: int,
        vmid: int | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO inventory (address, resource, backend, spec_hash, protected, vmid, run_id, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(address) DO UPDATE SET resource = excluded.resource,"
                " backend = excluded.backend, spec_hash = excluded.spec_hash, protected = excluded.protected,"
                " vmid = excluded.vmid, run_id = excluded.run_id, updated = excluded.updated",
                (address, resource, backend, spec_hash, int(protected), vmid, run_id, time.time()),
            )

    def record_protection(
        self, address: str, *, resource: str, backend: str, protected: bool, vmid: int | None = None
    ) -> None:
        """Record whether an existing resource is protected, whatever else the run does: protection (and its
        removal) takes effect from the revision that declares it, even one that changes nothing. A resource
        the inventory does not list yet is added only to protect it (its spec hash is left unknown)."""
        with self._tx() as db:
            db.execute(
                "UPDATE inventory SET protected = ?, vmid = COALESCE(?, vmid), updated = ? WHERE address = ?",
                (int(protected), vmid, time.time(), address),
            )
            if protected:
                db.execute(
                    "INSERT OR IGNORE INTO inventory (address, resource, backend, protected, vmid, updated)"
                    " VALUES (?, ?, ?, 1, ?, ?)",
                    (address, resource, backend, vmid, time.time()),
                )

    def forget_under(self, prefix: str) -> list[str]:
        """Forget `prefix` itself and every address below it (`container/llm` -> `container/llm/...`)."""
        prefix = prefix.rstrip("/")
        with self._tx() as db:
            rows = db.execute(
                "SELECT address FROM inventory WHERE address = ? OR substr(address, 1, ?) = ?",
                (prefix, len(prefix) + 1, prefix + "/"),
            ).fetchall()
            addresses = sorted(row["address"] for row in rows)
            db.executemany("DELETE FROM inventory WHERE address = ?", [(a,) for a in addresses])
        return addresses

    def inventory(self) -> Inventory:
        rows = self._rows("SELECT resource, address, spec_hash, protected, vmid FROM inventory")
        return Inventory(
            spec_hashes={row["resource"]: row["spec_hash"] for row in rows if row["spec_hash"]},
            protected=frozenset(row["address"] for row in rows if row["protected"]),
            protected_vmids=frozenset(row["vmid"] for row in rows if row["protected"] and row["vmid"] is not None),
            owned=frozenset(row["address"] for row in rows),
            owned_vmids=frozenset(row["vmid"] for row in rows if row["vmid"] is not None),
        )

    def mark_failed(self, revision: str, *, run_id: int, reason: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO failed_revisions (revision, run_id, reason, at) VALUES (?, ?, ?, ?)",
                (revision, run_id, redact.scrub(reason), time.time()),
            )

    def clear_failed(self, revision: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM failed_revisions WHERE revision = ?", (revision,))

    def failed_revision(self, revision: str) -> str | None:
        rows = self._rows("SELECT reason FROM failed_revisions WHERE revision = ?", (revision,))
        return str(rows[0]["reason"]) if rows else None

    # ---- provisioning steps (issue 11): the last attempt of each step in each guest ----------------

    def record_provision_step(
        self,
        address: str,
        step: str,
        *,
        step_hash: str,
        outcome: str,
        exit_code: int | None = None,
        tail: tuple[str, ...] = (),
        run_id: int | None = None,
    ) -> None:
        """Record a step's last attempt: its hash and outcome (`ok`, `skipped`, `failed`), exit code and last lines."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO provision_steps (address, step, hash, outcome, exit_code, tail, run_id, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (address, step, step_hash, outcome, exit_code, json.dumps(_scrubbed(list(tail))), run_id, time.time()),
            )

    def provision_hashes(self, address: str) -> dict[str, str]:
        """Step -> hash of its last success (ran ok, or skipped by its check) in the guest at `address`."""
        rows = self._rows(
            "SELECT step, hash FROM provision_steps WHERE address = ? AND outcome IN ('ok', 'skipped')", (address,)
        )
        return {row["step"]: row["hash"] for row in rows}

    def forget_provisioning(self, address: str) -> int:
        """Forget what ran in a guest: it was destroyed (or recreated), so every step runs again. How many
        step records were dropped."""
        with self._tx() as db:
            return db.execute("DELETE FROM provision_steps WHERE address = ?", (address,)).rowcount

    def provision_target(self, address: str) -> str | None:
        """The SSH target (`user@host:port`) the last journaled provisioning change at `address` connected to."""
        for row in self._rows("SELECT intent FROM steps WHERE address = ? ORDER BY id DESC", (address,)):
            try:
                after = json.loads(row["intent"]).get("after")
            except (ValueError, AttributeError):
                continue
            if isinstance(after, Mapping) and isinstance(after.get("ssh"), str):
                return str(after["ssh"])
        return None


def _table_names(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} - {"sqlite_sequence"}


def _scrubbed(value: Any) -> Any:
    """`value` with every string scrubbed of secrets (a health check's words may quote what it met)."""
    if isinstance(value, str):
        return redact.scrub(value)
    if isinstance(value, Mapping):
        return {key: _scrubbed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(item) for item in value]
    return value
