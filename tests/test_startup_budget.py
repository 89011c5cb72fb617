"""The start-up budget (issue 13): each command imports only what it uses.

`python3 -X importtime -m kpipe ...` lists every module a run imports; each command below has a list of
modules it must not load (SSH and Ansible libraries for commands that touch no host, Rich tables for JSON
output, Typer for --version, pyelftools where no ELF is read, Jinja2 where no recipe renders). No timing is
asserted here: bench/startup.py measures the CPU cost beside `python3 -c pass`.
"""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RELEASE = "5.10.0-amd64-UOS"  # parser test data

SSH = ("paramiko", "fabric", "invoke", "cryptography", "bcrypt", "nacl", "ansible*")
NO_ELF = ("elftools",)
NO_RECIPE = ("jinja2",)
# --json writes JSON with the json module; piped (as here: stdout is a pipe), tables and styled lines are
# plain text too: no Rich at all (on a terminal the same commands draw Rich tables: test_startup_output.py)
NO_RICH = ("rich",)
# the workspace's kernel catalog reads the forge's cache through kpipe.forged, never the lab (qemu, chroots)
NO_LAB = ("kpipe.lab",)
# `rollout status` reads the journal (kpipe.rollout.summary): nothing that plans or drives a rollout
NO_ENGINE = ("kpipe.rollout.engine", "kpipe.rollout.planner", "kpipe.rollout.gate", "kpipe.rollout.world",
             "kpipe.transport", "kpipe.fleet")
# kpipe.cli modules that define commands: --help and completion list them from a static table instead
COMMAND_MODULES = tuple(f"kpipe.cli.{m}" for m in ("init", "kernels", "symbols", "recipe", "build", "artifacts",
                                                    "validate", "sign", "keys", "fleet", "rollout", "audit", "persist",
                                                    "lab"))

# The listings scripts run most are parsed by kpipe.cli.fast, without Typer (or click) and without the Typer
# command modules; the settings dataclasses generate no code (no kpipe.kernel either without [[kernels]]).
NO_TYPER = ("typer", "click", "kpipe.cli.artifacts", "kpipe.cli.rollout", "kpipe.cli.kernels", "kpipe.cli.complete",
            "kpipe.cli.params")
NO_KERNEL = ("kpipe.kernel",)

BUDGET: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("--version",), ("typer", "click", "rich", "sqlite3", "kpipe.errors", "kpipe.cli.context", *SSH)),
    (("-W", ".", "--debug", "--version"), ("typer", "rich", *SSH)),
    (("kernels", "parse", RELEASE), (*SSH, *NO_ELF, *NO_RECIPE, *NO_RICH, *NO_TYPER, "sqlite3", "yaml",
                                     "kpipe.workspace")),
    (("kernels", "parse", RELEASE, "--json"), (*SSH, *NO_ELF, *NO_RECIPE, *NO_RICH, *NO_TYPER, "sqlite3", "yaml",
                                               "kpipe.workspace")),
    (("artifacts", "list"), (*SSH, *NO_ELF, *NO_RECIPE, *NO_RICH, *NO_LAB, *NO_TYPER, *NO_KERNEL, "yaml")),
    (("artifacts", "list", "--json"), (*SSH, *NO_ELF, *NO_RECIPE, *NO_RICH, *NO_LAB, *NO_TYPER, *NO_KERNEL, "yaml")),
    (("-W", ".", "artifacts", "list", "--kernel", RELEASE), (*SSH, *NO_RICH, *NO_TYPER, *NO_KERNEL)),
    (("rollout", "status", "last"), (*SSH, *NO_ELF, *NO_RECIPE, *NO_RICH, *NO_LAB, *NO_ENGINE, *NO_TYPER,
                                     *NO_KERNEL, "yaml")),
    (("rollout", "status", "last", "--json"), (*SSH, *NO_ELF, *NO_RECIPE, *NO_RICH, *NO_LAB, *NO_ENGINE, *NO_TYPER,
                                               *NO_KERNEL, "yaml")),
    (("rollout", "status"), (*SSH, *NO_RICH, *NO_ENGINE, *NO_TYPER, *NO_KERNEL)),
    (("--help",), (*SSH, *NO_ELF, *NO_RECIPE, "sqlite3", *COMMAND_MODULES)),
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with one artifact and one finished rollout of two hosts (one excluded), so that
    `artifacts list` and `rollout status last` print real tables, not their empty-store lines."""
    root = tmp_path_factory.mktemp("budget")
    (root / "kpipe.toml").write_text('[workspace]\nstore = ".kpipe"\n')
    subprocess.run([sys.executable, "-c", SEED], cwd=root, env=_env(), check=True, timeout=120)
    return root


SEED = f"""\
from pathlib import Path
from kpipe.artifacts import add_artifact
from kpipe.store import open_store
from kpipe.rollout.journal import Journal
store = open_store('.kpipe')
Path('demo.ko').write_bytes(b'\\x7fELF demo')
add_artifact(store, Path('demo.ko'), kernel='{RELEASE}', module_name='livepatch-demo', recipe='demo')
j = Journal(store)
plan = {{'target': 'all', 'target_kind': 'artifact', 'waves': [['web1']], 'assignments': {{}},
        'excluded': [{{'host': 'db1', 'reason': 'kernel not in the catalog', 'code': 'no-artifact'}}], 'options': {{}}}}
j.set_state(j.create(plan, {{}}, target='all'), 'completed')
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KPIPE_", "_KPIPE_"))}
    return {**env, "PYTHONPATH": str(REPO), "COLUMNS": "200", **extra}


# The console script's way in (its program name is `kpipe`, which shell completion keys on).
AS_SCRIPT = "import sys; sys.argv[0] = 'kpipe'; from kpipe.cli.app import main; main()"


def imported(args: tuple[str, ...], cwd: Path, script: bool = False,
             **env: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `python3 -X importtime -m kpipe ARGS`; the result and the names of every module it imported."""
    entry = ["-c", AS_SCRIPT] if script else ["-m", "kpipe"]
    r = subprocess.run([sys.executable, "-X", "importtime", *entry, *args], cwd=cwd, env=_env(**env),
                       capture_output=True, text=True, timeout=120)
    names = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    names.discard("package")  # the header line
    return r, names


def _matches(name: str, pattern: str) -> bool:
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return name == pattern or name.startswith(pattern + ".")


@pytest.mark.parametrize("args, forbidden", BUDGET, ids=[" ".join(a) for a, _ in BUDGET])
def test_command_imports_nothing_it_does_not_use(ws: Path, args: tuple[str, ...], forbidden: tuple[str, ...]):
    r, names = imported(args, ws)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert names and "kpipe.cli.app" in names  # importtime really listed the run
    loaded = sorted(n for n in names if any(_matches(n, f) for f in forbidden))
    roots = sorted({n for n in loaded if not any(n.startswith(o + ".") for o in loaded)})  # packages, not parts
    assert not loaded, f"`kpipe {' '.join(args)}` imported {roots}"


def test_piped_tables_are_plain_rows(ws: Path):
    """The table forms really print their rows (so the budget above covers the table code), as plain text."""
    r, _ = imported(("artifacts", "list"), ws)
    lines = r.stdout.splitlines()
    assert lines[0].split("\t") == ["id", "module", "kernel", "recipe", "status", "signed", "host", "built"]
    assert lines[1].split("\t")[1:5] == ["livepatch-demo", RELEASE, "demo", "built"], r.stdout
    r, _ = imported(("rollout", "status", "last"), ws)
    head, *table = r.stdout.splitlines()
    assert head.startswith("rollout r") and head.endswith(": completed (target all)"), r.stdout
    assert table == ["host\tstate\treason", "web1\tpending\t", "db1\texcluded\tkernel not in the catalog"]
    r, _ = imported(("kernels", "parse", RELEASE), ws)
    assert r.stdout.splitlines()[:3] == [f"release: {RELEASE}", "version: 5.10.0", "distro: uos"], r.stdout


def test_version_answers_before_typer_and_is_the_package_version(ws: Path):
    import kpipe

    r, names = imported(("--version",), ws)
    assert r.stdout == f"kpipe {kpipe.__version__}\n" and r.returncode == 0
    assert "typer" not in names


def test_version_after_a_command_is_still_the_command_s_usage_error(ws: Path):
    r, _ = imported(("kernels", "--version"), ws)
    assert r.returncode == 2 and "No such option" in r.stderr and "Traceback" not in r.stderr


def test_completion_of_command_names_imports_no_command_module(ws: Path):
    r, names = imported((), ws, script=True, _KPIPE_COMPLETE="complete_bash", COMP_WORDS="kpipe ro", COMP_CWORD="1")
    assert r.returncode == 0 and r.stdout.split() == ["rollout"], r.stdout + r.stderr[-2000:]
    assert not names & set(COMMAND_MODULES), sorted(names & set(COMMAND_MODULES))


def test_completion_inside_a_group_loads_that_group(ws: Path):
    r, names = imported((), ws, script=True, _KPIPE_COMPLETE="complete_bash", COMP_WORDS="kpipe kernels p",
                        COMP_CWORD="2")
    assert r.returncode == 0 and r.stdout.split() == ["parse"], r.stdout + r.stderr[-2000:]
    assert "kpipe.cli.kernels" in names and "kpipe.cli.rollout" not in names


def test_the_static_command_table_is_what_the_modules_register():
    """COMMANDS (names, modules, short help) equals what each module's register() really adds."""
    from typer.main import get_group

    from kpipe.cli.app import COMMANDS, load_commands

    real: dict[str, tuple[str, str]] = {}
    for module in sorted({e.module for e in COMMANDS.values()}):
        for name, cmd in load_commands(module).items():
            first = inspect.cleandoc(cmd.help or "").split("\n\n")[0].replace("\n", " ")
            real[name] = (module, first)
    assert {n: (e.module, e.help) for n, e in COMMANDS.items()} == real
    # every command module of kpipe/cli is in the table (a new group cannot be forgotten)
    registering = {p.stem for p in (REPO / "kpipe" / "cli").glob("*.py")
                   if hasattr(importlib.import_module(f"kpipe.cli.{p.stem}"), "register")}
    assert registering == {e.module for e in COMMANDS.values()}
    # and the listing order is the one Typer would give the eagerly built app
    import typer

    eager = typer.Typer()
    for module in ("init", "kernels", "recipe", "build", "artifacts", "validate", "sign", "keys", "fleet",
                   "rollout", "audit", "persist", "lab"):
        importlib.import_module(f"kpipe.cli.{module}").register(eager)
    assert list(get_group(eager).commands) == list(COMMANDS)


def test_help_lists_every_command_from_the_table(ws: Path):
    r = subprocess.run([sys.executable, "-m", "kpipe", "--help"], cwd=ws, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0
    from kpipe.cli.app import COMMANDS

    listed = [line.split()[1] for line in r.stdout.splitlines()
              if line.startswith("│ ") and len(line.split()) > 1 and line.split()[1] in COMMANDS]
    assert listed == list(COMMANDS)


def test_no_arguments_shows_help_and_exit_2(ws: Path):
    r = subprocess.run([sys.executable, "-m", "kpipe"], cwd=ws, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Usage:" in r.stdout + r.stderr and "rollout" in r.stdout + r.stderr


def test_a_listed_command_used_directly_runs_the_real_one(ws: Path):
    """A tool that takes a command from the listing (not through resolve_command) still gets the real one."""
    code = ("import typer.main\n"
            "from kpipe.cli.app import app\n"
            "root = typer.main.get_command(app)\n"
            "ctx = root.make_context('kpipe', ['kernels'])\n"
            f"args = ['parse', '{RELEASE}', '--json']\n"
            "sub = root.get_command(ctx, 'kernels').make_context('kernels', args, parent=ctx)\n"
            "sub.command.invoke(sub)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ws, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'"release": "{RELEASE}"' in r.stdout


CACHED_RELEASE = "6.1.0-999-amd64"  # catalog test data: a kernel that never has to exist (nothing is built)


@pytest.fixture(scope="module")
def cached_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace whose store already holds the build of cmdline-demo for a catalog kernel on an SSH build
    host (the host's builder version recorded, the artifact stored under the inputs digest), so that
    `kpipe build` is answered from the store without contacting the host (which does not exist)."""
    root = tmp_path_factory.mktemp("cached")
    (root / "recipes").mkdir()
    (root / "patches").mkdir()
    shutil.copytree(REPO / "recipes" / "templates", root / "recipes" / "templates")
    kept, skip = [], False  # the repository's recipe without its signing section (no signer here)
    for line in (REPO / "recipes" / "cmdline-demo.yaml").read_text().splitlines():
        skip = line.startswith("signing:") or (skip and (line.startswith(" ") or not line.strip()))
        if not skip:
            kept.append(line)
    (root / "recipes" / "cmdline-demo.yaml").write_text("\n".join(kept) + "\n")
    (root / "kpipe.toml").write_text(f'[workspace]\nstore = ".kpipe"\n\n[[build_hosts]]\nname = "far"\n'
                                     f'address = "192.0.2.1"\nkernels = ["*"]\n\n[[kernels]]\n'
                                     f'release = "{CACHED_RELEASE}"\nheaders = "/nonexistent/headers"\n')
    seed = ("from pathlib import Path\n"
            "from kpipe import recipes\n"
            "from kpipe.artifacts import add_artifact\n"
            "from kpipe.builder.records import ensure_schema, save_tool_version\n"
            "from kpipe.workspace import load_workspace\n"
            "ws = load_workspace(Path('.').resolve())\n"
            f"spec = recipes.render(ws, 'cmdline-demo', '{CACHED_RELEASE}')\n"
            "ensure_schema(ws.store)\n"
            "save_tool_version(ws.store, 'far', 'kbuild', 'make 4.3', '/tmp/kpipe-builds')\n"
            "Path('m.ko').write_bytes(b'\\x7fELF cached')\n"
            f"add_artifact(ws.store, Path('m.ko'), kernel='{CACHED_RELEASE}', module_name=spec.module_name,"
            " recipe='cmdline-demo', builder='kbuild', build_host='far',"
            " inputs_digest=spec.inputs_digest('make 4.3'))\n")
    subprocess.run([sys.executable, "-c", seed], cwd=root, env=_env(), check=True, timeout=120)
    return root


def test_a_cache_hit_build_contacts_no_host_and_loads_no_ssh_or_rich(cached_build: Path):
    """The cache key needs the rendered recipe (Jinja2 stays), not the build host: no SSH library, no ELF
    reader, and piped, no Rich."""
    r, names = imported(("build", "--recipe", "cmdline-demo", "--kernel", CACHED_RELEASE), cached_build)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert "cached answered from the store" in r.stdout, r.stdout
    forbidden = (*SSH, *NO_ELF, *NO_RICH, *NO_LAB, "kpipe.transport.ssh")
    loaded = sorted({n.split(".")[0] if not n.startswith("kpipe") else n for n in names
                     if any(_matches(n, f) for f in forbidden)})
    assert not loaded, f"a cache-hit `kpipe build` imported {loaded}"


# A forced kbuild build runs the builder's plan, whose cross-compiling arguments come from kpipe.lab.arch: that
# one module of the lab, not the VM machinery the kpipe.lab package re-exports (its qemu runner, initramfs,
# guest userland, ELF reader) nor the kernel fetcher (`kpipe build` overhead, issue 13).
LAB_MACHINERY = ("kpipe.lab.lab", "kpipe.lab.vm", "kpipe.lab.initramfs", "kpipe.lab.rootfs", "kpipe.lab.userland",
                 "kpipe.lab.kernel", "kpipe.lab.forge", "kpipe.lab.chroot", "kpipe.lab.buildhost")


def test_a_forced_kbuild_build_loads_only_the_lab_s_arch_table(cached_build: Path, tmp_path: Path):
    """The cached workspace's recipe built with --force on the `local` build host (its headers do not exist,
    so make fails at once: exit 7): the plan ran (kpipe.lab.arch is loaded) and nothing else of the lab;
    a plain `kpipe build` argv is parsed by kpipe.cli.fast (no Typer)."""
    ws = tmp_path / "ws"
    shutil.copytree(cached_build, ws, ignore=shutil.ignore_patterns(".kpipe"))
    toml = (ws / "kpipe.toml").read_text()
    (ws / "kpipe.toml").write_text(toml.replace('name = "far"\naddress = "192.0.2.1"',
                                                f'name = "local"\nworkdir = "{tmp_path / "work"}"'))
    r, names = imported(("build", "--recipe", "cmdline-demo", "--kernel", CACHED_RELEASE, "--force", "--json"), ws)
    assert r.returncode == 7 and '"host": "local"' in r.stdout, r.stdout + r.stderr[-2000:]
    assert "kpipe.builder.kbuild" in names and "kpipe.lab.arch" in names  # the plan was made
    loaded = sorted(n for n in names if any(_matches(n, f) for f in (*LAB_MACHINERY, *NO_TYPER)))
    assert not loaded, f"a forced kbuild build imported {loaded}"


# A cache hit answered through the render memo (kpipe.builder.memo): the recipe is not rendered (no YAML,
# no Jinja2, not kpipe.recipes) and nothing that runs a build loads (tarfile, thread pools, the builders'
# plans, the transports, the command runner).
MEMO_HIT = (*SSH, *NO_ELF, *NO_RICH, *NO_LAB, *NO_RECIPE, "yaml", "kpipe.recipes", "kpipe.yamlnodes", "tarfile",
            "concurrent.futures", "kpipe.builder.base", "kpipe.builder.classify", "kpipe.commands", "kpipe.transport",
            "kpipe.validation")


def test_a_repeated_cache_hit_build_renders_nothing_and_runs_no_build_code(cached_build: Path):
    """The first `kpipe build` renders the recipe and remembers its inputs; the same command again is
    answered from the store without rendering: same artifact, same output, the lean import list above."""
    args = ("build", "--recipe", "cmdline-demo", "--kernel", CACHED_RELEASE, "--json")
    first, _ = imported(args, cached_build)
    assert first.returncode == 0, first.stdout + first.stderr[-2000:]
    again, names = imported(args, cached_build)
    assert again.returncode == 0, again.stdout + again.stderr[-2000:]
    assert again.stdout == first.stdout and '"status": "cached"' in again.stdout, again.stdout
    loaded = sorted({n.split(".")[0] if not n.startswith("kpipe") else n for n in names
                     if any(_matches(n, f) for f in MEMO_HIT)})
    assert not loaded, f"a repeated cache-hit `kpipe build` imported {loaded}"


def test_a_group_command_converts_only_the_subcommand_that_runs():
    """`kpipe rollout status` turns one function into click parameters, not every rollout command's; the
    group's help and completion (no exact subcommand) still get every command."""
    from kpipe.cli.app import load_commands

    every = set(load_commands("rollout")["rollout"].commands)
    assert {"status", "start", "plan", "list"} <= every
    assert set(load_commands("rollout", ("rollout", "status"))["rollout"].commands) == {"status"}
    assert set(load_commands("kernels", ("kernels", "symbols"))["kernels"].commands) == {"symbols"}
    assert set(load_commands("rollout", ("rollout", "stat"))["rollout"].commands) == every  # a prefix: all
    assert set(load_commands("rollout")["rollout"].commands) == every  # the module's app is left whole


def test_an_unknown_subcommand_is_still_a_usage_error_with_the_group_s_commands(ws: Path):
    r, _ = imported(("rollout", "stauts", "last"), ws)
    assert r.returncode == 2 and "No such command" in r.stderr and "status" in r.stderr, r.stderr[-2000:]


# -- kpipe.cli.fast: the listings parsed without Typer are the Typer commands' exact equivalents -----------


def _click_command(path: tuple[str, ...]) -> object:
    from kpipe.cli.app import COMMANDS, load_commands

    command = load_commands(COMMANDS[path[0]].module)[path[0]]
    return command.commands[path[1]] if len(path) == 2 else command


def test_every_fast_command_accepts_what_its_typer_command_accepts():
    """FAST's option names, flags and arguments are the click command's, and those are plain strings and
    flags (no callback, conversion or envvar that the fast parser would skip); any other option is one the
    fast parser leaves to Typer (typer_only)."""
    from kpipe.cli.fast import FAST

    for path, spec in FAST.items():
        cmd = _click_command(path)
        options, flags, arguments, typer_only, numbers = {}, {}, [], {}, {}
        for p in cmd.params:  # type: ignore[attr-defined]
            if p.param_type_name == "option" and set(p.opts) <= set(spec.typer_only):
                typer_only.update({o: p.name for o in p.opts})  # a list (multiple) too: Typer's alone
                continue
            assert p.callback is None and not p.envvar and not p.multiple and p.nargs == 1, (path, p.name)
            if p.type.name in ("int range", "float range"):
                # the fast parser's range is click's, closed at both ends, and its type the same
                assert not p.type.min_open and not p.type.max_open, (path, p.name)
                kind = int if p.type.name == "int range" else float
                numbers.update({o: (p.name, kind, p.type.min, p.type.max) for o in p.opts})
                continue
            assert p.type.name in ("text", "str") or getattr(p, "is_flag", False), (path, p.name, p.type)
            if p.param_type_name == "argument":
                arguments.append((p.name, None if p.required else p.default))
            elif p.is_flag:
                assert p.default is False and not p.secondary_opts, (path, p.name)
                flags.update({o: p.name for o in p.opts})
            else:
                options.update({o: p.name for o in p.opts})
        assert (spec.options, spec.flags, spec.arguments, spec.typer_only) == \
            (options, flags, tuple(arguments), typer_only), path
        assert {o: tuple(n) for o, n in spec.numbers.items()} == numbers, path


def test_the_root_options_the_fast_parser_reads_are_the_root_command_s():
    import typer.main

    from kpipe.cli.app import get_app

    root = typer.main.get_command(get_app())
    seen = {p.name: (sorted(p.opts), p.envvar, getattr(p, "is_flag", False)) for p in root.params}
    assert seen == {"workspace": (["--workspace", "-W"], "KPIPE_WORKSPACE", False),
                    "debug": (["--debug"], "KPIPE_DEBUG", True), "version": (["--version"], None, True),
                    # Typer's own; given, they are no plain listing and go to Typer
                    "install_completion": (["--install-completion"], None, True),
                    "show_completion": (["--show-completion"], None, True)}


FAST_ARGVS = [
    ["artifacts", "list"], ["artifacts", "list", "--json"], ["artifacts", "list", "-k", RELEASE, "--recipe", "demo"],
    ["artifacts", "list", "--kernel=" + RELEASE, "--status", "built", "--json", "-r", "x", "-r", "y"],
    ["rollout", "status"], ["rollout", "status", "r1"], ["rollout", "status", "--json", "last"],
    ["kernels", "parse", RELEASE], ["kernels", "parse", "--json", RELEASE],
    ["build", "--recipe", "demo", "--kernel", RELEASE, "--force"], ["build", "-k", RELEASE, "--json", "-v"],
    ["build", "--recipe=demo", "--all-kernels", "--host", "b1", "--verbose"], ["build", "--fleet", "web*", "-r", "x"],
    ["build"],
    ["fleet", "facts"], ["fleet", "facts", "--json", "--forks", "50", "--workers", "2"],
    ["fleet", "facts", "-l", "web*", "-f", "7", "--timeout", "2.5", "--strict"],
    ["fleet", "facts", "--forks=1000", "--timeout=1", "--workers=256", "--limit=db:&prod", "--json"],
    ["fleet", "facts", "--timeout", "0060.50", "-f", "1"],
]


@pytest.mark.parametrize("argv", FAST_ARGVS, ids=[" ".join(a) for a in FAST_ARGVS])
def test_the_fast_parser_reads_an_argv_as_click_does(argv: list[str], monkeypatch: pytest.MonkeyPatch):
    from kpipe.cli.fast import parse

    monkeypatch.delenv("KPIPE_WORKSPACE", raising=False)
    monkeypatch.delenv("KPIPE_DEBUG", raising=False)
    parsed = parse(["-W", "/some/ws", *argv])
    assert parsed is not None and parsed.workspace == "/some/ws" and parsed.debug is False
    words = len(parsed.command.path)
    cmd = _click_command(tuple(argv[:words]))
    ctx = cmd.make_context(argv[words - 1], list(argv[words:]))  # type: ignore[attr-defined]
    defaults = {p.name: p.default for p in cmd.params}  # type: ignore[attr-defined]
    # click gives a list option (`fleet facts -i`, one the fast parser leaves to Typer) as () when absent;
    # Typer calls the command with the parameter's default, None, as the body gets it here
    given = {k: defaults[k] if v == () and defaults[k] is None else v for k, v in ctx.params.items()}
    assert {**defaults, **parsed.kwargs} == given


@pytest.mark.parametrize("argv", [
    ["artifacts", "list", "--help"], ["artifacts", "list", "-h"], ["artifacts", "list", "--kernal", "x"],
    ["artifacts", "list", "--kernel"], ["artifacts", "list", "--kernel", "--json"], ["artifacts", "list", "extra"],
    ["artifacts", "list", "-kX"], ["artifacts", "list", "--", "x"], ["artifacts", "lis"], ["artifacts"],
    ["rollout", "status", "a", "b"], ["kernels", "parse"], ["--debug", "kernels", "parse", "--json=1", RELEASE],
    ["-Wx", "artifacts", "list"], ["--workspace=", "artifacts", "list"], ["artifacts", "list", "--debug"],
    ["build", "--help"], ["build", "--jobs", "2", "-k", RELEASE], ["build", "-j", "2"], ["build", "--jobs=2"],
    ["build", "x"], ["build", "--kernel"], ["build", "--force=1"], ["builds"],
    ["fleet", "facts", "--forks", "0"], ["fleet", "facts", "-f", "1001"], ["fleet", "facts", "-f", "x"],
    ["fleet", "facts", "--forks", "+5"], ["fleet", "facts", "--forks", "1_0"], ["fleet", "facts", "--forks", "-1"],
    ["fleet", "facts", "--forks", "2.0"], ["fleet", "facts", "-f"], ["fleet", "facts", "-f5"],
    ["fleet", "facts", "--timeout", "nan"], ["fleet", "facts", "--timeout", "inf"],
    ["fleet", "facts", "--timeout", "0.5"], ["fleet", "facts", "--timeout", "1."],
    ["fleet", "facts", "--timeout", ".5"], ["fleet", "facts", "--workers", "257"],
    ["fleet", "facts", "--forks", "\uff15"], ["fleet", "facts", "-i", "hosts.ini"], ["fleet", "facts", "--inventory=x"],
    ["fleet", "facts", "web1"], ["fleet", "facts", "--json=1"], ["fleet", "fact"], ["fleet", "list"],
])
def test_anything_else_is_left_to_typer(argv: list[str], monkeypatch: pytest.MonkeyPatch):
    from kpipe.cli.fast import parse

    monkeypatch.delenv("KPIPE_DEBUG", raising=False)
    assert parse(argv) is None


def test_the_root_options_come_from_the_environment_as_typer_reads_them(monkeypatch: pytest.MonkeyPatch):
    from kpipe.cli.fast import parse

    monkeypatch.setenv("KPIPE_WORKSPACE", "/from/env")
    monkeypatch.setenv("KPIPE_DEBUG", "yes")
    parsed = parse(["artifacts", "list"])
    assert parsed is not None and (parsed.workspace, parsed.debug) == ("/from/env", True)
    parsed = parse(["-W", "/given", "artifacts", "list"])
    assert parsed is not None and parsed.workspace == "/given"
    monkeypatch.setenv("KPIPE_WORKSPACE", "")
    monkeypatch.setenv("KPIPE_DEBUG", "0")
    parsed = parse(["artifacts", "list"])
    assert parsed is not None and (parsed.workspace, parsed.debug) == (None, False)
    monkeypatch.setenv("KPIPE_DEBUG", "maybe")  # Typer's usage error, not a guess
    assert parse(["artifacts", "list"]) is None


@pytest.mark.parametrize("argv", [("artifacts", "list", "--status", "built"), ("rollout", "status", "last", "--json"),
                                  ("rollout", "status", "nope"), ("kernels", "parse", "not a release"),
                                  ("build",), ("build", "--recipe", "nope", "--kernel", RELEASE),
                                  ("build", "--all-kernels", "--kernel", RELEASE, "--recipe", "x"),
                                  ("fleet", "facts", "--json"), ("fleet", "facts", "--limit", "web*", "-f", "3")])
def test_the_fast_way_and_typer_s_way_print_the_same(ws: Path, argv: tuple[str, ...]):
    """The same argv run by kpipe.cli.fast and by Typer (the fast parser switched off): same stdout, stderr
    and exit code."""
    fast, names = imported(argv, ws)
    assert "typer" not in names
    code = ("import sys; import kpipe.cli.fast as f; f.parse = lambda args: None; sys.argv[0] = 'kpipe'; "
            "from kpipe.cli.app import main; main()")
    slow = subprocess.run([sys.executable, "-c", code, *argv], cwd=ws, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert (fast.returncode, fast.stdout, fast.stderr.count("kpipe: error")) == \
        (slow.returncode, slow.stdout, slow.stderr.count("kpipe: error")), (fast.stderr, slow.stderr)
    errors = [line for line in fast.stderr.splitlines() if not line.startswith("import time:")]
    assert errors == slow.stderr.splitlines()


# -- the SSH libraries (kpipe.transport.sshlibs): paramiko and Fabric without invoke's test helpers ----------


def test_the_ssh_transport_loads_no_unittest_mock_asyncio_or_yaml(tmp_path: Path):
    """Every command that opens an SSH connection imports kpipe.transport.ssh: paramiko and Fabric load, but
    not unittest.mock and asyncio (invoke's MockContext), nor PyYAML or invoke's vendored copy of it
    until a YAML config file is read; Fabric and invoke still work, a project's invoke.yaml and
    MockContext included, and a later `import unittest.mock` is the real one."""
    (tmp_path / "invoke.yaml").write_text("run:\n  echo: true\nkpipe_probe: [1, 2]\n")
    code = ("import sys\n"
            "import kpipe.transport.ssh\n"
            "import fabric, invoke, paramiko\n"
            "heavy = ('unittest', 'unittest.mock', 'asyncio', 'invoke.vendor.yaml', 'yaml')\n"
            "bad = sorted(m for m in heavy if m in sys.modules)\n"
            "assert not bad, bad\n"
            "c = fabric.Connection('127.0.0.1', user='u', port=2222)\n"
            "assert (c.host, c.user, c.port) == ('127.0.0.1', 'u', 2222)\n"
            "assert 'yaml' not in sys.modules\n"
            f"cfg = invoke.Config(project_location={str(tmp_path)!r})\n"
            "cfg.load_project()\n"
            "assert cfg.run.echo is True and cfg.kpipe_probe == [1, 2], dict(cfg)\n"
            "assert 'yaml' in sys.modules and invoke.config.yaml.safe_load('a: [1]') == {'a': [1]}\n"
            "m = invoke.MockContext(run={'ls': invoke.Result('out')})\n"
            "assert m.run('ls').stdout == 'out'\n"
            "import unittest.mock\n"
            "assert isinstance(m.run, unittest.mock.Mock) and unittest.mock.__file__\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stdout + r.stderr[-2000:]


def test_a_command_closes_the_store_before_the_process_ends(ws: Path):
    """kpipe.cli.app skips the interpreter's final garbage collection (gc.freeze), so it closes the stores
    itself: the WAL is checkpointed and state.db-wal removed, as a clean close does (the Typer way too)."""
    for args in (("artifacts", "list"), ("rollout", "list", "--json"), ("rollout", "status", "last", "--json")):
        r, _ = imported(args, ws)
        assert r.returncode == 0, r.stderr[-2000:]
        assert not (ws / ".kpipe" / "state.db-wal").exists(), args
