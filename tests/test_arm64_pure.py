"""aarch64 support without a VM or a build: the registry's make variables, the forge's arm64 target, kernel image
arch detection, the arm64 guest userland's pieces, mixed-lab inventories and cross build hosts."""

from __future__ import annotations

import gzip
import json
import struct
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from doubles.buildkit import kbuild_spec, write_workspace  # noqa: E402
from kpipe.builder.base import get_builder  # noqa: E402
from kpipe.builder.hosts import refusal_reasons, select_hosts  # noqa: E402
from kpipe.builder.kbuild import cross_make_args  # noqa: E402
from kpipe.errors import ConfigError  # noqa: E402
from kpipe.forged import ForgedKernel, forged_kernel_entries  # noqa: E402
from kpipe.lab import forge  # noqa: E402
from kpipe.lab.arch import AARCH64, X86_64  # noqa: E402
from kpipe.lab.initramfs import applets_in_binary  # noqa: E402
from kpipe.lab.kernel import KernelImage, image_arch  # noqa: E402
from kpipe.lab.lab import LabState, guest_arch, render_inventory  # noqa: E402
from kpipe.lab.vm import VmProcess, VmSpec  # noqa: E402
from kpipe.workspace import BuildHost  # noqa: E402

ARM64_RELEASE = "7.2.13-kforge-0123abcd"


# -- the registry's make variables ------------------------------------------------------------------------------

def test_make_vars_cross_compile_only_from_another_arch():
    assert AARCH64.make_vars("x86_64") == ["ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-"]
    assert AARCH64.make_vars("aarch64") == ["ARCH=arm64"]  # a native arm64 build host: its own gcc
    assert AARCH64.make_vars("arm64") == ["ARCH=arm64"]
    assert X86_64.make_vars("x86_64") == ["ARCH=x86_64"]
    assert AARCH64.needs_cross("x86_64") and not AARCH64.needs_cross("aarch64")


def test_forge_make_argv_for_arm64_and_x86_64_unchanged():
    src = Path("/k/src")
    assert forge.make_argv(["vmlinux", "Image"], 2, src=src, arch=AARCH64, host_machine="x86_64") == \
        ["make", "-C", "/k/src", "ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-", "-j2", "vmlinux", "Image"]
    assert forge.make_argv(["vmlinux"], 2, src=src, arch=AARCH64, host_machine="aarch64") == \
        ["make", "-C", "/k/src", "ARCH=arm64", "-j2", "vmlinux"]
    assert forge.make_argv(["bzImage"], 2, src=src) == ["make", "-C", "/k/src", "ARCH=x86_64", "-j2", "bzImage"]


def test_the_arm64_fragment_asks_for_what_the_lab_and_livepatch_need():
    target = forge.FORGE_TARGETS["aarch64"]
    text = resources.files("kpipe").joinpath("lab_assets", target.fragment).read_text()
    frag = forge.check_fragment(text, target.fragment)
    for name in ("SERIAL_AMBA_PL011", "SERIAL_AMBA_PL011_CONSOLE", "PCI_HOST_GENERIC", "VIRTIO_PCI", "VIRTIO_MMIO",
                 "VIRTIO_NET", "LIVEPATCH", "KALLSYMS_ALL", "DYNAMIC_FTRACE", "MODULES", "MODULE_UNLOAD",
                 "MODULE_SIG", "MODULE_SIG_ALL", "SYSTEM_TRUSTED_KEYRING", "DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT",
                 "DEVTMPFS", "DEVTMPFS_MOUNT", "BLK_DEV_INITRD", "RD_GZIP"):
        assert frag.get(f"CONFIG_{name}") == "y", name
    # x86-only options would be dropped by olddefconfig and stop the forge
    assert not any(k in frag for k in ("CONFIG_PVH", "CONFIG_UNWINDER_ORC", "CONFIG_SERIAL_8250", "CONFIG_64BIT"))
    assert target.images[0] == ("arch/arm64/boot/Image", "Image")
    assert forge.FORGE_TARGETS["x86_64"].fragment == forge.DEFAULT_FRAGMENT


def test_forge_refuses_an_arch_it_cannot_build(tmp_path):
    with pytest.raises(ConfigError, match="riscv64"):
        forge.forge(forge.parse_source("debian:sid/7.2"), arch="riscv64", cache_dir=tmp_path)


# -- forged kernels of another arch in the catalog and the lab ---------------------------------------------------

def _forged_folder(tmp_path: Path, arch: str | None) -> Path:
    folder = tmp_path / "kernels" / "7.2-0123abcd"
    folder.mkdir(parents=True)
    record = {"release": ARM64_RELEASE, "source": "debian:sid/7.2", "package_version": "7.2.13-1", "key": "0123abcd",
              "complete": True, "created_at": 1.0}
    if arch:
        record["arch"] = arch
    (folder / "forge.json").write_text(json.dumps(record))
    return folder


def test_an_arm64_forged_kernel_is_aarch64_in_the_catalog_and_boots_its_image(tmp_path):
    folder = _forged_folder(tmp_path, "aarch64")
    k = ForgedKernel.load(folder)
    assert k is not None and k.arch == "aarch64" and k.boot_image == folder / "Image"
    [entry] = forged_kernel_entries(tmp_path)
    assert entry.arch == "aarch64"  # validation expects EM_AARCH64 and the "aarch64" vermagic from this
    assert forge.find_forged_kernel(ARM64_RELEASE, tmp_path) == KernelImage(
        ARM64_RELEASE, folder / "Image", k.modules_dir, "forge", "aarch64")


def test_a_forged_kernel_without_an_arch_record_stays_x86_64(tmp_path):
    k = ForgedKernel.load(_forged_folder(tmp_path, None))
    assert k is not None and k.arch == "x86_64" and k.boot_image.name == "bzImage"


def _arm64_image_header() -> bytes:
    head = bytearray(64)
    head[0x38:0x3C] = b"ARM\x64"
    return bytes(head) + b"\0" * 1024


def test_image_arch_reads_arm64_images_plain_and_gzipped_and_x86_bzimages(tmp_path):
    img = tmp_path / "Image"
    img.write_bytes(_arm64_image_header())
    gz = tmp_path / "vmlinuz-arm64"
    gz.write_bytes(gzip.compress(_arm64_image_header()))
    bz = tmp_path / "bzImage"
    data = bytearray(0x400)
    data[0x202:0x206] = b"HdrS"
    bz.write_bytes(bytes(data))
    elf = tmp_path / "vmlinux"
    elf.write_bytes(b"\x7fELF" + b"\2\1\1" + b"\0" * 9 + struct.pack("<HH", 2, 183) + b"\0" * 64)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a kernel")
    assert [image_arch(p) for p in (img, gz, bz, elf, junk, tmp_path / "missing")] == \
        ["aarch64", "aarch64", "x86_64", "aarch64", None, None]


def test_lab_boots_the_kernels_own_arch_and_refuses_a_contradicting_arch(tmp_path):
    img = tmp_path / "Image"
    img.write_bytes(_arm64_image_header())
    k = KernelImage(ARM64_RELEASE, img, tmp_path, "user", "")
    assert guest_arch(k).name == "aarch64"
    assert guest_arch(k, "arm64").name == "aarch64"
    with pytest.raises(ConfigError, match="built for aarch64"):
        guest_arch(k, "x86_64")


def test_an_arm64_vm_boots_qemu_system_aarch64_on_the_virt_board_with_the_pl011_console(tmp_path):
    argv = VmSpec("a1", tmp_path / "Image", tmp_path / "initrd", 2222, tmp_path, append="console=ttyAMA0",
                  arch=AARCH64, use_kvm=False).argv()
    assert argv[0] == "qemu-system-aarch64"
    assert argv[argv.index("-machine") + 1].startswith("virt")
    assert argv[argv.index("-cpu") + 1].startswith("max")
    assert "virtio-net-pci,netdev=n0,romfile=" in argv


def test_busybox_applets_are_read_from_a_foreign_binary():
    data = b"\x00junk\x00[\x00[[\x00acpid\x00ash\x00cat\x00zcat\x00\x00\xff\xfe"
    assert applets_in_binary(data) == ["[", "[[", "acpid", "ash", "cat", "zcat"]
    with pytest.raises(Exception, match="applet table"):
        applets_in_binary(b"no table here")


def test_a_mixed_lab_inventory_has_one_child_group_per_arch(tmp_path):
    vms = [VmProcess("lab1", 1, 1, 2201, str(tmp_path / "lab1")), VmProcess("lab2", 2, 2, 2202, str(tmp_path / "l2"))]
    st = LabState(tmp_path, {}, vms, str(tmp_path / "id"), str(tmp_path / "kh"), str(tmp_path / "inv"),
                  extra={"groups": [{"arch": "x86_64", "vms": ["lab1"]}, {"arch": "aarch64", "vms": ["lab2"]}]})
    doc = yaml.safe_load(render_inventory(st))
    lab = doc["all"]["children"]["lab"]
    assert set(lab["hosts"]) == {"lab1", "lab2"}
    assert lab["children"] == {"lab_x86_64": {"hosts": {"lab1": None}}, "lab_aarch64": {"hosts": {"lab2": None}}}
    assert lab["hosts"]["lab2"]["kpipe_lab_arch"] == "aarch64"
    from kpipe.fleet.inventory import load_inventory

    inv = tmp_path / "inventory.yml"
    inv.write_text(render_inventory(st))
    groups = load_inventory(None, [inv]).groups  # ansible-core reads the nested groups
    assert groups["lab_aarch64"] == ["lab2"] and sorted(groups["lab"]) == ["lab1", "lab2"]
    single = LabState(tmp_path, {}, vms[:1], "i", "k", "v")
    assert "children" not in yaml.safe_load(render_inventory(single))["all"]["children"]["lab"]


def test_cli_group_option_parses_release_and_count():
    from kpipe.cli.lab import parse_group

    assert parse_group(f"{ARM64_RELEASE}:2") == (ARM64_RELEASE, 2)
    assert parse_group(ARM64_RELEASE) == (ARM64_RELEASE, 1)
    for bad in (":2", f"{ARM64_RELEASE}:0", f"{ARM64_RELEASE}:x", f"{ARM64_RELEASE}:17"):
        with pytest.raises(ConfigError, match="--group"):
            parse_group(bad)


# -- cross builds --------------------------------------------------------------------------------------------------

def test_cross_make_args_follow_the_target_kernels_arch():
    assert cross_make_args("aarch64", "x86_64") == ["ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-"]
    assert cross_make_args("arm64", "x86_64") == ["ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-"]
    assert cross_make_args("aarch64", "aarch64") == []  # native: kbuild's own defaults
    assert cross_make_args("x86_64", "x86_64") == []
    assert cross_make_args("", "x86_64") == [] and cross_make_args("unknown", "x86_64") == []


@pytest.fixture
def cross_ws(tmp_path):
    return write_workspace(tmp_path / "ws", [
        {"name": "x86", "arch": "x86_64", "cross_arches": ["aarch64"], "kernels": ["*"]},
        {"name": "arm", "arch": "aarch64", "kernels": ["*"]},
    ], [{"release": ARM64_RELEASE, "arch": "aarch64", "headers": "/k/src"},
        {"release": "6.1.0-57-amd64", "arch": "x86_64"}])


def test_kbuild_cross_builds_an_arm64_kernel_on_an_x86_64_host_on_makes_command_line(cross_ws):
    spec = kbuild_spec(cross_ws, release=ARM64_RELEASE)
    plan = get_builder("kbuild").plan(spec, cross_ws.build_hosts[0], "/w/k")
    assert plan.argv == ("env", "-u", "ARCH", "make", "-C", "/k/src", "M=/w/k/src",
                         "ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-", "modules")
    native = get_builder("kbuild").plan(spec, cross_ws.build_hosts[1], "/w/k")
    assert native.argv == ("env", "-u", "ARCH", "make", "-C", "/k/src", "M=/w/k/src", "modules")
    x86 = get_builder("kbuild").plan(kbuild_spec(cross_ws, release="6.1.0-57-amd64"), cross_ws.build_hosts[0], "/w/k")
    assert not any(a.startswith(("ARCH=", "CROSS_COMPILE=")) for a in x86.argv)


def test_the_planner_prefers_a_native_host_and_accepts_a_declared_cross_host(cross_ws):
    x86, arm = cross_ws.build_hosts
    assert x86.cross_arches == ("aarch64",)
    assert [h.name for h in select_hosts([x86, arm], ARM64_RELEASE, "aarch64")] == ["arm", "x86"]
    assert [h.name for h in select_hosts([x86], ARM64_RELEASE, "aarch64")] == ["x86"]
    plain = BuildHost("plain", arch="x86_64")
    assert refusal_reasons(plain, ARM64_RELEASE, "aarch64") == ("arch x86_64 != kernel arch aarch64",)
    assert refusal_reasons(arm, "6.1.0-57-amd64", "x86_64")  # nobody declared x86_64 cross builds on arm
