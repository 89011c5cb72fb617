"""The embedded state store: SQLite metadata plus content-addressed blobs.

Layout under the store folder (default `.kpipe/` in the workspace):
`state.db` (SQLite, WAL mode) and `blobs/sha256/<2 hex>/<62 hex>`.

Each component declares its own tables as a DDL string and calls
`Store.ensure_schema()`; the DDL runs only when one of the tables or indexes it
names is missing, so read-only commands never take the write lock. What exists
is read once per process (one query of sqlite_master, however many components
ask), and `PRAGMA user_version` holds the store format (SCHEMA_VERSION): a store
from a newer kpipe is refused rather than half understood. WAL plus a
bounded busy wait plus IMMEDIATE write transactions let several kpipe processes
share one store; a writer that holds the lock longer than the wait
(`KPIPE_STORE_WAIT`, default 5 s) makes the command exit 10 naming the holder.
Blobs are written to a temporary file and renamed into place, and every read
checks the bytes against their sha256, so a changed blob never leaves the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import sqlite3
import struct
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from kpipe.errors import ConfigError, KpipeError, Locked, NotFoundError

# SQL parameters: positional (?) or named (:name)
Params = tuple[Any, ...] | dict[str, Any]

WAIT_ENV = "KPIPE_STORE_WAIT"
_DEFAULT_WAIT_S = 5.0
# PRAGMA application_id of a store kpipe created ("kpip"): tells a new store from an emptied one.
_APPLICATION_ID = 0x6B706970
# WAL + synchronous=NORMAL: a commit is not fsynced, the WAL is at checkpoints. A kpipe killed
# (SIGKILL, crash) loses nothing it committed: the OS holds the written pages. A power loss or
# kernel crash of the control machine may lose the last commits (never corrupt the file); the
# rollout journal's write-ahead then reads as "step intended, not done", which resume re-reads.
# FULL fsyncs the WAL at every commit (bench/rollout.py --simulated measures both).
SYNCHRONOUS = "NORMAL"

# PRAGMA user_version of the stores this kpipe writes; raise it with a migration when a table changes shape.
SCHEMA_VERSION = 1
_DDL_NAME = re.compile(r"^\s*CREATE\s+(?:UNIQUE\s+)?(?:TABLE|INDEX|VIEW|TRIGGER)\s+IF\s+NOT\s+EXISTS\s+([\w\"]+)",
                       re.IGNORECASE)
_RESTORE_HINT = ("restore it from a backup, or move it aside to start a new store (the blobs stay; "
                 "their metadata is lost)")


class StoreCorrupt(KpipeError):
    """The store's bytes are not what it recorded: a changed blob, or a damaged state.db (exit 1)."""


class StoreTooNew(KpipeError):
    """The store was written by a newer kpipe whose schema this one does not know (exit 1)."""


def store_wait_seconds() -> float:
    """How long to wait for another process's write lock: KPIPE_STORE_WAIT seconds (default 5)."""
    raw = os.environ.get(WAIT_ENV, "").strip()
    if not raw:
        return _DEFAULT_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (0 <= value <= 86_400):  # also refuses nan and inf
        raise ConfigError(f"{WAIT_ENV}={raw!r} is not a number of seconds",
                          hint=f"e.g. {WAIT_ENV}=30; unset it for the default of {_DEFAULT_WAIT_S:g}")
    return value


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def lock_holders(paths: list[Path]) -> list[str]:
    """`pid N (command)` of each process holding a POSIX write lock on one of paths (from /proc/locks)."""
    ids: set[tuple[int, int, int]] = set()
    for p in paths:
        with contextlib.suppress(OSError):
            st = os.stat(p)
            ids.add((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
    if not ids:
        return []
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids: list[int] = []
    for line in lines:
        fields = [f for f in line.split() if f != "->"]
        # "1: POSIX  ADVISORY  WRITE 8697 fe:00:2163119 120 120"
        if len(fields) < 6 or fields[3] != "WRITE":
            continue
        try:
            pid = int(fields[4])
            maj, mnr, ino = fields[5].split(":")
            key = (int(maj, 16), int(mnr, 16), int(ino))
        except ValueError:
            continue
        if key in ids and pid > 0 and pid not in pids:
            pids.append(pid)
    out = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            cmd = shlex.join(a.decode("utf-8", "replace") for a in argv)
        except OSError:
            cmd = ""
        cmd = "".join(ch if ch.isprintable() else " " for ch in cmd)  # the error stays one line
        if len(cmd) > 120:
            cmd = cmd[:117] + "..."
        out.append(f"pid {pid}" + (f" ({cmd})" if cmd else ""))
    return out


def _header_problem(path: Path) -> str | None:
    """Why state.db cannot be a whole SQLite database (empty, foreign, truncated), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(100)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if size == 0:
        return "is empty (0 bytes)"
    if len(head) < 100 or not head.startswith(b"SQLite format 3\0"):
        return "is not an SQLite database"
    page_size = struct.unpack(">H", head[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    pages, counter, valid_for = (struct.unpack(">I", head[o:o + 4])[0] for o in (28, 24, 92))
    # The in-header page count is trustworthy only when its version stamp matches the change counter.
    if counter == valid_for and pages and size < pages * page_size:
        return f"is truncated ({size} bytes, its header says {pages * page_size})"
    return None


class Store:
    """One workspace's state: a SQLite database and a blob folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blob_root = self.root / "blobs" / "sha256"
        self.db_path = self.root / "state.db"
        self._local = threading.local()
        self._ensured: set[str] = set()
        self._names: set[str] | None = None  # tables/indexes in sqlite_master, read once
        self._user_version = 0
        self._ensure_lock = threading.Lock()
        self._opened = False
        # (digest, dev, inode, size, mtime, ctime) of blobs whose hash was checked
        self._verified: set[tuple[str, int, int, int, int, int]] = set()
        try:
            self.blob_root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KpipeError(f"cannot create the store at {self.root}: {e.strerror}") from e
        _STORES.add(self)

    # -- SQLite -------------------------------------------------------------
    def _create_db(self) -> None:
        """Make a new state.db atomically (built aside, then linked into place), so no process ever
        sees a half-made one, and mark it as kpipe's (application_id)."""
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".state.db.new-")
        os.close(fd)
        try:
            c = sqlite3.connect(tmp, isolation_level=None)
            try:
                c.execute("PRAGMA journal_mode=WAL")
                c.execute(f"PRAGMA application_id={_APPLICATION_ID}")
                c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            finally:
                c.close()
            with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
                os.link(tmp, self.db_path)
        finally:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp + suffix)

    def _open_check(self, conn: sqlite3.Connection) -> None:
        """Refuse a state.db that is damaged, holds nothing of kpipe's, or was written by a newer kpipe."""
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        self._user_version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if app_id == _APPLICATION_ID:
            if self._user_version > SCHEMA_VERSION:
                raise StoreTooNew(f"the store's database {self.db_path} has schema version {self._user_version}; "
                                  f"this kpipe knows up to {SCHEMA_VERSION}",
                                  hint="run the kpipe that wrote it, or a newer one")
            return
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id != 0 or not tables:
            why = "holds no kpipe tables" if app_id == 0 else f"belongs to another program (application_id {app_id})"
            raise StoreCorrupt(f"the store's database {self.db_path} {why}", hint=_RESTORE_HINT)

    def _connect(self) -> sqlite3.Connection:
        wait = store_wait_seconds()
        if not self._opened:
            if not self.db_path.exists():
                self._create_db()
            elif (why := _header_problem(self.db_path)) is not None:
                raise StoreCorrupt(f"the store's database {self.db_path} {why}", hint=_RESTORE_HINT)
        conn = sqlite3.connect(self.db_path, timeout=wait, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout={int(wait * 1000)}")
            if not self._opened:
                self._open_check(conn)
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":  # a store from before WAL
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as e:
            conn.close()
            raise self._translate(e) from None
        except BaseException:
            conn.close()
            raise
        self._opened = True
        return conn

    def _translate(self, e: sqlite3.Error) -> BaseException:
        """A lock held too long -> Locked (exit 10) naming the holder; a damaged file -> StoreCorrupt."""
        text = str(e)
        if isinstance(e, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
            paths = [self.db_path, Path(f"{self.db_path}-wal"), Path(f"{self.db_path}-shm")]
            holders = [h for h in lock_holders(paths) if not h.startswith(f"pid {os.getpid()} ")]
            who = f"held by {', '.join(holders)}" if holders else "held by another process"
            return Locked(f"the store {self.db_path} is locked ({who}); gave up after {store_wait_seconds():g} s",
                          hint=f"wait for it to finish, or set {WAIT_ENV}=SECONDS to wait longer")
        if type(e) is sqlite3.DatabaseError or any(
                w in text for w in ("malformed", "not a database", "corrupt", "disk image")):
            return StoreCorrupt(f"the store's database {self.db_path} is corrupt: {text}", hint=_RESTORE_HINT)
        return e

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection (SQLite connections are not shared across threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def ensure_schema(self, ddl: str) -> None:
        """Create a component's tables and indexes when one is missing (so reading never writes).

        The names in sqlite_master are read once per process; a store whose user_version is behind
        SCHEMA_VERSION is stamped in the same write that creates what it lacks."""
        if ddl in self._ensured:
            return
        with self._ensure_lock:
            if ddl in self._ensured:
                return
            stmts = [s for s in ddl.split(";") if s.strip()]
            names = {m.group(1).strip('"') for s in stmts if (m := _DDL_NAME.match(s))}
            if self._names is None:
                self._names = {r[0] for r in self.query("SELECT name FROM sqlite_master")}
            complete = len(names) == len(stmts)  # every statement is a CREATE ... IF NOT EXISTS: checkable
            if not complete or not names <= self._names or self._user_version < SCHEMA_VERSION:
                with self.write() as c:
                    for stmt in stmts:
                        c.execute(stmt)
                    if self._user_version < SCHEMA_VERSION:
                        c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self._user_version = SCHEMA_VERSION
                self._names |= names
            self._ensured.add(ddl)

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE): committed on success, rolled back on error.
        Waits at most KPIPE_STORE_WAIT seconds for another writer, then raises Locked."""
        c = self.conn
        try:
            c.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise self._translate(e) from None
        try:
            yield c
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                c.execute("ROLLBACK")
            err = self._translate(e)
            if err is e:
                raise
            raise err from None
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                c.execute("ROLLBACK")
            raise
        else:
            try:
                c.execute("COMMIT")
            except sqlite3.Error as e:
                with contextlib.suppress(sqlite3.Error):
                    c.execute("ROLLBACK")
                raise self._translate(e) from None

    def query(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        """All rows of a read."""
        try:
            rows: list[sqlite3.Row] = self.conn.execute(sql, params).fetchall()
            return rows
        except sqlite3.Error as e:
            err = self._translate(e)
            if err is e:
                raise
            raise err from None

    def query_one(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        """The first row of a read, or None."""
        try:
            row: sqlite3.Row | None = self.conn.execute(sql, params).fetchone()
            return row
        except sqlite3.Error as e:
            err = self._translate(e)
            if err is e:
                raise
            raise err from None

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- blobs --------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        """Where a blob lives (unchecked: readers use verified_path or get_bytes)."""
        return self.blob_root / digest[:2] / digest[2:]

    def has_blob(self, digest: str) -> bool:
        """Whether a blob file exists (its bytes unchecked)."""
        return self.blob_path(digest).is_file()

    def _corrupt(self, digest: str, actual: str) -> StoreCorrupt:
        return StoreCorrupt(f"blob {digest[:12]} in the store at {self.root} is corrupt: its bytes hash to "
                            f"{actual[:12]}, not {digest[:12]}",
                            hint="the file was changed after it was stored; rebuild it (`kpipe build --force`) "
                                 "or restore it from a backup")

    def verified_path(self, digest: str) -> Path:
        """The path of a blob whose bytes still hash to digest; StoreCorrupt (exit 1) otherwise.
        Every reader of a blob by path goes through here."""
        path = self.blob_path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest[:12]} is missing from the store at {self.root}",
                                hint="rebuild it with `kpipe build --force`") from None
        # ctime moves on any write, chmod or rename: an unchanged stat means unchanged bytes.
        key = (digest, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key not in self._verified:
            actual = sha256_file(path)
            if actual != digest:
                raise self._corrupt(digest, actual)
            self._verified.add(key)
        return path

    def _blob_intact(self, digest: str) -> bool:
        try:
            self.verified_path(digest)
        except KpipeError:
            return False
        return True

    def put_bytes(self, data: bytes) -> str:
        """Store bytes; return their sha256 (the blob's address). A damaged copy is replaced."""
        digest = hashlib.sha256(data).hexdigest()
        if not self._blob_intact(digest):
            self._atomic_write(digest, lambda f: f.write(data))
        return digest

    def put_file(self, path: Path) -> str:
        """Store a file's bytes; return their sha256. A damaged copy is replaced."""
        digest = sha256_file(path)
        if not self._blob_intact(digest):
            def copy(f: BinaryIO) -> None:
                with open(path, "rb") as src:
                    while chunk := src.read(1 << 20):
                        f.write(chunk)
            self._atomic_write(digest, copy)
        return digest

    def _atomic_write(self, digest: str, writer: Callable[[BinaryIO], object]) -> None:
        dest = self.blob_path(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                writer(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def get_bytes(self, digest: str) -> bytes:
        """A blob's bytes, checked against digest (StoreCorrupt when they differ)."""
        path = self.blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest[:12]} is missing from the store at {self.root}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise self._corrupt(digest, actual)
        return data


_stores: dict[Path, Store] = {}


def open_store(root: Path) -> Store:
    """The process-wide Store for a folder (one per path)."""
    root = Path(root).resolve()
    store = _stores.get(root)
    if store is None:
        store = _stores[root] = Store(root)
    return store


# What shell completion lists, newest first. Completion runs on every TAB: it must never create, migrate or
# wait on a store, so it reads the database file directly, read-only, and gives up at once when it cannot.
_PEEK_SQL = {
    "artifacts": "SELECT id FROM artifacts ORDER BY created_at DESC",
    "rollouts": "SELECT id FROM rollouts WHERE state != 'planned' ORDER BY created_at DESC",
    "plans": "SELECT id FROM rollouts WHERE state = 'planned' ORDER BY created_at DESC",
}


def peek_ids(store_dir: Path, kind: str) -> list[str]:
    """Ids of `kind` (artifacts, rollouts that ran, plans that did not) in the store at store_dir, newest
    first; nothing when there is no store yet or it cannot be read at once (never creates one)."""
    db = Path(store_dir) / "state.db"
    if not db.is_file():
        return []
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=0.5)
    try:
        return [str(r[0]) for r in con.execute(_PEEK_SQL[kind])]
    except sqlite3.Error:  # a store without that table yet, or locked
        return []
    finally:
        con.close()


_STORES: weakref.WeakSet[Store] = weakref.WeakSet()  # every Store of the process (close_all)


def close_all() -> None:
    """Close this thread's connection of every Store still alive (kpipe.cli.app before the process exits:
    the last connection's close checkpoints the WAL into state.db and removes state.db-wal, which the
    interpreter's shutdown would otherwise leave to the garbage collector)."""
    for store in list(_STORES):
        store.close()
