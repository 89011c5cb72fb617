"""Artifacts: built (and signed) modules in the store, with their metadata.

A module's bytes live in the blob store under their sha256; the artifact id is
the first 12 hex digits of that sha256, so the same bytes always get the same
id. A rejected artifact (failed validation) is kept for inspection but can
never be offered to a rollout.

Every validation and preflight is kept as a record with its options. The
artifact's status follows only its own validation (the one the build or the
signing ran, or a `kpipe validate` with those same options); a trial with other
options (another certificate, extra symbols, --strict, another kernel) is
recorded and never changes it. Its preflight follows the last run of the
default options (no --sig-enforce, no --append); without one, the last passing
run, else the last run.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
from collections.abc import Iterable
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
CREATE INDEX IF NOT EXISTS artifacts_kernel ON artifacts(kernel);
CREATE TABLE IF NOT EXISTS artifact_validations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    artifact_id TEXT NOT NULL,
    kernel TEXT NOT NULL,
    options TEXT NOT NULL,
    own INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    report TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS artifact_validations_by_id ON artifact_validations(artifact_id, seq);
CREATE TABLE IF NOT EXISTS artifact_preflights (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    artifact_id TEXT NOT NULL,
    options TEXT NOT NULL,
    status TEXT NOT NULL,
    result TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS artifact_preflights_by_id ON artifact_preflights(artifact_id, seq)
"""

# The preflight options whose last run is the artifact's preflight (a plain `kpipe preflight ID`).
DEFAULT_PREFLIGHT_OPTIONS: dict[str, Any] = {"sig_enforce": False, "append": ""}

class ArtifactStatus(enum.StrEnum):
    """An artifact's status (stored in artifacts.status: the values never change)."""

    BUILT = "built"  # produced, not yet validated
    VALID = "valid"  # passed validation
    REJECTED = "rejected"  # failed it


class PreflightOutcome(enum.StrEnum):
    """A preflight's outcome (stored in artifact_preflights.status and the artifact's preflight)."""

    PASSED = "passed"
    FAILED = "failed"


STATUSES = tuple(ArtifactStatus)


@dataclass
class Artifact:
    id: str
    sha256: str
    module_name: str
    filename: str
    kernel: str
    status: ArtifactStatus
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
        """The module file in the blob store (read-only), its bytes checked against sha256
        (kpipe.store.StoreCorrupt when they changed)."""
        return store.verified_path(self.sha256)

    @property
    def deployable(self) -> bool:
        return self.status == ArtifactStatus.VALID

    @property
    def preflight_passed(self) -> bool:
        return self.preflight.get("status") == PreflightOutcome.PASSED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _row_to_artifact(row: sqlite3.Row) -> Artifact:
    d = dict(row)
    for key in ("validation", "preflight", "meta"):
        d[key] = json.loads(d[key] or "{}")
    d["signed"] = bool(d["signed"])
    d["status"] = ArtifactStatus(d["status"])
    return Artifact(**d)


def add_artifact(store: Store, module: Path, *, kernel: str, filename: str | None = None,
                 status: ArtifactStatus | str = ArtifactStatus.BUILT, **fields: Any) -> Artifact:
    """Store a module file and its metadata; return the artifact (same bytes -> same id, updated)."""
    store.ensure_schema(SCHEMA)
    status = ArtifactStatus(status)  # ValueError for a status that is not one
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
    if row is None:
        return None
    art = _row_to_artifact(row)
    # A cache hit answers with these bytes: a changed blob must fail the build, not be reused.
    art.path(store)
    return art


def update_artifact(store: Store, artifact_id: str, **fields: Any) -> Artifact:
    """Update metadata columns (status, validation, preflight, meta...)."""
    store.ensure_schema(SCHEMA)
    if "status" in fields:
        fields["status"] = ArtifactStatus(fields["status"])  # ValueError for a status that is not one
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


def check_blobs(store: Store, artifacts: Iterable[Artifact]) -> None:
    """Refuse (StoreCorrupt, exit 1; NotFoundError, exit 5) when the stored bytes of any of these
    artifacts are missing or no longer hash to their sha256."""
    for a in artifacts:
        store.verified_path(a.sha256)


def _canon(options: dict[str, Any]) -> str:
    return json.dumps(options, sort_keys=True, separators=(",", ":"))


def record_validation(store: Store, artifact_id: str, *, kernel: str, options: dict[str, Any], own: bool,
                      ok: bool, report: dict[str, Any]) -> None:
    """Keep one validation with its options; the artifact's own validation also sets its status."""
    store.ensure_schema(SCHEMA)
    report = {**report, "options": options, "own": own}
    with store.write() as c:
        c.execute("INSERT INTO artifact_validations (artifact_id, kernel, options, own, ok, report, at) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?)",
                  (artifact_id, kernel, _canon(options), int(own), int(ok), json.dumps(report, sort_keys=True),
                   time.time()))
        if own:
            c.execute("UPDATE artifacts SET validation = ?, status = ? WHERE id = ?",
                      (json.dumps(report, sort_keys=True), "valid" if ok else "rejected", artifact_id))


def validation_records(store: Store, artifact_id: str) -> list[dict[str, Any]]:
    """Every validation of an artifact, oldest first: {kernel, options, own, ok, report, at}."""
    store.ensure_schema(SCHEMA)
    rows = store.query("SELECT * FROM artifact_validations WHERE artifact_id = ? ORDER BY seq", (artifact_id,))
    return [{"kernel": r["kernel"], "options": json.loads(r["options"]), "own": bool(r["own"]), "ok": bool(r["ok"]),
             "report": json.loads(r["report"]), "at": r["at"]} for r in rows]


def record_preflight(store: Store, artifact_id: str, options: dict[str, Any], result: dict[str, Any]) -> None:
    """Keep one preflight with its options, then set the artifact's preflight: the last run of the default
    options; without one, the last passing run, else the last run (a failed trial never hides a pass)."""
    store.ensure_schema(SCHEMA)
    result = {**result, "options": options}
    with store.write() as c:
        earlier = c.execute("SELECT count(*) FROM artifact_preflights WHERE artifact_id = ?", (artifact_id,)).fetchone()
        legacy = c.execute("SELECT preflight FROM artifacts WHERE id = ?", (artifact_id,)).fetchone()
        old = json.loads(legacy[0] or "{}") if legacy is not None else {}
        if not earlier[0] and old.get("status"):
            # a preflight stored before records were kept: keep it as the first record
            old_opts = {**DEFAULT_PREFLIGHT_OPTIONS, "sig_enforce": bool(old.get("sig_enforce", False))}
            c.execute("INSERT INTO artifact_preflights (artifact_id, options, status, result, at) "
                      "VALUES (?, ?, ?, ?, ?)", (artifact_id, _canon(old_opts), str(old["status"]),
                                                 json.dumps({**old, "options": old_opts}, sort_keys=True),
                                                 float(old.get("at") or 0)))
        c.execute("INSERT INTO artifact_preflights (artifact_id, options, status, result, at) VALUES (?, ?, ?, ?, ?)",
                  (artifact_id, _canon(options), str(result.get("status", "")), json.dumps(result, sort_keys=True),
                   time.time()))
        chosen = None
        for where, params in (("options = ?", (_canon(DEFAULT_PREFLIGHT_OPTIONS),)), ("status = 'passed'", ()),
                              ("1", ())):
            chosen = c.execute(f"SELECT result FROM artifact_preflights WHERE artifact_id = ? AND {where} "
                               "ORDER BY seq DESC LIMIT 1", (artifact_id, *params)).fetchone()
            if chosen is not None:
                break
        assert chosen is not None  # the row inserted above matches "1"
        c.execute("UPDATE artifacts SET preflight = ? WHERE id = ?", (chosen[0], artifact_id))


def preflight_records(store: Store, artifact_id: str) -> list[dict[str, Any]]:
    """Every preflight of an artifact, oldest first: {options, status, result, at}."""
    store.ensure_schema(SCHEMA)
    rows = store.query("SELECT * FROM artifact_preflights WHERE artifact_id = ? ORDER BY seq", (artifact_id,))
    return [{"options": json.loads(r["options"]), "status": r["status"], "result": json.loads(r["result"]),
             "at": r["at"]} for r in rows]
