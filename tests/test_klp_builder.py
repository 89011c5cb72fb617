"""The klp-build builder and the per-kernel builder choice (pure: plans, recipes, `recipe render`).

The real tool runs in tests/test_klp_real.py; its real logs (tests/data/klp-build/) are checked in
tests/test_klp_classify.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kpipe import recipes
from kpipe.builder.base import get_builder
from kpipe.errors import ConfigError
from kpipe.kernel import parse_release
from kpipe.recipes.select import capable_builder, select_builder
from kpipe.settings import KernelEntry
from kpipe.workspace import BuildHost, load_workspace

REPO = Path(__file__).resolve().parent.parent
OLD = "6.12.117-kforge-1a2b3c4d"
NEW = "7.2.13-kforge-5e6f7a8b"
NEW_PINNED = "7.2.13-kforge-99999999"  # the catalog says builder = "kpatch-build" for this one
REMOTE = "7.3.1-kforge-12345678"  # its tree is on the build host only

AUTO = """\
    builder: auto
    kernels: ["*-kforge-*"]
    patches: [cmdline.patch]
    kpatch:
      module_name: livepatch-cmdline
      jobs: 3
    """


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace with an old and a new forged-looking kernel, each with a tree of its own."""
    monkeypatch.setenv("KPIPE_FORGE_CACHE", str(tmp_path / "forge-cache"))  # no real forged kernels
    old_tree, new_tree = tmp_path / "trees" / "6.12", tmp_path / "trees" / "7.2"
    (old_tree / "scripts").mkdir(parents=True)
    (new_tree / "scripts" / "livepatch").mkdir(parents=True)
    (new_tree / "scripts" / "livepatch" / "klp-build").write_text("#!/bin/bash\n")
    root = tmp_path / "ws"
    (root / "recipes").mkdir(parents=True)
    (root / "patches").mkdir()
    (root / "patches" / "cmdline.patch").write_bytes((REPO / "patches" / "cmdline-klp.patch").read_bytes())
    (root / "kpipe.toml").write_text(textwrap.dedent(f"""\
        [workspace]
        store = ".kpipe"

        [[build_hosts]]
        name = "forge-sid"
        arch = "x86_64"
        kernels = ["*-kforge-*"]

        [[kernels]]
        release = "{OLD}"
        arch = "x86_64"
        source = "{old_tree}"

        [[kernels]]
        release = "{NEW}"
        arch = "x86_64"
        source = "{new_tree}"

        [[kernels]]
        release = "{NEW_PINNED}"
        arch = "x86_64"
        source = "{new_tree}"
        builder = "kpatch-build"

        [[kernels]]
        release = "{REMOTE}"
        arch = "x86_64"
        source = "/srv/kernels/7.3/src"
        """))
    (root / "recipes" / "cmdline.yaml").write_text(textwrap.dedent(AUTO))
    return root


def _recipe(root: Path, name: str, text: str) -> None:
    (root / "recipes" / f"{name}.yaml").write_text(textwrap.dedent(text))


def _entry(release: str, source: str = "", builder: str = "") -> tuple:
    return parse_release(release), KernelEntry(release=release, source=source, builder=builder)


# --------------------------------------------------------------------------- the choice

def test_auto_picks_kpatch_build_for_a_kernel_older_than_6_19(ws):
    spec = recipes.render(load_workspace(ws), "cmdline", OLD)
    assert spec.builder == "kpatch-build"
    assert "Linux 6.12 predates klp-build" in spec.builder_reason


def test_auto_picks_klp_build_for_a_7_x_kernel_whose_tree_carries_it(ws):
    spec = recipes.render(load_workspace(ws), "cmdline", NEW)
    assert spec.builder == "klp-build"
    assert "Linux 7.2 >= 6.19" in spec.builder_reason and "scripts/livepatch/klp-build" in spec.builder_reason
    # what both backends share, written once in `kpatch:`, reaches klp-build
    assert spec.options["module_name"] == "livepatch-cmdline" and spec.options["jobs"] == 3
    plan = get_builder(spec.builder).plan(spec, BuildHost("forge-sid"), "/w/b")
    assert plan.module_path == "/w/b/out/livepatch-cmdline.ko"


def test_the_kernel_entry_decides_for_an_auto_recipe(ws):
    spec = recipes.render(load_workspace(ws), "cmdline", NEW_PINNED)
    assert spec.builder == "kpatch-build"
    assert "kernel entry" in spec.builder_reason and "builder: kpatch-build" in spec.builder_reason


def test_a_tree_only_on_the_build_host_is_judged_by_the_version(ws):
    spec = recipes.render(load_workspace(ws), "cmdline", REMOTE)
    assert spec.builder == "klp-build" and "on the build host" in spec.builder_reason


def test_the_recipe_says_otherwise(ws):
    _recipe(ws, "pinned", AUTO.replace("builder: auto", "builder: kpatch-build"))
    spec = recipes.render(load_workspace(ws), "pinned", NEW)
    assert spec.builder == "kpatch-build" and spec.builder_reason == "the recipe says builder: kpatch-build"


def test_a_7_x_tree_without_klp_build_falls_back_to_kpatch_build(tmp_path):
    tree = tmp_path / "src"
    tree.mkdir()
    choice = capable_builder(*_entry("7.2.13-kforge-1", str(tree)))
    assert choice.builder == "kpatch-build" and "has no scripts/livepatch/klp-build" in choice.why
    assert select_builder("auto", *_entry("7.2.13-kforge-1")).builder == "kpatch-build"  # no tree named


def test_klp_build_is_x86_64_only(tmp_path):
    tree = tmp_path / "src"
    (tree / "scripts" / "livepatch").mkdir(parents=True)
    (tree / "scripts" / "livepatch" / "klp-build").write_text("#!/bin/bash\n")
    kernel, entry = _entry("7.2.13-kforge-1", str(tree))
    from dataclasses import replace

    arm = replace(kernel, arch="aarch64")
    assert capable_builder(kernel, entry).builder == "klp-build"
    choice = capable_builder(arm, entry)
    assert choice.builder == "kpatch-build" and "does not support aarch64" in choice.why


def test_klp_build_recipe_for_a_kernel_older_than_6_19_is_refused_with_file_and_line(ws):
    _recipe(ws, "klp", """\
        kernels: ["*-kforge-*"]
        builder: klp-build
        patches: [cmdline.patch]
        """)
    with pytest.raises(ConfigError) as e:
        recipes.render(load_workspace(ws), "klp", OLD)
    assert "recipes/klp.yaml:2" in str(e.value) and "predates klp-build" in str(e.value)


def test_klp_section_is_checked(ws):
    _recipe(ws, "klp", """\
        builder: klp-build
        kernels: ["7.*"]
        patches: [cmdline.patch]
        klp:
          short_circuit: sideways
        """)
    with pytest.raises(ConfigError) as e:
        recipes.render(load_workspace(ws), "klp", NEW)
    assert "recipes/klp.yaml:5" in str(e.value) and "short_circuit" in str(e.value)
    _recipe(ws, "klp2", """\
        builder: klp-build
        kernels: ["7.*"]
        patches: [cmdline.patch]
        kpatch:
          jobs: 2
        """)
    with pytest.raises(ConfigError) as e:
        recipes.render(load_workspace(ws), "klp2", NEW)
    assert "`kpatch:` is set but the builder is klp-build" in str(e.value)


# --------------------------------------------------------------------------- the plan

def _klp_spec(ws: Path, extra: str = "", replace: str = "") -> object:
    _recipe(ws, "klp", f"""\
        builder: klp-build
        kernels: ["7.*"]
        patches: [cmdline.patch]
        {replace}
        klp:
          module_name: livepatch-cmdline-klp
          jobs: 2
        {extra}
        """)
    return recipes.render(load_workspace(ws), "klp", NEW)


def test_plan_runs_the_trees_klp_build_from_its_root_under_a_tree_lock(ws):
    spec = _klp_spec(ws)
    tree = spec.kernel_entry.source
    plan = get_builder("klp-build").plan(spec, BuildHost("forge-sid"), "/w/b")
    assert list(plan.argv) == [
        "flock", f"{tree}/.kpipe-klp-build.lock", "env", "-u", "ARCH", "-C", tree,
        f"{tree}/scripts/livepatch/klp-build", "--jobs", "2", "--output", "/w/b/out/livepatch-cmdline-klp.ko",
        "--keep-tmp", "--", "/w/b/patches/00/cmdline.patch"]
    assert plan.module_name == "livepatch-cmdline-klp" and plan.output_dir == "/w/b/out"
    assert [f.name for f in plan.files] == ["out/.keep", "patches/00/cmdline.patch"]


def test_plan_options_short_circuit_no_replace_jobs_and_a_host_tool(ws):
    spec = _klp_spec(ws, "  short_circuit: patched", "replace: false")
    host = BuildHost("forge-sid", tools={"klp-build": "/opt/klp/klp-build"})
    argv = list(get_builder("klp-build").plan(spec, host, "/w/b", jobs=7).argv)
    assert argv[7] == "/opt/klp/klp-build"
    assert argv[argv.index("--jobs") + 1] == "7"  # `kpipe build --jobs` wins over the recipe
    assert "--no-replace" in argv and argv[argv.index("--short-circuit") + 1] == "2"
    assert argv.index("--short-circuit") < argv.index("--") < argv.index("/w/b/patches/00/cmdline.patch")


def test_plan_needs_the_kernel_source_tree(ws):
    spec = _klp_spec(ws)
    from dataclasses import replace

    bare = replace(spec, kernel_entry=replace(spec.kernel_entry, source=""))
    with pytest.raises(ConfigError) as e:
        get_builder("klp-build").plan(bare, BuildHost("forge-sid"), "/w/b")
    assert "source tree" in str(e.value) and e.value.hint and "source" in e.value.hint


def test_the_version_probe_names_an_in_tree_tool():
    script = get_builder("klp-build").version_script
    r = subprocess.run(["sh", "-c", script, "probe", "no-such-klp-build", "no-such-gcc"], capture_output=True,
                       text=True, check=True)
    assert "klp-build=in-tree" in r.stdout.splitlines()


# --------------------------------------------------------------------------- recipe render

def _kpipe(ws: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws), *args], capture_output=True, text=True,
                          env=env, check=False)


def test_recipe_render_shows_which_builder_and_why(ws):
    r = _kpipe(ws, "recipe", "render", "cmdline", "--kernel", NEW, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["builder"] == "klp-build" and "Linux 7.2 >= 6.19" in data["builder_reason"]
    assert data["builder_argv"][7].endswith("/scripts/livepatch/klp-build")
    r = _kpipe(ws, "recipe", "render", "cmdline", "--kernel", OLD)
    assert r.returncode == 0, r.stderr
    [line] = [ln for ln in r.stdout.splitlines() if ln.startswith("builder:")]
    assert "kpatch-build" in line and "predates klp-build" in line
