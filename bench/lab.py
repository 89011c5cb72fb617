"""bench/lab: boot-to-SSH time of one lab VM and of three, and qemu RSS per VM.

    python bench/lab.py [--runs N] [--memory MB] [--json FILE] [--rootfs debian] [--arm64 RELEASE|auto|none]

The kernel package and the base initramfs are warmed first, so the figures
are what a second `kpipe lab up` costs. Target: three VMs ready within 2x the
time of one. With --rootfs, one more boot of one VM with that Debian userland
(systemd as init) is measured and printed beside the busybox figure (its image
is built first if it is not cached: that build is timed apart). With an
aarch64 kernel (--arm64: a release, or `auto` for the newest forged aarch64
kernel, else Debian's arm64 kernel; the default), one arm64 VM (qemu-system-aarch64, TCG) is booted per run
and its boot-to-SSH is printed beside the x86_64 one. Every VM is stopped at
the end (also on failure).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kpipe.lab import Lab, LabConfig, initramfs, resolve_kernel  # noqa: E402  # noqa: E402
from kpipe.lab import vm as vmmod
from kpipe.lab.arch import lab_arch  # noqa: E402
from kpipe.lab.kernel import boot_image  # noqa: E402

TARGET_RATIO = 2.0


def boot(image, folder: Path, n: int, memory: int, rootfs: str = "") -> tuple[float, list[float]]:
    """Seconds from `up` to every VM answering SSH; RSS (MiB) of each qemu once ready."""
    lab = Lab(folder, prefix="bench")
    try:
        t0 = time.monotonic()
        st = lab.up(image, LabConfig(vms=n, memory_mb=memory, rootfs=rootfs))
        seconds = time.monotonic() - t0
        rss = [vmmod.rss_kib(v.pid) / 1024 for v in st.vms]
        return seconds, rss
    finally:
        lab.down()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2, help="boots per configuration (median reported)")
    ap.add_argument("--memory", type=int, default=256, help="guest memory in MiB")
    ap.add_argument("--kernel", default=None, help="Debian kernel release (default: the current one)")
    ap.add_argument("--json", dest="json_out", default="", help="also write the figures to this file")
    ap.add_argument("--rootfs", default="", help="also boot one VM with this userland (debian, debian-selinux)")
    ap.add_argument("--arm64", default="auto",
                    help="aarch64 kernel release to boot beside x86_64 (auto: the newest forged one, else Debian's "
                    "arm64 kernel; none: skip)")
    args = ap.parse_args()
    arm64 = _arm64_kernel(args.arm64)

    t0 = time.monotonic()
    image = resolve_kernel(args.kernel, None, None)
    lab_cache = Lab(Path(tempfile.gettempdir())).cache_dir
    initramfs.build_base(image, lab_cache)
    booted = boot_image(image, lab_cache)
    print(f"kernel {image.release} ({'PVH vmlinux' if booted != image.vmlinuz else 'bzImage'}); cache warm in "
          f"{time.monotonic() - t0:.1f} s; accel: {' '.join(lab_arch('x86_64').accel_args()[:4])}; "
          f"{args.runs} run(s) each, "
          f"-m {args.memory}")

    results: dict[int, list[float]] = {1: [], 3: []}
    rss: list[float] = []
    arm64_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="kpipe-bench-lab-") as tmp:
        for run in range(args.runs):
            for n in (1, 3):
                seconds, r = boot(image, Path(tmp) / f"r{run}-n{n}", n, args.memory)
                results[n].append(seconds)
                rss += r
                print(f"  run {run + 1}: {n} VM(s) ready in {seconds:5.1f} s, RSS "
                      + ", ".join(f"{x:.0f}" for x in r) + " MiB")
            if arm64 is not None:
                seconds, r = boot(arm64, Path(tmp) / f"r{run}-arm64", 1, args.memory)
                arm64_s.append(seconds)
                print(f"  run {run + 1}: 1 aarch64 VM ({arm64.release}, TCG) ready in {seconds:5.1f} s, "
                      f"RSS {r[0]:.0f} MiB")
        systemd_s = None
        if args.rootfs:
            from kpipe.lab import rootfs

            tb = time.monotonic()
            rootfs.ensure_image(rootfs.kind_of(args.rootfs), image, lab_cache, print)
            initramfs.build_base(image, lab_cache, rootfs=True)
            print(f"  {args.rootfs} image and rootfs initramfs ready in {time.monotonic() - tb:.1f} s")
            systemd_s, r = boot(image, Path(tmp) / "rootfs", 1, max(args.memory, rootfs.MIN_MEMORY_MB), args.rootfs)
            print(f"  --rootfs {args.rootfs}: 1 VM (systemd) ready in {systemd_s:5.1f} s, RSS {r[0]:.0f} MiB")
    one, three = statistics.median(results[1]), statistics.median(results[3])
    ratio = three / one
    figures = {"one_vm_s": round(one, 2), "three_vms_s": round(three, 2), "ratio": round(ratio, 2),
               "target_ratio": TARGET_RATIO, "rss_mib_median": round(statistics.median(rss), 1),
               "rss_mib_max": round(max(rss), 1), "runs": args.runs, "memory_mb": args.memory,
               "kernel": image.release, "rootfs": args.rootfs or None,
               "systemd_one_vm_s": round(systemd_s, 2) if systemd_s is not None else None,
               "arm64_kernel": arm64.release if arm64 is not None else None,
               "arm64_one_vm_s": round(statistics.median(arm64_s), 2) if arm64_s else None}
    print(f"boot-to-SSH: 1 VM {one:.1f} s, 3 VMs {three:.1f} s -> ratio {ratio:.2f}x "
          f"(target <= {TARGET_RATIO:.1f}x: {'met' if ratio <= TARGET_RATIO else 'MISSED'})")
    if systemd_s is not None:
        print(f"boot-to-SSH, one VM: busybox initramfs {one:.1f} s, {args.rootfs} with systemd {systemd_s:.1f} s "
              f"({systemd_s / one:.1f}x)")
    if arm64_s:
        print(f"boot-to-SSH, one VM: x86_64 {one:.1f} s, aarch64 {statistics.median(arm64_s):.1f} s "
              f"({arm64.release if arm64 else ''}, {statistics.median(arm64_s) / one:.1f}x)")
    print(f"qemu RSS per VM: median {figures['rss_mib_median']:.0f} MiB, max {figures['rss_mib_max']:.0f} MiB")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n")
    left = [v.pid for v in vmmod.STARTED if vmmod.alive(v)]
    if left:
        print(f"qemu left running: {left}", file=sys.stderr)
        return 1
    return 0


def _arm64_kernel(choice: str):  # -> KernelImage | None
    """The aarch64 kernel to boot beside x86_64: a release, the newest forged one (auto), or none."""
    from kpipe.forged import forged_kernels
    from kpipe.lab.forge import find_forged_kernel

    if choice == "none":
        return None
    if choice != "auto":
        return resolve_kernel(choice, None, None)
    newest = next((k for k in forged_kernels() if k.arch == "aarch64"), None)
    if newest is None:  # Debian's own arm64 kernel of the host's suite boots the same lab (no livepatch)
        return resolve_kernel("debian", None, None, arch="aarch64")
    return find_forged_kernel(newest.release)


if __name__ == "__main__":
    sys.exit(main())
