"""A lab: N disposable VMs of one kernel, tracked in <folder>/state.json.

`up` builds (or reuses) the initramfs, starts the VMs, writes known_hosts and
an Ansible inventory, and waits until every VM answers SSH through kpipe's own
strict-host-key transport. `down` stops exactly the recorded qemu processes.
"""

from __future__ import annotations

import json
import os
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kpipe.errors import ConfigError, KpipeError
from kpipe.host import Host
from kpipe.lab import initramfs, rootfs
from kpipe.lab import vm as vmmod
from kpipe.lab.arch import LabArch, lab_arch
from kpipe.lab.kernel import KernelImage, boot_image, default_cache_dir, image_arch
from kpipe.lab.userland import guest_userland, is_host_arch
from kpipe.lab.vm import VmProcess, VmSpec

if TYPE_CHECKING:
    from kpipe.transport.ssh import SshPool
    from kpipe.workspace import Workspace

STATE_VERSION = 1
REBOOT_SHUTDOWN_TIMEOUT = 120.0  # seconds a --rootfs guest gets to shut down cleanly before it is reset


def base_append(arch: LabArch) -> str:
    """The kernel arguments every lab VM gets: its serial console, and reboot-as-exit on panic."""
    return f"console={arch.console} panic=-1"


Progress = Callable[[str], None]


@dataclass
class LabConfig:
    """How many VMs and how to boot them."""

    vms: int = 1
    memory_mb: int = 256
    sig_enforce: bool = False  # module.sig_enforce=1 on every VM
    sig_enforce_vms: tuple[str, ...] = ()  # ...or only on these
    append: str = ""  # extra kernel arguments
    boot_timeout: float = 480.0  # seconds until SSH must answer (TCG on a loaded 2-CPU host is slow)
    use_kvm: bool | None = None
    names: tuple[str, ...] = ()  # default lab1..labN
    pvh: bool = True  # boot the uncompressed vmlinux through PVH when the kernel supports it (half the CPU)
    arch: str = ""  # the guest architecture (kpipe.lab.arch registry); "" = the kernel image's own
    rootfs: str = ""  # "" = the busybox initramfs; else a kpipe.lab.rootfs.KINDS name (a Debian userland on disk)

    def vm_names(self, prefix: str = "lab", first: int = 1) -> list[str]:
        if self.names:
            return list(self.names)
        return [f"{prefix}{i}" for i in range(first, first + self.vms)]


def guest_arch(kernel: KernelImage, wanted: str = "") -> LabArch:
    """The registry entry a kernel boots on: its recorded or detected arch; a different `wanted` is refused."""
    found = kernel.arch or image_arch(kernel.vmlinuz) or ""
    if wanted and found and lab_arch(wanted).name != lab_arch(found).name:
        raise ConfigError(f"--arch {wanted}: kernel {kernel.release} ({kernel.vmlinuz}) is built for {found}",
                          hint=f"drop --arch, or pass --arch {found}")
    return lab_arch(wanted or found or "x86_64")


@dataclass
class LabState:
    """state.json: the kernel, the VMs and the files the lab wrote."""

    folder: Path
    kernel: dict[str, str]
    vms: list[VmProcess]
    identity_file: str
    known_hosts: str
    inventory: str
    created_at: float = 0.0
    ready_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "kernel": self.kernel, "vms": [v.to_dict() for v in self.vms],
                "identity_file": self.identity_file, "known_hosts": self.known_hosts, "inventory": self.inventory,
                "created_at": self.created_at, "ready_seconds": self.ready_seconds, "extra": self.extra}

    def vm(self, name: str) -> VmProcess:
        for v in self.vms:
            if v.name == name:
                return v
        raise ConfigError(f"no lab VM named {name!r}", hint=f"lab VMs: {', '.join(v.name for v in self.vms)}")


class Lab:
    """The VMs recorded in one state folder (the workspace's .lab/, or a preflight's own)."""

    def __init__(self, folder: Path, *, cache_dir: Path | None = None, prefix: str = "lab"):
        self.folder = Path(folder).resolve()
        self.cache_dir = cache_dir or default_cache_dir()
        self.prefix = prefix

    @property
    def state_file(self) -> Path:
        return self.folder / "state.json"

    @property
    def identity_file(self) -> Path:
        return self.folder / "id_ed25519"

    @property
    def known_hosts_file(self) -> Path:
        return self.folder / "known_hosts"

    @property
    def inventory_file(self) -> Path:
        return self.folder / "inventory.yml"

    # ------------------------------------------------------------------ state

    def load_state(self) -> LabState | None:
        """The recorded lab, or None when there is none."""
        try:
            d = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{self.state_file}: unreadable lab state: {e}",
                              hint="stop stray qemu processes by PID and delete the file") from None
        return LabState(self.folder, d.get("kernel", {}), [VmProcess.from_dict(v) for v in d.get("vms", [])],
                        d.get("identity_file", ""), d.get("known_hosts", ""), d.get("inventory", ""),
                        d.get("created_at", 0.0), d.get("ready_seconds", 0.0), d.get("extra", {}))

    def _save(self, st: LabState) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(st.to_dict(), indent=2) + "\n")
        os.replace(tmp, self.state_file)

    # ------------------------------------------------------------------ up

    def up(self, kernel: KernelImage, config: LabConfig, progress: Progress | None = None,
           more: list[tuple[KernelImage, LabConfig]] | None = None) -> LabState:
        """Boot the VMs and wait until each answers SSH; on failure stop them all and raise.

        more: further groups (a kernel of another arch, its own VM count) booted in the same lab, one inventory.
        """
        say = progress or (lambda _m: None)
        groups = [(kernel, config), *(more or [])]
        old = self.load_state()
        if old is not None:
            running = [v.name for v in old.vms if vmmod.alive(v)]
            if running:
                raise ConfigError(f"a lab is already running in {self.folder} ({', '.join(running)})",
                                  hint="run `kpipe lab down` first")
            self._cleanup_files()
        if any(c.vms < 1 and not c.names for _k, c in groups):
            raise ConfigError("--vms must be at least 1")
        group_names: list[list[str]] = []
        for _k, c in groups:
            group_names.append(c.vm_names(self.prefix, 1 + sum(len(g) for g in group_names)))
        names = [n for g in group_names for n in g]
        if len(set(names)) != len(names):
            raise ConfigError(f"lab VM names repeat: {', '.join(names)}", hint="give each group its own names")
        unknown = [n for n in config.sig_enforce_vms if n not in names]
        if unknown:
            raise ConfigError(f"--sig-enforce-vms names unknown VMs: {', '.join(unknown)}",
                              hint=f"VMs: {', '.join(names)}")
        extra_args = shlex.split(config.append) if config.append else []
        kind = rootfs.kind_of(config.rootfs) if config.rootfs else None
        arches = [guest_arch(k, c.arch) for k, c in groups]
        if kind and any(not is_host_arch(a) for a in arches):
            raise ConfigError(f"--rootfs {kind.name} boots only the host's architecture",
                              hint="use the busybox initramfs (no --rootfs) for an aarch64 guest")
        self.folder.mkdir(parents=True, exist_ok=True)
        client_pub = initramfs.make_client_key(self.identity_file)
        t0 = time.monotonic()
        disk_image = rootfs.ensure_image(kind, kernel, self.cache_dir, say) if kind else None
        vms: list[VmProcess] = []
        extra: dict[str, Any] = {"rootfs": kind.name, "image": str(disk_image)} if kind else {}
        st = LabState(self.folder, {}, vms, str(self.identity_file),
                      str(self.known_hosts_file), str(self.inventory_file), time.time(), extra=extra)
        try:
            specs = []
            for (gkernel, gconfig), arch, gnames in zip(groups, arches, group_names, strict=True):
                specs += self._group_specs(st, gkernel, gconfig, arch, gnames, kind, disk_image, client_pub,
                                           config, extra_args, say)
            if len(groups) > 1:
                st.extra["groups"] = [{"arch": a.name, "kernel": k.to_dict(), "vms": n}
                                      for (k, _c), a, n in zip(groups, arches, group_names, strict=True)]
            say(f"boot: starting {len(specs)} VM{'' if len(specs) == 1 else 's'} ({', '.join(names)})")
            for spec, enforce, host_pub in specs:
                vms.append(vmmod.start(spec, sig_enforce=enforce, host_key=host_pub))
                self._save(st)  # recorded at once, so `down` can stop it whatever happens next
            self._restart_port_clashes(st, specs)
            self._write_access_files(st)
            say(f"host keys: {len(st.vms)} pinned in {self.known_hosts_file} (strict checking)")
            self.wait_ready(st, config.boot_timeout, say)
        except BaseException:
            self._stop_all(st)
            self._cleanup_files()  # the console logs under vms/ stay for the diagnosis
            raise
        st.ready_seconds = time.monotonic() - t0
        self._save(st)
        say(f"ready: {len(st.vms)} VM{'' if len(st.vms) == 1 else 's'} in {st.ready_seconds:.1f} s")
        return st

    def _group_specs(self, st: LabState, kernel: KernelImage, gconfig: LabConfig, arch: LabArch, names: list[str],
                     kind: Any, disk_image: Path | None, client_pub: str, config: LabConfig, extra_args: list[str],
                     say: Progress) -> list[tuple[VmSpec, bool, str]]:
        """The VM specs of one group (one kernel, one arch): its initramfs, keys and command lines."""
        say(f"initramfs: for {kernel.release} ({arch.name}; built once per kernel, then cached)")
        userland = guest_userland(arch, self.cache_dir)
        base = initramfs.build_base(kernel, self.cache_dir, rootfs=kind is not None, userland=userland)
        base_bytes = base.read_bytes()
        image = boot_image(kernel, self.cache_dir) if gconfig.pvh and arch.pvh else kernel.vmlinuz
        if not st.kernel:  # the first group's kernel is the lab's (status, preflight)
            st.kernel = {**kernel.to_dict(), "arch": arch.name, "boot_image": str(image)}
        # systemd, journald and sshd need more than the busybox guest's 256 MiB
        memory = max(gconfig.memory_mb, rootfs.MIN_MEMORY_MB) if kind else gconfig.memory_mb
        specs = []
        for name in names:
            folder = self.folder / "vms" / name
            folder.mkdir(parents=True, exist_ok=True)
            initrd = folder / "initrd.img"
            disk: Path | None = None
            if kind and disk_image:
                key_file = self.folder / "keys" / name / "ssh_host_ed25519_key"
                host_pub = rootfs.make_openssh_host_key(key_file)
                overlay = initramfs.rootfs_overlay(key_file, host_pub, client_pub, name)
                disk = folder / "disk.qcow2"
                rootfs.make_overlay(disk_image, disk)  # fresh per `up`: VMs never share writes
                kind_args = [f"kpipe.root={rootfs.ROOT_DEVICE}", *kind.append]
            else:
                key_file = self.folder / "keys" / name / "dropbear_ed25519_host_key"
                host_pub = initramfs.make_host_key(key_file)
                overlay = initramfs.vm_overlay(key_file, client_pub, name)
                kind_args = []
            initrd.write_bytes(base_bytes + overlay)
            enforce = config.sig_enforce or name in config.sig_enforce_vms
            append = " ".join([base_append(arch), f"kpipe.lab={name}", *kind_args,
                               *(["module.sig_enforce=1"] if enforce else []), *extra_args])
            spec = VmSpec(name, image, initrd, vmmod.free_port(), folder, memory, append,
                          gconfig.use_kvm, arch, disk)
            specs.append((spec, enforce, host_pub))
        return specs

    def _restart_port_clashes(self, st: LabState, specs: list[tuple[VmSpec, bool, str]], tries: int = 3) -> None:
        """Restart a VM whose forwarded port was taken between free_port() and qemu's bind."""
        for _ in range(tries):
            # qemu binds its forward before the guest runs, but a loaded machine can take many seconds to
            # get there; the wait ends as soon as every VM listens or has exited.
            deadline = time.monotonic() + 60.0
            clashed: list[int] = []
            pending = set(range(len(st.vms)))
            while pending and time.monotonic() < deadline:
                for i in sorted(pending):
                    v = st.vms[i]
                    if vmmod.listens_on(v.pid, v.ssh_port):
                        pending.discard(i)  # qemu holds its forward
                    elif not vmmod.alive(v):
                        pending.discard(i)
                        if "host forwarding" in _tail(Path(v.folder) / "qemu.log", 20):
                            clashed.append(i)
                time.sleep(0.05)
            if not clashed:
                return
            for i in clashed:
                spec, enforce, host_pub = specs[i]
                spec.ssh_port = vmmod.free_port()
                st.vms[i] = vmmod.start(spec, sig_enforce=enforce, host_key=host_pub)
                self._save(st)

    def _write_access_files(self, st: LabState) -> None:
        lines = [f"[127.0.0.1]:{v.ssh_port} {v.host_key}\n" for v in st.vms]
        self.known_hosts_file.write_text("".join(lines))
        self.inventory_file.write_text(render_inventory(st))

    def targets(self, st: LabState | None = None) -> list[Host]:
        """The recorded VMs as hosts (strict host keys from the lab's known_hosts)."""
        st = st or self.require_state()
        return [Host(v.name, "127.0.0.1", v.ssh_port, "root", st.identity_file, known_hosts=st.known_hosts,
                     connect_timeout=10.0) for v in st.vms]

    def pool(self, st: LabState | None = None) -> SshPool:
        """An SshPool that trusts exactly the lab's known_hosts."""
        from kpipe.settings import SshSettings
        from kpipe.transport.ssh import SshPool

        st = st or self.require_state()
        settings = SshSettings(known_hosts=st.known_hosts, identity_file=st.identity_file, ssh_config="/dev/null",
                               connect_timeout=10.0, command_timeout=120.0)
        return SshPool(settings, known_hosts=[Path(st.known_hosts)], accept_new=False)

    def wait_ready(self, st: LabState, timeout: float, say: Progress) -> None:
        """Poll every VM over SSH (strict host keys) until `true` runs; raise with the console tail."""
        import logging

        from kpipe.commands import Command
        from kpipe.errors import TransportError

        # paramiko logs every refused banner of a booting guest as an ERROR with a traceback
        logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)
        deadline = time.monotonic() + timeout
        errors: dict[str, str] = {}
        pool = self.pool(st)
        say(f"ssh: waiting for {len(st.vms)} VM{'' if len(st.vms) == 1 else 's'} to answer (at most {timeout:g} s)")

        def one(v: VmProcess, target: Host) -> None:
            last = "no answer yet"
            console = Path(v.folder) / "console.log"
            ready_at: float | None = None
            v_start = time.monotonic() - max(0.0, time.time() - v.started_at)
            while time.monotonic() < deadline:
                if not vmmod.alive(v):
                    errors[v.name] = f"qemu exited: {_tail(Path(v.folder) / 'qemu.log')} " \
                                     f"console: {_tail(console)}"
                    return
                # qemu's port forward accepts before the guest listens: SSH only after /init says READY
                if not _console_ready(console):
                    time.sleep(0.2)
                    continue
                if ready_at is None:
                    ready_at = time.monotonic()
                t = pool.transport(target)
                try:
                    r = t.run(Command.of("true", timeout=30))
                    if r.ok:
                        now = time.monotonic()
                        say(f"ssh: {v.name} answers on 127.0.0.1:{v.ssh_port} ({now - v_start:.1f} s after start; "
                            f"guest ready {ready_at - v_start:.1f} s, SSH {now - ready_at:.1f} s)")
                        return
                    last = r.summary()
                except TransportError as e:
                    last = str(e)
                    if e.kind == "hostkey":
                        errors[v.name] = last
                        return
                time.sleep(0.5)
            errors[v.name] = f"no SSH after {timeout:g} s ({last}); console: {_tail(Path(v.folder) / 'console.log')}"

        try:
            threads = [threading.Thread(target=one, args=(v, tg), daemon=True)
                       for v, tg in zip(st.vms, self.targets(st), strict=True)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        finally:
            pool.close()
        if errors:
            name, why = sorted(errors.items())[0]
            raise KpipeError(f"lab VM {name} did not come up: {why}",
                             hint=f"see {Path(st.folder) / 'vms' / name / 'console.log'}")

    # ------------------------------------------------------------------ reboot

    def reboot(self, name: str, timeout: float = 480.0, progress: Progress | None = None) -> VmProcess:
        """Reboot one VM and wait until it answers SSH again (same port, host key and disk); its new record.

        A `--rootfs` VM is asked to `systemctl reboot` (a clean shutdown flushes its disk); qemu runs with
        -no-reboot, so the guest's reset ends the process and kpipe starts the recorded command line again and
        records the new PID. The busybox guest keeps nothing on disk: it is reset (stopped and started).
        """
        say = progress or (lambda _m: None)
        st = self.require_state()
        v = st.vm(name)
        if not vmmod.alive(v):
            raise ConfigError(f"lab VM {name} is not running", hint="run `kpipe lab down` and `kpipe lab up`")
        if st.extra.get("rootfs"):
            say(f"{name}: systemctl reboot")
            self._ask_reboot(st, v)
            deadline = time.monotonic() + REBOOT_SHUTDOWN_TIMEOUT
            while vmmod.alive(v) and time.monotonic() < deadline:
                time.sleep(0.2)
            if vmmod.alive(v):
                say(f"{name}: no clean shutdown within {REBOOT_SHUTDOWN_TIMEOUT:g} s; resetting it")
                vmmod.stop(v)
        else:
            say(f"{name}: reset (the busybox guest keeps no state)")
            vmmod.stop(v)
        vmmod.stop(v)  # reaps the exited qemu (no zombie keeps its PID alive)
        new = vmmod.restart(v)
        st.vms = [new if x.name == name else x for x in st.vms]
        self._save(st)  # recorded at once, so `down` stops the new process whatever happens next
        t0 = time.monotonic()
        self.wait_ready(LabState(st.folder, st.kernel, [new], st.identity_file, st.known_hosts, st.inventory,
                                 st.created_at, st.ready_seconds, st.extra), timeout, say)
        say(f"{name} rebooted in {time.monotonic() - t0:.1f} s (pid {new.pid})")
        return new

    def _ask_reboot(self, st: LabState, v: VmProcess) -> None:
        from kpipe.commands import Command
        from kpipe.errors import TransportError

        target = next(t for t in self.targets(st) if t.name == v.name)
        pool = self.pool(st)
        try:
            # --no-block: the reply comes back before sshd is stopped, so the command itself succeeds
            r = pool.transport(target).run(Command.of("systemctl", "--no-block", "reboot", timeout=30))
            if not r.ok:
                raise KpipeError(f"lab VM {v.name}: systemctl reboot failed: {r.summary()}",
                                 hint=f"see {Path(v.folder) / 'console.log'}")
        except TransportError:
            pass  # the connection may drop while the guest goes down: the wait below decides
        finally:
            pool.close()

    # ------------------------------------------------------------------ status / down

    def require_state(self) -> LabState:
        st = self.load_state()
        if st is None:
            raise ConfigError(f"no lab is running (no {self.state_file})", hint="run `kpipe lab up`")
        return st

    def status(self) -> dict[str, Any]:
        """The recorded lab with each VM's liveness and RSS (no SSH)."""
        st = self.load_state()
        if st is None:
            return {"running": False, "folder": str(self.folder), "vms": []}
        rows = []
        for v in st.vms:
            vm_state = vmmod.vm_state(v)
            up = vm_state == vmmod.VmState.RUNNING
            rows.append({"name": v.name, "state": vm_state, "alive": up, "pid": v.pid, "ssh": f"127.0.0.1:{v.ssh_port}",
                         "port": v.ssh_port, "sig_enforce": v.sig_enforce, "append": v.append,
                         "rss_mib": round(vmmod.rss_kib(v.pid) / 1024, 1) if up else 0.0,
                         "console": str(Path(v.folder) / "console.log")})
        return {"running": any(r["alive"] for r in rows), "folder": str(self.folder), "kernel": st.kernel,
                "inventory": st.inventory, "known_hosts": st.known_hosts, "identity_file": st.identity_file,
                "ready_seconds": round(st.ready_seconds, 1), "rootfs": st.extra.get("rootfs", "busybox"), "vms": rows}

    def down(self) -> list[str]:
        """Stop exactly the recorded qemu processes and remove the state; the names stopped."""
        st = self.load_state()
        if st is None:
            return []
        stopped = self._stop_all(st)
        self._cleanup_files()
        return stopped

    def down_preflights(self) -> list[str]:
        """Stop VMs that `kpipe preflight --keep` left under <folder>/preflight/; their folders are removed."""
        import shutil

        stopped = []
        for sub in sorted((self.folder / "preflight").glob("*/state.json")):
            lab = Lab(sub.parent, cache_dir=self.cache_dir, prefix="preflight")
            stopped += [f"{sub.parent.name}/{n}" for n in lab.down()]
            shutil.rmtree(sub.parent, ignore_errors=True)
        return stopped

    def _stop_all(self, st: LabState) -> list[str]:
        stopped = []
        for v in st.vms:
            if vmmod.stop(v):
                stopped.append(v.name)
        return stopped

    def _cleanup_files(self) -> None:
        for f in (self.state_file, self.inventory_file, self.known_hosts_file):
            try:
                f.unlink()
            except FileNotFoundError:
                pass

    def ssh_argv(self, name: str, command: list[str] | None = None) -> list[str]:
        """An OpenSSH command line into a VM with strict host key checking (argv kept as argv)."""
        from kpipe.commands import Command

        st = self.require_state()
        v = st.vm(name)
        argv = ["ssh", "-i", st.identity_file, "-p", str(v.ssh_port), "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={st.known_hosts}", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
                "root@127.0.0.1"]
        if command:
            argv += ["--", Command.of(*command).shell_line()]
        return argv


def render_inventory(st: LabState) -> str:
    """The Ansible YAML inventory of the lab: group `lab`, strict host keys through kpipe_known_hosts."""
    import yaml

    ssh_args = f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={st.known_hosts} -o IdentitiesOnly=yes"
    hosts = {v.name: {"ansible_host": "127.0.0.1", "ansible_port": v.ssh_port, "ansible_user": "root",
                      "ansible_ssh_private_key_file": st.identity_file, "kpipe_known_hosts": st.known_hosts,
                      "ansible_ssh_common_args": ssh_args, "kpipe_lab_sig_enforce": v.sig_enforce}
             for v in st.vms}
    lab: dict[str, Any] = {"hosts": hosts}
    groups = st.extra.get("groups") or []
    if groups:  # a mixed lab: one child group per arch (lab_x86_64, lab_aarch64) under `lab`
        by_arch: dict[str, dict[str, None]] = {}
        for g in groups:
            for name in g.get("vms", []):
                by_arch.setdefault(f"lab_{g['arch']}", {})[name] = None
                hosts[name]["kpipe_lab_arch"] = g["arch"]
        lab["children"] = {k: {"hosts": v} for k, v in by_arch.items()}
    doc = {"all": {"children": {"lab": lab}}}
    return "# written by `kpipe lab up`; removed by `kpipe lab down`\n" + yaml.safe_dump(doc, sort_keys=False)


def _console_ready(console: Path) -> bool:
    try:
        with open(console, "rb") as f:
            return initramfs.READY_LINE.encode() in f.read()
    except OSError:
        return False


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(ln.strip() for ln in text[-lines:])


def workspace_lab(workspace: Workspace) -> Lab:
    """The workspace's lab (<root>/.lab), with the cache from [lab] cache_dir if set."""
    cache = workspace.settings.lab.cache_dir
    return Lab(Path(workspace.root) / ".lab", cache_dir=workspace.path(cache) if cache else None)
