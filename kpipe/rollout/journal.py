"""The rollout journal: rollouts and their write-ahead step records in the state store.

Every step that changes a host is recorded `intended` before it runs and
`done` or `failed` after it, so a kpipe killed at any instant leaves a journal
from which `resume` can tell what may have happened. An `intended` record is
committed before its action runs (record() returns after the commit); the `done` and
`failed` records of read steps (BATCHED_READ_STEPS) may wait in a batch and are committed with the next record that
must be durable (any host's `intended`, an `outcome`), before any read of the
journal, and at most BATCH records later. Losing a batch (SIGKILL) leaves steps
that read "intended, not done": resume re-reads those hosts, every step being
idempotent, so batching never hides a write on a host. One process drives a rollout at a time: the rollout
row holds the owner's pid and process start time; a lock whose process is
gone (or whose pid was reused) is stale and may be taken over. One rollout
drives a host at a time: the driver also holds a lock per host of its plan
(host_locks), so two rollouts never load, verify or roll back on the same
host at once (livepatches on a host interact: transitions, replace mode).
"""

from __future__ import annotations

import builtins
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from kpipe.errors import ConfigError, Locked, NotFoundError
from kpipe.rollout.states import HostState, Phase, RolloutState
from kpipe.store import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    state TEXT NOT NULL,
    target TEXT NOT NULL DEFAULT '',
    plan_json TEXT NOT NULL,
    options_json TEXT NOT NULL,
    detail_json TEXT NOT NULL DEFAULT '{}',
    abort_requested INTEGER NOT NULL DEFAULT 0,
    owner_pid INTEGER,
    owner_start TEXT,
    owner_host TEXT
);
CREATE TABLE IF NOT EXISTS journal (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    seq INTEGER NOT NULL,
    host TEXT NOT NULL,
    wave INTEGER NOT NULL,
    step TEXT NOT NULL,
    phase TEXT NOT NULL,
    detail_json TEXT NOT NULL DEFAULT '{}',
    ts REAL NOT NULL,
    PRIMARY KEY (rollout_id, seq)
);
CREATE INDEX IF NOT EXISTS journal_host ON journal(rollout_id, host);
CREATE TABLE IF NOT EXISTS host_locks (
    host TEXT PRIMARY KEY,
    module TEXT NOT NULL,
    rollout_id TEXT NOT NULL,
    owner_pid INTEGER NOT NULL,
    owner_start TEXT,
    owner_host TEXT
)
"""

# The enums' members, for code that iterates them; the types live in kpipe.rollout.states.
INTERRUPTED = RolloutState.INTERRUPTED
STATES = tuple(RolloutState)
PHASES = tuple(Phase)


@dataclass(frozen=True)
class Entry:
    """One journal record: a host step's phase, or the host's `outcome`."""

    seq: int
    host: str
    wave: int
    step: str
    phase: Phase
    detail: dict[str, Any]
    ts: float


@dataclass(frozen=True)
class RolloutRecord:
    """A rollout row: its plan, options, state and driver."""

    id: str
    created_at: float
    updated_at: float
    state: RolloutState
    target: str
    plan: dict[str, Any]
    options: dict[str, Any]
    detail: dict[str, Any]
    abort_requested: bool
    owner_pid: int | None
    owner_start: str | None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for --json."""
        return {"id": self.id, "created_at": self.created_at, "updated_at": self.updated_at, "state": self.state,
                "target": self.target, "detail": self.detail, "abort_requested": self.abort_requested,
                "owner_pid": self.owner_pid}


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    # the command name may hold spaces and parentheses: split after the last ')'
    rest = data[data.rfind(")") + 2:].split()
    state = rest[0] if rest else "?"
    if state in ("Z", "X"):  # a zombie is dead for our purpose
        return None
    return rest[19] if len(rest) > 19 else None


def _alive(pid: int | None, start: str | None, owner_host: str | None) -> bool:
    """Whether a lock's holder still runs (a holder on another machine is assumed to)."""
    if not pid:
        return False
    if owner_host not in (None, socket.gethostname()):
        return True
    return _proc_start(pid) == start


def new_rollout_id() -> str:
    """A sortable unique id, e.g. r20261129-070512-3fa9."""
    return time.strftime("r%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


# done/failed records held back at most (see the module docstring)
BATCH = 64
# Steps that only read a host: their done/failed records may wait in the batch. Every other step's outcome
# (stage, marker, load, disable, unload, unstage, persist, retire...) is committed when it is recorded.
BATCHED_READ_STEPS = frozenset({"preflight", "kpatch-cli", "wait", "verify", "retire-verify", "rb-rewait",
                                "rb-reverify", "rb-verify"})


@dataclass
class JournalStats:
    """What writing the step journal cost this process: records, transactions, seconds inside them."""

    records: int = 0
    transactions: int = 0
    seconds: float = 0.0


class Journal:
    """Rollout rows, the per-host step journal, the driver lock and the abort flag."""

    def __init__(self, store: Store, *, batch: bool = True):
        self.store = store
        store.ensure_schema(SCHEMA)
        self.batch = batch  # False: every record in its own transaction
        self.stats = JournalStats()
        self._pending: builtins.list[tuple[str, str, int, str, str, str, float]] = []
        self._plock = threading.Lock()

    # -- rollouts -------------------------------------------------------------
    def create(self, plan: dict[str, Any], options: dict[str, Any], *, target: str = "",
               rollout_id: str | None = None) -> str:
        """Store a new planned rollout; return its id."""
        rid = rollout_id or new_rollout_id()
        now = time.time()
        with self.store.write() as c:
            c.execute("INSERT INTO rollouts (id, created_at, updated_at, state, target, plan_json, options_json)"
                      " VALUES (?, ?, ?, 'planned', ?, ?, ?)",
                      (rid, now, now, target, json.dumps(plan, sort_keys=True), json.dumps(options, sort_keys=True)))
        return rid

    def resolve(self, ref: str) -> str:
        """A rollout id from an id, a unique prefix, or `last` (the most recent)."""
        ref = (ref or "").strip()
        if not ref:
            raise ConfigError("no rollout id given", hint="pass an id from `kpipe rollout list`, or `last`")
        if ref == "last":
            row = self.store.query_one("SELECT id FROM rollouts ORDER BY created_at DESC, id DESC LIMIT 1")
            if row is None:
                raise NotFoundError("there is no rollout yet", hint="create one with `kpipe rollout plan`")
            return str(row["id"])
        rows = self.store.query("SELECT id FROM rollouts WHERE id = ? OR id LIKE ? ORDER BY id",
                                (ref, ref.replace("%", "").replace("_", "") + "%"))
        exact = [str(r["id"]) for r in rows if r["id"] == ref]
        if exact:
            return exact[0]
        if not rows:
            raise NotFoundError(f"no rollout {ref!r}", hint="see `kpipe rollout list`")
        if len(rows) > 1:
            raise ConfigError(f"rollout id prefix {ref!r} is ambiguous ({len(rows)} match)", hint="give more of it")
        return str(rows[0]["id"])

    def last_started(self) -> str:
        """The rollout started (or resumed) most recently; a stored plan that never ran is not it."""
        rows = self.store.query("SELECT id, created_at, detail_json FROM rollouts WHERE state != 'planned'")
        if not rows:
            raise NotFoundError("no rollout has been started yet (`last` never names a plan that did not run)",
                                hint="see `kpipe rollout list`; start a plan with `kpipe rollout start --plan ID`")

        def started(r: Any) -> tuple[float, float, str]:
            detail = json.loads(r["detail_json"] or "{}")
            return (float(detail.get("started_at") or r["created_at"]), float(r["created_at"]), str(r["id"]))

        return str(max(rows, key=started)["id"])

    def last_planned(self) -> str:
        """The newest stored plan that has not run (`rollout start --plan last`)."""
        row = self.store.query_one("SELECT id FROM rollouts WHERE state = 'planned' "
                                   "ORDER BY created_at DESC, id DESC LIMIT 1")
        if row is None:
            raise NotFoundError("no stored plan is waiting to be started", hint="make one with `kpipe rollout plan`")
        return str(row["id"])

    def get(self, rollout_id: str) -> RolloutRecord:
        """One rollout by exact id; NotFoundError otherwise."""
        row = self.store.query_one("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
        if row is None:
            raise NotFoundError(f"no rollout {rollout_id!r}", hint="see `kpipe rollout list`")
        return RolloutRecord(id=row["id"], created_at=row["created_at"], updated_at=row["updated_at"],
                             state=RolloutState(row["state"]), target=row["target"], plan=json.loads(row["plan_json"]),
                             options=json.loads(row["options_json"]), detail=json.loads(row["detail_json"]),
                             abort_requested=bool(row["abort_requested"]), owner_pid=row["owner_pid"],
                             owner_start=row["owner_start"])

    def list(self, limit: int = 50) -> list[RolloutRecord]:
        """The newest rollouts first."""
        rows = self.store.query("SELECT id FROM rollouts ORDER BY created_at DESC, id DESC LIMIT ?", (limit,))
        return [self.get(r["id"]) for r in rows]

    def set_state(self, rollout_id: str, state: RolloutState | str, **detail: Any) -> None:
        """Change the rollout's state; merge `detail` keys into its detail document."""
        state = RolloutState(state)  # ValueError for a state that is not one
        self.flush()  # the steps before a state change are on disk before it
        with self.store.write() as c:
            row = c.execute("SELECT detail_json FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
            merged = {**json.loads(row["detail_json"]), **detail} if row else detail
            c.execute("UPDATE rollouts SET state = ?, detail_json = ?, updated_at = ? WHERE id = ?",
                      (state, json.dumps(merged, sort_keys=True, default=str), time.time(), rollout_id))

    def update_detail(self, rollout_id: str, **detail: Any) -> None:
        """Merge `detail` keys into the rollout's detail document."""
        with self.store.write() as c:
            row = c.execute("SELECT detail_json FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
            merged = {**json.loads(row["detail_json"]), **detail}
            c.execute("UPDATE rollouts SET detail_json = ?, updated_at = ? WHERE id = ?",
                      (json.dumps(merged, sort_keys=True, default=str), time.time(), rollout_id))

    # -- abort ----------------------------------------------------------------
    def request_abort(self, rollout_id: str) -> None:
        """Ask the driving process to stop after its in-flight hosts."""
        with self.store.write() as c:
            c.execute("UPDATE rollouts SET abort_requested = 1, updated_at = ? WHERE id = ?", (time.time(), rollout_id))

    def clear_abort(self, rollout_id: str) -> None:
        """Forget an abort request (resume after an abort)."""
        with self.store.write() as c:
            c.execute("UPDATE rollouts SET abort_requested = 0 WHERE id = ?", (rollout_id,))

    def abort_requested(self, rollout_id: str) -> bool:
        row = self.store.query_one("SELECT abort_requested FROM rollouts WHERE id = ?", (rollout_id,))
        return bool(row and row["abort_requested"])

    # -- lock -----------------------------------------------------------------
    def acquire(self, rollout_id: str, pid: int | None = None, hosts: dict[str, str] | None = None) -> None:
        """Become the one process driving this rollout, and the one rollout driving each of `hosts`
        (host -> module); Locked (exit 10) if a live process holds either. All or nothing."""
        pid = pid or os.getpid()
        start = _proc_start(pid)
        me = socket.gethostname()
        with self.store.write() as c:
            row = c.execute("SELECT owner_pid, owner_start, owner_host FROM rollouts WHERE id = ?",
                            (rollout_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no rollout {rollout_id!r}")
            holder, holder_start = row["owner_pid"], row["owner_start"]
            if holder and (holder, holder_start) != (pid, start) and _alive(holder, holder_start, row["owner_host"]):
                raise Locked(f"rollout {rollout_id} is driven by another kpipe (pid {holder} on "
                             f"{row['owner_host']})",
                             hint="wait for it, or `kpipe rollout abort` it; a dead owner's lock is taken over")
            for host, module in sorted((hosts or {}).items()):
                lock = c.execute("SELECT * FROM host_locks WHERE host = ?", (host,)).fetchone()
                if (lock is not None and lock["rollout_id"] != rollout_id
                        and _alive(lock["owner_pid"], lock["owner_start"], lock["owner_host"])):
                    raise Locked(f"{host}: rollout {lock['rollout_id']} is rolling out {lock['module']} there "
                                 f"(pid {lock['owner_pid']} on {lock['owner_host']}); one rollout per host at a time",
                                 hint=f"wait for it (`kpipe rollout status {lock['rollout_id']}`), or leave "
                                      f"{host} out with --limit")
                c.execute("INSERT OR REPLACE INTO host_locks (host, module, rollout_id, owner_pid, owner_start, "
                          "owner_host) VALUES (?, ?, ?, ?, ?, ?)", (host, module, rollout_id, pid, start, me))
            c.execute("UPDATE rollouts SET owner_pid = ?, owner_start = ?, owner_host = ? WHERE id = ?",
                      (pid, start, me, rollout_id))

    def release(self, rollout_id: str, pid: int | None = None) -> None:
        """Drop this process's rollout and host locks."""
        pid = pid or os.getpid()
        with self.store.write() as c:
            c.execute("DELETE FROM host_locks WHERE rollout_id = ? AND owner_pid = ?", (rollout_id, pid))
            c.execute("UPDATE rollouts SET owner_pid = NULL, owner_start = NULL, owner_host = NULL "
                      "WHERE id = ? AND owner_pid = ?", (rollout_id, pid))

    def live_owner(self, rollout_id: str) -> int | None:
        """The pid of the live process driving the rollout, or None (nobody, or a dead kpipe's stale lock)."""
        row = self.store.query_one("SELECT owner_pid, owner_start, owner_host FROM rollouts WHERE id = ?",
                                   (rollout_id,))
        if row is None or not row["owner_pid"]:
            return None
        return row["owner_pid"] if _alive(row["owner_pid"], row["owner_start"], row["owner_host"]) else None

    def abort(self, rollout_id: str) -> RolloutState:
        """`kpipe rollout abort`: ask the live driver to stop after its in-flight hosts; a rollout whose
        driver is dead (killed) is marked aborted at once and its stale locks dropped. Returns the state."""
        self.request_abort(rollout_id)
        if self.live_owner(rollout_id) is None:
            with self.store.write() as c:
                c.execute("DELETE FROM host_locks WHERE rollout_id = ?", (rollout_id,))
                c.execute("UPDATE rollouts SET owner_pid = NULL, owner_start = NULL, owner_host = NULL, "
                          "state = CASE WHEN state IN ('running', 'interrupted') THEN 'aborted' ELSE state END, "
                          "updated_at = ? WHERE id = ?", (time.time(), rollout_id))
        return self.get(rollout_id).state

    # -- the step journal -----------------------------------------------------
    def record(self, rollout_id: str, host: str, wave: int, step: str, phase: Phase | str,
               detail: dict[str, Any] | None = None) -> int:
        """Append one journal entry. An `intended` record or an `outcome` is committed (with the batch
        before it) when this returns, and its seq is returned; a step's `done`/`failed` may be held in
        the batch (then 0 is returned; see the module docstring)."""
        phase = Phase(phase)  # ValueError for a phase that is not one
        row = (rollout_id, host, wave, step, str(phase), json.dumps(detail or {}, sort_keys=True, default=str),
               time.time())
        with self._plock:
            self._pending.append(row)
            # only a read step's done/failed waits: what a write did (a load, an unload...) is a fact about the
            # host that is kept at once, and the gate (host "") and outcomes are decisions, kept at once too
            if (self.batch and host and phase != Phase.INTENDED and step in BATCHED_READ_STEPS
                    and len(self._pending) < BATCH):
                return 0
            return self._flush_locked()

    def flush(self) -> None:
        """Commit the held-back done/failed records (before reading the journal, at the end of a run)."""
        with self._plock:
            if self._pending:
                self._flush_locked()

    def _flush_locked(self) -> int:
        rows, self._pending = self._pending, []
        t0 = time.perf_counter()
        seq = 0
        try:
            with self.store.write() as c:
                for rid, host, wave, step, phase, detail_json, ts in rows:
                    n = c.execute("SELECT COALESCE(MAX(seq), 0) + 1 AS n FROM journal WHERE rollout_id = ?",
                                  (rid,)).fetchone()
                    seq = int(n["n"])
                    c.execute("INSERT INTO journal (rollout_id, seq, host, wave, step, phase, detail_json, ts) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (rid, seq, host, wave, step, phase, detail_json, ts))
        except BaseException:
            self._pending = rows + self._pending  # not written: kept for the next try, order kept
            raise
        self.stats.transactions += 1
        self.stats.records += len(rows)
        self.stats.seconds += time.perf_counter() - t0
        return seq

    def entries(self, rollout_id: str, host: str | None = None) -> builtins.list[Entry]:
        """The journal's entries in seq order (one host's when `host` is given)."""
        self.flush()
        sql = "SELECT * FROM journal WHERE rollout_id = ?"
        params: tuple[str, ...] = (rollout_id,)
        if host is not None:
            sql += " AND host = ?"
            params += (host,)
        rows = self.store.query(sql + " ORDER BY seq", params)
        return [Entry(r["seq"], r["host"], r["wave"], r["step"], Phase(r["phase"]), json.loads(r["detail_json"]),
                      r["ts"]) for r in rows]

    def iter_hosts(self, rollout_id: str) -> Iterator[tuple[str, builtins.list[Entry]]]:
        """(host, its entries) for every host the journal names."""
        yield from self.by_host(rollout_id).items()

    def by_host(self, rollout_id: str) -> dict[str, builtins.list[Entry]]:
        """Every host's entries in seq order, from one read of the journal (the rollout's own records
        are under host ""). A wave or a gate tick over 1,000 hosts reads this once, not once per host."""
        out: dict[str, builtins.list[Entry]] = {}
        for e in self.entries(rollout_id):
            out.setdefault(e.host, []).append(e)
        return out


# -- reading a journal (pure) ---------------------------------------------------
@dataclass(frozen=True)
class HostJournalState:
    """What the journal says about one host."""

    host: str
    outcome: HostState | Literal[""]  # the last recorded outcome, or "" if none
    outcome_detail: dict[str, Any]
    unfinished: tuple[str, ...]  # steps with an `intended` and no `done`/`failed` after it
    last_step: str
    last_phase: str
    marker: str  # the /dev/kmsg marker written before the last load, if any


def host_state(host: str, entries: list[Entry]) -> HostJournalState:
    """Summarise one host's entries (in seq order)."""
    open_steps: dict[str, int] = {}
    outcome: HostState | Literal[""] = ""
    outcome_detail: dict[str, Any] = {}
    marker = ""
    for e in entries:
        if e.step == "outcome":
            outcome, outcome_detail = _host_state(e.detail.get("state", "")), e.detail
            continue
        if e.phase == "intended":
            open_steps[e.step] = e.seq
            if e.step == "load" and e.detail.get("marker"):
                marker = e.detail["marker"]
        else:
            open_steps.pop(e.step, None)
            if e.step == "marker" and e.detail.get("marker"):
                marker = e.detail["marker"]
    last = entries[-1] if entries else None
    return HostJournalState(host, outcome, outcome_detail,
                            tuple(s for s, _ in sorted(open_steps.items(), key=lambda kv: kv[1])),
                            last.step if last else "", last.phase if last else "", marker)


def _host_state(value: str) -> HostState | Literal[""]:
    # an outcome written by a kpipe that knew a state this one does not reads as "no outcome":
    # resume then re-reads the host instead of trusting a word it cannot interpret
    try:
        return HostState(value)
    except ValueError:
        return ""


def mark_interrupted(journal: Journal, rollout_id: str) -> RolloutState:
    """After the driving kpipe was interrupted: a `running` rollout becomes `interrupted` (resume continues
    it); any other state is kept (a `halted` one with an open rollback is what resume must continue).
    Returns the state now."""
    rec = journal.get(rollout_id)
    if rec.state == RolloutState.RUNNING:
        journal.set_state(rollout_id, INTERRUPTED, interrupted_at=time.time())
        return INTERRUPTED
    return rec.state
