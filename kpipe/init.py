"""kpipe init: a new workspace (kpipe.toml, an example recipe, patches/) for the kernels installed here."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from kpipe.errors import ConfigError

WORKSPACE_FILES = ("kpipe.toml", "recipes/cmdline-demo.yaml", "recipes/templates/livepatch-cmdline.c.j2",
                   "recipes/templates/Kbuild.j2", "patches/README")


@dataclass
class InitResult:
    """What `kpipe init` wrote, and for which kernels."""

    root: Path
    written: list[str] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)
    globs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"root": str(self.root), "written": self.written, "kernels": self.kernels, "globs": self.globs}


def kernel_glob(release: str) -> str:
    """A glob that keeps matching a kernel line across ABI bumps: 6.1.0-57-amd64 -> 6.1.*-amd64."""
    from kpipe.kernel import parse_release

    try:
        k = parse_release(release)
    except Exception:
        return release
    prefix = f"{k.upstream}-{k.abi}-"
    if k.distro == "debian" and k.abi and release.startswith(prefix):
        return f"{k.version[0]}.{k.version[1]}.*-{release[len(prefix):]}"
    return release


def init_workspace(root: Path, kernels: list[str], *, arch: str | None = None, force: bool = False) -> InitResult:
    """Write a commented kpipe.toml, recipes/ with one example and patches/ into root; never overwrite without force."""
    from kpipe.kernel import normalize_arch

    root = root.absolute()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} exists and is not a folder")
    clashes = [f for f in WORKSPACE_FILES if (root / f).exists()]
    if clashes and not force:
        raise ConfigError(f"{root / clashes[0]} already exists",
                          hint="kpipe init never overwrites a workspace; pass --force to rewrite its files")
    globs = sorted({kernel_glob(r) for r in kernels}) or ["*"]
    # TOML and YAML flow lists accept the same double-quoted strings (JSON's quoting).
    glob_list = ", ".join(json.dumps(g) for g in globs)
    described = ", ".join(kernels) if kernels else "none installed yet (install linux-headers-<release>)"
    subst = {"@ARCH@": normalize_arch(arch or platform.machine()), "@KERNEL_GLOBS@": glob_list,
             "@KERNELS@": described}
    assets = resources.files("kpipe") / "init_assets"
    contents = {
        "kpipe.toml": _fill(assets.joinpath("kpipe.toml.in").read_text(), subst),
        "recipes/cmdline-demo.yaml": _fill(assets.joinpath("cmdline-demo.yaml.in").read_text(), subst),
        "recipes/templates/livepatch-cmdline.c.j2": assets.joinpath("templates/livepatch-cmdline.c.j2").read_text(),
        "recipes/templates/Kbuild.j2": assets.joinpath("templates/Kbuild.j2").read_text(),
        "patches/README": "Patches that recipes name (`patches: [fix.patch]`), in `diff -u` / git format.\n",
    }
    result = InitResult(root, kernels=list(kernels), globs=globs)
    for rel, text in contents.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        result.written.append(rel)
    return result


def _fill(text: str, subst: dict[str, str]) -> str:
    for key, value in subst.items():
        text = text.replace(key, value)
    return text
