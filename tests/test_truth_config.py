"""kpipe.toml is read typed, with file:line errors (issue 8, item 5); inventory scripts are bounded (item 13).

Real `kpipe` subprocess runs: a bad value ends in exit 4 and one line naming file:line and the
field (plus a hint), never an internal error, and a quoted "false" never turns host key checking off.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KPIPE_DEBUG", "KPIPE_WORKSPACE")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def kpipe(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run kpipe in its own process group; on a hang, kill the group (and what it started) and fail."""
    proc = subprocess.Popen(["kpipe", *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"kpipe {' '.join(args)} did not finish within {timeout} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_error(r: subprocess.CompletedProcess) -> str:
    """The error line of a failed run, after checking it is one line (plus its hint) and no traceback."""
    lines = r.stderr.splitlines()
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    assert lines and lines[0].startswith("kpipe: error: "), r.stderr
    assert len(lines) <= 2 and all(ln.startswith("  hint: ") for ln in lines[1:]), r.stderr
    return lines[0][len("kpipe: error: "):]


# -- a quoted "false" never trusts a new host key --------------------------------------------------


def test_quoted_false_does_not_accept_new_host_keys(tmp_path, sshd):
    known = tmp_path / "known_hosts"
    known.write_text("")  # the server's key is unknown: strict checking must refuse it
    (tmp_path / "kpipe.toml").write_text(
        "[ssh]\n"
        f'known_hosts = "{known}"\n'
        f'identity_file = "{sshd.client_key}"\n'
        'ssh_config = "/nonexistent"\n'
        'accept_new_host_keys = "false"\n')
    (tmp_path / "fleet.yml").write_text(f"hosts:\n  h1: {{address: 127.0.0.1, port: {sshd.port}, user: root}}\n")
    r = kpipe(tmp_path, "fleet", "facts")
    assert r.returncode == 4, (r.returncode, r.stdout, r.stderr)
    line = one_error(r)
    assert line.startswith(f"{tmp_path / 'kpipe.toml'}:5: ssh.accept_new_host_keys must be true or false")
    assert "accept_new_host_keys = false" in r.stderr  # the hint says how to write it
    assert known.read_text() == ""  # no key was trusted


def test_unquoted_false_is_strict_and_true_accepts(tmp_path, sshd):
    known = tmp_path / "known_hosts"
    known.write_text("")
    (tmp_path / "fleet.yml").write_text(f"hosts:\n  h1: {{address: 127.0.0.1, port: {sshd.port}, user: root}}\n")
    base = (f'[ssh]\nknown_hosts = "{known}"\nidentity_file = "{sshd.client_key}"\nssh_config = "/nonexistent"\n')
    (tmp_path / "kpipe.toml").write_text(base + "accept_new_host_keys = false\n")
    r = kpipe(tmp_path, "fleet", "facts", "--json")
    assert r.returncode == 6 and known.read_text() == "", r.stderr  # refused: not in known_hosts
    (tmp_path / "kpipe.toml").write_text(base + "accept_new_host_keys = true\n")
    r = kpipe(tmp_path, "fleet", "facts", "--json")
    assert r.returncode == 0, r.stderr
    assert f"[127.0.0.1]:{sshd.port} ssh-ed25519 " in known.read_text()


# -- every bad value: exit 4, file:line, the field ---------------------------------------------------

BAD = [
    # (kpipe.toml text, line, what the error line must contain)
    ('[ssh]\nconnect_timeout = "abc"\n', 2, "ssh.connect_timeout must be a number, got a string 'abc'"),
    ("[ssh]\nconnect_timeout = nan\n", 2, "ssh.connect_timeout must be above 0"),
    ("[ssh]\ncommand_timeout = -1\n", 2, "ssh.command_timeout must be at least 0"),
    ('[ssh]\nforks = "many"\n', 2, "ssh.forks must be an integer, got a string 'many'"),
    ("[ssh]\nforks = 0\n", 2, "ssh.forks must be from 1 to 10000"),
    ("[ssh]\nknown_hosts = [1,2]\n", 2, "ssh.known_hosts must be a string, got an array [1, 2]"),
    ('[ssh]\nkex = "curve25519-sha256"\n', 2, "ssh.kex must be an array of strings"),
    ('[ssh]\nkex = [\n  "curve25519-sha256@libssh.org",\n  "curve25519-sha265@libssh.org",\n]\n', 4,
     "ssh.kex[1] 'curve25519-sha265@libssh.org' is not a key exchange paramiko knows"),
    ("[ssh]\nconect_timeout = 3\n", 2, "unknown key 'conect_timeout' in [ssh]"),
    ('[[build_hosts]]\nname = "a"\n\n[[build_hosts]]\nname = "b"\nport = -1\n', 6,
     "build_hosts[1].port must be from 1 to 65535, got -1"),
    ('[[build_hosts]]\nname = "a"\ntools = { "kpatch-build" = 3 }\n', 3,
     "build_hosts[0].tools.kpatch-build must be a string"),
    ('[[build_hosts]]\nname = "a"\n[[build_hosts]]\nname = "a"\n', 4, "build host name 'a' repeats (first at line 2)"),
    ('[signing.signers.x]\nkey = "k"\nkeyid = "false"\n', 3, "signing.signers.x.keyid must be true or false"),
    ('[signing.signers.x]\ntype = "comand"\n', 2, "signing.signers.x.type 'comand' is not one of builtin, command"),
    ('[signing.signers.x]\nhash = "sha265"\n', 2, "signing.signers.x.hash 'sha265'"),
    ('[signing]\ndefault = "lba"\n\n[signing.signers.lab]\nkey = "k"\n', 2, "signing.default names signer 'lba'"),
    ("[flet]\ninventories = []\n", 1, "unknown table 'flet' in kpipe.toml"),
    ('[signing.signer.x]\nkey = "k"\n', 1, "unknown key 'signer' in [signing]"),
    ('[[kernels]]\nrelease = "5.10.0-amd64-UOS"\ndistro = "debain"\n', 3, "kernels[0].distro 'debain'"),
    ('[[kernels]]\nrelease = "5.10.0-amd64-UOS"\nbuilder = "kbiuld"\n', 3, "kernels[0].builder 'kbiuld'"),
    ('[[kernels]]\nrelease = "5.10.0-amd64-UOS"\nsig_hash = "sha-256"\n', 3, "kernels[0].sig_hash 'sha-256'"),
    ('[[kernels]]\nrelease = "5.10.0-amd64-UOS"\n\n[[kernels]]\nrelease = "5.10.0-amd64-UOS"\n', 5,
     "kernel '5.10.0-amd64-UOS' repeats (first at line 2)"),
    ('[fleet]\ninventories = ["a.yml", 3]\n', 2, "fleet.inventories[1] must be a string, got an integer 3"),
    ('[fleet]\ninventory_timeout = "60s"\n', 2, "fleet.inventory_timeout must be a number"),
    ("[fleet]\ninventory_timeout = 0\n", 2, "fleet.inventory_timeout must be above 0"),
    ('[lab]\nvms = "2"\n', 2, "lab.vms must be an integer, got a string '2'"),
    ("[lab]\nmemory = 16\n", 2, "lab.memory must be from 96"),
    ('[lab.kernels."6.1.0-9-amd64"]\nimg = "vmlinuz"\n', 2, "unknown key 'img' in [lab.kernels.\"6.1.0-9-amd64\"]"),
    ('[lab]\nvms = 2\n\n[lab.kernels."my kernel"]\nimage = "vmlinuz"\n', 4, 'lab.kernels."my kernel"'),
    ('[validation]\nstrict = "yes"\n', 2, "validation.strict must be true or false"),
    ('[validation]\nstrickt = true\n', 2, "unknown key 'strickt' in [validation]"),
    ('[audit]\nallowed_taint = "OEZ"\n', 2, "audit.allowed_taint has unknown taint letter(s) 'Z'"),
    ("[audit]\ndesired = 1\n", 2, "audit.desired must be a string"),
    ("[ansible]\npython_interpreter = 3\n", 2, "ansible.python_interpreter must be a string"),
    ('[workspace]\nstore = ""\n', 2, "workspace.store must not be empty"),
    ("forks = 3\n", 1, "unknown key 'forks' in kpipe.toml"),
    ('build_hosts = { name = "a" }\n', 1, "build_hosts must be an array of tables"),
    ("[ssh]\nforks = \n", 2, "Invalid value"),  # TOML syntax: tomllib's reason, at its line
]


@pytest.mark.parametrize("text,line,expected", BAD, ids=[b[2][:50] for b in BAD])
def test_bad_value_is_a_config_error_with_file_line_and_field(tmp_path, text, line, expected):
    from kpipe.errors import ConfigError
    from kpipe.workspace import load_workspace

    (tmp_path / "kpipe.toml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_workspace(tmp_path)
    assert e.value.message.startswith(f"{tmp_path / 'kpipe.toml'}:{line}: "), e.value.message
    assert expected in e.value.message and "\n" not in e.value.message, e.value.message
    assert e.value.hint


# The issue's own examples, through the real command line.
CLI_BAD = [b for b in BAD if b[0] in (
    '[ssh]\nconnect_timeout = "abc"\n', '[ssh]\nforks = "many"\n', "[ssh]\nknown_hosts = [1,2]\n",
    '[[build_hosts]]\nname = "a"\n\n[[build_hosts]]\nname = "b"\nport = -1\n', "[flet]\ninventories = []\n",
    '[signing.signer.x]\nkey = "k"\n', '[[kernels]]\nrelease = "5.10.0-amd64-UOS"\ndistro = "debain"\n',
    '[signing.signers.x]\nkey = "k"\nkeyid = "false"\n')]


@pytest.mark.parametrize("text,line,expected", CLI_BAD, ids=[b[2][:50] for b in CLI_BAD])
def test_bad_value_is_exit_4_with_file_line_and_field(tmp_path, text, line, expected):
    (tmp_path / "kpipe.toml").write_text(text)
    r = kpipe(tmp_path, "fleet", "list")
    assert r.returncode == 4, (r.returncode, r.stderr)
    error = one_error(r)
    assert error.startswith(f"{tmp_path / 'kpipe.toml'}:{line}: "), error
    assert expected in error, error


def test_cli_examples_are_all_there():
    assert len(CLI_BAD) == 8


DID_YOU_MEAN = [
    ("[flet]\ninventories = []\n", "did you mean 'fleet'?"),
    ('[signing.signer.x]\nkey = "k"\n', "did you mean 'signers'?"),
    ('[[kernels]]\nrelease = "5.10.0-amd64-UOS"\ndistro = "debain"\n', "did you mean 'debian'?"),
    ('[signing.signers.x]\ntype = "comand"\n', "did you mean 'command'?"),
    ("[ssh]\nconect_timeout = 3\n", "did you mean 'connect_timeout'?"),
    ('[signing]\ndefault = "lba"\n\n[signing.signers.lab]\nkey = "k"\n', "did you mean 'lab'?"),
    ("[[build_host]]\nname = 'a'\n", "did you mean 'build_hosts'?"),
    ("forks = 3\n", "forks belongs under [ssh]"),
]


@pytest.mark.parametrize("text,hint", DID_YOU_MEAN, ids=[d[1] for d in DID_YOU_MEAN])
def test_misspelling_gets_a_did_you_mean(tmp_path, text, hint):
    from kpipe.errors import ConfigError
    from kpipe.workspace import load_workspace

    (tmp_path / "kpipe.toml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_workspace(tmp_path)
    assert (e.value.hint or "").startswith(hint), e.value.hint


def test_did_you_mean_reaches_the_terminal(tmp_path):
    (tmp_path / "kpipe.toml").write_text(DID_YOU_MEAN[0][0])
    r = kpipe(tmp_path, "kernels", "list")
    assert r.returncode == 4
    one_error(r)
    assert "hint: did you mean 'fleet'?" in r.stderr, r.stderr


def test_non_utf8_file_names_its_line(tmp_path):
    (tmp_path / "kpipe.toml").write_bytes(b'[ssh]\nforks = 5\n# caf\xe9\n')
    r = kpipe(tmp_path, "fleet", "list")
    assert r.returncode == 4
    assert one_error(r) == f"{tmp_path / 'kpipe.toml'}:3: not UTF-8 text (byte 0xe9 at column 6)"


def test_every_problem_is_counted_and_the_first_is_named(tmp_path):
    (tmp_path / "kpipe.toml").write_text('[ssh]\nforks = "many"\nconnect_timeout = "abc"\n[flet]\n')
    from kpipe.errors import ConfigError
    from kpipe.workspace import load_workspace

    with pytest.raises(ConfigError) as e:
        load_workspace(tmp_path)
    assert e.value.message.startswith(f"{tmp_path / 'kpipe.toml'}:4: unknown table 'flet'")
    assert e.value.message.endswith("(+2 more problem(s))")


# -- typed settings reach the code that uses them -----------------------------------------------------

FULL = """\
[workspace]
store = "state"

[[build_hosts]]
name = "b1"
address = "build.example.net"
port = 2222
kernels = "5.10.*"
tools = { "kpatch-build" = "/opt/kpatch-build" }

[[kernels]]
release = "5.10.0-amd64-UOS"
distro = "uos"
builder = "kpatch-build"
sig_hash = "sm3"
options = { jobs = 3 }

[ssh]
accept_new_host_keys = true
connect_timeout = 2.5
command_timeout = 0
forks = 7
kex = ["curve25519-sha256@libssh.org"]

[signing]
default = "vendor"

[signing.signers.vendor]
type = "command"
hash = "sm3"
argv = ["/usr/bin/sign", "{hash}", "{module}", "{output}"]

[signing.signers.team]
key = "k.pem"
cert = "c.pem"
keyid = true
sm2_user_id = "1234567812345678"

[fleet]
inventories = ["inv/hosts.ini"]
inventory_timeout = 5

[lab]
cache_dir = "cache"
vms = 3
memory = 512
append = "quiet"

[lab.kernels."6.1.0-9-amd64"]
image = "k/vmlinuz"
modules = "k/modules"

[audit]
desired = "desired.yml"
allowed_taint = ["o", "E", "K"]

[validation]
strict = true

[ansible]
python_interpreter = "/usr/bin/python3"
"""


def test_every_section_is_typed(tmp_path):
    from kpipe.settings import LabKernel
    from kpipe.workspace import load_workspace

    (tmp_path / "kpipe.toml").write_text(FULL)
    ws = load_workspace(tmp_path)
    s = ws.settings
    assert ws.store_dir == tmp_path / "state"
    b = ws.build_host("b1")
    assert (b.port, b.kernels, b.tool("kpatch-build")) == (2222, ("5.10.*",), "/opt/kpatch-build")
    k = ws.kernel("5.10.0-amd64-UOS")
    assert (k.distro, k.builder, k.sig_hash, k.arch, k.options) == ("uos", "kpatch-build", "sm3", "x86_64", {"jobs": 3})
    assert ws.ssh.accept_new_host_keys is True and ws.ssh.connect_timeout == 2.5 and ws.ssh.forks == 7
    assert ws.ssh.command_timeout == 0 and ws.ssh.kex == ("curve25519-sha256@libssh.org",)
    assert ws.default_signer == "vendor" and ws.signers["vendor"].argv[0] == "/usr/bin/sign"
    assert ws.signers["team"].keyid is True and ws.signers["team"].type == "builtin"
    assert ws.signers["team"].sm2_user_id == "1234567812345678" and ws.signers["vendor"].sm2_user_id is None
    assert ws.inventories == [tmp_path / "inv" / "hosts.ini"] and s.fleet.inventory_timeout == 5.0
    assert (s.lab.cache_dir, s.lab.vms, s.lab.memory, s.lab.append) == ("cache", 3, 512, "quiet")
    assert s.lab.kernels == {"6.1.0-9-amd64": LabKernel(image="k/vmlinuz", modules="k/modules")}
    assert s.audit.desired == "desired.yml" and s.audit.allowed_taint == ("O", "E", "K")
    assert s.validation.strict is True and s.ansible.python_interpreter == "/usr/bin/python3"


def test_defaults_when_sections_are_absent(tmp_path):
    from kpipe.settings import DEFAULT_INVENTORY_TIMEOUT
    from kpipe.workspace import load_workspace

    (tmp_path / "kpipe.toml").write_text("")
    s = load_workspace(tmp_path).settings
    assert s.ssh.accept_new_host_keys is False and s.validation.strict is False
    assert s.fleet.inventory_timeout == DEFAULT_INVENTORY_TIMEOUT == 60.0
    assert s.audit.allowed_taint is None and s.lab.vms == 1 and s.ansible.python_interpreter == "auto_silent"


def test_the_repository_workspace_parses():
    from kpipe.workspace import load_workspace

    ws = load_workspace(REPO)
    assert ws.settings.ssh.accept_new_host_keys is False and "lab" in ws.signers


def test_enum_mirrors_match_their_sources():
    from kpipe import settings
    from kpipe.elf.sign import HASHES
    from kpipe.elf.signature import KERNEL_HASHES
    from kpipe.kernel import _RPM_DIST_TAGS, parse_release
    from kpipe.recipes.schema import BUILDERS

    assert settings.BUILDERS == BUILDERS
    assert settings.SIGN_HASHES == HASHES and settings.KERNEL_HASHES == KERNEL_HASHES
    assert {name for _, name in _RPM_DIST_TAGS} <= set(settings.DISTROS)
    for release in ("6.1.0-9-amd64", "5.15.0-91-generic", "5.10.0-amd64-UOS", "4.19.90-24.4.v2101.ky10.aarch64",
                    "5.14.21-150500.55.39-default", "6.6.8-arch1-1", "6.1.70-0-lts", "6.8.0-060800rc1-generic",
                    "weird"):
        try:
            distro = parse_release(release).distro
        except Exception:
            continue
        assert distro in settings.DISTROS, (release, distro)


# -- the line finder ------------------------------------------------------------------------------------

TRICKY = '''\
# [not] = "a table"
title = "x"                      # 2
"quoted key" = 1                 # 3
dotted.key.path = 2              # 4
site."a.b" = 3                   # 5
text = """
[fake]
fake = 1
"""                              # 6-9
lit = \'\'\'
[[also_fake]]\'\'\'                  # 10-11
arr = [                          # 12
  1,                             # 13
  # comment with ] and [
  "two, ]",                      # 15
  [3, 4],                        # 16
]
inline = { a = 1, b.c = { d = [5, 6] } }   # 18
date = 1979-05-27 07:32:00Z      # 19

[t]                              # 21
k = 'C:\\x [y]'                 # 22
[[aot]]                          # 23
name = "first"                   # 24
[aot.sub]                        # 25
x = 1                            # 26
[[aot.items]]                    # 27
y = 1                            # 28
[[aot]]                          # 29
name = "second"                  # 30
[[aot.items]]                    # 31
y = 2                            # 32
[[aot.items]]                    # 33
y = 3                            # 34
[ "spaced" . inner ]             # 35
z = "\\"esc\\" [x]"              # 36
'''


def test_toml_lines_of_a_tricky_document():
    from kpipe.settings import toml_lines

    tomllib.loads(TRICKY)  # valid TOML
    lines = toml_lines(TRICKY)
    expected = {
        ("title",): 2, ("quoted key",): 3, ("dotted", "key", "path"): 4, ("site", "a.b"): 5, ("text",): 6,
        ("lit",): 10, ("arr",): 12, ("arr", 0): 13, ("arr", 1): 15, ("arr", 2): 16, ("arr", 2, 1): 16,
        ("inline",): 18, ("inline", "b", "c", "d"): 18, ("inline", "b", "c", "d", 1): 18, ("date",): 19,
        ("t",): 21, ("t", "k"): 22, ("aot",): 23, ("aot", 0): 23, ("aot", 0, "name"): 24, ("aot", 0, "sub"): 25,
        ("aot", 0, "sub", "x"): 26, ("aot", 0, "items", 0): 27, ("aot", 0, "items", 0, "y"): 28,
        ("aot", 1): 29, ("aot", 1, "name"): 30, ("aot", 1, "items", 0): 31, ("aot", 1, "items", 0, "y"): 32,
        ("aot", 1, "items", 1): 33, ("aot", 1, "items", 1, "y"): 34, ("spaced", "inner"): 35,
        ("spaced", "inner", "z"): 36,
    }
    assert {p: lines.get(p) for p in expected} == expected
    assert not any(p[0] in ("fake", "also_fake", "not") for p in lines)


def _leaves(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, path + (i,))


CRLF = ('[ssh]\r\nforks = 3\r\n"ключ" = "é"\r\n[[a]]\r\nb = """x\r\n[[a]]"""\r\n[[a]]\r\n'
        "\tc = [ {d = 1}, {d = '''q'''} ]\r\ne = \"\"\"\"\"\"\r\nf = \"\"\"a\"\"\"\"\"\r\ng = 1 # x\r\n")


def test_toml_lines_with_crlf_quotes_and_unicode():
    from kpipe.settings import toml_lines

    assert tomllib.loads(CRLF)["a"][1]["f"] == 'a""'
    lines = toml_lines(CRLF)
    assert lines[("ssh", "ключ")] == 3 and lines[("a", 1)] == 7 and lines[("a", 1, "c", 1, "d")] == 8
    assert lines[("a", 1, "f")] == 10 and lines[("a", 1, "g")] == 11 and ("a", 2) not in lines


@pytest.mark.parametrize("name", ["repo kpipe.toml", "tricky", "full", "crlf"])
def test_toml_lines_finds_every_key_on_a_line_that_names_it(name):
    from kpipe.settings import toml_lines

    text = {"repo kpipe.toml": (REPO / "kpipe.toml").read_text(), "tricky": TRICKY, "full": FULL, "crlf": CRLF}[name]
    lines = toml_lines(text)
    rows = text.splitlines()
    for path in _leaves(tomllib.loads(text)):
        if not path:
            continue
        assert path in lines, path
        key = next((p for p in reversed(path) if isinstance(p, str)), None)
        if key is not None and not isinstance(path[-1], int) and key.isidentifier():
            assert key in rows[lines[path] - 1], (path, lines[path], rows[lines[path] - 1])


def test_toml_lines_never_raises_on_text_it_cannot_follow():
    from kpipe.settings import toml_lines

    assert toml_lines('a = "unterminated\n[b]\n') == {("a",): 1}


# -- dynamic inventory scripts are bounded (item 13) ----------------------------------------------------

HANGS_ON_LIST = """#!/bin/sh
sleep 1000 &
echo $! > "$(dirname "$0")/child.pid"
sleep 1000
"""

HANGS_ON_HOST = """#!/bin/sh
if [ "$1" = "--list" ]; then
  echo '{"web": {"hosts": ["web1"]}}'
else
  sleep 1000 &
  echo $! > "$(dirname "$0")/child.pid"
  sleep 1000
fi
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # killed; only its reaping (by init) may lag


@pytest.mark.parametrize("script", [HANGS_ON_LIST, HANGS_ON_HOST], ids=["--list", "--host"])
def test_hanging_inventory_script_is_killed_with_its_children(tmp_path, script):
    inv = tmp_path / "inv.sh"
    inv.write_text(script)
    inv.chmod(0o755)
    (tmp_path / "kpipe.toml").write_text('[fleet]\ninventories = ["inv.sh"]\ninventory_timeout = 2\n')
    r = kpipe(tmp_path, "fleet", "list", timeout=90)
    assert r.returncode == 4, (r.returncode, r.stderr)
    error = one_error(r)
    assert error.startswith(f"{inv}: inventory script did not finish within 2 s"), error
    assert "inventory_timeout" in r.stderr  # the hint names the setting
    child = int((tmp_path / "child.pid").read_text())
    assert _gone(child), f"the script's child {child} still runs"


def test_inventory_timeout_comes_from_the_workspace(tmp_path):
    from kpipe.fleet.inventory import inventory_timeout
    from kpipe.workspace import load_workspace

    (tmp_path / "kpipe.toml").write_text("[fleet]\ninventory_timeout = 7.5\n")
    assert inventory_timeout(load_workspace(tmp_path)) == 7.5
    assert inventory_timeout(None) == 60.0


def test_a_quick_inventory_script_still_works(tmp_path):
    inv = tmp_path / "inv.sh"
    inv.write_text('#!/bin/sh\necho \'{"web": {"hosts": ["web1"]}, '
                   '"_meta": {"hostvars": {"web1": {"ansible_host": "127.0.0.1"}}}}\'\n')
    inv.chmod(0o755)
    (tmp_path / "kpipe.toml").write_text('[fleet]\ninventories = ["inv.sh"]\ninventory_timeout = 30\n')
    r = kpipe(tmp_path, "fleet", "list", "--json")
    assert r.returncode == 0, r.stderr
    assert '"web1"' in r.stdout
