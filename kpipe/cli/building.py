"""The body of `kpipe build`: build modules on build hosts (one recipe x kernel, or a matrix), with progress.

No Typer here: the Typer command (kpipe.cli.build) calls build_command(), and so does kpipe.cli.fast, which
runs a plain `kpipe build` argv without loading Typer (start-up budget, tests/test_startup_budget.py).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: a cache hit loads none of the build machinery
    from rich.console import Console
    from rich.status import Status

    from kpipe.builder.runner import BuildEvent, BuildResult, BuildRunner
    from kpipe.builder.spec import BuildSpec
    from kpipe.cli.context import PlainConsole
    from kpipe.workspace import Workspace


def build_command(kernel: str | None = None, recipe: str | None = None, all_kernels: bool = False,
                  force: bool = False, host: str | None = None, jobs: int | None = None, verbose: bool = False,
                  fleet: str | None = None, json_out: bool = False) -> None:
    """`kpipe build` (kpipe.cli.build documents the options)."""
    from kpipe.cli.context import print_json, state
    from kpipe.errors import UsageError

    st = state()
    if fleet is not None:
        if kernel or all_kernels:
            raise UsageError("--fleet builds for the kernels the hosts run: it goes without --kernel and "
                             "--all-kernels", hint="kpipe build --fleet PATTERN [--recipe NAME]")
        _build_fleet(fleet, recipe, force=force, host=host, jobs=jobs, verbose=verbose, json_out=json_out)
        return
    if not kernel and not recipe:
        raise UsageError("give --kernel RELEASE, --recipe NAME --kernel RELEASE, or --recipe NAME --all-kernels",
                         hint="see `kpipe build --help`")
    if all_kernels and (kernel or not recipe):
        raise UsageError("--all-kernels goes with --recipe NAME and without --kernel")
    if recipe and not kernel and not all_kernels:
        raise UsageError(f"which kernels should recipe {recipe!r} be built for?",
                         hint="add --kernel RELEASE or --all-kernels")
    ws = st.workspace
    console = st.printer(stderr=json_out)  # Rich on a terminal; piped (scripts, CI), plain lines and no Rich
    memo_key = None
    if recipe and kernel and not force:
        from kpipe.builder.memo import input_key

        memo_key = input_key(ws, recipe, kernel)
    hit = _answer_from_memo(ws, recipe, kernel, memo_key, console, verbose, host) if memo_key else None
    if hit is not None:  # the store's artifact of these very inputs: no rendering, no build host
        results: list[BuildResult] = [hit]
    else:
        runner, progress = _runner(ws, console, verbose, force, host, jobs)
        try:
            if recipe and kernel:
                runner.prepare(kernel)  # connect to its build host while the recipe renders
            specs, keys, errors = _specs(ws, kernel, recipe, all_kernels, memo_key, runner.name_builder)
            results = errors + _run_builds(runner, progress, specs, keys)
        finally:
            runner.close()
    if json_out:
        print_json([r.to_dict() for r in results])
    else:
        _summary(console, results)
    _exit_for(results, console if not json_out else None)


def _build_fleet(pattern: str, recipe: str | None, *, force: bool, host: str | None, jobs: int | None,
                 verbose: bool, json_out: bool) -> None:
    """`kpipe build --fleet`: the running releases (through the observer) -> the matrix, built in parallel."""
    from kpipe import recipes
    from kpipe.builder import runner as build_runner
    from kpipe.builder.fleet import fleet_exit_code, fleet_matrix, running_releases
    from kpipe.builder.states import BuildStatus
    from kpipe.cli.context import print_json, state
    from kpipe.errors import ExitCode, KpipeError, NotFoundError
    from kpipe.fleet.inventory import select_hosts
    from kpipe.fleet.observe import gather_facts

    st = state()
    ws = st.workspace
    if recipe:
        recipes.load_recipe(ws, recipe)  # NotFoundError (exit 5) before any host is asked
    hosts = select_hosts(ws, pattern)
    if not hosts:
        raise NotFoundError(f"no host matches {pattern!r}", hint="see `kpipe fleet list`")
    console = st.err_console if json_out else st.console
    facts = gather_facts(ws, hosts)
    running, unbuilt = running_releases(facts)
    pairs, not_buildable = fleet_matrix(ws, running, recipe)
    unbuilt = not_buildable + unbuilt
    specs: list[BuildSpec] = []
    results: list[BuildResult] = []
    for name, release in pairs:
        try:
            specs.append(recipes.render(ws, name, release))
        except KpipeError as e:
            results.append(build_runner.BuildResult(f"{name}@{release}", name, release, BuildStatus.ERROR,
                                                    message=e.message, hint=e.hint or "", exit_code=int(e.exit_code)))
    if specs:
        runner, progress = _runner(ws, console, verbose, force, host, jobs)
        try:
            results += _run_builds(runner, progress, specs)
        finally:
            runner.close()
    if json_out:
        print_json({"running": [{"release": r.release, "arch": r.arch, "hosts": list(r.hosts)} for r in running],
                    "builds": [r.to_dict() for r in results], "not_built": [u.to_dict() for u in unbuilt]})
    else:
        if results:
            _summary(console, results)
        elif not unbuilt:
            console.print("nothing to build")
        _unbuilt_table(console, unbuilt)
    if any(not r.ok for r in results):
        _exit_for(results, console if not json_out else None)
    code = fleet_exit_code(unbuilt)
    if code:
        problems = [u for u in unbuilt if u.code != "no-recipe"]
        first = problems[0]
        who = first.release or ", ".join(first.hosts)
        raise KpipeError(f"{len(problems)} of the fleet's kernels or hosts got no build; first: {who}: "
                         f"{first.reason}", hint="the `not built` table lists each with its reason",
                         exit_code=ExitCode(code))


def _answer_from_memo(ws: Workspace, recipe: str | None, kernel: str | None, memo_key: str,
                      console: Console | PlainConsole, verbose: bool, host: str | None) -> BuildResult | None:
    """A cache hit found through the render memo (kpipe.builder.memo), printed as run() prints one; or None."""
    from kpipe.builder.runner import BuildOptions, BuildRunner

    assert recipe and kernel  # the memo answers `--recipe R --kernel K` only
    progress = _Progress(console, verbose=verbose, quiet=False)
    runner = BuildRunner(ws, on_event=progress.event, options=BuildOptions(host=host))
    try:
        return runner.answer_from_memo(recipe, kernel, memo_key)
    finally:
        runner.close()


def _runner(ws: Workspace, console: Console | PlainConsole, verbose: bool, force: bool, host: str | None,
            jobs: int | None) -> tuple[BuildRunner, _Progress]:
    """The BuildRunner of this command and the progress it reports to (the caller closes the runner)."""
    from kpipe.builder.runner import BuildOptions, BuildRunner

    progress = _Progress(console, verbose=verbose, quiet=False)

    def on_event(ev: Any) -> None:
        if ev.kind == "started":
            _import_for_validation()
        progress.event(ev)

    return BuildRunner(ws, on_event=on_event, options=BuildOptions(force=force, host=host, jobs=jobs)), progress


def _run_builds(runner: BuildRunner, progress: _Progress, specs: list[BuildSpec],
                input_keys: list[str | None] | None = None) -> list[BuildResult]:
    """Run the builds with progress; Ctrl-C leaves the started builds running (exit 130)."""
    from kpipe.errors import ExitCode, KpipeError

    try:
        with progress.status(len(specs)):
            return runner.run(specs, input_keys)
    except KeyboardInterrupt:
        raise KpipeError("interrupted: the started builds keep running on their build hosts",
                         hint="run the same `kpipe build` again to reattach (`kpipe builds` lists them)",
                         exit_code=ExitCode.INTERRUPTED) from None


@functools.cache
def _import_for_validation() -> None:
    """Import, in a background thread, what a finished build's classification and validation load (pyelftools,
    ~0.1-0.2 s of CPU), while the build host compiles and this process only waits for its log: those imports
    then cost nothing on the way from "built" to the result. Once per process; a failing import is left for
    the real import to report."""
    def load() -> None:
        try:
            import kpipe.builder.classify  # noqa: F401
            from kpipe.elf.reader import import_pyelftools

            import_pyelftools()
        except Exception:  # noqa: BLE001 -- reported, if it matters, where the module is really used
            return

    threading.Thread(target=load, name="kpipe-import-ahead", daemon=True).start()


def _unbuilt_table(console: Console, unbuilt: list[Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    if not unbuilt:
        return
    t = Table(title="not built")
    for col in ("kernel", "hosts", "reason"):
        t.add_column(col)
    for u in unbuilt:
        hosts = ", ".join(u.hosts[:5]) + (f" (+{len(u.hosts) - 5})" if len(u.hosts) > 5 else "")
        t.add_row(escape(u.release or "?"), escape(hosts), escape(u.reason))
    console.print(t)


def _specs(ws: Workspace, kernel: str | None, recipe: str | None, all_kernels: bool,
           memo_key: str | None = None, name_builder: Callable[[str | None], None] | None = None,
           ) -> tuple[list[BuildSpec], list[str | None], list[BuildResult]]:
    """The BuildSpecs to build, the render memo's input key of each (None where the inputs changed while it
    rendered, so nothing is remembered for them), and error results for the ones that do not render.

    name_builder (one recipe for one kernel): told the recipe's builder before the render when the recipe
    names it literally (the warm-up probes the build host for it meanwhile), else the rendered one."""
    from kpipe import recipes
    from kpipe.builder import runner as build_runner
    from kpipe.builder.memo import input_key
    from kpipe.builder.states import BuildStatus
    from kpipe.errors import KpipeError, NotFoundError

    pairs: list[tuple[str, str]] = []
    if recipe and kernel:
        pairs = [(recipe, kernel)]
        if name_builder is not None:
            try:
                literal = recipes.load_recipe(ws, recipe).builder
            except KpipeError:
                literal = ""  # render reports it
            if literal in ("kbuild", "kpatch-build", "klp-build"):
                name_builder(literal)
    elif kernel:
        found = recipes.recipes_for_kernel(ws, kernel)
        ws.kernel(kernel)  # NotFoundError for a kernel outside the catalog
        if not found:
            raise NotFoundError(f"no recipe targets kernel {kernel!r}",
                                hint="see `kpipe recipe list`; add the release or a glob to a recipe's kernels:")
        pairs = [(r.name, kernel) for r in found]
    else:
        assert recipe is not None  # `kpipe build` refuses a build with neither target before this (exit 2)
        rec = recipes.load_recipe(ws, recipe)
        releases = recipes.kernels_for_recipe(ws, rec)
        if not releases:
            raise NotFoundError(f"recipe {recipe!r} targets no kernel of the catalog",
                                hint=f"its kernels: {', '.join(rec.kernels)}; see `kpipe kernels list`")
        pairs = [(rec.name, r) for r in releases]
    specs: list[BuildSpec] = []
    keys: list[str | None] = []
    errors: list[BuildResult] = []
    for name, release in pairs:
        before = memo_key if (name, release) == (recipe, kernel) and memo_key else input_key(ws, name, release)
        try:
            specs.append(recipes.render(ws, name, release))
            if name_builder is not None and len(pairs) == 1:
                name_builder(specs[-1].builder)
        except KpipeError as e:
            if len(pairs) == 1:
                raise
            errors.append(build_runner.BuildResult(f"{name}@{release}", name, release, BuildStatus.ERROR,
                                                   message=e.message, hint=e.hint or "",
                                                   exit_code=int(e.exit_code)))
            continue
        keys.append(before if before is not None and input_key(ws, name, release) == before else None)
    return specs, keys, errors


class _Progress:
    """Renders BuildEvents: milestones as lines, a live status line on a terminal."""

    def __init__(self, console: Console | PlainConsole, *, verbose: bool, quiet: bool) -> None:
        self.console = console
        self.verbose = verbose
        self.quiet = quiet
        self.started: dict[str, float] = {}
        self.current: dict[str, str] = {}
        self.done = 0
        self.total = 0
        self._status: Status | None = None
        self._lock = threading.Lock()

    def status(self, total: int) -> AbstractContextManager[object]:
        import contextlib

        from kpipe.cli.context import PlainConsole

        self.total = total
        if isinstance(self.console, PlainConsole) or not self.console.is_terminal or total == 0:
            return contextlib.nullcontext()
        self._status = self.console.status(self._status_text(), spinner="dots")
        return self._status

    def _status_text(self) -> str:
        running = ", ".join(f"{k}: {v}" for k, v in list(self.current.items())[:3])
        return f"building {self.done}/{self.total} done" + (f" | {running}" if running else "")

    def event(self, ev: BuildEvent) -> None:
        from kpipe.cli.context import esc as escape  # Rich's escaping, without loading Rich when piped

        with self._lock:
            t0 = self.started.setdefault(ev.key, time.monotonic())
            elapsed = time.monotonic() - t0
            tag = f"[bold]{escape(ev.key)}[/bold]"
            if ev.kind == "line":
                if self.verbose:
                    self.console.print(f"{tag} [dim]{escape(ev.message)}[/dim]")
                return
            if ev.kind == "milestone":
                self.current[ev.key] = ev.message[:60]
                self.console.print(f"{tag} [cyan]{elapsed:6.1f}s[/cyan] {escape(ev.message)}")
            elif ev.kind in ("started", "reattached", "restarted", "host"):
                if ev.kind != "host":
                    self.console.print(f"{tag} {escape(ev.message)}")
            elif ev.kind == "cached":
                self.done += 1
                self.console.print(f"{tag} [green]cached[/green] {escape(ev.message)}")
            elif ev.kind == "built":
                self.done += 1
                self.current.pop(ev.key, None)
                self.console.print(f"{tag} [green]built[/green] {escape(ev.message)} in {elapsed:.1f}s")
            elif ev.kind in ("validated", "signed"):
                self.console.print(f"{tag} {escape(ev.message)}")
            elif ev.kind in ("failed", "error"):
                self.done += 1
                self.current.pop(ev.key, None)
                self.console.print(f"{tag} [red]{ev.kind}[/red] {escape(ev.message)}")
            if self._status is not None:
                self._status.update(self._status_text())


def _summary(console: Console | PlainConsole, results: list[BuildResult]) -> None:
    from kpipe.cli.context import PlainConsole
    from kpipe.cli.context import esc as escape

    if len(results) > 1 and isinstance(console, PlainConsole):
        # for tools and pipes: one tab-separated header line and one line per build (as `recipe list`)
        console.print("\t".join(("recipe", "kernel", "host", "status", "artifact", "time", "detail")), markup=False)
        for r in results:
            cells = (r.recipe, r.kernel, r.host, str(r.status), r.artifact_id,
                     f"{r.duration_s:.1f}s" if r.duration_s else "", r.message[-100:] if not r.ok else "")
            console.print("\t".join(" ".join(str(c).split()) for c in cells), markup=False)
    elif len(results) > 1:
        from rich.table import Table

        table = Table(title="builds", show_lines=False)
        for col in ("recipe", "kernel", "host", "status", "artifact", "time", "detail"):
            table.add_column(col)
        colour = {"built": "green", "cached": "green", "failed": "red", "rejected": "red", "error": "red"}
        for r in results:
            detail = r.message[-100:] if not r.ok else ""
            table.add_row(escape(r.recipe), escape(r.kernel), escape(r.host), f"[{colour[r.status]}]{r.status}[/]",
                          r.artifact_id, f"{r.duration_s:.1f}s" if r.duration_s else "", escape(detail))
        console.print(table)
    for r in results:
        if r.ok:
            if len(results) == 1:
                console.print(f"artifact {r.artifact_id} ({r.artifact_status or r.status}), module "
                              f"{escape(r.module_name)}, kernel {escape(r.kernel)}"
                              + (f", signed as {r.signed_id}" if r.signed_id else ""))
            continue
        if r.lines:
            console.print(f"[bold red]{escape(r.key)}[/] failed ({r.category or r.status}); the lines that matter:")
            for line in r.lines:
                console.print(f"  {escape(line)}")
        if r.hint and len(results) > 1:
            console.print(f"  hint: {escape(r.hint)}")


def _exit_for(results: list[BuildResult], console: Console | PlainConsole | None) -> None:
    from kpipe.errors import BuildFailed, ExitCode, KpipeError

    bad = [r for r in results if not r.ok]
    if not bad:
        return
    if len(results) == 1:
        r = bad[0]
        raise KpipeError(r.message or f"build {r.key} failed", hint=r.hint or None,
                         exit_code=ExitCode(r.exit_code or int(ExitCode.BUILD_FAILED)))
    codes = [r.exit_code for r in bad]
    code = ExitCode.BUILD_FAILED if ExitCode.BUILD_FAILED in codes or not codes else ExitCode(codes[0])
    raise BuildFailed(f"{len(bad)} of {len(results)} builds did not produce a usable module: "
                      + ", ".join(f"{r.key} ({r.category or r.status})" for r in bad),
                      hint="the table above has each failure; rerun `kpipe build` to retry (finished builds are "
                           "answered from the store)", exit_code=code)
