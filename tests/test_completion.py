"""Shell completion of values (issue 12, item 6), driven as bash drives it: the real `kpipe` with
`_KPIPE_COMPLETE`, `COMP_WORDS` and `COMP_CWORD` set.

Offered: recipe names, catalog releases, artifact ids, rollout ids (and `last`), lab VM names, audit
formats, inventory groups and hosts for --limit. Completion reads local files only (it never runs a dynamic
inventory, never contacts a host) and without a workspace it offers nothing, silently.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kenv
from kpipe.artifacts import add_artifact
from kpipe.report import FORMATS
from kpipe.rollout.journal import Journal
from kpipe.workspace import open_workspace

pytestmark = pytest.mark.timeout(300)
KPIPE = shutil.which("kpipe") or str(Path(sys.executable).with_name("kpipe"))


def complete(line: str, cwd: Path, instruction: str = "bash_complete", env_extra: dict | None = None) -> list[str]:
    """What bash gets for `line` (a trailing space completes a new word), as the installed script asks."""
    words = shlex.split(line)
    cword = len(words) if line.endswith(" ") else len(words) - 1
    env = {k: v for k, v in os.environ.items() if k not in ("KPIPE_DEBUG", "KPIPE_WORKSPACE")}
    env.update({"_KPIPE_COMPLETE": instruction, "COMP_WORDS": line, "COMP_CWORD": str(cword), **(env_extra or {})})
    # the console script, as bash runs it: `python -m kpipe` would read _PYTHON__M_KPIPE_COMPLETE
    r = subprocess.run([KPIPE], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr
    return [x for x in r.stdout.splitlines() if x]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace with recipes, an inventory, an artifact, a stored plan, a started rollout and a lab state."""
    tmp = tmp_path_factory.mktemp("completion")
    root = tmp / "ws"
    r = subprocess.run([sys.executable, "-m", "kpipe", "init", str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (root / "recipes" / "fix-cve-a.yaml").write_text((root / "recipes" / "cmdline-demo.yaml").read_text())
    (root / "fleet.yml").write_text(
        "hosts:\n  web1: {address: 192.0.2.1}\n  web2: {address: 192.0.2.2}\n  db1: {address: 192.0.2.3}\n"
        "groups:\n  web: {hosts: [web1, web2]}\n  db: {hosts: [db1]}\n")
    w = open_workspace(root)
    ko = tmp / "m.ko"
    ko.write_bytes(os.urandom(2048))
    # the installed headers' release (tests/kenv.py): under KPIPE_REQUIRE_REAL a machine without one fails here
    art = add_artifact(w.store, ko, kernel=kenv.kernel_env().release, status="valid",
                       arch="x86_64", module_name="m")
    j = Journal(w.store)
    plan_id = j.create({"hosts": []}, {}, target="cmdline-demo")
    ran_id = j.create({"hosts": []}, {}, target="cmdline-demo")
    j.set_state(ran_id, "completed")
    (root / ".lab").mkdir(exist_ok=True)
    (root / ".lab" / "state.json").write_text(json.dumps({"vms": [{"name": "lab1"}, {"name": "lab2"}]}))
    return {"root": root, "ws": w, "artifact": art.id, "plan": plan_id, "ran": ran_id}


def test_recipe_names(ws):
    assert complete("kpipe recipe render ", ws["root"]) == ["cmdline-demo", "fix-cve-a"]
    assert complete("kpipe build --recipe fix", ws["root"]) == ["fix-cve-a"]


def test_catalog_releases(ws):
    releases = sorted(ws["ws"].kernels)
    assert releases, "the catalog is empty: no kernel headers installed?"
    assert complete("kpipe build --kernel ", ws["root"]) == releases
    assert complete(f"kpipe recipe render cmdline-demo --kernel {releases[0][:4]}", ws["root"]) == \
        [r for r in releases if r.startswith(releases[0][:4])]


def test_artifact_ids_and_rollout_targets(ws):
    assert complete("kpipe artifacts show ", ws["root"]) == [ws["artifact"]]
    assert complete("kpipe rollout plan ", ws["root"]) == ["cmdline-demo", "fix-cve-a", ws["artifact"]]


def test_rollout_ids_and_last(ws):
    assert complete("kpipe rollout status ", ws["root"]) == ["last", ws["ran"]]
    assert complete("kpipe rollout rollback l", ws["root"]) == ["last"]
    assert complete("kpipe rollout start --plan ", ws["root"]) == ["last", ws["plan"]]


def test_lab_vm_names_and_audit_formats(ws):
    assert complete("kpipe lab ssh ", ws["root"]) == ["lab1", "lab2"]
    assert complete("kpipe audit --format ", ws["root"]) == list(FORMATS)
    assert complete("kpipe audit --format j", ws["root"]) == ["json", "junit"]


def test_limit_offers_groups_and_hosts_and_completes_the_last_term(ws):
    assert complete("kpipe fleet list --limit ", ws["root"]) == ["db", "web", "web1", "web2", "db1"]
    assert complete("kpipe rollout start cmdline-demo --limit web:&d", ws["root"]) == ["web:&db", "web:&db1"]
    assert complete("kpipe audit -l all:!w", ws["root"]) == ["all:!web", "all:!web1", "all:!web2"]


def test_the_workspace_option_is_honoured(ws, tmp_path):
    assert complete(f"kpipe -W {ws['root']} recipe render ", tmp_path) == ["cmdline-demo", "fix-cve-a"]


def test_typer_instruction_order_works_too(ws):
    assert complete("kpipe recipe render ", ws["root"], instruction="complete_bash") == ["cmdline-demo", "fix-cve-a"]


@pytest.mark.parametrize("line", [
    "kpipe recipe render ", "kpipe build --kernel ", "kpipe artifacts show ", "kpipe rollout status ",
    "kpipe lab ssh ", "kpipe fleet list --limit ", "kpipe rollout start ",
])
def test_without_a_workspace_nothing_is_offered_and_nothing_fails(tmp_path, line):
    assert complete(line, tmp_path) == []
    assert not (tmp_path / ".kpipe").exists()


def test_a_dynamic_inventory_is_never_run_by_completion(tmp_path):
    root = tmp_path / "ws"
    subprocess.run([sys.executable, "-m", "kpipe", "init", str(root)], check=True, capture_output=True)
    marker = tmp_path / "ran"
    script = root / "inventory.py"
    script.write_text(f"#!/bin/sh\ntouch {shlex.quote(str(marker))}\necho '{{\"web\": [\"w1\"]}}'\n")
    script.chmod(0o755)
    toml = (root / "kpipe.toml").read_text()
    (root / "kpipe.toml").write_text(toml.replace("[fleet]\n", '[fleet]\ninventories = ["inventory.py"]\n', 1)
                                     .replace("\ninventories = []", "\n# inventories = []", 1))
    assert open_workspace(root).inventories, "the test's kpipe.toml names no inventory"
    assert complete("kpipe fleet list --limit ", root) == []
    assert not marker.exists(), "completion ran the dynamic inventory"


def test_a_broken_workspace_offers_nothing_silently(tmp_path):
    (tmp_path / "kpipe.toml").write_text("[ssh\n")
    assert complete("kpipe recipe render ", tmp_path) == []
