"""Preflight: the gate before the first canary.

Boot the artifact's kernel in a disposable VM (its own lab folder, so a running
`kpipe lab up` is not disturbed), then stage, load, verify (sysfs, taint, the
kernel log after kpipe's marker, the recipe's probe), disable, unload and
verify the removal. The VM is always stopped (unless --keep), and the result,
with the kernel's own lines, is stored with the artifact.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kpipe.artifacts import ArtifactStatus, PreflightOutcome
from kpipe.errors import KpipeError

if TYPE_CHECKING:
    from kpipe.artifacts import Artifact
    from kpipe.builder.spec import Probe
    from kpipe.lab.kernel import KernelImage
    from kpipe.workspace import Workspace

Progress = Callable[[str], None]


def recipe_probe(workspace: Workspace, artifact: Artifact) -> tuple[Probe | None, str]:
    """The artifact's recipe probe (kpipe.recipes.render(...).probe), or (None, why not)."""
    if not artifact.recipe:
        return None, "the artifact names no recipe: no functional probe"
    try:
        from kpipe.recipes import render

        return render(workspace, artifact.recipe, artifact.kernel).probe, ""
    except KpipeError as e:
        return None, f"recipe {artifact.recipe!r} could not be rendered for {artifact.kernel}: {e}"


def lab_kernel(workspace: Workspace, release: str, cache_dir: Path | None = None) -> KernelImage:
    """The bootable kernel for a release: [lab.kernels."<release>"] image+modules, else Debian's package."""
    from kpipe.lab.kernel import fetch_debian_kernel, user_kernel

    custom = workspace.settings.lab.kernels.get(release)
    if custom is not None:
        return user_kernel(workspace.path(custom.image), workspace.path(custom.modules))
    return fetch_debian_kernel(release, cache_dir)


def preflight_options(*, sig_enforce: bool = False, append: str = "") -> dict[str, Any]:
    """The options a preflight result depends on (its record's key)."""
    return {"sig_enforce": bool(sig_enforce), "append": append.strip()}


def run_preflight(workspace: Workspace, artifact_ref: str, *, keep: bool = False, sig_enforce: bool = False,
                  boot_timeout: float = 480.0, memory_mb: int = 256, append: str = "",
                  progress: Progress | None = None, store_result: bool = True) -> dict[str, Any]:
    """Preflight one artifact; return (and store) {status passed|failed, problems, kernel_lines, duration_s...}."""
    from kpipe.artifacts import get_artifact, record_preflight
    from kpipe.fleet import livepatch as lp
    from kpipe.lab.lab import Lab, LabConfig, workspace_lab

    say = progress or (lambda _m: None)
    store = workspace.store
    art = get_artifact(store, artifact_ref)
    art.path(store)  # a missing or changed blob is refused before a VM boots (and nothing is recorded)
    start = time.monotonic()
    steps: list[dict[str, Any]] = []
    problems: list[str] = []
    kernel_lines: list[str] = []
    notes: list[str] = []
    if art.status != ArtifactStatus.VALID:
        notes.append(f"artifact status is {str(art.status)!r} (not validated)")
    probe, why = recipe_probe(workspace, art)
    if why:
        notes.append(why)
    base = workspace_lab(workspace)
    folder = base.folder / "preflight" / f"{art.id}-{uuid.uuid4().hex[:8]}"
    lab = Lab(folder, cache_dir=base.cache_dir, prefix="preflight")
    result: dict[str, Any] = {"artifact": art.id, "kernel": art.kernel, "module": art.module_name,
                              "sha256": art.sha256, "sig_enforce": sig_enforce, "probe": bool(probe)}
    kept: dict[str, Any] | None = None

    def step(name: str, ok: bool, message: str, **extra: Any) -> None:
        steps.append({"step": name, "ok": ok, "message": message, **extra})
        say(f"{name}: {message}")

    try:
        image = lab_kernel(workspace, art.kernel, base.cache_dir)
        say(f"booting {image.release} ({image.source})")
        st = lab.up(image, LabConfig(names=("preflight",), memory_mb=memory_mb, sig_enforce=sig_enforce,
                                     append=append, boot_timeout=boot_timeout), say)
        step("boot", True, f"SSH ready in {st.ready_seconds:.1f} s")
        pool = lab.pool(st)
        try:
            t = pool.transport(lab.targets(st)[0])
            name = lp.sysfs_name(art.module_name)
            remote = lp.stage(t, art.path(store), art.kernel, art.sha256, art.filename)
            step("stage", True, remote)
            loaded = lp.load(t, remote, name, use_kpatch_cli=False)
            kernel_lines += loaded.kernel_lines
            step("load", loaded.ok, loaded.message)
            if loaded.ok:
                w = lp.wait_transition(t, name, timeout=60)
                step("wait", w.ok, w.message)
            v = lp.verify_loaded(t, name, loaded.marker, probe)
            kernel_lines = v.kernel_lines or kernel_lines
            step("verify", v.ok, "; ".join(v.problems) or "enabled, transition 0, patched, K taint, "
                                                            "patching complete" + (", probe matched" if probe else ""),
                 probe_output=v.probe_output[-500:])
            if not v.ok:
                own = [p for p in v.problems if p.startswith("kernel: ")]  # the kernel's reason leads
                problems += own
                if not loaded.ok:
                    problems.append(loaded.message.split("; kernel: ")[0])
                problems += [p for p in v.problems if p not in own]
            if loaded.ok:
                d = lp.disable(t, name, timeout=60)
                step("disable", d.ok, d.message)
                u = lp.unload(t, name)
                step("unload", u.ok, u.message)
                r = lp.verify_removed(t, name, probe, marker=d.marker if d.changed else "")
                kernel_lines += [ln for ln in r.kernel_lines if ln not in kernel_lines]
                step("verify-removed", r.ok, "; ".join(r.problems) or "sysfs dir and module gone, unpatching complete")
                if not d.ok:
                    problems.append(f"disable: {d.message}")
                if not u.ok:
                    problems.append(f"unload: {u.message}")
                problems += r.problems
        finally:
            pool.close()
    except KpipeError as e:
        problems.append(f"lab: {e}")
        step("error", False, str(e))
    finally:
        if keep and lab.load_state() is not None:
            status = lab.status()
            kept = {"folder": str(folder), "ssh": status["vms"][0]["ssh"] if status["vms"] else ""}
        else:
            lab.down()
            shutil.rmtree(folder, ignore_errors=True)
    result.update({
        "status": PreflightOutcome.FAILED if problems else PreflightOutcome.PASSED,
        "problems": problems,
        "kernel_lines": kernel_lines[-50:],
        "steps": steps,
        "notes": notes,
        "duration_s": round(time.monotonic() - start, 2),
        "at": time.time(),
    })
    if kept:
        result["kept"] = kept
    if store_result:
        # Kept as a record with its options: a trial (--sig-enforce, --append) that fails never replaces
        # the artifact's passing preflight of the default options (kpipe.artifacts.record_preflight).
        record_preflight(store, art.id, preflight_options(sig_enforce=sig_enforce, append=append),
                         {k: v for k, v in result.items() if k != "kept"})
    return result
