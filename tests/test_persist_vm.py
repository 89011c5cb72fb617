"""Persistence across a real reboot without the kpatch CLI (issue 11 §3), on a `--rootfs debian` lab VM.

apply with --persist, `kpipe lab reboot`, `kpipe verify` shows the patch loaded by kpipe-livepatch.service
and /proc/cmdline its effect; `kpipe unpersist` and another reboot: gone. The audit says persisted vs
live-only. One VM for the session (the `debian_lab` fixture), two reboots.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kpipe.artifacts import get_artifact
from kpipe.rollout.planner import Candidate
from kpipe.workspace import open_workspace
from rootfs_lab import MODULE, TEXT, kp

pytestmark = [pytest.mark.vm, pytest.mark.timeout(5400)]


def on_vm(ws: Path, *cmd: str) -> str:
    return kp(ws, "lab", "ssh", "lab1", "--", *cmd, timeout=300).stdout


def audit_row(ws: Path) -> dict:
    r = kp(ws, "audit", "--limit", "lab1", "--format", "json", ok=(0, 1), timeout=600)
    host = next(h for h in json.loads(r.stdout)["hosts"] if h["host"] == "lab1")
    return host


def test_persisted_patch_survives_a_reboot_and_unpersist_removes_it(debian_lab):
    ws, release = debian_lab["ws"], debian_lab["release"]
    r = kp(ws, "rollout", "start", debian_lab["artifact"], "--limit", "lab1", "--waves", "100%", "--persist",
           "--skip-preflight", "--yes", "--json", timeout=1800)
    summary = json.loads(r.stdout)
    rid = summary["rollout_id"]
    assert summary["hosts"] == {"lab1": "applied"}, summary
    # one folder per patch stream (the artifact's recipe stream): the boot loader loads its newest version
    stream = Candidate.of(get_artifact(open_workspace(ws).store, debian_lab["artifact"])).stream_name
    persisted = f"/var/lib/kpipe/modules/{release}/{stream}/{MODULE}.ko"
    assert on_vm(ws, "systemctl", "is-enabled", "kpipe-livepatch.service").strip() == "enabled"
    assert on_vm(ws, "sh", "-c", f"test -f {persisted} && echo yes").strip() == "yes"
    assert audit_row(ws)["persisted"] == [MODULE]

    old_pid = json.loads(kp(ws, "lab", "status", "--json").stdout)["vms"][0]["pid"]
    kp(ws, "lab", "reboot", "lab1", "--timeout", "1500", timeout=3600)
    status = json.loads(kp(ws, "lab", "status", "--json").stdout)
    assert status["running"] and status["vms"][0]["pid"] != old_pid
    assert on_vm(ws, "cat", "/proc/cmdline").strip() == TEXT  # loaded at boot by kpipe-livepatch.service
    assert "loading" in on_vm(ws, "journalctl", "-b", "-u", "kpipe-livepatch.service", "--no-pager")
    v = json.loads(kp(ws, "verify", "--limit", "lab1", "--json", timeout=600).stdout)  # exit 0: compliant
    host = next(h for h in v["hosts"] if h["host"] == "lab1")
    row = next(p for p in host["patches"] if p["patch"] == MODULE)
    assert row["status"] == "compliant" and row["observed"]["enabled"] is True, row
    assert row["observed"]["persisted"] is True and host["persisted"] == [MODULE]

    r = kp(ws, "unpersist", rid, "--json", timeout=600)
    assert json.loads(r.stdout)["rollouts"][rid]["hosts"] == {"lab1": "unpersisted"}
    assert on_vm(ws, "sh", "-c", f"test -e {persisted} || echo gone").strip() == "gone"
    assert on_vm(ws, "sh", "-c", "systemctl is-enabled kpipe-livepatch.service 2>&1; true").strip() != "enabled"
    assert on_vm(ws, "cat", "/proc/cmdline").strip() == TEXT  # the live patch itself stays loaded
    row = audit_row(ws)
    assert row["persisted"] == []
    kp(ws, "lab", "reboot", "lab1", "--timeout", "1500", timeout=3600)
    assert TEXT not in on_vm(ws, "cat", "/proc/cmdline")
    assert MODULE not in on_vm(ws, "sh", "-c", "ls /sys/kernel/livepatch; true")
