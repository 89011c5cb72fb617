"""Fixtures of the UOS-lineage tests: Debian bullseye's 5.10 kernel and a bullseye kbuild build host.

Both are made at test time and cached across runs by their inputs: the kernel
image under ~/.cache/kpipe/lab (kernels/<release>@bullseye-<key>, fetched with a
private apt index, never the host's sources), the chroot under
~/.cache/kpipe/forge/chroots (mmdebstrap, niced). The 5.10 release is
discovered from bullseye's index (the newest 5.10.*-amd64), never hard-coded.
Without root, mmdebstrap or the network the tests skip, unless
KPIPE_REQUIRE_REAL=1 makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kpipe.lab.buildhost import KBUILD_HOST_PATHS, BuildHostChroot, kbuild_host_packages
from kpipe.lab.kernel import AptSuite, KernelImage, default_cache_dir, fetch_debian_kernel

SUITE = os.environ.get("KPIPE_UOS510_SUITE", "bullseye")
PREFIX = os.environ.get("KPIPE_UOS510_PREFIX", "5.10")
NICE = 10
TIMINGS: dict[str, float] = {}  # printed with -s: the report's cold/warm numbers


def need_real(what: str, ok: bool) -> None:
    """Skip when a prerequisite is missing; fail instead under KPIPE_REQUIRE_REAL=1."""
    if ok:
        return
    if os.environ.get("KPIPE_REQUIRE_REAL") == "1":
        pytest.fail(f"KPIPE_REQUIRE_REAL=1 but {what}")
    pytest.skip(what)


def need_tools(*tools: str) -> None:
    for tool in tools:
        need_real(f"{tool} is not installed (scripts/setup.sh)", shutil.which(tool) is not None)


def _nice() -> None:
    # The fixtures share 2 cores with other work: lower this process's priority once (children inherit it).
    if os.nice(0) < NICE:
        os.nice(NICE - os.nice(0))


_MEMO: dict[str, Any] = {}


def release_510() -> str:
    """bullseye's newest 5.10 release (e.g. 5.10.0-32-amd64), from its Packages index."""
    if "release" not in _MEMO:
        need_tools("apt-get", "apt-cache", "dpkg-deb")
        t = time.monotonic()
        _MEMO["release"] = AptSuite(SUITE, default_cache_dir()).newest_release(PREFIX)
        TIMINGS["discover_release"] = time.monotonic() - t
    return str(_MEMO["release"])


def kernel_510() -> KernelImage:
    """The 5.10 kernel image, fetched once into the lab cache."""
    if "kernel" not in _MEMO:
        release = release_510()
        _nice()
        t = time.monotonic()
        _MEMO["kernel"] = fetch_debian_kernel(release, suite=SUITE)
        TIMINGS["kernel_fetch"] = time.monotonic() - t
    k: KernelImage = _MEMO["kernel"]
    return k


def start_buildhost(folder: Path) -> dict[str, Any]:
    """The bullseye chroot's sshd on a free loopback port (the chroot made once, niced, cached by inputs)."""
    need_real("the bullseye build host needs root (mmdebstrap, chroot, mount namespaces)", os.geteuid() == 0)
    need_tools("mmdebstrap", "unshare", "ssh-keygen")
    release = release_510()
    _nice()
    t = time.monotonic()
    state = BuildHostChroot(folder).up(SUITE, packages=kbuild_host_packages(SUITE, release), forced=(),
                                       host_paths=KBUILD_HOST_PATHS,
                                       progress=lambda m: sys.stderr.write(f"buildhost: {m}\n"))
    TIMINGS["buildhost_up"] = time.monotonic() - t
    return state
