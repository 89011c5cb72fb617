"""kpipe's record of builds: the builds table (keyed by inputs digest + host) and toolchain versions per host."""

from __future__ import annotations

import json
import time
from typing import Any

from kpipe.artifacts import Artifact, find_by_inputs
from kpipe.builder.spec import BuildSpec
from kpipe.store import Store
from kpipe.workspace import BuildHost, Workspace

SCHEMA = """
CREATE TABLE IF NOT EXISTS builds (
    inputs_digest TEXT NOT NULL,
    host TEXT NOT NULL,
    recipe TEXT NOT NULL DEFAULT '',
    kernel TEXT NOT NULL DEFAULT '',
    arch TEXT NOT NULL DEFAULT '',
    builder TEXT NOT NULL DEFAULT '',
    builder_version TEXT NOT NULL DEFAULT '',
    remote_dir TEXT NOT NULL DEFAULT '',
    pid INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    category TEXT NOT NULL DEFAULT '',
    lines TEXT NOT NULL DEFAULT '[]',
    hint TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL DEFAULT '',
    artifact_id TEXT NOT NULL DEFAULT '',
    log_sha256 TEXT NOT NULL DEFAULT '',
    started_at REAL NOT NULL DEFAULT 0,
    finished_at REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (inputs_digest, host)
);
CREATE TABLE IF NOT EXISTS build_tools (
    host TEXT NOT NULL,
    builder TEXT NOT NULL,
    version TEXT NOT NULL,
    workdir TEXT NOT NULL,
    probed_at REAL NOT NULL,
    PRIMARY KEY (host, builder)
)
"""


def ensure_schema(store: Store) -> None:
    """Create the builds tables (idempotent)."""
    store.ensure_schema(SCHEMA)


def cached_tool_version(store: Store, host: str, builder: str) -> str | None:
    """The builder version last probed on host, or None."""
    ensure_schema(store)
    row = store.query_one("SELECT version FROM build_tools WHERE host = ? AND builder = ?", (host, builder))
    return row["version"] if row else None


def any_tool_version(store: Store, hosts: list[str]) -> bool:
    """True when a builder version was probed on any of these hosts (a cache hit may then need no host)."""
    ensure_schema(store)
    marks = ", ".join("?" * len(hosts))
    return bool(hosts) and store.query_one(f"SELECT 1 FROM build_tools WHERE host IN ({marks}) LIMIT 1",  # noqa: S608
                                           tuple(hosts)) is not None


def save_tool_version(store: Store, host: str, builder: str, version: str, workdir: str) -> None:
    """Remember the builder version and absolute work folder probed on host."""
    with store.write() as c:
        c.execute("INSERT INTO build_tools (host, builder, version, workdir, probed_at) VALUES (?, ?, ?, ?, ?) "
                  "ON CONFLICT(host, builder) DO UPDATE SET version = excluded.version, workdir = excluded.workdir, "
                  "probed_at = excluded.probed_at", (host, builder, version, workdir, time.time()))


def build_record(store: Store, inputs_digest: str, host: str) -> dict[str, Any] | None:
    """The builds row for (inputs digest, host), or None."""
    ensure_schema(store)
    row = store.query_one("SELECT * FROM builds WHERE inputs_digest = ? AND host = ?", (inputs_digest, host))
    if row is None:
        return None
    d = dict(row)
    d["lines"] = json.loads(d["lines"] or "[]")
    return d


def list_builds(store: Store, *, status: str | None = None) -> list[dict[str, Any]]:
    """Recorded builds, newest first."""
    ensure_schema(store)
    sql = "SELECT * FROM builds" + (" WHERE status = ?" if status else "") + " ORDER BY started_at DESC"
    rows = [dict(r) for r in store.query(sql, (status,) if status else ())]
    for r in rows:
        r["lines"] = json.loads(r["lines"] or "[]")
    return rows


def record(store: Store, inputs_digest: str, host: str, **fields: Any) -> None:
    """Insert or update the builds row of (inputs digest, host) with fields."""
    if "lines" in fields:
        fields["lines"] = json.dumps(list(fields["lines"]))
    cols = ["inputs_digest", "host", *fields]
    marks = ", ".join("?" for _ in cols)
    updates = ", ".join(f"{k} = excluded.{k}" for k in fields)
    with store.write() as c:
        c.execute(f"INSERT INTO builds ({', '.join(cols)}) VALUES ({marks}) "
                  f"ON CONFLICT(inputs_digest, host) DO UPDATE SET {updates}",
                  (inputs_digest, host, *fields.values()))


def find_cached(ws: Workspace, spec: BuildSpec, hosts: list[BuildHost]) -> tuple[Artifact, BuildHost] | None:
    """An artifact of these inputs, computed with each candidate host's cached builder version (no host contact)."""
    store = ws.store
    for h in hosts:
        version = cached_tool_version(store, h.name, spec.builder)
        if version is None:
            continue
        art = find_by_inputs(store, spec.inputs_digest(version))
        if art is not None:
            return art, h
    return None
