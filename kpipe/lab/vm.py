"""qemu processes: the command line, starting one detached, and stopping exactly that one.

A VM is identified by its PID plus the process start time from /proc/<pid>/stat
(field 22), and its command line must still name its own folder before kpipe
sends it a signal: a recycled PID is never killed.
"""

from __future__ import annotations

import enum
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kpipe.errors import KpipeError
from kpipe.lab.arch import X86_64, LabArch


class VmState(enum.StrEnum):
    """A recorded VM's state as `kpipe lab status` shows it (--json "state")."""

    RUNNING = "running"  # the recorded qemu process (pid + start time) is alive
    STOPPED = "stopped"  # it is gone: exited, killed, or the machine rebooted


@dataclass
class VmSpec:
    """What to boot: one VM's kernel, initrd, port and command line."""

    name: str
    vmlinuz: Path
    initrd: Path
    ssh_port: int
    folder: Path
    memory_mb: int = 256
    append: str = "console=ttyS0 panic=-1"
    use_kvm: bool | None = None
    arch: LabArch = X86_64
    disk: Path | None = None  # `--rootfs`: the VM's qcow2 overlay, attached as virtio disk /dev/vda

    def argv(self) -> list[str]:
        """The qemu command line (stdin /dev/null, serial console to a file, SSH forwarded to loopback)."""
        return [self.arch.qemu, "-name", f"kpipe-{self.name}", "-nodefaults", "-no-user-config", "-display", "none",
                *self.arch.machine, *self.arch.accel_args(self.use_kvm), "-m", str(self.memory_mb), "-smp", "1",
                "-no-reboot",
                "-kernel", str(self.vmlinuz), "-initrd", str(self.initrd), "-append", self.append,
                "-serial", f"file:{self.folder / 'console.log'}", "-monitor", "none",
                "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
                "-device", f"{self.arch.nic},netdev=n0,romfile=",
                *(["-drive", f"file={self.disk},if=virtio,format=qcow2"] if self.disk else [])]


@dataclass
class VmProcess:
    """A started VM as recorded in the lab's state.json."""

    name: str
    pid: int
    start_time: int  # /proc/<pid>/stat field 22, clock ticks since boot
    ssh_port: int
    folder: str
    argv: list[str] = field(default_factory=list)
    sig_enforce: bool = False
    append: str = ""
    host_key: str = ""  # "ssh-ed25519 AAAA..."
    started_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VmProcess:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def listens_on(pid: int, port: int) -> bool:
    """True when process pid holds a listening TCP socket on 127.0.0.1:port (/proc/net/tcp + its fds)."""
    inodes = set()
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    want = f"0100007F:{port:04X}"
    for line in lines:
        f = line.split()
        if len(f) > 9 and f[1] == want and f[3] == "0A":  # 0A = TCP_LISTEN
            inodes.add(f"socket:[{f[9]}]")
    if not inodes:
        return False
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (None when the process is gone or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat.rsplit(")", 1)[1].split()
    if rest[0] == "Z":
        return None
    return int(rest[19])


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def is_ours(vm: VmProcess) -> bool:
    """True when vm.pid still is the qemu kpipe started (same start time, its folder on the command line)."""
    if proc_start_time(vm.pid) != vm.start_time:
        return False
    argv = _cmdline(vm.pid)
    return bool(argv) and os.path.basename(argv[0]).startswith("qemu-system") and any(
        vm.folder in a for a in argv)


def start(spec: VmSpec, *, sig_enforce: bool = False, host_key: str = "") -> VmProcess:
    """Start qemu detached (own session, stdin /dev/null, output to qemu.log); return its record."""
    return _spawn(spec.name, spec.argv(), spec.folder, spec.ssh_port, spec.append, sig_enforce, host_key,
                  f"install Debian's {spec.arch.qemu_package} package")


def restart(vm: VmProcess) -> VmProcess:
    """Start the recorded VM again with its recorded command line (same folder, port, disk); the new record.

    `kpipe lab reboot`: the old qemu must be gone (a guest reboot ends it: qemu runs with -no-reboot).
    """
    if is_ours(vm):
        raise KpipeError(f"lab VM {vm.name} is still running (pid {vm.pid})", hint="stop it before restarting it")
    if not vm.argv:
        raise KpipeError(f"lab VM {vm.name} has no recorded command line", hint="run `kpipe lab down` and `up`")
    return _spawn(vm.name, list(vm.argv), Path(vm.folder), vm.ssh_port, vm.append, vm.sig_enforce, vm.host_key,
                  "install qemu")


def _spawn(name: str, argv: list[str], folder: Path, ssh_port: int, append: str, sig_enforce: bool,
           host_key: str, install_hint: str) -> VmProcess:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "console.log").write_bytes(b"")
    with open(folder / "qemu.log", "wb") as log:  # qemu keeps its own copy of the descriptor
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, close_fds=True)
        except FileNotFoundError:
            raise KpipeError(f"{argv[0]} is not installed", hint=install_hint) from None
    st = None
    for _ in range(50):  # /proc/<pid>/stat exists as soon as fork returns; be tolerant anyway
        st = proc_start_time(p.pid)
        if st is not None:
            break
        time.sleep(0.01)
    # Until the child has exec'd, /proc/<pid>/cmdline is still this Python's: is_ours() would call a
    # VM that is starting dead. Wait for the exec (qemu replaces the image within milliseconds).
    deadline = time.monotonic() + 10.0
    while p.poll() is None and time.monotonic() < deadline:
        argv0 = (_cmdline(p.pid) or [""])[0]
        if os.path.basename(argv0).startswith("qemu-system"):
            break
        time.sleep(0.01)
    _CHILDREN[p.pid] = p
    vm = VmProcess(name, p.pid, st or 0, ssh_port, str(folder), argv, sig_enforce, append, host_key, time.time())
    STARTED.append(vm)
    return vm


# Popen objects of VMs this process started, so that stop() can reap them (no zombies).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
# Every VM this process started (tests assert none is left running).
STARTED: list[VmProcess] = []


def vm_state(vm: VmProcess) -> VmState:
    """RUNNING while the recorded qemu runs, else STOPPED."""
    return VmState.RUNNING if alive(vm) else VmState.STOPPED


def alive(vm: VmProcess) -> bool:
    """True while the recorded qemu runs."""
    child = _CHILDREN.get(vm.pid)
    if child is not None and child.poll() is not None:
        return False
    return is_ours(vm)


def stop(vm: VmProcess, timeout: float = 10.0) -> bool:
    """Stop exactly this qemu (SIGTERM, then SIGKILL); False when it was already gone or not ours."""
    if not is_ours(vm):
        _reap(vm.pid)
        return False
    try:
        os.kill(vm.pid, signal.SIGTERM)
    except ProcessLookupError:
        _reap(vm.pid)
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(vm.pid)
        if proc_start_time(vm.pid) != vm.start_time:
            return True
        time.sleep(0.05)
    if is_ours(vm):
        try:
            os.kill(vm.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for _ in range(100):
        _reap(vm.pid)
        if proc_start_time(vm.pid) != vm.start_time:
            break
        time.sleep(0.05)
    return True


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is not None:
            _CHILDREN.pop(pid, None)
        return
    try:  # a qemu started by this process through another path: reap if it is our child
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (0 when gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
