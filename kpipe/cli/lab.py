"""kpipe lab (disposable VMs of a target kernel) and kpipe preflight."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from kpipe.cli import complete
from kpipe.cli.params import WORD
from kpipe.cli.progress import NO_PROGRESS_HELP

if TYPE_CHECKING:  # imported inside the commands: `kpipe --help` stays fast
    from kpipe.lab.buildhost import BuildHostChroot
    from kpipe.lab.lab import Lab

lab_app = typer.Typer(help="Disposable qemu VMs of a target kernel, reachable over SSH.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this group's commands to the root app."""
    app.add_typer(lab_app, name="lab")
    app.command("preflight", help="Boot the artifact's kernel in a VM (or reuse a lab VM with --vm), load, verify, "
                                  "probe, unload, verify removal.")(
        preflight_cmd)


def _lab() -> Lab:
    from kpipe.cli.context import state
    from kpipe.lab import workspace_lab

    return workspace_lab(state().workspace)


@lab_app.command("up")
def up_cmd(
    kernel: str | None = typer.Option(
        None, "--kernel", autocompletion=complete.kernels, metavar="RELEASE",
        help="Debian kernel release (5.10.0-32-amd64), a prefix to discover the newest (5.10), "
        "debian:SUITE\\[/RELEASE|PREFIX], or `debian` for the host's current one."),
    kernel_image: Path | None = typer.Option(None, "--kernel-image", metavar="FILE", help="A vmlinuz of your own."),
    modules: Path | None = typer.Option(None, "--modules", metavar="DIR", help="Its /lib/modules/<release> folder."),
    vms: int | None = typer.Option(None, "--vms", metavar="N", min=1, max=16,
                                   help="How many VMs (\\[lab] vms, default 1)."),
    memory: int | None = typer.Option(None, "--memory", metavar="MIB", min=96,
                                         help="Guest memory in MiB (\\[lab] memory, default 256)."),
    sig_enforce: bool = typer.Option(False, "--sig-enforce", help="module.sig_enforce=1 on every VM."),
    sig_enforce_vms: list[str] | None = typer.Option(
        None, "--sig-enforce-vms", autocompletion=complete.lab_vms, metavar="VM",
        help="module.sig_enforce=1 on these VMs only (repeat or comma-separate)."),
    append: str = typer.Option("", "--append", metavar="ARGS", help="Extra kernel arguments (after \\[lab] append)."),
    timeout: float = typer.Option(480.0, "--timeout", metavar="SECONDS",
                                  help="Seconds until every VM must answer SSH."),
    no_progress: bool = typer.Option(False, "--no-progress", help=NO_PROGRESS_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the lab as JSON."),
    rootfs: str = typer.Option("busybox", "--rootfs", metavar="KIND",
                               help="Guest userland: busybox (initramfs, fast), debian (systemd, OpenSSH, Python 3 "
                               "on a cached disk image) or debian-selinux (the same, SELinux permissive)."),
    arch: str = typer.Option("", "--arch", metavar="ARCH",
                             help="Guest architecture: x86_64 or aarch64 (default: the kernel image's own)."),
    group: list[str] | None = typer.Option(
        None, "--group", metavar="RELEASE",
        help="RELEASE or RELEASE:N: N more VMs (default 1) of another kernel, e.g. a forged aarch64 release; "
        "repeatable. Each group boots on its kernel's own arch; one inventory (child groups lab_<arch>)."),
) -> None:
    """Boot N VMs and write .lab/inventory.yml and .lab/known_hosts."""
    from kpipe.cli.context import esc, print_json, state
    from kpipe.cli.progress import StageProgress, live_wanted
    from kpipe.lab import LabConfig, resolve_kernel

    st = state()
    lab = _lab()
    enforce_vms = tuple(n.strip() for v in (sig_enforce_vms or []) for n in v.split(",") if n.strip())
    section = st.workspace.settings.lab
    cfg = LabConfig(vms=vms or section.vms, memory_mb=memory or section.memory,
                    sig_enforce=sig_enforce, sig_enforce_vms=enforce_vms,
                    append=" ".join(a for a in (section.append, append) if a), boot_timeout=timeout,
                    rootfs="" if rootfs == "busybox" else rootfs, arch=arch)
    groups = [parse_group(g) for g in group or []]
    with StageProgress("lab", live=live_wanted(no_progress), json_out=json_out) as progress:
        progress.say("kernel: " + (f"{kernel_image} (your own)" if kernel_image else
                                   f"resolving {kernel or 'debian'} (downloaded once, then cached)"))
        image = resolve_kernel(kernel, kernel_image, modules, lab.cache_dir, arch=arch)
        progress.say(f"kernel: {image.release} ready ({image.source})")
        more = []
        for release, n in groups:
            gimage = resolve_kernel(release, None, None, lab.cache_dir)
            progress.say(f"kernel: {gimage.release} ready ({gimage.source}), {n} VM{'' if n == 1 else 's'}")
            more.append((gimage, LabConfig(vms=n, memory_mb=cfg.memory_mb)))
        lab.up(image, cfg, progress.say, more=more)
    status = lab.status()
    if json_out:
        print_json(status)
        return
    _print_status(status)
    st.console.print(f"inventory: {esc(status['inventory'])}  (fleet group `lab`)")


def parse_group(text: str) -> tuple[str, int]:
    """`--group RELEASE[:N]` into (release, N); N from 1 to 16."""
    release, _, count = text.strip().partition(":")
    from kpipe.errors import ConfigError

    if not release:
        raise ConfigError(f"--group {text!r}: no kernel release", hint="e.g. --group 7.2.13-kforge-1a2b3c4d:2")
    if count and not (count.isdigit() and 1 <= int(count) <= 16):
        raise ConfigError(f"--group {text!r}: {count!r} is not a VM count from 1 to 16",
                          hint="e.g. --group 7.2.13-kforge-1a2b3c4d:2")
    return release, int(count) if count else 1


@lab_app.command("reboot")
def reboot_cmd(
    vm: str = typer.Argument(..., autocompletion=complete.lab_vms, metavar="VM", click_type=WORD,
                             help="The lab VM to reboot."),
    timeout: float = typer.Option(480.0, "--timeout", metavar="SECONDS", help="Seconds until it must answer SSH."),
) -> None:
    """Reboot one VM (systemctl reboot on a --rootfs VM, a reset for busybox) and wait for SSH."""
    from kpipe.cli.context import esc, state

    st = state()
    new = _lab().reboot(vm, timeout, lambda m: st.console.print(f"[dim]lab:[/] {esc(m)}"))
    st.console.print(f"{esc(new.name)} is up again: ssh 127.0.0.1:{new.ssh_port}, pid {new.pid}")


@lab_app.command("status")
def status_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show the lab's VMs: alive, SSH port, RSS."""
    from kpipe.cli.context import print_json

    status = _lab().status()
    if json_out:
        print_json(status)
        return
    _print_status(status)


def _print_status(status: dict[str, Any]) -> None:
    from rich.table import Table

    from kpipe.cli.context import esc, state
    from kpipe.lab.vm import VmState

    console = state().console
    if not status["vms"]:
        console.print("no lab is running")
        return
    t = Table(title=f"lab: {esc(status['kernel'].get('release', '?'))} ({esc(status['folder'])})")
    for col in ("vm", "state", "ssh", "pid", "rss MiB", "sig_enforce"):
        t.add_column(col, no_wrap=True)
    t.add_column("extra kernel args")
    for v in status["vms"]:
        extra = " ".join(a for a in v["append"].split() if a != "panic=-1" and not a.startswith("console=")
                         and not a.startswith("kpipe.lab="))
        vm_state = f"[green]{VmState.RUNNING}[/]" if v["alive"] else f"[red]{VmState.STOPPED}[/]"
        t.add_row(esc(v["name"]), vm_state, esc(v["ssh"]),
                  str(v["pid"]), f"{v['rss_mib']:.0f}", "yes" if v["sig_enforce"] else "no", esc(extra))
    console.print(t)
    if status.get("ready_seconds"):
        console.print(f"ready in {status['ready_seconds']:.1f} s")


@lab_app.command("ssh", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ssh_cmd(
    vm: str = typer.Argument(..., autocompletion=complete.lab_vms, metavar="VM", click_type=WORD,
                             help="VM name, e.g. lab1."),
    command: list[str] | None = typer.Argument(None, metavar="COMMAND...", click_type=WORD,
                                               help="Command to run (after --); argv kept as argv."),
) -> None:
    """Open a shell on a VM (or run COMMAND) with OpenSSH and strict host key checking."""
    import os
    import shutil

    from kpipe.errors import KpipeError

    argv = _lab().ssh_argv(vm, list(command or []))
    if shutil.which("ssh") is None:
        raise KpipeError("ssh (OpenSSH client) is not installed", hint="install openssh-client")
    os.execvp(argv[0], argv)


@lab_app.command("down")
def down_cmd(all_: bool = typer.Option(False, "--all", help="Also stop VMs kept by `kpipe preflight --keep`.")) -> None:
    """Stop exactly the lab's recorded qemu processes and remove its state."""
    from kpipe.cli.context import esc, state

    lab = _lab()
    stopped = lab.down()
    if all_:
        stopped += lab.down_preflights()
    state().console.print(f"stopped: {esc(', '.join(stopped))}" if stopped else "no lab VM was running")


@lab_app.command("forge")
def forge_cmd(
    source: str = typer.Option(..., "--source", metavar="SOURCE",
                               help="debian:<suite>/<version>, e.g. debian:trixie/6.12."),
    config_fragment: Path | None = typer.Option(None, "--config-fragment", metavar="FILE",
                                                   help="Config fragment merged over tinyconfig (default: the lab's)."),
    cert: Path | None = typer.Option(None, "--cert", metavar="FILE",
                                     help="PEM certificate the kernel trusts (default: the forge's lab key)."),
    jobs: int | None = typer.Option(None, "--jobs", "-j", metavar="N", min=1, help="make -j (default: nproc)."),
    mirror: str | None = typer.Option(None, "--mirror", metavar="URL", help="Debian mirror for the chroot."),
    arch: str = typer.Option("x86_64", "--arch", metavar="ARCH",
                             help="Build for x86_64 or aarch64 (cross-compiled with the suite's gcc)."),
    json_out: bool = typer.Option(False, "--json", help="Print the forged kernel as JSON."),
) -> None:
    """Build (once, cached) a small bootable, live-patchable kernel from a Debian source package."""
    from kpipe.cli.context import print_json, state
    from kpipe.lab.forge import DEFAULT_MIRROR, forge, parse_source

    st = state()
    out = st.err_console if json_out else st.console
    k = forge(parse_source(source), arch=arch, fragment=config_fragment, cert=cert, jobs=jobs,
              mirror=mirror or DEFAULT_MIRROR, progress=lambda m: out.print(f"[dim]forge:[/] {escape(m)}"))
    if json_out:
        print_json(k.to_dict())
        return
    st.console.print(f"forged kernel: [bold]{escape(k.release)}[/] ({escape(k.source)}, {escape(k.package_version)})")
    for label, path in (("source tree", k.tree), ("config", k.config), ("vmlinux", k.vmlinux),
                        ("boot image", k.boot_image), ("modules", k.modules_dir), ("trusted cert", k.cert)):
        st.console.print(f"  {label:13} {escape(str(path))}")
    st.console.print(f"boot it: kpipe lab up --kernel {escape(k.release)}")


buildhost_app = typer.Typer(help="A kpatch-build build host: the forge's chroot running its own sshd on loopback.",
                            no_args_is_help=True)
lab_app.add_typer(buildhost_app, name="buildhost")


def _buildhost(folder: Path | None) -> BuildHostChroot:
    from kpipe.cli.context import state
    from kpipe.lab.buildhost import BuildHostChroot

    return BuildHostChroot(folder or state().workspace.root / ".lab" / "buildhost")


@buildhost_app.command("up")
def buildhost_up_cmd(
    suite: str = typer.Option("trixie", "--suite", metavar="SUITE",
                              help="Debian suite of the chroot (must ship kpatch-build)."),
    version: str = typer.Option("6.12", "--version", metavar="VERSION",
                                help="linux-source-<version> in the chroot (the forge's)."),
    headers: str | None = typer.Option(
        None, "--headers", metavar="RELEASE",
        help="A kbuild host instead: the suite's linux-headers of this release or prefix "
        "(e.g. 5.10 on bullseye: the newest 5.10 ABI), no kernel source, no kpatch-build."),
    port: int | None = typer.Option(None, "--port", metavar="PORT", min=1, max=65535,
                                    help="Loopback port (default: a free one)."),
    folder: Path | None = typer.Option(None, "--folder", metavar="DIR",
                                       help="State folder (default: <workspace>/.lab/buildhost)."),
    json_out: bool = typer.Option(False, "--json", help="Print the state as JSON."),
) -> None:
    """Start the chroot's sshd; print the [[build_hosts]] entry and the known_hosts file to use."""
    from kpipe.cli.context import print_json, state
    from kpipe.lab.buildhost import build_host_toml

    st = state()
    out = st.err_console if json_out else st.console
    bh = _buildhost(folder)
    say = lambda m: out.print(f"[dim]buildhost:[/] {escape(m)}")  # noqa: E731
    if headers:
        from kpipe.lab.buildhost import KBUILD_HOST_PATHS, kbuild_host_packages, kbuild_kernel_toml
        from kpipe.lab.kernel import resolve_release

        release, _ = resolve_release(f"debian:{suite}/{headers}")
        info = bh.up(suite, port=port, progress=say, packages=kbuild_host_packages(suite, release), forced=(),
                     host_paths=KBUILD_HOST_PATHS)
        name, kernels = f"kbuild-{suite}", (release,)
        info["kernel_toml"] = kbuild_kernel_toml(release, Path(info["root"]))
    else:
        info = bh.up(suite, version=version, port=port, progress=say)
        name, kernels = f"forge-{suite}", ("*-kforge-*",)
    if json_out:
        print_json(info)
        return
    st.console.print(f"build host: root@127.0.0.1:{info['port']} (sshd PID {info['pid']})")
    st.console.print(escape(f"add to kpipe.toml, and set [ssh] known_hosts = \"{info['known_hosts']}\" "
                            "(strict host keys):"), highlight=False)
    st.console.print(escape(build_host_toml(name, info["port"], bh.identity_file, kernels)), highlight=False)
    if "kernel_toml" in info:
        st.console.print(escape(info["kernel_toml"]), highlight=False)


@buildhost_app.command("down")
def buildhost_down_cmd(
    folder: Path | None = typer.Option(None, "--folder", metavar="DIR",
                                       help="State folder (default: <workspace>/.lab/buildhost)."),
) -> None:
    """Stop exactly the recorded sshd (and the processes left in its mount namespace)."""
    from kpipe.cli.context import state

    stopped = _buildhost(folder).down()
    state().console.print(f"stopped PIDs: {', '.join(map(str, stopped))}" if stopped else "no build host was running")


def preflight_cmd(
    artifact_id: str = typer.Argument(..., autocompletion=complete.artifacts, metavar="ID", click_type=WORD,
                                      help="Artifact id (or unique prefix)."),
    keep: bool = typer.Option(False, "--keep",
                              help="Leave the VM running after the check (`kpipe lab down --all` stops it)."),
    sig_enforce: bool = typer.Option(False, "--sig-enforce", help="Boot the VM with module.sig_enforce=1 "
                                     "(with --vm: require that the lab VM enforces signatures)."),
    vm: str | None = typer.Option(None, "--vm", metavar="VM", autocompletion=complete.lab_vms,
                                  help="Reuse this running lab VM (`kpipe lab up`, e.g. lab1) instead of booting "
                                       "one; it must run the artifact's kernel and is left running and clean."),
    timeout: float = typer.Option(480.0, "--timeout", metavar="SECONDS", help="Seconds the VM may take to answer SSH."),
    no_progress: bool = typer.Option(False, "--no-progress", help=NO_PROGRESS_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Gate before the first canary: exit 9 with the kernel's own reason on failure."""
    from kpipe.cli.context import esc, print_json, state
    from kpipe.cli.progress import StageProgress, live_wanted
    from kpipe.errors import PreflightFailed
    from kpipe.preflight import run_preflight

    st = state()
    with StageProgress("preflight", live=live_wanted(no_progress), json_out=json_out) as progress:
        result = run_preflight(st.workspace, artifact_id, keep=keep, sig_enforce=sig_enforce, boot_timeout=timeout,
                               progress=progress.say, vm=vm)
    if json_out:
        print_json(result)
    else:
        colour = "green" if result["status"] == "passed" else "red"
        where = f" (lab VM {esc(result['vm'])})" if result.get("vm") else ""
        st.console.print(f"preflight {esc(result['artifact'])} on {esc(result['kernel'])}{where}: "
                         f"[{colour}]{esc(result['status'])}[/] in {result['duration_s']:.1f} s")
        for p in result["problems"]:
            st.console.print(f"  - {esc(p)}")
        for n in result.get("notes", []):
            if "forged kernel" in n and n not in result["problems"]:  # the sig_enforce line, said once
                st.console.print(f"  note: {esc(n)}")
        if result.get("kept"):
            kept = result["kept"]
            st.console.print(f"VM kept at {esc(kept['ssh'])} (key and known_hosts in {esc(kept['folder'])}); "
                             "stop it with `kpipe lab down --all`")
    if result["status"] != "passed":
        first = result["problems"][0] if result["problems"] else "unknown failure"
        raise PreflightFailed(f"preflight of {result['artifact']} failed: {first}",
                              hint="the kernel's own lines are in `kpipe artifacts show` (preflight)")
