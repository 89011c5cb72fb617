"""Capture real klp-build logs into tests/data/klp-build/ (run as root; minutes per case that builds).

    python3 tests/capture_klp_failures.py [case ...]

Runs the tree's own scripts/livepatch/klp-build in the forge's sid chroot served as a build host (`kpipe
lab buildhost`), over SSH, niced, one case after the other, exactly as kpipe would (`flock <tree>/.kpipe-
klp-build.lock env -u ARCH -C <tree> <tree>/scripts/livepatch/klp-build --jobs 2 --output <out>/<name>.ko
--keep-tmp [--short-circuit 2] -- PATCH`). Cases that fail before klp-build builds anything run on a
configured, unbuilt copy of linux-source-7.2 (tinyconfig + the forge's default fragment + olddefconfig, in the
build host's state folder); the others on the forge's cached 7.x kernel (`kpipe lab forge --source
debian:sid/7.2`, its build laid out as klp-build's original build) with `--short-circuit 2`. Each log holds
what kpipe's runner classifies for a build: the tool's combined stdout and stderr, then `[exit N]`. The
patches are made from the tree itself (so their context is right) and saved beside the logs.
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

OUT = REPO / "tests" / "data" / "klp-build"
SOURCE = "debian:sid/7.2"


@dataclass(frozen=True)
class Case:
    """One run: the file the patch edits and how."""

    name: str
    what: str
    edit: Callable[[str], str]
    path: str = "fs/proc/cmdline.c"
    context_wrong: bool = False  # the patch is made against text that is not in the tree
    succeeds: bool = False
    tree: str = "forged"  # forged (built, klp-tmp/1-orig primed) | configured (unpacked and configured only)
    short_circuit: bool = True  # --short-circuit 2 (on the configured tree: it has no klp-tmp)
    unset: str = ""  # a CONFIG_ option removed from the configured tree's .config for this case


def _replace(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, f"{old!r} is not in the file: the forged source changed, update the case"
        return text.replace(old, new, 1)
    return edit


CMDLINE_FIX = _replace("\tseq_puts(m, saved_command_line);\n\tseq_putc(m, '\\n');\n",
                       '\tseq_puts(m, "kpipe klp-build live patch active\\n");\n')

CASES: tuple[Case, ...] = (
    Case("patch-does-not-apply", "a patch whose context is not in the tree (made against other text)",
         edit=CMDLINE_FIX, context_wrong=True, tree="configured", short_circuit=False),
    Case("unsupported-lib-patch", "a change in lib/ (klp-build refuses lib/, vdso, realmode and .S files)",
         path="lib/string.c", edit=_replace("#include <linux/types.h>\n",
                                            "#include <linux/types.h>\n/* kpipe */\n"),
         tree="configured", short_circuit=False),
    Case("short-circuit-without-tmp", "--short-circuit 2 on a tree where klp-build never ran (no klp-tmp)",
         edit=CMDLINE_FIX, tree="configured"),
    Case("livepatch-disabled", "a tree whose .config lacks CONFIG_LIVEPATCH", edit=CMDLINE_FIX, tree="configured",
         short_circuit=False, unset="CONFIG_LIVEPATCH"),
    Case("no-functional-change", "a comment-only change in cmdline_proc_show()",
         edit=_replace("\tseq_puts(m, saved_command_line);\n",
                       "\t/* the saved command line, as the boot loader passed it */\n"
                       "\tseq_puts(m, saved_command_line);\n")),
    Case("changed-data", "changes the initial value of a function's static local (cp_old_stat's warncount)",
         path="fs/stat.c", edit=_replace("static int warncount = 5;", "static int warncount = 3;")),
    Case("success", "the cmdline_proc_show() change of recipes/cmdline-klp.yaml", edit=CMDLINE_FIX, succeeds=True),
)


def make_patch(tree: Path, case: Case) -> str:
    """A -p1 unified diff of the case's edit, made from the tree's own file."""
    old = (tree / case.path).read_text()
    new = case.edit(old)
    if case.context_wrong:
        old = old.replace("\tseq_puts(m, saved_command_line);\n", "\tseq_puts(m, boot_command_line);\n")
        new = new.replace("\tseq_puts(m, saved_command_line);\n", "\tseq_puts(m, boot_command_line);\n")
    diff = difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a/{case.path}", f"b/{case.path}")
    return "".join(diff)


def tree_version(tree: Path) -> str:
    """VERSION.PATCHLEVEL.SUBLEVEL from the tree's Makefile."""
    head = dict(ln.split(" = ", 1) for ln in (tree / "Makefile").read_text().splitlines()[:6] if " = " in ln)
    return f"{head['VERSION']}.{head['PATCHLEVEL']}.{head['SUBLEVEL']}"


def configured_tree(folder: Path, version: str, suite: str) -> Path:
    """linux-source-<version> unpacked and configured as the forge does it (no LOCALVERSION), not built."""
    from importlib import resources

    from kpipe.lab.forge import (
        NICE,
        ensure_chroot,
        klp_build_packages,
        make_argv,
        merge_config,
        parse_config,
    )

    chroot = ensure_chroot(suite, extra_packages=(f"linux-source-{version}", *klp_build_packages(version)))
    log = folder / "configure.log"
    chroot.run(["tar", "-xf", f"/usr/src/linux-source-{version}.tar.xz", "-C", str(folder)], binds=(folder,),
               nice=NICE, log=log, what="unpack")
    src = folder / f"linux-source-{version}"
    chroot.run(make_argv(["tinyconfig"], 1, src=src), binds=(folder,), nice=NICE, log=log, what="tinyconfig")
    frag = parse_config(resources.files("kpipe").joinpath("lab_assets", "forge-lab.config").read_text())
    (src / ".config").write_text(merge_config((src / ".config").read_text(), frag))
    chroot.run(make_argv(["olddefconfig"], 1, src=src), binds=(folder,), nice=NICE, log=log, what="olddefconfig")
    return src


def main(argv: list[str]) -> int:
    from kpipe.lab.buildhost import BuildHostChroot
    from kpipe.lab.forge import forge, parse_source

    wanted = set(argv)
    unknown = wanted - {c.name for c in CASES}
    if unknown:
        sys.exit(f"unknown case(s): {', '.join(sorted(unknown))}; known: {', '.join(c.name for c in CASES)}")
    cases = [c for c in CASES if not wanted or c.name in wanted]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "patches").mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="kpipe-capture-klp-"))
    bh = BuildHostChroot(folder / "bh")
    suite, version = SOURCE.split(":", 1)[1].split("/")
    state = bh.up(suite, version=version)
    work = folder / "bh" / "cases"  # inside the state folder: the build host sees it at the same path
    work.mkdir()

    def ssh(cmd: list[str], timeout: float = 7200) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                               "-o", f"UserKnownHostsFile={state['known_hosts']}", "-i", state["identity_file"],
                               "-p", str(state["port"]), "root@127.0.0.1", shlex.join(cmd)],
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    trees: dict[str, Path] = {}
    about: dict[str, str] = {}
    try:
        gcc = ssh(["gcc", "--version"]).stdout.splitlines()[0]
        if any(c.tree == "configured" for c in cases):
            print("configuring an unbuilt copy of the tree", flush=True)
            trees["configured"] = configured_tree(work, version, suite)
            about["configured"] = f"a configured, unbuilt linux-source-{version} tree"
        if any(c.tree == "forged" for c in cases):
            k = forge(parse_source(SOURCE), progress=lambda m: print(f"forge: {m}", flush=True))
            trees["forged"] = k.tree
            about["forged"] = f"kernel {k.release} ({k.package_version})"
        for case in cases:
            tree_path = trees[case.tree]
            tree = str(tree_path)
            tool = f"{tree}/scripts/livepatch/klp-build"
            config = tree_path / ".config"
            saved = config.read_text()
            if case.unset:
                config.write_text("".join(ln for ln in saved.splitlines(True) if not ln.startswith(case.unset + "=")))
            patch = make_patch(tree_path, case)
            (OUT / "patches" / f"{case.name}.patch").write_text(patch)
            pfile = work / f"{case.name}.patch"
            pfile.write_text(patch)
            out_dir = work / f"out-{case.name}"
            out_dir.mkdir()
            argv = ["flock", f"{tree}/.kpipe-klp-build.lock", "env", "-u", "ARCH", "-C", tree, tool,
                    "--jobs", "2", "--output", f"{out_dir}/livepatch-{case.name}.ko", "--keep-tmp",
                    *(["--short-circuit", "2"] if case.short_circuit else []), "--", str(pfile)]
            print(f"== {case.name}: {case.what}", flush=True)
            try:
                r = ssh(["sh", "-c", 'nice -n 10 "$@" 2>&1; echo "[exit $?]"', "sh", *argv])
            finally:
                config.write_text(saved)
            body = r.stdout
            if case.succeeds:
                assert "[exit 0]" in body, f"{case.name}: klp-build failed\n{body[-3000:]}"
            else:
                assert "[exit 0]" not in body, f"{case.name}: klp-build succeeded\n{body[-3000:]}"
            linux = tree_version(tree_path)
            header = (f"# klp-build: {SOURCE} scripts/livepatch/klp-build (Linux {linux}), {about[case.tree]}\n"
                      f"# {gcc}\n# case {case.name}: {case.what}\n$ {shlex.join(argv)}\n")
            (OUT / f"{case.name}.log").write_text(header + body)
            print(body[-800:], flush=True)
    finally:
        bh.down()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
