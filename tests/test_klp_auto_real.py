"""One recipe, two backends, for real: recipes/cmdline-auto.yaml (`builder: auto`) built by Debian trixie's
kpatch-build for the forged 6.12 kernel and by Linux 7.2's own klp-build for the forged 7.2 kernel, each on
its suite's chroot build host over SSH, both modules validated and signed.

The kernels and chroots are the forge's cache (tests/test_forge_kpatch.py and tests/test_klp_real.py build
them the first time); the 7.2 build starts at klp-build's patched kernel (`klp: short_circuit: patched`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forge_support import FORGE_SOURCE, KLP_SOURCE, TIMINGS, need_forge_tools
from kpipe.lab.buildhost import BuildHostChroot, build_host_toml, namespace_pids
from kpipe.lab.forge import ForgedKernel, ensure_lab_key, forge, parse_source

pytestmark = [pytest.mark.forge, pytest.mark.timeout(7200)]
BUILT: dict[str, dict] = {}  # release -> the build result of the test that builds both (the rollout test uses it)
MESSAGE = "kpipe live patch active"  # what /proc/cmdline prints while patches/cmdline-auto.patch is loaded

REPO = Path(__file__).resolve().parent.parent
RECIPE = "cmdline-auto"
MODULE = "livepatch-cmdline-auto"
# the kpatch-build kernel and the klp-build kernel: the ones CI prewarms (forge_support.FORGES)
OLD_SOURCE, NEW_SOURCE = FORGE_SOURCE, KLP_SOURCE


def kp(ws: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=ws, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, f"kpipe {' '.join(args)} exited {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def kernels() -> dict[str, ForgedKernel]:
    need_forge_tools()
    return {s: forge(parse_source(s), progress=lambda m: sys.stderr.write(f"forge: {m}\n"))
            for s in (OLD_SOURCE, NEW_SOURCE)}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, kernels) -> Iterator[dict[str, dict]]:
    """Both suites' build hosts (trixie: kpatch-build, sid: klp-build), stopped by PID at the end."""
    started: dict[str, tuple[BuildHostChroot, dict, str]] = {}
    try:
        for source in (OLD_SOURCE, NEW_SOURCE):
            suite, version = source.split(":", 1)[1].split("/")
            bh = BuildHostChroot(tmp_path_factory.mktemp(f"bh-{suite}"))
            state = bh.up(suite, version=version)
            started[source] = (bh, state, os.readlink(f"/proc/{state['pid']}/ns/mnt"))
        yield {s: st for s, (_bh, st, _ns) in started.items()}
    finally:
        for bh, _state, ns in started.values():
            bh.down()
            left = namespace_pids(ns) if ns != os.readlink("/proc/self/ns/mnt") else []
            assert not left, f"build host processes left running: {left}"


@pytest.fixture(scope="module")
def ws(tmp_path_factory, hosts, kernels) -> Path:
    root = tmp_path_factory.mktemp("auto") / "ws"
    (root / "recipes").mkdir(parents=True)
    (root / "patches").mkdir()
    known = root / "known_hosts"
    known.write_text("".join(Path(st["known_hosts"]).read_text() for st in hosts.values()))
    text = f'[workspace]\n\n[ssh]\nknown_hosts = "{known}"\naccept_new_host_keys = false\n\n'
    for source, st in hosts.items():
        suite, version = source.split(":", 1)[1].split("/")
        text += build_host_toml(f"forge-{suite}", int(st["port"]), Path(st["identity_file"]),
                                (f"{version.split('.')[0]}.*-kforge-*",)) + 'workdir = "/root/kpipe-builds"\n\n'
    key, cert = ensure_lab_key()
    text += (f'[signing]\ndefault = "lab"\n\n[signing.signers.lab]\ntype = "builtin"\nkey = "{key}"\n'
             f'cert = "{cert}"\nhash = "sha256"\n')
    (root / "kpipe.toml").write_text(text)
    shutil.copy(REPO / "recipes" / f"{RECIPE}.yaml", root / "recipes")
    shutil.copy(REPO / "patches" / f"{RECIPE}.patch", root / "patches")
    return root


def test_one_recipe_is_built_by_kpatch_build_for_6_12_and_by_klp_build_for_7_2(ws, kernels):
    old, new = kernels[OLD_SOURCE], kernels[NEW_SOURCE]
    # the planner's choice and its reason, as `recipe render` shows them
    r_old = json.loads(kp(ws, "recipe", "render", RECIPE, "--kernel", old.release, "--json").stdout)
    r_new = json.loads(kp(ws, "recipe", "render", RECIPE, "--kernel", new.release, "--json").stdout)
    assert r_old["builder"] == "kpatch-build" and "Linux 6.12 predates klp-build" in r_old["builder_reason"]
    assert r_new["builder"] == "klp-build" and "Linux 7.2 >= 6.19" in r_new["builder_reason"]
    assert r_old["builder_argv"][3] == "kpatch-build"
    assert r_new["builder_argv"][7] == f"{new.tree}/scripts/livepatch/klp-build"

    results = {}
    for k, host in ((new, "forge-sid"), (old, "forge-trixie")):
        t = time.monotonic()
        # --force: run the builders now, not collect a finished build of the same inputs from the build host
        [res] = json.loads(kp(ws, "build", "--recipe", RECIPE, "--kernel", k.release, "--force", "--json",
                              timeout=7200).stdout)
        TIMINGS[f"auto_build_{k.release}"] = time.monotonic() - t
        assert res["status"] == "built" and res["host"] == host and res["module_name"] == MODULE, res
        assert not res["reattached"], res
        results[k.release] = res
        BUILT[k.release] = res
    sys.stderr.write(f"timings: {json.dumps({k: round(v, 1) for k, v in TIMINGS.items()})}\n")
    for k, builder, said in ((old, "kpatch-build", "cmdline.o: changed function: cmdline_proc_show"),
                             (new, "klp-build", "vmlinux.o: changed function: cmdline_proc_show")):
        res = results[k.release]
        art = json.loads(kp(ws, "artifacts", "show", res["artifact_id"], "--json").stdout)
        assert art["builder"] == builder and art["status"] == "valid", art
        assert said in kp(ws, "artifacts", "log", res["artifact_id"]).stdout
        report = json.loads(kp(ws, "validate", res["signed_id"], "--kernel", k.release, "--cert", str(k.cert),
                               "--json").stdout)
        assert report["ok"] is True, [f for f in report["findings"] if f["severity"] == "error"]


@pytest.mark.vm
def test_the_two_backends_modules_roll_out_over_one_lab_of_both_kernels_and_back(ws, kernels):
    """Item 3 end to end: the kpatch-build module (6.12) and the klp-build module (7.2) of one recipe, each
    preflighted with sig_enforce, rolled out in waves over one lab running both kernels; the planner gives each
    host the artifact of its release; verify, audit and rollback cover both."""
    old, new = kernels[OLD_SOURCE], kernels[NEW_SOURCE]
    assert set(BUILT) == {old.release, new.release}, "the build test above must run first (same module)"
    for res in BUILT.values():
        pre = json.loads(kp(ws, "preflight", res["signed_id"], "--sig-enforce", "--json", timeout=1800).stdout)
        assert pre["status"] == "passed", pre
    kp(ws, "lab", "up", "--kernel", old.release, "--vms", "1", "--group", f"{new.release}:1", "--sig-enforce",
       "--timeout", "1200", "--no-progress", timeout=1500)
    vms = {"lab1": old.release, "lab2": new.release}
    try:
        def cmdlines() -> dict[str, str]:
            return {vm: kp(ws, "lab", "ssh", vm, "--", "cat", "/proc/cmdline", timeout=120).stdout.strip()
                    for vm in vms}

        for vm, release in vms.items():
            assert kp(ws, "lab", "ssh", vm, "--", "uname", "-r", timeout=120).stdout.strip() == release
        before = cmdlines()
        assert MESSAGE not in before.values()
        plan = json.loads(kp(ws, "rollout", "plan", RECIPE, "--limit", "lab", "--waves", "1,100%",
                             "--json").stdout)
        assert not plan["excluded"], plan["excluded"]
        text = json.dumps(plan)
        assert all(res["signed_id"] in text for res in BUILT.values()), text
        r = kp(ws, "rollout", "start", RECIPE, "--limit", "lab", "--waves", "1,100%", "--max-failures", "0",
               "--rollback-policy", "wave", "--yes", "--json", timeout=1800)
        summary = json.loads(r.stdout)
        assert summary["state"] == "completed" and summary["hosts"] == {vm: "applied" for vm in vms}, summary
        assert cmdlines() == {vm: MESSAGE for vm in vms}
        kp(ws, "verify", "--limit", "lab")
        audit = json.loads(kp(ws, "audit", "--limit", "lab", "--format", "json").stdout)
        assert audit["compliant"] is True, audit
        assert {h["host"]: h["kernel"] for h in audit["hosts"]} == vms
        r = kp(ws, "rollout", "rollback", summary["rollout_id"], "--yes", "--json", timeout=1800)
        assert set(json.loads(r.stdout)["hosts"].values()) == {"rolled_back"}
        assert cmdlines() == before
    finally:
        kp(ws, "lab", "down")
