"""Shell completion of option and argument values: recipe names, catalog releases, artifact and rollout
ids, lab VM names, audit formats, inventory groups and hosts.

A completer runs on every <TAB>: it reads only local files (kpipe.toml, recipes/, the store read-only, the
lab's state file, inventory files) and never contacts a host. Any failure, or no workspace, offers
nothing: completion must never print an error into the user's command line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from kpipe.store import peek_ids

if TYPE_CHECKING:
    from kpipe.workspace import Workspace

Completer = Callable[[Any, str], list[str]]


def _quiet(fn: Callable[[Any, str], Iterable[str]]) -> Completer:
    """A Typer autocompletion callback from fn(ctx, incomplete): failures and a missing workspace offer nothing."""
    # Typer passes arguments by annotation (a Context, the incomplete str): no functools.wraps, whose
    # __wrapped__ would make Typer read fn's signature instead
    def complete(ctx: typer.Context, incomplete: str) -> list[str]:
        try:
            return [v for v in fn(ctx, incomplete or "")]
        except Exception:  # noqa: BLE001 - a completer that raises would print a traceback into the shell
            return []
    complete.__doc__ = fn.__doc__
    complete.__name__ = fn.__name__
    return complete


def _workspace(ctx: Any) -> Workspace | None:
    """The workspace the command line names (-W, KPIPE_WORKSPACE) or the current folder's; None if none."""
    from kpipe.workspace import open_workspace

    root = ctx.find_root() if ctx is not None else None
    arg = (root.params.get("workspace") if root is not None else None) or os.environ.get("KPIPE_WORKSPACE") or None
    try:
        return open_workspace(arg)
    except Exception:  # noqa: BLE001 - no workspace, or a broken one: nothing to offer
        return None


def _prefixed(values: Iterable[str], incomplete: str) -> list[str]:
    seen: dict[str, None] = {}
    for v in values:
        if v.startswith(incomplete):
            seen.setdefault(v, None)
    return list(seen)


def _recipe_names(ws: Workspace) -> list[str]:
    folder = Path(ws.recipes_dir)
    if not folder.is_dir():
        return []
    return sorted({p.stem for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()})


def _artifact_ids(ws: Workspace) -> list[str]:
    return peek_ids(Path(ws.store_dir), "artifacts")


@_quiet
def recipes(ctx: Any, incomplete: str) -> list[str]:
    """Recipe names (the files of recipes/)."""
    ws = _workspace(ctx)
    return _prefixed(_recipe_names(ws), incomplete) if ws else []


@_quiet
def kernels(ctx: Any, incomplete: str) -> list[str]:
    """Kernel releases of the catalog (kpipe.toml, installed headers, forged kernels)."""
    ws = _workspace(ctx)
    return _prefixed(sorted(ws.kernels), incomplete) if ws else []


@_quiet
def artifacts(ctx: Any, incomplete: str) -> list[str]:
    """Artifact ids, newest first."""
    ws = _workspace(ctx)
    return _prefixed(_artifact_ids(ws), incomplete) if ws else []


@_quiet
def targets(ctx: Any, incomplete: str) -> list[str]:
    """What a rollout takes: recipe names, then artifact ids."""
    ws = _workspace(ctx)
    return _prefixed(_recipe_names(ws) + _artifact_ids(ws), incomplete) if ws else []


@_quiet
def rollouts(ctx: Any, incomplete: str) -> list[str]:
    """`last` and the rollout ids that ran, newest first."""
    ws = _workspace(ctx)
    if ws is None:
        return []
    ids = peek_ids(Path(ws.store_dir), "rollouts")
    return _prefixed(["last", *ids], incomplete)


@_quiet
def plans(ctx: Any, incomplete: str) -> list[str]:
    """`last` and the stored plans that have not run (`rollout start --plan`), newest first."""
    ws = _workspace(ctx)
    if ws is None:
        return []
    ids = peek_ids(Path(ws.store_dir), "plans")
    return _prefixed(["last", *ids], incomplete)


@_quiet
def lab_vms(ctx: Any, incomplete: str) -> list[str]:
    """The lab's VM names (from its state file; no VM is asked)."""
    ws = _workspace(ctx)
    if ws is None:
        return []
    state = Path(ws.root) / ".lab" / "state.json"
    if not state.is_file():
        return []
    vms = json.loads(state.read_text()).get("vms", [])
    return _prefixed([str(v["name"]) for v in vms if isinstance(v, dict) and v.get("name")], incomplete)


@_quiet
def audit_formats(ctx: Any, incomplete: str) -> list[str]:
    """The formats `kpipe audit --format` writes."""
    from kpipe.report import FORMATS

    return _prefixed(FORMATS, incomplete.lower())


@_quiet
def host_patterns(ctx: Any, incomplete: str) -> list[str]:
    """Inventory group and host names for --limit, completing the last term of a pattern (`web:&db`, `all:!h1`)."""
    ws = _workspace(ctx)
    if ws is None or incomplete.startswith("@"):  # @FILE: the shell completes file names
        return []
    from kpipe.fleet.inventory import default_sources, select_hosts

    sources = [p if p.is_absolute() else Path(ws.root) / p for p in default_sources(ws)]
    # a dynamic inventory is a program that may ask anything anywhere: completion runs none
    if not sources or any(p.is_file() and os.access(p, os.X_OK) for p in sources):
        return []
    hosts = select_hosts(ws)  # answered from the store's selection cache while no inventory file changed
    names = sorted({g for h in hosts for g in h.groups}) + [h.name for h in hosts]
    cut = max(incomplete.rfind(":"), incomplete.rfind(","))
    head, term = incomplete[:cut + 1], incomplete[cut + 1:]
    for mark in ("&", "!"):
        if term.startswith(mark):
            head, term = head + mark, term[1:]
    return [head + n for n in _prefixed(names, term)]
