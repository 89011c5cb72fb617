"""The klp-build builder: the kernel's own livepatch builder (scripts/livepatch/klp-build, Linux >= 6.19).

Checked against Debian sid's linux-source-7.2 (tests/test_klp_real.py). klp-build must run from the
kernel tree's root (it builds in place, with `objtool klp diff` on vmlinux.o and the changed modules)
and keeps its state in <tree>/klp-tmp: one build per tree at a time, so kpipe takes a lock file in the
tree (flock) around it. It builds the original kernel, then the patched one, checksums, diffs and links
the module; `-S/--short-circuit STEP` restarts at a step when klp-tmp was kept (`-T`), which kpipe always
asks for so that a rebuild of another patch on the same tree can skip the original kernel build.
ARCH in the environment would reach its make calls, so it is removed with `env -u ARCH`.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

from kpipe.builder.base import Builder, BuildPlan, Milestone, StagedFile, safe_relpath
from kpipe.builder.kpatch import module_name_string, predict_module_name
from kpipe.builder.spec import BuildSpec
from kpipe.errors import ConfigError
from kpipe.settings import BuildHost

KLP_BUILD_IN_TREE = "scripts/livepatch/klp-build"
LOCK_NAME = ".kpipe-klp-build.lock"  # in the tree: klp-build's klp-tmp and objects are per tree

# klp-build's --short-circuit steps (its usage text): name -> number.
SHORT_CIRCUIT_STEPS: dict[str, int] = {"orig": 1, "patched": 2, "checksum": 3, "diff": 4, "kmod": 5}

# Its `status` lines (bold on a terminal, plain in kpipe's log) and objtool klp diff's per-function lines.
_MILESTONES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("validating-patches", re.compile(r"^Validating patch\(es\)")),
    ("building-original", re.compile(r"^Building original kernel")),
    ("copying-original", re.compile(r"^Copying original object files")),
    ("fixing-patches", re.compile(r"^Fixing patch\(es\)")),
    ("building-patched", re.compile(r"^Building patched kernel")),
    ("copying-patched", re.compile(r"^Copying patched object files")),
    ("checksums", re.compile(r"^Generating (original|patched) checksums")),
    ("diffing", re.compile(r"^Diffing objects")),
    ("changed-function", re.compile(r": (changed|new) function: ")),
    ("building-module", re.compile(r"^Building patch module: ")),
    ("success", re.compile(r"^SUCCESS\s*$")),
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def short_circuit_step(value: Any) -> int:
    """A short-circuit option (a step name or number 1-5) as klp-build's step number; ConfigError otherwise."""
    if isinstance(value, bool):
        value = str(value)
    text = str(value).strip().lower()
    if text.isdigit() and 1 <= int(text) <= 5:
        return int(text)
    if text in SHORT_CIRCUIT_STEPS:
        return SHORT_CIRCUIT_STEPS[text]
    raise ConfigError(f"klp-build option short_circuit must be one of {', '.join(SHORT_CIRCUIT_STEPS)} (or 1-5), "
                      f"got {value!r}",
                      hint="patched reuses the original kernel build of an earlier klp-build run on the same tree")


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit() or int(value) < 1:
        raise ConfigError(f"klp-build option {what} must be a positive integer, got {value!r}")
    return int(value)


def klp_build_path(tree: str) -> str:
    """Where klp-build lives in a kernel tree."""
    return posixpath.join(tree, KLP_BUILD_IN_TREE)


class KlpBuilder(Builder):
    """scripts/livepatch/klp-build in the target kernel's own tree, on a build host with the kernel's gcc."""

    name = "klp-build"
    # The tool comes with each tree, so the kernel release names its version; the compiler and, when the
    # host names a klp-build of its own (tools.klp-build), that script's digest identify the toolchain.
    version_script = r"""
tool=$1; cc=$2
if p=$(command -v "$tool" 2>/dev/null); then
  echo "klp-build-sha256=$(sha256sum "$p" 2>/dev/null | cut -c1-16)"
else
  echo "klp-build=in-tree"
fi
echo "gcc=$("$cc" --version 2>/dev/null | head -n 1)"
"""

    def version_args(self, host: BuildHost) -> tuple[str, ...]:
        return (host.tool("klp-build"), host.tool("gcc"))

    def plan(self, spec: BuildSpec, host: BuildHost, build_dir: str, *, jobs: int | None = None) -> BuildPlan:
        if not spec.patches:
            raise ConfigError(f"{spec.recipe_file}: recipe {spec.recipe!r} names no patch files",
                              hint="klp-build needs at least one patch")
        tree = spec.kernel_entry.source
        if not tree:
            raise ConfigError(f"kernel {spec.kernel.release}: klp-build needs the kernel's source tree",
                              hint="set `source` in its [[kernels]] entry (the built tree on the build host)")
        opts = dict(spec.kernel_entry.options or {})
        opts.update(spec.options or {})
        files: list[StagedFile] = [StagedFile("out/.keep", b"")]
        patch_paths: list[str] = []
        for i, p in enumerate(spec.patches):
            base = posixpath.basename(p.name.replace("\\", "/")) or f"patch-{i}"
            rel = safe_relpath(f"patches/{i:02d}/{base}")  # keeps each basename (the default module name)
            files.append(StagedFile(rel, p.path.read_bytes()))
            patch_paths.append(f"{build_dir}/{rel}")

        name = str(opts.get("module_name") or "")
        module = module_name_string(name) if name else predict_module_name([p.name for p in spec.patches])
        out_dir = f"{build_dir}/out"
        tool = host.tools.get("klp-build") or klp_build_path(tree)
        # flock: one klp-build per tree (klp-tmp, the in-place build); env -C: it must run from the tree root.
        argv: list[str] = ["flock", posixpath.join(tree, LOCK_NAME), "env", "-u", "ARCH", "-C", tree, tool]
        njobs = jobs if jobs is not None else opts.get("jobs")
        if njobs not in (None, ""):
            argv += ["--jobs", str(_positive_int(njobs, "jobs"))]
        argv += ["--output", f"{out_dir}/{module}.ko"]
        if opts.get("non_replace"):
            argv += ["--no-replace"]
        argv += ["--keep-tmp"]
        sc = opts.get("short_circuit")
        if sc not in (None, "", False):
            argv += ["--short-circuit", str(short_circuit_step(sc))]
        argv += ["--", *patch_paths]
        return BuildPlan(
            builder=self.name, build_dir=build_dir, argv=tuple(argv), module_name=module,
            module_path=f"{out_dir}/{module}.ko", output_dir=out_dir, files=tuple(files),
            summary={"module": module, "release": spec.kernel.release, "tree": tree},
        )

    def milestone(self, line: str) -> Milestone | None:
        text = _ANSI.sub("", line).strip()
        for step, rx in _MILESTONES:
            if rx.search(text):
                return Milestone(step, text)
        return None
