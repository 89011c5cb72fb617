"""The classifier and the milestones over real klp-build logs (Linux 7.2's, tests/data/klp-build/).

The logs were captured by tests/capture_klp_failures.py through the forge's sid build host; see
tests/data/klp-build/README.md. Each holds what kpipe's runner classifies: the tool's stdout and stderr.
klp-build's failures land in the same categories as kpatch-build's (tests/test_classify_real.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kpipe.builder.classify import classify
from kpipe.builder.klp import KlpBuilder

DATA = Path(__file__).resolve().parent / "data" / "klp-build"

# case: (category, the deciding line contains, a line shown contains, the hint contains)
TABLE: dict[str, tuple[str, str, str, str]] = {
    "patch-does-not-apply": ("patch", "did not apply", "FAILED", "does not apply"),
    "unsupported-lib-patch": ("patch", "unsupported patch to lib/string.c", "unsupported patch to lib/string.c",
                              "cannot touch lib/"),
    "short-circuit-without-tmp": ("environment", "-S 2 requires completed", "klp-tmp/1-orig", "earlier run"),
    "livepatch-disabled": ("kernel-config", "CONFIG_LIVEPATCH not enabled", "CONFIG_LIVEPATCH not enabled",
                           "configuration does not allow"),
    # on the forged tree, from its original build (--short-circuit 2)
    "no-functional-change": ("patch", "no changes detected", "no changes detected", "changes no compiled object"),
    "changed-data": ("diff", "changed data: warncount.0", "objtool klp diff failed", "static local"),
}


def _log(case: str) -> str:
    return (DATA / f"{case}.log").read_text()


def _steps(case: str) -> list[str]:
    return [m.step for m in (KlpBuilder().milestone(ln) for ln in _log(case).splitlines()) if m]


def _failure_logs() -> set[str]:
    return {p.stem for p in DATA.glob("*.log")} - {"success"}


def test_every_captured_failure_has_a_row_and_names_the_tool():
    logs = _failure_logs()
    assert logs == set(TABLE)
    for case in logs:
        text = _log(case)
        assert text.startswith("# klp-build: debian:sid/7.2 scripts/livepatch/klp-build (Linux 7.2."), case
        assert "[exit 1]" in text, case  # a real failure, not a success


@pytest.mark.parametrize("case", sorted(TABLE))
def test_real_log_is_classified(case):
    category, decides, shown, hint = TABLE[case]
    c = classify(_log(case))
    assert c.category == category, (case, c.category, c.matched)
    assert decides in c.matched, (case, c.matched)
    assert any(shown in line for line in c.lines), (case, c.lines)
    assert hint in c.hint, (case, c.hint)


def test_the_patch_tools_words_are_shown_with_a_patch_that_does_not_apply():
    c = classify(_log("patch-does-not-apply"))
    assert any("Hunk #1 FAILED" in line for line in c.lines), c.lines


def test_milestones_of_real_failed_runs_stop_where_the_tool_stopped():
    assert _steps("patch-does-not-apply") == ["validating-patches"]
    assert _steps("no-functional-change") == ["validating-patches", "fixing-patches", "building-patched",
                                              "copying-patched"]
    assert _steps("changed-data")[-2:] == ["checksums", "diffing"]


def test_milestones_of_a_real_successful_run():
    text = _log("success")
    assert "[exit 0]" in text and "vmlinux.o: changed function: cmdline_proc_show" in text
    assert _steps("success") == ["validating-patches", "fixing-patches", "building-patched", "copying-patched",
                                 "checksums", "checksums", "diffing", "changed-function", "building-module",
                                 "success"]
    shown = [m.text for m in (KlpBuilder().milestone(ln) for ln in text.splitlines()) if m]
    assert shown[-3] == "vmlinux.o: changed function: cmdline_proc_show"
