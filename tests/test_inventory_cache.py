"""The inventory selection cache: answers unchanged inventories from the store, never stale ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kpipe.fleet import inventory as inventory_mod
from kpipe.fleet.inventory import select_hosts
from kpipe.workspace import load_workspace


def write(path: Path, text: str, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if mode is not None:
        path.chmod(mode)
    return path


def bump(path: Path) -> None:
    # make sure the mtime moves even on coarse-grained file systems
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def ws(tmp_path: Path):
    write(tmp_path / "kpipe.toml", '[fleet]\ninventories = ["inv/hosts.ini"]\n')
    write(tmp_path / "inv" / "hosts.ini", "[web]\nweb1 ansible_host=10.0.0.1\nweb2 ansible_host=10.0.0.2\n")
    write(tmp_path / "inv" / "group_vars" / "web.yml", "ansible_port: 2022\n")
    return load_workspace(tmp_path)


@pytest.fixture
def parses(monkeypatch) -> list[int]:
    """Counts how often the inventory is really parsed with ansible-core."""
    calls: list[int] = []
    real = inventory_mod.load_inventory

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(inventory_mod, "load_inventory", counting)
    return calls


def test_unchanged_inventory_is_answered_from_the_store(ws, parses):
    first = select_hosts(ws, "web")
    second = select_hosts(ws, "web")
    assert [h.name for h in second] == ["web1", "web2"] and second == first
    assert second[0].port == 2022 and second[0].groups == ("web",)
    assert len(parses) == 1


def test_changed_inventory_file_is_read_again(ws, parses):
    assert [h.name for h in select_hosts(ws, "web")] == ["web1", "web2"]
    inv = ws.root / "inv" / "hosts.ini"
    inv.write_text("[web]\nweb3 ansible_host=10.0.0.3\n")
    bump(inv)
    assert [h.name for h in select_hosts(ws, "web")] == ["web3"]
    assert len(parses) == 2


def test_changed_group_vars_are_read_again(ws, parses):
    assert select_hosts(ws, "web1")[0].port == 2022
    gv = ws.root / "inv" / "group_vars" / "web.yml"
    gv.write_text("ansible_port: 2200\n")
    bump(gv)
    assert select_hosts(ws, "web1")[0].port == 2200


def test_another_pattern_is_its_own_entry(ws):
    assert [h.name for h in select_hosts(ws, "web1")] == ["web1"]
    assert [h.name for h in select_hosts(ws, "web:!web1")] == ["web2"]


def test_dynamic_inventory_scripts_are_never_cached(tmp_path, parses):
    counter = tmp_path / "n"
    counter.write_text("0")
    script = write(tmp_path / "dyn.py", f"""#!/usr/bin/env python3
import json, pathlib, sys
p = pathlib.Path({str(counter)!r}); n = int(p.read_text()) + 1; p.write_text(str(n))
if "--host" in sys.argv: print("{{}}"); sys.exit(0)
print(json.dumps({{"all": {{"hosts": [f"dyn{{n}}"]}}, "_meta": {{"hostvars": {{}}}}}}))
""", mode=0o755)
    write(tmp_path / "kpipe.toml", f'[fleet]\ninventories = ["{script.name}"]\n')
    ws = load_workspace(tmp_path)
    a = select_hosts(ws)
    b = select_hosts(ws)
    assert a[0].name != b[0].name and len(parses) == 2


def test_one_selector_reads_the_inventory_once_for_every_missed_pattern(ws, parses):
    selector = inventory_mod.HostSelector(ws)
    assert [h.name for h in selector.select("web1")] == ["web1"]
    assert [h.name for h in selector.select("web2")] == ["web2"]
    assert [h.name for h in selector.select(None)] == ["web1", "web2"]
    assert len(parses) == 1
    # a later selector (a later command) answers all three from the store
    again = inventory_mod.HostSelector(ws)
    assert [[h.name for h in again.select(p)] for p in ("web1", "web2", None)] == [["web1"], ["web2"], ["web1", "web2"]]
    assert len(parses) == 1


def test_a_selection_that_matches_nothing_is_not_found_and_not_cached(ws, parses):
    from kpipe.errors import NotFoundError

    for _ in range(2):
        with pytest.raises(NotFoundError):
            select_hosts(ws, "db*")
    assert len(parses) == 2
