"""SimFleet: many real OpenSSH hosts on loopback whose kernel is simulated.

Use it for fleet-scale and fault tests (facts fan-out, rollouts, audit) without
touching this machine's kernel.

API
---
    from simfleet import SimFleet, simfleet_factory   # tests/ is on sys.path (conftest.py)

    def test_x(simfleet_factory):                       # session-scoped factory fixture
        fleet = simfleet_factory(20)                    # 20 hosts, started and verified
        fleet = simfleet_factory(5, release="5.10.0-136.12.0.86.oe2203sp1.x86_64", os_id="openEuler")

    with SimFleet(200, tmp_path) as fleet: ...          # or directly (start() + close())

    fleet.hosts / fleet.host("sim003")                  # SimHost objects
    fleet.known_hosts, fleet.client_key                 # strict known_hosts file, the one client key
    fleet.write_inventory(path, group="simfleet")       # Ansible YAML inventory of every host
    fleet.write_workspace(folder)                       # kpipe.toml ([ssh] keys, [fleet] inventories) + inventory
    fleet.targets()                                     # kpipe.host.Host list

    host.name, host.address, host.port, host.dir
    host.patches()        -> {name: {"enabled", "transition", "objects"}}   (read from the simulated sysfs)
    host.modules()        -> set of names under the simulated /sys/module
    host.tainted          -> int;  host.log() -> kernel log lines (as `dmesg` prints them, without timestamps)
    host.staged()         -> {path under /var/lib/kpatch: bytes}
    host.temp_files()     -> paths of leftover partial uploads (`.NAME.ko.kpipe-*`) under /var/lib/kpatch
    fake_module(name, build_id=..., srcversion=...) -> bytes of a small ELF module with those notes

Loaded modules show what the kernel shows of a module's ELF file: /sys/module/<m>/notes/
.note.gnu.build-id (the raw note section) when the file has a GNU build-id note, and
/sys/module/<m>/srcversion when its .modinfo has srcversion= (files that are not ELF show neither).
    host.inject(fault, **params) / host.clear(fault=None)
    host.stop() / host.start()      # sshd down (connection refused) / up again, kernel state kept
    host.kill()                     # the host dies: SIGKILL of sshd and every process in its namespace
    host.reboot()                   # kill, clear the simulated kernel state (patches, modules, taint, log), start
    host.set_release(text)          # `uname -r` prints text from now on ("" = the fleet's release again)

Faults (``host.inject(name, **params)``):
    "refused"            sshd stopped: connections are refused (same as host.stop())
    "die_during"         op="insmod"|"rmmod"|"disable": the simulator applies the step, then kills the host
    "hang"               op="insmod"|"rmmod"|"uname"|"dmesg", seconds=3600: the fake tool sleeps first
                         (uname: every facts/state read that calls it hangs past its timeout)
    "frozen"             SIGSTOP of the host's processes: TCP connects, SSH never answers (a hung
                         machine); clear("frozen") sends SIGCONT
    "stuck_transition"   insmod succeeds but the patching transition never completes
                         ("livepatch: signaling remaining tasks" is logged after stall_after seconds)
    "ebusy_enable"       insmod fails: "could not insert module X: Device or resource busy"
    "ebusy_disable"      writing `enabled` fails (the file is a link into a read-only mount:
                         the shell reports "Read-only file system"; the kernel's EBUSY cannot be
                         produced by a plain file, the effect for kpipe is the same: the write fails)
    "full_disk"          a full 16 KiB tmpfs over /var/lib/kpatch: staging fails with ENOSPC
    "sig_enforce"        /sys/module/module/parameters/sig_enforce = Y; unsigned modules are
                         refused ("Key was rejected by service", "Loading of unsigned module is rejected")

How a host is built: ``unshare --mount --propagation private -- sh -c '<bind mounts>; exec sshd -D -r'``.
`-r`: the listener forks a session without re-executing sshd (which would load sshd, its config and
host key again for every connection). A real fleet's sshd runs on the host's own CPU; here 200-1,000
of them share this machine's 2 cores with the clients under test, and the re-exec was ~25 % of a
simulated host's CPU per connection (measured: ~53 -> ~40 ms per `fleet facts` connection, of which
~12 ms is the facts script itself). Every client (kpipe, OpenSSH, ansible) talks to the same servers.
Inside that private mount namespace only, per-host folders and fake tools cover:
/sys/kernel (a folder holding livepatch/), /sys/module, /proc/sys/kernel/tainted, /dev/kmsg (a FIFO
read by the simulator), /var/lib (holding kpatch/), /usr/lib/os-release, and the binaries behind
/sbin/insmod and /sbin/rmmod (/usr/bin/kmod: one fake dispatching on its name), /usr/bin/dmesg
and /usr/bin/uname, and root's ~/.bashrc (empty: bash sources it for every command sshd runs,
and this machine's runs `pyenv init`, which costs hundreds of ms per command). `kpatch` is absent.
The fake insmod/rmmod ask the simulator (one thread in the test process for all hosts) through
request files; the simulator plays the kernel as
kernel-facts.md and lab.md describe: /sys/module/<m>, /sys/kernel/livepatch/<m>/{enabled,
transition,vmlinux/patched,vmlinux/cmdline_proc_show,1}, the log lines, taints O/E/K (messages
only the first time), `echo 0 > enabled` -> unpatching transition then the folder vanishes, rmmod
refused while enabled, replace mode (a completed patch removes the older patches' sysfs folders; a
module whose .modinfo says kpipe_replace=N, as kpipe's templates write for `replace: false`, stacks instead).
The module name is the `.modinfo` name= of the file when present, else its file name ('-' -> '_').

SAFETY: before a host is handed out, a check script runs on it over SSH and compares the
device:inode of every covered path with the per-host files; anything else and SimFleet refuses
to start. Processes are stopped by PID (the sshd listener and every process whose mount
namespace is the host's own and which sees the host's token: the kernel recycles namespace
ids), never by name.
"""

from __future__ import annotations

import heapq
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SSHD = "/usr/sbin/sshd"
MARK = "KPIPE_SIMFLEET_FAKE"
CONF_NAME = ".kpipe-simfleet"

SSHD_CONFIG = """\
Port {port}
ListenAddress {address}
HostKey {host_key}
AuthorizedKeysFile {authorized_keys}
PidFile none
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
LogLevel ERROR
MaxStartups 500:30:1000
MaxSessions 200
ClientAliveInterval 0
UseDNS no
"""

# One fake for /usr/bin/kmod (insmod, rmmod, lsmod, modprobe are links to it): it
# dispatches on the name it was called by and asks the simulator for kernel work.
FAKE_KMOD = r"""#!/bin/sh
# KPIPE_SIMFLEET_FAKE kmod: a simulated host's module tools (tests/simfleet.py)
. /sys/kernel/.kpipe-simfleet || { echo "simfleet: not a simulated host" >&2; exit 99; }
tool=${0##*/}
request() {
  id="$SIM_NAME.$$.$(date +%s%N)"
  f="$SIM_REQ/$id"
  { for a in "$@"; do printf '%s\n' "$a"; done; } > "$f.tmp" && mv "$f.tmp" "$f.req" || exit 97
  n=0
  while [ ! -e "$f.rsp" ]; do
    sleep 0.01; n=$((n + 1))
    [ $n -gt 6000 ] && { echo "$tool: simulator did not answer" >&2; exit 98; }
  done
  code=$(head -n 1 "$f.rsp"); tail -n +2 "$f.rsp" >&2; rm -f "$f.rsp"
  exit "$code"
}
hang() {
  if [ -f "$SIM_DIR/faults/hang_$tool" ]; then sleep "$(cat "$SIM_DIR/faults/hang_$tool")"; fi
}
case $tool in
  insmod)
    [ $# -ge 1 ] || { echo "Usage: insmod filename [args]" >&2; exit 1; }
    hang
    if [ ! -f "$1" ]; then echo "insmod: ERROR: could not load module $1: No such file or directory" >&2; exit 1; fi
    name=$(tr '\000' '\n' < "$1" | sed -n 's/^name=//p' | head -n 1)
    [ -n "$name" ] || { name=${1##*/}; name=${name%.ko}; }
    sha=$(sha256sum "$1" | cut -d ' ' -f 1)
    if tail -c 28 "$1" | grep -q 'Module signature appended'; then signed=1; else signed=0; fi
    request insmod "$name" "$sha" "$signed" "$1" ;;
  rmmod)
    [ $# -ge 1 ] || { echo "Usage: rmmod modulename" >&2; exit 1; }
    hang
    name=${1##*/}; name=${name%.ko}
    request rmmod "$name" ;;
  lsmod)
    echo "Module                  Size  Used by"
    for d in /sys/module/*/; do
      m=${d%/}; m=${m##*/}
      [ -f "$d/initstate" ] && printf '%-24s %7s  %s\n' "$m" 16384 0
    done
    exit 0 ;;
  *)
    echo "$tool: not available on a simulated host" >&2; exit 1 ;;
esac
"""

FAKE_DMESG = r"""#!/bin/sh
# KPIPE_SIMFLEET_FAKE dmesg: prints the simulated kernel log
. /sys/kernel/.kpipe-simfleet || { echo "simfleet: not a simulated host" >&2; exit 99; }
if [ -f "$SIM_DIR/faults/hang_dmesg" ]; then sleep "$(cat "$SIM_DIR/faults/hang_dmesg")"; fi
cat "$SIM_DIR/kmsg.log"
"""

FAKE_UNAME = r"""#!/bin/sh
# KPIPE_SIMFLEET_FAKE uname: the simulated host's release and machine
. /sys/kernel/.kpipe-simfleet || { echo "simfleet: not a simulated host" >&2; exit 99; }
if [ -f "$SIM_DIR/faults/hang_uname" ]; then sleep "$(cat "$SIM_DIR/faults/hang_uname")"; fi
[ $# -eq 0 ] && set -- -s
out=""
for a in "$@"; do
  case $a in
    -a|--all) out="Linux $SIM_NAME $SIM_RELEASE #1 SMP $SIM_ARCH GNU/Linux" ;;
    -*) opts=${a#-}
        while [ -n "$opts" ]; do
          c=${opts%"${opts#?}"}; opts=${opts#?}
          case $c in
            s) out="$out Linux" ;; n) out="$out $SIM_NAME" ;; r) out="$out $SIM_RELEASE" ;;
            v) out="$out #1 SMP" ;; m|p|i) out="$out $SIM_ARCH" ;; o) out="$out GNU/Linux" ;;
            *) echo "uname: invalid option -- '$c'" >&2; exit 1 ;;
          esac
        done ;;
    *) echo "uname: extra operand '$a'" >&2; exit 1 ;;
  esac
done
printf '%s\n' "${out# }"
"""

# Runs over SSH before a host is handed out: "$1" is the host's token, then
# path=dev:ino pairs that must hold inside the host's namespace.
CHECK_SCRIPT = r"""
token=$1; shift
[ "$(cat /sys/kernel/livepatch/.kpipe-simfleet 2>/dev/null)" = "$token" ] || { echo "livepatch not simulated"; exit 1; }
[ "$(cat /sys/module/.kpipe-simfleet 2>/dev/null)" = "$token" ] || { echo "/sys/module not simulated"; exit 1; }
[ "$(cat /var/lib/.kpipe-simfleet 2>/dev/null)" = "$token" ] || { echo "/var/lib not simulated"; exit 1; }
[ -p /dev/kmsg ] || { echo "/dev/kmsg is not the simulator's FIFO"; exit 1; }
for pair in "$@"; do
  p=${pair%=*}; want=${pair##*=}
  got=$(stat -L -c '%d:%i' "$p" 2>/dev/null)
  [ "$got" = "$want" ] || { echo "$p is $got, want $want"; exit 1; }
done
for t in /sbin/insmod /sbin/rmmod "$(command -v dmesg)" "$(command -v uname)"; do
  grep -q KPIPE_SIMFLEET_FAKE "$t" || { echo "$t is not the fake"; exit 1; }
done
if command -v kpatch >/dev/null 2>&1; then echo "kpatch is present"; exit 1; fi
echo "SIMFLEET-OK $token"
"""

TAINT_O, TAINT_E, TAINT_K = 1 << 12, 1 << 13, 1 << 15
FAULTS = ("refused", "die_during", "hang", "stuck_transition", "ebusy_enable", "ebusy_disable", "full_disk",
          "sig_enforce", "frozen")


def elf_sections(data: bytes) -> dict[str, bytes]:
    """Section name -> contents of a little-endian ELF64 file; {} for anything else (the simulator's own
    reader, independent of kpipe's)."""
    try:
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            return {}
        shoff = struct.unpack_from("<Q", data, 0x28)[0]
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        secs = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
        _, _, _, _, stroff, strsize = secs[shstrndx]
        names = data[stroff:stroff + strsize]
        out = {}
        for name, typ, _, _, off, size in secs:
            n = names[name:names.index(b"\0", name)].decode()
            out[n] = b"" if typ == 8 else data[off:off + size]  # SHT_NOBITS has no bytes
        return out
    except (struct.error, ValueError, IndexError):
        return {}


def fake_module(name: str, *, build_id: bytes | None = None, srcversion: str = "", size: int = 4096,
                replace: bool | None = None) -> bytes:
    """A small ELF64 relocatable "module": .modinfo (name=, srcversion=, kpipe_replace= when `replace` is
    given), a GNU build-id note, padding of random bytes (so two calls give two builds). Enough for the
    simulated kernel and kpipe's stage."""
    modinfo = f"name={name}\0".encode() + (f"srcversion={srcversion}\0".encode() if srcversion else b"")
    if replace is not None:
        modinfo += f"kpipe_replace={'Y' if replace else 'N'}\0".encode()
    sections = [(".modinfo", 1, 2, modinfo, 1)]
    if build_id:
        sections.append((".note.gnu.build-id", 7, 2,
                         struct.pack("<III", 4, len(build_id), 3) + b"GNU\0" + build_id, 4))
    sections.append((".data", 1, 3, os.urandom(size), 8))
    shstr = b"\0"
    body = b""
    headers = [struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)]
    offset = 64
    for sname, typ, flags, content, align in sections:
        pad = (-(offset + len(body))) % align
        body += b"\0" * pad
        headers.append(struct.pack("<IIQQQQIIQQ", len(shstr), typ, flags, 0, offset + len(body), len(content),
                                   0, 0, align, 0))
        shstr += sname.encode() + b"\0"
        body += content
    shstr_name = len(shstr)
    shstr += b".shstrtab\0"
    headers.append(struct.pack("<IIQQQQIIQQ", shstr_name, 3, 0, 0, offset + len(body), len(shstr), 0, 0, 1, 0))
    body += shstr
    pad = (-(offset + len(body))) % 8
    body += b"\0" * pad
    shoff = offset + len(body)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(headers),
                               len(headers) - 1)
    return ehdr + body + b"".join(headers)


def _keypair(path: Path) -> Path:
    """An unencrypted OpenSSH ed25519 key pair at path (+ .pub), made in-process."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if path.exists():
        return path
    key = Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    Path(str(path) + ".pub").write_text(pub.decode() + " simfleet\n")
    return path


def stat_cpu(stat_path: str, *, children: bool = False) -> float | None:
    """CPU seconds from a /proc/.../stat file: utime + stime, plus the reaped children's cutime + cstime
    with `children`; None when the process or thread is gone."""
    try:
        with open(stat_path) as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    except OSError:
        return None
    return sum(int(x) for x in fields[11:15 if children else 13]) / os.sysconf("SC_CLK_TCK")


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _devino(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


@dataclass
class _Patch:
    name: str
    sha256: str
    signed: bool
    state: str = "patching"  # patching | patched | unpatching | replaced
    stuck: bool = False
    replace: bool = True  # klp replace mode; .modinfo kpipe_replace=N (kpipe's templates write it) says not


class SimHost:
    """One simulated host: an sshd in its own mount namespace plus simulated kernel state."""

    release_override = ""  # set_release(): this host's `uname -r` instead of the fleet's release

    def __init__(self, fleet: SimFleet, index: int, name: str, address: str):
        self.fleet = fleet
        self.index = index
        self.name = name
        self.address = address
        self.port = 0
        self.dir = fleet.root / "hosts" / name
        self.token = f"{fleet.token}-{name}"
        self.proc: subprocess.Popen | None = None
        self.mntns = ""
        self.lock = threading.RLock()
        self.faults: dict[str, dict[str, Any]] = {}
        self.patches_: dict[str, _Patch] = {}
        self.modules_: dict[str, str] = {}  # name -> taint letters
        self.taint = 0
        self.boot = time.monotonic()
        self.log_: list[str] = []
        self.kmsg_fd: int | None = None
        self.kmsg_wfd: int | None = None
        self.kmsg_buf = b""

    # ------------------------------------------------------------------ layout
    @property
    def lp(self) -> Path:
        return self.dir / "sys_kernel" / "livepatch"

    @property
    def sysmod(self) -> Path:
        return self.dir / "sys_module"

    def _layout(self) -> None:
        d = self.dir
        for sub in ("sys_kernel/livepatch", "sys_module/module/parameters", "var_lib/kpatch", "faults", "ro"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        f = self.fleet
        (d / "sys_kernel" / CONF_NAME).write_text(
            f"SIM_NAME='{self.name}'\nSIM_DIR='{d}'\nSIM_REQ='{f.req_dir}'\n"
            f"SIM_RELEASE='{self.release_override or f.release}'\nSIM_ARCH='{f.arch}'\n")
        for p in (self.lp / CONF_NAME, self.sysmod / CONF_NAME, d / "var_lib" / CONF_NAME):
            p.write_text(self.token)
        (self.sysmod / "module" / "parameters" / "sig_enforce").write_text("N\n")
        # a host that comes back (start() after kill()) keeps its simulated kernel: taint and log survive;
        # reboot() is what forgets them
        if not (d / "tainted").exists():
            (d / "tainted").write_text("0\n")
        if not (d / "kmsg.log").exists():
            (d / "kmsg.log").write_text("")
        (d / "os-release").write_text(f'PRETTY_NAME="{f.os_id} {f.version_id} (simfleet)"\nNAME="{f.os_id}"\n'
                                      f'ID={f.os_id}\nVERSION_ID="{f.version_id}"\n')
        if not (d / "kmsg").exists():
            os.mkfifo(d / "kmsg", 0o600)
        host_key = _keypair(d / "host_ed25519")
        (d / "authorized_keys").write_text(Path(str(f.client_key) + ".pub").read_text())
        self.port = self.port or _free_port(self.address)
        (d / "sshd_config").write_text(SSHD_CONFIG.format(port=self.port, address=self.address, host_key=host_key,
                                                          authorized_keys=d / "authorized_keys"))
        pub = Path(str(host_key) + ".pub").read_text().split()
        self.known_hosts_line = f"[{self.address}]:{self.port} {pub[0]} {pub[1]}\n"

    def _mount_script(self) -> str:
        d, b = self.dir, self.fleet.bin_dir
        # Each line binds a folder or file made for this host; set -e: one failure and sshd never starts.
        lines = [
            "set -e",
            f"mount --bind '{d}/sys_kernel' /sys/kernel",
            f"mount --bind '{d}/sys_module' /sys/module",
            f"mount --bind '{d}/tainted' /proc/sys/kernel/tainted",
            f"mount --bind '{d}/kmsg' /dev/kmsg",
            f"mount --bind '{d}/var_lib' /var/lib",
            f"mount --bind '{d}/os-release' /usr/lib/os-release",
            f"mount --bind '{b}/kmod' '{self.fleet.kmod_path}'",
            f"mount --bind '{b}/dmesg' /usr/bin/dmesg",
            f"mount --bind '{b}/uname' /usr/bin/uname",
            # bash sources ~/.bashrc for commands sshd runs; this machine's runs `pyenv init`
            # (hundreds of ms, contending on a lock). A fleet host's root has no such setup.
            f"if [ -e /root/.bashrc ]; then mount --bind '{b}/bashrc' /root/.bashrc; fi",
            f"mount --bind '{d}/ro' '{d}/ro'",
            f"mount -o remount,bind,ro '{d}/ro'",
        ]
        if "full_disk" in self.faults:
            lines.append("mount -t tmpfs -o size=16k,nr_inodes=8 simfleet-full /var/lib/kpatch")
            lines.append("dd if=/dev/zero of=/var/lib/kpatch/.filler bs=4k 2>/dev/null || true")
        # -r: no re-exec of sshd per connection (the module docstring says why)
        lines.append(f"exec {SSHD} -D -e -r -f '{d}/sshd_config'")
        return "\n".join(lines)

    def expected_inodes(self) -> list[str]:
        d, b = self.dir, self.fleet.bin_dir
        pairs = [("/sys/kernel/livepatch", d / "sys_kernel" / "livepatch"), ("/sys/module", d / "sys_module"),
                 ("/proc/sys/kernel/tainted", d / "tainted"), ("/dev/kmsg", d / "kmsg"),
                 ("/sbin/insmod", b / "kmod"), ("/sbin/rmmod", b / "kmod"), ("/usr/bin/dmesg", b / "dmesg"),
                 ("/usr/bin/uname", b / "uname")]
        if "full_disk" not in self.faults:
            pairs.append(("/var/lib/kpatch", d / "var_lib" / "kpatch"))
        return [f"{p}={_devino(q)}" for p, q in pairs]

    # ------------------------------------------------------------------ processes
    def start(self) -> None:
        """Start sshd in a fresh private mount namespace (kernel state is kept)."""
        with self.lock:
            self.faults.pop("refused", None)
            if self.proc is not None and self.proc.poll() is None:
                return
            self._layout()
            with open(self.dir / "sshd.log", "ab") as log:
                self.proc = subprocess.Popen(
                    ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", self._mount_script()],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()
        try:
            self.mntns = os.readlink(f"/proc/{self.proc.pid}/ns/mnt")
        except OSError:
            self.mntns = ""
        if self.mntns == os.readlink("/proc/self/ns/mnt"):
            self.kill()
            raise RuntimeError(f"{self.name}: sshd runs in the test's own mount namespace; refusing")

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: sshd exited with {self.proc.returncode}: "
                                   f"{(self.dir / 'sshd.log').read_text()[-2000:]}")
            try:
                with socket.create_connection((self.address, self.port), timeout=1) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.03)
        raise RuntimeError(f"{self.name}: sshd on {self.address}:{self.port} did not answer in {timeout} s")

    def pids(self) -> list[int]:
        """Every process of this host: the listener and whatever runs in its mount namespace."""
        out = set()
        if self.proc is not None and self.proc.poll() is None:
            out.add(self.proc.pid)
        if self.mntns:
            out.update(p for p in self.fleet.pids_by_namespace().get(self.mntns, []) if self.owns(p))
        out.discard(os.getpid())
        return sorted(out)

    def owns(self, pid: int) -> bool:
        """True if pid sees this host's simulated sysfs (namespace ids are recycled by the kernel:
        an id alone could name another fleet's host, started after this one died)."""
        try:
            return Path(f"/proc/{pid}/root/sys/kernel/livepatch/{CONF_NAME}").read_text() == self.token
        except OSError:
            return False

    def kill(self) -> None:
        """The host dies: SIGKILL of sshd and every process in its namespace (by PID)."""
        with self.lock:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self.proc is not None:
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
                self.proc = None

    def _signal(self, sig: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """sshd down: new connections are refused (kernel state kept)."""
        self.kill()
        self.faults["refused"] = {}

    def reboot(self) -> None:
        """Kill, forget the simulated kernel's runtime state, start again (staged files stay)."""
        self.kill()
        with self.lock:
            for p in list(self.lp.iterdir()):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
            for p in list(self.sysmod.iterdir()):
                if p.is_dir() and p.name != "module":
                    shutil.rmtree(p, ignore_errors=True)
            self.patches_.clear()
            self.modules_.clear()
            self.taint = 0
            (self.dir / "tainted").write_text("0\n")
            self.log_.clear()
            (self.dir / "kmsg.log").write_text("")
            self.boot = time.monotonic()
        self.start()

    def set_release(self, release: str) -> None:
        """From now on (restarts included) `uname -r` prints `release` on this host, any text but quotes
        and line breaks (tests feed hostile strings through it); "" goes back to the fleet's release."""
        if any(c in release for c in "'\n\r\0"):
            raise ValueError(f"release {release!r}: quotes and line breaks cannot pass the fakes' config")
        with self.lock:
            self.release_override = release
            conf = self.dir / "sys_kernel" / CONF_NAME  # only this line: _layout() would reset the kernel state
            line = f"SIM_RELEASE='{release or self.fleet.release}'"
            conf.write_text(re.sub(r"^SIM_RELEASE=.*$", lambda _: line, conf.read_text(), flags=re.M))

    # ------------------------------------------------------------------ faults
    def inject(self, fault: str, **params: Any) -> None:
        """Turn on a fault (see the module docstring)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {FAULTS}")
        with self.lock:
            if fault == "refused":
                self.stop()
                return
            self.faults[fault] = params
            if fault == "frozen":
                self._signal(signal.SIGSTOP)
            if fault == "hang":
                op = params.get("op", "insmod")
                (self.dir / "faults" / f"hang_{op}").write_text(str(params.get("seconds", 3600)))
            elif fault == "sig_enforce":
                (self.sysmod / "module" / "parameters" / "sig_enforce").write_text("Y\n")
            elif fault == "ebusy_disable":
                for p in self.patches_.values():
                    self._lock_enabled(p.name)
        if fault == "full_disk":  # the namespace is made at sshd start: remake it with the tiny tmpfs
            self.kill()
            self.start()

    def clear(self, fault: str | None = None) -> None:
        """Turn off one fault, or all of them."""
        names = [fault] if fault else list(self.faults)
        restart = False
        with self.lock:
            for f in names:
                params = self.faults.pop(f, None)
                if f == "hang":
                    for p in (self.dir / "faults").glob("hang_*"):
                        p.unlink()
                elif f == "sig_enforce":
                    (self.sysmod / "module" / "parameters" / "sig_enforce").write_text("N\n")
                elif f == "ebusy_disable":
                    for p in self.patches_.values():
                        self._unlock_enabled(p.name)
                elif f in ("refused", "full_disk") and params is not None:
                    restart = True
                elif f == "frozen" and params is not None:
                    self._signal(signal.SIGCONT)
        if restart:
            self.kill()
            self.start()

    # ------------------------------------------------------------------ observed state (for tests)
    @property
    def tainted(self) -> int:
        return int((self.dir / "tainted").read_text().strip() or 0)

    def log(self) -> list[str]:
        """The simulated kernel log, one line per entry, without timestamps."""
        return [re.sub(r"^\[\s*[0-9.]+\]\s?", "", ln) for ln in
                (self.dir / "kmsg.log").read_text().splitlines()]

    def patches(self) -> dict[str, dict[str, Any]]:
        """The simulated /sys/kernel/livepatch: name -> enabled, transition, objects."""
        out: dict[str, dict[str, Any]] = {}
        for d in sorted(self.lp.iterdir()):
            if not d.is_dir():
                continue
            objs = {o.name: (o / "patched").read_text().strip() for o in d.iterdir() if o.is_dir()}
            out[d.name] = {"enabled": (d / "enabled").read_text().strip(),
                           "transition": (d / "transition").read_text().strip(), "objects": objs}
        return out

    def modules(self) -> set[str]:
        """Names under the simulated /sys/module (loaded modules)."""
        return {p.name for p in self.sysmod.iterdir() if (p / "initstate").exists()}

    def staged(self) -> dict[str, bytes]:
        """Files under the host's /var/lib/kpatch (path -> content)."""
        root = self.dir / "var_lib" / "kpatch"
        if "full_disk" in self.faults and self.proc is not None:
            root = Path(f"/proc/{self.proc.pid}/root/var/lib/kpatch")
        out = {}
        for p in root.rglob("*"):
            if p.is_file() and not p.name.startswith("."):
                out["/var/lib/kpatch/" + str(p.relative_to(root))] = p.read_bytes()
        return out

    def temp_files(self) -> list[str]:
        """Leftover partial uploads (`.NAME.ko.kpipe-*`) under the host's /var/lib/kpatch."""
        root = self.dir / "var_lib" / "kpatch"
        if "full_disk" in self.faults and self.proc is not None:
            root = Path(f"/proc/{self.proc.pid}/root/var/lib/kpatch")
        return sorted("/var/lib/kpatch/" + str(p.relative_to(root)) for p in root.rglob("*")
                      if p.is_file() and ".kpipe-" in p.name)

    def target(self, **kw: Any):
        """A kpipe Host record for this host (what the SSH transport takes)."""
        from kpipe.host import Host

        return Host(name=self.name, address=self.address, port=self.port, user="root",
                         identity_file=str(self.fleet.client_key), known_hosts=str(self.fleet.known_hosts), **kw)

    def ssh_argv(self, *command: str) -> list[str]:
        """An OpenSSH client argv reaching this host with strict host keys."""
        f = self.fleet
        return ["ssh", "-q", "-p", str(self.port), "-i", str(f.client_key), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={f.known_hosts}",
                "-o", "IdentitiesOnly=yes", "-o", "KexAlgorithms=curve25519-sha256",
                f"root@{self.address}", "--", *command]

    # ------------------------------------------------------------------ the kernel's part (simulator thread)
    def klog(self, text: str) -> None:
        stamp = time.monotonic() - self.boot
        line = f"[{stamp:12.6f}] {text}"
        self.log_.append(text)
        with open(self.dir / "kmsg.log", "a") as f:
            f.write(line + "\n")

    def _set_taint(self, bits: int, module: str) -> None:
        new = bits & ~self.taint
        # Taint messages print only the first time a taint is set (kernel-facts.md).
        if new & TAINT_O:
            self.klog(f"{module}: loading out-of-tree module taints kernel.")
        if new & TAINT_E:
            self.klog(f"{module}: module verification failed: signature and/or required key missing - "
                      "tainting kernel")
        if new & TAINT_K:
            self.klog(f"{module}: tainting kernel with TAINT_LIVEPATCH")
        self.taint |= bits
        (self.dir / "tainted").write_text(f"{self.taint}\n")

    def _write(self, path: Path, value: str) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(value + "\n")
        os.replace(tmp, path)

    def _lock_enabled(self, name: str) -> None:
        f = self.lp / name / "enabled"
        if f.exists() and not f.is_symlink():
            ro = self.dir / "ro" / f"{name}.enabled"
            ro.write_text(f.read_text())
            f.unlink()
            f.symlink_to(ro)

    def _unlock_enabled(self, name: str) -> None:
        f = self.lp / name / "enabled"
        if f.is_symlink():
            value = f.read_text()
            f.unlink()
            f.write_text(value)

    def _read_enabled(self, name: str) -> str:
        # os.open/os.read, not pathlib: the simulator reads every patched host's file ten times a second
        # (ENABLED_POLL_S), and pathlib's ~27 us a read came to a third of a core at 1,000 hosts, on the
        # same cores as the client a benchmark measures (~4 us this way)
        try:
            fd = os.open(f"{self.lp}/{name}/enabled", os.O_RDONLY)
        except OSError:
            return ""
        try:
            return os.read(fd, 4096).decode("utf-8", "replace").strip()
        except OSError:
            return ""
        finally:
            os.close(fd)

    def _set_enabled(self, name: str, value: str) -> None:
        f = self.lp / name / "enabled"
        target = (self.dir / "ro" / f"{name}.enabled") if f.is_symlink() else f
        self._write(target, value)

    def handle(self, op: str, args: list[str]) -> tuple[int, str]:
        """A fake tool's request: (exit status, stderr text)."""
        sim = self.fleet
        if op == "insmod":
            name, sha, signed, path = (args + ["", "", "0", ""])[:4]
            name = name.replace("-", "_")
            if not re.match(r"^[A-Za-z0-9_]{1,55}$", name):
                return 1, f"insmod: ERROR: could not insert module {path}: Invalid module format"
            if name in self.modules_:
                return 1, f"insmod: ERROR: could not insert module {path}: File exists"
            if "sig_enforce" in self.faults and signed != "1":
                self.klog("Loading of unsigned module is rejected")
                return 1, f"insmod: ERROR: could not insert module {path}: Key was rejected by service"
            if "ebusy_enable" in self.faults or any(p.state in ("patching", "unpatching")
                                                    for p in self.patches_.values()):
                self.klog(f"livepatch: failed to enable patch '{name}'")
                return 1, f"insmod: ERROR: could not insert module {path}: Device or resource busy"
            self._set_taint(TAINT_O | TAINT_K | (0 if signed == "1" else TAINT_E), name)
            mod = self.sysmod / name
            mod.mkdir(exist_ok=True)
            self.modules_[name] = "OK" if signed == "1" else "OEK"
            (mod / "taint").write_text(self.modules_[name] + "\n")
            (mod / "initstate").write_text("live\n")
            (mod / "refcnt").write_text("0\n")
            modinfo = self._module_notes(mod, path)
            d = self.lp / name
            (d / "vmlinux" / "cmdline_proc_show,1").mkdir(parents=True, exist_ok=True)
            self._write(d / "transition", "1")
            self._write(d / "vmlinux" / "patched", "0")
            self._write(d / "enabled", "1")
            if "ebusy_disable" in self.faults:
                self._lock_enabled(name)
            patch = _Patch(name, sha, signed == "1", stuck="stuck_transition" in self.faults,
                           replace=modinfo.get("kpipe_replace", "Y") != "N")
            self.patches_[name] = patch
            self.klog(f"livepatch: enabling patch '{name}'")
            self.klog(f"livepatch: '{name}': starting patching transition")
            if patch.stuck:
                sim.after(float(self.faults["stuck_transition"].get("stall_after", 1.0)),
                          lambda: self._stall(name))
            else:
                sim.after(sim.transition_delay, lambda: self._patched(name))
            self._maybe_die("insmod")
            return 0, ""
        if op == "rmmod":
            name = (args or [""])[0].replace("-", "_")
            if name not in self.modules_:
                return 1, f"rmmod: ERROR: Module {name} is not currently loaded"
            if (self.lp / name).is_dir():
                return 1, f"rmmod: ERROR: Module {name} is in use"
            shutil.rmtree(self.sysmod / name, ignore_errors=True)
            del self.modules_[name]
            self.patches_.pop(name, None)
            self._maybe_die("rmmod")
            return 0, ""
        return 1, f"{op}: not simulated"

    def _module_notes(self, mod: Path, path: str) -> dict[str, str]:
        # what the kernel shows of the file's ELF notes and modinfo (kernel/module/sysfs.c); returns the modinfo
        try:
            data = Path(f"/proc/{self.proc.pid}/root{path}").read_bytes() if self.proc is not None else b""
        except OSError:
            data = b""
        secs = elf_sections(data)
        note = secs.get(".note.gnu.build-id")
        if note:
            (mod / "notes").mkdir(exist_ok=True)
            (mod / "notes" / ".note.gnu.build-id").write_bytes(note)
        info: dict[str, str] = {}
        for item in secs.get(".modinfo", b"").split(b"\0"):
            key, eq, value = item.decode("utf-8", "replace").partition("=")
            if eq:
                info[key] = value
            if item.startswith(b"srcversion="):
                (mod / "srcversion").write_text(item[len(b"srcversion="):].decode() + "\n")
        return info

    def _maybe_die(self, op: str) -> None:
        # The step took effect in the kernel, then the host dies before the tool answers.
        if "die_during" in self.faults and self.faults["die_during"].get("op", "insmod") == op:
            self.kill()

    def _patched(self, name: str) -> None:
        p = self.patches_.get(name)
        if p is None or p.state != "patching":
            return
        p.state = "patched"
        d = self.lp / name
        # Replace mode (the default): the new patch supersedes every other one; their
        # sysfs folders go, their modules stay loaded until rmmod. They go before
        # `transition` reads 0, so a reader that waited for the transition never sees
        # a folder half removed.
        for other in list(self.patches_.values()) if p.replace else []:
            if other.name != name and other.state in ("patched", "patching"):
                other.state = "replaced"
                self._unlock_enabled(other.name)
                shutil.rmtree(self.lp / other.name, ignore_errors=True)
        self._write(d / "vmlinux" / "patched", "1")
        self._write(d / "transition", "0")
        self.klog(f"livepatch: '{name}': patching complete")

    def _stall(self, name: str) -> None:
        p = self.patches_.get(name)
        if p is not None and p.state == "patching":
            self.klog("livepatch: signaling remaining tasks")

    def poll_enabled(self) -> None:
        """Notice `echo 0 > enabled` (the kernel reacts to the write)."""
        for p in list(self.patches_.values()):
            if p.state not in ("patching", "patched"):
                continue
            value = self._read_enabled(p.name)
            if value == "0":
                if p.state == "patching":
                    self.klog(f"livepatch: '{p.name}': reversing transition from patching to unpatching")
                else:
                    self.klog(f"livepatch: '{p.name}': starting unpatching transition")
                p.state = "unpatching"
                self._write(self.lp / p.name / "transition", "1")
                self.fleet.after(self.fleet.transition_delay, lambda n=p.name: self._unpatched(n))
                self._maybe_die("disable")
            elif value not in ("1", ""):
                self._set_enabled(p.name, "1")  # the kernel refuses anything but 0/1 (EINVAL)

    def _unpatched(self, name: str) -> None:
        p = self.patches_.get(name)
        if p is None or p.state != "unpatching":
            return
        p.state = "replaced"
        self.klog(f"livepatch: '{name}': unpatching complete")
        self._unlock_enabled(name)
        shutil.rmtree(self.lp / name, ignore_errors=True)
        (self.dir / "ro" / f"{name}.enabled").unlink(missing_ok=True)


ENABLED_POLL_S = 0.1  # how soon a simulated kernel notices `echo 0 > enabled` (every host's file is read)


class SimFleet:
    """N simulated hosts, one simulator thread; see the module docstring."""

    def __init__(self, n: int, tmpdir: Path | str, *, release: str | None = None, arch: str = "x86_64",
                 os_id: str = "debian", version_id: str = "12", prefix: str = "sim", client_key: Path | None = None,
                 transition_delay: float = 0.05, tick: float = 0.02, start_workers: int = 16):
        if n < 1:
            raise ValueError("a SimFleet needs at least one host")
        if release is None:  # the installed headers' release (tests/kenv.py), so real builds match the hosts
            import kenv

            release = kenv.kernel_env().release
        for what, value in (("release", release), ("arch", arch), ("os_id", os_id), ("version_id", version_id),
                            ("prefix", prefix)):
            if not re.match(r"^[A-Za-z0-9._+~-]+$", value):
                raise ValueError(f"{what} {value!r} has characters the fakes do not quote")
        self.root = Path(tmpdir).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.token = uuid.uuid4().hex[:12]
        self.release, self.arch, self.os_id, self.version_id = release, arch, os_id, version_id
        self.transition_delay = transition_delay
        self.tick = tick
        self.start_workers = start_workers
        self.bin_dir = self.root / "bin"
        self.req_dir = self.root / "req"
        self.known_hosts = self.root / "known_hosts"
        self.client_key = client_key or self.root / "client_ed25519"
        self.kmod_path = os.path.realpath("/sbin/insmod")
        width = max(3, len(str(n)))
        # Distinct loopback addresses (127.77.x.y): like distinct machines, one port each.
        self.hosts = [SimHost(self, i, f"{prefix}{i:0{width}d}", f"127.77.{i // 250}.{i % 250 + 1}")
                      for i in range(n)]
        self._by_name = {h.name: h for h in self.hosts}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._tlock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._epoll: Any = None
        self._fd_host: dict[int, SimHost] = {}
        self.slowest_step_s = 0.0  # the simulator's longest loop: a late "kernel" shows here
        self._next_enabled_poll = 0.0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> SimFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host(self, name: str) -> SimHost:
        return self._by_name[name]

    def start(self) -> SimFleet:
        """Start every sshd, the simulator, and verify each host's namespace before use."""
        if os.geteuid() != 0:
            raise RuntimeError("SimFleet needs root (mount namespaces)")
        if os.path.realpath("/sbin/rmmod") != self.kmod_path:
            raise RuntimeError("/sbin/insmod and /sbin/rmmod are not the same kmod binary here")
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation folder
        self.bin_dir.mkdir(exist_ok=True)
        self.req_dir.mkdir(exist_ok=True)
        for name, text in (("kmod", FAKE_KMOD), ("dmesg", FAKE_DMESG), ("uname", FAKE_UNAME),
                           ("bashrc", "# simulated host: no per-user shell setup\n")):
            p = self.bin_dir / name
            p.write_text(text)
            p.chmod(0o755)
        _keypair(Path(self.client_key))
        for h in self.hosts:
            h.dir.mkdir(parents=True, exist_ok=True)
            h._layout()
            h.kmsg_fd = os.open(h.dir / "kmsg", os.O_RDONLY | os.O_NONBLOCK)
            h.kmsg_wfd = os.open(h.dir / "kmsg", os.O_WRONLY | os.O_NONBLOCK)  # keeps the FIFO from EOF
        self.known_hosts.write_text("".join(h.known_hosts_line for h in self.hosts))
        self._epoll = select.epoll()
        for h in self.hosts:
            self._epoll.register(h.kmsg_fd, select.EPOLLIN)
            self._fd_host[h.kmsg_fd] = h
        self._thread = threading.Thread(target=self._run, name="simfleet", daemon=True)
        self._thread.start()
        try:
            with ThreadPoolExecutor(self.start_workers) as ex:
                list(ex.map(lambda h: h.start(), self.hosts))
            self.verify()
        except BaseException:
            self.close()
            raise
        return self

    def verify(self, hosts: list[SimHost] | None = None) -> None:
        """Prove, over SSH inside each namespace, that every covered path is simulated; raise otherwise."""
        from kpipe.commands import Command
        from kpipe.transport.ssh import SshPool
        from kpipe.workspace import SshSettings

        hosts = [h for h in (hosts or self.hosts) if h.proc is not None]
        settings = SshSettings(known_hosts=str(self.known_hosts), identity_file=str(self.client_key),
                               ssh_config="/nonexistent", connect_timeout=20, command_timeout=60)
        with SshPool(settings, known_hosts=[self.known_hosts], forks=32) as pool:
            by_name = {h.name: h for h in hosts}

            def check(t: Any) -> str:
                h = by_name[t.name]
                r = t.run(Command.script(CHECK_SCRIPT, h.token, *h.expected_inodes(), label="simfleet-check"))
                return r.stdout.strip() if r.ok else f"FAILED: {r.stdout.strip()} {r.stderr.strip()}"

            results = pool.run_many([h.target() for h in hosts], check, forks=32)
        bad = {n: r for n, r in results.items() if r != f"SIMFLEET-OK {by_name[n].token}"}
        if bad:
            raise RuntimeError(f"SimFleet safety check failed on {len(bad)} host(s), refusing to run: "
                               + "; ".join(f"{n}: {r}" for n, r in list(bad.items())[:5]))

    def close(self) -> None:
        """Stop every host's processes by PID, the simulator, and close the FIFOs."""
        ns = self.pids_by_namespace()
        pids = set()
        for h in self.hosts:
            if h.proc is not None and h.proc.poll() is None:
                pids.add(h.proc.pid)
            if h.mntns:
                pids.update(p for p in ns.get(h.mntns, []) if h.owns(p))
        pids.discard(os.getpid())
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for h in self.hosts:
            if h.proc is not None:
                try:
                    h.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
                h.proc = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for h in self.hosts:
            for fd in (h.kmsg_fd, h.kmsg_wfd):
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            h.kmsg_fd = h.kmsg_wfd = None
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None

    @staticmethod
    def pids_by_namespace() -> dict[str, list[int]]:
        """Mount namespace id -> PIDs, from /proc (one pass)."""
        out: dict[str, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                out.setdefault(os.readlink(f"/proc/{entry}/ns/mnt"), []).append(int(entry))
            except OSError:
                continue
        return out

    # ------------------------------------------------------------------ the simulator
    def after(self, delay: float, fn: Callable[[], None]) -> None:
        """Run fn on the simulator thread after delay seconds."""
        with self._tlock:
            self._seq += 1
            heapq.heappush(self._timers, (time.monotonic() + delay, self._seq, fn))

    def simulator_cpu(self) -> float:
        """CPU seconds the simulator thread has used (it runs in the caller's process: a benchmark that
        reads its own process's CPU subtracts this to count only the client's)."""
        t = self._thread
        if t is None or t.native_id is None:
            return 0.0
        return stat_cpu(f"/proc/self/task/{t.native_id}/stat") or 0.0

    def _run(self) -> None:
        # The simulated kernels react at a kernel's pace, not at the pace of a user process on a machine that a
        # 200-host rollout (hundreds of sshd sessions, kpipe) loads far past its cores: this thread alone runs
        # at a raised priority (root, which SimFleet needs anyway), so a step timeout measures kpipe, not the
        # harness. It sleeps in epoll between ticks and polls `enabled` files at most every ENABLED_POLL_S.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -10)
        except OSError:
            pass
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self._step()
                dt = time.monotonic() - t0
                if dt > self.slowest_step_s:
                    self.slowest_step_s = dt
            except Exception as e:  # the simulator must outlive one bad request; the log shows it
                self.log_error(e)

    def _step(self) -> None:
        # The log first: a marker written before a command must precede that command's lines.
        for fd, _ in self._epoll.poll(self.tick):
            self._drain(self._fd_host[fd])
        try:
            reqs = sorted(n for n in os.listdir(self.req_dir) if n.endswith(".req"))
        except FileNotFoundError:
            reqs = []
        if reqs:
            for fd, _ in self._epoll.poll(0):
                self._drain(self._fd_host[fd])
        for n in reqs:
            path = self.req_dir / n
            try:
                lines = path.read_text().splitlines()
            except FileNotFoundError:
                continue
            path.unlink(missing_ok=True)
            host = self._by_name.get(n.split(".", 1)[0])
            if host is None or not lines:
                code, err = 1, "simfleet: unknown host"
            else:
                with host.lock:
                    code, err = host.handle(lines[0], lines[1:])
            rsp = self.req_dir / (n[:-4] + ".rsp")
            tmp = self.req_dir / (n[:-4] + ".rsptmp")
            tmp.write_text(f"{code}\n{err}\n" if err else f"{code}\n")
            os.replace(tmp, rsp)
        now = time.monotonic()
        due = []
        with self._tlock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[2])
        for fn in due:  # each on its own: one failing callback must not drop the others (popped already)
            self._guarded(fn)
        if now >= self._next_enabled_poll:
            self._next_enabled_poll = now + ENABLED_POLL_S
            for h in self.hosts:
                if h.patches_:
                    with h.lock:
                        self._guarded(h.poll_enabled)

    def _guarded(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # the log shows it; the simulator goes on
            self.log_error(e)

    def log_error(self, e: BaseException) -> None:
        """Record a simulator error in simulator-errors.log (tests read it through .errors())."""
        with open(self.root / "simulator-errors.log", "a") as f:
            f.write(f"{time.time():.3f} {type(e).__name__}: {e}\n")

    def errors(self) -> list[str]:
        """The simulator's recorded errors (empty when every request and callback went through)."""
        try:
            return (self.root / "simulator-errors.log").read_text().splitlines()
        except FileNotFoundError:
            return []

    def _drain(self, h: SimHost) -> None:
        try:
            data = os.read(h.kmsg_fd, 65536)
        except BlockingIOError:
            return
        h.kmsg_buf += data
        *lines, h.kmsg_buf = h.kmsg_buf.split(b"\n")
        with h.lock:
            for ln in lines:
                text = ln.decode("utf-8", "replace").rstrip("\r")
                text = re.sub(r"^<\d+>", "", text)  # /dev/kmsg accepts a <level> prefix
                if text:
                    h.klog(text)

    # ------------------------------------------------------------------ files for kpipe
    def targets(self) -> list[Any]:
        """kpipe Host records for every host."""
        return [h.target() for h in self.hosts]

    def write_inventory(self, path: Path, group: str = "simfleet", hosts: list[SimHost] | None = None) -> Path:
        """An Ansible YAML inventory of the hosts (ansible_host/port/user/key, kpipe_known_hosts)."""
        import yaml

        doc = {"all": {"children": {group: {
            "hosts": {h.name: {"ansible_host": h.address, "ansible_port": h.port} for h in (hosts or self.hosts)},
            "vars": {"ansible_user": "root", "ansible_ssh_private_key_file": str(self.client_key),
                     "kpipe_known_hosts": str(self.known_hosts)},
        }}}}
        path = Path(path)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def write_workspace(self, folder: Path, *, extra_toml: str = "", forks: int = 50) -> Path:
        """A kpipe workspace whose inventory is this fleet; returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.write_inventory(folder / "simfleet.yml")
        (folder / "kpipe.toml").write_text(
            "[ssh]\n"
            f'known_hosts = "{self.known_hosts}"\n'
            f'identity_file = "{self.client_key}"\n'
            'ssh_config = "/nonexistent"\n'
            f"forks = {forks}\n"
            "connect_timeout = 10\n"
            "command_timeout = 60\n\n"
            "[fleet]\n"
            'inventories = ["simfleet.yml"]\n' + extra_toml)
        return folder


_FLEETS: list[SimFleet] = []


@pytest.fixture(scope="session")
def simfleet_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., SimFleet]]:
    """Session-scoped: simfleet_factory(n, **SimFleet kwargs) -> a started, verified SimFleet; all closed at the end."""
    fleets: list[SimFleet] = []

    def make(n: int, **kw: Any) -> SimFleet:
        fleet = SimFleet(n, tmp_path_factory.mktemp("simfleet"), **kw)
        fleet.start()
        fleets.append(fleet)
        return fleet

    yield make
    for f in fleets:
        f.close()
