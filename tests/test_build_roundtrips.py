"""What one `kpipe build` costs in SSH round trips, against a real OpenSSH server (tests/sshd.py).

The repository's kbuild recipe is built for the installed kernel headers on a loopback build host; every
command, upload and download the runner asks of its transport is counted, and so are the SSH connections
the server sees. The bound, and why it is the least a detached, reattachable build can do:

  probe    1  the builder's version on the host (it is part of the cache key) and the absolute workdir;
              once per build host per process, never again for a second build on the same host
  launch   1  the inputs (a tar archive) travel as the launch command's stdin: no SFTP upload
  follow   F  each request waits on the host until the build ends (seen within 50 ms), or 1 s has passed,
              or it has new output and its batching window has passed: 250 ms, 500 ms, then 1 s. So the
              requests after the first two each span at least 1 s of the follow's wall time:
              F <= 2 + ceil(wall seconds of the whole build) + 1 (the answer that reports the end)
  fetch    0  the last follow answer carries the module (base64) and the log it already streamed:
              no SFTP download
  connections 1, reused by every one of those commands.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import kenv  # noqa: E402
from sshd import SshdServer, keygen  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = "cmdline-demo"
pytestmark = pytest.mark.timeout(600)
KERNEL = kenv.kernel_env(module_level=True)


class Counting:
    """A Transport whose run/put/get calls are counted (label of each command kept)."""

    def __init__(self, inner: Any, counts: dict[str, list[str]]) -> None:
        self.inner, self.counts = inner, counts

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in ("run", "put", "get"):
            return attr

        def counted(*a: Any, **kw: Any) -> Any:
            what = getattr(a[0], "label", "") if name == "run" else str(a[0])
            self.counts.setdefault(name, []).append(what)
            return attr(*a, **kw)
        return counted


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("rt")
    srv = SshdServer.start(tmp / "sshd", client_key=keygen(tmp / "id_ed25519"))
    yield srv, tmp
    srv.stop()


def _workspace(tmp: Path, srv: SshdServer) -> Path:
    ws = tmp / "ws"
    (ws / "recipes").mkdir(parents=True)
    (ws / "patches").mkdir()
    shutil.copytree(REPO / "recipes" / "templates", ws / "recipes" / "templates")
    text = (REPO / "recipes" / f"{RECIPE}.yaml").read_text().split("\nsigning:")[0] + "\n"
    (ws / "recipes" / f"{RECIPE}.yaml").write_text(text)
    (ws / "kpipe.toml").write_text(f"""[workspace]
store = ".kpipe"

[ssh]
known_hosts = "{srv.known_hosts}"

[[build_hosts]]
name = "rt"
address = "{srv.address}"
port = {srv.port}
user = "{srv.user}"
identity_file = "{srv.client_key}"
arch = "x86_64"
kernels = ["*"]
slots = 1
workdir = "{tmp}/remote"

[[kernels]]
release = "{KERNEL.release}"
arch = "x86_64"
headers = "{KERNEL.headers}"
""")
    return ws


def test_one_build_costs_probe_launch_and_follows_over_one_connection(server):
    from kpipe import recipes
    from kpipe.builder.runner import BuildOptions, BuildRunner
    from kpipe.workspace import load_workspace

    srv, tmp = server
    ws = load_workspace(_workspace(tmp, srv))
    spec = recipes.render(ws, RECIPE, KERNEL.release)
    counts: dict[str, list[str]] = {}
    runner = BuildRunner(ws, options=BuildOptions(force=True, validate=False))
    plain = runner.connections.transport
    runner.connections.transport = lambda host, lane=0: Counting(plain(host, lane), counts)  # type: ignore[method-assign]
    try:
        t0 = time.monotonic()
        first = runner.run([spec])[0]
        wall = time.monotonic() - t0
        assert first.status == "built", (first.message, first.lines)
        assert len(srv.session_pids()) == 1  # one SSH connection, still open for the next build
        runs = counts.get("run", [])
        follows = runs.count("follow")
        assert [r for r in runs if r != "follow"] == ["probe", "launch"], runs
        assert 1 <= follows <= 3 + math.ceil(wall), (follows, wall)
        assert counts.get("put", []) == [] and counts.get("get", []) == [], counts  # no SFTP at all

        # a second build in the same process: no second probe, the same connection
        counts.clear()
        second = runner.run([spec])[0]
        assert second.status == "built", (second.message, second.lines)
        assert [r for r in counts.get("run", []) if r != "follow"] == ["launch"], counts
        assert len(srv.session_pids()) == 1
    finally:
        runner.close()


def test_the_inline_module_is_the_module_the_host_built(server):
    """The module that came with the follow answer is byte for byte the file on the build host."""
    from kpipe import recipes
    from kpipe.artifacts import get_artifact
    from kpipe.builder.runner import BuildOptions, BuildRunner
    from kpipe.workspace import load_workspace

    srv, tmp = server
    ws = load_workspace(_workspace(tmp, srv) if not (tmp / "ws").exists() else tmp / "ws")
    spec = recipes.render(ws, RECIPE, KERNEL.release)
    runner = BuildRunner(ws, options=BuildOptions(force=True, validate=False))
    try:
        res = runner.run([spec])[0]
    finally:
        runner.close()
    assert res.status == "built", (res.message, res.lines)
    art = get_artifact(ws.store, res.artifact_id)
    on_host = Path(res.remote_dir) / "src" / f"{res.module_name}.ko"  # loopback: the host's files are here
    assert on_host.is_file(), sorted(p.name for p in Path(res.remote_dir).rglob("*.ko"))
    assert ws.store.get_bytes(art.sha256) == on_host.read_bytes()
