"""Benchmarks of module validation (issue 3). Run: python bench/validate.py [--quick]

1. Warm validation: process time of validating the sample livepatch module for the installed headers' kernel
   (tests/kenv.py: the newest, or KPIPE_TEST_KERNEL) against a full, already cached index
   (Module.symvers + a kallsyms-sized symbol source). Target < 150 ms.
2. Index build from a large symbol source: a generated ELF with 200k symbols (vmlinux-sized .symtab),
   kpipe's raw .symtab scan vs `nm` on the same file. Target: within 2x of nm.
3. Signature verification throughput vs `sha256sum` over the same signed files. Target >= 0.5x.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))



def discovered_release() -> str:
    """The installed headers' release, discovered as the tests do; exit with what is missing otherwise."""
    import kenv

    try:
        return kenv.discover().release
    except kenv.KernelEnvMissing as e:
        sys.exit(f"bench/validate.py: {e}")


RELEASE = discovered_release()


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def row(name: str, figure: str, baseline: str, ratio: str, target: str, ok: bool) -> None:
    print(f"{name:<34} {figure:>14} {baseline:>16} {ratio:>9}  {target:<18} {'PASS' if ok else 'MISS'}")


def generate_big_elf(work: Path, n: int) -> Path:
    """An ELF object with n function symbols (assembled by gcc: no compiler work, vmlinux-sized symtab)."""
    out = work / f"big{n}.o"
    if out.is_file():
        return out
    src = work / f"big{n}.s"
    with open(src, "w") as f:
        f.write(".text\n")
        for i in range(n):
            name = f"kpipe_bench_function_{i:06d}"
            if i % 3:
                f.write(f".globl {name}\n")
            f.write(f".type {name}, @function\n{name}:\n\tret\n.size {name}, .-{name}\n")
    subprocess.run(["gcc", "-c", "-o", str(out), str(src)], check=True)
    return out


def bench_warm_validation(work: Path, rounds: int) -> tuple[float, float]:
    from kpipe.elf import symbols as ks
    from kpipe.validation import validate_module
    from kpipe.workspace import load_workspace
    from test_elf_support import kallsyms_text, sample_module

    (work / "ws").mkdir(exist_ok=True)
    (work / "ws" / "kpipe.toml").write_text('[workspace]\nstore = ".kpipe"\n')
    ws = load_workspace(work / "ws")
    # A full-size symbol index: 150k kallsyms lines (a distro vmlinux has ~120-200k) + the real Module.symvers.
    full = {f"sym_{i}": 1 for i in range(150_000)}
    full["cmdline_proc_show"] = 1
    ksyms = work / "kallsyms"
    ksyms.write_text(kallsyms_text(full))
    ks.add_file(ws.store, RELEASE, ksyms)
    module = sample_module()
    report = validate_module(ws, module, RELEASE)  # warm-up: imports, caches, schema
    assert report.ok, [f for f in report.findings if f.severity == "error"]
    assert any("kallsyms" in s for s in report.symbol_sources)
    times = []
    for _ in range(rounds):
        t0 = time.process_time()
        validate_module(ws, module, RELEASE)
        times.append(time.process_time() - t0)
    # the whole CLI process, for reference (interpreter start and imports included)
    c0 = children_cpu()
    subprocess.run(["kpipe", "validate", str(module), "--kernel", RELEASE], cwd=work / "ws", capture_output=True,
                   check=True)
    return statistics.median(times), children_cpu() - c0


def bench_index_build(work: Path, n: int, rounds: int) -> tuple[float, float, int]:
    from kpipe.elf.symbols import parse_elf_symbols

    big = generate_big_elf(work, n)
    data_path = big
    ours = []
    for _ in range(rounds):
        t0 = time.process_time()
        src = parse_elf_symbols(data_path.read_bytes(), str(big))
        ours.append(time.process_time() - t0)
    count = sum(sum(c.values()) for c in src.objects.values())
    assert count == n, (count, n)  # every generated function symbol, nothing else
    theirs = []
    for _ in range(rounds):
        c0 = children_cpu()
        with open(os.devnull, "w") as null:
            subprocess.run(["nm", str(big)], stdout=null, check=True)
        theirs.append(children_cpu() - c0)
    return statistics.median(ours), statistics.median(theirs), count


def bench_verification(work: Path, copies: int) -> tuple[float, float, int]:
    from kpipe.elf.sign import sign_bytes
    from kpipe.elf.signature import load_certificates, verify_module
    from test_elf_support import make_signing_cert, sample_bytes

    key, cert = make_signing_cert("rsa")
    certs = load_certificates(cert)
    big = generate_big_elf(work, 200_000).read_bytes()
    files = []
    for i in range(copies):
        payload = (sample_bytes() if i % 2 else big) + i.to_bytes(4, "little")
        p = work / f"signed{i}.ko"
        p.write_bytes(sign_bytes(payload, key, cert, "sha256"))
        files.append(p)
    total = sum(p.stat().st_size for p in files)
    subprocess.run(["sha256sum", *map(str, files)], capture_output=True, check=True)  # page cache warm
    t0 = time.perf_counter()
    for p in files:
        v = verify_module(p.read_bytes(), certs)
        assert v.ok, v
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run(["sha256sum", *map(str, files)], capture_output=True, check=True)
    theirs = time.perf_counter() - t0
    return total / ours, total / theirs, total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and a smaller ELF")
    args = ap.parse_args()
    n_syms = 50_000 if args.quick else 200_000
    rounds = 3 if args.quick else 7
    work = Path(tempfile.mkdtemp(prefix="kpipe-bench-validate-"))
    try:
        print(f"{'benchmark':<34} {'kpipe':>14} {'baseline':>16} {'ratio':>9}  {'target':<18} result")
        warm, cli = bench_warm_validation(work, rounds * 3)
        row("warm validation (process time)", f"{warm * 1000:.1f} ms", "150 ms (target)", f"{warm / 0.150:.2f}x",
            "< 150 ms", warm < 0.150)
        row("  whole `kpipe validate` process", f"{cli * 1000:.0f} ms", "-", "-", "(reference)", True)
        ours, nm, count = bench_index_build(work, n_syms, rounds)
        row(f"index build, {count} symbols", f"{ours * 1000:.0f} ms", f"nm {nm * 1000:.0f} ms", f"{ours / nm:.2f}x",
            "<= 2x nm", ours <= 2 * nm)
        ours_tp, sha_tp, total = bench_verification(work, 6 if args.quick else 12)
        row(f"verify throughput ({total / 1e6:.0f} MB)", f"{ours_tp / 1e6:.0f} MB/s",
            f"sha256sum {sha_tp / 1e6:.0f} MB/s", f"{ours_tp / sha_tp:.2f}x", ">= 0.5x sha256sum",
            ours_tp >= 0.5 * sha_tp)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
