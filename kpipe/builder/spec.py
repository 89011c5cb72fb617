"""BuildSpec: one recipe rendered for one kernel; the input of every builder."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kpipe.kernel import KernelRelease
from kpipe.settings import KernelEntry


@dataclass(frozen=True)
class PatchFile:
    """A patch named by a recipe, resolved inside patches/."""

    name: str  # path relative to patches/
    path: Path
    sha256: str


@dataclass(frozen=True)
class SourceFile:
    """A rendered source file for kbuild (C source or Kbuild/Makefile)."""

    name: str  # file name inside the build folder, no slashes
    text: str


@dataclass(frozen=True)
class Probe:
    """A functional probe: run argv on the host; its stdout must match the regex `expect`."""

    argv: tuple[str, ...]
    expect: str  # Python regex, searched in stdout
    expect_after_rollback: str = ""  # optional regex the output must match once the patch is gone


@dataclass(frozen=True)
class BuildSpec:
    """A recipe rendered for one target kernel."""

    recipe: str
    recipe_file: Path
    kernel: KernelRelease
    kernel_entry: KernelEntry
    builder: str  # "kpatch-build" | "klp-build" | "kbuild" (an `auto` recipe's choice for this kernel)
    module_name: str  # as the builder will name it (kernel's module name uses '_' for '-')
    patches: tuple[PatchFile, ...] = ()
    sources: tuple[SourceFile, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)  # builder options (jobs, non_replace, targets...)
    signing: dict[str, Any] = field(default_factory=dict)  # {"sign": bool, "signer": name}
    rollout: dict[str, Any] = field(default_factory=dict)  # waves, max_failures, soak, rollback policy
    probe: Probe | None = None
    rendered: dict[str, Any] = field(default_factory=dict)  # the rendered recipe as plain data
    stream: str = ""  # the patch stream (default: the recipe's name)
    version: int = 1  # the version within the stream
    replace: bool = True  # klp replace mode: a loaded patch of this build supersedes every other one
    builder_reason: str = ""  # why this builder (kpipe.recipes.select); not an input of the build

    def inputs_digest(self, builder_version: str = "") -> str:
        """sha256 over everything that determines the build's output (the build cache key)."""
        h = hashlib.sha256()
        doc = {
            "recipe": self.rendered,
            "kernel": self.kernel.release,
            "kernel_entry": {k: v for k, v in self.kernel_entry.__dict__.items()},
            "builder": self.builder,
            "builder_version": builder_version,
            "patches": [(p.name, p.sha256) for p in self.patches],
            "sources": [(s.name, hashlib.sha256(s.text.encode()).hexdigest()) for s in self.sources],
        }
        h.update(json.dumps(doc, sort_keys=True, default=str).encode())
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "recipe_file": str(self.recipe_file),
            "kernel": self.kernel.to_dict(),
            "builder": self.builder,
            "builder_reason": self.builder_reason,
            "module_name": self.module_name,
            "patches": [{"name": p.name, "sha256": p.sha256} for p in self.patches],
            "sources": [{"name": s.name, "text": s.text} for s in self.sources],
            "options": self.options,
            "signing": self.signing,
            "rollout": self.rollout,
            "stream": self.stream,
            "version": self.version,
            "replace": self.replace,
            "probe": None if self.probe is None else {"argv": list(self.probe.argv), "expect": self.probe.expect,
                                                      "expect_after_rollback": self.probe.expect_after_rollback},
        }
