"""Paths named by recipes (patches, templates): resolved inside their folder or refused."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from kpipe.errors import ConfigError

if TYPE_CHECKING:
    from kpipe.workspace import Workspace


class PathRefused(ConfigError):
    """A recipe path that is absolute, climbs out with '..', or resolves outside its folder."""


def safe_path(base: Path, rel: str, what: str) -> Path:
    """`rel` resolved inside `base`; ConfigError when it leaves base (.., absolute, symlink) or is missing."""
    base_name = base.name + "/"
    if not isinstance(rel, str) or not rel.strip():
        raise PathRefused(f"{what} path is empty", hint=f"name a file inside {base_name}")
    if any(ord(ch) < 32 for ch in rel) or "\\" in rel:
        raise PathRefused(f"{what} path {rel!r} contains control characters or backslashes",
                          hint="use a plain relative path with '/' separators")
    p = PurePosixPath(rel)
    if p.is_absolute() or rel.startswith("~"):
        raise PathRefused(f"{what} path {rel!r} is absolute; it must be inside {base_name}",
                          hint=f"name a file relative to {base_name}")
    if ".." in p.parts:
        raise PathRefused(f"{what} path {rel!r} climbs out with '..'; it must stay inside {base_name}",
                          hint=f"name a file relative to {base_name}, e.g. {PurePosixPath(rel).name}")
    full = base / p
    try:
        resolved = full.resolve(strict=True)
    except FileNotFoundError:
        raise ConfigError(f"{what} {rel!r} does not exist in {base_name}",
                          hint=f"create {base_name}{rel} or fix the name") from None
    except (OSError, RuntimeError) as e:  # symlink loops
        raise PathRefused(f"{what} path {rel!r} cannot be resolved: {e}",
                          hint="check for symlink loops") from None
    if not resolved.is_relative_to(base.resolve()):
        raise PathRefused(f"{what} path {rel!r} resolves outside {base_name} (through a symlink) to {resolved}",
                          hint=f"copy the file into {base_name} instead of linking it")
    if not resolved.is_file():
        raise ConfigError(f"{what} {rel!r} is not a regular file", hint=f"name a file inside {base_name}")
    return resolved


def resolve_patch_path(ws: Workspace, rel: str) -> Path:
    """A recipe's patch path, inside patches/ (a leading 'patches/' is accepted)."""
    base = Path(ws.patches_dir)
    if isinstance(rel, str) and rel.startswith(base.name + "/") and not (base / rel).exists():
        rel = rel[len(base.name) + 1:]
    return safe_path(base, rel, "patch")


def resolve_template_path(ws: Workspace, rel: str) -> Path:
    """A template path: 'recipes/...' or 'patches/...', else relative to recipes/; never outside them."""
    recipes, patches = Path(ws.recipes_dir), Path(ws.patches_dir)
    for base in (recipes, patches):
        prefix = base.name + "/"
        if isinstance(rel, str) and rel.startswith(prefix) and not (recipes / rel).exists():
            return safe_path(base, rel[len(prefix):], "template")
    return safe_path(recipes, rel, "template")
