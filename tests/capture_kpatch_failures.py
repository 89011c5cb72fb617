"""Capture real kpatch-build failure logs into tests/data/kpatch-build/ (run as root, takes a few minutes).

    python3 tests/capture_kpatch_failures.py [case ...]

Uses the forge's cached kernel (`kpipe lab forge --source debian:trixie/6.12`, built here if missing) and
its trixie chroot as a build host (`kpipe lab buildhost`), and runs Debian's kpatch-build there over SSH,
niced, one case after the other, exactly as kpipe would: `env -u ARCH kpatch-build -s -c -v -a -n -o
PATCH` with its own CACHEDIR. Each log holds what kpipe's runner stores for a failed build: the tool's
combined stdout/stderr, then `$CACHEDIR/build.log` (here trimmed: the orphan-section warnings, which are
nearly all of its 20 MB, dropped, and only the tail kept). The patches are made from the forged tree
itself (so they have the right context) and saved beside the logs.
"""

from __future__ import annotations

import difflib
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OUT = REPO / "tests" / "data" / "kpatch-build"
BUILDLOG_TAIL = 40
SEPARATOR = "===== $CACHEDIR/build.log (copied after the run) ====="
# What a bookworm gcc writes into .comment: the vmlinux then claims a compiler the build host does not have.
OTHER_GCC = "GCC: (Debian 12.2.0-14) 12.2.0"


@dataclass(frozen=True)
class Case:
    """One failure: the file the patch edits and how, or what is done to the kernel inputs."""

    name: str
    what: str
    path: str = "fs/proc/cmdline.c"
    edit: Callable[[str], str] | None = None
    context_wrong: bool = False  # the patch is made against text that is not in the tree
    vmlinux: str = "pristine"  # pristine | missing | stripped | other-gcc
    archversion: str = ""  # '' = the forged release


def _replace(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, f"{old!r} is not in the file: the forged source changed, update the case"
        return text.replace(old, new, 1)
    return edit


CMDLINE_FIX = _replace("\tseq_putc(m, '\\n');\n", "\tseq_puts(m, \" kpipe\\n\");\n")

CASES: tuple[Case, ...] = (
    Case("patch-does-not-apply", "a patch whose context is not in the tree (made against other text)",
         edit=CMDLINE_FIX, context_wrong=True),
    Case("no-functional-change", "a comment-only change in cmdline_proc_show()",
         edit=_replace("\tseq_puts(m, saved_command_line);\n",
                       "\t/* the saved command line, as the boot loader passed it */\n"
                       "\tseq_puts(m, saved_command_line);\n")),
    Case("static-local", "changes the initial value of a function's static local (cp_old_stat's warncount)",
         path="fs/stat.c", edit=_replace("static int warncount = 5;", "static int warncount = 3;")),
    Case("init-section", "changes proc_cmdline_init(), an __init function (.init.text)",
         edit=_replace('proc_create_single("cmdline", 0, NULL', 'proc_create_single("cmdline", 0400, NULL')),
    Case("missing-vmlinux", "-v names a vmlinux that does not exist", edit=CMDLINE_FIX, vmlinux="missing"),
    Case("stripped-vmlinux", "-v names a copy of the vmlinux without debug info (strip --strip-debug)",
         edit=CMDLINE_FIX, vmlinux="stripped"),
    Case("archversion-mismatch", "-a names another release than the vmlinux's banner", edit=CMDLINE_FIX,
         archversion="6.12.117-other"),
    Case("compiler-mismatch", f"-v names a copy of the vmlinux whose .comment says {OTHER_GCC!r} "
         "(as a bookworm-built kernel's does); the build host has trixie's gcc 14",
         edit=CMDLINE_FIX, vmlinux="other-gcc"),
)


def make_patch(tree: Path, case: Case) -> str:
    """A -p1 unified diff of the case's edit, made from the tree's own file."""
    assert case.edit is not None
    old = (tree / case.path).read_text()
    new = case.edit(old)
    if case.context_wrong:
        # The same change made against a file whose neighbouring lines differ: the hunk does not apply.
        old = old.replace("\tseq_puts(m, saved_command_line);\n", "\tseq_puts(m, boot_command_line);\n")
        new = new.replace("\tseq_puts(m, saved_command_line);\n", "\tseq_puts(m, boot_command_line);\n")
    diff = difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a/{case.path}", f"b/{case.path}")
    return "".join(diff)


def trim_build_log(text: str, tail: int = BUILDLOG_TAIL) -> str:
    """build.log without the linker's orphan-section warnings, last `tail` lines."""
    kept = [ln for ln in text.splitlines() if "orphan section" not in ln]
    cut = len(kept) - tail
    head = [f"[... {cut} earlier lines of build.log left out ...]"] if cut > 0 else []
    return "\n".join(head + kept[-tail:]) + "\n"


def main(argv: list[str]) -> int:
    from kpipe.lab.buildhost import BuildHostChroot
    from kpipe.lab.forge import forge, parse_source

    wanted = set(argv)
    unknown = wanted - {c.name for c in CASES}
    if unknown:
        sys.exit(f"unknown case(s): {', '.join(sorted(unknown))}; known: {', '.join(c.name for c in CASES)}")
    k = forge(parse_source("debian:trixie/6.12"), progress=lambda m: print(f"forge: {m}", flush=True))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "patches").mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="kpipe-capture-"))
    bh = BuildHostChroot(folder / "bh")
    state = bh.up("trixie", version="6.12")
    work = folder / "bh" / "cases"  # inside the state folder: the build host sees it at the same path
    work.mkdir()

    def ssh(cmd: list[str], timeout: float = 3600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                               "-o", f"UserKnownHostsFile={state['known_hosts']}", "-i", state["identity_file"],
                               "-p", str(state["port"]), "root@127.0.0.1", shlex.join(cmd)],
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    try:
        version = ssh(["kpatch-build", "--version"]).stdout.strip()
        gcc = ssh(["gcc", "--version"]).stdout.splitlines()[0]
        print(f"kpatch-build --version: {version}; {gcc}", flush=True)
        vm = {"pristine": k.vmlinux, "missing": work / "no-such-vmlinux"}
        stripped = work / "vmlinux-stripped"
        shutil.copyfile(k.vmlinux, stripped)
        subprocess.run(["strip", "--strip-debug", str(stripped)], check=True)
        vm["stripped"] = stripped
        other = work / "vmlinux-other-gcc"
        (work / "comment").write_bytes(OTHER_GCC.encode() + b"\0")
        subprocess.run(["objcopy", "--update-section", f".comment={work / 'comment'}", str(k.vmlinux), str(other)],
                       check=True)
        vm["other-gcc"] = other
        for case in CASES:
            if wanted and case.name not in wanted:
                continue
            patch = make_patch(k.tree, case)
            (OUT / "patches" / f"{case.name}.patch").write_text(patch)
            pfile = work / f"{case.name}.patch"
            pfile.write_text(patch)
            out_dir, cache = work / f"out-{case.name}", f"/root/kpipe-capture/{case.name}"
            out_dir.mkdir()
            argv = ["env", "-u", "ARCH", "kpatch-build", "-s", str(k.tree), "-c", str(k.config),
                    "-v", str(vm[case.vmlinux]), "-a", case.archversion or k.release,
                    "-n", f"livepatch-{case.name}", "-o", str(out_dir), str(pfile)]
            print(f"== {case.name}: {case.what}", flush=True)
            # $1 the CACHEDIR, then kpatch-build's argv; the build.log follows the tool's own output
            script = ('rm -rf "$1"; mkdir -p "$1"; export CACHEDIR="$1"; shift; nice -n 10 "$@" 2>&1; '
                      'echo "[exit $?]"; echo "$SEP"; cat "$CACHEDIR/build.log" 2>/dev/null')
            r = ssh(["env", f"SEP={SEPARATOR}", "sh", "-c", script, "sh", cache, *argv])
            body, _, blog = r.stdout.partition(SEPARATOR + "\n")
            assert "[exit 0]" not in body, f"{case.name}: kpatch-build succeeded\n{body}"
            header = (f"# kpatch-build --version: {version}\n# {gcc}\n# case {case.name}: {case.what}\n"
                      f"$ CACHEDIR={cache} {shlex.join(argv)}\n")
            text = header + body + (SEPARATOR + "\n" + trim_build_log(blog) if blog.strip() else "")
            (OUT / f"{case.name}.log").write_text(text)
            print(body[-600:], flush=True)
    finally:
        bh.down()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
