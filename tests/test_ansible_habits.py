"""Ansible habits (issue 12, item 8): `--limit @FILE`, Ansible patterns wherever a host filter is taken
(`rollout rollback --limit` and `audit --limit` included), and `kpipe audit --json`.

Every test drives the real `kpipe` command line in a subprocess; the rollout and audit tests use SimFleet's
real sshd hosts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kpipe.artifacts import add_artifact
from kpipe.workspace import open_workspace
from simfleet import simfleet_factory  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.timeout(600)
MODULE = "livepatch_demo"

INI = """[web]
web1 ansible_host=127.0.0.1
web2 ansible_host=127.0.0.1
web3 ansible_host=127.0.0.1
[db]
db1 ansible_host=127.0.0.1
"""


def kp(*args: str, cwd: Path, ws: Path | None = None, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("KPIPE_DEBUG", "KPIPE_WORKSPACE")}
    pre = ["-W", str(ws)] if ws else []
    r = subprocess.run([sys.executable, "-m", "kpipe", *pre, *args], cwd=cwd, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=300, env=env)
    assert r.returncode in ok, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    return r


def listed(tmp: Path, limit: str) -> list[str]:
    r = kp("fleet", "list", "-i", "hosts.ini", "-l", limit, "--json", cwd=tmp)
    return [h["name"] for h in json.loads(r.stdout)["hosts"]]


# -- --limit @FILE on a static inventory (no host is contacted) --------------------------------------------
def test_limit_file_reads_one_pattern_a_line_relative_to_the_current_folder(tmp_path):
    (tmp_path / "hosts.ini").write_text(INI)
    (tmp_path / "site.retry").write_text("# hosts that failed last time\nweb2\n\n  db1  \n")
    assert listed(tmp_path, "@site.retry") == ["web2", "db1"]
    (tmp_path / "groups.txt").write_text("web*\n")
    assert listed(tmp_path, "@groups.txt:!web3") == ["web1", "web2"]
    assert listed(tmp_path, "@site.retry:&web") == ["web2"]


def test_limit_file_problems_are_one_line_exit_4(tmp_path):
    (tmp_path / "hosts.ini").write_text(INI)
    r = kp("fleet", "list", "-i", "hosts.ini", "-l", "@missing.txt", cwd=tmp_path, ok=(4,))
    assert r.stderr.startswith("kpipe: error: --limit @missing.txt: cannot read the limit file") and "hint:" in r.stderr
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    r = kp("fleet", "list", "-i", "hosts.ini", "-l", "@empty.txt", cwd=tmp_path, ok=(4,))
    assert "names no host" in r.stderr


def test_a_changed_limit_file_is_read_again(tmp_path):
    # the selection cache must key on the file's patterns, not on its name
    ws = tmp_path / "ws"
    kp("init", str(ws), cwd=tmp_path)
    (ws / "fleet.yml").write_text("hosts:\n  h0: {address: 127.0.0.1}\n  h1: {address: 127.0.0.1}\n"
                                  "  h2: {address: 127.0.0.1}\n")
    (ws / "lim").write_text("h0\n")
    r = kp("fleet", "list", "-l", "@lim", "--json", cwd=ws)
    assert [h["name"] for h in json.loads(r.stdout)["hosts"]] == ["h0"]
    (ws / "lim").write_text("h1\nh2\n")
    r = kp("fleet", "list", "-l", "@lim", "--json", cwd=ws)
    assert [h["name"] for h in json.loads(r.stdout)["hosts"]] == ["h1", "h2"]


# -- rollback and audit take Ansible patterns --------------------------------------------------------------
def grouped_ws(fleet, tmp: Path):
    """A workspace whose inventory puts the first host in group canary, the others in group rest."""
    root = fleet.write_workspace(tmp / "ws", forks=10)
    hv = {"ansible_user": "root", "ansible_ssh_private_key_file": str(fleet.client_key),
          "kpipe_known_hosts": str(fleet.known_hosts)}

    def hosts(hs):
        return {h.name: {"ansible_host": h.address, "ansible_port": h.port} for h in hs}

    (root / "simfleet.yml").write_text(yaml.safe_dump({"all": {"vars": hv, "children": {
        "canary": {"hosts": hosts(fleet.hosts[:1])}, "rest": {"hosts": hosts(fleet.hosts[1:])}}}}))
    ws = open_workspace(root)
    ko = tmp / "livepatch-demo.ko"
    ko.write_bytes(os.urandom(4096))
    art = add_artifact(ws.store, ko, kernel=fleet.release, status="valid", arch="x86_64",
                       module_name="livepatch-demo", preflight={"status": "passed"})
    return ws, art


def loaded(host) -> bool:
    p = host.patches().get(MODULE)
    return bool(p) and str(p.get("enabled")) == "1"


def rolled_back(r: subprocess.CompletedProcess) -> set[str]:
    return {h for h, st in json.loads(r.stdout)["hosts"].items() if st == "rolled_back"}


def test_rollback_limit_takes_groups_exclusions_and_limit_files(simfleet_factory, tmp_path):
    fleet = simfleet_factory(4)
    ws, art = grouped_ws(fleet, tmp_path)
    names = [h.name for h in fleet.hosts]
    out = json.loads(kp("rollout", "start", art.id, "--yes", "--waves", "100%", "--json", cwd=tmp_path,
                        ws=ws.root).stdout)
    rid = out["rollout_id"]
    assert all(loaded(h) for h in fleet.hosts)

    # a group with an exclusion: `rest:!<last>` (globs alone could name neither)
    r = kp("rollout", "rollback", rid, "--limit", f"rest:!{names[3]}", "--yes", "--json", cwd=tmp_path, ws=ws.root)
    assert rolled_back(r) == set(names[1:3]), r.stdout
    assert [loaded(h) for h in fleet.hosts] == [True, False, False, True]

    # a limit file, relative to the current folder
    (tmp_path / "retry").write_text(f"{names[3]}\n")
    r = kp("rollout", "rollback", rid, "--limit", "@retry", "--yes", "--json", cwd=tmp_path, ws=ws.root)
    assert rolled_back(r) == set(names[1:]), r.stdout
    assert [loaded(h) for h in fleet.hosts] == [True, False, False, False]

    # a pattern that selects none of the rollout's hosts changes nothing: exit 5, one line
    r = kp("rollout", "rollback", rid, "--limit", "nosuchgroup", "--yes", cwd=tmp_path, ws=ws.root, ok=(5,))
    assert r.stderr.startswith("kpipe: error: --limit 'nosuchgroup' matches no host of rollout")
    assert loaded(fleet.hosts[0])

    r = kp("rollout", "rollback", rid, "--limit", "canary", "--yes", "--json", cwd=tmp_path, ws=ws.root)
    assert rolled_back(r) == set(names), r.stdout
    assert not any(loaded(h) for h in fleet.hosts)


def audited(report: dict) -> set[str]:
    return {h["host"] for h in report["hosts"]}


def test_audit_json_is_format_json_and_audit_limit_takes_patterns(simfleet_factory, tmp_path):
    fleet = simfleet_factory(3)
    ws, _ = grouped_ws(fleet, tmp_path)
    names = [h.name for h in fleet.hosts]
    a = json.loads(kp("audit", "--json", cwd=tmp_path, ws=ws.root).stdout)
    b = json.loads(kp("audit", "--format", "json", cwd=tmp_path, ws=ws.root).stdout)
    assert set(a) == set(b) and audited(a) == audited(b) == set(names)

    r = json.loads(kp("audit", "--json", "--limit", f"rest:!{names[2]}", cwd=tmp_path, ws=ws.root).stdout)
    assert audited(r) == {names[1]}
    (tmp_path / "lim").write_text(f"canary\n{names[2]}\n")
    r = json.loads(kp("audit", "--json", "--limit", "@lim", cwd=tmp_path, ws=ws.root).stdout)
    assert audited(r) == {names[0], names[2]}

    r = kp("audit", "--json", "--format", "html", cwd=tmp_path, ws=ws.root, ok=(2,))
    assert r.stderr.startswith("kpipe: error: --json and --format html")
