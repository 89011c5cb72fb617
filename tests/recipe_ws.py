"""Helpers for recipe tests: a throwaway workspace with a small kernel catalog."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

KPIPE_TOML = """\
[workspace]
store = ".kpipe"

[[build_hosts]]
name = "local"
arch = "x86_64"
kernels = ["*"]

[[kernels]]
release = "5.10.0-amd64-UOS"
arch = "x86_64"
distro = "uos"
builder = "kpatch-build"
source = "/usr/src/linux-5.10.0-amd64-UOS"
options = { jobs = 3, message = "catalog says hi" }

[[kernels]]
release = "5.10.0-arm64-UOS"
builder = "kpatch-build"

[[kernels]]
release = "4.19.90-24.4.v2101.ky10.aarch64"
builder = "kpatch-build"

[[kernels]]
release = "5.15.0-91-generic"
arch = "x86_64"
builder = "kbuild"

[signing.signers.lab]
type = "builtin"
key = "k.pem"
cert = "c.pem"
"""

PATCH = """\
From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001
From: T <t@example.net>
Subject: [PATCH] fix

---
diff --git a/mm/x.c b/mm/x.c
--- a/mm/x.c
+++ b/mm/x.c
@@ -1,3 +1,4 @@
 int a;
+int b;
 int c;
 int d;
"""


def make_workspace(root: Path, recipes: dict[str, str] | None = None, *, patches: dict[str, str] | None = None,
                   templates: dict[str, str] | None = None, examples: bool = False) -> Path:
    """Write kpipe.toml, recipes/NAME.yaml (dedented), patches/ and recipes/templates/ under root."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "kpipe.toml").write_text(KPIPE_TOML)
    (root / "recipes" / "templates").mkdir(parents=True, exist_ok=True)
    (root / "patches").mkdir(exist_ok=True)
    if examples:
        for sub in ("recipes", "patches"):
            shutil.copytree(REPO / sub, root / sub, dirs_exist_ok=True)
    for name, text in (patches or {"fix.patch": PATCH}).items():
        (root / "patches" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "patches" / name).write_text(text)
    for name, text in (templates or {}).items():
        (root / "recipes" / "templates" / name).write_text(textwrap.dedent(text))
    for name, text in (recipes or {}).items():
        (root / "recipes" / f"{name}.yaml").write_text(textwrap.dedent(text))
    return root


def line_of(root: Path, recipe: str, needle: str) -> int:
    """1-based line of the first line of recipes/<recipe>.yaml containing needle."""
    for i, line in enumerate((root / "recipes" / f"{recipe}.yaml").read_text().splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(f"{needle!r} not in {recipe}")
