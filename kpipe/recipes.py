"""Patch recipes: YAML files in recipes/, rendered per target kernel into a BuildSpec.

A recipe is data, its string fields are Jinja2 templates rendered in a
SandboxedEnvironment with StrictUndefined, and every problem carries the
file and line it comes from. The YAML is composed into a node tree (not
loaded straight into Python objects) so that every value keeps its line.

Template variables: `kernel` (the parsed release: release, version, distro,
flavour, arch, ...; arch/distro from the catalog when it says more),
`options` (the recipe's `options:`, keys overridden by the catalog entry's
options of the same name) and `recipe` (the recipe's name). File templates
(kbuild sources and the Kbuild file) also see `module` (the module name) and
`module_sysfs` (the name sysfs and lsmod show, '-' as '_').

Nothing here runs a command: every value, shell metacharacters included,
stays data until a builder puts it into an argv tuple.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import yaml
from jinja2 import BaseLoader, StrictUndefined, TemplateNotFound, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment, SecurityError

from kpipe.errors import ConfigError, NotFoundError

BUILDERS = ("kpatch-build", "kbuild")
ROLLBACK_POLICIES = ("failed", "wave", "all")
MODULE_NAME_MAX = 55  # the kernel's module name field is 56 bytes with the NUL (MODULE_NAME_LEN)
MAX_RECIPE_BYTES = 1 << 20
MAX_TEMPLATE_BYTES = 1 << 20
MAX_RENDERED_CHARS = 1 << 20
MAX_YAML_NODES = 20_000  # stops alias bombs ("billion laughs") while composing
RECIPE_SUFFIXES = (".yaml", ".yml")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MODULE_RE = re.compile(r"[A-Za-z0-9_-]{1,%d}" % MODULE_NAME_MAX)
_SOURCE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}")
_GLOB_RE = re.compile(r"[0-9A-Za-z._+~*?\[\]!-]{1,64}")
_MAKE_ARG_RE = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*=[^\x00-\x1f]*|-j\d{1,4}|-k|-s)")
_MAKE_RESERVED = ("M", "KBUILD_EXTMOD", "O", "KBUILD_OUTPUT", "src", "obj")
_TEMPLATE_MARK = re.compile(r"\{\{|\{%|\{#")
_DURATION_RE = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")

# Keys whose values are never rendered: identity and matching happen before rendering,
# and `options` are the template's inputs.
_NOT_RENDERED = ("name", "builder", "kernels", "options")


# --- problems --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One finding of `lint` (or the reason `load`/`render` failed): file:line, message, hint."""

    file: str
    line: int
    message: str
    hint: str = ""
    severity: str = "error"  # error | warning

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for --json."""
        return asdict(self)


class _Problems:
    """Collects problems for one file; `line(path)` finds the nearest known line of a value."""

    def __init__(self, file: str, lines: dict[tuple, int] | None = None,
                 key_lines: dict[tuple, int] | None = None, context: str = ""):
        self.file = file
        self.lines = lines or {}
        self.key_lines = key_lines or {}
        self.context = context  # e.g. "kernel 5.10.0-amd64-UOS"
        self.items: list[Problem] = []
        self.data: Any = None  # the parsed YAML, when it parsed

    def line(self, path: tuple, key: bool = False) -> int:
        if key and path in self.key_lines:
            return self.key_lines[path]
        p = path
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get((), 1)

    def error(self, path: tuple, message: str, hint: str = "", *, key: bool = False, file: str | None = None,
              line: int | None = None) -> None:
        self._add("error", path, message, hint, key, file, line)

    def warning(self, path: tuple, message: str, hint: str = "", *, key: bool = False) -> None:
        self._add("warning", path, message, hint, key, None, None)

    def _add(self, severity: str, path: tuple, message: str, hint: str, key: bool, file: str | None,
             line: int | None) -> None:
        if self.context:
            message = f"{message} ({self.context})"
        hint = hint or "run `kpipe recipe lint` for every problem; README.md documents the recipe format"
        self.items.append(Problem(file or self.file, line if line is not None else self.line(path, key), message,
                                  hint, severity))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.items if p.severity == "error"]


def _raise_first(problems: list[Problem], what: str) -> None:
    errors = [p for p in problems if p.severity == "error"]
    if not errors:
        return
    first = errors[0]
    more = f" (+{len(errors) - 1} more problem(s): run `kpipe recipe lint`)" if len(errors) > 1 else ""
    raise ConfigError(f"{first}{more}", hint=first.hint or f"fix {what}")


def _field(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "recipe"


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


# --- YAML with line numbers -----------------------------------------------------------------------


class _YamlFail(Exception):
    def __init__(self, line: int, message: str, hint: str = ""):
        super().__init__(message)
        self.line, self.message, self.hint = line, message, hint


_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


def _compose_yaml(text: str) -> tuple[Any, dict[tuple, int], dict[tuple, int]]:
    """YAML text -> (plain data, value lines, key lines); lines are 1-based, keyed by path tuples.

    A block scalar (`|` or `>`) is recorded at the line after its indicator, where its text starts.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "syntax error"
        raise _YamlFail(mark.line + 1 if mark else 1, f"broken YAML: {problem}",
                        "check indentation, quoting and that `key: value` pairs line up") from None
    except yaml.YAMLError as e:
        raise _YamlFail(1, f"broken YAML: {e}", "check the file's syntax") from None
    if root is None:
        raise _YamlFail(1, "the recipe is empty", "a recipe needs at least `builder:` and `kernels:`")

    constructor = yaml.constructor.SafeConstructor()
    lines: dict[tuple, int] = {}
    key_lines: dict[tuple, int] = {}
    budget = [MAX_YAML_NODES]

    def convert(node: Any, path: tuple, depth: int) -> Any:
        budget[0] -= 1
        line = node.start_mark.line + 1
        if budget[0] < 0 or depth > 32:
            # an alias points back at its anchor's line; name the top-level key being expanded instead
            where = key_lines.get(path[:1], line)
            raise _YamlFail(where, "the YAML is too large or too deeply nested (alias expansion?)",
                            "a recipe is a small document; do not nest anchors and aliases")
        lines[path] = line
        if node.tag not in _PLAIN_TAGS and not isinstance(node, yaml.ScalarNode):
            raise _YamlFail(line, f"unsupported YAML tag {node.tag!r} in {_field(path)}",
                            "use plain strings, numbers, booleans, lists and mappings")
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for k, v in node.value:
                kline = k.start_mark.line + 1
                if k.tag == "tag:yaml.org,2002:merge":
                    raise _YamlFail(kline, "YAML merge keys (<<) are not supported in recipes",
                                    "write the keys out")
                if not isinstance(k, yaml.ScalarNode):
                    raise _YamlFail(kline, "a mapping key must be a plain string", "write `key: value`")
                key = constructor.construct_object(k)
                if not isinstance(key, str):
                    raise _YamlFail(kline, f"mapping key {key!r} must be a string", "quote it")
                if key in out:
                    raise _YamlFail(kline, f"duplicate key {key!r} in {_field(path)}",
                                    f"it is already set on line {key_lines[path + (key,)]}")
                key_lines[path + (key,)] = kline
                out[key] = convert(v, path + (key,), depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [convert(v, path + (i,), depth + 1) for i, v in enumerate(node.value)]
        if node.style in ("|", ">"):
            lines[path] = line + 1  # the text starts on the line after the indicator
        try:
            value = constructor.construct_object(node)
        except yaml.YAMLError as e:
            raise _YamlFail(line, f"unsupported YAML value: {getattr(e, 'problem', e)}",
                            "use plain strings, numbers, booleans, lists and mappings") from None
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise _YamlFail(line, f"unsupported YAML value of type {type(value).__name__} in {_field(path)}",
                            "quote it to make it a string")
        return value

    try:
        data = convert(root, (), 0)
    except RecursionError:
        raise _YamlFail(1, "the YAML nests too deeply", "a recipe is a small, flat document") from None
    return data, lines, key_lines


# --- recipes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A loaded, schema-checked (not yet rendered) recipe."""

    name: str
    file: Path
    builder: str
    kernels: tuple[str, ...]
    description: str = ""
    data: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    lines: dict[tuple, int] = field(default_factory=dict, compare=False, repr=False)
    key_lines: dict[tuple, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def options(self) -> dict[str, Any]:
        """The recipe's `options:` mapping (template inputs)."""
        return dict(self.data.get("options") or {})

    def matches(self, release: str) -> bool:
        """True if one of the recipe's kernel names or globs matches `release`."""
        return any(fnmatch.fnmatchcase(release, pattern) for pattern in self.kernels)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for --json."""
        return {"name": self.name, "file": str(self.file), "builder": self.builder, "kernels": list(self.kernels),
                "description": self.description, "patches": list(self.data.get("patches") or [])}


def _display(ws: Any, path: Path) -> str:
    """A path as the user should read it: relative to the workspace root when inside it."""
    try:
        return str(path.relative_to(ws.root))
    except ValueError:
        return str(path)


def _recipe_files(ws: Any) -> list[Path]:
    d = Path(ws.recipes_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.suffix in RECIPE_SUFFIXES and not p.name.startswith("."))


def _read_recipe(ws: Any, file: Path, probs: _Problems) -> Recipe | None:
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
        data, lines, key_lines = _compose_yaml(text)
    except _YamlFail as e:
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
                  description=data.get("description", "") if isinstance(data.get("description"), str) else "",
                  data=data, lines=lines, key_lines=key_lines)


def list_recipes(ws: Any) -> list[Recipe]:
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


def load_recipe(ws: Any, name: str) -> Recipe:
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


def kernels_for_recipe(ws: Any, recipe: Recipe) -> list[str]:
    """Catalog releases that one of the recipe's names or globs matches, sorted."""
    return sorted(r for r in ws.kernels if recipe.matches(r))


def recipes_for_kernel(ws: Any, release: str) -> list[Recipe]:
    """Every recipe targeting `release` (by name or glob)."""
    from kpipe.kernel import check_release

    check_release(release)
    return [r for r in list_recipes(ws) if r.matches(release)]


# --- schema ----------------------------------------------------------------------------------------

_TOP_KEYS = ("name", "description", "builder", "kernels", "patches", "options", "kpatch", "kbuild", "signing",
             "rollout")
_KPATCH_KEYS = ("jobs", "non_replace", "targets", "skip_compiler_check", "module_name")
_KBUILD_KEYS = ("sources", "kbuild", "make_args", "module_name")
_SOURCE_KEYS = ("template", "name")
_SIGNING_KEYS = ("sign", "signer")
_ROLLOUT_KEYS = ("waves", "max_failures", "soak", "rollback", "probe")
_PROBE_KEYS = ("argv", "expect", "expect_after_rollback")


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and bool(_TEMPLATE_MARK.search(value))


def _check_keys(d: dict, allowed: tuple[str, ...], path: tuple, probs: _Problems) -> None:
    for key in d:
        if key not in allowed:
            probs.error(path + (key,), f"unknown key {key!r} in {_field(path)}",
                        _did_you_mean(key, allowed) + f"allowed keys: {', '.join(allowed)}", key=True)


class _Checker:
    """Typed field checks that coerce rendered strings ("4" -> 4) and return normalised values."""

    def __init__(self, probs: _Problems, rendered: bool):
        self.probs, self.rendered = probs, rendered

    def deferred(self, value: Any) -> bool:
        # Before rendering, a template string can stand for any type; check it after rendering.
        return not self.rendered and _is_template(value)

    def string(self, d: dict, key: str, path: tuple, *, required: bool = False, nonempty: bool = False) -> Any:
        p = path + (key,)
        if key not in d:
            if required:
                self.probs.error(path, f"{_field(p)} is required", f"add `{key}:`")
            return None
        v = d[key]
        if not isinstance(v, str):
            self.probs.error(p, f"{_field(p)} must be a string, got {_type(v)}", "quote the value")
            return None
        if nonempty and not v.strip():
            self.probs.error(p, f"{_field(p)} must not be empty", f"give `{key}:` a value or remove it")
        return v

    def boolean(self, d: dict, key: str, path: tuple) -> Any:
        p = path + (key,)
        if key not in d:
            return None
        v = d[key]
        if isinstance(v, bool) or self.deferred(v):
            return v
        if self.rendered and isinstance(v, str) and v.strip().lower() in ("true", "yes", "on", "false", "no", "off"):
            return v.strip().lower() in ("true", "yes", "on")
        self.probs.error(p, f"{_field(p)} must be true or false, got {_type(v)} {v!r}", "write true or false")
        return None

    def integer(self, d: dict, key: str, path: tuple, *, minimum: int = 0, maximum: int = 1 << 20) -> Any:
        p = path + (key,)
        if key not in d:
            return None
        v = d[key]
        if self.deferred(v):
            return v
        if self.rendered and isinstance(v, str) and re.fullmatch(r"\s*\d+\s*", v):
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            self.probs.error(p, f"{_field(p)} must be an integer, got {_type(v)} {v!r}", "write a whole number, e.g. 4")
            return None
        if not minimum <= v <= maximum:
            self.probs.error(p, f"{_field(p)} must be between {minimum} and {maximum}, got {v}",
                             f"use a value from {minimum} to {maximum}")
            return None
        return v

    def str_list(self, d: dict, key: str, path: tuple, *, required: bool = False, nonempty: bool = False) -> Any:
        p = path + (key,)
        if key not in d:
            if required:
                self.probs.error(path, f"{_field(p)} is required", f"add `{key}:` with a list")
            return None
        v = d[key]
        if not isinstance(v, list):
            self.probs.error(p, f"{_field(p)} must be a list of strings, got {_type(v)}",
                             f"write it as a YAML list, e.g. `{key}: [a, b]`")
            return None
        if nonempty and not v:
            self.probs.error(p, f"{_field(p)} must not be empty", f"list at least one item under `{key}:`")
        out = []
        for i, item in enumerate(v):
            if not isinstance(item, str):
                self.probs.error(p + (i,), f"{_field(p + (i,))} must be a string, got {_type(item)}",
                                 "quote it")
            elif not item.strip():
                self.probs.error(p + (i,), f"{_field(p + (i,))} must not be empty", "remove the empty item")
            else:
                out.append(item)
        return out

    def table(self, d: dict, key: str, path: tuple, allowed: tuple[str, ...] | None) -> dict | None:
        p = path + (key,)
        if key not in d or d[key] is None:
            return None
        v = d[key]
        if not isinstance(v, dict):
            self.probs.error(p, f"{_field(p)} must be a mapping, got {_type(v)}",
                             "write `key: value` lines indented under it")
            return None
        if allowed is not None:
            _check_keys(v, allowed, p, self.probs)
        return v


def _type(v: Any) -> str:
    return {type(None): "nothing", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(v), type(v).__name__)


def _check_schema(data: dict, probs: _Problems, *, rendered: bool) -> dict[str, Any]:
    """Check the whole recipe; returns normalised sections (meaningful once rendered)."""
    c = _Checker(probs, rendered)
    _check_keys(data, _TOP_KEYS, (), probs)
    out: dict[str, Any] = {}
    name = c.string(data, "name", ())
    if isinstance(name, str) and not _NAME_RE.fullmatch(name):
        probs.error(("name",), f"name {name!r} is not a valid recipe name",
                    "use letters, digits, '.', '_' and '-' (at most 64), starting with a letter or digit")
    out["description"] = c.string(data, "description", ()) or ""
    builder = c.string(data, "builder", (), required=True)
    if isinstance(builder, str) and builder not in BUILDERS:
        probs.error(("builder",), f"builder {builder!r} is not one of {', '.join(BUILDERS)}",
                    _did_you_mean(builder, BUILDERS) + "kpatch-build diffs a patched kernel tree; kbuild builds "
                    "livepatch source against kernel headers")
    out["builder"] = builder
    kernels = c.str_list(data, "kernels", (), required=True, nonempty=True) or []
    for i, pattern in enumerate(kernels):
        if not _GLOB_RE.fullmatch(pattern):
            probs.error(("kernels", i), f"kernel pattern {pattern!r} is not a release name or glob",
                        "a release (`uname -r`) or a glob such as 5.10.0-*-UOS; letters, digits, . _ + ~ - * ? [ ]")
    out["kernels"] = kernels
    patches = c.str_list(data, "patches", ()) or []
    out["patches"] = patches
    opts = c.table(data, "options", (), None)
    out["options"] = opts or {}

    kp = c.table(data, "kpatch", (), _KPATCH_KEYS)
    kb = c.table(data, "kbuild", (), _KBUILD_KEYS)
    if builder == "kpatch-build":
        if not patches and "patches" not in data:
            probs.error((), "a kpatch-build recipe needs `patches:`",
                        "list the patch files under patches/, e.g. `patches: [fix.patch]`")
        elif not patches and isinstance(data.get("patches"), list):
            probs.error(("patches",), "a kpatch-build recipe needs at least one patch",
                        "list the patch files under patches/, e.g. `patches: [fix.patch]`")
        if kb is not None:
            probs.error(("kbuild",), "`kbuild:` is set but the builder is kpatch-build",
                        "remove `kbuild:` or set `builder: kbuild`", key=True)
    if builder == "kbuild":
        if kp is not None:
            probs.error(("kpatch",), "`kpatch:` is set but the builder is kbuild",
                        "remove `kpatch:` or set `builder: kpatch-build`", key=True)
        if kb is None:
            probs.error((), "a kbuild recipe needs `kbuild:` with `sources:`",
                        "add kbuild: {sources: [{template: templates/x.c.j2, name: x.c}]}")
    kpatch: dict[str, Any] = {}
    if kp is not None:
        path = ("kpatch",)
        kpatch["jobs"] = c.integer(kp, "jobs", path, minimum=1, maximum=4096)
        kpatch["non_replace"] = c.boolean(kp, "non_replace", path)
        kpatch["targets"] = c.str_list(kp, "targets", path)
        for i, t in enumerate(kpatch["targets"] or []):
            if (rendered or not _is_template(t)) and not re.fullmatch(r"[A-Za-z0-9_./-]+", t) or t.startswith("-"):
                probs.error(path + ("targets", i), f"make target {t!r} is not a plain target name",
                            "e.g. vmlinux, modules, bzImage")
        kpatch["skip_compiler_check"] = c.boolean(kp, "skip_compiler_check", path)
        kpatch["module_name"] = _module_name(c, kp, path, rendered)
        kpatch = {k: v for k, v in kpatch.items() if v is not None}
    out["kpatch"] = kpatch
    kbuild: dict[str, Any] = {}
    if kb is not None:
        path = ("kbuild",)
        sources = kb.get("sources")
        norm_sources = []
        if "sources" not in kb:
            probs.error(path, "kbuild.sources is required", "add sources: [{template: ..., name: ...}]")
        elif not isinstance(sources, list) or not sources:
            probs.error(path + ("sources",), "kbuild.sources must be a non-empty list of {template, name}",
                        "e.g. sources: [{template: templates/x.c.j2, name: x.c}]")
        else:
            for i, s in enumerate(sources):
                sp = path + ("sources", i)
                if not isinstance(s, dict):
                    probs.error(sp, f"{_field(sp)} must be a mapping with template: and name:",
                                "e.g. {template: templates/x.c.j2, name: x.c}")
                    continue
                _check_keys(s, _SOURCE_KEYS, sp, probs)
                tmpl = c.string(s, "template", sp, required=True, nonempty=True)
                sname = c.string(s, "name", sp, required=True, nonempty=True)
                if isinstance(sname, str) and (rendered or not _is_template(sname)):
                    _check_source_name(sname, sp + ("name",), probs)
                norm_sources.append({"template": tmpl, "name": sname})
            names = [s["name"] for s in norm_sources if isinstance(s["name"], str)]
            for i, n in enumerate(names):
                if names.index(n) != i and (rendered or not _is_template(n)):
                    probs.error(path + ("sources", i, "name"), f"two sources are both named {n!r}",
                                "give every output file its own name")
        kbuild["sources"] = norm_sources
        kbuild["kbuild"] = c.string(kb, "kbuild", path, nonempty=True)
        margs = c.str_list(kb, "make_args", path) or []
        for i, a in enumerate(margs):
            if rendered or not _is_template(a):
                _check_make_arg(a, path + ("make_args", i), probs)
        kbuild["make_args"] = margs
        kbuild["module_name"] = _module_name(c, kb, path, rendered)
        kbuild = {k: v for k, v in kbuild.items() if v is not None}
    out["kbuild"] = kbuild

    sg = c.table(data, "signing", (), _SIGNING_KEYS)
    signing: dict[str, Any] = {}
    if sg is not None:
        signing["sign"] = c.boolean(sg, "sign", ("signing",))
        signing["signer"] = c.string(sg, "signer", ("signing",), nonempty=True)
        if signing["signer"] is not None and (rendered or not _is_template(signing["signer"])):
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", signing["signer"]):
                probs.error(("signing", "signer"), f"signer {signing['signer']!r} is not a signer name",
                            "name a signer of kpipe.toml [signing.signers]")
        signing = {k: v for k, v in signing.items() if v is not None}
    out["signing"] = signing

    ro = c.table(data, "rollout", (), _ROLLOUT_KEYS)
    out["rollout"], out["probe"] = _check_rollout(ro, c, probs, rendered) if ro is not None else ({}, None)
    return out


def _module_name(c: _Checker, d: dict, path: tuple, rendered: bool) -> Any:
    v = c.string(d, "module_name", path, nonempty=True)
    if isinstance(v, str) and (rendered or not _is_template(v)) and not _MODULE_RE.fullmatch(v):
        c.probs.error(path + ("module_name",), f"module name {v!r} is not a valid module name",
                      f"use letters, digits, '_' and '-', at most {MODULE_NAME_MAX} characters")
        return None
    return v


def _check_source_name(name: str, path: tuple, probs: _Problems) -> None:
    if not _SOURCE_NAME_RE.fullmatch(name) or name in (".", ".."):
        probs.error(path, f"source file name {name!r} must be a plain file name",
                    "letters, digits, '_', '.', '+', '-'; no '/' (it is written into the build folder)")
    elif name in ("Kbuild", "Makefile"):
        probs.error(path, f"source file name {name!r} is reserved", "use `kbuild.kbuild:` for the Kbuild template")
    elif not name.endswith((".c", ".h", ".S")):
        probs.error(path, f"source file name {name!r} should end in .c, .h or .S", "e.g. livepatch-fix.c")


def _check_make_arg(arg: str, path: tuple, probs: _Problems) -> None:
    if not _MAKE_ARG_RE.fullmatch(arg):
        probs.error(path, f"make argument {arg!r} is not VAR=value or -jN",
                    "kpipe runs make with -C <headers> M=<build folder>; pass only variables such as KCFLAGS=-O2")
        return
    var = arg.split("=", 1)[0]
    if var in _MAKE_RESERVED:
        probs.error(path, f"make argument {var}= is set by kpipe itself", "remove it")


def _percent_or_int(v: Any, p: tuple, c: _Checker, *, minimum: int, what: str) -> Any:
    if c.deferred(v):
        return v
    if isinstance(v, str) and c.rendered and re.fullmatch(r"\s*\d+\s*", v):
        v = int(v)
    if isinstance(v, int) and not isinstance(v, bool):
        if v < minimum:
            c.probs.error(p, f"{_field(p)} must be at least {minimum}, got {v}", "e.g. 1, 10 or '25%'")
            return None
        return v
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", v)
        if m and 0 < float(m.group(1)) <= 100:
            return f"{m.group(1)}%"
    c.probs.error(p, f"{_field(p)} must be {what}, got {_type(v)} {v!r}", "e.g. 1, 10 or '25%'")
    return None


def parse_duration(value: Any) -> float | None:
    """Seconds from 30, 30s, 5m, 1h30m; None when the value is not a duration."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value >= 0 else None
    if not isinstance(value, str) or not value.strip():
        return None
    m = _DURATION_RE.fullmatch(value.strip())
    if not m or not any(m.groups()):
        return None
    h, mi, s = (float(x) if x else 0.0 for x in m.groups())
    return h * 3600 + mi * 60 + s


def _check_rollout(ro: dict, c: _Checker, probs: _Problems, rendered: bool) -> tuple[dict, dict | None]:
    path = ("rollout",)
    out: dict[str, Any] = {}
    if "waves" in ro:
        waves = ro["waves"]
        if not isinstance(waves, list) or not waves:
            probs.error(path + ("waves",), "rollout.waves must be a non-empty list",
                        "e.g. waves: [1, '10%', '100%']")
        else:
            out["waves"] = [_percent_or_int(w, path + ("waves", i), c, minimum=1, what="a host count or a percentage")
                            for i, w in enumerate(waves)]
    if "max_failures" in ro:
        out["max_failures"] = _percent_or_int(ro["max_failures"], path + ("max_failures",), c, minimum=0,
                                              what="a host count or a percentage")
    if "soak" in ro:
        v = ro["soak"]
        if not c.deferred(v):
            seconds = parse_duration(v)
            if seconds is None:
                probs.error(path + ("soak",), f"rollout.soak must be a duration, got {_type(v)} {v!r}",
                            "seconds, or 30s / 5m / 1h")
            else:
                out["soak"] = int(seconds) if seconds == int(seconds) else seconds
    rb = c.string(ro, "rollback", path)
    if isinstance(rb, str) and (rendered or not _is_template(rb)):
        if rb not in ROLLBACK_POLICIES:
            probs.error(path + ("rollback",), f"rollout.rollback {rb!r} is not one of {', '.join(ROLLBACK_POLICIES)}",
                        _did_you_mean(rb, ROLLBACK_POLICIES) + "failed: the failed hosts; wave: the whole wave; "
                        "all: every host patched so far")
        else:
            out["rollback"] = rb
    probe = None
    pr = c.table(ro, "probe", path, _PROBE_KEYS)
    if pr is not None:
        pp = path + ("probe",)
        argv = c.str_list(pr, "argv", pp, required=True, nonempty=True)
        expect = c.string(pr, "expect", pp, required=True, nonempty=True)
        after = c.string(pr, "expect_after_rollback", pp)
        for key, rx in (("expect", expect), ("expect_after_rollback", after)):
            if isinstance(rx, str) and (rendered or not _is_template(rx)):
                try:
                    re.compile(rx)
                except re.error as e:
                    probs.error(pp + (key,), f"rollout.probe.{key} is not a valid regular expression: {e}",
                                "it is a Python regex searched in the probe's output; escape ( ) [ ] . * + ?")
        if argv and isinstance(expect, str):
            probe = {"argv": argv, "expect": expect, "expect_after_rollback": after or ""}
    return out, probe


# --- the sandbox -----------------------------------------------------------------------------------


def _sandbox(loader: Any) -> Any:
    """A SandboxedEnvironment with StrictUndefined, no autoescape, and size limits on * and **."""
    limit = MAX_RENDERED_CHARS

    class _Sandbox(SandboxedEnvironment):
        # Intercepted so that "{{ 'x' * 10**9 }}" fails fast instead of eating the machine's memory.
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise SecurityError("exponent too large in template")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > limit:
                        raise SecurityError("repetition too large in template")
            return super().call_binop(context, operator, left, right)

    env = _Sandbox(loader=loader, undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True,
                   auto_reload=False)
    env.filters["c_string"] = c_string
    return env


def c_string(value: Any) -> str:
    """A C string literal (with quotes) holding `value`: templates use `{{ x | c_string }}` in C sources."""
    out = ['"']
    for byte in str(value).encode("utf-8"):
        ch = chr(byte)
        if ch in '"\\?':  # '?' too: no trigraphs
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif 32 <= byte < 127:
            out.append(ch)
        else:  # control characters and UTF-8 bytes: octal escapes are exact and never run on
            out.append(f"\\{byte:03o}")
    out.append('"')
    return "".join(out)


def _template_line(exc: BaseException, filename: str) -> int | None:
    """The template line a runtime error happened on (Jinja rewrites tracebacks to template lines)."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _jinja_error(exc: BaseException) -> tuple[str, str]:
    """(message, hint) for an exception raised while compiling or rendering a template."""
    if isinstance(exc, SecurityError):
        return (f"template sandbox violation: {exc}",
                "templates may only read `kernel`, `options`, `recipe` (and `module` in file templates); "
                "attributes starting with '_' and unsafe methods are blocked")
    if isinstance(exc, UndefinedError):
        return (f"undefined template variable: {exc.message or exc}",
                "available: kernel.{release,version,distro,distro_release,abi,flavour,arch,upstream,family}, "
                "options.<key from `options:`>, recipe; add missing keys under `options:`")
    if isinstance(exc, TemplateSyntaxError):
        return f"template syntax error: {exc.message}", "check {{ }} / {% %} pairs and filter names"
    if isinstance(exc, TemplateNotFound):
        return f"template include not found: {exc.name}", "include only files under recipes/ or patches/"
    return f"template error: {type(exc).__name__}: {exc}", "check the expression in the template"


class _WorkspaceLoader(BaseLoader):
    """Serves the recipe's own strings, and files under recipes/ or patches/ only (no '..', no symlink escapes)."""

    def __init__(self, ws: Any):
        self.ws = ws
        self.sources: dict[str, tuple[str, str]] = {}  # template name -> (text, filename shown in errors)

    def get_source(self, environment: Any, template: str) -> tuple[str, str, Any]:
        if template in self.sources:
            text, filename = self.sources[template]
            return text, filename, lambda: True
        try:
            path = resolve_template_path(self.ws, template)
            text = _read_text(path, MAX_TEMPLATE_BYTES)
        except ConfigError:
            raise TemplateNotFound(template) from None
        return text, str(path), lambda: True


def _read_text(path: Path, limit: int) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    if len(data) > limit:
        raise ConfigError(f"{path} is larger than {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None


# --- paths -----------------------------------------------------------------------------------------


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


def resolve_patch_path(ws: Any, rel: str) -> Path:
    """A recipe's patch path, inside patches/ (a leading 'patches/' is accepted)."""
    base = Path(ws.patches_dir)
    if isinstance(rel, str) and rel.startswith(base.name + "/") and not (base / rel).exists():
        rel = rel[len(base.name) + 1:]
    return safe_path(base, rel, "patch")


def resolve_template_path(ws: Any, rel: str) -> Path:
    """A template path: 'recipes/...' or 'patches/...', else relative to recipes/; never outside them."""
    recipes, patches = Path(ws.recipes_dir), Path(ws.patches_dir)
    for base in (recipes, patches):
        prefix = base.name + "/"
        if isinstance(rel, str) and rel.startswith(prefix) and not (recipes / rel).exists():
            return safe_path(base, rel[len(prefix):], "template")
    return safe_path(recipes, rel, "template")


# --- rendering -------------------------------------------------------------------------------------


def _sanitize_module(name: str) -> str:
    """kpatch-build's rule: characters outside [A-Za-z0-9_-] become '-', then at most 55 characters."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)[:MODULE_NAME_MAX]


def predict_module_name(builder: str, recipe_name: str, patches: list[str], explicit: str | None) -> str:
    """The module name the builder will produce (file <name>.ko; sysfs shows '-' as '_')."""
    if explicit:
        return explicit
    if builder == "kpatch-build" and patches:
        # kpatch-build: livepatch-<first patch's basename without .patch/.diff>, sanitised
        base = PurePosixPath(patches[0]).name
        for suffix in (".patch", ".diff"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
                break
        return _sanitize_module(f"livepatch-{base}")
    return _sanitize_module(f"livepatch-{recipe_name}")


def _kernel_vars(entry: Any) -> tuple[Any, dict[str, Any]]:
    """(KernelRelease, template dict) for a catalog entry; the catalog's arch/distro win over 'unknown'."""
    from kpipe.kernel import parse_release

    k = parse_release(entry.release)
    changes = {}
    if getattr(entry, "arch", "") and entry.arch != "unknown" and k.arch == "unknown":
        changes["arch"] = entry.arch
    if getattr(entry, "distro", "") and entry.distro != "unknown" and k.distro == "unknown":
        changes["distro"] = entry.distro
    if changes:
        k = replace(k, **changes)
    return k, k.to_dict()


def _render_tree(env: Any, value: Any, path: tuple, variables: dict, probs: _Problems,
                 loader: _WorkspaceLoader) -> Any:
    if isinstance(value, dict):
        return {k: (v if not path and k in _NOT_RENDERED else _render_tree(env, v, path + (k,), variables, probs,
                                                                           loader))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_render_tree(env, v, path + (i,), variables, probs, loader) for i, v in enumerate(value)]
    if not isinstance(value, str) or not _TEMPLATE_MARK.search(value):
        return value
    name = f"<{probs.file}:{probs.line(path)} {_field(path)}>"
    loader.sources[name] = (value, name)
    try:
        out = env.get_template(name).render(variables)
    except Exception as e:  # every template failure is the recipe's fault: report it, never a traceback
        msg, hint = _jinja_error(e)
        # a multi-line value: point at the line inside it
        inner = getattr(e, "lineno", None) or _template_line(e, name) or 1
        probs.error(path, f"{_field(path)}: {msg}", hint, line=probs.line(path) + inner - 1)
        return value
    if len(out) > MAX_RENDERED_CHARS:
        probs.error(path, f"{_field(path)} renders to {len(out)} characters", "keep rendered values small")
        return value
    return out


def _render_file(env: Any, ws: Any, loader: _WorkspaceLoader, rel: str, variables: dict, probs: _Problems,
                 path: tuple) -> str | None:
    """Render a template file; errors point at the template's own file:line."""
    try:
        file = resolve_template_path(ws, rel)
        text = _read_text(file, MAX_TEMPLATE_BYTES)
    except ConfigError as e:
        probs.error(path, str(e), e.hint or "")
        return None
    shown = _display(ws, file)
    name = f"file:{rel}"
    loader.sources[name] = (text, str(file))
    try:
        out = env.get_template(name).render(variables)
    except Exception as e:  # every template failure is the recipe's fault: report it, never a traceback
        msg, hint = _jinja_error(e)
        line = getattr(e, "lineno", None) or _template_line(e, str(file)) or 1
        probs.error(path, f"{msg} (template of {_field(path)}, {probs.file}:{probs.line(path)})", hint,
                    file=shown, line=line)
        return None
    if len(out) > MAX_RENDERED_CHARS:
        probs.error(path, f"template {shown} renders to {len(out)} characters", "keep generated sources small",
                    file=shown, line=1)
        return None
    return out


def _default_kbuild(module: str, sources: list[str]) -> str:
    c_objs = [s[:-2] + ".o" for s in sources if s.endswith((".c", ".S"))]
    if c_objs == [f"{module}.o"]:
        return f"obj-m := {module}.o\n"
    return f"obj-m := {module}.o\n{module}-y := {' '.join(c_objs)}\n"


def _build_spec(ws: Any, recipe: Recipe, entry: Any, probs: _Problems) -> Any:
    """Render `recipe` for catalog `entry`; problems go to `probs`; the BuildSpec when there are none."""
    from kpipe.build.spec import BuildSpec, PatchFile, Probe, SourceFile

    kernel, kvars = _kernel_vars(entry)
    options = recipe.options
    entry_opts = dict(getattr(entry, "options", {}) or {})
    for key in options:  # the catalog may override a recipe option for one kernel
        if key in entry_opts:
            options[key] = entry_opts[key]
    variables = {"kernel": kvars, "options": options, "recipe": recipe.name}
    loader = _WorkspaceLoader(ws)
    env = _sandbox(loader)

    rendered = _render_tree(env, recipe.data, (), variables, probs, loader)
    if probs.errors:
        return None
    norm = _check_schema(rendered, probs, rendered=True)
    if probs.errors:
        return None

    patches: list[PatchFile] = []
    for i, rel in enumerate(norm["patches"]):
        try:
            path = resolve_patch_path(ws, rel)
            data = path.read_bytes()
        except ConfigError as e:
            probs.error(("patches", i), str(e), e.hint or "")
            continue
        except OSError as e:
            probs.error(("patches", i), f"cannot read patch {rel!r}: {e.strerror}", "check the file's permissions")
            continue
        if not data.strip():
            probs.error(("patches", i), f"patch {rel!r} is empty", "a patch is a unified diff (git format-patch)")
        elif b"\n--- " not in b"\n" + data or b"\n+++ " not in data or b"\n@@ " not in data:
            probs.error(("patches", i), f"patch {rel!r} does not look like a unified diff",
                        "produce it with `git format-patch` or `diff -u`")
        rel_name = str(path.relative_to(Path(ws.patches_dir).resolve()))
        patches.append(PatchFile(name=rel_name, path=path, sha256=hashlib.sha256(data).hexdigest()))

    builder = norm["builder"]
    section = norm["kpatch"] if builder == "kpatch-build" else norm["kbuild"]
    module = predict_module_name(builder, recipe.name, norm["patches"], section.get("module_name"))
    file_vars = dict(variables, module=module, module_sysfs=module.replace("-", "_"))

    sources: list[SourceFile] = []
    builder_opts: dict[str, Any] = {}
    if builder == "kpatch-build":
        for key in ("jobs", "non_replace", "skip_compiler_check", "targets"):
            if key in entry_opts and key not in section:
                builder_opts[key] = entry_opts[key]  # catalog builder defaults for this kernel
        builder_opts.update({k: v for k, v in section.items()})
        builder_opts.setdefault("non_replace", False)
        builder_opts.setdefault("skip_compiler_check", False)
        builder_opts.setdefault("targets", [])
    else:
        for i, src in enumerate(section.get("sources", [])):
            text = _render_file(env, ws, loader, src["template"], file_vars, probs,
                                ("kbuild", "sources", i, "template"))
            if text is not None:
                sources.append(SourceFile(name=src["name"], text=text))
        if section.get("kbuild"):
            text = _render_file(env, ws, loader, section["kbuild"], file_vars, probs, ("kbuild", "kbuild"))
            if text is not None:
                sources.append(SourceFile(name="Kbuild", text=text))
        else:
            sources.append(SourceFile(name="Kbuild", text=_default_kbuild(module, [s["name"] for s in
                                                                                      section.get("sources", [])])))
        builder_opts = {"make_args": section.get("make_args", [])}
        if "module_name" in section:
            builder_opts["module_name"] = section["module_name"]

    signing = {"sign": bool(norm["signing"].get("sign", False)), "signer": norm["signing"].get("signer", "")}
    probe = None
    if norm["probe"]:
        probe = Probe(argv=tuple(norm["probe"]["argv"]), expect=norm["probe"]["expect"],
                      expect_after_rollback=norm["probe"]["expect_after_rollback"])
    if probs.errors:
        return None
    plain = {
        "name": recipe.name, "description": norm["description"], "builder": builder, "module_name": module,
        "kernels": list(norm["kernels"]), "patches": [p.name for p in patches], "options": options,
        "builder_options": builder_opts, "signing": signing, "rollout": norm["rollout"],
        "probe": norm["probe"],
    }
    return BuildSpec(recipe=recipe.name, recipe_file=recipe.file, kernel=kernel, kernel_entry=entry, builder=builder,
                     module_name=module, patches=tuple(patches), sources=tuple(sources), options=builder_opts,
                     signing=signing, rollout=norm["rollout"], probe=probe, rendered=plain)


def render(ws: Any, recipe_name: str, kernel_release: str) -> Any:
    """The BuildSpec of `recipe_name` for `kernel_release` (kpipe.build.spec.BuildSpec).

    ConfigError (file:line) for a bad recipe or template, NotFoundError for an
    unknown recipe or kernel, or a kernel the recipe does not target.
    """
    from kpipe.kernel import check_release

    check_release(kernel_release)
    recipe = load_recipe(ws, recipe_name)
    entry = ws.kernel(kernel_release)
    if not recipe.matches(kernel_release):
        targets = kernels_for_recipe(ws, recipe)
        raise NotFoundError(
            f"recipe {recipe.name!r} does not target kernel {kernel_release!r}",
            hint=f"its kernels: {', '.join(recipe.kernels)} (in the catalog: {', '.join(targets) or 'none'}); "
                 f"add the release or a glob to `kernels:` in {_display(ws, recipe.file)}")
    probs = _Problems(_display(ws, recipe.file), recipe.lines, recipe.key_lines)
    spec = _build_spec(ws, recipe, entry, probs)
    _raise_first(probs.items, _display(ws, recipe.file))
    return spec


# --- lint ------------------------------------------------------------------------------------------


def _unmatched(ws: Any, shown: str, probs: _Problems, patterns: list[Any]) -> list[Problem]:
    """Warnings for kernel names and globs that match nothing in the catalog."""
    out = []
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str) or any(fnmatch.fnmatchcase(r, pattern) for r in ws.kernels):
            continue
        what = "glob" if any(ch in pattern for ch in "*?[") else "kernel"
        out.append(Problem(shown, probs.line(("kernels", i)), f"{what} {pattern!r} matches no kernel in the catalog",
                           "add it to kpipe.toml [[kernels]] or install its headers; known: "
                           + ", ".join(sorted(ws.kernels)), "warning"))
    return out


def lint(ws: Any) -> list[Problem]:
    """Every problem of every recipe: schema, YAML, paths, and a render test against each matching kernel."""
    from kpipe.kernel import parse_release

    problems: list[Problem] = []
    files = _recipe_files(ws)
    if not files:
        problems.append(Problem(_display(ws, Path(ws.recipes_dir)), 1, "no recipes found",
                                "add NAME.yaml files to the recipes folder", "warning"))
    seen: dict[str, Path] = {}
    for file in files:
        shown = _display(ws, file)
        probs = _Problems(shown)
        recipe = _read_recipe(ws, file, probs)
        problems.extend(probs.items)
        if file.stem in seen:
            problems.append(Problem(shown, 1, f"recipe {file.stem!r} is also defined by {seen[file.stem].name}",
                                    "keep one of NAME.yaml / NAME.yml"))
        seen.setdefault(file.stem, file)
        raw_kernels = probs.data.get("kernels") if isinstance(probs.data, dict) else None
        if recipe is None:
            if isinstance(raw_kernels, list):
                problems.extend(_unmatched(ws, shown, probs, raw_kernels))
            continue
        problems.extend(_unmatched(ws, shown, probs, list(recipe.kernels)))
        matched: list[str] = []
        for pattern in recipe.kernels:
            hits = sorted(r for r in ws.kernels if fnmatch.fnmatchcase(r, pattern))
            matched.extend(h for h in hits if h not in matched)
        targets: list[Any] = [ws.kernels[r] for r in matched]
        if not targets:
            # Still render once, against the literal releases the recipe names, so that
            # template mistakes do not hide until a kernel arrives.
            from kpipe.workspace import KernelEntry

            for pattern in recipe.kernels:
                try:
                    parse_release(pattern)
                except ConfigError:
                    continue
                if not any(ch in pattern for ch in "*?["):
                    targets.append(KernelEntry(release=pattern))
        signer = recipe.data.get("signing", {}).get("signer") if isinstance(recipe.data.get("signing"), dict) else None
        if isinstance(signer, str) and not _is_template(signer) and signer not in getattr(ws, "signers", {}):
            problems.append(Problem(shown, probs.line(("signing", "signer")),
                                    f"signer {signer!r} is not configured in kpipe.toml",
                                    "add [signing.signers." + signer + "] to kpipe.toml", "warning"))
        by_message: dict[tuple, list[str]] = {}
        order: list[tuple] = []
        found: dict[tuple, Problem] = {}
        for entry in targets:
            kp = _Problems(shown, recipe.lines, recipe.key_lines)
            try:
                _build_spec(ws, recipe, entry, kp)
            except ConfigError as e:  # e.g. a hostile release in the catalog
                kp.error((), str(e), e.hint or "")
            for p in kp.items:
                key = (p.file, p.line, p.message, p.severity)
                if key not in found:
                    found[key] = p
                    order.append(key)
                by_message.setdefault(key, []).append(entry.release)
        for key in order:
            p = found[key]
            rels = by_message[key]
            if len(targets) > 1:
                more = f" (kernel {rels[0]}" + (f" and {len(rels) - 1} more)" if len(rels) > 1 else ")")
                p = replace(p, message=p.message + more)
            problems.append(p)
    return problems
