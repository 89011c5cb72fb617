"""kpipe recipe: list, lint and render patch recipes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from kpipe.cli import complete
from kpipe.cli.context import plural, print_json, state
from kpipe.cli.params import WORD

if TYPE_CHECKING:
    from kpipe.builder.base import BuildPlan
    from kpipe.builder.spec import BuildSpec
    from kpipe.workspace import Workspace

recipe_app = typer.Typer(help="Patch recipes (recipes/*.yaml).", no_args_is_help=True)


def _scan(ws: Workspace) -> list[dict[str, Any]]:
    """Every recipe file as a row; a broken recipe is a row with its error, not a failure of the listing."""
    from kpipe import recipes
    from kpipe.errors import ConfigError

    rows = []
    for file in recipes.recipe_files(ws):
        try:
            r = recipes.load_recipe(ws, file.stem)
        except ConfigError as e:
            rows.append({"name": file.stem, "file": str(file), "ok": False, "error": str(e), "hint": e.hint or ""})
            continue
        d = r.to_dict()
        d.update(ok=True, targets=recipes.kernels_for_recipe(ws, r))
        d["description"] = _description(ws, file.stem, d.get("description", ""), d["targets"])
        rows.append(d)
    return rows


_JINJA = re.compile(r"\{\{(.*?)\}\}|\{%.*?%\}|\{#.*?#\}", re.S)


def plain_description(text: str) -> str:
    """A description template without Jinja: each {{ a.b | f }} becomes its name in capitals (B), tags go."""
    def name(m: re.Match[str]) -> str:
        if m.group(1) is None:
            return ""
        expr = m.group(1).split("|")[0].strip()
        return (re.split(r"[.\[\]'\"]+", expr.strip("'\"[]")) or [expr])[-1].strip().upper() or "..."

    return " ".join(_JINJA.sub(name, text).split())


def _description(ws: Workspace, name: str, raw: str, targets: list[str]) -> str:
    """The description rendered for the recipe's first catalog kernel, else plain (never raw Jinja)."""
    if "{" not in raw:
        return raw
    from kpipe import recipes
    from kpipe.errors import KpipeError

    if targets:
        try:
            return str(recipes.render(ws, name, targets[0]).rendered.get("description", ""))
        except KpipeError:
            pass  # `recipe lint` reports why; the listing shows the plain text
    return plain_description(raw)


@recipe_app.command("list")
def list_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the recipes with their builder and the catalog kernels they target."""
    st = state()
    rows = _scan(st.workspace)
    if json_out:
        print_json(rows)
        return
    if not st.console.is_terminal:
        # for tools and pipes: tab-separated, no boxes, no padding, nothing cut
        print("\t".join(("name", "builder", "kernels", "targets in catalog", "description")))
        for r in rows:
            if not r["ok"]:
                print("\t".join((r["name"], "broken", "", "", r["error"])))
            else:
                print("\t".join((r["name"], r["builder"], ", ".join(r["kernels"]), ", ".join(r["targets"]) or "none",
                                 r["description"])))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"recipes in {st.workspace.recipes_dir}"))
    table.add_column("name", no_wrap=True)
    table.add_column("builder", no_wrap=True)
    table.add_column("kernels")
    table.add_column("targets in catalog")
    table.add_column("description", overflow="ellipsis", no_wrap=True, max_width=48)
    for r in rows:
        if not r["ok"]:
            table.add_row(Text(r["name"]), Text("broken", style="red"), Text(""), Text(""),
                          Text(r["error"], style="red"))
            continue
        table.add_row(Text(r["name"]), Text(r["builder"]), Text(", ".join(r["kernels"])),
                      Text(", ".join(r["targets"]) or "none", style="" if r["targets"] else "yellow"),
                      Text(r["description"]))
    st.console.print(table)
    if not rows:
        st.console.print("no recipes yet: add recipes/NAME.yaml", style="yellow")


@recipe_app.command("lint")
def lint_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Check every recipe (schema, paths, a render against each target kernel); exit 4 on any error."""
    from kpipe import recipes
    from kpipe.errors import ConfigError

    st = state()
    problems = recipes.lint(st.workspace)
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity != "error"]
    if json_out:
        print_json({"ok": not errors, "errors": len(errors), "warnings": len(warnings),
                    "problems": [p.to_dict() for p in problems]})
    else:
        from rich.text import Text

        for p in problems:
            line = Text(f"{p.file}:{p.line}: ")
            line.append(f"{p.severity}: ", style="red bold" if p.severity == "error" else "yellow")
            line.append(p.message)
            st.console.print(line)
            if p.hint:
                st.console.print(Text(f"    hint: {p.hint}", style="dim"))
        summary = f"{plural(len(errors), 'error')}, {plural(len(warnings), 'warning')}"
        st.console.print(Text(summary, style="red" if errors else "green"))
    if errors:
        # A KpipeError (not typer.Exit: main() runs click with standalone_mode=False, which
        # turns Exit into a return value) so that the exit status is 4.
        raise ConfigError(f"{plural(len(errors), 'recipe problem')} found by lint",
                          hint="fix the errors listed above, then run `kpipe recipe lint` again")


@recipe_app.command("render")
def render_cmd(
    name: str = typer.Argument(..., autocompletion=complete.recipes, metavar="RECIPE", click_type=WORD,
                               help="Recipe name (file name without .yaml)."),
    kernel: str = typer.Option(..., "--kernel", "-k", autocompletion=complete.kernels, metavar="RELEASE",
                               help="Target kernel release (from `kpipe kernels list`)."),
    output: Path | None = typer.Option(
        None, "--output", "-o", metavar="DIR",
        help="Also write the plain rendered files to DIR: patches and sources, recipe.yaml (the rendered recipe) "
             "and builder.argv (the builder's command line, shell-quoted)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Render a recipe for one kernel: the build spec, the builder's exact argv, the rendered sources."""
    from kpipe import recipes

    st = state()
    spec = recipes.render(st.workspace, name, kernel)
    data = spec.to_dict()
    data["inputs_digest"] = spec.inputs_digest()
    data["description"] = spec.rendered.get("description", "")
    # With --output the build folder is DIR itself: builder.argv then runs as written against DIR's files.
    build_dir = str(output.resolve()) if output is not None else BUILD_DIR
    plan, argv_note = builder_plan(st.workspace, spec, build_dir)
    argv = list(plan.argv)
    data["builder_argv"] = argv
    data["builder_argv_note"] = argv_note
    if output is not None:
        data["output"] = [str(f) for f in write_rendered(spec, plan, output)]
    if json_out:
        print_json(data)
        return
    _print_render(spec, data, argv, argv_note)
    if output is not None:
        st.console.print(f"wrote {len(data['output'])} files to {output}", markup=False, highlight=False)


BUILD_DIR = "$BUILD_DIR"  # the per-build folder on the build host, chosen when the build runs


def builder_plan(ws: Workspace, spec: BuildSpec, build_dir: str) -> tuple[BuildPlan, str]:
    """The builder's plan (argv, staged files) for `spec` on the build host a build would pick (its `tools`
    paths) in `build_dir`; and which host, or why none of the configured ones accepts the kernel."""
    from kpipe.builder.base import get_builder
    from kpipe.builder.hosts import select_hosts
    from kpipe.errors import KpipeError
    from kpipe.settings import BuildHost

    note = ""
    try:
        host = select_hosts(ws.build_hosts, spec.kernel.release, spec.kernel.arch)[0]
        note = f"on build host {host.name}"
    except KpipeError as e:
        host = BuildHost(name="local")
        note = f"tools by bare name: {e}"
    return get_builder(spec.builder).plan(spec, host, build_dir), note


def write_rendered(spec: BuildSpec, plan: BuildPlan, folder: Path) -> list[Path]:
    """Write the plain rendered files to `folder` as the build folder holds them (kpatch-build:
    patches/NN/NAME; kbuild: src/NAME), plus recipe.yaml and builder.argv; the paths written."""
    import shlex

    import yaml

    from kpipe.errors import ConfigError

    written: list[Path] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)

        def put(rel: str, data: bytes) -> None:
            dest = folder / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            written.append(dest)

        for f in plan.files:
            if f.data or not f.name.endswith("/.keep"):
                put(f.name, f.data)
            else:
                (folder / f.name).parent.mkdir(parents=True, exist_ok=True)  # the builder's output folder
        put("recipe.yaml", yaml.safe_dump(spec.rendered, sort_keys=False, allow_unicode=True).encode())
        put("builder.argv", (shlex.join(plan.argv) + "\n").encode())
    except OSError as e:
        raise ConfigError(f"--output {folder}: cannot write: {e.strerror or e}",
                          hint="give a folder you can write to") from None
    return written


def _value(value: Any) -> str:
    """An option's value on one line: strings with edge spaces or newlines quoted (JSON)."""
    import json

    if isinstance(value, str) and (value != value.strip() or "\n" in value):
        return json.dumps(value)
    return str(value)


def _seconds(value: Any) -> str:
    return f"{value:g} s" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _rollout_text(rollout: dict[str, Any]) -> str:
    parts = []
    for key, value in rollout.items():
        if key == "probe":
            continue  # shown on its own row
        if key == "soak":
            parts.append(f"soak {_seconds(value)}")
        elif key == "waves":
            parts.append("waves " + ", ".join(map(str, value)))
        else:
            parts.append(f"{key.replace('_', ' ')} {value}")
    return ", ".join(parts) or "-"


def _print_render(spec: BuildSpec, data: dict[str, Any], argv: list[str], argv_note: str) -> None:
    """A table and source panels on a terminal; `key: value` lines and the raw sources when piped."""
    import shlex

    from rich.text import Text

    st = state()
    k = spec.kernel
    recipe_opts = spec.rendered.get("options") or {}
    rows = [
        ("recipe", f"{spec.recipe}  ({spec.recipe_file})"),
        ("description", data["description"]),
        ("kernel", f"{k.release}  ({k.distro}, {k.arch}, {'.'.join(map(str, k.version))})"),
        ("builder", spec.builder + (f"  ({spec.builder_reason})" if spec.builder_reason else "")),
        ("argv", shlex.join(argv) + (f"  ({argv_note})" if argv_note else "")),
        ("module", f"{spec.module_name}.ko  (sysfs: {spec.module_name.replace('-', '_')})"),
        ("recipe options", ", ".join(f"{a}={_value(b)}" for a, b in recipe_opts.items()) or "-"),
        ("builder options", ", ".join(f"{a}={_value(b)}" for a, b in spec.options.items()) or "-"),
        ("signing", f"sign={spec.signing.get('sign')} signer={spec.signing.get('signer') or '-'}"),
        ("rollout", _rollout_text(spec.rollout)),
        ("probe", "-" if spec.probe is None else f"{list(spec.probe.argv)} expect /{spec.probe.expect}/"
         + (f" after rollback /{spec.probe.expect_after_rollback}/" if spec.probe.expect_after_rollback else "")),
        ("inputs digest", data["inputs_digest"]),
    ]
    for p in spec.patches:
        rows.append(("patch", f"{p.name}  sha256:{p.sha256[:16]}"))
    if not st.console.is_terminal:
        # for tools and pipes: no boxes, no padding, no colour; the sources verbatim after a header line
        for key, value in rows:
            print(f"{key}: {value}")
        for src in spec.sources:
            print(f"--- {src.name}")
            print(src.text, end="" if src.text.endswith("\n") else "\n")
        return
    from rich.panel import Panel
    from rich.syntax import Syntax
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for key, value in rows:
        table.add_row(key, Text(str(value)))
    st.console.print(table)
    for src in spec.sources:
        lexer = "c" if src.name.endswith((".c", ".h")) else "make"
        st.console.print(Panel(Syntax(src.text, lexer, line_numbers=True, word_wrap=True), title=Text(src.name)))


def register(app: typer.Typer) -> None:
    """Add this group's commands to the root app."""
    app.add_typer(recipe_app, name="recipe")
