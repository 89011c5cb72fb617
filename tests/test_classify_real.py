"""The classifier over real kpatch-build failure logs (Debian trixie's 0.9.10, tests/data/kpatch-build/).

The logs were captured by tests/capture_kpatch_failures.py on the forged 6.12 kernel through the forge's
build host; see tests/data/kpatch-build/README.md. Each holds what kpipe's runner classifies: the tool's
stdout and stderr, then $CACHEDIR/build.log.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kpipe.builder.classify import HINTS, classify

DATA = Path(__file__).resolve().parent / "data" / "kpatch-build"

# case: (category, the deciding line contains, a line shown contains, the hint contains)
TABLE: dict[str, tuple[str, str, str, str]] = {
    "patch-does-not-apply": ("patch", "file failed to apply", "Hunk #1 FAILED", "does not apply"),
    "no-functional-change": ("patch", "no functional changes found", "no functional changes found",
                             "changes no compiled code"),
    "static-local": ("diff", "changed section .data.warncount.0 not selected", "unsupported section change",
                     "static local"),
    "init-section": ("diff", "changed section .init.text not selected", "unsupported section change", "__init code"),
    "missing-vmlinux": ("environment", "vmlinux file", "no-such-vmlinux", "does not exist on the build host"),
    "stripped-vmlinux": ("environment", "can't find special struct alt_instr size", "alt_instr", "no debug info"),
    "archversion-mismatch": ("environment", "Kernel version mismatch: 6.12.117-other was specified",
                             "vmlinux was built for", "not the one its vmlinux was built for"),
    "compiler-mismatch": ("compiler", "gcc/kernel version mismatch", "kernel version: GCC: (Debian 12.2.0-14)",
                          "the kernel's own gcc"),
}


def _log(case: str) -> str:
    return (DATA / f"{case}.log").read_text()


def test_every_captured_log_has_a_row_and_names_the_tool_version():
    logs = {p.stem for p in DATA.glob("*.log")}
    assert logs == set(TABLE)
    for case in logs:
        text = _log(case)
        assert text.startswith("# kpatch-build --version: Version : 0.9.9\n"), case  # what 0.9.10 prints
        assert "[exit 1]" in text, case  # a real failure, not a success


@pytest.mark.parametrize("case", sorted(TABLE))
def test_real_log_is_classified(case):
    category, decides, shown, hint = TABLE[case]
    c = classify(_log(case))
    assert c.category == category, (case, c.category, c.matched)
    assert decides in c.matched, (case, c.matched)
    assert any(shown in line for line in c.lines), (case, c.lines)
    assert hint in c.hint, (case, c.hint)


def test_the_gcc_mismatch_shows_both_compilers():
    c = classify(_log("compiler-mismatch"))
    assert any(line.startswith("gcc version:") and "14.2.0" in line for line in c.lines)
    assert any(line.startswith("kernel version:") and "12.2.0" in line for line in c.lines)


def test_a_stripped_vmlinux_is_not_blamed_on_the_config():
    c = classify(_log("stripped-vmlinux"))
    assert c.category != "kernel-config"
    assert "CONFIG_DEBUG_INFO" not in c.hint  # the config has it; the vmlinux lost it


def test_create_diff_objects_summary_does_not_hide_the_cause():
    # "unreconcilable difference" comes first in the log (stdout and stderr interleave); the section decides
    for case in ("static-local", "init-section"):
        c = classify(_log(case))
        assert "unreconcilable" not in c.matched and "not selected for inclusion" in c.matched, c.matched


def test_narrow_hints_differ_from_the_category_default():
    for case in ("archversion-mismatch", "stripped-vmlinux", "patch-does-not-apply", "compiler-mismatch",
                 "static-local", "init-section", "missing-vmlinux", "no-functional-change"):
        c = classify(_log(case))
        assert c.hint != HINTS[c.category], case
