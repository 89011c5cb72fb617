"""The embedded state store: SQLite metadata plus content-addressed blobs.

Layout under the store folder (default `.kpipe/` in the workspace):
`state.db` (SQLite, WAL mode) and `blobs/sha256/<2 hex>/<62 hex>`.

Each component declares its own tables as a DDL string and calls
`Store.ensure_schema()`; the DDL uses CREATE ... IF NOT EXISTS so that every
process can run it. WAL plus a busy timeout plus IMMEDIATE write transactions
let several kpipe processes share one store without corrupting it; blobs are
written to a temporary file and renamed into place, so a reader never sees a
half-written blob.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from kpipe.errors import KpipeError, NotFoundError

_BUSY_TIMEOUT_MS = 60_000


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


class Store:
    """One workspace's state: a SQLite database and a blob folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blob_root = self.root / "blobs" / "sha256"
        self.db_path = self.root / "state.db"
        self._local = threading.local()
        self._ensured: set[int] = set()
        self._ensure_lock = threading.Lock()
        try:
            self.blob_root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KpipeError(f"cannot create the store at {self.root}: {e.strerror}") from e

    # -- SQLite -------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection (SQLite connections are not shared across threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def ensure_schema(self, ddl: str) -> None:
        """Create a component's tables if missing (idempotent, once per process per DDL)."""
        key = hash(ddl)
        if key in self._ensured:
            return
        with self._ensure_lock:
            if key in self._ensured:
                return
            with self.write() as c:
                for stmt in ddl.split(";"):
                    if stmt.strip():
                        c.execute(stmt)
            self._ensured.add(key)

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE): committed on success, rolled back on error."""
        c = self.conn
        for attempt in range(50):
            try:
                c.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as e:  # busy beyond busy_timeout (rare)
                if "locked" not in str(e) or attempt == 49:
                    raise
                time.sleep(0.05)
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        else:
            c.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: tuple | dict = ()) -> sqlite3.Row | None:
        return self.conn.execute(sql, params).fetchone()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- blobs --------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.blob_root / digest[:2] / digest[2:]

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def put_bytes(self, data: bytes) -> str:
        """Store bytes; return their sha256 (the blob's address)."""
        digest = hashlib.sha256(data).hexdigest()
        if not self.has_blob(digest):
            self._atomic_write(digest, lambda f: f.write(data))
        return digest

    def put_file(self, path: Path) -> str:
        """Store a file's bytes; return their sha256."""
        digest = sha256_file(path)
        if not self.has_blob(digest):
            def copy(f) -> None:
                with open(path, "rb") as src:
                    while chunk := src.read(1 << 20):
                        f.write(chunk)
            self._atomic_write(digest, copy)
        return digest

    def _atomic_write(self, digest: str, writer) -> None:
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
        path = self.blob_path(digest)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest[:12]} is missing from the store at {self.root}") from None


_stores: dict[Path, Store] = {}


def open_store(root: Path) -> Store:
    """The process-wide Store for a folder (one per path)."""
    root = Path(root).resolve()
    store = _stores.get(root)
    if store is None:
        store = _stores[root] = Store(root)
    return store
