"""kpipe preflight on real kernels: a good module passes (with the recipe's probe), refused ones fail
with the kernel's own reason and exit code 9; the VM is stopped every time."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kpipe.artifacts import add_artifact, get_artifact, preflight_records
from kpipe.lab import Lab
from kpipe.workspace import open_workspace
from test_lab_support import (  # noqa: F401  (fixtures)
    altered_vermagic,
    build_demo_module,
    headers_release,
    kpipe_cli,
    qemu_guard,
    remember,
)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
ACTIVE = "kpipe live patch active"  # what recipes/cmdline-demo's probe expects


@pytest.fixture(scope="module")
def preflight_ws(tmp_path_factory: pytest.TempPathFactory, qemu_guard) -> Iterator[dict]:
    """A workspace with the example recipes and three artifacts: good, altered vermagic, good-for-sig-enforce."""
    ws = tmp_path_factory.mktemp("pfws")
    (ws / "kpipe.toml").write_text("# preflight test workspace\n")
    if RECIPES.is_dir():
        shutil.copytree(RECIPES, ws / "recipes")
    release = headers_release()
    good = build_demo_module(tmp_path_factory.mktemp("pfmod") / "src", release, text=ACTIVE)
    bad = altered_vermagic(good, tmp_path_factory.mktemp("pfbad") / "livepatch_demo.ko")
    store = open_workspace(str(ws)).store
    recipe = "cmdline-demo" if (ws / "recipes" / "cmdline-demo.yaml").is_file() else ""
    a_good = add_artifact(store, good, kernel=release, module_name="livepatch_demo", status="valid", recipe=recipe)
    a_bad = add_artifact(store, bad, kernel=release, module_name="livepatch_demo", status="valid",
                         filename="livepatch_demo.ko")
    try:
        yield {"ws": ws, "good": a_good.id, "bad": a_bad.id, "recipe": recipe}
    finally:
        # a preflight killed mid-way (e.g. a subprocess timeout) leaves its VM recorded: stop it
        lab = Lab(ws / ".lab")
        for sub in (ws / ".lab").glob("preflight/*/state.json"):
            remember(Lab(sub.parent).load_state())
        lab.down_preflights()


def _stored(ws: Path, artifact_id: str) -> dict:
    return get_artifact(open_workspace(str(ws)).store, artifact_id).preflight


def _no_vm_left(ws: Path) -> None:
    states = list((ws / ".lab").glob("preflight/*/state.json"))
    assert states == [], f"preflight left VMs recorded: {states}"


@pytest.mark.vm
def test_preflight_passes_for_the_good_module_with_the_recipes_probe(preflight_ws):
    ws = preflight_ws["ws"]
    r = kpipe_cli(ws, "preflight", preflight_ws["good"], "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["status"] == "passed", result["problems"]
    assert result["problems"] == []
    assert [s["step"] for s in result["steps"]] == ["boot", "stage", "load", "wait", "verify", "disable", "unload",
                                                    "verify-removed"]
    assert "livepatch: 'livepatch_demo': patching complete" in result["kernel_lines"]
    assert "livepatch: 'livepatch_demo': unpatching complete" in result["kernel_lines"]
    if preflight_ws["recipe"]:
        assert result["probe"] is True
        verify = next(s for s in result["steps"] if s["step"] == "verify")
        assert verify["probe_output"].strip() == ACTIVE
    stored = _stored(ws, preflight_ws["good"])
    assert stored["status"] == "passed" and stored["duration_s"] > 0
    assert get_artifact(open_workspace(str(ws)).store, preflight_ws["good"]).preflight_passed
    _no_vm_left(ws)


@pytest.mark.vm
def test_preflight_fails_for_altered_vermagic_with_the_kernels_line(preflight_ws):
    ws = preflight_ws["ws"]
    r = kpipe_cli(ws, "preflight", preflight_ws["bad"])
    assert r.returncode == 9, r.stdout + r.stderr
    assert "version magic" in r.stderr and "should be" in r.stderr
    stored = _stored(ws, preflight_ws["bad"])
    assert stored["status"] == "failed"
    assert stored["problems"][0].startswith("kernel: livepatch_demo: version magic '")
    assert any("Invalid module format" in p for p in stored["problems"])
    _no_vm_left(ws)


@pytest.mark.vm
def test_preflight_fails_for_an_unsigned_module_under_sig_enforce(preflight_ws):
    ws = preflight_ws["ws"]
    r = kpipe_cli(ws, "preflight", preflight_ws["good"], "--sig-enforce")
    assert r.returncode == 9, r.stdout + r.stderr
    assert "kpipe: error: preflight of" in r.stderr
    assert "Loading of unsigned module is rejected" in r.stderr
    store = open_workspace(str(ws)).store
    trial = preflight_records(store, preflight_ws["good"])[-1]  # every run is a record with its options
    assert trial["status"] == "failed" and trial["options"]["sig_enforce"] is True
    assert "kernel: Loading of unsigned module is rejected" in trial["result"]["problems"]
    assert any("Key was rejected by service" in p for p in trial["result"]["problems"])
    # a failed trial with other options never replaces the artifact's own (default-options) preflight
    assert _stored(ws, preflight_ws["good"])["sig_enforce"] is False
    _no_vm_left(ws)


def test_preflight_of_an_unknown_artifact_is_a_clear_error(tmp_path):
    (tmp_path / "kpipe.toml").write_text("")
    r = kpipe_cli(tmp_path, "preflight", "abcdef123456")
    assert r.returncode == 5
    assert r.stderr.startswith("kpipe: error: no artifact 'abcdef123456'")
