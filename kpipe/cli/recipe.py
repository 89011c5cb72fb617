"""kpipe recipe: list, lint and render patch recipes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from kpipe.cli import complete
from kpipe.cli.context import plural, print_json, state
from kpipe.cli.params import WORD

if TYPE_CHECKING:
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
        rows.append(d)
    return rows


@recipe_app.command("list")
def list_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the recipes with their builder and the catalog kernels they target."""
    st = state()
    rows = _scan(st.workspace)
    if json_out:
        print_json(rows)
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
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Render a recipe for one kernel and print the concrete build spec (with rendered sources)."""
    from kpipe import recipes

    st = state()
    spec = recipes.render(st.workspace, name, kernel)
    data = spec.to_dict()
    data["inputs_digest"] = spec.inputs_digest()
    data["description"] = spec.rendered.get("description", "")
    if json_out:
        print_json(data)
        return
    from rich.panel import Panel
    from rich.syntax import Syntax
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    k = spec.kernel
    rows = [
        ("recipe", f"{spec.recipe}  ({spec.recipe_file})"),
        ("description", data["description"]),
        ("kernel", f"{k.release}  ({k.distro}, {k.arch}, {'.'.join(map(str, k.version))})"),
        ("builder", spec.builder),
        ("module", f"{spec.module_name}.ko  (sysfs: {spec.module_name.replace('-', '_')})"),
        ("options", ", ".join(f"{a}={b}" for a, b in spec.options.items()) or "-"),
        ("signing", f"sign={spec.signing.get('sign')} signer={spec.signing.get('signer') or '-'}"),
        ("rollout", ", ".join(f"{a}={b}" for a, b in spec.rollout.items()) or "-"),
        ("probe", "-" if spec.probe is None else f"{list(spec.probe.argv)} expect /{spec.probe.expect}/"
         + (f" after rollback /{spec.probe.expect_after_rollback}/" if spec.probe.expect_after_rollback else "")),
        ("inputs digest", data["inputs_digest"]),
    ]
    for p in spec.patches:
        rows.append(("patch", f"{p.name}  sha256:{p.sha256[:16]}"))
    for key, value in rows:
        table.add_row(key, Text(str(value)))
    st.console.print(table)
    for src in spec.sources:
        lexer = "c" if src.name.endswith((".c", ".h")) else "make"
        st.console.print(Panel(Syntax(src.text, lexer, line_numbers=True, word_wrap=True), title=Text(src.name)))


def register(app: typer.Typer) -> None:
    """Add this group's commands to the root app."""
    app.add_typer(recipe_app, name="recipe")
