"""The store's record of what hosts reported (kpipe.fleet.factstore): the SQL the fleet CLI used to hold."""

from __future__ import annotations

import json
from pathlib import Path

from kpipe.errors import TransportError
from kpipe.fleet.facts import parse_facts
from kpipe.fleet.factstore import latest_facts, record_facts
from kpipe.store import Store

DATA = Path(__file__).parent / "test_facts_data"


def test_latest_facts_per_host_replace_older_ones(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    facts = parse_facts("h1", (DATA / "simfleet-openeuler-loaded.txt").read_text())
    down = TransportError("h2: connection refused", host="h2", kind="refused")
    record_facts(store, {"h1": facts, "h2": down}, now=100.0)
    assert latest_facts(store) == {
        "h1": {"gathered_at": 100.0, "ok": True, "facts": json.loads(json.dumps(facts.to_dict()))},
        "h2": {"gathered_at": 100.0, "ok": False, "facts": {"error": "h2: connection refused", "kind": "refused"}},
    }
    record_facts(store, {"h2": facts}, now=200.0)  # h2 answered later: one row per host, the newest
    rows = latest_facts(store)
    assert (rows["h1"]["gathered_at"], rows["h2"]["gathered_at"], rows["h2"]["ok"]) == (100.0, 200.0, True)
    assert len(store.query("SELECT host FROM fleet_facts")) == 2


def test_the_fleet_cli_holds_no_sql() -> None:
    text = (Path(__file__).resolve().parent.parent / "kpipe" / "cli" / "fleet.py").read_text()
    for word in ("CREATE TABLE", "INSERT INTO", "SELECT ", "ensure_schema", ".execute("):
        assert word not in text, word
