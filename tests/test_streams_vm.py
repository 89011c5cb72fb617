"""Patch streams on a real kernel: one lab VM, the shipped stream recipes built with `kpipe build` against
this machine's headers, rolled out with the real CLI.

v1 (/proc/cmdline reads "v1"), then the upgrade to v2 (reads "v2"; v1's module gone from lsmod and sysfs),
then the rollback of the upgrade (reads "v1" again, v2 gone), then a second, non-replace stream
(/proc/version) loaded beside v1 and verified on its own. One VM, reused across the steps.
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

pytestmark = [pytest.mark.vm, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parent.parent
TOML = """\
[workspace]
store = ".kpipe"

[[build_hosts]]
name = "local"
arch = "x86_64"
kernels = ["*-amd64"]
workdir = ".kpipe/builds"

[signing]
default = "lab"

[signing.signers.lab]
type = "builtin"
key = ".lab/signing/signing_key.pem"
cert = ".lab/signing/signing_cert.pem"
"""


def kp(ws: Path, *args: str, ok: tuple[int, ...] = (0,), timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run `python -m kpipe -W ws ...` as a user would; assert the exit code."""
    r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws), *args], capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ), cwd=ws)
    assert r.returncode in ok, f"kpipe {' '.join(args)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def on_vm(ws: Path, *cmd: str) -> str:
    return kp(ws, "lab", "ssh", "lab1", "--", *cmd, timeout=120).stdout


def loaded(ws: Path) -> str:
    """lsmod's names and the livepatch sysfs folders, one a line."""
    return on_vm(ws, "sh", "-c", "cut -d ' ' -f 1 /proc/modules; ls /sys/kernel/livepatch; true")


def rollout(ws: Path, recipe: str) -> dict:
    r = kp(ws, "rollout", "start", recipe, "--limit", "lab1", "--waves", "100%", "--skip-preflight", "--yes",
           "--json")
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def stream_lab(tmp_path_factory, kernel_env):
    kenv.require_tool("qemu-system-x86_64")
    release = kernel_env.release
    ws = tmp_path_factory.mktemp("streams-vm")
    (ws / "kpipe.toml").write_text(TOML)
    shutil.copytree(REPO / "recipes", ws / "recipes")
    shutil.copytree(REPO / "patches", ws / "patches")
    kp(ws, "keys", "generate", "--signer", "lab", "--cn", "kpipe streams test key")
    for recipe in ("cmdline-stream-v1", "cmdline-stream-v2", "proc-version-stream"):
        kp(ws, "build", "--recipe", recipe, "--kernel", release, "--host", "local", timeout=1200)
    try:
        kp(ws, "lab", "up", "--kernel", release, "--vms", "1", timeout=1200)
        yield ws
    finally:
        subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws), "lab", "down"], capture_output=True,
                       timeout=300)


def test_v1_then_upgrade_to_v2_then_rollback_then_a_second_stream(stream_lab):
    ws = stream_lab
    # the artifacts record their stream, version and klp mode
    arts = json.loads(kp(ws, "artifacts", "list", "--json").stdout)
    by_recipe = {a["recipe"]: a for a in arts if a["status"] == "valid"}
    assert by_recipe["cmdline-stream-v2"]["module_name"] == "kpipe-cmdline-stream-v2"
    meta = json.loads(kp(ws, "artifacts", "show", by_recipe["cmdline-stream-v2"]["id"], "--json").stdout)["meta"]
    assert (meta["stream"], meta["version"], meta["replace"]) == ("cmdline-stream", 2, True)

    s1 = rollout(ws, "cmdline-stream-v1")
    assert s1["state"] == "completed" and s1["hosts"] == {"lab1": "applied"}, s1
    assert on_vm(ws, "cat", "/proc/cmdline").strip() == "v1"
    kp(ws, "verify", "--limit", "lab1")

    plan = json.loads(kp(ws, "rollout", "plan", "cmdline-stream-v2", "--limit", "lab1", "--skip-preflight",
                         "--json").stdout)
    assert plan["assignments"]["lab1"]["supersedes"] == "kpipe_cmdline_stream_v1"
    s2 = rollout(ws, "cmdline-stream-v2")
    assert s2["state"] == "completed" and s2["hosts"] == {"lab1": "applied"}, s2
    assert on_vm(ws, "cat", "/proc/cmdline").strip() == "v2"
    names = loaded(ws).split()
    assert "kpipe_cmdline_stream_v2" in names and "kpipe_cmdline_stream_v1" not in names, names
    kp(ws, "verify", "--limit", "lab1")  # the stream's desired version is v2 now

    # v1 onto the v2 host is a downgrade: excluded with its reason
    plan = json.loads(kp(ws, "rollout", "plan", "cmdline-stream-v1", "--limit", "lab1", "--skip-preflight",
                         "--json").stdout)
    assert [e["code"] for e in plan["excluded"]] == ["downgrade"], plan["excluded"]

    r = kp(ws, "rollout", "rollback", s2["rollout_id"], "--yes", "--json")
    assert json.loads(r.stdout)["hosts"] == {"lab1": "rolled_back"}
    assert on_vm(ws, "cat", "/proc/cmdline").strip() == "v1"
    names = loaded(ws).split()
    assert "kpipe_cmdline_stream_v1" in names and "kpipe_cmdline_stream_v2" not in names, names
    kp(ws, "verify", "--limit", "lab1")  # v1 is desired again

    # a second stream, non-replace, beside v1: both patches active, each verified
    s3 = rollout(ws, "proc-version-stream")
    assert s3["state"] == "completed" and s3["hosts"] == {"lab1": "applied"}, s3
    assert on_vm(ws, "cat", "/proc/version").strip() == "other stream v1"
    assert on_vm(ws, "cat", "/proc/cmdline").strip() == "v1"
    audit = json.loads(kp(ws, "audit", "--limit", "lab1", "--json").stdout)
    rows = {r["patch"]: r["status"] for h in audit["hosts"] for r in h["patches"]}
    assert rows.get("kpipe_cmdline_stream_v1") == "compliant" and rows.get("kpipe_proc_version_v1") == "compliant", rows
    kp(ws, "verify", "--limit", "lab1")

    # leave the VM clean
    kp(ws, "rollout", "rollback", s3["rollout_id"], "--yes")
    kp(ws, "rollout", "rollback", s1["rollout_id"], "--yes")
    assert "console=" in on_vm(ws, "cat", "/proc/cmdline")
    assert "kpipe_" not in loaded(ws)
