"""Rendering one recipe for one catalog kernel into a kpipe.builder.spec.BuildSpec."""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from kpipe.errors import ConfigError, NotFoundError
from kpipe.recipes.loading import Recipe, _display, kernels_for_recipe, load_recipe
from kpipe.recipes.paths import resolve_patch_path, resolve_template_path
from kpipe.recipes.problems import _field, _Problems, _raise_first
from kpipe.recipes.sandbox import (
    _BoundedSandbox,
    _jinja_error,
    _read_text,
    _sandbox,
    _template_line,
    _WorkspaceLoader,
)
from kpipe.recipes.schema import (
    _NOT_RENDERED,
    _TEMPLATE_MARK,
    MAX_TEMPLATE_BYTES,
    MODULE_NAME_MAX,
    KeyPath,
    _check_schema,
)
from kpipe.recipes.select import klp_build_refusal, select_builder

if TYPE_CHECKING:  # kpipe.builder imports the recipes
    from kpipe.builder.spec import BuildSpec
    from kpipe.settings import KernelEntry
    from kpipe.workspace import Workspace


def _sanitize_module(name: str) -> str:
    """kpatch-build's rule: characters outside [A-Za-z0-9_-] become '-', then at most 55 characters."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)[:MODULE_NAME_MAX]


_VERSIONED = re.compile(r"^(?P<base>.+?)[-_]v(?P<version>\d+)$")


def versioned_module_name(name: str, version: int | None) -> str:
    """`name` with the stream version as a `-vN` suffix (kept when it already ends in -vN or _vN).

    Two versions of a stream are loaded side by side during an upgrade, and the kernel names a module's
    /sys/module and /sys/kernel/livepatch folders after the module, refusing a second module of one name:
    each version needs its own module name."""
    if version is None:
        return name
    m = _VERSIONED.match(name)
    if m and int(m.group("version")) == version:
        return name
    return f"{name}-v{version}"


def predict_module_name(builder: str, recipe_name: str, patches: list[str], explicit: str | None,
                        version: int | None = None) -> str:
    """The module name the builder will produce (file <name>.ko; sysfs shows '-' as '_').

    With a declared stream `version`, the name ends in -v<version> (versioned_module_name)."""
    if explicit:
        return versioned_module_name(explicit, version)
    if version is not None:
        return versioned_module_name(predict_module_name(builder, recipe_name, patches, None), version)
    if builder in ("kpatch-build", "klp-build") and patches:
        # kpatch-build: livepatch-<first patch's basename without .patch/.diff>, sanitised (kpipe passes
        # klp-build the same name with --output)
        base = PurePosixPath(patches[0]).name
        for suffix in (".patch", ".diff"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
                break
        return _sanitize_module(f"livepatch-{base}")
    return _sanitize_module(f"livepatch-{recipe_name}")


def stream_vars(data: dict[str, Any], recipe_name: str) -> dict[str, Any]:
    """The template variables `stream`, `version` and `replace` of a recipe's (unrendered) data.

    Plain values only (the schema refuses templates there); defaults: the recipe's name, 1, true."""
    section = data.get("kpatch")
    kpatch: dict[str, Any] = section if isinstance(section, dict) else {}
    replace = data.get("replace")
    if not isinstance(replace, bool):
        nr = kpatch.get("non_replace")
        replace = not nr if isinstance(nr, bool) else True
    stream = data.get("stream")
    version = data.get("version")
    return {"stream": stream if isinstance(stream, str) and stream else recipe_name,
            "version": version if isinstance(version, int) and not isinstance(version, bool) else 1,
            "replace": replace}


def _kernel_vars(entry: KernelEntry) -> tuple[Any, dict[str, Any]]:
    """(KernelRelease, template dict) for a catalog entry; the catalog's arch/distro win over 'unknown'."""
    from kpipe.kernel import parse_release

    k = parse_release(entry.release)
    changes: dict[str, Any] = {}
    if getattr(entry, "arch", "") and entry.arch != "unknown" and k.arch == "unknown":
        changes["arch"] = entry.arch
    if getattr(entry, "distro", "") and entry.distro != "unknown" and k.distro == "unknown":
        changes["distro"] = entry.distro
    if changes:
        k = replace(k, **changes)
    return k, k.to_dict()


def _render_tree(env: _BoundedSandbox, value: Any, path: KeyPath, variables: dict[str, Any], probs: _Problems,
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
        return str(env.render_bounded(name, variables))
    except Exception as e:  # every template failure is the recipe's fault: report it, never a traceback
        msg, hint = _jinja_error(e)
        # a multi-line value: point at the line inside it
        inner = getattr(e, "lineno", None) or _template_line(e, name) or 1
        probs.error(path, f"{_field(path)}: {msg}", hint, line=probs.line(path) + inner - 1)
        return value


def _render_file(env: _BoundedSandbox, ws: Workspace, loader: _WorkspaceLoader, rel: str, variables: dict[str, Any],
                 probs: _Problems, path: KeyPath) -> str | None:
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
        return str(env.render_bounded(name, variables))
    except Exception as e:  # every template failure is the recipe's fault: report it, never a traceback
        msg, hint = _jinja_error(e)
        line = getattr(e, "lineno", None) or _template_line(e, str(file)) or 1
        probs.error(path, f"{msg} (template of {_field(path)}, {probs.file}:{probs.line(path)})", hint,
                    file=shown, line=line)
        return None


def _default_kbuild(module: str, sources: list[str]) -> str:
    c_objs = [s[:-2] + ".o" for s in sources if s.endswith((".c", ".S"))]
    if c_objs == [f"{module}.o"]:
        return f"obj-m := {module}.o\n"
    return f"obj-m := {module}.o\n{module}-y := {' '.join(c_objs)}\n"


def _build_spec(ws: Workspace, recipe: Recipe, entry: KernelEntry, probs: _Problems) -> BuildSpec | None:
    """Render `recipe` for catalog `entry`; problems go to `probs`; the BuildSpec when there are none."""
    from kpipe.builder.spec import BuildSpec, PatchFile, Probe, SourceFile

    kernel, kvars = _kernel_vars(entry)
    options = recipe.options
    entry_opts = dict(getattr(entry, "options", {}) or {})
    for key in options:  # the catalog may override a recipe option for one kernel
        if key in entry_opts:
            options[key] = entry_opts[key]
    variables = {"kernel": kvars, "options": options, "recipe": recipe.name, **stream_vars(recipe.data, recipe.name)}
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

    choice = select_builder(norm["builder"], kernel, entry)
    builder = choice.builder
    if builder == "klp-build" and (refusal := klp_build_refusal(kernel, entry)):
        probs.error(("builder",), f"klp-build cannot build for {entry.release}: {refusal}",
                    "use `builder: kpatch-build`, or `builder: auto` to pick per kernel")
        return None
    section_name = {"kpatch-build": "kpatch", "klp-build": "klp"}.get(builder, "kbuild")
    section = norm[section_name]
    if builder == "klp-build" and norm["builder"] == "auto":
        # one recipe, two backends: what both builders share may be written once, in `kpatch:`
        section = {**{k: v for k, v in norm["kpatch"].items() if k in ("jobs", "module_name")}, **section}
    module = predict_module_name(builder, recipe.name, norm["patches"], section.get("module_name"), norm["version"])
    if len(module) > MODULE_NAME_MAX:
        where = (section_name, "module_name")
        probs.error(where if "module_name" in section else ("version",),
                    f"module name {module!r} is longer than {MODULE_NAME_MAX} characters",
                    "shorten `module_name:` (the stream version is appended as -vN)")
        return None
    stream = norm["stream"] or recipe.name
    version = norm["version"] or 1
    file_vars = dict(variables, module=module, module_sysfs=module.replace("-", "_"))

    sources: list[SourceFile] = []
    builder_opts: dict[str, Any] = {}
    if builder == "kpatch-build":
        for key in ("jobs", "non_replace", "skip_compiler_check", "targets"):
            if key in entry_opts and key not in section:
                builder_opts[key] = entry_opts[key]  # catalog builder defaults for this kernel
        builder_opts.update({k: v for k, v in section.items()})
        if "replace" in recipe.data or "non_replace" in section:
            builder_opts["non_replace"] = not norm["replace"]  # the recipe decides: kpatch-build -R
        builder_opts.setdefault("non_replace", False)
        if "module_name" in section or norm["version"] is not None:
            builder_opts["module_name"] = module  # kpatch-build -n: the versioned name
        builder_opts.setdefault("skip_compiler_check", False)
        builder_opts.setdefault("targets", [])
    elif builder == "klp-build":
        if "jobs" in entry_opts and "jobs" not in section:
            builder_opts["jobs"] = entry_opts["jobs"]  # the catalog's default for this kernel
        builder_opts.update(section)
        builder_opts["non_replace"] = not norm["replace"]  # klp-build --no-replace
        if "module_name" in section or norm["version"] is not None:
            builder_opts["module_name"] = module  # klp-build --output <name>.ko: the versioned name
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
        if "module_name" in section or norm["version"] is not None:
            builder_opts["module_name"] = module

    signing = {"sign": bool(norm["signing"].get("sign", False)), "signer": norm["signing"].get("signer", "")}
    probe = None
    if norm["probe"]:
        probe = Probe(argv=tuple(norm["probe"]["argv"]), expect=norm["probe"]["expect"],
                      expect_after_rollback=norm["probe"]["expect_after_rollback"])
    if probs.errors:
        return None
    replace = (not builder_opts["non_replace"]) if builder in ("kpatch-build", "klp-build") else norm["replace"]
    plain = {
        "name": recipe.name, "description": norm["description"], "builder": builder, "module_name": module,
        "stream": stream, "version": version, "replace": replace,
        "kernels": list(norm["kernels"]), "patches": [p.name for p in patches], "options": options,
        "builder_options": builder_opts, "signing": signing, "rollout": norm["rollout"],
        "probe": norm["probe"],
    }
    return BuildSpec(recipe=recipe.name, recipe_file=recipe.file, kernel=kernel, kernel_entry=entry, builder=builder,
                     module_name=module, patches=tuple(patches), sources=tuple(sources), options=builder_opts,
                     signing=signing, rollout=norm["rollout"], probe=probe, rendered=plain, stream=stream,
                     version=version, replace=replace, builder_reason=choice.why)


def render(ws: Workspace, recipe_name: str, kernel_release: str) -> BuildSpec:
    """The BuildSpec of `recipe_name` for `kernel_release` (kpipe.builder.spec.BuildSpec).

    ConfigError (file:line) for a bad recipe or template, NotFoundError for an
    unknown recipe or kernel, or a kernel the recipe does not target.
    """
    from kpipe.kernel import check_release

    check_release(kernel_release)
    recipe = load_recipe(ws, recipe_name)
    entry = ws.kernel(kernel_release)
    if not recipe.matches(kernel_release, entry.arch):
        targets = kernels_for_recipe(ws, recipe)
        raise NotFoundError(
            f"recipe {recipe.name!r} does not target kernel {kernel_release!r}",
            hint=f"its kernels: {', '.join(recipe.kernels)} (in the catalog: {', '.join(targets) or 'none'}); "
                 f"add the release or a glob to `kernels:` in {_display(ws, recipe.file)}")
    probs = _Problems(_display(ws, recipe.file), recipe.lines, recipe.key_lines)
    spec = _build_spec(ws, recipe, entry, probs)
    _raise_first(probs.items, _display(ws, recipe.file))
    if spec is None:  # _build_spec gives None only with an error recorded, which _raise_first raised
        raise ConfigError(f"{_display(ws, recipe.file)}: recipe {recipe.name!r} does not render for {kernel_release}")
    return spec
