"""Preflight: the gate before the first canary.

Boot the artifact's kernel in a disposable VM (its own lab folder, so a running
`kpipe lab up` is not disturbed), then stage, load, verify (sysfs, taint, the
kernel log after kpipe's marker, the recipe's probe), disable, unload and
verify the removal. The VM is always stopped (unless --keep), and the result,
with the kernel's own lines, is stored with the artifact.

With `vm` (``kpipe preflight ID --vm lab1``) a VM of the running `kpipe lab up` is
reused instead: it must run the artifact's kernel release; the same steps run,
and the VM is left running and clean (module unloaded, staged file removed).
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


FORGED_MARK = "kforge"  # the forge's releases (docs/forge.md) carry it; only those trust the lab certificate


def sig_enforce_note(release: str) -> str:
    """One line on which certificate a sig_enforce kernel trusts ("" for the forge's, which trust the lab's)."""
    if FORGED_MARK in release:
        return ""
    return (f"{release} trusts only its vendor's keys, not the lab certificate: under sig_enforce the accepted "
            "path needs a forged kernel (docs/forge.md)")


def _lab_extra_args(append: str) -> str:
    """A VM's kernel arguments beyond the lab's own (console, panic, sig_enforce): the `append` option."""
    return " ".join(a for a in append.split() if a != "panic=-1" and not a.startswith("console=")
                    and not a.startswith("kpipe.lab=") and a != "module.sig_enforce=1")


def attach_lab_vm(workspace: Workspace, vm: str, release: str, module_name: str,
                  sig_enforce: bool) -> tuple[Any, Any, dict[str, Any]]:
    """The running lab VM `vm` as (pool, transport, {sig_enforce, append}); refuse one that runs another
    kernel, is not enforcing when `sig_enforce` is asked, or already has the module loaded."""
    from kpipe.errors import ConfigError, NotFoundError, UsageError
    from kpipe.fleet import livepatch as lp
    from kpipe.lab import vm as vmmod
    from kpipe.lab.lab import workspace_lab

    lab = workspace_lab(workspace)
    st = lab.load_state()
    if st is None:
        raise ConfigError(f"no lab is running (no {lab.state_file}), so there is no VM {vm!r}",
                          hint=f"start one with `kpipe lab up --kernel {release}`, or drop --vm to boot a VM")
    names = [v.name for v in st.vms]
    if vm not in names:
        raise NotFoundError(f"no lab VM named {vm!r}", hint=f"lab VMs: {', '.join(names)}")
    v = st.vm(vm)
    if not vmmod.alive(v):
        raise ConfigError(f"lab VM {vm} is not running", hint="`kpipe lab down` then `kpipe lab up`")
    target = next(h for h in lab.targets(st) if h.name == vm)
    pool = lab.pool(st)
    try:
        from kpipe.commands import Command

        t = pool.transport(target)
        r = t.run(Command.of("uname", "-r", timeout=30))
        running = r.stdout.strip()
        if not r.ok or not running:
            raise ConfigError(f"lab VM {vm}: `uname -r` failed: {r.summary()}", hint=f"see {v.folder}/console.log")
        if running != release:
            raise UsageError(f"lab VM {vm} runs kernel {running}, the artifact is built for {release}",
                             hint=f"`kpipe lab up --kernel {release}`, or drop --vm to boot a VM of {release}")
        r = t.run(Command.of("cat", "/sys/module/module/parameters/sig_enforce", timeout=30))
        enforcing = r.ok and r.stdout.strip() == "Y"
        if sig_enforce and not enforcing:
            raise UsageError(f"lab VM {vm} does not enforce module signatures (module.sig_enforce is off)",
                             hint="`kpipe lab up --sig-enforce` (or --sig-enforce-vms), or drop --sig-enforce")
        name = lp.sysfs_name(module_name)
        before = lp.read_state(t, name)
        if before.module(name).present or name in before.patches:
            raise UsageError(f"lab VM {vm} already has module {name} loaded; a preflight would unload it",
                             hint=f"unload it first (`kpipe lab ssh {vm} -- rmmod {name}` after disabling), "
                                  "or use another VM")
    except BaseException:
        pool.close()
        raise
    return pool, t, {"sig_enforce": enforcing, "append": _lab_extra_args(v.append), "vm": vm}


def run_preflight(workspace: Workspace, artifact_ref: str, *, keep: bool = False, sig_enforce: bool = False,
                  boot_timeout: float = 480.0, memory_mb: int = 256, append: str = "",
                  progress: Progress | None = None, store_result: bool = True,
                  vm: str | None = None) -> dict[str, Any]:
    """Preflight one artifact; return (and store) {status passed|failed, problems, kernel_lines, duration_s...}.
    With `vm`, reuse that VM of the running lab (left running and clean) instead of booting one."""
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
    attached: dict[str, Any] | None = None
    if vm is not None:
        if keep:
            from kpipe.errors import UsageError

            raise UsageError("--keep and --vm do not go together", hint="a lab VM keeps running anyway")
        # Checked before anything runs or is recorded: a wrong VM is a usage error, not a failed preflight.
        vm_pool, vm_t, attached = attach_lab_vm(workspace, vm, art.kernel, art.module_name, sig_enforce)
        sig_enforce, append = attached["sig_enforce"], attached["append"]
    folder = base.folder / "preflight" / f"{art.id}-{uuid.uuid4().hex[:8]}"
    lab = Lab(folder, cache_dir=base.cache_dir, prefix="preflight")
    result: dict[str, Any] = {"artifact": art.id, "kernel": art.kernel, "module": art.module_name,
                              "sha256": art.sha256, "sig_enforce": sig_enforce, "probe": bool(probe)}
    if attached:
        result["vm"] = attached["vm"]
    if sig_enforce and sig_enforce_note(art.kernel):
        notes.append(sig_enforce_note(art.kernel))
    kept: dict[str, Any] | None = None

    def step(name: str, ok: bool, message: str, **extra: Any) -> None:
        steps.append({"step": name, "ok": ok, "message": message, **extra})
        say(f"{name}: {message}")

    try:
        if attached is not None:
            pool, t = vm_pool, vm_t
            step("attach", True, f"lab VM {attached['vm']} runs {art.kernel}"
                 + (", module.sig_enforce=1" if sig_enforce else ""))
        else:
            image = lab_kernel(workspace, art.kernel, base.cache_dir)
            say(f"kernel: {image.release} ({image.source})")
            st = lab.up(image, LabConfig(names=("preflight",), memory_mb=memory_mb, sig_enforce=sig_enforce,
                                         append=append, boot_timeout=boot_timeout), say)
            step("boot", True, f"SSH ready in {st.ready_seconds:.1f} s")
            pool = lab.pool(st)
            t = pool.transport(lab.targets(st)[0])
        staged = False
        try:
            name = lp.sysfs_name(art.module_name)
            staged = True  # set before: a partial upload is removed too
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
            if attached is not None:
                staged = False
                un = lp.unstage(t, art.kernel, art.filename, art.sha256)
                step("unstage", un.ok, un.message)
                if not un.ok:
                    problems.append(f"unstage: {un.message}")
        finally:
            try:
                if attached is not None:
                    _leave_clean(t, art, staged, say)
            finally:
                pool.close()
    except KpipeError as e:
        problems.append(f"lab: {e}")
        step("error", False, str(e))
    finally:
        if attached is not None:
            pass  # the lab's VM keeps running; only the preflight's own (unused) folder would be here
        elif keep and lab.load_state() is not None:
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
    if sig_enforce and problems and sig_enforce_note(art.kernel):
        problems.append(sig_enforce_note(art.kernel))
    if store_result:
        # Kept as a record with its options: a trial (--sig-enforce, --append) that fails never replaces
        # the artifact's passing preflight of the default options (kpipe.artifacts.record_preflight).
        record_preflight(store, art.id, preflight_options(sig_enforce=sig_enforce, append=append),
                         {k: v for k, v in result.items() if k != "kept"})
    return result


def _leave_clean(t: Any, art: Artifact, staged: bool, say: Progress) -> None:
    """After an error on a reused lab VM: disable and unload the module if still there, remove the staged
    file; best effort, each failure said (the VM must not keep a half-run preflight)."""
    from kpipe.fleet import livepatch as lp

    name = lp.sysfs_name(art.module_name)
    try:
        state = lp.read_state(t, name)
        if name in state.patches:
            lp.disable(t, name, timeout=60)
        if state.module(name).present or name in state.patches:
            lp.unload(t, name)
        if staged:
            lp.unstage(t, art.kernel, art.filename, art.sha256)
    except KpipeError as e:
        say(f"cleanup on the lab VM failed: {e}")
