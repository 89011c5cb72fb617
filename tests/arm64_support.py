"""Fixtures of the arm64 tests: the forged arm64 kernel, the cross build host, a workspace that builds for it.

The kernel is Debian sid's linux-source-7.2 cross-compiled for arm64 in a sid chroot with
gcc-aarch64-linux-gnu (`forge(..., arch="aarch64")`), built once and cached by its inputs like the x86_64
forge kernel (tests/forge_support.py). The build host is the same chroot's sshd on a loopback port; it
cross-builds kbuild modules (`cross_arches = ["aarch64"]`). Without root or mmdebstrap the tests skip, unless
KPIPE_REQUIRE_REAL=1 makes that a failure.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forge_support import ARM64_SOURCE, need_forge_tools, need_real
from kpipe.lab.buildhost import BuildHostChroot, build_host_toml, namespace_pids
from kpipe.lab.forge import ForgedKernel, ensure_lab_key, forge, parse_source

CROSS_PACKAGE = "gcc-aarch64-linux-gnu"
REPO = Path(__file__).resolve().parent.parent
RECIPE = "cmdline-arm64"
MODULE = "livepatch-cmdline-arm64"
MESSAGE = "kpipe arm64 live patch active"
TIMINGS: dict[str, float] = {}  # printed with -s at exit; the report's numbers come from here


def _print_timings() -> None:
    if TIMINGS:
        sys.stderr.write("arm64 timings: " + ", ".join(f"{k}={v:.1f}s" for k, v in TIMINGS.items()) + "\n")


atexit.register(_print_timings)

_FORGED: dict[str, ForgedKernel] = {}


def need_qemu_aarch64() -> None:
    need_real("qemu-system-aarch64 is not installed (scripts/setup.sh: qemu-system-arm)",
              shutil.which("qemu-system-aarch64") is not None)


def forged_arm64_kernel() -> ForgedKernel:
    """The session's forged arm64 kernel (cross-built once per input set, then cached on disk)."""
    if "k" not in _FORGED:
        need_forge_tools()
        t = time.monotonic()
        _FORGED["k"] = forge(parse_source(ARM64_SOURCE), arch="aarch64",
                             progress=lambda m: sys.stderr.write(f"forge arm64: {m}\n"))
        TIMINGS["forge_arm64"] = time.monotonic() - t
    return _FORGED["k"]


@pytest.fixture(scope="session")
def forged_arm64() -> ForgedKernel:
    return forged_arm64_kernel()


def source_parts() -> tuple[str, str]:
    suite, version = ARM64_SOURCE.split(":", 1)[1].split("/")
    return suite, version


@pytest.fixture(scope="session")
def arm64_buildhost(tmp_path_factory: pytest.TempPathFactory, forged_arm64: ForgedKernel) -> Iterator[dict]:
    """The arm64 forge chroot's sshd (cross gcc inside) on a free loopback port; stopped by PID at the end."""
    suite, version = source_parts()
    bh = BuildHostChroot(tmp_path_factory.mktemp("arm64-buildhost"))
    state = bh.up(suite, version=version, packages=(f"linux-source-{version}", CROSS_PACKAGE))
    ns = os.readlink(f"/proc/{state['pid']}/ns/mnt")
    try:
        yield {**state, "folder": bh.folder}
    finally:
        bh.down()
        left = namespace_pids(ns) if ns != os.readlink("/proc/self/ns/mnt") else []
        assert not left, f"build host processes left running: {left}"


def recipe_yaml(message: str = MESSAGE, module: str = MODULE, name: str = RECIPE) -> str:
    """A kbuild recipe for forged kernels (x86_64 and arm64 alike): /proc/cmdline prints message."""
    return f"""name: {name}
description: "arm64 demo live patch: /proc/cmdline prints a message on {{{{ kernel.release }}}}"
builder: kbuild
kernels:
  - "*-kforge-*"
options:
  message: "{message}\\n"
kbuild:
  module_name: {module}
  sources:
    - template: templates/livepatch-cmdline.c.j2
      name: {module}.c
  kbuild: templates/Kbuild.j2
signing:
  sign: true
  signer: lab
rollout:
  waves: [1, "100%"]
  max_failures: 0
  soak: 2s
  rollback: wave
  probe:
    argv: [cat, /proc/cmdline]
    expect: "^{message}$"
    expect_after_rollback: "console="
"""


def arm64_workspace(root: Path, state: dict, *, name: str = "forge-sid") -> Path:
    """A workspace whose build host is the sid chroot (x86_64, cross-building aarch64), the lab signer, a recipe."""
    root.mkdir(parents=True, exist_ok=True)
    key, cert = ensure_lab_key()
    (root / "kpipe.toml").write_text(
        "[workspace]\n\n[ssh]\n"
        f"known_hosts = \"{state['known_hosts']}\"\naccept_new_host_keys = false\n\n"
        + build_host_toml(name, int(state["port"]), Path(state["identity_file"]))
        + 'workdir = "/root/kpipe-builds"\ncross_arches = ["aarch64"]\n'
        + f'\n[signing]\ndefault = "lab"\n\n[signing.signers.lab]\ntype = "builtin"\nkey = "{key}"\n'
          f'cert = "{cert}"\nhash = "sha256"\n')
    (root / "recipes").mkdir(exist_ok=True)
    shutil.copytree(REPO / "recipes" / "templates", root / "recipes" / "templates", dirs_exist_ok=True)
    (root / "recipes" / f"{RECIPE}.yaml").write_text(recipe_yaml())
    return root


def kp(ws: Path, *args: str, ok: tuple[int, ...] = (0,), timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the kpipe CLI in ws; assert its exit code."""
    r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=ws, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode in ok, f"kpipe {' '.join(args)} exited {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="session")
def arm64_ws(tmp_path_factory: pytest.TempPathFactory, arm64_buildhost: dict) -> Path:
    return arm64_workspace(tmp_path_factory.mktemp("arm64") / "ws", arm64_buildhost)


@pytest.fixture(scope="session")
def arm64_built(arm64_ws: Path, forged_arm64: ForgedKernel) -> dict:
    """`kpipe build` of the arm64 recipe for the forged arm64 kernel on the x86_64 chroot host (cross), signed."""
    import json

    t = time.monotonic()
    r = kp(arm64_ws, "build", "--recipe", RECIPE, "--kernel", forged_arm64.release, "--host", "forge-sid", "--json",
           timeout=3600)
    TIMINGS["cross_build"] = time.monotonic() - t
    [res] = json.loads(r.stdout)
    return dict(res)


def artifact(ws: Path, ref: str) -> dict:
    """`kpipe artifacts show REF --json`."""
    import json

    return dict(json.loads(kp(ws, "artifacts", "show", ref, "--json").stdout))


def x86_64_headers_release() -> str:
    """A Debian amd64 release whose headers (with .config) are installed under /usr/src (discovered)."""
    found = sorted(p.name[len("linux-headers-"):] for p in Path("/usr/src").glob("linux-headers-*-amd64")
                   if (p / ".config").is_file())
    need_real("no linux-headers-*-amd64 with a .config under /usr/src", bool(found))
    return found[-1]


def x86_64_module() -> Path:
    """A real x86_64 module: virtio_net.ko of Debian's current amd64 kernel (the lab's cached package)."""
    from kpipe.lab import resolve_kernel

    image = resolve_kernel("debian", None, None)
    found = sorted(image.modules_dir.rglob("virtio_net.ko*"))
    need_real(f"no virtio_net module under {image.modules_dir}", bool(found))
    return found[0]
