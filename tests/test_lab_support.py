"""Shared fixtures of the real-kernel tests: one lab for the session, the demo livepatch module.

Imported by tests/test_lab.py, tests/test_livepatch_ops.py and tests/test_preflight.py.
Every VM is stopped in a finalizer (also when a test fails), and at the end of
the session no qemu process this session started may remain.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kpipe.lab import Lab, LabState
from kpipe.lab import vm as vmmod

DATA = Path(__file__).parent / "data"
DEMO_SOURCE = DATA / "livepatch_demo"
DEMO_TEXT = "kpipe livepatch demo"


def headers_release() -> str:
    """The release of the installed linux-headers-amd64 (the lab boots the same kernel)."""
    from kpipe.lab.kernel import discover_debian_release

    return discover_debian_release()


def kpipe_cli(workspace: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real `kpipe` console script in a workspace."""
    env = dict(os.environ, KPIPE_WORKSPACE=str(workspace), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "kpipe", *args], cwd=workspace, env=env, capture_output=True,
                          text=True, timeout=timeout)


def build_demo_module(dest: Path, release: str, *, text: str = DEMO_TEXT) -> Path:
    """Build tests/data/livepatch_demo against the installed headers (like lab.md); return the .ko."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(DEMO_SOURCE, dest)
    headers = Path(f"/usr/src/linux-headers-{release}")
    if not headers.is_dir():
        pytest.skip(f"no kernel headers at {headers}")
    r = subprocess.run(["make", "-s", "-C", str(headers), f"M={dest}",
                        f"KPIPE_CFLAGS=-DKPIPE_TEXT='\"{text}\"'", "modules"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return dest / "livepatch_demo.ko"


def altered_vermagic(module: Path, dest: Path) -> Path:
    """A copy of module whose vermagic flags say PREEMPT instead of preempt (same length, .modinfo edited)."""
    data = module.read_bytes()
    i = data.find(b"vermagic=")
    assert i >= 0
    end = data.index(b"\0", i)
    magic = data[i:end]
    assert b" preempt " in magic, magic
    dest.write_bytes(data[:i] + magic.replace(b" preempt ", b" PREEMPT ") + data[end:])
    return dest


def qemu_alive(pid: int, start_time: int) -> bool:
    return vmmod.proc_start_time(pid) == start_time


@dataclass
class SharedLab:
    """The session's lab: lab1 plain, lab2 with module.sig_enforce=1 (booted with `kpipe lab up`)."""

    workspace: Path
    lab: Lab
    state: LabState


_SEEN: list[tuple[int, int]] = []  # (pid, start time) of every qemu the session's labs recorded


def remember(st: LabState | None) -> None:
    """Record a lab's PIDs for the end-of-session check."""
    if st is not None:
        _SEEN.extend((v.pid, v.start_time) for v in st.vms)


@pytest.fixture(scope="session")
def qemu_guard() -> Iterator[None]:
    """At the end of the session, no qemu started by this session is alive."""
    yield
    left = [(v.pid, v.name) for v in vmmod.STARTED if vmmod.alive(v)]
    left += [(pid, "recorded") for pid, st in _SEEN if qemu_alive(pid, st)]
    for v in vmmod.STARTED:  # never leave them behind, even when the assertion fails
        vmmod.stop(v)
    assert not left, f"qemu processes left running: {left}"


@pytest.fixture(scope="session")
def demo_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo livepatch built against the installed headers."""
    return build_demo_module(tmp_path_factory.mktemp("demo") / "src", headers_release())


@pytest.fixture(scope="session")
def shared_lab(tmp_path_factory: pytest.TempPathFactory, qemu_guard: None) -> Iterator[SharedLab]:
    """Two VMs of the current Debian kernel, booted once per session through the CLI."""
    ws = tmp_path_factory.mktemp("labws")
    (ws / "kpipe.toml").write_text("# lab test workspace\n")
    lab = Lab(ws / ".lab")
    try:
        r = kpipe_cli(ws, "lab", "up", "--vms", "2", "--sig-enforce-vms", "lab2", timeout=900)
        remember(lab.load_state())
        assert r.returncode == 0, f"kpipe lab up failed ({r.returncode}): {r.stderr}{r.stdout}"
        st = lab.require_state()
        yield SharedLab(ws, lab, st)
    finally:
        remember(lab.load_state())
        r = kpipe_cli(ws, "lab", "down", timeout=120)
        lab.down()  # idempotent fallback (PID + start time checked)
