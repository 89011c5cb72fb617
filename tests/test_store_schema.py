"""The store's schema is created once and versioned (PRAGMA user_version), not re-checked per component."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from kpipe.store import SCHEMA_VERSION, Store

DDL_A = "CREATE TABLE IF NOT EXISTS a (x INTEGER); CREATE INDEX IF NOT EXISTS a_x ON a (x)"
DDL_B = "CREATE TABLE IF NOT EXISTS b (y TEXT)"
REPO = Path(__file__).resolve().parent.parent


def _traced(store: Store) -> list[str]:
    seen: list[str] = []
    store.conn.set_trace_callback(seen.append)
    return seen


def test_a_new_store_carries_the_schema_version(tmp_path):
    store = Store(tmp_path / "s")
    store.ensure_schema(DDL_A)
    assert store.query_one("PRAGMA user_version")[0] == SCHEMA_VERSION >= 1


def test_a_later_process_runs_no_create_and_reads_the_catalog_once(tmp_path):
    first = Store(tmp_path / "s")
    first.ensure_schema(DDL_A)
    first.ensure_schema(DDL_B)
    first.close()

    again = Store(tmp_path / "s")  # another process: the tables exist, the version is current
    seen = _traced(again)
    again.ensure_schema(DDL_A)
    again.ensure_schema(DDL_B)
    assert not [s for s in seen if "CREATE" in s.upper() or "BEGIN" in s.upper()], seen
    assert sum("sqlite_master" in s for s in seen) == 1, seen


def test_a_store_behind_the_version_is_brought_up_once(tmp_path):
    store = Store(tmp_path / "s")
    store.ensure_schema(DDL_A)
    store.close()
    c = sqlite3.connect(tmp_path / "s" / "state.db")
    c.execute("PRAGMA user_version=0")  # a store from before the version was kept
    c.close()

    again = Store(tmp_path / "s")
    again.ensure_schema(DDL_A)
    assert again.query_one("PRAGMA user_version")[0] == SCHEMA_VERSION
    again.close()
    third = Store(tmp_path / "s")
    seen = _traced(third)
    third.ensure_schema(DDL_A)
    assert not [s for s in seen if "BEGIN" in s.upper()], seen


def test_a_store_from_a_newer_kpipe_is_one_line_exit_1(tmp_path):
    ws = tmp_path
    (ws / "kpipe.toml").write_text('[workspace]\nstore = ".kpipe"\n')
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "kpipe", "artifacts", "list"], cwd=ws, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    db = ws / ".kpipe" / "state.db"
    c = sqlite3.connect(db)
    c.execute(f"PRAGMA user_version={SCHEMA_VERSION + 5}")
    c.close()
    r = subprocess.run([sys.executable, "-m", "kpipe", "artifacts", "list"], cwd=ws, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == (f"kpipe: error: the store's database {db} has schema version {SCHEMA_VERSION + 5}; "
                        f"this kpipe knows up to {SCHEMA_VERSION}"), r.stderr
    assert lines[1].startswith("  hint: ") and "Traceback" not in r.stderr
