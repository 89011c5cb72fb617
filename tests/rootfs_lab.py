"""A workspace with one `kpipe lab up --rootfs KIND` VM (lab1) and the cmdline demo artifact.

Shared by tests/test_lab_rootfs.py and tests/test_persist_vm.py through the session fixtures in
conftest.py, so a test session builds each image once and boots each lab once.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kenv
from test_rollout_vm import MODULE, TEXT, build_module, kp


def rootfs_lab(tmp_path_factory: pytest.TempPathFactory, kernel_env: Any, kind: str) -> Iterator[dict[str, Any]]:
    """Boot lab1 with `--rootfs kind` on the headers' kernel; yield ws, artifact id, release; lab down at the end."""
    kenv.require_tool("qemu-system-x86_64")
    kenv.require_tool("mmdebstrap")
    kenv.require_tool("qemu-img")
    release = kernel_env.release
    ws = tmp_path_factory.mktemp(f"lab-{kind}")
    (ws / "kpipe.toml").write_text('[workspace]\nstore = ".kpipe"\n')
    shutil.copytree(Path(__file__).resolve().parent.parent / "recipes", ws / "recipes")  # the probe's recipe
    ko = build_module(ws, kernel_env.headers)
    from kpipe.artifacts import add_artifact
    from kpipe.store import Store

    store = Store(ws / ".kpipe")
    art = add_artifact(store, ko, kernel=release, status="valid", recipe="cmdline-demo", arch="x86_64",
                       module_name=MODULE)
    store.close()
    try:
        up = kp(ws, "lab", "up", "--kernel", release, "--rootfs", kind, "--timeout", "1500", timeout=4800)
        yield {"ws": ws, "artifact": art.id, "release": release, "up": up.stdout + up.stderr}
    finally:
        subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws), "lab", "down"], capture_output=True,
                       timeout=300)
        shutil.rmtree(ws / ".lab" / "vms", ignore_errors=True)  # the qcow2 overlays


__all__ = ["MODULE", "TEXT", "kp", "rootfs_lab"]
