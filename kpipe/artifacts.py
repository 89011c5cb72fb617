"""Artifacts: built (and signed) modules in the store, with their metadata.

A module's bytes live in the blob store under their sha256; the artifact id is
the first 12 hex digits of that sha256, so the same bytes always get the same
id. A rejected artifact (failed validation) is kept for inspection but can
never be offered to a rollout.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kpipe.errors import ConfigError, NotFoundError
from kpipe.store import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    id TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    module_name TEXT NOT NULL,
    filename TEXT NOT NULL,
    recipe TEXT NOT NULL DEFAULT '',
    kernel TEXT NOT NULL,
    arch TEXT NOT NULL DEFAULT '',
    builder TEXT NOT NULL DEFAULT '',
    builder_version TEXT NOT NULL DEFAULT '',
    inputs_digest TEXT NOT NULL DEFAULT '',
    build_host TEXT NOT NULL DEFAULT '',
    duration_s REAL NOT NULL DEFAULT 0,
    log_sha256 TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    signed INTEGER NOT NULL DEFAULT 0,
    parent_id TEXT NOT NULL DEFAULT '',
    validation TEXT NOT NULL DEFAULT '{}',
    preflight TEXT NOT NULL DEFAULT '{}',
    meta TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS artifacts_inputs ON artifacts(inputs_digest);
CREATE INDEX IF NOT EXISTS artifacts_kernel ON artifacts(kernel)
"""

# built: produced, not yet validated; valid: passed validation; rejected: failed it.
STATUSES = ("built", "valid", "rejected")


@dataclass
class Artifact:
    id: str
    sha256: str
    module_name: str
    filename: str
    kernel: str
    status: str
    recipe: str = ""
    arch: str = ""
    builder: str = ""
    builder_version: str = ""
    inputs_digest: str = ""
    build_host: str = ""
    duration_s: float = 0.0
    log_sha256: str = ""
    signed: bool = False
    parent_id: str = ""
    validation: dict[str, Any] = field(default_factory=dict)
    preflight: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0

    def path(self, store: Store) -> Path:
        """The module file in the blob store (read-only)."""
        return store.blob_path(self.sha256)

    @property
    def deployable(self) -> bool:
        return self.status == "valid"

    @property
    def preflight_passed(self) -> bool:
        return self.preflight.get("status") == "passed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _row_to_artifact(row) -> Artifact:
    d = dict(row)
    for key in ("validation", "preflight", "meta"):
        d[key] = json.loads(d[key] or "{}")
    d["signed"] = bool(d["signed"])
    return Artifact(**d)


def add_artifact(store: Store, module: Path, *, kernel: str, filename: str | None = None,
                 status: str = "built", **fields: Any) -> Artifact:
    """Store a module file and its metadata; return the artifact (same bytes -> same id, updated)."""
    store.ensure_schema(SCHEMA)
    if status not in STATUSES:
        raise ValueError(f"bad artifact status {status!r}")
    sha = store.put_file(module)
    art = Artifact(id=sha[:12], sha256=sha, module_name=fields.pop("module_name", module.name.split(".ko")[0]),
                   filename=filename or module.name, kernel=kernel, status=status, created_at=time.time(), **fields)
    row = art.to_dict()
    for key in ("validation", "preflight", "meta"):
        row[key] = json.dumps(row[key], sort_keys=True)
    row["signed"] = int(art.signed)
    cols = ", ".join(row)
    marks = ", ".join(f":{k}" for k in row)
    updates = ", ".join(f"{k}=excluded.{k}" for k in row if k not in ("id", "created_at", "preflight"))
    with store.write() as c:
        c.execute(f"INSERT INTO artifacts ({cols}) VALUES ({marks}) ON CONFLICT(id) DO UPDATE SET {updates}", row)
    return get_artifact(store, art.id)


def get_artifact(store: Store, ref: str) -> Artifact:
    """An artifact by id or unique id prefix (at least 4 hex digits)."""
    store.ensure_schema(SCHEMA)
    ref = ref.strip().lower()
    if len(ref) < 4 or any(ch not in "0123456789abcdef" for ch in ref):
        raise ConfigError(f"{ref!r} is not an artifact id", hint="an id is 4-12 hex digits; see `kpipe artifacts list`")
    rows = store.query("SELECT * FROM artifacts WHERE id LIKE ? ORDER BY created_at DESC", (ref[:12] + "%",))
    if not rows:
        raise NotFoundError(f"no artifact {ref!r} in the store", hint="see `kpipe artifacts list`")
    if len(rows) > 1:
        raise ConfigError(f"artifact id prefix {ref!r} is ambiguous ({len(rows)} match)", hint="give more digits")
    return _row_to_artifact(rows[0])


def list_artifacts(store: Store, *, kernel: str | None = None, recipe: str | None = None,
                   status: str | None = None) -> list[Artifact]:
    """Artifacts, newest first, optionally filtered."""
    store.ensure_schema(SCHEMA)
    where, params = [], []
    for col, val in (("kernel", kernel), ("recipe", recipe), ("status", status)):
        if val:
            where.append(f"{col} = ?")
            params.append(val)
    sql = "SELECT * FROM artifacts" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY created_at DESC"
    return [_row_to_artifact(r) for r in store.query(sql, tuple(params))]


def find_by_inputs(store: Store, inputs_digest: str) -> Artifact | None:
    """The newest artifact built from exactly these inputs (the build cache)."""
    store.ensure_schema(SCHEMA)
    row = store.query_one(
        "SELECT * FROM artifacts WHERE inputs_digest = ? AND parent_id = '' ORDER BY created_at DESC LIMIT 1",
        (inputs_digest,))
    return _row_to_artifact(row) if row else None


def update_artifact(store: Store, artifact_id: str, **fields: Any) -> Artifact:
    """Update metadata columns (status, validation, preflight, meta...)."""
    store.ensure_schema(SCHEMA)
    if "status" in fields and fields["status"] not in STATUSES:
        raise ValueError(f"bad artifact status {fields['status']!r}")
    sets, params = [], []
    for k, v in fields.items():
        if k in ("validation", "preflight", "meta"):
            v = json.dumps(v, sort_keys=True)
        if k == "signed":
            v = int(bool(v))
        sets.append(f"{k} = ?")
        params.append(v)
    with store.write() as c:
        c.execute(f"UPDATE artifacts SET {', '.join(sets)} WHERE id = ?", (*params, artifact_id))
    return get_artifact(store, artifact_id)
