"""`kpipe build --fleet PATTERN` on SimFleet: the releases the hosts run (through the observer) -> the recipe x
kernel matrix on the build hosts; what cannot be built is listed with its reason. And `kpipe audit` flags a host
that rebooted into a kernel no artifact exists for.

The builds run tests/doubles/kpatch-build (the build stand-in of the existing build tests) on the local build host,
for the matrix and fault checks only: the real builders are proven by the existing real-build tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from doubles.buildkit import DEBIAN_RELEASE, DOUBLE, KERNEL, fake_kernel_tree, memcg_patch, toml_str
from kpipe import audit as A
from kpipe.audit import AppliedRecord
from kpipe.builder.fleet import (
    NO_BUILD_HOST,
    NO_RECIPE,
    NOT_IN_CATALOG,
    UNREACHABLE,
    Running,
    fleet_exit_code,
    fleet_matrix,
    running_releases,
)
from kpipe.errors import TransportError
from kpipe.fleet.facts import HostFacts
from kpipe.workspace import open_workspace
from simfleet import simfleet_factory  # noqa: F401  (the session fixture)

OTHER = KERNEL.uninstalled_release()  # same flavour, another ABI: in the catalog, no build host takes it
OLD = "5.10.0-30-amd64"  # no recipe targets it


def workspace(root: Path, fleet=None, *, build_kernels: tuple[str, ...] = (KERNEL.abi_glob(),)) -> Path:
    """A workspace: recipes fix-a and fix-b for 6.1.*-amd64, the local build host with the kpatch-build stand-in
    (taking `build_kernels`), and a catalog of DEBIAN_RELEASE and OTHER (fake trees the stand-in accepts)."""
    root.mkdir(parents=True, exist_ok=True)
    toml = ""
    toml += "\n[workspace]\nstore = \".kpipe\"\n"
    toml += (f"\n[[build_hosts]]\nname = \"local\"\nworkdir = {toml_str(str(root / 'work'))}\nslots = 2\n"
             f"kernels = [{', '.join(toml_str(k) for k in build_kernels)}]\n"
             f"tools = {{ \"kpatch-build\" = {toml_str(str(DOUBLE))} }}\n")
    for release in (DEBIAN_RELEASE, OTHER):
        toml += "\n[[kernels]]\n" + "".join(f"{k} = {toml_str(v)}\n"
                                            for k, v in fake_kernel_tree(root / "kernels", release).items())
    if fleet is not None:
        fleet.write_workspace(root, extra_toml=toml)
    else:
        (root / "kpipe.toml").write_text(toml)
    (root / "recipes").mkdir(exist_ok=True)
    (root / "patches").mkdir(exist_ok=True)
    for name in ("fix-a", "fix-b"):
        (root / "patches" / f"{name}.patch").write_text(memcg_patch(f"// {name}\n"))
        (root / "recipes" / f"{name}.yaml").write_text(
            f"name: {name}\nbuilder: kpatch-build\nkernels: [\"6.1.*-amd64\"]\npatches: [{name}.patch]\n"
            "kpatch:\n  jobs: 2\n")
    return root


def facts(name: str, release: str) -> HostFacts:
    return HostFacts(name=name, release=release, arch="x86_64", machine="x86_64")


# -- the matrix (pure over the workspace) --------------------------------------------------------------------------

def test_running_releases_group_hosts_and_keep_the_unreachable():
    running, unreachable = running_releases({
        "h1": facts("h1", DEBIAN_RELEASE), "h2": facts("h2", OLD), "h3": facts("h3", DEBIAN_RELEASE),
        "h4": TransportError("h4: connection refused", host="h4")})
    assert [(r.release, r.hosts) for r in running] == sorted([(DEBIAN_RELEASE, ("h1", "h3")), (OLD, ("h2",))])
    assert [(u.hosts, u.code) for u in unreachable] == [(("h4",), UNREACHABLE)]
    assert "connection refused" in unreachable[0].reason


def test_the_matrix_builds_every_recipe_for_each_running_release_and_says_why_not(tmp_path):
    ws = open_workspace(workspace(tmp_path / "ws"))
    running = [Running(DEBIAN_RELEASE, "x86_64", ("h1",)), Running(OTHER, "x86_64", ("h2",)),
               Running(OLD, "x86_64", ("h3",)), Running("6.1.0-999-amd64", "x86_64", ("h4",))]
    pairs, unbuilt = fleet_matrix(ws, running)
    assert pairs == [("fix-a", DEBIAN_RELEASE), ("fix-b", DEBIAN_RELEASE)]
    why = {u.release: u for u in unbuilt}
    assert why[OTHER].code == NO_BUILD_HOST and "no build host builds" in why[OTHER].reason
    assert why[OLD].code == NO_RECIPE and why[OLD].reason == f"no recipe targets {OLD}"
    assert why["6.1.0-999-amd64"].code == NOT_IN_CATALOG and "[[kernels]]" in why["6.1.0-999-amd64"].reason
    assert fleet_exit_code(unbuilt) == 1
    assert fleet_exit_code([u for u in unbuilt if u.code == NO_RECIPE]) == 0
    only, _ = fleet_matrix(ws, running, "fix-b")
    assert only == [("fix-b", DEBIAN_RELEASE)]


# -- the command on SimFleet ------------------------------------------------------------------------------------------

def kpipe(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kpipe", "-W", str(root), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=root)


def test_build_fleet_builds_the_running_kernels_in_parallel_and_lists_the_rest(simfleet_factory, tmp_path):
    fleet = simfleet_factory(5)
    h = fleet.hosts
    try:
        h[1].set_release(DEBIAN_RELEASE)
        h[2].set_release(OTHER)
        h[3].set_release(OLD)
        h[4].stop()
        h[0].set_release(DEBIAN_RELEASE)
        root = workspace(tmp_path / "ws", fleet)
        r = kpipe(root, "build", "--fleet", "all", "--json")
        assert r.returncode == 1, r.stderr
        out = json.loads(r.stdout)
        assert sorted((b["recipe"], b["kernel"], b["status"]) for b in out["builds"]) == \
            [("fix-a", DEBIAN_RELEASE, "built"), ("fix-b", DEBIAN_RELEASE, "built")], out["builds"]
        running = {x["release"]: x["hosts"] for x in out["running"]}
        assert running[DEBIAN_RELEASE] == sorted([h[0].name, h[1].name])
        nb = {(x["release"], x["code"]): x for x in out["not_built"]}
        assert nb[(OTHER, NO_BUILD_HOST)]["hosts"] == [h[2].name]
        assert nb[(OLD, NO_RECIPE)]["hosts"] == [h[3].name]
        assert nb[("", UNREACHABLE)]["hosts"] == [h[4].name]
        assert "no build host builds" in r.stderr.splitlines()[-2] or "got no build" in r.stderr
        # the human form: the builds table and the `not built` table with each reason
        r = kpipe(root, "build", "--fleet", "all")
        assert r.returncode == 1
        assert "not built" in r.stdout and f"no recipe targets {OLD}" in r.stdout
        assert "cached" in r.stdout  # the same builds again: answered from the store
        # only the hosts that run a buildable kernel: every build made, exit 0
        r = kpipe(root, "build", "--fleet", f"{h[0].name}:{h[1].name}", "--recipe", "fix-a", "--json")
        assert r.returncode == 0, r.stderr
        assert [(b["recipe"], b["status"]) for b in json.loads(r.stdout)["builds"]] == [("fix-a", "cached")]
    finally:
        h[4].start()
        for x in h:
            x.set_release("")


def test_build_fleet_refuses_kernel_options_and_unknown_recipes(simfleet_factory, tmp_path):
    fleet = simfleet_factory(1)
    root = workspace(tmp_path / "ws", fleet)
    r = kpipe(root, "build", "--fleet", "all", "--kernel", DEBIAN_RELEASE)
    assert r.returncode == 2 and "--fleet" in r.stderr and "Traceback" not in r.stderr
    r = kpipe(root, "build", "--fleet", "all", "--recipe", "nope")
    assert r.returncode == 5 and "nope" in r.stderr and "Traceback" not in r.stderr


# -- the audit: a host rebooted into a kernel without an artifact ----------------------------------------------------

@pytest.mark.parametrize("built,want", [
    ({"livepatch-cmdline": {DEBIAN_RELEASE}}, f"kernel changed: build needed for {OTHER}"),
    ({"livepatch-cmdline": {DEBIAN_RELEASE, OTHER}}, f"kernel changed: an artifact for {OTHER} exists"),
])
def test_audit_flags_a_kernel_change_that_needs_a_build(built, want):
    desired = A.desired_from_records([AppliedRecord(1, "r1", "h1", "livepatch-cmdline", "applied", "art1", "a" * 64,
                                                    DEBIAN_RELEASE, False)])
    obs = A.ObservedHost("h1", reachable=True, kernel=OTHER, tainted=0)
    (row,) = A.evaluate_host(desired, obs, built=built).rows
    assert row.status == A.MISSING and row.detail.startswith(want), row.detail
    assert f"host now runs {OTHER}" in row.detail


def test_audit_on_the_fleet_says_which_rebooted_host_needs_a_build(simfleet_factory, tmp_path):
    from test_gates import run, setup

    fleet = simfleet_factory(2)
    moved, stayed = fleet.hosts
    ws, journal, rid = setup(fleet, tmp_path)
    s = run(ws, journal, rid)
    assert s.state == "completed", s
    journal.store.close()
    try:
        moved.set_release(OTHER)
        moved.reboot()  # the patch is gone with the old kernel; the store has no artifact for OTHER
        r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws.root), "audit", "--json"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        rows = {(row["host"], row["patch"]): row for h in json.loads(r.stdout)["hosts"] for row in h["patches"]}
        row = rows[(moved.name, "livepatch_demo")]
        assert row["status"] == "missing" and row["detail"].startswith(f"kernel changed: build needed for {OTHER}")
        assert rows[(stayed.name, "livepatch_demo")]["status"] == "compliant"
    finally:
        moved.set_release("")
        moved.reboot()
