"""`arches:` in a recipe: a glob that matches kernels of several architectures targets only the named ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from kpipe import recipes
from kpipe.errors import NotFoundError
from kpipe.recipes.loading import kernels_for_recipe, recipes_for_kernel
from kpipe.workspace import load_workspace

TOML = """
[[kernels]]
release = "7.2.13-kforge-aaaaaaaa"
arch = "x86_64"

[[kernels]]
release = "7.2.13-kforge-bbbbbbbb"
arch = "aarch64"
"""
PATCH = "--- a/x.c\n+++ b/x.c\n@@ -1 +1 @@\n-a\n+b\n"


def ws_with(tmp_path: Path, arches: str) -> object:
    (tmp_path / "kpipe.toml").write_text(TOML)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "patches").mkdir()
    (tmp_path / "patches" / "fix.patch").write_text(PATCH)
    (tmp_path / "recipes" / "fix.yaml").write_text(
        "name: fix\nbuilder: kpatch-build\nkernels:\n  - \"7.*-kforge-*\"\n" + arches + "patches: [fix.patch]\n")
    return load_workspace(tmp_path)


def ours(releases: list[str]) -> list[str]:
    """The test's own kernels (the catalog also holds this machine's forged ones)."""
    return [r for r in releases if r.endswith(("-aaaaaaaa", "-bbbbbbbb"))]


def test_without_arches_every_matched_kernel_is_a_target(tmp_path):
    ws = ws_with(tmp_path, "")
    assert ours(kernels_for_recipe(ws, recipes.load_recipe(ws, "fix"))) == ["7.2.13-kforge-aaaaaaaa",
                                                                            "7.2.13-kforge-bbbbbbbb"]


def test_arches_keep_only_the_named_architectures(tmp_path):
    ws = ws_with(tmp_path, "arches: [amd64]\n")  # Debian's name for it: normalized to x86_64
    recipe = recipes.load_recipe(ws, "fix")
    assert ours(kernels_for_recipe(ws, recipe)) == ["7.2.13-kforge-aaaaaaaa"]
    assert [r.name for r in recipes_for_kernel(ws, "7.2.13-kforge-bbbbbbbb")] == []
    with pytest.raises(NotFoundError, match="does not target"):
        recipes.render(ws, "fix", "7.2.13-kforge-bbbbbbbb")


def test_an_unknown_arch_is_a_lint_error_at_its_line(tmp_path):
    ws = ws_with(tmp_path, "arches: [x86_64, arm65]\n")
    probs = [p for p in recipes.lint(ws) if p.severity == "error"]
    assert any("arm65" in p.message and p.line == 5 for p in probs), probs
