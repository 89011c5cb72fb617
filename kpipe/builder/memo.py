"""The render memo: a cache hit of `kpipe build --recipe R --kernel K` without rendering the recipe.

The build cache key (BuildSpec.inputs_digest) is computed from the rendered recipe, and rendering loads
YAML and Jinja2. Rendering is a pure function of the recipe, the files under recipes/ and patches/ (the
only places a recipe's templates and patches may come from: kpipe.recipes.paths), the kernel's catalog
entry and kpipe's own rendering code. So once a render succeeded, the memo maps a digest of exactly those
inputs (`input_key`), together with the builder version it was built with, to the inputs digest it gave.
A later `kpipe build` whose input key matches looks the artifact up directly; any change to any of those
files or to the catalog entry changes the key, and the full path (render, then the store) runs instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kpipe.store import Store
    from kpipe.workspace import Workspace

SCHEMA = """
CREATE TABLE IF NOT EXISTS render_memo (
    input_key TEXT NOT NULL,
    builder TEXT NOT NULL,
    builder_version TEXT NOT NULL,
    inputs_digest TEXT NOT NULL,
    arch TEXT NOT NULL DEFAULT '',
    sign INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (input_key, builder, builder_version)
)
"""

# Past this many bytes under recipes/ and patches/ the memo is not worth hashing them (render instead).
MAX_HASHED_BYTES = 16 << 20
_PKG = Path(__file__).resolve().parents[1]
# kpipe's code that decides what a render produces: a changed file (a development checkout, an upgrade
# without a version bump) must not answer with an inputs digest the new code would not compute.
_RENDER_CODE = ("recipes", "builder/spec.py", "builder/memo.py", "kernel.py", "yamlnodes.py")


def _code_stamp() -> list[tuple[str, int, int]]:
    stamp: list[tuple[str, int, int]] = []
    for rel in _RENDER_CODE:
        p = _PKG / rel
        files = sorted(p.glob("*.py")) if p.is_dir() else [p]
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            stamp.append((str(f.relative_to(_PKG)), st.st_size, st.st_mtime_ns))
    return stamp


def _hash_tree(h: Any, base: Path, budget: list[int]) -> bool:
    """Feed every regular file under base (sorted, by content, through symlinks) into h; False past the budget."""
    if not base.is_dir():
        h.update(f"\0absent:{base}\0".encode())
        return True
    for root, dirs, files in os.walk(base, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            f = Path(root, name)
            try:
                data = f.read_bytes()
            except OSError:
                h.update(f"\0unreadable:{f.relative_to(base)}\0".encode())
                continue
            budget[0] -= len(data)
            if budget[0] < 0:
                return False
            h.update(f"\0{f.relative_to(base)}\0{len(data)}\0".encode())
            h.update(data)
    return True


def input_key(ws: Workspace, recipe: str, release: str) -> str | None:
    """A digest of everything rendering `recipe` for `release` reads; None when it cannot be taken cheaply
    (the kernel is not in the catalog, the trees are too large): then the caller renders."""
    from kpipe import __version__
    from kpipe.errors import KpipeError

    try:
        entry = ws.kernel(release)
    except KpipeError:
        return None
    h = hashlib.sha256()
    head = {"kpipe": __version__, "code": _code_stamp(), "recipe": recipe, "release": release,
            "entry": entry.__dict__, "recipes": str(ws.recipes_dir), "patches": str(ws.patches_dir)}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    budget = [MAX_HASHED_BYTES]
    for base in (Path(ws.recipes_dir), Path(ws.patches_dir)):
        if not _hash_tree(h, base, budget):
            return None
    return h.hexdigest()


def ensure_schema(store: Store) -> None:
    """Create the render_memo table (idempotent)."""
    store.ensure_schema(SCHEMA)


def remember(store: Store, key: str, *, builder: str, builder_version: str, inputs_digest: str, arch: str,
             sign: bool) -> None:
    """Record that the inputs behind `key`, built with `builder_version`, have this inputs digest (and the
    rendered spec's arch and whether it asks for signing: what answering without the spec needs)."""
    ensure_schema(store)
    with store.write() as c:
        c.execute("INSERT INTO render_memo (input_key, builder, builder_version, inputs_digest, arch, sign) "
                  "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(input_key, builder, builder_version) DO UPDATE SET "
                  "inputs_digest = excluded.inputs_digest, arch = excluded.arch, sign = excluded.sign",
                  (key, builder, builder_version, inputs_digest, arch, int(sign)))


def recall(store: Store, key: str) -> list[dict[str, Any]]:
    """Every memo row of `key` (builder, builder_version, inputs_digest, arch, sign)."""
    ensure_schema(store)
    return [dict(r) for r in store.query("SELECT builder, builder_version, inputs_digest, arch, sign "
                                         "FROM render_memo WHERE input_key = ?", (key,))]
