"""A real kpatch-build build host: the forge's chroot running its own OpenSSH server on loopback.

`up()` starts the chroot's /usr/sbin/sshd in a private mount namespace (see
kpipe.lab.chroot: /proc, /dev, the state folder and the forged kernels are
mounted there and vanish with the namespace), with a host key and an
authorized client key kept in the state folder. kpipe then reaches it over SSH
with strict host key checking, exactly as a remote build farm machine.
`down()` stops exactly the recorded sshd PID and the processes left in its
mount namespace. Installing kpatch-build is the chroot's business (the forge).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kpipe.errors import ConfigError, KpipeError
from kpipe.lab.chroot import enter_argv
from kpipe.lab.forge import (
    DEFAULT_MIRROR,
    FORCE_DEPENDS_PACKAGES,
    NICE,
    Progress,
    ensure_chroot,
    kernels_dir,
    klp_build_packages,
)

SSHD = "/usr/sbin/sshd"

SSHD_CONFIG = """\
# kpipe lab build host (generated): loopback only, key login for root only.
Port {port}
ListenAddress 127.0.0.1
HostKey {state}/ssh_host_ed25519_key
AuthorizedKeysFile {state}/authorized_keys
PidFile none
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowUsers root
# The state folder belongs to the host's user and lives wherever the workspace is.
StrictModes no
Subsystem sftp internal-sftp
LogLevel INFO
"""


def sshd_config(state: Path, port: int) -> str:
    """The build host's sshd_config text for a state folder and port."""
    if not (1 <= port <= 65535):
        raise ConfigError(f"port {port} is out of range")
    if any(c in str(state) for c in " \t\n\"'#"):
        raise ConfigError(f"build host state folder {state} has whitespace or quotes",
                          hint="sshd_config cannot quote such paths; choose another folder")
    return SSHD_CONFIG.format(port=port, state=state)


# The gcc each suite built its kernels with: a module must be built with the kernel's own compiler major.
SUITE_KERNEL_GCC = {"buster": "gcc-8", "bullseye": "gcc-10", "bookworm": "gcc-12", "trixie": "gcc-14"}


# Mounted inside a kbuild host's chroot at their host paths too: the headers tree (usr/src) links its
# scripts into usr/lib/linux-kbuild-X.Y by relative symlinks, so both must resolve under one prefix.
KBUILD_HOST_PATHS = ("usr/src", "usr/lib")


def kbuild_host_packages(suite: str, release: str) -> tuple[str, ...]:
    """A kbuild build host's extra packages: the release's headers (with kbuild) and the suite's kernel gcc."""
    gcc = SUITE_KERNEL_GCC.get(suite)
    return (f"linux-headers-{release}", *((gcc,) if gcc else ()))


def kbuild_kernel_toml(release: str, root: Path) -> str:
    """The [[kernels]] entry of a kbuild host's release: its headers by the path valid in and out of the chroot."""
    headers = root / "usr" / "src" / f"linux-headers-{release}"
    return (f"[[kernels]]\nrelease = {json.dumps(release)}\nheaders = {json.dumps(str(headers))}\n"
            f"symbols = [{json.dumps(str(headers / 'Module.symvers'))}]\n")


def known_hosts_line(port: int, host_pub: str) -> str:
    """The strict known_hosts line for the loopback build host."""
    return f"[127.0.0.1]:{port} {' '.join(host_pub.split()[:2])}\n"


def build_host_toml(name: str, port: int, identity_file: Path, kernels: tuple[str, ...] = ("*-kforge-*",)) -> str:
    """The [[build_hosts]] entry of kpipe.toml that reaches this build host."""
    globs = ", ".join(json.dumps(g) for g in kernels)
    return (f"[[build_hosts]]\nname = {json.dumps(name)}\naddress = \"127.0.0.1\"\nport = {port}\nuser = \"root\"\n"
            f"arch = \"x86_64\"\nkernels = [{globs}]\nidentity_file = {json.dumps(str(identity_file))}\n")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _keygen(path: Path, comment: str) -> str:
    if not path.is_file():
        r = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                           capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise KpipeError(f"ssh-keygen failed: {r.stderr.strip()}", hint="install openssh-client")
    return Path(str(path) + ".pub").read_text().strip()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> str:
    # sshd rewrites its argv ("sshd: /usr/sbin/sshd -D -e -f CFG [listener] ..."): match the text.
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
    except OSError:
        return ""


def _mnt_ns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return ""


def namespace_pids(ns: str) -> list[int]:
    """Every process in the given mount namespace (sshd's sessions and their children)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and _mnt_ns(int(d.name)) == ns:
            out.append(int(d.name))
    return out


@dataclass
class BuildHostChroot:
    """A chroot sshd recorded in one state folder."""

    folder: Path

    def __post_init__(self) -> None:
        self.folder = Path(self.folder).resolve()

    @property
    def state_file(self) -> Path:
        return self.folder / "state.json"

    @property
    def identity_file(self) -> Path:
        return self.folder / "id_ed25519"

    @property
    def known_hosts_file(self) -> Path:
        return self.folder / "known_hosts"

    def load(self) -> dict[str, Any] | None:
        """The recorded build host, or None."""
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
            return state
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{self.state_file}: unreadable build host state: {e}") from None

    def running(self) -> dict[str, Any] | None:
        """The recorded state when its sshd is still the process we started."""
        st = self.load()
        if st and _alive(int(st["pid"])) and f"-f {self.folder / 'sshd_config'} " in _cmdline(int(st["pid"])):
            return st
        return None

    def up(self, suite: str = "trixie", *, version: str = "6.12", port: int | None = None,
           mirror: str = DEFAULT_MIRROR, cache_dir: Path | None = None, timeout: float = 60.0,
           progress: Progress | None = None, packages: tuple[str, ...] | None = None,
           forced: tuple[str, ...] = FORCE_DEPENDS_PACKAGES, host_paths: tuple[str, ...] = ()) -> dict[str, Any]:
        """Start sshd in the suite's chroot on a free loopback port; wait for its banner.

        packages: the chroot's extra packages (default linux-source-<version>, the forge's); forced:
        those installed with --force-depends (kpatch-build; () for a kbuild host of headers only).
        host_paths: chroot folders (e.g. usr/src) also mounted inside at their host path, so one
        absolute path names the chroot's headers for the build (in the chroot) and validation (here).
        """
        say = progress or (lambda _m: None)
        if self.running():
            raise ConfigError(f"a build host is already running from {self.folder}",
                              hint="run `kpipe lab buildhost down` first")
        extra = packages if packages is not None else (f"linux-source-{version}", *klp_build_packages(version))
        chroot = ensure_chroot(suite, extra_packages=extra, mirror=mirror, cache_dir=cache_dir, progress=say,
                               forced=forced)
        if not (chroot.root / SSHD.lstrip("/")).is_file():
            raise KpipeError(f"{SSHD} is missing from the {suite} chroot {chroot.root}")
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        host_pub = _keygen(self.folder / "ssh_host_ed25519_key", f"kpipe-buildhost-{suite}")
        client_pub = _keygen(self.identity_file, "kpipe-buildhost-client")
        (self.folder / "authorized_keys").write_text(client_pub + "\n")
        os.chmod(self.folder / "authorized_keys", 0o600)
        (chroot.root / "run" / "sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation dir
        kdir = kernels_dir(cache_dir)
        kdir.mkdir(parents=True, exist_ok=True)
        exposed = tuple(chroot.root / rel.strip("/") for rel in host_paths)
        for folder in exposed:
            if ".." in folder.parts or not folder.is_dir():
                raise ConfigError(f"{folder} is not a folder of the {suite} chroot")
        last_error = ""
        for _attempt in range(3):
            p = port or free_port()
            cfg = self.folder / "sshd_config"
            cfg.write_text(sshd_config(self.folder, p))
            # niced like the forge: builds run through this sshd on a machine others share
            argv = enter_argv(chroot.root, [SSHD, "-D", "-e", "-f", str(cfg)], (self.folder, kdir, *exposed),
                              nice=NICE)
            with open(self.folder / "sshd.log", "ab") as log:  # sshd keeps its own copy of the descriptor
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
            state = {"pid": proc.pid, "port": p, "suite": suite, "root": str(chroot.root), "kernels": str(kdir),
                     "identity_file": str(self.identity_file), "known_hosts": str(self.known_hosts_file),
                     "started_at": time.time()}
            self.state_file.write_text(json.dumps(state, indent=2) + "\n")
            self.known_hosts_file.write_text(known_hosts_line(p, host_pub))
            if _wait_banner(p, proc, timeout):
                say(f"build host ready: root@127.0.0.1:{p} (sshd PID {proc.pid}, {suite} chroot)")
                return state
            last_error = _tail(self.folder / "sshd.log")
            self.down()
            if port:
                break
        raise KpipeError(f"the build host's sshd did not start: {last_error}", hint=f"see {self.folder}/sshd.log")

    def down(self, timeout: float = 10.0) -> list[int]:
        """Stop the recorded sshd and every process left in its mount namespace; remove the state."""
        st = self.load()
        stopped: list[int] = []
        if st is None:
            return stopped
        pid = int(st["pid"])
        if _alive(pid) and f"-f {self.folder / 'sshd_config'} " in _cmdline(pid):
            ns = _mnt_ns(pid)
            host_ns = _mnt_ns(os.getpid())
            pids = [pid] + ([q for q in namespace_pids(ns) if q != pid] if ns and ns != host_ns else [])
            for q in pids:
                try:
                    os.kill(q, signal.SIGTERM)
                    stopped.append(q)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and any(_alive(q) for q in pids):
                _reap(pids)
                time.sleep(0.1)
            for q in pids:
                if _alive(q):
                    try:
                        os.kill(q, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            _reap(pids)
        self.state_file.unlink(missing_ok=True)
        return stopped


def _reap(pids: list[int]) -> None:
    for q in pids:
        try:
            os.waitpid(q, os.WNOHANG)
        except ChildProcessError:
            pass


def _wait_banner(port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def _tail(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return " | ".join(lines[-3:])[-300:] or "no output"
