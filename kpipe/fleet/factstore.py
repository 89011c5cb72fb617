"""The state store's record of what hosts reported: the latest facts per host, and the audit trail.

The SQL lives here, not in the CLI: `record_facts` keeps `kpipe fleet facts` results (table
`fleet_facts`), `record_audit` / `audit_history` keep every verify / audit run (table `audits`,
compliance asks for a trail).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kpipe.fleet.facts import HostFacts

if TYPE_CHECKING:  # pragma: no cover
    from kpipe.audit import AuditResult
    from kpipe.store import Store

FACTS_DDL = """
CREATE TABLE IF NOT EXISTS fleet_facts (
  host TEXT PRIMARY KEY,
  gathered_at REAL NOT NULL,
  ok INTEGER NOT NULL,
  facts_json TEXT NOT NULL
);
"""

AUDIT_SCHEMA = """
CREATE TABLE IF NOT EXISTS audits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    generated_at REAL NOT NULL,
    command TEXT NOT NULL,
    host_pattern TEXT NOT NULL DEFAULT '',
    compliant INTEGER NOT NULL,
    hosts INTEGER NOT NULL,
    compliant_hosts INTEGER NOT NULL,
    result_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audits_time ON audits(generated_at)
"""


def record_facts(store: Store, results: Mapping[str, Any], *, now: float | None = None) -> None:
    """Keep the latest facts (or the failure) per host: one row per host, replaced on each read."""
    store.ensure_schema(FACTS_DDL)
    at = time.time() if now is None else now
    with store.write() as c:
        for name, r in results.items():
            ok = isinstance(r, HostFacts)
            data = r.to_dict() if ok else {"error": str(r), "kind": getattr(r, "kind", "error")}
            c.execute("INSERT INTO fleet_facts(host, gathered_at, ok, facts_json) VALUES (?, ?, ?, ?) "
                      "ON CONFLICT(host) DO UPDATE SET gathered_at=excluded.gathered_at, ok=excluded.ok, "
                      "facts_json=excluded.facts_json", (name, at, int(ok), json.dumps(data)))


def latest_facts(store: Store) -> dict[str, dict[str, Any]]:
    """host -> {"gathered_at", "ok", "facts"} as last recorded (facts: HostFacts.to_dict() or the error)."""
    store.ensure_schema(FACTS_DDL)
    rows = store.query("SELECT host, gathered_at, ok, facts_json FROM fleet_facts ORDER BY host")
    return {r["host"]: {"gathered_at": r["gathered_at"], "ok": bool(r["ok"]), "facts": json.loads(r["facts_json"])}
            for r in rows}


def record_audit(store: Store, result: AuditResult, *, command: str = "audit", limit: str | None = None) -> int:
    """Keep one audit's full result in the store (compliance asks for a trail); return its id."""
    store.ensure_schema(AUDIT_SCHEMA)
    doc = result.to_dict()
    with store.write() as c:
        cur = c.execute(
            "INSERT INTO audits (generated_at, command, host_pattern, compliant, hosts, compliant_hosts, result_json)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (result.generated_at, command, limit or "", int(result.compliant), len(result.hosts),
             doc["summary"]["compliant_hosts"], json.dumps(doc, ensure_ascii=False)),
        )
        return int(cur.lastrowid or 0)


def audit_history(store: Store, limit: int = 20) -> list[dict[str, Any]]:
    """The most recent audits, newest first: id, time, command, pattern, counts (no full result)."""
    store.ensure_schema(AUDIT_SCHEMA)
    rows = store.query(
        "SELECT id, generated_at, command, host_pattern, compliant, hosts, compliant_hosts FROM audits"
        " ORDER BY generated_at DESC, id DESC LIMIT ?", (limit,))
    return [dict(r) for r in rows]
