"""The render memo (kpipe.builder.memo): a repeated `kpipe build --recipe R --kernel K` is answered from the
store without rendering, and only while every input of the render is unchanged.

The build host of these workspaces listens nowhere (a closed loopback port): a `kpipe build` that is not
answered from the store fails at once with a connection error instead of building.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RELEASE = "6.1.0-999-amd64"  # catalog test data: a kernel that never has to exist (nothing is built)
RECIPE = "cmdline-demo"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KPIPE_", "_KPIPE_"))}
    return {**env, "PYTHONPATH": str(REPO)}


def _toml(port: int, headers: str = "/nonexistent/headers") -> str:
    return (f'[workspace]\nstore = ".kpipe"\n\n[ssh]\nconnect_timeout = 3\n\n[[build_hosts]]\nname = "far"\n'
            f'address = "127.0.0.1"\nport = {port}\nkernels = ["*"]\n\n[[kernels]]\nrelease = "{RELEASE}"\n'
            f'headers = "{headers}"\n')


@pytest.fixture()
def ws_root(tmp_path: Path) -> Path:
    """The repository's kbuild recipe (without signing) and its build already in the store, recorded as
    built with the host's probed builder version (`make 4.3`) under the rendered inputs digest."""
    root = tmp_path / "ws"
    (root / "recipes").mkdir(parents=True)
    (root / "patches").mkdir()
    shutil.copytree(REPO / "recipes" / "templates", root / "recipes" / "templates")
    text = (REPO / "recipes" / f"{RECIPE}.yaml").read_text().split("\nsigning:")[0] + "\n"
    (root / "recipes" / f"{RECIPE}.yaml").write_text(text)
    (root / "kpipe.toml").write_text(_toml(_closed_port()))
    seed = ("from pathlib import Path\n"
            "from kpipe import recipes\n"
            "from kpipe.artifacts import add_artifact\n"
            "from kpipe.builder.records import ensure_schema, save_tool_version\n"
            "from kpipe.workspace import load_workspace\n"
            "ws = load_workspace(Path('.').resolve())\n"
            f"spec = recipes.render(ws, '{RECIPE}', '{RELEASE}')\n"
            "ensure_schema(ws.store)\n"
            "save_tool_version(ws.store, 'far', 'kbuild', 'make 4.3', '/tmp/kpipe-builds')\n"
            "Path('m.ko').write_bytes(b'\\x7fELF cached')\n"
            f"add_artifact(ws.store, Path('m.ko'), kernel='{RELEASE}', module_name=spec.module_name,"
            f" recipe='{RECIPE}', builder='kbuild', build_host='far', builder_version='make 4.3',"
            " inputs_digest=spec.inputs_digest('make 4.3'))\n")
    subprocess.run([sys.executable, "-c", seed], cwd=root, env=_env(), check=True, timeout=120)
    return root


def kpipe(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kpipe", *args], cwd=root, env=_env(), capture_output=True,
                          text=True, timeout=120)


def build(root: Path) -> subprocess.CompletedProcess[str]:
    return kpipe(root, "build", "--recipe", RECIPE, "--kernel", RELEASE, "--json")


def _load(root: Path):  # noqa: ANN202
    from kpipe.workspace import load_workspace

    return load_workspace(root)


def _memo_rows(root: Path) -> list[dict]:
    from kpipe.builder import memo

    ws = _load(root)
    memo.ensure_schema(ws.store)
    return [dict(r) for r in ws.store.query("SELECT * FROM render_memo")]


def test_input_key_follows_every_input_of_the_render(ws_root: Path):
    from kpipe.builder.memo import input_key

    def key() -> str | None:
        return input_key(_load(ws_root), RECIPE, RELEASE)

    base = key()
    assert base is not None and key() == base  # stable
    recipe = ws_root / "recipes" / f"{RECIPE}.yaml"
    template = next((ws_root / "recipes" / "templates").iterdir())
    toml = ws_root / "kpipe.toml"
    for path, changed in ((recipe, recipe.read_text() + "# a comment changes the input\n"),
                          (template, template.read_text() + "\n"),
                          (ws_root / "patches" / "new.patch", "--- a\n+++ b\n@@ -1 +1 @@\n-x\n+y\n"),
                          (toml, toml.read_text().replace("/nonexistent/headers", "/other/headers"))):
        before = path.read_text() if path.exists() else None
        path.write_text(changed)
        assert key() != base, f"a change of {path.name} kept the input key"
        if before is None:
            path.unlink()
        else:
            path.write_text(before)
        assert key() == base
    assert input_key(_load(ws_root), RECIPE, "6.1.0-1-not-in-catalog") is None  # the full path reports it


def test_the_second_build_is_answered_through_the_memo_with_the_same_result(ws_root: Path):
    first = build(ws_root)
    assert first.returncode == 0, first.stderr
    rows = _memo_rows(ws_root)
    assert [(r["builder"], r["builder_version"]) for r in rows] == [("kbuild", "make 4.3")]
    assert rows[0]["inputs_digest"] == json.loads(first.stdout)[0]["inputs_digest"]
    again = build(ws_root)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout and json.loads(again.stdout)[0]["status"] == "cached"


def test_a_changed_template_is_rendered_again_not_answered_from_the_memo(ws_root: Path):
    assert build(ws_root).returncode == 0  # remembered
    template = ws_root / "recipes" / "templates" / "livepatch-cmdline.c.j2"
    template.write_text(template.read_text() + "/* another module */\n")
    r = build(ws_root)
    # a new inputs digest: no artifact, so kpipe really builds: the build host is asked (and listens nowhere)
    assert r.returncode != 0 and '"status": "cached"' not in r.stdout, r.stdout + r.stderr
    assert "far" in r.stdout + r.stderr


def test_a_changed_builder_version_on_the_host_is_not_answered(ws_root: Path):
    from kpipe.builder.records import save_tool_version
    from kpipe.builder.runner import BuildOptions, BuildRunner

    assert build(ws_root).returncode == 0
    ws = _load(ws_root)
    from kpipe.builder.memo import input_key

    key = input_key(ws, RECIPE, RELEASE)
    assert key is not None
    assert BuildRunner(ws).answer_from_memo(RECIPE, RELEASE, key) is not None
    assert BuildRunner(ws, options=BuildOptions(force=True)).answer_from_memo(RECIPE, RELEASE, key) is None
    save_tool_version(ws.store, "far", "kbuild", "make 4.4", "/tmp/kpipe-builds")  # the host was upgraded
    assert BuildRunner(ws).answer_from_memo(RECIPE, RELEASE, key) is None


def test_a_recipe_that_signs_is_answered_only_with_its_signed_artifact(ws_root: Path, tmp_path: Path):
    from kpipe.artifacts import ArtifactStatus, add_artifact, find_by_inputs, get_artifact
    from kpipe.builder import memo
    from kpipe.builder.runner import BuildRunner

    assert build(ws_root).returncode == 0
    ws = _load(ws_root)
    key = memo.input_key(ws, RECIPE, RELEASE)
    assert key is not None
    row = memo.recall(ws.store, key)[0]
    memo.remember(ws.store, key, builder=row["builder"], builder_version=row["builder_version"],
                  inputs_digest=row["inputs_digest"], arch=row["arch"], sign=True)
    art = find_by_inputs(ws.store, row["inputs_digest"])
    assert art is not None
    with ws.store.write() as c:
        c.execute("UPDATE artifacts SET status = ? WHERE id = ?", (str(ArtifactStatus.VALID), art.id))
    assert get_artifact(ws.store, art.id).status == ArtifactStatus.VALID
    assert BuildRunner(ws).answer_from_memo(RECIPE, RELEASE, key) is None  # signing needs the rendered signer
    (tmp_path / "s.ko").write_bytes(b"\x7fELF signed")
    signed = add_artifact(ws.store, tmp_path / "s.ko", kernel=RELEASE, status=ArtifactStatus.VALID,
                          parent_id=art.id, signed=True, module_name=art.module_name)
    res = BuildRunner(ws).answer_from_memo(RECIPE, RELEASE, key)
    assert res is not None and res.signed_id == signed.id and res.artifact_id == art.id
