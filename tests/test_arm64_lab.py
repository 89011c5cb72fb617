"""The lab on aarch64 with Debian's own arm64 kernel (marker `vm`; no forge needed): qemu-system-aarch64 `-M virt`
under TCG, Debian's arm64 busybox/dropbear/kmod in the initramfs, and a mixed lab of an aarch64 and an x86_64
group in one `kpipe lab up` with one inventory. Debian 12's arm64 kernel has no livepatch support at all (the
reason the arm64 forge builds sid's 7.2): the test shows it from inside the VM."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from arm64_support import TIMINGS, kp, need_qemu_aarch64  # noqa: E402
from forge_support import need_real  # noqa: E402
from kpipe.elf.programs import elf_machine  # noqa: E402
from kpipe.lab.arch import AARCH64  # noqa: E402
from kpipe.lab.kernel import default_cache_dir  # noqa: E402
from kpipe.lab.lab import Lab  # noqa: E402
from kpipe.lab.userland import foreign_userland  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]


def test_the_arm64_userland_is_debians_arm64_build_with_every_library():
    need_real("dpkg-deb is not installed", shutil.which("dpkg-deb") is not None)
    ul = foreign_userland(AARCH64, default_cache_dir())
    assert ul.source.endswith("/arm64")
    for path in (ul.busybox, ul.dropbear, ul.sftp_server, ul.kmod, *(p for _d, p in ul.libs)):
        assert elf_machine(path) == "EM_AARCH64", path
    dests = {d for d, _p in ul.libs}
    assert "lib/ld-linux-aarch64.so.1" in dests  # dropbear's PT_INTERP
    assert any(d.endswith("/libc.so.6") for d in dests)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Iterator[Path]:
    """`lab up --arch aarch64 --kernel debian --group debian:1`: Debian's arm64 kernel, then its amd64 one."""
    need_qemu_aarch64()
    ws = tmp_path_factory.mktemp("arm64-lab")
    (ws / "kpipe.toml").write_text("[workspace]\n")
    t = time.monotonic()
    kp(ws, "lab", "up", "--arch", "aarch64", "--kernel", "debian", "--group", "debian:1", "--timeout", "900",
       "--no-progress", timeout=1200)
    TIMINGS["debian_mixed_lab_up"] = time.monotonic() - t
    try:
        yield ws
    finally:
        kp(ws, "lab", "down")


def _sh(ws: Path, vm: str, script: str) -> str:
    argv = Lab(ws / ".lab").ssh_argv(vm, ["sh", "-c", script])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r
    return r.stdout


def test_arm64_and_x86_64_vms_answer_in_one_lab(mixed: Path):
    status = json.loads(kp(mixed, "lab", "status", "--json").stdout)
    assert status["kernel"]["arch"] == "aarch64" and status["kernel"]["release"].endswith("-arm64")
    assert [v["name"] for v in status["vms"]] == ["lab1", "lab2"] and all(v["alive"] for v in status["vms"])
    arm = _sh(mixed, "lab1", "uname -m; cat /proc/cmdline; test -d /sys/kernel/livepatch && echo lp || echo nolp")
    machine, cmdline, lp = arm.split("\n")[:3]
    assert machine == "aarch64" and "console=ttyAMA0" in cmdline
    assert lp == "nolp"  # Debian 12's arm64 kernel: no livepatch
    assert "virtio_net" in _sh(mixed, "lab1", "cat /proc/modules")  # Debian's arm64 module, loaded by arm64 kmod
    assert _sh(mixed, "lab2", "uname -m").strip() == "x86_64"


def test_the_mixed_lab_has_one_inventory_with_a_group_per_arch(mixed: Path):
    from kpipe.fleet.inventory import load_inventory

    inv_file = mixed / ".lab" / "inventory.yml"
    lab = yaml.safe_load(inv_file.read_text())["all"]["children"]["lab"]
    assert set(lab["hosts"]) == {"lab1", "lab2"}
    assert lab["children"] == {"lab_aarch64": {"hosts": {"lab1": None}}, "lab_x86_64": {"hosts": {"lab2": None}}}
    groups = load_inventory(None, [inv_file]).groups
    assert groups["lab_aarch64"] == ["lab1"] and sorted(groups["lab"]) == ["lab1", "lab2"]
    known = (mixed / ".lab" / "known_hosts").read_text().splitlines()
    assert len(known) == 2 and all(line.startswith("[127.0.0.1]:") for line in known)  # both pinned
