"""`kpipe rollout export ID --ansible DIR`: the plan as a self-contained Ansible project, run with
plain `ansible-playbook` (no kpipe in the loop) against SimFleet (real sshd, simulated kernel)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from rollout_world import artifact_ws, stored_plan
from simfleet import simfleet_factory  # noqa: F401  (the session fixture)
from test_executors import (
    ANSIBLE_TOML,
    CLEAN,
    MODULE,
    RELEASE,
    applied_state,
    fleet_state,
    kpipe,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def setup(fleet, tmp_path: Path, **opts):
    ws, art = artifact_ws(fleet, tmp_path, extra_toml=ANSIBLE_TOML)
    plan, _, rid = stored_plan(ws, art, [h.name for h in fleet.hosts],
                               **{"waves": "1,100%", "forks": 10, "step_timeout_s": 20.0, **opts})
    return ws, art, plan, rid


def playbook(project: Path, name: str, key: Path, *extra: str) -> subprocess.CompletedProcess:
    # plain ansible-playbook in the project folder: its ansible.cfg names the inventory
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    return subprocess.run(["ansible-playbook", name, "--private-key", str(key), *extra], cwd=project, check=False,
                          capture_output=True, text=True, timeout=600, env={**env, "ANSIBLE_NOCOLOR": "1"})


def test_exported_project_runs_with_plain_ansible_playbook(simfleet_factory, tmp_path):  # noqa: F811
    fleet = simfleet_factory(3)
    ws, art, plan, rid = setup(fleet, tmp_path, max_failures="0")
    project = tmp_path / "export"
    r = kpipe(ws, "rollout", "export", rid, "--ansible", str(project), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout)
    assert summary["waves"] == [len(w) for w in plan.waves] and summary["max_fail_percentage"] == 0

    # self-contained: the module from the store, strict host keys, no private key anywhere
    assert (project / "files" / art.sha256 / "livepatch-demo.ko").read_bytes() == ws.store.get_bytes(art.sha256)
    for f in project.rglob("*"):
        if f.is_file():
            text = f.read_bytes()
            assert b"PRIVATE KEY" not in text and b"ansible_ssh_private_key_file" not in text, f
            assert str(fleet.client_key).encode() not in text, f
    inv = yaml.safe_load((project / "inventory").read_text().replace("!unsafe ", ""))
    hosts = inv["all"]["children"]["kpipe_rollout"]["hosts"]
    assert list(hosts) == list(plan.hosts)  # wave order
    assert all("StrictHostKeyChecking=yes" in v["ansible_ssh_common_args"] for v in hosts.values())
    play = yaml.safe_load((project / "playbook.yml").read_text())[0]
    assert play["serial"] == [len(w) for w in plan.waves] and play["max_fail_percentage"] == 0
    # the steps are the executors' steps: the same argv as `rollout start --dry-run` prints
    steps = yaml.safe_load((project / "vars" / "plan.yml").read_text().replace("!unsafe ", ""))
    first = steps["kpipe_apply_steps"][plan.hosts[0]]
    assert [s["name"] for s in first if s["action"] == "command"][:2] == ["preflight", "stage"]
    assert any(s["label"] == "load" and s["argv"][-1] == f"/var/lib/kpatch/{RELEASE}/livepatch-demo.ko"
               for s in first)

    a = playbook(project, "playbook.yml", fleet.client_key)
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-2000:]
    assert fleet_state(fleet) == {h.name: applied_state(art.sha256) for h in fleet.hosts}
    for h in fleet.hosts:
        assert any(f"'{MODULE}': patching complete" in ln for ln in h.log())
    # again: nothing loaded twice (the load step's guard), still applied
    enables = {h.name: sum(f"enabling patch '{MODULE}'" in ln for ln in h.log()) for h in fleet.hosts}
    again = playbook(project, "playbook.yml", fleet.client_key)
    assert again.returncode == 0, again.stdout[-3000:]
    assert enables == {h.name: sum(f"enabling patch '{MODULE}'" in ln for ln in h.log()) for h in fleet.hosts}

    b = playbook(project, "rollback.yml", fleet.client_key)
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-2000:]
    assert fleet_state(fleet) == {h.name: CLEAN for h in fleet.hosts}


def test_export_halts_on_a_canary_failure_and_checks_host_keys(simfleet_factory, tmp_path):  # noqa: F811
    fleet = simfleet_factory(3)
    ws, _art, plan, rid = setup(fleet, tmp_path, max_failures="0")
    project = tmp_path / "export"
    assert kpipe(ws, "rollout", "export", rid, "--ansible", str(project)).returncode == 0
    canary = plan.waves[0][0]
    fleet.host(canary).inject("ebusy_enable")
    a = playbook(project, "playbook.yml", fleet.client_key)
    assert a.returncode != 0
    # the canary failed at its load; the budget (0) halted the play before wave 2
    st = fleet_state(fleet)
    assert st[canary]["patches"] == {} and st[canary]["modules"] == []
    for h in plan.hosts[1:]:
        assert st[h] == CLEAN, h
    fleet.host(canary).clear()
    assert playbook(project, "rollback.yml", fleet.client_key, "--limit", canary).returncode == 0
    assert fleet_state(fleet)[canary] == CLEAN

    # a host key that does not match is refused (strict checking against the project's known_hosts)
    kh = project / "known_hosts"
    wrong = "AAAAC3NzaC1lZDI1NTE5AAAAIIEDDeEq2LFqMrJnxy2b3FWz2oG39YHUmDpY8L0VMVlx"
    kh.write_text("".join(f"[{h.address}]:{h.port} ssh-ed25519 {wrong}\n" for h in fleet.hosts))
    c = playbook(project, "playbook.yml", fleet.client_key, "--limit", plan.hosts[1])
    assert c.returncode != 0
    assert "host key" in (c.stdout + c.stderr).lower() or "UNREACHABLE" in c.stdout
    assert fleet_state(fleet)[plan.hosts[1]] == CLEAN


def test_export_refuses_a_folder_that_is_not_empty(simfleet_factory, tmp_path):  # noqa: F811
    fleet = simfleet_factory(1)
    ws, _art, _plan, rid = setup(fleet, tmp_path)
    project = tmp_path / "export"
    project.mkdir()
    (project / "keep.txt").write_text("mine")
    r = kpipe(ws, "rollout", "export", rid, "--ansible", str(project))
    assert r.returncode == 4, r.stdout + r.stderr  # ConfigError
    assert "not an empty folder" in (r.stdout + r.stderr) and "Traceback" not in r.stderr
    assert sorted(p.name for p in project.iterdir()) == ["keep.txt"]
