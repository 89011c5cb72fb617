"""Inventory: kpipe's fleet file and Ansible INI/YAML/script sources read by ansible-core, patterns, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kpipe.errors import ConfigError, ExitCode, NotFoundError
from kpipe.fleet.inventory import Host, load_inventory
from kpipe.workspace import load_workspace

INI = """\
[web]
web1 ansible_host=10.0.0.11 ansible_port=2201
web2 ansible_host=10.0.0.12 ansible_user=ops
web3 ansible_host=10.0.0.13

[db]
db1 ansible_host=10.0.1.1 ansible_become=yes
web1

[edge]
edge-a ansible_host=edge-a.example.com

[prod:children]
web
db

[prod:vars]
tier=prod
"""

YAML = """\
all:
  vars:
    ansible_user: deploy
  children:
    canary:
      hosts:
        c1: {ansible_host: 192.168.5.1, ansible_port: 22022}
        c2: {ansible_host: 192.168.5.2}
    kylin:
      hosts:
        k1: {ansible_host: "fe80::1%eth0", ansible_ssh_private_key_file: keys/k1, kpipe_known_hosts: kh/lab}
        c2:
      vars:
        distro: kylin
"""


def write(path: Path, text: str, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if mode is not None:
        path.chmod(mode)
    return path


@pytest.fixture
def ini(tmp_path: Path) -> Path:
    inv = write(tmp_path / "inv" / "hosts.ini", INI)
    write(tmp_path / "inv" / "group_vars" / "web.yml", "env: dc1\nansible_port: 2022\n")
    write(tmp_path / "inv" / "host_vars" / "db1.yml", "rack: r9\nansible_user: dbadmin\n")
    return inv


def names(hosts: list[Host]) -> list[str]:
    return [h.name for h in hosts]


def test_ini_groups_children_and_connection_vars(ini: Path) -> None:
    inv = load_inventory(None, [ini])
    web1 = inv.get("web1")
    assert (web1.address, web1.port, web1.user, web1.become) == ("10.0.0.11", 2201, "root", False)
    assert set(web1.groups) == {"web", "db", "prod"}
    web2 = inv.get("web2")
    assert (web2.address, web2.port, web2.user) == ("10.0.0.12", 2022, "ops")  # port from group_vars/web.yml
    db1 = inv.get("db1")
    assert (db1.user, db1.become) == ("dbadmin", True)  # user from host_vars/db1.yml
    assert db1.vars["rack"] == "r9" and db1.vars["tier"] == "prod"
    assert web2.vars["env"] == "dc1"
    assert "ansible_host" not in web2.vars  # connection vars are fields, not data
    assert inv.get("edge-a").address == "edge-a.example.com"
    assert inv.get("edge-a").port == 22


def test_yaml_inventory_paths_are_relative_to_the_inventory(tmp_path: Path) -> None:
    inv = load_inventory(None, [write(tmp_path / "y" / "inv.yml", YAML)])
    c1, k1 = inv.get("c1"), inv.get("k1")
    assert (c1.address, c1.port, c1.user) == ("192.168.5.1", 22022, "deploy")
    assert k1.address == "fe80::1%eth0"
    assert k1.identity_file == str(tmp_path / "y" / "keys" / "k1")
    assert k1.known_hosts == str(tmp_path / "y" / "kh" / "lab")
    assert inv.get("c2").vars["distro"] == "kylin"
    assert names(inv.select("kylin")) == ["c2", "k1"] or names(inv.select("kylin")) == ["k1", "c2"]


def test_dynamic_inventory_script(tmp_path: Path) -> None:
    data = {"_meta": {"hostvars": {"d1": {"ansible_host": "10.9.0.1", "ansible_port": 2222}}},
            "dyn": {"hosts": ["d1", "d2"], "vars": {"ansible_user": "svc"}}}
    script = write(tmp_path / "dyn.py", f"#!{sys.executable}\nimport json, sys\n"
                   f"print(json.dumps({data!r}) if '--list' in sys.argv else '{{}}')\n", 0o755)
    inv = load_inventory(None, [script])
    d1 = inv.get("d1")
    assert (d1.address, d1.port, d1.user) == ("10.9.0.1", 2222, "svc")
    assert names(inv.select("dyn")) == ["d1", "d2"]


def test_kpipe_fleet_file(tmp_path: Path) -> None:
    fleet = write(tmp_path / "fleet.yml", """\
defaults: {user: ops, identity_file: keys/fleet}
hosts:
  web1: {address: 10.1.0.1}
  web2: {address: 10.1.0.2, port: 2222, become: true, vars: {rack: r1}}
  db1:
groups:
  web: {hosts: [web1, web2], vars: {tier: front}}
  prod: {children: [web], hosts: [db1]}
""")
    inv = load_inventory(None, [fleet])
    w2 = inv.get("web2")
    assert (w2.address, w2.port, w2.user, w2.become) == ("10.1.0.2", 2222, "ops", True)
    assert w2.identity_file == str(tmp_path / "keys" / "fleet")
    assert w2.vars == {"rack": "r1", "tier": "front"}
    assert inv.get("db1").address == "db1"
    assert names(inv.select("prod")) == ["web1", "web2", "db1"] or set(names(inv.select("prod"))) == {
        "web1", "web2", "db1"}
    assert names(inv.select("prod:!web")) == ["db1"]


def test_workspace_sources_include_fleet_file_configured_inventories_and_lab(tmp_path: Path, ini: Path) -> None:
    ws_dir = tmp_path / "ws"
    write(ws_dir / "kpipe.toml", f'[fleet]\ninventories = ["{ini}"]\n')
    write(ws_dir / "fleet.yml", "hosts:\n  own1: {address: 10.2.0.1}\n")
    write(ws_dir / ".lab" / "inventory.yml", "lab:\n  hosts:\n    vm0: {ansible_host: 127.0.0.1, ansible_port: 40022,"
          " kpipe_known_hosts: /ws/.lab/known_hosts}\n")
    inv = load_inventory(load_workspace(ws_dir))
    assert {"web1", "db1", "own1", "vm0"} <= set(inv.host_names)
    vm0 = inv.get("vm0")
    assert (vm0.port, vm0.known_hosts, vm0.groups) == (40022, "/ws/.lab/known_hosts", ("lab",))


PATTERNS = ["all", "web", "web1", "web*", "~web[12]", "web:db", "web,db", "web:&db", "prod:!db", "prod:!web:&prod",
            "web[0]", "web[1:]", "*.example.com:edge*", "~(web|db)1"]


def test_patterns_select_exactly_what_ansible_selects(ini: Path) -> None:
    """Every pattern gives the same hosts, in the same order, as `ansible PATTERN --list-hosts`."""
    inv = load_inventory(None, [ini])
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_HOST_PATTERN_MISMATCH="ignore")
    for pattern in PATTERNS:
        r = subprocess.run(["ansible", "-i", str(ini), pattern, "--list-hosts"], capture_output=True, text=True,
                           env=env, timeout=120)
        lines = [ln.strip() for ln in r.stdout.splitlines()]
        expected = [ln for ln in lines if ln and not ln.startswith("hosts (")]
        assert names(inv.select(pattern)) == expected, pattern


@pytest.mark.parametrize("pattern", ["nope", "web:&nope", "web:!web", "~^zzz"])
def test_pattern_matching_nothing_is_not_found(ini: Path, pattern: str, capfd: pytest.CaptureFixture) -> None:
    inv = load_inventory(None, [ini])
    with pytest.raises(NotFoundError) as e:
        inv.select(pattern)
    assert e.value.exit_code == ExitCode.NOT_FOUND and pattern in str(e.value)
    assert "groups:" in (e.value.hint or "")
    assert capfd.readouterr().err == ""  # ansible's warnings are captured, not printed


@pytest.mark.parametrize("pattern", ["~[", "~(unclosed", "web\nall"])
def test_bad_pattern_is_a_config_error_never_everything(ini: Path, pattern: str) -> None:
    with pytest.raises(ConfigError):
        load_inventory(None, [ini]).select(pattern)


BAD_SOURCES = {
    "bad-section.ini": ("[web\nweb1 ansible_host=1.2.3.4\n", None),
    "bad-vars.ini": ("[web]\nweb1 ansible_host\n", None),
    "syntax.yml": ("all:\n  hosts:\n    a: {ansible_host: [unclosed\n", None),
    "not-an-inventory.yml": ("- just\n- a list\n", None),
    "fails.sh": ("#!/bin/sh\necho broken >&2\nexit 3\n", 0o755),
    "garbage.sh": ("#!/bin/sh\necho 'this is not json'\n", 0o755),
}


@pytest.mark.parametrize("file_name", sorted(BAD_SOURCES))
def test_malformed_inventory_is_a_config_error_naming_the_file(tmp_path: Path, file_name: str,
                                                               capfd: pytest.CaptureFixture) -> None:
    text, mode = BAD_SOURCES[file_name]
    path = write(tmp_path / file_name, text, mode)
    with pytest.raises(ConfigError) as e:
        load_inventory(None, [path])
    assert str(path) in str(e.value)
    assert e.value.exit_code == ExitCode.CONFIG
    assert capfd.readouterr().err == ""


def test_missing_source_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_inventory(None, [tmp_path / "nope.ini"])


BAD_FLEET_FILES = {
    "unknown-key": ("hosts:\n  a: {adress: 1.2.3.4}\n", "unknown keys"),
    "bad-port": ("hosts:\n  a: {port: 70000}\n", "outside 1-65535"),
    "port-text": ("hosts:\n  a: {port: '22; ls'}\n", "not a number"),
    "group-unknown-host": ("hosts:\n  a: {}\ngroups:\n  g: {hosts: [b]}\n", "not under hosts"),
    "group-unknown-child": ("hosts:\n  a: {}\ngroups:\n  g: {children: [x]}\n", "not under groups"),
    "yaml-syntax": ("hosts:\n  a: {address: [\n", "invalid YAML"),
    "top-level-list": ("- a\n", "must be a mapping"),
    "leading-dash-name": ("hosts:\n  -oProxyCommand=x: {}\n", "not usable"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLEET_FILES))
def test_bad_fleet_file(tmp_path: Path, case: str) -> None:
    text, message = BAD_FLEET_FILES[case]
    path = write(tmp_path / "fleet.yml", text)
    with pytest.raises(ConfigError, match=message) as e:
        load_inventory(None, [path])
    assert str(path) in str(e.value)


HOSTILE = {
    "address-shell": ("h1 ansible_host='10.0.0.1;touch /tmp/kpipe-pwned'", "not a host name"),
    "address-option": ("h1 ansible_host=-oProxyCommand=sh", "not a host name"),
    "huge-port": ("h1 ansible_port=99999999999", "outside 1-65535"),
    "negative-port": ("h1 ansible_port=-1", "outside 1-65535"),
    "port-text": ("h1 ansible_port=ssh", "not a number"),
    "user-option": ("h1 ansible_user=-oProxyCommand=x", "not a valid user"),
    "user-shell": ("h1 ansible_user='root$(id)'", "not a valid user"),
    "template": ("h1 ansible_host=\"{{ lookup('pipe', 'touch /tmp/kpipe-pwned') }}\"", "Jinja template"),
    "become-text": ("h1 ansible_become=perhaps", "must be a boolean"),
    "name-as-address": ("-h1", "unusable host name"),
    "key-option": ("h1 ansible_ssh_private_key_file=-oX", "starts with '-'"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_host_vars_are_refused_before_any_connection(tmp_path: Path, case: str) -> None:
    line, message = HOSTILE[case]
    path = write(tmp_path / "hostile.ini", f"[g]\n{line}\n")
    pwned = Path("/tmp/kpipe-pwned")
    pwned.unlink(missing_ok=True)
    with pytest.raises((ConfigError, NotFoundError)) as e:
        load_inventory(None, [path]).select("all")
    if isinstance(e.value, ConfigError):
        assert message in str(e.value)
    assert not pwned.exists()  # nothing was templated or run


def test_newline_in_a_yaml_var_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "inv.yml", 'g:\n  hosts:\n    h1: {ansible_host: "10.0.0.1\\nProxyCommand sh"}\n')
    with pytest.raises(ConfigError, match="control character"):
        load_inventory(None, [path]).select("all")


def test_shell_metacharacters_in_names_and_vars_stay_data(tmp_path: Path) -> None:
    path = write(tmp_path / "inv.yml", """\
g:
  hosts:
    "web$(reboot);x|y`id`&z":
      ansible_host: 10.0.0.1
      note: "`reboot` && rm -rf / | $HOME"
""")
    Path("/tmp/kpipe-pwned").unlink(missing_ok=True)
    [h] = load_inventory(None, [path]).select("all")
    assert h.name == "web$(reboot);x|y`id`&z"
    assert h.vars["note"] == "`reboot` && rm -rf / | $HOME"
    assert h.address == "10.0.0.1"
    assert not Path("/tmp/kpipe-pwned").exists()


def test_cli_fleet_list_json_and_exit_codes(tmp_path: Path, ini: Path) -> None:
    ws = tmp_path / "ws"
    write(ws / "kpipe.toml", f'[fleet]\ninventories = ["{ini}"]\n')
    env = dict(os.environ, KPIPE_WORKSPACE=str(ws))
    r = subprocess.run(["kpipe", "fleet", "list", "--limit", "web:&db", "--json"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    [host] = json.loads(r.stdout)["hosts"]
    assert (host["name"], host["port"]) == ("web1", 2201)
    r = subprocess.run(["kpipe", "fleet", "list", "--limit", "nope"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == ExitCode.NOT_FOUND and "nope" in r.stderr and "Traceback" not in r.stderr
    bad = write(tmp_path / "bad.ini", "[web\n")
    r = subprocess.run(["kpipe", "fleet", "list", "-i", str(bad)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == ExitCode.CONFIG and str(bad) in r.stderr and "Traceback" not in r.stderr
    assert "[WARNING]" not in r.stderr


def test_workspace_without_inventory_says_how_to_add_one(tmp_path: Path) -> None:
    write(tmp_path / "kpipe.toml", "")
    with pytest.raises(NotFoundError, match="no inventory") as e:
        load_inventory(load_workspace(tmp_path)).select(None)
    assert "fleet.yml" in (e.value.hint or "")
