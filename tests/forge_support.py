"""Fixtures of the forge tests: the forged kernel and the chroot build host, built at test time.

Both are cached across runs by their inputs (~/.cache/kpipe/forge, or
$KPIPE_FORGE_CACHE): the first run on a machine makes the chroot and builds the
kernel (about 10+ minutes on 2 cores, niced), later runs find them. Without
root or mmdebstrap the tests skip, unless KPIPE_REQUIRE_REAL=1 makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kpipe.lab.buildhost import BuildHostChroot, namespace_pids
from kpipe.lab.forge import ForgedKernel, forge, parse_source

FORGE_SOURCE = os.environ.get("KPIPE_FORGE_SOURCE", "debian:trixie/6.12")
KLP_SOURCE = os.environ.get("KPIPE_KLP_SOURCE", "debian:sid/7.2")
ARM64_SOURCE = os.environ.get("KPIPE_ARM64_FORGE_SOURCE", "debian:sid/7.2")
# Every kernel the tests forge, as (source, arch): tests/forge_prewarm.py forges them side by side
# when CI starts on a machine that has never forged (the fixtures then wait on each kernel's lock).
FORGES = ((FORGE_SOURCE, "x86_64"), (KLP_SOURCE, "x86_64"), (ARM64_SOURCE, "aarch64"))
TIMINGS: dict[str, float] = {}  # printed with -s; the report's cold/warm numbers come from here


def need_real(what: str, ok: bool) -> None:
    """Skip when a prerequisite is missing; fail instead under KPIPE_REQUIRE_REAL=1."""
    if ok:
        return
    if os.environ.get("KPIPE_REQUIRE_REAL") == "1":
        pytest.fail(f"KPIPE_REQUIRE_REAL=1 but {what}")
    pytest.skip(what)


def need_forge_tools() -> None:
    need_real("the forge needs root (chroot, mount namespaces)", os.geteuid() == 0)
    for tool in ("mmdebstrap", "unshare", "ssh-keygen", "openssl"):
        need_real(f"{tool} is not installed (scripts/setup.sh)", shutil.which(tool) is not None)


_FORGED: dict[str, ForgedKernel] = {}


def forged_kernel() -> ForgedKernel:
    """The session's forged kernel (built once per input set, then cached on disk)."""
    if "k" not in _FORGED:
        need_forge_tools()
        t = time.monotonic()
        _FORGED["k"] = forge(parse_source(FORGE_SOURCE),
                             progress=lambda m: sys.stderr.write(f"forge: {m}\n"))
        TIMINGS["forge"] = time.monotonic() - t
    return _FORGED["k"]


@pytest.fixture(scope="session")
def forged() -> ForgedKernel:
    return forged_kernel()


@pytest.fixture(scope="session")
def forge_buildhost(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The forge chroot's sshd on a free loopback port; stopped by PID at the end (no process left)."""
    need_forge_tools()
    bh = BuildHostChroot(tmp_path_factory.mktemp("buildhost"))
    suite, version = FORGE_SOURCE.split(":", 1)[1].split("/")
    t = time.monotonic()
    state = bh.up(suite, version=version)
    TIMINGS["buildhost_up"] = time.monotonic() - t
    ns = os.readlink(f"/proc/{state['pid']}/ns/mnt")
    try:
        yield {**state, "folder": bh.folder}
    finally:
        bh.down()
        left = namespace_pids(ns) if ns != os.readlink("/proc/self/ns/mnt") else []
        assert not left, f"build host processes left running: {left}"


def workspace_with_buildhost(root: Path, state: dict, *, name: str = "forge-trixie") -> Path:
    """A workspace whose only build host is the chroot sshd, reached with strict known_hosts."""
    from kpipe.lab.buildhost import build_host_toml

    root.mkdir(parents=True, exist_ok=True)
    (root / "kpipe.toml").write_text(
        "[workspace]\n\n[ssh]\n"
        f"known_hosts = \"{state['known_hosts']}\"\naccept_new_host_keys = false\n\n"
        + build_host_toml(name, int(state["port"]), Path(state["identity_file"]))
        + 'workdir = "/root/kpipe-builds"\n')
    return root
