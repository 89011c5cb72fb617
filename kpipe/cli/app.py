"""The kpipe command line: one Typer app, one module per command group.

Start-up is budgeted (tests/test_startup_budget.py, bench/startup.py): `kpipe --version` answers before
Typer loads, and the root group knows each command's module by name (COMMANDS) and imports only the one
that runs. `--help` and shell completion list names and short help from that table, so they import no
command module at all.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from kpipe import __version__

if TYPE_CHECKING:  # Typer loads only once a command (not --version) runs
    import typer
    from typer.core import TyperGroup


class CommandEntry(NamedTuple):
    """Where a root command lives and what `kpipe --help` says of it before its module is imported."""

    module: str  # kpipe.cli.<module> has register(app), which adds this command
    help: str  # the first paragraph of the command's own help (tests/test_startup_budget.py checks it)


# In the order `kpipe --help` lists them (Typer lists commands before groups).
COMMANDS: dict[str, CommandEntry] = {
    "init": CommandEntry("init", "Write a commented kpipe.toml (a local build host, the installed kernels, a lab "
                                 "signer, an empty fleet), recipes/ with one example and patches/."),
    "build": CommandEntry("build", "Build live patch modules on the workspace's build hosts (reattaches to running "
                                   "builds)."),
    "builds": CommandEntry("build", "List recorded builds (running ones can be reattached with the same "
                                    "`kpipe build`)."),
    "validate": CommandEntry("validate", "Validate a module or artifact for a kernel; exit 3 when it is invalid."),
    "sign": CommandEntry("sign", "Sign a module file (in place or to --output) or an artifact (stored as a new "
                                 "signed artifact)."),
    "verify": CommandEntry("audit", "Read every selected host's live patches over SSH and check them against the "
                                    "desired state (exit 1 if any host is not compliant)."),
    "audit": CommandEntry("audit", "Report desired vs observed live-patch state per host and patch, as a table, "
                                   "JSON, JUnit XML, Prometheus text or HTML."),
    "unpersist": CommandEntry("persist", "Remove what `rollout start --persist` installed for boot (kpipe's unit "
                                         "and file, or kpatch uninstall) on a rollout's hosts; the live patch stays "
                                         "loaded."),
    "preflight": CommandEntry("lab", "Boot the artifact's kernel in a VM (or reuse a lab VM with --vm), load, "
                                     "verify, probe, unload, verify removal."),
    "kernels": CommandEntry("kernels", "Kernel releases and the workspace's kernel catalog."),
    "recipe": CommandEntry("recipe", "Patch recipes (recipes/*.yaml)."),
    "artifacts": CommandEntry("artifacts", "Built and signed modules in the store."),
    "keys": CommandEntry("keys", "Module-signing keys (the kernel's X.509 format)."),
    "fleet": CommandEntry("fleet", "The fleet: hosts from kpipe's fleet file and Ansible inventories, and their "
                                   "facts."),
    "rollout": CommandEntry("rollout", "Staged, health-gated rollouts with a journal, resume and rollback."),
    "lab": CommandEntry("lab", "Disposable qemu VMs of a target kernel, reachable over SSH."),
}

HELP = "Build, validate, sign and roll out kernel live patches to Linux fleets."
# Root options that take a value: the --version fast path steps over them.
_VALUE_OPTIONS = ("--workspace", "-W")
_FLAG_OPTIONS = ("--debug",)
COMPLETE_VAR = "_KPIPE_COMPLETE"


class _Registers(Protocol):
    """A kpipe.cli command module: register(app) adds its commands to the root app."""

    def register(self, app: typer.Typer) -> None: ...


def command_module(module: str) -> _Registers:
    """kpipe.cli.<module>, imported by name in the source (so the import graph and importtime show it)."""
    match module:
        case "init":
            from kpipe.cli import init

            return init
        case "kernels":
            from kpipe.cli import kernels

            return kernels
        case "recipe":
            from kpipe.cli import recipe

            return recipe
        case "build":
            from kpipe.cli import build

            return build
        case "artifacts":
            from kpipe.cli import artifacts

            return artifacts
        case "validate":
            from kpipe.cli import validate

            return validate
        case "sign":
            from kpipe.cli import sign

            return sign
        case "keys":
            from kpipe.cli import keys

            return keys
        case "fleet":
            from kpipe.cli import fleet

            return fleet
        case "rollout":
            from kpipe.cli import rollout

            return rollout
        case "audit":
            from kpipe.cli import audit

            return audit
        case "lab":
            from kpipe.cli import lab

            return lab
        case "persist":
            from kpipe.cli import persist

            return persist
        case _:
            raise KeyError(f"no kpipe.cli command module {module!r}")


def load_commands(module: str, only: tuple[str, str] | None = None) -> dict[str, Any]:
    """The click commands kpipe.cli.<module> registers, by name (imports that module and Typer).

    only=(group, sub): the group is converted with that one subcommand (or sub-group) alone, when it has
    one of that exact name: `kpipe rollout status` turns one function signature into click parameters, not
    every rollout command's. Anything else (a group's --help, a prefix being completed) gets the whole group."""
    import typer
    import typer.main

    scratch = typer.Typer()
    command_module(module).register(scratch)
    if only is not None:
        scratch.registered_groups = [_trimmed(info, only[1]) if _name_of(info) == only[0] else info
                                     for info in scratch.registered_groups]
    return dict(typer.main.get_group(scratch).commands)


def _name_of(info: Any) -> str:
    """A registered command's or sub-app's command name, as Typer derives it."""
    name = getattr(info, "name", None)
    if isinstance(name, str) and name:
        return name
    callback = getattr(info, "callback", None)
    return str(getattr(callback, "__name__", "")).lower().replace("_", "-")


def _trimmed(group: Any, sub: str) -> Any:
    """A copy of a registered sub-app that holds only its command or sub-group named `sub` (the original,
    and so full_command and --help, keep them all); the group itself when it has no such member."""
    import copy

    app = group.typer_instance
    commands = [c for c in app.registered_commands if _name_of(c) == sub]
    groups = [g for g in app.registered_groups if _name_of(g) == sub]
    if not commands and not groups:
        return group
    lean = copy.copy(app)
    lean.registered_commands, lean.registered_groups = commands, groups
    info = copy.copy(group)
    info.typer_instance = lean
    return info


def _lazy_group_class() -> type[TyperGroup]:
    from typer.core import TyperCommand, TyperGroup

    class _Placeholder(TyperCommand):
        """A root command whose module is not imported yet: its name and short help, for --help and completion."""

        module = ""

        def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
            # Reached only by a caller that skipped resolve_command (a docs generator, say): run the real one.
            real = load_commands(self.module)[self.name or ""]
            return real.make_context(info_name, args, parent=parent, **extra)

    class LazyGroup(TyperGroup):
        """The root group: each command's module is imported when that command is resolved, not before."""

        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            for name, entry in COMMANDS.items():
                if name not in self.commands:
                    stub = _Placeholder(name=name, help=entry.help)
                    stub.module = entry.module
                    self.commands[name] = stub

        def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
            cmd = self.commands.get(args[0]) if args else None
            if isinstance(cmd, _Placeholder):
                # `kpipe GROUP SUB ...`: convert SUB alone (help and completion of the group take all of it)
                sub = args[1] if len(args) > 1 and not args[1].startswith("-") else None
                self.commands.update(load_commands(cmd.module, (args[0], sub) if sub else None))
            return super().resolve_command(ctx, args)

    return LazyGroup


def build_app() -> typer.Typer:
    """The root Typer app: global options, and every command as a lazily imported entry of COMMANDS."""
    import typer

    from kpipe.cli.context import STATE

    app = typer.Typer(
        name="kpipe",
        cls=_lazy_group_class(),
        help=HELP,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    def _version(value: bool) -> None:
        if value:
            typer.echo(f"kpipe {__version__}")
            raise typer.Exit()

    @app.callback()
    def _root(
        workspace: str | None = typer.Option(
            None, "--workspace", "-W", envvar="KPIPE_WORKSPACE", help="Workspace folder (holds kpipe.toml)."
        ),
        debug: bool = typer.Option(False, "--debug", envvar="KPIPE_DEBUG", help="Show tracebacks."),
        version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                     help="Print the version."),
    ) -> None:
        STATE.workspace_arg = workspace
        STATE.debug = debug

    return app


_app: typer.Typer | None = None


def get_app() -> typer.Typer:
    """The process's root app, built on first use."""
    global _app
    if _app is None:
        _app = build_app()
    return _app


def full_command() -> Any:
    """The root click group with every command loaded (for documentation generators and tests that walk
    every command; `kpipe` itself loads only the command it runs)."""
    import typer.main

    root = typer.main.get_command(get_app())
    commands = getattr(root, "commands", {})
    for module in dict.fromkeys(entry.module for entry in COMMANDS.values()):
        commands.update(load_commands(module))
    return root


def __getattr__(name: str) -> Any:
    # `from kpipe.cli.app import app` keeps working; Typer loads on that first use, not on import.
    if name == "app":
        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _asks_version(args: list[str]) -> bool:
    """Whether the root options (before any command) include --version: answered without Typer."""
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--version":
            return True
        if a in _VALUE_OPTIONS:
            i += 2
            continue
        if a in _FLAG_OPTIONS or a.startswith("--workspace=") or (a.startswith("-W") and len(a) > 2):
            i += 1
            continue
        return False
    return False


def main() -> None:
    """Console-script entry point: run the app, map KpipeError to one line and its exit code."""
    try:
        _main()
    finally:
        store = sys.modules.get("kpipe.store")
        if store is not None:  # closed now, not by the collection skipped below (state.db-wal goes away)
            store.close_all()
        # The command is done (its output written, its store commits made; atexit handlers still run).
        # What is left is the interpreter's shutdown, whose full garbage collection walks every object
        # the imports made (paramiko, cryptography, Jinja2, pyelftools, Typer...): ~0.1 s of CPU on a
        # quiet machine and 0.2-0.3 s on a busy one after `kpipe build` or `fleet facts`, for nothing,
        # as the process's memory goes back to the system at exit anyway. Moving every object to the
        # permanent generation skips that walk; objects are still freed by reference counting.
        gc.freeze()


def _main() -> None:
    completing = COMPLETE_VAR in os.environ
    if not completing and _asks_version(sys.argv[1:]):
        sys.stdout.write(f"kpipe {__version__}\n")
        sys.stdout.flush()
        sys.exit(0)
    if not completing:
        from kpipe.cli import fast

        parsed = fast.parse(sys.argv[1:])
        if parsed is not None:  # a plain listing (artifacts list, rollout status...): no Typer to load
            _run(lambda: _fast_call(fast.run, parsed))

    import typer

    _click_completion_order()
    _run(lambda: get_app()(standalone_mode=False), typer.Exit, typer.Abort)


def _fast_call(run: Any, parsed: Any) -> int | None:
    """kpipe.cli.fast.run(parsed) with the outcomes Typer's main loop gives a command: Ctrl-C is a return of
    130, end of input an abort, a closed stdout (`| head`) a quiet exit 1."""
    import errno

    try:
        run(parsed)
    except KeyboardInterrupt:
        return 130
    except EOFError:
        sys.stderr.write("\n")
        raise _Aborted() from None
    except OSError as e:
        if e.errno != errno.EPIPE:
            raise
        sys.stdout, sys.stderr = _Pacified(sys.stdout), _Pacified(sys.stderr)
        sys.exit(1)
    return None


class _Aborted(Exception):
    """End of input in a command run by kpipe.cli.fast (what Typer turns into its Abort)."""


class _Pacified:
    """A stream whose flush ignores a closed pipe (click's PacifyFlushWrapper), so that the interpreter's
    last flush at exit does not print a BrokenPipeError after the reader went away."""

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    def flush(self) -> None:
        import errno

        try:
            self.wrapped.flush()
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


def _run(call: Any, exit_type: type[BaseException] | None = None,
         abort_type: type[BaseException] | None = None) -> None:
    """Run the command (Typer's app, or kpipe.cli.fast's body) and exit: KpipeError as one line and its exit
    code, Ctrl-C and aborts as 130, usage errors as click's, anything else as an internal error."""
    from kpipe.cli.context import STATE  # after the --version answer: it loads dataclasses and json
    from kpipe.errors import ExitCode, KpipeError

    debug = os.environ.get("KPIPE_DEBUG", "") not in ("", "0")
    try:
        rc = call()
    except KpipeError as e:
        if debug or STATE.debug:
            import traceback

            traceback.print_exc()
        _print_error(str(e), e.hint)
        sys.exit(int(e.exit_code))
    except KeyboardInterrupt:
        _print_error("interrupted", None)
        sys.exit(int(ExitCode.INTERRUPTED))
    except Exception as e:  # Typer's exit and abort, click usage errors and the unexpected
        if exit_type is not None and isinstance(e, exit_type):
            sys.exit(getattr(e, "exit_code", 0))
        if isinstance(e, _Aborted) or (abort_type is not None and isinstance(e, abort_type)):
            _print_error("aborted", None)
            sys.exit(int(ExitCode.INTERRUPTED))
        click_error = _click_exception_types()
        if isinstance(e, click_error):
            _print_click_error(e)
            sys.exit(e.exit_code)
        if debug or STATE.debug:
            raise
        _print_error(f"internal error: {type(e).__name__}: {e}", "rerun with KPIPE_DEBUG=1 for a traceback")
        sys.exit(int(ExitCode.FAILURE))
    if rc == ExitCode.INTERRUPTED:  # Typer turns Ctrl-C into a silent return of 130
        _print_error("interrupted", None)
    sys.exit(_exit_code(rc))


class _ClickError(Protocol):
    """What main() uses of a click usage error (click's own class or Typer's vendored copy)."""

    exit_code: int

    def format_message(self) -> str: ...


def _click_exception_types() -> tuple[type[_ClickError], ...]:
    """ClickException classes of the click modules loaded: click's own, and the copy newer Typer releases
    vendor (a click error exists only once its module is loaded, so none is imported here)."""
    # Both are genuine version differences, not missing kpipe code: Typer < 0.26 depends on click and has
    # no vendored copy; Typer >= 0.26 vendors click and no longer installs it.
    types: list[type[_ClickError]] = []
    for name in ("click.exceptions", "typer._click.exceptions"):
        module = sys.modules.get(name)
        if module is not None:
            types.append(module.ClickException)
    return tuple(types)


def _click_completion_order() -> None:
    """Accept click's `_KPIPE_COMPLETE=bash_complete` (SHELL_INSTRUCTION) too: Typer reads INSTRUCTION_SHELL."""
    shell, _, instruction = os.environ.get("_KPIPE_COMPLETE", "").partition("_")
    if shell in ("bash", "zsh", "fish", "powershell", "pwsh") and instruction in ("complete", "source"):
        os.environ["_KPIPE_COMPLETE"] = f"{instruction}_{shell}"


def _print_click_error(e: _ClickError) -> None:
    """click's usage errors in kpipe's one-line format, with the command's --help as the hint."""
    message = e.format_message()
    if not message.strip():  # `kpipe GROUP` without a command: its help was printed, nothing is wrong to say
        return
    ctx = getattr(e, "ctx", None)
    hint = f"see `{ctx.command_path} --help`" if ctx is not None else "see `kpipe --help`"
    _print_error(message, hint)


def _exit_code(rc: object) -> int:
    return rc if isinstance(rc, int) else 0


def _print_error(message: str, hint: str | None) -> None:
    sys.stderr.write(f"kpipe: error: {message}\n")
    if hint:
        sys.stderr.write(f"  hint: {hint}\n")
    sys.stderr.flush()
