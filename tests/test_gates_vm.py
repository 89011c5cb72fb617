"""The gate on a real kernel: a deliberately bad live patch (recipes/cmdline-warn.yaml) WARNs when
/proc/cmdline is read; the rollout's probe reads it, the kernel logs a WARNING whose call trace names the
patched function and sets taint W, and the gate halts the rollout and rolls it back. One lab VM.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kenv

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parent.parent
MODULE = "livepatch_cmdline_warn"


def kp(ws: Path, *args: str, ok: tuple[int, ...] = (0,), timeout: float = 900) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws), *args], capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ), cwd=ws)
    assert r.returncode in ok, f"kpipe {' '.join(args)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def build_fixture(ws: Path, release: str, headers: Path) -> Path:
    """The recipe rendered by kpipe for `release`, built against the installed headers."""
    from kpipe.recipes.render import render
    from kpipe.workspace import open_workspace

    spec = render(open_workspace(ws), "cmdline-warn", release)
    src = ws / "src"
    src.mkdir()
    for f in spec.sources:
        (src / f.name).write_text(f.text)
    subprocess.run(["make", "-C", str(headers), f"M={src}", "modules"], check=True, capture_output=True, timeout=600)
    return src / f"{spec.module_name}.ko"


def test_a_patch_that_warns_is_halted_and_rolled_back_by_the_gate(tmp_path, kernel_env):
    kenv.require_tool("qemu-system-x86_64")
    release = kernel_env.release
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "kpipe.toml").write_text('[workspace]\nstore = ".kpipe"\n')
    shutil.copytree(REPO / "recipes", ws / "recipes")
    ko = build_fixture(ws, release, kernel_env.headers)
    from kpipe.artifacts import add_artifact
    from kpipe.store import Store

    store = Store(ws / ".kpipe")
    art = add_artifact(store, ko, kernel=release, status="valid", recipe="cmdline-warn", arch="x86_64",
                       module_name="livepatch-cmdline-warn")
    store.close()
    try:
        kp(ws, "lab", "up", "--kernel", release, "--vms", "1", timeout=1200)
        before = kp(ws, "lab", "ssh", "lab1", "--", "cat", "/proc/sys/kernel/tainted").stdout.strip()
        assert int(before) & (1 << 9) == 0  # no W yet: the W after the rollout is the patch's
        # the recipe's rollout: section gives waves [1], a 3 s soak, rollback all, the probe
        r = kp(ws, "rollout", "start", art.id, "--limit", "lab1", "--skip-preflight", "--yes", "--json", ok=(8,))
        summary = json.loads(r.stdout)
        rid = summary["rollout_id"]
        assert summary["state"] == "rolled_back" and summary["hosts"] == {"lab1": "rolled_back"}, summary
        reason = summary["reasons"]["lab1"]
        assert "kernel warning: WARNING: CPU:" in reason, reason
        assert f"call trace names patched livepatch_cmdline_proc_show [{MODULE}]" in reason, reason
        assert "new kernel taint W since the load" in reason, reason
        assert "lab1" in summary["halt_reason"] and "kernel warning" in summary["halt_reason"]
        st = json.loads(kp(ws, "rollout", "status", rid, "--json").stdout)
        assert st["state"] == "rolled_back" and "kernel warning" in json.dumps(st)
        # the journal holds the gate's verdict and the host's failure with the reason
        from kpipe.rollout.journal import Journal

        store = Store(ws / ".kpipe")
        try:
            entries = Journal(store).entries(rid)
        finally:
            store.close()
        gate = [e for e in entries if e.step == "gate"]
        assert gate and gate[-1].detail["verdict"] == "halt" and "kernel warning" in gate[-1].detail["reason"]
        failed = [e for e in entries if e.host == "lab1" and e.step == "outcome" and e.detail["state"] == "failed"]
        assert failed and "kernel warning" in failed[0].detail["reason"]
        # rolled back for real: the patch is gone and /proc/cmdline is the kernel's again
        out = kp(ws, "lab", "ssh", "lab1", "--", "sh", "-c",
                 "cat /proc/cmdline; ls /sys/kernel/livepatch; ls -d /sys/module/livepatch_* 2>/dev/null; true").stdout
        assert "console=" in out and MODULE not in out and "bad live patch" not in out
    finally:
        subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws), "lab", "down"], capture_output=True, timeout=300)
