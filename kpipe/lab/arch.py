"""Per-architecture facts the lab needs to boot a kernel under qemu (after virtme-ng's architectures.py).

One `LabArch` per guest architecture: the qemu binary and the Debian package
that ships it, the machine and CPU models, the serial console the guest
kernel writes to, where a Debian kernel package keeps its image, and whether
the PVH entry (x86 only) can be used. `lab_arch()` looks one up by any name
kpipe's kernel parser accepts (x86_64/amd64, aarch64/arm64, ...).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from kpipe.errors import ConfigError


@dataclass(frozen=True)
class LabArch:
    """How to boot one guest architecture under qemu."""

    name: str  # kpipe's canonical arch (kernel.normalize_arch)
    debian_arch: str  # the dpkg architecture of its kernel packages
    qemu: str  # qemu-system-* binary
    qemu_package: str  # the Debian package that ships it
    machine: list[str]  # -machine ... (empty: qemu's default for the binary)
    tcg_cpu: str  # -cpu under TCG
    console: str  # the guest's serial console device (console=...)
    nic: str  # a virtio NIC device model available on that machine
    image_glob: str  # where a Debian linux-image package keeps the kernel (relative, {release})
    pvh: bool  # x86 PVH entry: boot the uncompressed vmlinux (half the guest CPU under TCG)
    kbuild_arch: str = ""  # the kernel's make ARCH= (x86_64 picks the 64-bit x86 config)
    cross_prefix: str = ""  # CROSS_COMPILE= of Debian's cross gcc for this arch
    cross_package: str = ""  # the Debian package of that cross gcc

    def make_vars(self, host_machine: str | None = None) -> list[str]:
        """ARCH= (and CROSS_COMPILE= when the build machine is another arch) for make in a kernel tree."""
        host = (host_machine or platform.machine()).strip().lower()
        out = [f"ARCH={self.kbuild_arch or self.name}"]
        if _ALIASES.get(host, host) != self.name and self.cross_prefix:
            out.append(f"CROSS_COMPILE={self.cross_prefix}")
        return out

    def needs_cross(self, host_machine: str | None = None) -> bool:
        """True when building for this arch on host_machine (default: this machine) needs the cross gcc."""
        return any(v.startswith("CROSS_COMPILE=") for v in self.make_vars(host_machine))

    def accel_args(self, use_kvm: bool | None = None, tb_size_mb: int = 64) -> list[str]:
        """-accel/-cpu: KVM only for the host's own arch with hardware virtualisation, else multi-threaded TCG."""
        kvm = _kvm_usable(self) if use_kvm is None else use_kvm
        if kvm:
            return ["-accel", "kvm", "-cpu", "host"]
        return ["-accel", f"tcg,thread=multi,tb-size={tb_size_mb}", "-cpu", self.tcg_cpu]

    def kernel_image(self, root: Path, release: str) -> Path:
        """The kernel image inside an unpacked linux-image package rooted at root."""
        return root / self.image_glob.format(release=release)


# +rdrand: TCG emulates RDRAND, so the guest's crng is ready at once instead of after
# seconds of jitter entropy (dropbear blocks in getrandom() until then).
X86_64 = LabArch(name="x86_64", debian_arch="amd64", qemu="qemu-system-x86_64", qemu_package="qemu-system-x86",
                 machine=[], tcg_cpu="qemu64,+rdrand", console="ttyS0", nic="virtio-net-pci",
                 image_glob="boot/vmlinuz-{release}", pvh=True, kbuild_arch="x86_64",
                 cross_prefix="x86_64-linux-gnu-", cross_package="gcc-x86-64-linux-gnu")
# `virt` is the only arm64 board with PCIe and no firmware requirement; qemu loads
# the gzip-compressed Image that Debian's arm64 packages install as vmlinuz (and the forge's flat Image).
# pauth-impdef: TCG emulates pointer authentication with an implementation-defined hash instead of
# QARMA5, which costs a large share of guest CPU under `-cpu max` (qemu's docs/system/arm/cpu-features).
AARCH64 = LabArch(name="aarch64", debian_arch="arm64", qemu="qemu-system-aarch64", qemu_package="qemu-system-arm",
                  machine=["-machine", "virt,gic-version=max"], tcg_cpu="max,pauth-impdef=on", console="ttyAMA0",
                  nic="virtio-net-pci", image_glob="boot/vmlinuz-{release}", pvh=False, kbuild_arch="arm64",
                  cross_prefix="aarch64-linux-gnu-", cross_package="gcc-aarch64-linux-gnu")

ARCHES: dict[str, LabArch] = {a.name: a for a in (X86_64, AARCH64)}
_ALIASES = {"amd64": "x86_64", "x86-64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def lab_arch(name: str | None = None) -> LabArch:
    """The registry entry for an architecture name (default: this machine's)."""
    key = (name or platform.machine()).strip().lower()
    key = _ALIASES.get(key, key)
    try:
        return ARCHES[key]
    except KeyError:
        raise ConfigError(f"the lab cannot boot architecture {name!r}",
                          hint=f"supported: {', '.join(sorted(ARCHES))}") from None


def host_has_hw_virt(cpuinfo: str | None = None) -> bool:
    """True when /proc/cpuinfo lists vmx or svm (real KVM; /dev/kvm alone may be a paravirtual PVM)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            if "vmx" in flags or "svm" in flags:
                return True
    return False


def _kvm_usable(arch: LabArch) -> bool:
    same_arch = _ALIASES.get(platform.machine().lower(), platform.machine().lower()) == arch.name
    if not same_arch or not os.path.exists("/dev/kvm"):
        return False
    # aarch64 hosts have no vmx/svm flags; /dev/kvm there is the real thing.
    return host_has_hw_virt() if arch.name == "x86_64" else True
