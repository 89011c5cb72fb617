"""Which builder turns a recipe's patches into a module for one kernel, and why (pure but for a file check).

A recipe names its builder, or says `builder: auto`: then the kernel entry's own `builder` decides when it
names a patch builder, else the kernel's capabilities do: Linux >= 6.19 carries its own livepatch builder
(scripts/livepatch/klp-build, with `objtool klp diff` on vmlinux.o), older kernels need kpatch-build.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kpipe.forged import KLP_BUILD_ARCHES
from kpipe.kernel import KernelRelease
from kpipe.settings import KernelEntry

KLP_BUILD_SINCE = (6, 19)  # the first release with scripts/livepatch/klp-build (kpipe.lab.forge says the same)
KLP_BUILD_IN_TREE = "scripts/livepatch/klp-build"
PATCH_BUILDERS = ("kpatch-build", "klp-build")


@dataclass(frozen=True)
class BuilderChoice:
    """The builder picked for one (recipe, kernel) and the reason, as `recipe render` shows it."""

    builder: str
    why: str


def tree_has_klp_build(source: str) -> bool | None:
    """Whether a kernel tree carries klp-build: True/False when the tree is visible here, None when not."""
    if not source:
        return None
    tree = Path(source)
    if not tree.is_dir():
        return None  # the tree lives on the build host only
    return (tree / KLP_BUILD_IN_TREE).is_file()


def capable_builder(kernel: KernelRelease, entry: KernelEntry) -> BuilderChoice:
    """klp-build for a kernel >= 6.19 whose tree carries it, else kpatch-build; with the reason."""
    ver = ".".join(str(v) for v in kernel.version[:2]) or kernel.release
    since = ".".join(str(v) for v in KLP_BUILD_SINCE)
    if len(kernel.version) < 2 or kernel.major_minor < KLP_BUILD_SINCE:
        return BuilderChoice("kpatch-build", f"Linux {ver} predates klp-build (in-tree since {since})")
    if kernel.arch not in ("", "unknown", *KLP_BUILD_ARCHES):
        return BuilderChoice("kpatch-build", f"klp-build does not support {kernel.arch} (only "
                                             f"{', '.join(KLP_BUILD_ARCHES)})")
    has = tree_has_klp_build(entry.source)
    if has is True:
        return BuilderChoice("klp-build", f"Linux {ver} >= {since} and its tree {entry.source} carries "
                                          f"{KLP_BUILD_IN_TREE}")
    if has is False:
        return BuilderChoice("kpatch-build", f"Linux {ver} >= {since} but its tree {entry.source} has no "
                                             f"{KLP_BUILD_IN_TREE}")
    if not entry.source:
        return BuilderChoice("kpatch-build", f"Linux {ver} >= {since} but its kernel entry names no source tree "
                                             "(klp-build runs in the tree)")
    return BuilderChoice("klp-build", f"Linux {ver} >= {since}; its tree {entry.source} is on the build host "
                                      f"(expected to carry {KLP_BUILD_IN_TREE})")


def klp_build_refusal(kernel: KernelRelease, entry: KernelEntry) -> str:
    """Why klp-build cannot build for this kernel ('' when it can, or when its tree is not visible here)."""
    since = ".".join(str(v) for v in KLP_BUILD_SINCE)
    if len(kernel.version) >= 2 and kernel.major_minor < KLP_BUILD_SINCE:
        return f"Linux {kernel.major_minor[0]}.{kernel.major_minor[1]} predates klp-build (in-tree since {since})"
    if kernel.arch not in ("", "unknown", *KLP_BUILD_ARCHES):
        return f"klp-build does not support {kernel.arch} (only {', '.join(KLP_BUILD_ARCHES)})"
    if not entry.source:
        return "its kernel entry names no source tree (klp-build runs in the built tree: set `source`)"
    if tree_has_klp_build(entry.source) is False:
        return f"its tree {entry.source} has no {KLP_BUILD_IN_TREE}"
    return ""


def select_builder(recipe_builder: str, kernel: KernelRelease, entry: KernelEntry) -> BuilderChoice:
    """The builder a recipe uses for one kernel: the recipe's own, else (auto) the entry's, else by capability."""
    if recipe_builder != "auto":
        return BuilderChoice(recipe_builder, f"the recipe says builder: {recipe_builder}")
    capable = capable_builder(kernel, entry)
    if entry.builder in PATCH_BUILDERS and entry.builder != capable.builder:
        return BuilderChoice(entry.builder, f"builder: auto, and the kernel entry of {entry.release} says "
                                            f"builder: {entry.builder} (capabilities: {capable.why})")
    return BuilderChoice(capable.builder, f"builder: auto: {capable.why}")
