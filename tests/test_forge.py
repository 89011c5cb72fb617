"""kpipe lab forge and the chroot build host, real: Debian's linux-source built in a trixie chroot.

The forged kernel and the chroot are built at test time on a fresh machine and
cached across runs (tests/forge_support.py). Marked `forge`; the VM boot test
is also marked `vm`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forge_support import (  # noqa: F401  (fixtures)
    FORGE_SOURCE,
    TIMINGS,
    forge_buildhost,
    forged,
    workspace_with_buildhost,
)
from kpipe.errors import ExitCode
from kpipe.lab.forge import ForgedKernel, forge, localversion, parse_config, parse_source

pytestmark = [pytest.mark.forge, pytest.mark.timeout(3600)]


def kp(ws: Path, *args: str, ok: tuple[int, ...] = (0,), timeout: float = 900) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=ws, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode in ok, f"kpipe {' '.join(args)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _der(pem: bytes) -> bytes:
    import base64

    body = pem.split(b"-----BEGIN CERTIFICATE-----")[1].split(b"-----END CERTIFICATE-----")[0]
    return base64.b64decode(b"".join(body.split()))


def test_forged_kernel_is_live_patchable_and_trusts_the_lab_certificate(forged: ForgedKernel):
    from kpipe.lab.kernel import has_pvh_entry

    assert forged.release.endswith(localversion(forged.key))
    for path in (forged.vmlinux, forged.bzimage, forged.config, forged.tree / "Makefile", forged.modules_dir):
        assert path.exists(), path
    cfg = parse_config(forged.config.read_text())
    for name in ("LIVEPATCH", "KALLSYMS_ALL", "DYNAMIC_FTRACE", "UNWINDER_ORC", "PVH", "VIRTIO_NET", "MODULE_SIG",
                 "MODULE_UNLOAD", "DEBUG_INFO"):
        assert cfg.get(f"CONFIG_{name}") == "y", name
    assert cfg["CONFIG_SYSTEM_TRUSTED_KEYS"] == '"certs/kpipe-lab-cert.pem"'
    vmlinux = forged.vmlinux.read_bytes()
    assert has_pvh_entry(vmlinux)
    assert _der(forged.cert.read_bytes()) in vmlinux  # the certificate is built into the system keyring
    assert forged.release.encode() in vmlinux
    record = json.loads((forged.folder / "forge.json").read_text())
    assert record["package_version"] == forged.package_version and record["gcc"].startswith("gcc")


def test_forging_again_with_the_same_inputs_is_a_cache_hit(forged: ForgedKernel):
    before = (forged.folder / "forge.json").stat().st_mtime_ns
    t = time.monotonic()
    again = forge(parse_source(FORGE_SOURCE))
    TIMINGS["forge_warm"] = time.monotonic() - t
    assert again.folder == forged.folder and again.release == forged.release
    assert (forged.folder / "forge.json").stat().st_mtime_ns == before


def test_cli_forge_prints_the_cached_kernel(forged: ForgedKernel, tmp_path):
    (tmp_path / "kpipe.toml").write_text("[workspace]\n")
    out = json.loads(kp(tmp_path, "lab", "forge", "--source", FORGE_SOURCE, "--json").stdout)
    assert out["release"] == forged.release and out["vmlinux"] == str(forged.vmlinux)


def test_forged_kernel_joins_the_kernel_catalog(forged: ForgedKernel, tmp_path):
    (tmp_path / "kpipe.toml").write_text("[workspace]\n")
    rows = {r["release"]: r for r in json.loads(kp(tmp_path, "kernels", "list", "--json").stdout)}
    row = rows[forged.release]
    assert row["arch"] == "x86_64" and row["builder"] == "kpatch-build"
    for key, path in (("source", forged.tree), ("vmlinux", forged.vmlinux), ("config", forged.config)):
        assert row["paths"][key] == {"path": str(path), "present_here": True}


def test_a_bad_fragment_fails_before_any_build(tmp_path):
    (tmp_path / "kpipe.toml").write_text("[workspace]\n")
    (tmp_path / "frag.config").write_text("CONFIG_LIVEPATCH=y\nLIVEPATCH=y\n")
    r = kp(tmp_path, "lab", "forge", "--source", FORGE_SOURCE, "--config-fragment", "frag.config",
           ok=(int(ExitCode.CONFIG),))
    assert "frag.config:2: not a config line" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr


def test_kpipe_reaches_the_chroot_build_host_over_ssh_with_strict_host_keys(forge_buildhost, tmp_path):
    from kpipe.builder.runner import Connections, probe_host
    from kpipe.errors import TransportError
    from kpipe.workspace import load_workspace

    ws = load_workspace(workspace_with_buildhost(tmp_path / "ws", forge_buildhost))
    host = ws.build_host("forge-trixie")
    conns = Connections(ws)
    try:
        probe = probe_host(conns.transport(host), host, "kpatch-build")
    finally:
        conns.close()
    assert probe.workdir == "/root/kpipe-builds"
    assert "0.9" in probe.version  # trixie's kpatch-build (its --version still says 0.9.9 in 0.9.10)
    # the same host with a known_hosts that does not hold its key is refused, not trusted on first use
    other = tmp_path / "other_known_hosts"
    other.write_text(f"[127.0.0.1]:{forge_buildhost['port']} ssh-ed25519 "
                     "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")
    text = (tmp_path / "ws" / "kpipe.toml").read_text().replace(forge_buildhost["known_hosts"], str(other))
    (tmp_path / "ws" / "kpipe.toml").write_text(text)
    ws2 = load_workspace(tmp_path / "ws")
    conns = Connections(ws2)
    try:
        with pytest.raises(TransportError):
            probe_host(conns.transport(ws2.build_host("forge-trixie")), host, "kpatch-build")
    finally:
        conns.close()


def test_the_build_host_sees_the_forged_tree_at_the_same_path(forge_buildhost, forged: ForgedKernel):
    r = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                        "-o", f"UserKnownHostsFile={forge_buildhost['known_hosts']}", "-i",
                        forge_buildhost["identity_file"], "-p", str(forge_buildhost["port"]), "root@127.0.0.1",
                        "cat /etc/os-release; gcc --version; ls " + str(forged.vmlinux)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "trixie" in r.stdout and str(forged.vmlinux) in r.stdout
    record = json.loads((forged.folder / "forge.json").read_text())
    assert record["gcc"] in r.stdout  # kpatch-build there uses the gcc that built the kernel
    # the chroot's mounts live only in sshd's namespace: the host's table never shows them
    assert forge_buildhost["root"] not in Path("/proc/self/mountinfo").read_text()


@pytest.mark.vm
def test_lab_boots_the_forged_kernel_by_release(forged: ForgedKernel, tmp_path):
    (tmp_path / "kpipe.toml").write_text("[workspace]\n")
    try:
        kp(tmp_path, "lab", "up", "--kernel", forged.release, "--sig-enforce", "--timeout", "600", timeout=900)
        out = kp(tmp_path, "lab", "ssh", "lab1", "--", "sh", "-c",
                 "uname -r; cat /proc/cmdline; ls /sys/kernel/livepatch >/dev/null && echo livepatch-ok",
                 timeout=120).stdout
        lines = out.split()
        assert lines[0] == forged.release
        assert "module.sig_enforce=1" in out and "livepatch-ok" in out
    finally:
        kp(tmp_path, "lab", "down")


def test_cli_buildhost_up_and_down_by_pid(tmp_path):
    from forge_support import need_forge_tools

    need_forge_tools()
    (tmp_path / "kpipe.toml").write_text("[workspace]\n")
    folder = tmp_path / "bh"
    state = json.loads(kp(tmp_path, "lab", "buildhost", "up", "--folder", str(folder), "--json").stdout)
    pid = int(state["pid"])
    try:
        assert f"-f {folder}/sshd_config" in Path(f"/proc/{pid}/cmdline").read_bytes().decode().replace("\0", " ")
        assert Path(state["known_hosts"]).read_text().startswith(f"[127.0.0.1]:{state['port']} ssh-ed25519 ")
        r = kp(tmp_path, "lab", "buildhost", "up", "--folder", str(folder), ok=(int(ExitCode.CONFIG),))
        assert "already running" in r.stderr
    finally:
        out = kp(tmp_path, "lab", "buildhost", "down", "--folder", str(folder)).stdout
    assert str(pid) in out
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1]
    assert "no build host was running" in kp(tmp_path, "lab", "buildhost", "down", "--folder", str(folder)).stdout
