"""A mixed-arch rollout, real (markers `vm` and `forge`): one recipe built for the forged x86_64 kernel (on the
trixie chroot build host) and for the forged arm64 kernel (cross-built on the sid chroot build host), preflighted
with module.sig_enforce=1, then rolled out in waves over one lab holding both (sig_enforce on every VM): the
planner matches each host's arch and release; verify, audit and rollback cover both."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from arm64_support import (  # noqa: E402, F401  (fixtures)
    MESSAGE,
    MODULE,
    RECIPE,
    TIMINGS,
    arm64_buildhost,
    arm64_workspace,
    forged_arm64,
    kp,
    need_qemu_aarch64,
)
from forge_support import forge_buildhost, forged  # noqa: E402, F401
from kpipe.forged import ForgedKernel  # noqa: E402
from kpipe.lab.buildhost import build_host_toml  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.forge, pytest.mark.timeout(7200)]


@pytest.fixture(scope="module")
def mixed_ws(tmp_path_factory, arm64_buildhost: dict, forge_buildhost: dict) -> Path:
    """The arm64 workspace plus the trixie build host for the x86_64 forged kernel; one known_hosts for both."""
    ws = arm64_workspace(tmp_path_factory.mktemp("mixed-rollout") / "ws", arm64_buildhost)
    known = ws / "known_hosts"
    known.write_text("".join(Path(s["known_hosts"]).read_text() for s in (arm64_buildhost, forge_buildhost)))
    toml = (ws / "kpipe.toml").read_text().replace(f"known_hosts = \"{arm64_buildhost['known_hosts']}\"",
                                                   f"known_hosts = \"{known}\"")
    toml = toml.replace('kernels = ["*-kforge-*"]', 'kernels = ["7.*-kforge-*"]', 1)
    toml += "\n" + build_host_toml("forge-trixie", int(forge_buildhost["port"]),
                                   Path(forge_buildhost["identity_file"]), ("6.*-kforge-*",))
    toml += 'workdir = "/root/kpipe-builds"\n'
    (ws / "kpipe.toml").write_text(toml)
    return ws


@pytest.fixture(scope="module")
def both_built(mixed_ws: Path, forged: ForgedKernel, forged_arm64: ForgedKernel) -> dict[str, dict]:
    out = {}
    for k in (forged, forged_arm64):
        t = time.monotonic()
        [res] = json.loads(kp(mixed_ws, "build", "--recipe", RECIPE, "--kernel", k.release, "--json",
                              timeout=3600).stdout)
        TIMINGS[f"build_{k.arch}"] = time.monotonic() - t
        assert res["status"] == "built" and res["signed_id"], res
        pre = json.loads(kp(mixed_ws, "preflight", res["signed_id"], "--sig-enforce", "--json", timeout=1800).stdout)
        assert pre["status"] == "passed", pre
        out[k.arch] = res
    return out


@pytest.fixture(scope="module")
def mixed_rollout_lab(mixed_ws: Path, both_built, forged: ForgedKernel, forged_arm64: ForgedKernel) -> Iterator[dict]:
    need_qemu_aarch64()
    t = time.monotonic()
    kp(mixed_ws, "lab", "up", "--kernel", forged.release, "--vms", "1", "--group", f"{forged_arm64.release}:1",
       "--sig-enforce", "--timeout", "1200", "--no-progress", timeout=1500)
    TIMINGS["mixed_rollout_lab_up"] = time.monotonic() - t
    try:
        yield {"lab1": forged.release, "lab2": forged_arm64.release}
    finally:
        kp(mixed_ws, "lab", "down")


def _cmdlines(ws: Path, vms) -> dict[str, str]:
    return {vm: kp(ws, "lab", "ssh", vm, "--", "cat", "/proc/cmdline", timeout=120).stdout.strip() for vm in vms}


def test_one_recipe_rolls_out_over_x86_64_and_aarch64_hosts_and_back(mixed_ws, both_built, mixed_rollout_lab):
    vms = mixed_rollout_lab
    for vm, release in vms.items():
        assert kp(mixed_ws, "lab", "ssh", vm, "--", "uname", "-r", timeout=120).stdout.strip() == release
    before = _cmdlines(mixed_ws, vms)
    plan = json.loads(kp(mixed_ws, "rollout", "plan", RECIPE, "--limit", "lab", "--waves", "1,100%",
                         "--json").stdout)
    assert not plan["excluded"], plan["excluded"]
    text = json.dumps(plan)
    assert both_built["x86_64"]["signed_id"] in text and both_built["aarch64"]["signed_id"] in text
    t = time.monotonic()
    r = kp(mixed_ws, "rollout", "start", RECIPE, "--limit", "lab", "--waves", "1,100%", "--max-failures", "0",
           "--rollback-policy", "wave", "--yes", "--json", timeout=1800)
    TIMINGS["mixed_rollout"] = time.monotonic() - t
    summary = json.loads(r.stdout)
    assert summary["state"] == "completed", summary
    assert summary["hosts"] == {vm: "applied" for vm in vms}
    assert _cmdlines(mixed_ws, vms) == {vm: MESSAGE for vm in vms}
    kp(mixed_ws, "verify", "--limit", "lab")
    audit = json.loads(kp(mixed_ws, "audit", "--limit", "lab", "--format", "json").stdout)
    assert audit["compliant"] is True, audit
    assert {h["host"]: h["kernel"] for h in audit["hosts"]} == vms
    for h in audit["hosts"]:
        [row] = [p for p in h["patches"] if p["patch"] == MODULE.replace("-", "_")]
        assert row["status"] == "compliant", row
    r = kp(mixed_ws, "rollout", "rollback", summary["rollout_id"], "--yes", "--json", timeout=1800)
    assert set(json.loads(r.stdout)["hosts"].values()) == {"rolled_back"}
    assert _cmdlines(mixed_ws, vms) == before
