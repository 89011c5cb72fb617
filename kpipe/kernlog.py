"""Kernel trouble in the log (pure): oopses, BUGs, WARNINGs, lockups, hung tasks, RCU stalls, GPFs, call traces.

The rollout gate reads the kernel log after kpipe's own /dev/kmsg marker (kpipe.fleet.livepatch) and
turns it into typed findings: one per incident (a header line, plus the call trace printed after it).
A call trace that names one of the patch's functions (the replaced function's name, or a frame inside
the patch module) is a finding even without a header line (dump_stack() prints none).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Header lines of the kernel's trouble reports (lib/bug.c, kernel/panic.c, arch/x86/kernel/dumpstack.c,
# kernel/watchdog.c, kernel/hung_task.c, kernel/rcu/tree_stall.h, arch/x86/kernel/traps.c; 4.19 .. 6.x).
# Order matters: the first pattern that matches a line names its kind.
_HEADERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("soft_lockup", re.compile(r"BUG: soft lockup - CPU#\d+ stuck for")),
    ("hard_lockup", re.compile(r"Watchdog detected hard LOCKUP on cpu")),
    ("hung_task", re.compile(r"INFO: task \S.* blocked for more than \d+ seconds")),
    ("rcu_stall", re.compile(r"(?:rcu: )?INFO: rcu_\w+ (?:self-detected stall|detected stalls?)")),
    ("gpf", re.compile(r"general protection fault")),
    ("oops", re.compile(r"\bOops(?: - \w+)?: [0-9a-f]{4}\b|\bOops:|invalid opcode: [0-9a-f]{4} \[#\d+\]")),
    ("bug", re.compile(r"\bBUG: |kernel BUG at ")),
    ("warning", re.compile(r"^WARNING: |\bWARNING: CPU: \d+ PID: \d+")),
)
# Lines that belong to a report already open (not a new incident): an oops after its BUG: line, say.
_CONTINUES = {"oops": ("bug", "gpf"), "gpf": ()}
_CALL_TRACE = re.compile(r"^\s*Call Trace:|^\s*Call trace:")
# "RIP: 0010:func+0x15/0x30 [mod]", " func+0x1f/0x40 [mod]", " ? func+0x1f/0x40", "[<ffffffff81>] func+0x.."
_ANY_FRAME = re.compile(r"(?P<func>[A-Za-z_][\w.]*)\+0x[0-9a-f]+/0x[0-9a-f]+(?:\s+\[(?P<mod>[\w-]+)\])?")
_FRAME = re.compile(r"(?:^\s*(?:\[<[0-9a-f]+>\]\s*)?(?:\?\s+)?|RIP: [0-9a-f]{4}:|\bpc : |\blr : )"
                    r"(?P<func>[A-Za-z_][\w.]*)\+0x[0-9a-f]+/0x[0-9a-f]+(?:\s+\[(?P<mod>[\w-]+)\])?")


@dataclass(frozen=True)
class KernelFinding:
    """One incident in the kernel log: its kind, its first line, and the patch's functions its trace names."""

    kind: str  # oops | bug | warning | soft_lockup | hard_lockup | hung_task | rcu_stall | gpf | call_trace
    line: str
    patched: tuple[str, ...] = ()  # frames of the trace that are the patch's functions (func [mod])
    trace: tuple[str, ...] = field(default=(), compare=False)  # the trace's frames, as printed

    def describe(self) -> str:
        """One line for the journal and status: the kernel's own line, and the patched frames it names."""
        named = f" (call trace names patched {', '.join(self.patched)})" if self.patched else ""
        return f"kernel {self.kind.replace('_', ' ')}: {self.line}{named}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "line": self.line, "patched": list(self.patched), "trace": list(self.trace)}


def patched_function_names(functions: Iterable[str]) -> set[str]:
    """The function names of sysfs entries ("vmlinux/cmdline_proc_show,1" or "cmdline_proc_show,1")."""
    out = set()
    for f in functions:
        name = f.rsplit("/", 1)[-1].split(",", 1)[0].strip()
        if name:
            out.add(name)
    return out


def _names_patch(func: str, mod: str, functions: set[str], module: str) -> bool:
    if module and mod and mod.replace("-", "_") == module.replace("-", "_"):
        return True  # a frame inside the patch module: its replacement code
    # kpatch keeps the function's name; a source patch often prefixes it (livepatch_cmdline_proc_show)
    return any(func == f or func.endswith("_" + f) or func.startswith(f + ".") for f in functions)


@dataclass
class _Incident:
    kind: str
    line: str
    patched: list[str] = field(default_factory=list)
    frames: list[str] = field(default_factory=list)
    traced: bool = False  # its "Call Trace:" line was seen


def _frame(inc: _Incident, m: re.Match[str], ln: str, names: set[str], module: str) -> None:
    mod = m["mod"] or ""
    frame = m["func"] + (f" [{mod}]" if mod else "")
    inc.frames.append(ln.strip())
    if _names_patch(m["func"], mod, names, module) and frame not in inc.patched:
        inc.patched.append(frame)


def find_trouble(lines: Sequence[str], functions: Iterable[str] = (), module: str = "") -> list[KernelFinding]:
    """Every incident in `lines` (kernel log lines, timestamps stripped), in log order.

    `functions`: the patch's functions (sysfs form or plain names); `module`: the patch module's name.
    A trace that names them marks its incident; a trace without a header that names them is a finding."""
    names = patched_function_names(functions)
    found: list[_Incident] = []
    current: _Incident | None = None
    for ln in lines:
        kind = next((k for k, rx in _HEADERS if rx.search(ln)), "")
        if kind:
            if current is not None and current.kind in _CONTINUES.get(kind, ()) and not current.traced:
                continue  # "Oops: 0002 [#1]" after its "BUG: unable to handle ..." line: one incident
            current = _Incident(kind, ln.strip())
            found.append(current)
            m = _ANY_FRAME.search(ln)  # "WARNING: CPU: 0 PID: 1 at fs/x.c:9 func+0x9/0x20 [mod]"
            if m:
                _frame(current, m, ln, names, module)
            continue
        if _CALL_TRACE.search(ln):
            if current is None or current.traced:
                current = _Incident("call_trace", "")  # a bare trace: kept only when it names the patch
                found.append(current)
            current.traced = True
            continue
        m = _FRAME.search(ln)
        if m and current is not None:
            _frame(current, m, ln, names, module)
        if "---[ end trace" in ln:
            current = None  # the report is over: later frames belong to a new trace
    out = []
    for inc in found:
        line = inc.line
        if inc.kind == "call_trace":
            if not inc.patched:
                continue
            line = f"Call Trace: {inc.frames[0] if inc.frames else ''}".strip()
        out.append(KernelFinding(inc.kind, line, tuple(inc.patched), tuple(inc.frames)))
    return out
