"""Finding and loading recipe files: Recipe, list_recipes, load_recipe, kernel matching."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kpipe.errors import ConfigError, NotFoundError
from kpipe.kernel import normalize_arch
from kpipe.recipes.problems import _did_you_mean, _Problems, _raise_first
from kpipe.recipes.schema import _NAME_RE, MAX_RECIPE_BYTES, MAX_YAML_NODES, RECIPE_SUFFIXES, KeyPath, _check_schema
from kpipe.yamlnodes import YamlError, compose_yaml

if TYPE_CHECKING:
    from kpipe.workspace import Workspace


@dataclass(frozen=True)
class Recipe:
    """A loaded, schema-checked (not yet rendered) recipe."""

    name: str
    file: Path
    builder: str
    kernels: tuple[str, ...]
    description: str = ""
    arches: tuple[str, ...] = ()  # empty: every arch the kernel patterns match
    data: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    lines: dict[KeyPath, int] = field(default_factory=dict, compare=False, repr=False)
    key_lines: dict[KeyPath, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def options(self) -> dict[str, Any]:
        """The recipe's `options:` mapping (template inputs)."""
        return dict(self.data.get("options") or {})

    def matches(self, release: str, arch: str = "") -> bool:
        """True if one of the recipe's kernel names or globs matches `release` and (when known) its arch is
        one of the recipe's `arches:`."""
        if self.arches and arch and normalize_arch(arch) not in self.arches:
            return False
        return any(fnmatch.fnmatchcase(release, pattern) for pattern in self.kernels)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for --json."""
        return {"name": self.name, "file": str(self.file), "builder": self.builder, "kernels": list(self.kernels),
                "description": self.description, "patches": list(self.data.get("patches") or [])}


def _display(ws: Workspace, path: Path) -> str:
    """A path as the user should read it: relative to the workspace root when inside it."""
    try:
        return str(path.relative_to(ws.root))
    except ValueError:
        return str(path)


def _recipe_files(ws: Workspace) -> list[Path]:
    d = Path(ws.recipes_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.suffix in RECIPE_SUFFIXES and not p.name.startswith("."))


def _read_recipe(ws: Workspace, file: Path, probs: _Problems) -> Recipe | None:
    """Parse and schema-check one recipe file; problems go to `probs`; None when unusable."""
    try:
        if file.is_symlink() and not file.resolve().is_relative_to(Path(ws.recipes_dir).resolve()):
            probs.error((), "the recipe file is a symlink pointing outside recipes/", "copy the file in instead")
            return None
        raw = file.read_bytes()
    except OSError as e:
        probs.error((), f"cannot read the recipe: {e.strerror}", "check the file's permissions")
        return None
    if len(raw) > MAX_RECIPE_BYTES:
        probs.error((), f"the recipe is {len(raw)} bytes; at most {MAX_RECIPE_BYTES} are allowed",
                    "move large text into template files under recipes/")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        probs.error((), f"the recipe is not UTF-8 text (byte {e.start})", "save it as UTF-8")
        return None
    try:
        data, lines, key_lines = compose_yaml(text, what="recipe", max_nodes=MAX_YAML_NODES,
                                              empty_hint="a recipe needs at least `builder:` and `kernels:`")
    except YamlError as e:
        probs.error((), e.message, e.hint, line=e.line)
        return None
    probs.lines, probs.key_lines = lines, key_lines
    probs.data = data
    if not isinstance(data, dict):
        probs.error((), "a recipe must be a YAML mapping (key: value lines)", "start with `builder: kbuild`")
        return None
    _check_schema(data, probs, rendered=False)
    stem = file.stem
    name = data.get("name", stem)
    if isinstance(name, str) and name != stem:
        probs.error(("name",), f"name {name!r} differs from the file name {file.name!r}",
                    f"rename the file to {name}{file.suffix} or set `name: {stem}`")
    if not _NAME_RE.fullmatch(stem):
        probs.error((), f"recipe file name {file.name!r} is not a valid recipe name",
                    "use letters, digits, '.', '_' and '-' (at most 64), starting with a letter or digit")
    if probs.errors:
        return None
    return Recipe(name=stem, file=file, builder=data["builder"], kernels=tuple(data["kernels"]),
                  arches=tuple(normalize_arch(str(a)) for a in data.get("arches") or ()),
                  description=data.get("description", "") if isinstance(data.get("description"), str) else "",
                  data=data, lines=lines, key_lines=key_lines)


def list_recipes(ws: Workspace) -> list[Recipe]:
    """Every recipe in the workspace, sorted by name; ConfigError on the first broken one."""
    out = []
    for file in _recipe_files(ws):
        probs = _Problems(_display(ws, file))
        recipe = _read_recipe(ws, file, probs)
        _raise_first(probs.items, file.name)
        assert recipe is not None
        out.append(recipe)
    names = [r.name for r in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{_display(ws, Path(ws.recipes_dir))}: recipe names repeat: {', '.join(dup)}",
                          hint="keep one of NAME.yaml / NAME.yml")
    return out


def load_recipe(ws: Workspace, name: str) -> Recipe:
    """The recipe named `name` (recipes/NAME.yaml); NotFoundError lists the known ones."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(f"invalid recipe name {name!r}",
                          hint="a recipe name is the file name without .yaml: letters, digits, '.', '_', '-'")
    for suffix in RECIPE_SUFFIXES:
        file = Path(ws.recipes_dir) / f"{name}{suffix}"
        if file.is_file():
            probs = _Problems(_display(ws, file))
            recipe = _read_recipe(ws, file, probs)
            _raise_first(probs.items, file.name)
            assert recipe is not None
            return recipe
    known = [p.stem for p in _recipe_files(ws)]
    raise NotFoundError(f"no recipe named {name!r} in {_display(ws, Path(ws.recipes_dir))}",
                        hint=_did_you_mean(name, known) + f"known recipes: {', '.join(known) or 'none'}")


def kernels_for_recipe(ws: Workspace, recipe: Recipe) -> list[str]:
    """Catalog releases that one of the recipe's names or globs matches, sorted."""
    return sorted(r for r, entry in ws.kernels.items() if recipe.matches(r, entry.arch))


def recipes_for_kernel(ws: Workspace, release: str) -> list[Recipe]:
    """Every recipe targeting `release` (by name or glob)."""
    from kpipe.kernel import check_release

    check_release(release)
    entry = ws.kernels.get(release)
    return [r for r in list_recipes(ws) if r.matches(release, entry.arch if entry else "")]


def recipe_files(ws: Workspace) -> list[Path]:
    """The recipe files of the workspace (recipes/*.yaml, *.yml), sorted."""
    return _recipe_files(ws)
