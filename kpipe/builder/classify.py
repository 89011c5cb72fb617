"""Classify a failed build's log: category, the lines that matter, a hint (pure).

The messages are kpatch-build's and create-diff-object's; the ones of
tests/data/kpatch-build/ are real logs of Debian trixie's kpatch-build 0.9.10
(tests/test_classify_real.py). klp-build's (`error: klp-build: ...`) and
objtool klp's (`error: objtool: ...`) fall into the same categories; the ones
of tests/data/klp-build/ are real logs of Linux 7.2's klp-build
(tests/test_klp_classify.py). The prefix in front of them varies by version
("ERROR: ", "create-diff-object: ERROR: foo.o: ..."), so the rules match the
message. Details come on stdout, the summary on stderr and the patch tool's
words in $CACHEDIR/build.log: the log classified holds all three. A rule may
carry its own hint when its cause is narrower than its category's. Kbuild
failures (compiler errors in rendered source, missing headers) get their own
categories.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

CATEGORIES = ("environment", "kernel-config", "compiler", "patch", "diff", "symbols", "crash",
              "source", "unknown")

HINTS: dict[str, str] = {
    "environment": "the build host lacks an input: check the kernel entry's source, vmlinux and config paths "
                   "on the build host and install the kernel's debuginfo (-dbg / dbgsym / debuginfo) package; "
                   "pass the source tree (-s) for distros kpatch-build does not know (UOS, Kylin)",
    "kernel-config": "the target kernel's configuration does not allow this build: kpatch-build needs "
                     "CONFIG_DEBUG_INFO and none of the options it names; for kernels older than 5.1 set "
                     "non_replace in the recipe",
    "compiler": "install on the build host the exact compiler the kernel was built with "
                "(skip_compiler_check in the recipe overrides the check, not recommended)",
    "patch": "rebase the patch on the target kernel's source: it must apply with -p1, change at least one "
             "function, and cannot touch lib/ or assembly files",
    "diff": "the change cannot be live-patched as written: avoid changing __init code, data or static locals "
            "(use shadow variables or callbacks); 'couldn't find matching ... local symbols' means the source "
            "tree does not match the vmlinux",
    "symbols": "the patched code references symbols the module cannot resolve or whose exported version "
               "changed: call them through kallsyms/klp relocations or keep their signatures",
    "crash": "create-diff-object crashed: keep the build log and core file and report it to kpatch upstream; "
             "rerun with the debug option to keep $CACHEDIR/tmp",
    "source": "the rendered module source does not compile against the kernel's headers: fix the recipe's "
              "C template (see the compiler errors above)",
    "unknown": "no known failure message in the log; read it whole",
}

# Narrower causes than their category's, with their own hint.
_STRIPPED = ("the vmlinux has no debug info (stripped, or not the debug build): point the kernel entry's vmlinux "
             "at the unstripped one (Debian: linux-image-<release>-dbg, /usr/lib/debug/boot/vmlinux-<release>)")
_ARCHVERSION = ("the kernel's release (-a) is not the one its vmlinux was built for: the kernel entry's vmlinux "
                "belongs to another kernel; point it at this release's vmlinux (or fix the release)")
_NOT_APPLIED = ("the patch does not apply to the kernel entry's source tree (see 'Hunk #... FAILED' in "
                "$CACHEDIR/build.log): rebase it on this kernel's source; it must apply with -p1")
_NO_CHANGE = ("the patch changes no compiled code (a comment, whitespace, or a file this kernel's config does "
              "not build): nothing to live-patch")
_MISSING = ("a path kpatch-build was given does not exist on the build host: the kernel entry's source, vmlinux "
            "and config must be paths there (kpipe passes them as -s, -v, -c)")
_INIT = ("the patch changes __init code (.init.text): it ran once at boot and its memory is freed, so a live "
         "patch cannot replace it; leave the __init function as it is and patch the code that runs later")
_DATA = ("the patch changes data, not code (an initialised global or a function's static local: .data.<name>): "
         "a live patch replaces functions, not values already in memory; keep the initial value and change it "
         "from code, or use a shadow variable or a pre-patch callback")
_KLP_NOT_APPLIED = ("the patch does not apply to the kernel's source tree (patch(1)'s words are above): rebase it "
                    "on this kernel's source; klp-build applies it with patch -p1 (fuzz only warns)")
_KLP_NO_CHANGE = ("the patch changes no compiled object (a comment, whitespace, or a file this kernel's config "
                  "does not build): klp-build found nothing to live-patch")
_KLP_SHORT = ("klp-build's --short-circuit needs the klp-tmp folder of an earlier run on this tree (kept with "
              "--keep-tmp): drop short_circuit from the recipe for the first build")
_KLP_OBJTOOL = ("the kernel tree's objtool was built without its `klp` subcommand (libxxhash was missing): install "
                "libxxhash-dev on the build host and rebuild the tree's tools/objtool")
_GCC = ("the build host's gcc is not the one that built the kernel (both are shown above): build on a host "
        "with the kernel's own gcc (skip_compiler_check in the recipe overrides the check, not recommended)")

# Order matters only for ties on the same line; the earliest matching line decides.
_RULES: tuple[tuple[str, re.Pattern[str], str], ...] = tuple((cat, re.compile(rx), hint) for cat, rx, hint in (
    ("crash", r"create-diff-object SIGSEGV|There was a SIGSEGV|\bSIGSEGV\b", ""),
    ("environment", r"Unsupported distribution", ""),
    ("environment", r"can't find vmlinux", ""),
    ("environment", r"can't find config file", ""),
    ("environment", r"\bnot installed\b", ""),
    ("environment", r"can't find supporting tools", ""),
    ("environment", r"source dir '.*' not found|vmlinux file '.*' not found|config file '.*' not found", _MISSING),
    ("environment", r"output dir '.*' not found", ""),
    ("environment", r"Kernel version mismatch: \S+ was specified but vmlinux was built for", _ARCHVERSION),
    ("environment", r"Unable to determine the kernel version from vmlinux", _STRIPPED),
    # kpatch-build reads these sizes from the vmlinux's DWARF: a stripped vmlinux has none.
    ("environment", r"can't find special struct \S+ size", _STRIPPED),
    ("environment", r"kpatch-build: (command )?not found|kpatch-build: No such file", ""),
    ("environment", r"make(\[\d+\])?: \*\*\* .*: No such file or directory\.\s+Stop\.", ""),
    # klp-build (scripts/livepatch/klp-build): `error: klp-build: <message>`
    ("environment", r"klp-build: objtool not built with KLP support", _KLP_OBJTOOL),
    ("environment", r"klp-build: recountdiff not found|klp-build: can't find fix-patch-lines", ""),
    ("environment", r"klp-build: please run from the kernel root directory", ""),
    ("environment", r"klp-build: no \.config file in", ""),
    ("environment", r"klp-build: --short-circuit requires|klp-build: -S \d requires completed", _KLP_SHORT),
    ("environment", r"this script requires bash 4\.4\+", ""),
    ("kernel-config", r"klp-build: CONFIG_(LIVEPATCH|KLP_BUILD) not enabled", ""),
    ("kernel-config", r"klp-build: \.config mismatch", ""),
    ("patch", r"klp-build: \S+ did not apply", _KLP_NOT_APPLIED),
    ("patch", r"klp-build: no changes detected", _KLP_NO_CHANGE),
    ("patch", r"klp-build: \S+: unsupported patch to ", ""),
    ("patch", r"klp-build: \S+ doesn't exist", ""),
    # objtool klp diff / post-link: `<file>: error: objtool: <message>`
    ("diff", r"error: objtool: changed data: ", _DATA),
    ("diff", r"error: objtool: .*unsupported static (branch|call) key", ""),
    ("kernel-config", r"kernel doesn't have '?CONFIG_DEBUG_INFO'? enabled", ""),
    ("kernel-config", r"kernel option '?CONFIG_[A-Z0-9_]+'? not supported", ""),
    ("kernel-config", r"The kernel doesn't support klp replace", ""),
    ("compiler", r"gcc/kernel version mismatch", _GCC),
    ("compiler", r"clang/kernel version mismatch", ""),
    ("patch", r"file failed to apply", _NOT_APPLIED),
    ("patch", r"unsupported patch to lib/", ""),
    ("patch", r"unsupported patch to assembly", ""),
    ("patch", r"no changed objects found", _NO_CHANGE),
    ("patch", r"no functional changes found", _NO_CHANGE),
    ("patch", r"patch file '.*' not found", ""),
    ("diff", r"changed section \.(rela\.)?init\.\S+ not selected for inclusion", _INIT),
    ("diff", r"changed section \.(rela\.)?(data|bss|rodata)\S* not selected for inclusion", _DATA),
    ("diff", r"changed section \S+ not selected for inclusion", ""),
    ("diff", r"data section \S+ selected for inclusion", ""),
    ("diff", r"doesn't have patchable function entry|has no fentry/mcount call", ""),
    ("diff", r"reference to static local variable", ""),
    ("diff", r"couldn't find matching .* local symbols", ""),
    ("diff", r"unsupported jump label", ""),
    ("diff", r"unsupported static call", ""),
    ("symbols", r"Undefined symbols:", ""),
    ("symbols", r"Patch module referencing altered exported kernel symbols", ""),
    ("symbols", r"ERROR: modpost: \"[^\"]+\" \[.*\] undefined!", ""),
    ("source", r"^\S+:\d+(:\d+)?: (fatal )?error: |^<command-line>: (fatal )?error: ", ""),
))

# create-diff-object's closing summaries: they follow the specific message (stdout and stderr interleave, so
# they may come first in the log) and decide only when no specific message is there.
_SUMMARY_RULES: tuple[tuple[str, re.Pattern[str], str], ...] = tuple((cat, re.compile(rx), hint) for cat, rx, hint in (
    ("diff", r"unreconcilable difference", ""),
    ("diff", r"klp-build: objtool klp diff failed|klp-build: objtool klp post-link failed", ""),
    ("diff", r"\d+ unsupported section change\(s\)", ""),
))

# Lines shown with the deciding line: the tool's own summary and compiler errors.
# kpatch-build prints both compilers after a mismatch; patch(1) writes which hunk failed to build.log.
_CONTEXT = re.compile(r"(^ERROR: |: ERROR: |^error: klp-build: |: error: objtool: |error\(s\) encountered|: error: "
                      r"|\*\*\* \[|^(gcc|clang|kernel) version: |^Hunk #\d+ FAILED|^\d+ out of \d+ hunks? FAILED)")


@dataclass(frozen=True)
class Classification:
    """Why a build failed."""

    category: str
    lines: tuple[str, ...]  # the lines that matter, in log order
    hint: str
    matched: str = ""  # the deciding line
    extra: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"category": self.category, "lines": list(self.lines), "hint": self.hint, "matched": self.matched}


def classify(log: str, *, max_lines: int = 12) -> Classification:
    """Classify a failed build's log text (kpatch-build's or make's output, plus build.log)."""
    lines = log.splitlines()
    decided: tuple[int, str, str] | None = None
    for rules in (_RULES, _SUMMARY_RULES):
        for i, line in enumerate(lines):
            for cat, rx, hint in rules:
                if rx.search(line):
                    decided = (i, cat, hint)
                    break
            if decided:
                break
        if decided:
            break
    if decided is None:
        # No known message: the tool's own error lines, else the end of the log.
        errors = [line.strip() for line in lines if _CONTEXT.search(line)]
        shown = list(dict.fromkeys(errors))[:max_lines] or [line for line in lines[-max_lines:] if line.strip()]
        return Classification("unknown", tuple(shown), HINTS["unknown"], shown[0] if errors else "")
    index, category, hint = decided
    matched = lines[index].strip()
    # The deciding line, the other lines of the same category, and the tool's error summaries; deduplicated.
    picked: list[str] = []
    for i, line in enumerate(lines):
        s = line.strip()
        if not s or s in picked:
            continue
        same = any(cat == category and rx.search(line) for cat, rx, _h in _RULES + _SUMMARY_RULES)
        if i == index or same or _CONTEXT.search(line):
            picked.append(s)
    if matched not in picked[:max_lines]:
        picked = [matched] + [p for p in picked if p != matched]
    return Classification(category, tuple(picked[:max_lines]), hint or HINTS[category], matched)
