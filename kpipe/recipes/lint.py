"""`kpipe recipe lint`: every problem of every recipe, with a render test per target kernel."""

from __future__ import annotations

import fnmatch
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kpipe.errors import ConfigError
from kpipe.recipes.loading import _display, _read_recipe, _recipe_files
from kpipe.recipes.problems import Problem, _Problems
from kpipe.recipes.render import _build_spec
from kpipe.recipes.schema import _is_template

if TYPE_CHECKING:
    from kpipe.workspace import Workspace


def _unmatched(ws: Workspace, shown: str, probs: _Problems, patterns: list[Any]) -> list[Problem]:
    """Warnings for kernel names and globs that match nothing in the catalog."""
    out = []
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str) or any(fnmatch.fnmatchcase(r, pattern) for r in ws.kernels):
            continue
        what = "glob" if any(ch in pattern for ch in "*?[") else "kernel"
        out.append(Problem.at(shown, probs.line(("kernels", i)), f"{what} {pattern!r} matches no kernel in the catalog",
                           "add it to kpipe.toml [[kernels]] or install its headers; known: "
                           + ", ".join(sorted(ws.kernels)), "warning"))
    return out


def lint(ws: Workspace) -> list[Problem]:
    """Every problem of every recipe: schema, YAML, paths, and a render test against each matching kernel."""
    from kpipe.kernel import parse_release

    problems: list[Problem] = []
    files = _recipe_files(ws)
    if not files:
        problems.append(Problem.at(_display(ws, Path(ws.recipes_dir)), 1, "no recipes found",
                                "add NAME.yaml files to the recipes folder", "warning"))
    seen: dict[str, Path] = {}
    for file in files:
        shown = _display(ws, file)
        probs = _Problems(shown)
        recipe = _read_recipe(ws, file, probs)
        problems.extend(probs.items)
        if file.stem in seen:
            problems.append(Problem.at(shown, 1, f"recipe {file.stem!r} is also defined by {seen[file.stem].name}",
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
            hits = sorted(r for r in ws.kernels if fnmatch.fnmatchcase(r, pattern)
                          and recipe.matches(r, ws.kernels[r].arch))
            matched.extend(h for h in hits if h not in matched)
        targets: list[Any] = [ws.kernels[r] for r in matched]
        if not targets:
            # Still render once, against the literal releases the recipe names, so that
            # template mistakes do not hide until a kernel arrives.
            from kpipe.settings import KernelEntry

            for pattern in recipe.kernels:
                try:
                    parse_release(pattern)
                except ConfigError:
                    continue
                if not any(ch in pattern for ch in "*?["):
                    targets.append(KernelEntry(release=pattern))
        signer = recipe.data.get("signing", {}).get("signer") if isinstance(recipe.data.get("signing"), dict) else None
        if isinstance(signer, str) and not _is_template(signer) and signer not in ws.signers:
            problems.append(Problem.at(shown, probs.line(("signing", "signer")),
                                    f"signer {signer!r} is not configured in kpipe.toml",
                                    "add [signing.signers." + signer + "] to kpipe.toml", "warning"))
        # one problem per (file, line, message, severity), with the kernels it was found for
        by_message: dict[tuple[str, int, str, str], list[str]] = {}
        order: list[tuple[str, int, str, str]] = []
        found: dict[tuple[str, int, str, str], Problem] = {}
        for entry in targets:
            kp = _Problems(shown, recipe.lines, recipe.key_lines)
            try:
                _build_spec(ws, recipe, entry, kp)
            except ConfigError as e:  # e.g. a hostile release in the catalog
                kp.error((), str(e), e.hint or "")
            for p in kp.items:
                key = (p.file, p.line, p.message, str(p.severity))
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
