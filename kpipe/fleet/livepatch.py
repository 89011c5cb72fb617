"""Livepatch operations on one host as plans: commands as data, pure interpreters, pure plan builders.

Each operation (state, stage, marker, load, wait, verify, disable, unload, unstage) is a
builder returning `kpipe.plan.Step`s from data the caller already holds (the module, the
host's livepatch state as a read step returned it): one Command or Upload each, and a pure
function reading its result (raising StepFailed with the evidence). Decisions such as
"already staged with this sha256: no upload" or "loaded and enabled: no insmod" are made
when the plan is built, from that state; the host-side scripts stay idempotent besides.
Nothing trusts a tool's exit code for the kernel's state: verification reads sysfs and the
kernel log after kpipe's own /dev/kmsg marker (kernel-facts.md). The routines at the end
(stage(t, ...), load(t, ...), ...) read what their plan needs and run it with run_steps.

Kernel interfaces used (Documentation/ABI/testing/sysfs-kernel-livepatch):
`/sys/kernel/livepatch/<m>/{enabled,transition}` (transition: 4.12+),
`<m>/<object>/patched` (6.1+, optional here), function dirs `<func>,<sympos>`.
The `force` file is never written: after it rmmod is blocked for good.
"""

from __future__ import annotations

import re
import struct
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kpipe.commands import Command, CommandResult
from kpipe.errors import KpipeError
from kpipe.plan import Step, StepFailed, StepTransport, Upload, run_step, run_steps
from kpipe.taint import TAINT_LIVEPATCH

if TYPE_CHECKING:  # pragma: no cover
    from kpipe.builder.spec import Probe

LIVEPATCH_SYSFS = "/sys/kernel/livepatch"
KPATCH_DIR = "/var/lib/kpatch"
INSMOD = "/sbin/insmod"  # explicit: busybox's shell runs its own applets before PATH (lab.md)
RMMOD = "/sbin/rmmod"

# Privileged commands carry sudo=True; the transport applies it only for hosts that need it.
_ROOT = {"sudo": True}

_MODULE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,55}$")  # the kernel's name field is 56 bytes
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9._+~-]{1,200}$")


class LivepatchOpError(StepFailed):
    """A host step could not be carried out (the host answered, the step failed)."""

    def __init__(self, message: str, *, host: str = "", step: str = "", output: str = "", hint: str | None = None):
        super().__init__(step, message, {"output": output[-2000:]} if output else {})
        # the user's line names the host, not the step (the journal keeps the step)
        KpipeError.__init__(self, f"{host}: {message}" if host else message, hint=hint)
        self.host = host
        self.output = output


# --------------------------------------------------------------------------- state

# One constant script; user values (extra module names) arrive as "$1".. only.
# Output: one record per line, fields separated by single spaces:
#   livepatch_sysfs 0|1 / tainted N / patch M / enabled M V / transition M V /
#   object M OBJ PATCHED / function M OBJ FUNC,POS / module M 0|1 TAINT /
#   notes M HEX (the raw /sys/module/M/notes/.note.gnu.build-id) / srcversion M V
# V is '-' when the file does not exist and '?' when it could not be read.
STATE_SCRIPT = r"""
LP=/sys/kernel/livepatch
# rd FILE sets v: the file's first line, '?' when unreadable, '-' when absent. No subshell: `$(rd F)`
# would fork for every file of every patch. sysfs answers the shell's own read; /proc/sys files
# need cat (read takes a byte per read(2), and they answer EOF past offset 0: see kpipe.fleet.facts).
rd() {
  v=-
  [ -e "$1" ] || return 0
  case $1 in
    /sys/*) v=; read -r v 2>/dev/null < "$1" || [ -n "$v" ] || v='?' ;;
    *) v=$(cat "$1" 2>/dev/null) || v='?' ;;
  esac
}
if [ -d "$LP" ]; then echo "livepatch_sysfs 1"; else echo "livepatch_sysfs 0"; fi
rd /proc/sys/kernel/tainted; echo "tainted $v"
for d in "$LP"/*/; do
  [ -d "$d" ] || continue
  m=${d%/}; m=${m##*/}
  echo "patch $m"
  rd "$d/enabled"; echo "enabled $m $v"
  rd "$d/transition"; echo "transition $m $v"
  for o in "$d"*/; do
    [ -d "$o" ] || continue
    on=${o%/}; on=${on##*/}
    rd "$o/patched"; echo "object $m $on $v"
    for f in "$o"*/; do
      [ -d "$f" ] || continue
      fn=${f%/}; fn=${fn##*/}
      echo "function $m $on $fn"
    done
  done
  set -- "$@" "$m"
done
seen=" "
for m in "$@"; do
  case "$seen" in *" $m "*) continue;; esac
  seen="$seen$m "
  if [ -d "/sys/module/$m" ]; then
    rd "/sys/module/$m/taint"; echo "module $m 1 $v"
    n="/sys/module/$m/notes/.note.gnu.build-id"
    if [ -r "$n" ]; then echo "notes $m $(od -An -v -tx1 "$n" 2>/dev/null | tr -d ' \n')"; fi
    if [ -r "/sys/module/$m/srcversion" ]; then rd "/sys/module/$m/srcversion"; echo "srcversion $m $v"; fi
  else
    echo "module $m 0 -"
  fi
done
echo "end"
"""


@dataclass(frozen=True)
class ModuleState:
    """A module as /sys/module shows it."""

    name: str
    present: bool
    taint: str = ""  # the module's taint letters, e.g. "OEK"
    build_id: str = ""  # GNU build-id (hex) from /sys/module/<m>/notes, "" when the kernel shows none
    srcversion: str = ""  # /sys/module/<m>/srcversion, "" when absent

    def identity(self) -> ModuleIdentity:
        """The loaded build's identity (empty fields: unknown)."""
        return ModuleIdentity(self.build_id, self.srcversion)


@dataclass(frozen=True)
class LivepatchState:
    """One /sys/kernel/livepatch/<name>/ directory."""

    name: str
    enabled: int | None  # None: file missing or unreadable
    transition: int | None
    objects: dict[str, int | None] = field(default_factory=dict)  # object -> patched (None: no file, < 6.1)
    functions: tuple[str, ...] = ()  # "object/func,sympos"
    module_present: bool = False
    module_taint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "enabled": self.enabled, "transition": self.transition,
                "objects": dict(self.objects), "functions": list(self.functions),
                "module_present": self.module_present, "module_taint": self.module_taint}


@dataclass(frozen=True)
class HostLivepatch:
    """Everything STATE_SCRIPT reports for one host."""

    sysfs: bool  # /sys/kernel/livepatch exists (CONFIG_LIVEPATCH)
    tainted: int | None
    patches: dict[str, LivepatchState]
    modules: dict[str, ModuleState]
    complete: bool  # the script ran to its end line

    def module(self, name: str) -> ModuleState:
        """The /sys/module state of `name` (absent when not reported)."""
        n = sysfs_name(name)
        return self.modules.get(n, ModuleState(n, False))

    def to_dict(self) -> dict[str, Any]:
        return {"sysfs": self.sysfs, "tainted": self.tainted,
                "patches": {k: v.to_dict() for k, v in self.patches.items()},
                "modules": {k: {"present": v.present, "taint": v.taint, "build_id": v.build_id,
                                "srcversion": v.srcversion} for k, v in self.modules.items()},
                "complete": self.complete}


def _int_or_none(value: str) -> int | None:
    try:
        return int(value.strip())
    except ValueError:
        return None


def parse_host_livepatch(stdout: str) -> HostLivepatch:
    """Parse STATE_SCRIPT output into a HostLivepatch (unknown lines are ignored)."""
    sysfs = False
    tainted: int | None = None
    complete = False
    order: list[str] = []
    raw: dict[str, dict[str, Any]] = {}
    modules: dict[str, ModuleState] = {}
    notes: dict[str, str] = {}
    srcversions: dict[str, str] = {}

    def rec(name: str) -> dict[str, Any]:
        if name not in raw:
            order.append(name)
            raw[name] = {"enabled": None, "transition": None, "objects": {}, "functions": []}
        return raw[name]

    for line in stdout.splitlines():
        parts = line.strip().split(" ")
        if not parts or not parts[0]:
            continue
        kind, args = parts[0], parts[1:]
        if kind == "livepatch_sysfs" and args:
            sysfs = args[0] == "1"
        elif kind == "tainted" and args:
            tainted = _int_or_none(args[0])
        elif kind == "patch" and args:
            rec(args[0])
        elif kind in ("enabled", "transition") and len(args) >= 2:
            rec(args[0])[kind] = _int_or_none(args[1])
        elif kind == "object" and len(args) >= 3:
            rec(args[0])["objects"][args[1]] = _int_or_none(args[2])
        elif kind == "function" and len(args) >= 3:
            rec(args[0])["functions"].append(f"{args[1]}/{args[2]}")
        elif kind == "module" and len(args) >= 2:
            taint = args[2] if len(args) >= 3 and args[2] not in ("-", "?") else ""
            modules[args[0]] = ModuleState(args[0], args[1] == "1", taint)
        elif kind == "notes" and args:
            notes[args[0]] = build_id_from_notes(args[1] if len(args) > 1 else "")
        elif kind == "srcversion" and len(args) >= 2 and args[1] not in ("-", "?"):
            srcversions[args[0]] = args[1]
        elif kind == "end":
            complete = True
    for n in set(notes) | set(srcversions):
        if n in modules:
            m = modules[n]
            modules[n] = ModuleState(m.name, m.present, m.taint, notes.get(n, ""), srcversions.get(n, ""))
    patches = {}
    for name in order:
        r = raw[name]
        mod = modules.get(name, ModuleState(name, False))
        patches[name] = LivepatchState(name, r["enabled"], r["transition"], r["objects"], tuple(r["functions"]),
                                       mod.present, mod.taint)
    return HostLivepatch(sysfs, tainted, patches, modules, complete)


def parse_livepatch_state(stdout: str) -> dict[str, LivepatchState]:
    """Parse STATE_SCRIPT output: livepatch name -> LivepatchState."""
    return parse_host_livepatch(stdout).patches


def state_command(*module_names: str) -> Command:
    """The STATE_SCRIPT command; also reports /sys/module for the named modules."""
    return Command.script(STATE_SCRIPT, *(sysfs_name(m) for m in module_names), label="livepatch-state", **_ROOT)


def read_state(t: StepTransport, *module_names: str) -> HostLivepatch:
    """Run STATE_SCRIPT on the host and parse it."""
    state: HostLivepatch = run_step(t, state_step(*module_names))
    return state


# --------------------------------------------------------------------------- names

def sysfs_name(module_name: str) -> str:
    """The module's name as sysfs and lsmod show it ('-' becomes '_'); validated."""
    name = module_name[:-3] if module_name.endswith(".ko") else module_name
    if not _MODULE_NAME.match(name):
        raise KpipeError(f"invalid module name {module_name!r}", hint="module names use [A-Za-z0-9_-], at most 55")
    return name.replace("-", "_")


def staged_path(release: str, module_file_name: str) -> str:
    """Where a module for `release` is installed: /var/lib/kpatch/<release>/<file>."""
    for what, value in (("kernel release", release), ("module file name", module_file_name)):
        if not _SAFE_COMPONENT.match(value) or value in (".", ".."):
            raise KpipeError(f"invalid {what} {value!r}", hint="no slashes, spaces or shell characters")
    return f"{KPATCH_DIR}/{release}/{module_file_name}"


# --------------------------------------------------------------------------- build identity

@dataclass(frozen=True)
class ModuleIdentity:
    """Which build a module is: its GNU build-id and its srcversion ("" when unknown)."""

    build_id: str = ""
    srcversion: str = ""

    @property
    def known(self) -> bool:
        return bool(self.build_id or self.srcversion)

    def differs(self, other: ModuleIdentity) -> str:
        """Why `other` (what a host has loaded) is not this build; "" when it is or cannot be told."""
        if self.build_id and other.build_id:
            if self.build_id == other.build_id:
                return ""
            return f"build-id {other.build_id[:16]}, want {self.build_id[:16]}"
        if self.srcversion and other.srcversion:
            return "" if self.srcversion == other.srcversion else \
                f"srcversion {other.srcversion}, want {self.srcversion}"
        return ""

    def to_dict(self) -> dict[str, str]:
        return {"build_id": self.build_id, "srcversion": self.srcversion}


def build_id_from_notes(hex_text: str) -> str:
    """The GNU build-id (hex) in the raw bytes of an ELF note section given as hex (pure); "" if none."""
    try:
        data = bytes.fromhex(hex_text.strip())
    except ValueError:
        return ""
    off = 0
    while off + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, off)
        off += 12
        name = data[off:off + namesz]
        off += (namesz + 3) & ~3
        desc = data[off:off + descsz]
        off += (descsz + 3) & ~3
        if name.rstrip(b"\0") == b"GNU" and ntype == 3 and len(desc) == descsz and desc:  # NT_GNU_BUILD_ID
            return desc.hex()
    return ""


def module_identity(path: str | Path) -> ModuleIdentity:
    """The build-id and srcversion of a module file (decompressed first); empty when it has none."""
    from kpipe.elf.reader import identity_sections  # kpipe/elf is the only reader of ELF files

    try:
        notes, srcversion = identity_sections(path)
    except (KpipeError, OSError):
        return ModuleIdentity()  # not an ELF module kpipe can read: the name and checksum are all we have
    return ModuleIdentity(build_id_from_notes(notes.hex()), srcversion)


# --------------------------------------------------------------------------- kernel log

_TS = re.compile(r"^\s*\[\s*[0-9.]+\]\s?")
_SYSLOG_PREFIX = re.compile(r"^<\d+>")

# The kernel's own failure lines (kernel-facts.md; module loader and kernel/livepatch/core.c, 6.1).
KERNEL_FAILURE_PATTERNS: tuple[re.Pattern[str], ...] = tuple(re.compile(p) for p in (
    r"version magic '.*' should be '.*'",
    r"disagrees about version of symbol",
    r"Unknown symbol ",
    r"no symbol version for ",
    r"failed to enable patch",
    r"symbol '.*' not found in symbol table",
    # kernel/livepatch/core.c klp_find_object_symbol / klp_resolve_symbols (6.1-7.2): a klp relocation the
    # kernel cannot resolve refuses the whole module
    r"unresolvable ambiguity for symbol '.*' in object '.*'",
    r"symbol position \d+ for symbol '.*' in object '.*' not found",
    r"is not marked as a livepatch symbol",
    r"invalid access to vmlinux symbol '.*' from module-specific livepatch relocation section",
    # apply_relocate_add: arch/x86/kernel/module.c, arch/arm64/kernel/module.c (6.1-7.2)
    r"Unknown rela relocation: \d+",
    r"unsupported RELA relocation: \d+",
    r"overflow in relocation type",
    r"failed to register ftrace handler",
    r"Key was rejected by service",
    r"Loading of .* is rejected",
    r"Loading of module with unavailable key is rejected",
    r"Loading of unsigned module is rejected",
    r"module is from the staging directory",
    r"invalid module format|Invalid module format|Exec format error",
))
STALL_PATTERN = re.compile(r"signaling remaining tasks")


def log_lines(dmesg_output: str) -> list[str]:
    """Kernel log text without the `[   1.234]` timestamps."""
    out = []
    for line in dmesg_output.splitlines():
        line = _SYSLOG_PREFIX.sub("", _TS.sub("", line)).rstrip()
        if line:
            out.append(line)
    return out


def lines_after_marker(dmesg_output: str, marker: str) -> list[str] | None:
    """The kernel log lines after the LAST occurrence of `marker`; None when it is not in the log."""
    lines = log_lines(dmesg_output)
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].endswith(marker) or marker in lines[i]:
            return lines[i + 1:]
    return None


def failure_lines(lines: list[str]) -> list[str]:
    """The kernel's failure lines (kernel-facts.md) among `lines`."""
    return [ln for ln in lines if any(p.search(ln) for p in KERNEL_FAILURE_PATTERNS)]


def new_marker(action: str = "", module_name: str = "") -> str:
    """A unique marker text: `kpipe: marker <uuid> <action> <module>`."""
    parts = ["kpipe: marker", uuid.uuid4().hex]
    if action:
        parts.append(action)
    if module_name:
        parts.append(module_name)
    return " ".join(parts)


MARKER_SCRIPT = r"""printf '%s\n' "$1" > /dev/kmsg"""


# --------------------------------------------------------------------------- results

@dataclass
class OpResult:
    """What one host step did: ok, whether it changed the host, and the evidence."""

    step: str
    ok: bool
    changed: bool = False
    message: str = ""
    marker: str = ""
    output: str = ""  # the tool's own stdout/stderr, verbatim
    seconds: float = 0.0
    kernel_lines: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Verification:
    """A verification: ok only when `problems` is empty; problems quote the kernel's lines."""

    ok: bool
    problems: list[str]
    state: HostLivepatch | None = None
    kernel_lines: list[str] = field(default_factory=list)  # the log after the marker
    probe_output: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": list(self.problems),
                "state": None if self.state is None else self.state.to_dict(),
                "kernel_lines": list(self.kernel_lines), "probe_output": self.probe_output}


class OpFailed(StepFailed):
    """A host operation's step failed; `result` holds the evidence (what the routines return)."""

    def __init__(self, result: OpResult):
        super().__init__(result.step, result.message,
                         {"output": result.output[-2000:], "kernel": result.kernel_lines[-20:]})
        self.result = result


class VerifyFailed(StepFailed):
    """A verification found problems; `verification` holds them and the state they came from."""

    def __init__(self, step: str, verification: Verification):
        super().__init__(step, "; ".join(verification.problems),
                         {"kernel": verification.kernel_lines[-20:],
                          "probe_output": verification.probe_output[-500:]})
        self.verification = verification


# The dmesg a script prints after its own output, so that one round trip carries the kernel's reason.
_DMESG_SEP = "---kpipe-dmesg---"


def _split_log(stdout: str) -> tuple[str, str]:
    head, _, log = stdout.partition(_DMESG_SEP)
    return head, log


def _state_of(step: str, r: CommandResult, text: str | None = None) -> HostLivepatch:
    st = parse_host_livepatch(r.stdout if text is None else text)
    if not st.complete:
        raise LivepatchOpError(f"reading livepatch state failed: {r.summary()}", host=r.host, step=step,
                               output=r.stdout + r.stderr)
    return st


# --------------------------------------------------------------------------- reads

def state_step(*module_names: str, step: str = "state") -> Step[HostLivepatch]:
    """Read the host's livepatch state (STATE_SCRIPT) and /sys/module of the named modules."""
    return Step(step, state_command(*module_names), partial(_state_of, step), writes=False, journal=False)


def _noop(step: str, kind: str, name: str, message: str, r: CommandResult) -> OpResult:
    # a step decided to be a no-op when its plan was built: the read shows the host still is that way
    st = _state_of(step, r)
    now = name in st.patches if kind == "patch" else st.module(name).present
    if now:
        raise OpFailed(OpResult(step, False, False, f"{name} was loaded after the state was read; run again",
                                output=r.stdout[-2000:], seconds=r.duration))
    return OpResult(step, True, False, message, seconds=r.duration)


def _note(step: str, message: str, r: CommandResult) -> OpResult:
    _state_of(step, r)
    return OpResult(step, True, False, message, seconds=r.duration)


def note_step(step: str, module_name: str, message: str) -> Step[OpResult]:
    """A journaled step that changes nothing (decided from the facts: e.g. another build is loaded):
    it re-reads the state as its evidence and reports `message`."""
    return Step(step, state_command(module_name), partial(_note, step, message), writes=False)


KPATCH_CLI_SCRIPT = "command -v kpatch >/dev/null 2>&1 && echo yes || echo no"


def kpatch_cli_step() -> Step[bool]:
    """Whether the kpatch CLI is on the host's PATH."""
    return Step("kpatch-cli", Command.script(KPATCH_CLI_SCRIPT, label="kpatch-cli"),
                lambda r: r.stdout.strip() == "yes", writes=False, journal=False)


# --------------------------------------------------------------------------- marker

def _marker_written(marker: str, r: CommandResult) -> str:
    if not r.ok:
        raise LivepatchOpError(f"writing the /dev/kmsg marker failed: {r.summary()}", host=r.host, step="marker",
                               output=r.stderr)
    return marker


def marker_step(marker: str, step: str = "marker") -> Step[str]:
    """Write `marker` (see new_marker) to /dev/kmsg; the kernel log after it belongs to what follows."""
    return Step(step, Command.script(MARKER_SCRIPT, marker, label="marker", **_ROOT),
                partial(_marker_written, marker), done=lambda m: {"marker": m})


DMESG = Command.of("dmesg", label="dmesg", **_ROOT)


def _marker_found(marker: str, r: CommandResult) -> str:
    if not r.ok:
        raise LivepatchOpError(f"reading the kernel log failed: {r.summary()}", host=r.host, step="marker",
                               output=r.stderr)
    return marker if lines_after_marker(r.stdout, marker) is not None else ""


def marker_check_step(marker: str, step: str = "marker") -> Step[str]:
    """Whether an earlier marker is still in the kernel log: the marker, or "" when the log lost it
    (ring buffer wrapped, log reset) and a load can no longer be proved from the log."""
    return Step(step, DMESG, partial(_marker_found, marker), intended={"reuse": marker}, writes=False,
                done=lambda m: {"marker": m} if m else {"marker": "", "lost": marker})


def write_marker(t: StepTransport, action: str = "", module_name: str = "") -> str:
    """Write a unique marker line to /dev/kmsg; return it (read the log after it)."""
    marker: str = run_step(t, marker_step(new_marker(action, module_name and sysfs_name(module_name))))
    return marker


# --------------------------------------------------------------------------- stage

# "$1" folder, "$2" final path, "$3" module file name. Partial copies a killed kpipe left
# (the temp name is deterministic, see temp_path) go first.
STAGE_CHECK_SCRIPT = r"""
mkdir -p "$1" || exit 2
rm -f -- "$1/.$3.kpipe-"*
if [ -f "$2" ]; then sha256sum "$2" | cut -d ' ' -f 1; else echo absent; fi
"""

# "$1" temp file, "$2" final path, "$3" expected sha256. The label goes on before the
# rename so the final name never exists unlabeled; /sys/fs/selinux/enforce exists iff
# SELinux is enabled (enforcing or permissive).
STAGE_COMMIT_SCRIPT = r"""
got=$(sha256sum "$1" | cut -d ' ' -f 1)
if [ "$got" != "$3" ]; then rm -f "$1"; echo "checksum mismatch: got $got, want $3" >&2; exit 3; fi
if [ -e /sys/fs/selinux/enforce ]; then
  chcon -t modules_object_t "$1" || { rm -f "$1"; echo "chcon failed" >&2; exit 4; }
  echo selinux-labeled
fi
mv -f "$1" "$2" || { rm -f "$1"; exit 5; }
sync "$2" 2>/dev/null || sync
echo staged
"""

TEMP_MARK = ".kpipe-"


def temp_path(release: str, module_file_name: str, sha256: str) -> str:
    """The upload's temp name beside the final file: `.<file>.kpipe-<sha256 prefix>`.

    Deterministic, so a copy left by a kpipe killed mid-upload is found and removed by the
    next stage, unstage or rollback (they remove every `.<file>.kpipe-*`)."""
    dest = staged_path(release, module_file_name)
    folder = dest.rsplit("/", 1)[0]
    return f"{folder}/.{module_file_name}{TEMP_MARK}{sha256.lower()[:16]}"


def _stage_checked(folder: str, dest: str, confirm: str, r: CommandResult) -> str:
    if not r.ok:
        raise LivepatchOpError(f"cannot create {folder}: {r.summary()}", host=r.host, step="stage", output=r.stderr)
    got = r.stdout.strip()
    if confirm and got != confirm:
        raise LivepatchOpError(f"{dest} changed after it was read (sha256 {got[:12]}, want {confirm[:12]}); "
                               f"run again", host=r.host, step="stage", output=r.stdout)
    return dest if confirm else got


def stage_check_step(release: str, module_file_name: str, *, confirm: str = "") -> Step[str]:
    """Create the folder, remove partial uploads, read the installed file's sha256 ("absent").
    With `confirm` (a sha256) the file must have it: the step's value is then the path."""
    dest = staged_path(release, module_file_name)
    folder = dest.rsplit("/", 1)[0]
    return Step("stage", Command.script(STAGE_CHECK_SCRIPT, folder, dest, module_file_name, label="stage-check",
                                        **_ROOT), partial(_stage_checked, folder, dest, confirm.lower()))


def _staged(dest: str, r: CommandResult) -> str:
    if not r.ok:
        raise LivepatchOpError(f"staging {dest} failed: {(r.stderr or r.stdout).strip()}", host=r.host,
                               step="stage", output=r.stdout + r.stderr)
    return dest


def stage_plan(local_path: str | Path, release: str, sha256: str, module_file_name: str,
               installed: str) -> list[Step[Any]]:
    """Install the module at /var/lib/kpatch/<release>/<file>, checksum verified and atomic.

    `installed` is the sha256 of the file already at that path ("absent"), as a read returned it:
    the same build means a check only, no upload. The last step's value is the path. A failed upload
    leaves its temp file (journaled); the next stage, unstage or rollback removes it."""
    dest = staged_path(release, module_file_name)
    sha = sha256.lower()
    if installed.strip().lower() == sha:
        return [stage_check_step(release, module_file_name, confirm=sha)]
    tmp = temp_path(release, module_file_name, sha)
    return [stage_check_step(release, module_file_name),
            Step("stage", Upload(Path(local_path), tmp, label="stage-upload"), lambda r: tmp),
            Step("stage", Command.script(STAGE_COMMIT_SCRIPT, tmp, dest, sha, label="stage", **_ROOT),
                 partial(_staged, dest))]


def stage(t: StepTransport, local_path: str | Path, release: str, sha256: str, module_file_name: str) -> str:
    """Install the module at /var/lib/kpatch/<release>/<file> (checksum verified, atomic); return the path."""
    installed = run_step(t, stage_check_step(release, module_file_name))
    path: str = run_steps(t, stage_plan(local_path, release, sha256, module_file_name, installed))[-1]
    return path


# --------------------------------------------------------------------------- load

def load_command(remote_path: str, *, kpatch_cli: bool) -> Command:
    """The command that loads a module file: `kpatch load` or /sbin/insmod."""
    if kpatch_cli:
        return Command.of("kpatch", "load", remote_path, label="load", timeout=120, **_ROOT)
    return Command.of(INSMOD, remote_path, label="load", timeout=120, **_ROOT)


# "$@" the load command (load_command's argv); then the kernel log, so a refusal carries the
# kernel's own reason in the same round trip. The loader's exit status is the script's.
LOAD_SCRIPT = r"""
"$@"
rc=$?
echo "---kpipe-dmesg---"
dmesg
exit $rc
"""


def _loaded(marker: str, kpatch_cli: bool, r: CommandResult) -> OpResult:
    head, log = _split_log(r.stdout)
    output = (head + r.stderr).strip()
    kernel = (lines_after_marker(log, marker) or []) if marker else []
    if not r.ok:
        reason = (r.stderr.strip().splitlines() or [f"exit status {r.exit_status}"])[-1]
        fails = failure_lines(kernel)
        msg = f"{'kpatch load' if kpatch_cli else 'insmod'} failed: {reason}"
        if fails:
            msg += f"; kernel: {fails[-1]}"
        raise OpFailed(OpResult("load", False, False, msg, marker, output, r.duration, kernel))
    return OpResult("load", True, True, "loaded", marker, output, r.duration, kernel)


def load_step(remote_path: str, *, marker: str, kpatch_cli: bool, timeout: float = 120.0,
              step: str = "load") -> Step[OpResult]:
    """Run the loader, then read the kernel log after `marker`. `ok` means only that the loader
    accepted the module: verify decides."""
    cmd = load_command(remote_path, kpatch_cli=kpatch_cli)
    return Step(step, Command.script(LOAD_SCRIPT, *cmd.argv, label="load", timeout=timeout, **_ROOT),
                partial(_loaded, marker, kpatch_cli))


def _still_loaded(name: str, r: CommandResult) -> OpResult:
    st = _state_of("load", r)
    p = st.patches.get(name)
    if p is None or p.enabled != 1:
        raise OpFailed(OpResult("load", False, False, f"{name} is no longer loaded and enabled; run again",
                                output=r.stdout[-2000:], seconds=r.duration))
    return OpResult("load", True, False, "already loaded and enabled", seconds=r.duration)


def load_plan(remote_path: str, module_name: str, state: HostLivepatch, *, marker: str, kpatch_cli: bool,
              timeout: float = 120.0, step: str = "load", with_marker: bool = False) -> list[Step[Any]]:
    """Load a staged module, decided from `state` (the host's livepatch state as read).

    Loaded and enabled: a confirming read only. A copy left disabled cannot be re-enabled (kernel/
    livepatch): it is disabled to the end and removed, then loaded again. The load's kernel lines are
    read after `marker`: the caller wrote it before (marker_step), or `with_marker` writes it here."""
    name = sysfs_name(module_name)
    patch = state.patches.get(name)
    if patch is not None and patch.enabled == 1:
        return [Step(step, state_command(name), partial(_still_loaded, name), writes=False)]
    steps: list[Step[Any]] = []
    if patch is not None:
        steps += [Step(step, disable_command(name), partial(_disabled, name, marker)),
                  Step(step, wait_command(name, timeout, "gone"), partial(_gone, name, timeout, marker, False))]
    if patch is not None or state.module(name).present:
        steps.append(Step(step, rmmod_command(name), partial(_removed, name)))
    if with_marker:
        steps.append(marker_step(marker, step))
    steps.append(load_step(remote_path, marker=marker, kpatch_cli=kpatch_cli, timeout=timeout, step=step))
    return steps


# --------------------------------------------------------------------------- transition

# "$1" module, "$2" timeout in seconds (integer), "$3" wanted: "0" (transition done) or "gone".
# On a timeout the kernel log follows (it may say which task stalls the transition).
WAIT_SCRIPT = r"""
d=/sys/kernel/livepatch/$1
end=$(( $(date +%s) + $2 ))
while :; do
  if [ ! -d "$d" ]; then echo gone; exit 0; fi
  tr=$(cat "$d/transition" 2>/dev/null || echo '?')
  if [ "$3" = 0 ] && [ "$tr" = 0 ]; then echo "transition 0"; exit 0; fi
  if [ "$(date +%s)" -ge "$end" ]; then
    echo "timeout transition $tr enabled $(cat "$d/enabled" 2>/dev/null)"
    echo "---kpipe-dmesg---"
    dmesg
    exit 1
  fi
  sleep 0.1 2>/dev/null || sleep 1
done
"""


def wait_command(name: str, timeout: float, wanted: str) -> Command:
    """WAIT_SCRIPT for `name` until `wanted` ("0": transition done, "gone": sysfs dir removed)."""
    secs = max(1, int(timeout + 0.999))
    return Command.script(WAIT_SCRIPT, sysfs_name(name), str(secs), wanted, label=f"wait-{wanted}",
                          timeout=secs + 30, **_ROOT)


def _stall_lines(dmesg_output: str, marker: str) -> list[str]:
    # "livepatch: signaling remaining tasks" names no patch (kernel/livepatch/transition.c,
    # klp_send_signals, 5.1+): read it after the load's marker when there is one
    lines = (lines_after_marker(dmesg_output, marker) if marker else None) or log_lines(dmesg_output)
    return [ln for ln in lines if STALL_PATTERN.search(ln)]


def _transitioned(name: str, timeout: float, marker: str, r: CommandResult) -> OpResult:
    head, log = _split_log(r.stdout)
    out = head.strip()
    if r.ok and out == "transition 0":
        return OpResult("wait", True, False, "transition complete", seconds=r.duration)
    if r.ok and out == "gone":
        raise OpFailed(OpResult("wait", False, False, f"/sys/kernel/livepatch/{name} is gone", output=out,
                                seconds=r.duration))
    stalls = _stall_lines(log, marker)
    msg = f"transition still running after {timeout:g} s ({out or r.summary()})"
    if stalls:
        msg += f"; kernel: {stalls[-1]}"
    raise OpFailed(OpResult("wait", False, False, msg, output=out, seconds=r.duration, kernel_lines=stalls))


def wait_step(module_name: str, timeout: float = 60.0, *, marker: str = "", step: str = "wait") -> Step[OpResult]:
    """Wait until the patch's transition is 0 (never writes `force`); a stall is reported from the log."""
    name = sysfs_name(module_name)
    return Step(step, wait_command(name, timeout, "0"), partial(_transitioned, name, timeout, marker),
                writes=False)


def wait_transition(t: StepTransport, module_name: str, timeout: float = 60.0, *, marker: str = "") -> OpResult:
    """Wait until the patch's transition is 0 (never writes `force`); reports stalls from the log."""
    return _op_result(t, [wait_step(module_name, timeout, marker=marker)])


# --------------------------------------------------------------------------- verify

# One round trip: the state, a separator, then the whole kernel log.
VERIFY_SCRIPT = STATE_SCRIPT + r"""
echo "---kpipe-dmesg---"
dmesg
"""


def evaluate_loaded(module_name: str, state: HostLivepatch, kernel_after_marker: list[str] | None,
                    marker: str = "", expect: ModuleIdentity | None = None) -> list[str]:
    """Problems with a loaded patch (pure): sysfs, taint K, /sys/module (and, with `expect`, that it is
    that build: build-id, else srcversion), the log after the marker."""
    name = sysfs_name(module_name)
    problems: list[str] = []
    # the kernel's own reason first: it is what a user needs to read
    if marker and kernel_after_marker is not None:
        problems.extend(f"kernel: {ln}" for ln in failure_lines(kernel_after_marker))
    if not state.sysfs:
        problems.append("/sys/kernel/livepatch does not exist (kernel without CONFIG_LIVEPATCH?)")
    patch = state.patches.get(name)
    if patch is None:
        problems.append(f"/sys/kernel/livepatch/{name} does not exist")
    else:
        if patch.enabled != 1:
            problems.append(f"/sys/kernel/livepatch/{name}/enabled is {_show(patch.enabled)}, want 1")
        if patch.transition != 0:
            problems.append(f"/sys/kernel/livepatch/{name}/transition is {_show(patch.transition)}, want 0")
        for obj, patched in patch.objects.items():
            if patched is not None and patched != 1:
                problems.append(f"/sys/kernel/livepatch/{name}/{obj}/patched is {patched}, want 1")
    mod = state.module(name)
    if not mod.present:
        problems.append(f"/sys/module/{name} does not exist")
    elif expect is not None:
        why = expect.differs(mod.identity())
        if why:
            problems.append(f"/sys/module/{name} is another build of {name}: {why}")
    if state.tainted is None:
        problems.append("/proc/sys/kernel/tainted could not be read")
    elif not state.tainted & TAINT_LIVEPATCH:
        problems.append(f"taint K (livepatch, bit 15) is not set: tainted={state.tainted}")
    if marker:
        if kernel_after_marker is None:
            problems.append(f"the marker {marker!r} is not in the kernel log")
        else:
            if not any(f"'{name}': patching complete" in ln for ln in kernel_after_marker):
                problems.append(f"no \"livepatch: '{name}': patching complete\" in the kernel log after the marker")
    return problems


def evaluate_removed(module_name: str, state: HostLivepatch, kernel_after_marker: list[str] | None,
                     marker: str = "", expect: ModuleIdentity | None = None) -> list[str]:
    """Problems with a removed patch (pure): sysfs dir and /sys/module gone, unpatching logged.
    With `expect`, a module of the same name that is provably another build is not ours: it may stay."""
    name = sysfs_name(module_name)
    problems: list[str] = []
    if expect is not None and state.module(name).present and expect.differs(state.module(name).identity()):
        return problems
    if name in state.patches:
        p = state.patches[name]
        problems.append(f"/sys/kernel/livepatch/{name} still exists (enabled={_show(p.enabled)}, "
                        f"transition={_show(p.transition)})")
    if state.module(name).present:
        problems.append(f"/sys/module/{name} still exists (module still loaded)")
    if marker:
        if kernel_after_marker is None:
            problems.append(f"the marker {marker!r} is not in the kernel log")
        elif not any(f"'{name}': unpatching complete" in ln for ln in kernel_after_marker):
            problems.append(f"no \"livepatch: '{name}': unpatching complete\" in the kernel log after the marker")
    return problems


def _show(v: int | None) -> str:
    return "missing" if v is None else str(v)



def verify_state_command(module_name: str) -> Command:
    """VERIFY_SCRIPT: the livepatch state and /sys/module of `module_name`, then the kernel log."""
    return Command.script(VERIFY_SCRIPT, sysfs_name(module_name), label="verify-state", **_ROOT)


def probe_command(argv: tuple[str, ...]) -> Command:
    """The recipe's probe, run as the login user (no sudo)."""
    return Command(argv=tuple(argv), label="probe", timeout=60)


def probe_result(argv: tuple[str, ...], expect: str, r: CommandResult) -> tuple[bool, str, str]:
    """A probe's output against its regex (pure): (matched, stdout, problem text)."""
    try:
        matched = re.search(expect, r.stdout) is not None
    except re.error as e:
        return False, r.stdout, f"probe regex {expect!r} is invalid: {e}"
    if matched:
        return True, r.stdout, ""
    got = r.stdout.strip().replace("\n", "\\n")[:200]
    extra = f" (exit {r.exit_status}: {r.stderr.strip()[:200]})" if not r.ok else ""
    return False, r.stdout, f"probe {' '.join(argv)!r} printed {got!r}, want /{expect}/{extra}"


def _probed(step: str, argv: tuple[str, ...], expect: str, r: CommandResult) -> Verification:
    ok, out, problem = probe_result(argv, expect, r)
    if not ok:
        raise VerifyFailed(step, Verification(False, [problem], None, [], out))
    return Verification(True, [], None, [], out)


def _verified(step: str, name: str, marker: str, expect: ModuleIdentity | None, lost_ok: bool, removed: bool,
              r: CommandResult) -> Verification:
    head, log = _split_log(r.stdout)
    st = _state_of(step, r, head)
    after = lines_after_marker(log, marker) if marker else []
    if marker and after is None and lost_ok:
        # a reused marker the log no longer holds: the load cannot be re-proved from the log, sysfs must do
        marker, after = "", []
    evaluate = evaluate_removed if removed else evaluate_loaded
    problems = evaluate(name, st, after, marker, expect)
    v = Verification(not problems, problems, st, after or [])
    if problems:
        raise VerifyFailed(step, v)
    return v


def verify_loaded_plan(module_name: str, marker: str, probe: Probe | None = None,
                       expect: ModuleIdentity | None = None, *, step: str = "verify",
                       marker_may_be_lost: bool = False) -> list[Step[Verification]]:
    """Verify a load through sysfs, taint, the loaded build (`expect`), the log after `marker`, then the
    probe; never from exit codes. `marker_may_be_lost`: a reused marker missing from the log is no
    failure (sysfs decides)."""
    name = sysfs_name(module_name)
    steps: list[Step[Verification]] = [
        Step(step, verify_state_command(name), partial(_verified, step, name, marker, expect, marker_may_be_lost,
                                                       False), writes=False)]
    if probe is not None and probe.argv:
        steps.append(Step(step, probe_command(probe.argv), partial(_probed, step, tuple(probe.argv), probe.expect),
                          writes=False))
    return steps


def verify_removed_plan(module_name: str, probe: Probe | None = None, *, marker: str = "",
                        expect: ModuleIdentity | None = None, step: str = "verify") -> list[Step[Verification]]:
    """Verify a removal: /sys/module/<m> and /sys/kernel/livepatch/<m> gone (or provably another build
    than `expect`), unpatching logged after `marker`, then the probe's after-rollback regex."""
    name = sysfs_name(module_name)
    steps: list[Step[Verification]] = [
        Step(step, verify_state_command(name), partial(_verified, step, name, marker, expect, False, True),
             writes=False)]
    if probe is not None and probe.argv and probe.expect_after_rollback:
        steps.append(Step(step, probe_command(probe.argv),
                          partial(_probed, step, tuple(probe.argv), probe.expect_after_rollback), writes=False))
    return steps


def merged(values: list[Verification]) -> Verification:
    """One Verification from a verify plan's values: the state read's, with the probe's output."""
    first, last = values[0], values[-1]
    return Verification(True, [], first.state, first.kernel_lines, last.probe_output)


# --------------------------------------------------------------------------- disable / unload

# "$1" module. Writes 0 only when enabled is 1; EBUSY (another patch in transition)
# comes back as the shell's write error on stderr.
DISABLE_SCRIPT = r"""
d=/sys/kernel/livepatch/$1
if [ ! -d "$d" ]; then echo absent; exit 0; fi
if [ "$(cat "$d/enabled")" = 1 ]; then
  echo 0 > "$d/enabled" || exit 16
  echo disabled
else
  echo already-disabled
fi
"""


def disable_command(module_name: str) -> Command:
    """DISABLE_SCRIPT: `echo 0 > enabled` when enabled is 1."""
    return Command.script(DISABLE_SCRIPT, sysfs_name(module_name), label="disable", **_ROOT)


def _disabled(name: str, marker: str, r: CommandResult) -> OpResult:
    if not r.ok:
        err = r.stderr.strip() or r.stdout.strip()
        busy = "busy" in err.lower()
        msg = ("EBUSY: another livepatch is in transition: " if busy else "writing enabled failed: ") + err
        raise OpFailed(OpResult("disable", False, False, msg, marker, r.stdout + r.stderr, r.duration))
    out = r.stdout.strip()
    return OpResult("disable", True, out == "disabled", out, marker, out, r.duration)


def _gone(name: str, timeout: float, marker: str, changed: bool, r: CommandResult) -> OpResult:
    head, log = _split_log(r.stdout)
    if r.ok and head.strip() == "gone":
        return OpResult("disable", True, changed, "disabled; sysfs dir gone", marker, head.strip(), r.duration)
    stalls = _stall_lines(log, marker)
    msg = f"/sys/kernel/livepatch/{name} still present after {timeout:g} s ({head.strip()})"
    if stalls:
        msg += f"; kernel: {stalls[-1]}"
    raise OpFailed(OpResult("disable", False, True, msg, marker, head, r.duration, stalls))


def disable_plan(module_name: str, state: HostLivepatch, *, marker: str, timeout: float = 60.0,
                 step: str = "disable") -> list[Step[Any]]:
    """Disable the patch (marker, echo 0 > enabled) and wait until its sysfs dir is gone, decided from
    `state`: not a livepatch there, a confirming read only. The last value's `changed` says whether
    enabled was 1 (the log after `marker` then holds "unpatching complete")."""
    name = sysfs_name(module_name)
    patch = state.patches.get(name)
    if patch is None:
        return [Step(step, state_command(name), partial(_noop, "disable", "patch", name, "not loaded as a livepatch"),
                     writes=False)]
    return [marker_step(marker, step),
            Step(step, disable_command(name), partial(_disabled, name, marker)),
            Step(step, wait_command(name, timeout, "gone"), partial(_gone, name, timeout, marker, patch.enabled == 1))]


def rmmod_command(module_name: str) -> Command:
    """/sbin/rmmod of the module."""
    return Command.of(RMMOD, sysfs_name(module_name), label="unload", timeout=60, **_ROOT)


def _removed(name: str, r: CommandResult) -> OpResult:
    output = (r.stdout + r.stderr).strip()
    if r.ok:
        return OpResult("unload", True, True, "removed", output=output, seconds=r.duration)
    if "is not currently loaded" in r.stderr:  # gone since the state was read: where the step wants it
        return OpResult("unload", True, False, "not loaded", output=output, seconds=r.duration)
    reason = (r.stderr.strip().splitlines() or [f"exit status {r.exit_status}"])[-1]
    raise OpFailed(OpResult("unload", False, False, f"rmmod failed: {reason}", output=r.stdout + r.stderr,
                            seconds=r.duration))


def _refuse_enabled(name: str, r: CommandResult) -> OpResult:
    _state_of("unload", r)
    raise OpFailed(OpResult("unload", False, False, f"{name} is an enabled livepatch: disable it first",
                            output=r.stdout[-2000:], seconds=r.duration))


def unload_plan(module_name: str, state: HostLivepatch, *, disabled_before: bool = False,
                step: str = "unload") -> list[Step[Any]]:
    """Remove the module with /sbin/rmmod, decided from `state`: absent, a confirming read only; an
    enabled livepatch (unless `disabled_before`: a disable precedes in the same plan), refused."""
    name = sysfs_name(module_name)
    if not state.module(name).present:
        return [Step(step, state_command(name), partial(_noop, "unload", "module", name, "not loaded"),
                     writes=False)]
    patch = state.patches.get(name)
    if patch is not None and patch.enabled == 1 and not disabled_before:
        return [Step(step, state_command(name), partial(_refuse_enabled, name), writes=False)]
    return [Step(step, rmmod_command(name), partial(_removed, name))]


# "$1" final path, "$2" folder, "$3" module file name, "$4" sha256 of the build to remove ("" = any).
# A file of another build at the same path is not ours to remove: it is kept and reported.
UNSTAGE_SCRIPT = r"""
rm -f -- "$2/.$3.kpipe-"*
if [ -n "$4" ] && [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d ' ' -f 1)" != "$4" ]; then echo kept-other; exit 0; fi
if [ -e "$1" ]; then rm -f -- "$1" && echo removed; else echo absent; fi
"""


def _unstaged(dest: str, sha256: str, r: CommandResult) -> OpResult:
    out = r.stdout.strip()
    if not r.ok:
        raise OpFailed(OpResult("unstage", False, False, r.summary(), output=r.stderr, seconds=r.duration))
    message = {"removed": "removed", "absent": "not staged",
               "kept-other": f"kept {dest}: another build (not sha256 {sha256[:12]})"}.get(out, out)
    return OpResult("unstage", True, out == "removed", message, output=r.stderr, seconds=r.duration)


def unstage_step(release: str, module_file_name: str, sha256: str = "", *, step: str = "unstage") -> Step[OpResult]:
    """Remove the staged file and any partial upload of it (idempotent); with `sha256`, a file of
    another build at that path is kept."""
    dest = staged_path(release, module_file_name)
    folder = dest.rsplit("/", 1)[0]
    return Step(step, Command.script(UNSTAGE_SCRIPT, dest, folder, module_file_name, sha256.lower(),
                                     label="unstage", **_ROOT), partial(_unstaged, dest, sha256))


# --------------------------------------------------------------------------- SELinux labels

SELINUX_MODULE_CONTEXT = "system_u:object_r:modules_object_t:s0"


def _labelled(path: str, r: CommandResult) -> str:
    if not r.ok:
        raise LivepatchOpError(f"cannot label {path} {SELINUX_MODULE_CONTEXT}: {(r.stderr or r.stdout).strip()}",
                               host=r.host, step="label", output=r.stdout + r.stderr,
                               hint="the host has SELinux enabled: without modules_object_t its policy may refuse "
                                    "the module; check chcon and the loaded policy")
    return path


def parse_ls_context(stdout: str) -> str:
    """The SELinux context `ls -Z FILE` prints before the name ("" when it shows none, e.g. "?")."""
    first = stdout.strip().split()[0] if stdout.strip() else ""
    return first if first.count(":") >= 3 else ""


def _label_checked(path: str, r: CommandResult) -> dict[str, str]:
    got = parse_ls_context(r.stdout) if r.ok else ""
    if got != SELINUX_MODULE_CONTEXT:
        raise LivepatchOpError(f"{path} is labelled {got or 'nothing'} after chcon, want {SELINUX_MODULE_CONTEXT}",
                               host=r.host, step="label", output=r.stdout + r.stderr,
                               hint="the policy may not know modules_object_t; run restorecon or fix the policy")
    return {"path": path, "context": got}


def label_plan(path: str, *, step: str = "label") -> list[Step[Any]]:
    """Label a staged module `system_u:object_r:modules_object_t:s0` (hosts with SELinux enabled, as the
    facts say) and read the label back with `ls -Z`: a host where it does not stick fails with the reason."""
    return [Step(step, Command.of("chcon", SELINUX_MODULE_CONTEXT, path, label="label", **_ROOT),
                 partial(_labelled, path), intended={"path": path, "context": SELINUX_MODULE_CONTEXT}),
            Step(step, Command.of("ls", "-Z", path, label="label-check", **_ROOT), partial(_label_checked, path),
                 done=lambda d: d, writes=False)]


# --------------------------------------------------------------------------- persist
# Without the kpatch CLI, kpipe persists a module itself: the file under /var/lib/kpipe/modules/<release>/
# <stream>/ and kpipe-livepatch.service, a oneshot that runs a small loader at boot. The loader loads, for the
# running release only, the newest file of each stream (`ls -v` order), so a module never meets a kernel it was
# not built for. Where the kpatch CLI exists, its own layout and kpatch.service are used instead.

PERSIST_DIR = "/var/lib/kpipe/modules"
PERSIST_UNIT = "kpipe-livepatch.service"
PERSIST_UNIT_PATH = f"/etc/systemd/system/{PERSIST_UNIT}"
PERSIST_LOADER_PATH = "/usr/local/libexec/kpipe-livepatch-load"

PERSIST_LOADER = r"""#!/bin/sh
# Installed by kpipe (kpipe-livepatch.service): load, for the running kernel release only, the newest
# persisted live patch module of each stream under /var/lib/kpipe/modules/<release>/<stream>/.
base=/var/lib/kpipe/modules/$(uname -r)
[ -d "$base" ] || exit 0
rc=0
for d in "$base"/*/; do
  [ -d "$d" ] || continue
  m=$(ls -1v "$d" | grep '\.ko$' | tail -n 1)
  [ -n "$m" ] || continue
  name=$(basename "$m" .ko | tr - _)
  [ -d "/sys/module/$name" ] && continue
  echo "kpipe-livepatch: loading $d$m"
  /sbin/insmod "$d$m" || rc=1
done
exit $rc
"""

PERSIST_UNIT_TEXT = f"""[Unit]
Description=Load kpipe's persisted kernel live patches for the running kernel
After=local-fs.target
ConditionPathIsDirectory={PERSIST_DIR}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={PERSIST_LOADER_PATH}

[Install]
WantedBy=multi-user.target
"""

# $1 staged file, $2 stream folder, $3 persisted file, $4 unit path, $5 unit text, $6 loader path, $7 loader text,
# $8 SELinux context ("" when the facts say SELinux is off). Prints `persisted`, or `no-systemd` (nothing written).
PERSIST_SCRIPT = r"""
[ -d /run/systemd/system ] || { echo no-systemd; exit 0; }
mkdir -p "$2" || exit 2
cp -f -- "$1" "$3.kpipe-tmp" && mv -f -- "$3.kpipe-tmp" "$3" || { rm -f -- "$3.kpipe-tmp"; exit 3; }
if [ -n "$8" ]; then chcon "$8" "$3" || { echo "chcon $8 $3 failed" >&2; exit 4; }; fi
mkdir -p "${6%/*}" || exit 2
printf '%s' "$7" > "$6.kpipe-tmp" && chmod 755 "$6.kpipe-tmp" && mv -f -- "$6.kpipe-tmp" "$6" || exit 5
printf '%s' "$5" > "$4.kpipe-tmp" && mv -f -- "$4.kpipe-tmp" "$4" || exit 5
systemctl daemon-reload || exit 6
systemctl enable "${4##*/}" >/dev/null 2>&1 || { echo "systemctl enable ${4##*/} failed" >&2; exit 6; }
sync
echo persisted
"""

# $1 persisted file, $2 stream folder, $3 modules root, $4 unit path, $5 loader path. Removes the file (and the
# unit and loader once no persisted module is left). Prints `removed` or `absent`.
UNPERSIST_SCRIPT = r"""
out=absent
if [ -e "$1" ]; then rm -f -- "$1" || exit 3; out=removed; fi
rmdir -- "$2" "${2%/*}" 2>/dev/null
if [ -z "$(find "$3" -name '*.ko' 2>/dev/null | head -n 1)" ] && [ -e "$4" ]; then
  systemctl disable "${4##*/}" >/dev/null 2>&1
  rm -f -- "$4" "$5"
  systemctl daemon-reload 2>/dev/null
fi
sync
echo "$out"
"""


def persisted_path(release: str, stream: str, module_file_name: str) -> str:
    """Where kpipe persists a module without the kpatch CLI: /var/lib/kpipe/modules/<release>/<stream>/<file>."""
    for what, value in (("kernel release", release), ("stream", stream), ("module file name", module_file_name)):
        if not _SAFE_COMPONENT.match(value) or value in (".", ".."):
            raise KpipeError(f"invalid {what} {value!r}", hint="no slashes, spaces or shell characters")
    return f"{PERSIST_DIR}/{release}/{stream}/{module_file_name}"


def _persisted(r: CommandResult) -> dict[str, Any]:
    if not r.ok:
        raise StepFailed("persist", f"kpatch install failed: {r.summary()}")
    return {"persisted": True, "method": "kpatch"}


def _kpipe_persisted(path: str, r: CommandResult) -> dict[str, Any]:
    out = r.stdout.strip()
    if not r.ok:
        raise StepFailed("persist", f"persisting {path} failed: {(r.stderr or r.stdout).strip() or r.summary()}")
    if out == "no-systemd":
        # nothing would load the module at boot: said, not pretended
        return {"persisted": False, "why": "no kpatch CLI and no systemd on the host: staged only, not loaded at boot"}
    if out != "persisted":
        raise StepFailed("persist", f"unexpected answer persisting {path}: {out[:200]!r}")
    return {"persisted": True, "method": "kpipe", "path": path, "unit": PERSIST_UNIT}


def persist_plan(release: str, remote_path: str, kpatch_cli: bool, *, step: str = "persist", stream: str = "",
                 selinux: bool = False) -> list[Step[Any]]:
    """Install the module for reboot: `kpatch install` where the facts show the kpatch CLI, else kpipe's own
    layout (persisted_path) and kpipe-livepatch.service (systemd hosts; elsewhere the value says it is not
    persisted). `stream` defaults to the module's name. Values are journal details."""
    if kpatch_cli:
        cmd = Command.of("kpatch", "install", "-k", release, remote_path, label="persist", timeout=120, **_ROOT)
        return [Step(step, cmd, _persisted, intended={"kpatch_cli": True}, done=lambda d: d)]
    file_name = remote_path.rsplit("/", 1)[-1]
    stream = stream or sysfs_name(file_name)
    dest = persisted_path(release, stream, file_name)
    cmd = Command.script(PERSIST_SCRIPT, remote_path, dest.rsplit("/", 1)[0], dest, PERSIST_UNIT_PATH,
                         PERSIST_UNIT_TEXT, PERSIST_LOADER_PATH, PERSIST_LOADER,
                         SELINUX_MODULE_CONTEXT if selinux else "", label="persist", timeout=120, **_ROOT)
    return [Step(step, cmd, partial(_kpipe_persisted, dest),
                 intended={"kpatch_cli": False, "path": dest, "unit": PERSIST_UNIT}, done=lambda d: d)]


def uninstall_step(release: str, module_file_name: str, *, step: str = "uninstall") -> Step[CommandResult]:
    """`kpatch uninstall` of a persisted module (its exit status is journaled; a missing install is no
    failure: the removal is verified from the host's state afterwards)."""
    cmd = Command.of("kpatch", "uninstall", "-k", release, module_file_name, label="uninstall", timeout=120, **_ROOT)
    return Step(step, cmd, lambda r: r, done=lambda r: {"exit": r.exit_status})


def _unpersisted(path: str, r: CommandResult) -> OpResult:
    out = r.stdout.strip()
    if not r.ok or out not in ("removed", "absent"):
        raise OpFailed(OpResult("unpersist", False, False, f"removing {path} failed: {r.summary()}",
                                output=r.stderr, seconds=r.duration))
    return OpResult("unpersist", True, out == "removed", "removed" if out == "removed" else "not persisted",
                    output=r.stderr, seconds=r.duration)


def unpersist_step(release: str, module_file_name: str, *, stream: str = "", step: str = "unpersist"
                   ) -> Step[OpResult]:
    """Remove a module kpipe persisted itself (idempotent); the unit and its loader go with the last one."""
    stream = stream or sysfs_name(module_file_name)
    dest = persisted_path(release, stream, module_file_name)
    cmd = Command.script(UNPERSIST_SCRIPT, dest, dest.rsplit("/", 1)[0], PERSIST_DIR, PERSIST_UNIT_PATH,
                         PERSIST_LOADER_PATH, label="unpersist", timeout=120, **_ROOT)
    return Step(step, cmd, partial(_unpersisted, dest), intended={"path": dest},
                done=lambda r: {"message": r.message, "changed": r.changed})


def remove_persisted_step(release: str, module_file_name: str, method: str, *, stream: str = "",
                          step: str = "uninstall") -> Step[Any]:
    """The removal matching how a module was persisted (`method` from the persist step's journal detail)."""
    if method == "kpipe":
        return unpersist_step(release, module_file_name, stream=stream, step=step)
    return uninstall_step(release, module_file_name, step=step)


# $1 release. `persisted <release>/<stream>/<file>` lines for kpipe's layout, `kpatch <file>` for kpatch's.
PERSISTED_LIST_SCRIPT = r"""
for f in /var/lib/kpipe/modules/"$1"/*/*.ko; do [ -e "$f" ] && echo "persisted ${f#/var/lib/kpipe/modules/}"; done
for f in /var/lib/kpatch/"$1"/*.ko; do
  [ -e "$f" ] && command -v kpatch >/dev/null 2>&1 && echo "kpatch ${f##*/}"
done
exit 0
"""


def parse_persisted(stdout: str) -> list[str]:
    """The module file names persisted for boot, from PERSISTED_LIST_SCRIPT's output (pure)."""
    out = []
    for line in stdout.splitlines():
        kind, _, rest = line.strip().partition(" ")
        if kind in ("persisted", "kpatch") and rest:
            out.append(rest.rsplit("/", 1)[-1])
    return sorted(set(out))


def persisted_step(release: str, *, step: str = "persisted") -> Step[list[str]]:
    """A read: which module files are persisted for `release` (kpipe's layout, or kpatch's with its CLI)."""
    if not _SAFE_COMPONENT.match(release):
        raise KpipeError(f"invalid kernel release {release!r}")
    return Step(step, Command.script(PERSISTED_LIST_SCRIPT, release, label="persisted", **_ROOT),
                lambda r: parse_persisted(r.stdout), writes=False)


# --------------------------------------------------------------------------- routines
# Each routine reads what its plan is decided from, then runs the plan: no logic of their own.

def _op_result(t: StepTransport, steps: list[Step[Any]]) -> OpResult:
    try:
        result: OpResult = run_steps(t, steps)[-1]
    except OpFailed as e:
        return e.result
    return result


def _verification(t: StepTransport, steps: list[Step[Verification]]) -> Verification:
    try:
        return merged(run_steps(t, steps))
    except VerifyFailed as e:
        return e.verification


def has_kpatch_cli(t: StepTransport) -> bool:
    """Whether the kpatch CLI is on the host's PATH."""
    found: bool = run_step(t, kpatch_cli_step())
    return found


def load(t: StepTransport, remote_path: str, module_name: str, *, use_kpatch_cli: bool | None = None,
         timeout: float = 120.0) -> OpResult:
    """Load a staged module (marker first); no-op when the patch is loaded and enabled (see load_plan).
    `ok` only means the loader accepted it: verify_loaded() decides."""
    name = sysfs_name(module_name)
    state = read_state(t, name)
    kpatch_cli = has_kpatch_cli(t) if use_kpatch_cli is None else use_kpatch_cli
    marker = new_marker("load", name)
    return _op_result(t, load_plan(remote_path, name, state, marker=marker, kpatch_cli=kpatch_cli,
                                   timeout=timeout, with_marker=True))


def verify_loaded(t: StepTransport, module_name: str, marker: str, probe: Probe | None = None,
                  expect: ModuleIdentity | None = None) -> Verification:
    """Verify a load (see verify_loaded_plan); the problems, never an exception, when it is not right."""
    return _verification(t, verify_loaded_plan(module_name, marker, probe, expect))


def verify_removed(t: StepTransport, module_name: str, probe: Probe | None = None, *, marker: str = "",
                   expect: ModuleIdentity | None = None) -> Verification:
    """Verify a removal (see verify_removed_plan); the problems, never an exception."""
    return _verification(t, verify_removed_plan(module_name, probe, marker=marker, expect=expect))


def disable(t: StepTransport, module_name: str, timeout: float = 60.0) -> OpResult:
    """Disable the patch and wait until its sysfs dir is gone; no-op when absent (see disable_plan)."""
    name = sysfs_name(module_name)
    return _op_result(t, disable_plan(name, read_state(t, name), marker=new_marker("disable", name),
                                      timeout=timeout))


def unload(t: StepTransport, module_name: str) -> OpResult:
    """Remove the module with /sbin/rmmod; no-op when /sys/module/<m> is absent (see unload_plan)."""
    name = sysfs_name(module_name)
    return _op_result(t, unload_plan(name, read_state(t, name)))


def unstage(t: StepTransport, release: str, module_file_name: str, sha256: str = "") -> OpResult:
    """Remove the staged file from /var/lib/kpatch/<release>/ and any partial upload of it (no-op when
    absent); with `sha256`, a file of another build at that path is kept."""
    return _op_result(t, [unstage_step(release, module_file_name, sha256)])


# --------------------------------------------------------------------------- streams: retiring an older version

# "$1" the older version's module, "$2" timeout in seconds (integer), "$3" 1 when the new version is a klp
# replace patch (the kernel already disabled the older one: it must not read enabled=1 any more), 0 when
# this script disables it. Then it waits until the older patch's sysfs folder is gone: the kernel removes
# a replaced patch's folder from a work item queued when the transition ends, so it can still be there for
# a moment after the new patch's `transition` reads 0 (kernel/livepatch/transition.c, core.c).
RETIRE_SCRIPT = r"""
d=/sys/kernel/livepatch/$1
end=$(( $(date +%s) + $2 ))
if [ -d "$d" ] && [ "$(cat "$d/enabled" 2>/dev/null)" = 1 ]; then
  if [ "$3" = 1 ]; then echo still-enabled; exit 3; fi
  echo 0 > "$d/enabled" || { echo disable-failed; exit 16; }
  echo disabling
fi
while [ -d "$d" ]; do
  if [ "$(date +%s)" -ge "$end" ]; then
    echo "timeout transition $(cat "$d/transition" 2>/dev/null) enabled $(cat "$d/enabled" 2>/dev/null)"
    exit 1
  fi
  sleep 0.1 2>/dev/null || sleep 1
done
echo gone
"""


def _retired(name: str, new: str, replaced: bool, timeout: float, r: CommandResult) -> OpResult:
    lines = r.stdout.split()
    out = r.stdout.strip()
    if r.ok and lines[-1:] == ["gone"]:
        how = "disabled, sysfs dir gone" if "disabling" in lines else (
            f"replaced by {new}: disabled, sysfs dir gone" if replaced else "sysfs dir gone")
        return OpResult("retire", True, "disabling" in lines, how, output=out, seconds=r.duration)
    if "still-enabled" in lines:
        msg = (f"{name} is still enabled after {new} finished its transition: {new} is not a replace patch "
               f"(the recipe's `replace:`, the template's klp_patch .replace)")
    elif "disable-failed" in lines:
        msg = f"writing 0 to /sys/kernel/livepatch/{name}/enabled failed: {r.stderr.strip() or out}"
    else:
        msg = f"/sys/kernel/livepatch/{name} still present after {timeout:g} s ({out or r.summary()})"
    raise OpFailed(OpResult("retire", False, False, msg, output=out + r.stderr, seconds=r.duration))


def _retire_checked(name: str, r: CommandResult) -> OpResult:
    st = _state_of("retire-verify", r)
    problems = []
    if name in st.patches:
        problems.append(f"/sys/kernel/livepatch/{name} still exists")
    if st.module(name).present:
        problems.append(f"module {name} is still loaded")
    if problems:
        raise OpFailed(OpResult("retire-verify", False, False, "; ".join(problems), output=r.stdout[-2000:],
                                seconds=r.duration))
    return OpResult("retire-verify", True, False, f"{name} disabled and unloaded", seconds=r.duration)


def retire_plan(old_module: str, new_module: str, *, replaced: bool, timeout: float = 60.0) -> list[Step[Any]]:
    """Retire an older version of a stream once the new one is verified: its patch disabled (by the new
    replace patch, else here) and its sysfs folder gone (step `retire`), its module removed
    (`retire-unload`), then a read proving both (`retire-verify`). Every step acts on what the host
    shows when it runs, so a rerun after a crash finishes the job and changes nothing twice."""
    name, new = sysfs_name(old_module), sysfs_name(new_module)
    secs = max(1, int(timeout + 0.999))
    return [
        Step("retire", Command.script(RETIRE_SCRIPT, name, str(secs), "1" if replaced else "0", label="retire",
                                      timeout=secs + 30, **_ROOT), partial(_retired, name, new, replaced, timeout)),
        Step("retire-unload", rmmod_command(name), partial(_removed, name)),
        Step("retire-verify", state_command(name), partial(_retire_checked, name), writes=False),
    ]
