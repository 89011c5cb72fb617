"""Host facts: ONE read-only command per host plus a pure parser.

`facts_command()` is a constant sh script (no user values) that prints one record
per line; `parse_facts(name, stdout)` turns that text into `HostFacts` or raises
`FactsError` naming the host and what was wrong; `facts_step()` is the pair as a
`kpipe.plan.Step`, which kpipe.fleet.observe runs over the fleet (partial failure is data).

What is read, and why (kernel-facts.md):
- `uname -r`, `uname -m`: the release the artifact must be built for, and the arch;
- `/etc/os-release` ID, VERSION_ID: the distro (UOS, Kylin, openEuler, Debian...);
- `/proc/sys/kernel/tainted`: taint bits (K = 15 livepatched, O = 12, E = 13);
- `/sys/kernel/livepatch` (CONFIG_LIVEPATCH) and every patch in it, through
  kpipe.fleet.livepatch.STATE_SCRIPT (enabled, transition, objects, functions);
- the first executable `kpatch` on PATH (as `command -v` finds it): whether the kpatch CLI
  drives loads on this host;
- `/sys/fs/selinux/enforce` (exists iff SELinux is enabled; 1 = enforcing);
- `/sys/module/module/parameters/sig_enforce` (Y: unsigned modules are refused);
- `df -Pk` of /var/lib/kpatch (or /var/lib when it does not exist yet): free KiB for staging;
- `/var/lib/kpatch/<release>/*.ko` with their sha256: what is installed for this kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kpipe.commands import Command, CommandResult
from kpipe.errors import KpipeError, TransportError
from kpipe.fleet import livepatch
from kpipe.kernel import check_release, normalize_arch
from kpipe.plan import Step
from kpipe.taint import TAINT_LIVEPATCH, taint_letters

HEADER = "kpipe-facts 1"
TRAILER = "kpipe-facts-end"
_LP_BEGIN = "---livepatch---"
_LP_END = "---end-livepatch---"

# Constant text: no value from the inventory or the user is ever formatted into it.
# Each probe prints a tagged line even when it fails, so the parser can tell
# "absent" from "not reported". Shell builtins (read, case, printf) instead of
# cat/grep/sed and one `uname -r -m`: every process spawned here costs CPU on
# every host of the fleet. STATE_SCRIPT appends module names to "$@": cleared first.
FACTS_SCRIPT = (
    r"""
echo "kpipe-facts 1"
set -f
set -- $(uname -r -m 2>/dev/null)
set +f
r=$1
printf 'release %s\nmachine %s\n' "$1" "$2"
if [ -r /etc/os-release ]; then
  while IFS= read -r l || [ -n "$l" ]; do
    case $l in ID=*|VERSION_ID=*|PRETTY_NAME=*|ID_LIKE=*) printf 'os %s\n' "$l" ;; esac
  done < /etc/os-release
else
  echo "os -"
fi
# cat, never the shell's read: read takes one byte per read(2) and /proc/sys files answer
# EOF past offset 0 (proc_dointvec), so busybox's read sees "4" of "45056" (seen on a lab VM).
echo "tainted $(cat /proc/sys/kernel/tainted 2>/dev/null || echo '?')"
# `command -v kpatch` in a subshell costs a fork on every host: the same PATH walk in this shell
k=-; o=$IFS; IFS=:; set -f
for d in $PATH; do [ -f "${d:-.}/kpatch" ] && [ -x "${d:-.}/kpatch" ] && { k=${d:-.}/kpatch; break; }; done
IFS=$o; set +f
printf 'kpatch %s\n' "$k"
if [ -e /sys/fs/selinux/enforce ]; then
  v=; read -r v 2>/dev/null < /sys/fs/selinux/enforce; printf 'selinux %s\n' "${v:-?}"
else
  echo "selinux -"
fi
if [ -e /sys/module/module/parameters/sig_enforce ]; then
  v=; read -r v 2>/dev/null < /sys/module/module/parameters/sig_enforce; printf 'sig_enforce %s\n' "${v:-?}"
else
  echo "sig_enforce -"
fi
d=/var/lib/kpatch; [ -d "$d" ] || d=/var/lib
printf 'df-begin %s\n' "$d"
df -Pk "$d" 2>/dev/null
echo "df-end"
if [ -n "$r" ] && [ -d "/var/lib/kpatch/$r" ]; then
  for f in "/var/lib/kpatch/$r"/*.ko; do
    [ -f "$f" ] || continue
    printf 'installed '
    sha256sum "$f" 2>/dev/null || printf '? %s\n' "$f"
  done
fi
if [ -n "$r" ] && [ -d "/var/lib/kpipe/modules/$r" ]; then
  for f in "/var/lib/kpipe/modules/$r"/*/*.ko; do [ -f "$f" ] && printf 'persisted %s\n' "${f##*/}"; done
fi
echo "---livepatch---"
set --
"""
    + livepatch.STATE_SCRIPT
    + r"""
echo "---end-livepatch---"
echo "kpipe-facts-end"
"""
)

class FactsError(TransportError):
    """A host answered, but not with facts kpipe can trust (garbage, missing sections, lies)."""

    def __init__(self, message: str, *, host: str = "", hint: str | None = None):
        super().__init__(f"{host}: {message}" if host else message, host=host, kind="facts", hint=hint)


@dataclass(frozen=True)
class InstalledModule:
    """A module file in /var/lib/kpatch/<release>/."""

    path: str
    sha256: str

    @property
    def file_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "file": self.file_name, "sha256": self.sha256}


@dataclass(frozen=True)
class HostFacts:
    """What one host reported; every field is plain data."""

    name: str
    release: str
    arch: str  # normalized (x86_64, aarch64, loongarch64)
    machine: str  # uname -m as printed
    os_id: str = ""
    os_version: str = ""
    os_name: str = ""
    tainted: int = 0
    livepatch_sysfs: bool = False
    patches: dict[str, livepatch.LivepatchState] = field(default_factory=dict)
    kpatch_cli: str = ""  # path of the kpatch CLI, "" when absent
    selinux: str = "disabled"  # disabled | permissive | enforcing | unknown
    sig_enforce: bool | None = None  # None: the parameter does not exist (no CONFIG_MODULE_SIG)
    free_kb: int | None = None  # free KiB where modules are staged
    free_path: str = ""
    installed: tuple[InstalledModule, ...] = ()
    warnings: tuple[str, ...] = ()  # non-fatal oddities in the output
    persisted: tuple[str, ...] = ()  # module files loaded at boot: kpipe's layout, or kpatch's with its CLI

    @property
    def taint_flags(self) -> str:
        """The taint bits as the kernel's letters, e.g. 'OEK'."""
        return taint_letters(self.tainted)

    @property
    def livepatched(self) -> bool:
        """Taint K: a livepatch was loaded since boot (it stays set)."""
        return bool(self.tainted & TAINT_LIVEPATCH)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON and the state store."""
        return {
            "name": self.name, "release": self.release, "arch": self.arch, "machine": self.machine,
            "os_id": self.os_id, "os_version": self.os_version, "os_name": self.os_name,
            "tainted": self.tainted, "taint_flags": self.taint_flags, "livepatch_sysfs": self.livepatch_sysfs,
            "patches": {k: v.to_dict() for k, v in self.patches.items()}, "kpatch_cli": self.kpatch_cli,
            "selinux": self.selinux, "sig_enforce": self.sig_enforce, "free_kb": self.free_kb,
            "free_path": self.free_path, "installed": [m.to_dict() for m in self.installed],
            "warnings": list(self.warnings), "persisted": list(self.persisted),
        }


def facts_command(timeout: float = 60.0) -> Command:
    """The one read-only command that reports every fact (no user values, no sudo)."""
    return Command.script(FACTS_SCRIPT, label="facts", timeout=timeout)


def _unquote(value: str) -> str:
    v = value.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
        v = v[1:-1]
    return v.replace('\\"', '"').replace("\\\\", "\\")


def parse_facts(name: str, stdout: str) -> HostFacts:
    """Parse FACTS_SCRIPT output (pure); FactsError says which part is missing or wrong."""
    if "\x00" in stdout:
        raise FactsError("facts output contains NUL bytes", host=name)
    lines = stdout.splitlines()
    hint = "the host ran kpipe's facts script but printed something else; check its shell and PATH"
    if HEADER not in (ln.strip() for ln in lines[:5]):
        sample = (stdout.strip().splitlines() or ["(empty)"])[0][:80]
        raise FactsError(f"facts output does not start with {HEADER!r} (got {sample!r})", host=name, hint=hint)
    if TRAILER not in (ln.strip() for ln in lines):
        raise FactsError("facts output is cut short (no end line)", host=name, hint=hint)
    try:
        lp_start = lines.index(_LP_BEGIN)
        lp_end = lines.index(_LP_END, lp_start)
    except ValueError:
        raise FactsError("facts output has no livepatch section", host=name, hint=hint) from None
    head = lines[:lp_start] + lines[lp_end + 1:]
    state = livepatch.parse_host_livepatch("\n".join(lines[lp_start + 1:lp_end]))
    if not state.complete:
        raise FactsError("the livepatch section is incomplete", host=name, hint=hint)

    rec: dict[str, str] = {}
    os_fields: dict[str, str] = {}
    installed: list[InstalledModule] = []
    persisted: list[str] = []
    warnings: list[str] = []
    df_lines: list[str] | None = None
    df_path = ""
    for ln in head:
        key, _, value = ln.partition(" ")
        if df_lines is not None:
            if ln.strip() == "df-end":
                rec["df"] = " ".join([df_path, *(df_lines[-1:] if df_lines else [])])
                df_lines = None
            else:
                df_lines.append(ln)
            continue
        if key == "df-begin":
            df_path, df_lines = value.strip(), []
        elif key == "os":
            k, eq, v = value.partition("=")
            if eq:
                os_fields[k.strip()] = _unquote(v)
        elif key == "installed":
            parts = value.split(None, 1)
            if len(parts) == 2 and len(parts[0]) == 64 and all(c in "0123456789abcdef" for c in parts[0]):
                installed.append(InstalledModule(parts[1].strip(), parts[0]))
            else:
                warnings.append(f"unreadable installed module line: {value[:120]!r}")
        elif key == "persisted" and value.strip():
            persisted.append(value.strip())
        elif key in ("release", "machine", "tainted", "kpatch", "selinux", "sig_enforce", "df"):
            if key in rec:
                raise FactsError(f"facts output repeats {key!r}", host=name, hint=hint)
            rec[key] = value.strip()
    for key in ("release", "machine", "tainted"):
        if not rec.get(key):
            raise FactsError(f"facts output has no {key}", host=name, hint=hint)

    try:
        release = check_release(rec["release"])
    except KpipeError as e:
        raise FactsError(f"reported {e.message}", host=name) from None
    machine = rec["machine"]
    if not machine.replace("_", "").isalnum() or len(machine) > 32:
        raise FactsError(f"reported machine {machine[:40]!r} is not an architecture name", host=name)
    try:
        tainted = int(rec["tainted"])
    except ValueError:
        raise FactsError(f"/proc/sys/kernel/tainted is {rec['tainted'][:40]!r}, not a number", host=name) from None
    if tainted < 0 or tainted >= 1 << 32:
        raise FactsError(f"/proc/sys/kernel/tainted is {tainted}, out of range", host=name)
    if state.tainted is not None and state.tainted != tainted:
        warnings.append(f"taint changed during the read ({tainted} then {state.tainted})")

    selinux = {"-": "disabled", "1": "enforcing", "0": "permissive"}.get(rec.get("selinux", "-"), "unknown")
    sig = rec.get("sig_enforce", "-")
    sig_enforce = None if sig == "-" else sig.upper() in ("Y", "1")
    if sig not in ("-", "Y", "N", "1", "0", "y", "n"):
        warnings.append(f"sig_enforce reads {sig[:20]!r}")
    free_kb, free_path = _parse_df(rec.get("df", ""), warnings)
    kpatch = rec.get("kpatch", "-")
    if kpatch not in ("-", ""):  # kpatch.service loads everything kpatch installed for the release
        persisted += [m.file_name.rsplit("/", 1)[-1] for m in installed]
    return HostFacts(
        name=name, release=release, arch=normalize_arch(machine), machine=machine,
        os_id=os_fields.get("ID", ""), os_version=os_fields.get("VERSION_ID", ""),
        os_name=os_fields.get("PRETTY_NAME", ""), tainted=tainted, livepatch_sysfs=state.sysfs,
        patches=dict(state.patches), kpatch_cli="" if kpatch in ("-", "") else kpatch, selinux=selinux,
        sig_enforce=sig_enforce, free_kb=free_kb, free_path=free_path, installed=tuple(installed),
        warnings=tuple(warnings), persisted=tuple(sorted(set(persisted))),
    )


def _parse_df(value: str, warnings: list[str]) -> tuple[int | None, str]:
    # "df <path> <filesystem> <1024-blocks> <used> <available> <capacity> <mounted on>"
    parts = value.split()
    if not parts:
        warnings.append("no free-space report")
        return None, ""
    path = parts[0]
    if len(parts) >= 6 and parts[4].isdigit():
        return int(parts[4]), path
    if len(parts) > 1 and parts[1] == "Filesystem":
        warnings.append(f"df printed no file system for {path} (an initramfs root shows none)")
    else:
        warnings.append(f"unreadable df output for {path}")
    return None, path


def interpret_facts(r: CommandResult) -> HostFacts:
    """The facts step's interpreter (pure): the command's result -> HostFacts, or FactsError naming the host."""
    if r.exit_status != 0 and HEADER not in r.stdout:
        raise FactsError(f"the facts command exited {r.exit_status}: "
                         f"{(r.stderr.strip().splitlines() or [''])[-1][:200]}", host=r.host)
    return parse_facts(r.host, r.stdout)


def facts_step(timeout: float = 60.0) -> Step[HostFacts]:
    """Reading a host's facts as a plan step: the one constant command and its pure parser (a read)."""
    return Step("facts", facts_command(timeout), interpret_facts, writes=False, journal=False)
