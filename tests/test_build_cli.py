"""The build and artifacts commands end to end on the `local` build host (LocalTransport, same detached runner)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from doubles.buildkit import DEBIAN_HEADERS, DEBIAN_RELEASE, PYTHON, kpipe_env, write_workspace  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)

RECIPE = """name: lp-demo
description: "demo for {{ kernel.release }}"
builder: kbuild
kernels: ["6.1.*-amd64"]
options:
  message: "patched by a kpipe test"
kbuild:
  module_name: livepatch-lp-demo
  sources:
    - template: templates/livepatch-cmdline.c.j2
      name: livepatch-lp-demo.c
  kbuild: templates/Kbuild.j2
"""


def kpipe(ws_root: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "kpipe", *args], env=kpipe_env(ws_root), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A workspace with one kbuild recipe built on the local build host."""
    tmp = tmp_path_factory.mktemp("cli")
    ws = write_workspace(tmp / "ws", [{"name": "local", "workdir": str(tmp / "work"), "slots": 1}],
                         [{"release": DEBIAN_RELEASE, "arch": "x86_64", "headers": DEBIAN_HEADERS}])
    shutil.copytree(REPO / "recipes" / "templates", ws.recipes_dir / "templates")
    (ws.recipes_dir / "lp-demo.yaml").write_text(RECIPE)
    r = kpipe(ws.root, "build", "--kernel", DEBIAN_RELEASE, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert len(res) == 1 and res[0]["status"] == "built" and res[0]["host"] == "local"
    return ws, res[0]


def test_build_on_the_local_host_then_a_cache_hit(built):
    ws, res = built
    r = kpipe(ws.root, "build", "--recipe", "lp-demo", "--kernel", DEBIAN_RELEASE)
    assert r.returncode == 0, r.stderr
    assert "cached" in r.stdout and res["artifact_id"] in r.stdout


def test_artifacts_list_and_filters(built):
    ws, res = built
    r = kpipe(ws.root, "artifacts", "list", "--json")
    arts = json.loads(r.stdout)
    assert [a["id"] for a in arts] == [res["artifact_id"]]
    assert arts[0]["recipe"] == "lp-demo" and arts[0]["builder"] == "kbuild" and arts[0]["build_host"] == "local"
    assert json.loads(kpipe(ws.root, "artifacts", "list", "--kernel", "5.10.0-amd64-UOS", "--json").stdout) == []
    assert json.loads(kpipe(ws.root, "artifacts", "list", "--recipe", "lp-demo", "--json").stdout)
    table = kpipe(ws.root, "artifacts", "list")
    assert table.returncode == 0 and res["artifact_id"][:8] in table.stdout


def test_artifacts_show_has_metadata_validation_preflight_and_log_tail(built):
    ws, res = built
    d = json.loads(kpipe(ws.root, "artifacts", "show", res["artifact_id"][:6], "--json").stdout)
    assert d["id"] == res["artifact_id"] and d["inputs_digest"] == res["inputs_digest"]
    assert any("make: Leaving directory" in line for line in d["log_tail"])
    assert "validation" in d and "preflight" in d
    text = kpipe(ws.root, "artifacts", "show", res["artifact_id"]).stdout
    for word in ("sha256", "builder version", "validation", "preflight", "build log"):
        assert word in text


def test_artifacts_log_prints_the_whole_log(built):
    ws, res = built
    r = kpipe(ws.root, "artifacts", "log", res["artifact_id"])
    assert r.returncode == 0
    assert "Entering directory" in r.stdout and "kpipe: builder exited with status 0" in r.stdout


def test_artifacts_export_writes_the_module(built, tmp_path):
    ws, res = built
    out = tmp_path / "m.ko"
    r = kpipe(ws.root, "artifacts", "export", res["artifact_id"], "--output", str(out))
    assert r.returncode == 0, r.stderr
    info = subprocess.run(["modinfo", "-F", "livepatch", str(out)], capture_output=True, text=True).stdout.strip()
    assert info == "Y"
    again = kpipe(ws.root, "artifacts", "export", res["artifact_id"], "--output", str(out))
    assert again.returncode == 4 and "--force" in again.stderr


def test_unknown_artifact_and_bad_usage_are_one_line_errors(built):
    ws, _ = built
    r = kpipe(ws.root, "artifacts", "show", "abcdef")
    assert r.returncode == 5 and "no artifact 'abcdef'" in r.stderr and "Traceback" not in r.stderr
    r = kpipe(ws.root, "build", "--recipe", "lp-demo")
    assert r.returncode == 2 and "--all-kernels" in r.stderr
    r = kpipe(ws.root, "build", "--kernel", "9.9.9-nope")
    assert r.returncode == 5 and "Traceback" not in r.stderr


def test_builds_lists_the_recorded_build(built):
    ws, res = built
    rows = json.loads(kpipe(ws.root, "builds", "--json").stdout)
    assert rows[0]["status"] == "succeeded" and rows[0]["artifact_id"] == res["artifact_id"]
    assert rows[0]["host"] == "local"


def test_failed_build_log_is_kept_and_printable(built):
    ws, _ = built
    (ws.recipes_dir / "broken.yaml").write_text(RECIPE.replace("lp-demo", "broken").replace(
        "templates/Kbuild.j2",
        "templates/Kbuild.j2\n  make_args: [\"KCFLAGS=-DKPIPE_NO_SUCH_HEADER -include nonexistent.h\"]"))
    r = kpipe(ws.root, "build", "--recipe", "broken", "--kernel", DEBIAN_RELEASE)
    assert r.returncode == 7, r.stderr
    assert "failed (source)" in r.stdout and "nonexistent.h" in r.stdout
    ref = r.stderr.split("kpipe builds --log ")[1].split("`")[0]
    log = kpipe(ws.root, "builds", "--log", ref)
    assert log.returncode == 0 and "nonexistent.h" in log.stdout
