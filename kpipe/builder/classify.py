"""Classify a failed build's log: category, the lines that matter, a hint (pure).

The messages are kpatch-build's and create-diff-object's (kernel-facts.md,
kpatch 0.9.11); the prefix in front of them varies by version ("ERROR: ",
"create-diff-object: ERROR: foo.o: ..."), so the rules match the message.
Kbuild failures (compiler errors in rendered source, missing headers) get
their own categories.
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
                     "CONFIG_DEBUG_INFO and a matching unstripped vmlinux; for kernels older than 5.1 set "
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

# Order matters only for ties on the same line; the earliest matching line decides.
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple((cat, re.compile(rx)) for cat, rx in (
    ("crash", r"create-diff-object SIGSEGV|There was a SIGSEGV|\bSIGSEGV\b"),
    ("environment", r"Unsupported distribution"),
    ("environment", r"can't find vmlinux"),
    ("environment", r"can't find config file"),
    ("environment", r"\bnot installed\b"),
    ("environment", r"can't find supporting tools"),
    ("environment", r"source dir '.*' not found|vmlinux file '.*' not found|config file '.*' not found"),
    ("environment", r"output dir '.*' not found"),
    ("environment", r"archversion \S+ does not match the vmlinux|--archversion is incompatible"),
    ("environment", r"kpatch-build: (command )?not found|kpatch-build: No such file"),
    ("environment", r"make(\[\d+\])?: \*\*\* .*: No such file or directory\.\s+Stop\."),
    ("kernel-config", r"kernel doesn't have '?CONFIG_DEBUG_INFO'? enabled"),
    ("kernel-config", r"kernel option '?CONFIG_[A-Z0-9_]+'? not supported"),
    ("kernel-config", r"The kernel doesn't support klp replace"),
    ("kernel-config", r"can't find special struct .* size"),
    ("compiler", r"gcc/kernel version mismatch"),
    ("compiler", r"clang/kernel version mismatch"),
    ("patch", r"file failed to apply"),
    ("patch", r"unsupported patch to lib/"),
    ("patch", r"unsupported patch to assembly"),
    ("patch", r"no changed objects found"),
    ("patch", r"no functional changes found"),
    ("patch", r"patch file '.*' not found"),
    ("diff", r"changed section \S+ not selected for inclusion"),
    ("diff", r"data section \S+ selected for inclusion"),
    ("diff", r"doesn't have patchable function entry|has no fentry/mcount call"),
    ("diff", r"reference to static local variable"),
    ("diff", r"couldn't find matching .* local symbols"),
    ("diff", r"unsupported jump label"),
    ("diff", r"unsupported static call"),
    ("diff", r"unreconcilable difference"),
    ("symbols", r"Undefined symbols:"),
    ("symbols", r"Patch module referencing altered exported kernel symbols"),
    ("symbols", r"ERROR: modpost: \"[^\"]+\" \[.*\] undefined!"),
    ("source", r"^\S+:\d+(:\d+)?: (fatal )?error: |^<command-line>: (fatal )?error: "),
))

# Lines shown with the deciding line: the tool's own summary and compiler errors.
_CONTEXT = re.compile(r"(^ERROR: |: ERROR: |error\(s\) encountered|: error: |\*\*\* \[)")


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
    decided: tuple[int, str] | None = None
    for i, line in enumerate(lines):
        for cat, rx in _RULES:
            if rx.search(line):
                decided = (i, cat)
                break
        if decided:
            break
    if decided is None:
        # No known message: the tool's own error lines, else the end of the log.
        errors = [line.strip() for line in lines if _CONTEXT.search(line)]
        shown = list(dict.fromkeys(errors))[:max_lines] or [line for line in lines[-max_lines:] if line.strip()]
        return Classification("unknown", tuple(shown), HINTS["unknown"], shown[0] if errors else "")
    index, category = decided
    matched = lines[index].strip()
    # The deciding line, the other lines of the same category, and the tool's error summaries; deduplicated.
    picked: list[str] = []
    for i, line in enumerate(lines):
        s = line.strip()
        if not s or s in picked:
            continue
        same = any(cat == category and rx.search(line) for cat, rx in _RULES)
        if i == index or same or _CONTEXT.search(line):
            picked.append(s)
    if matched not in picked[:max_lines]:
        picked = [matched] + [p for p in picked if p != matched]
    return Classification(category, tuple(picked[:max_lines]), HINTS[category], matched)
