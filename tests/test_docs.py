"""README documents kpipe.toml as kpipe/settings.py reads it: every section and key (with a type and
default that match the code), and its fleet.yml and desired-state examples load through kpipe's own readers."""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest

from kpipe import settings as S

README = Path(__file__).resolve().parent.parent / "README.md"

# the dataclass behind each table (defaults are checked against README's default column)
DATACLASSES: dict[str, type] = {
    "workspace": S.WorkspaceDirs, "build_hosts": S.BuildHost, "kernels": S.KernelEntry, "ssh": S.SshSettings,
    "signing": S.SigningSettings, "signing.signers.*": S.SignerConfig, "fleet": S.FleetSettings,
    "lab": S.LabSettings, "lab.kernels.*": S.LabKernel, "audit": S.AuditSettings,
    "validation": S.ValidationSettings, "ansible": S.AnsibleSettings,
}

# a document with one of every repeated or named table, so that the reader visits each
FULL = b'''
[[build_hosts]]
name = "local"
[[kernels]]
release = "6.1.0-1-amd64"
[signing.signers.lab]
key = "k.pem"
cert = "c.pem"
[lab.kernels."6.1.0-1-amd64"]
image = "vmlinuz"
[rollout.health]
command = ["true"]
[rollout.prometheus]
url = "http://127.0.0.1:9090"
query = "up"
threshold = 1
'''


def section(text: str, title: str) -> str:
    """README's `### title` subsection (up to the next ## or ### heading, not ####)."""
    m = re.search(rf"^### {re.escape(title)}\n(.*?)(?=^#{{2,3}} )", text, re.S | re.M)
    assert m, f"README has no '### {title}' section"
    return m.group(1)


def readme_tables() -> dict[str, dict[str, list[str]]]:
    """{section: {key: [type, default, meaning]}} from README's kpipe.toml reference."""
    out: dict[str, dict[str, list[str]]] = {}
    current = ""
    for line in section(README.read_text(), "kpipe.toml reference").splitlines():
        h = re.match(r"^#### \[\[?([^\]]+?)\]?\]$", line)
        if h:
            # [signing.signers.NAME] and [lab.kernels."RELEASE"] stand for any name
            current = re.sub(r'\.(NAME|"RELEASE")$', ".*", h.group(1))
            out[current] = {}
            continue
        row = re.match(r"^\| `([a-z0-9_]+)` \|(.*)\|$", line)
        if row and current:
            out[current][row.group(1)] = [c.strip() for c in row.group(2).split("|")]
    return out


def code_tables() -> dict[str, tuple[str, ...]]:
    """{section: the keys it allows} as kpipe/settings.py's reader checks them."""
    seen: dict[str, tuple[str, ...]] = {}
    original = S._Reader.table

    def record(self: Any, value: Any, path: S.Path_, allowed: tuple[str, ...] | None, **kw: Any) -> Any:
        if path and allowed is not None:
            parts = [str(p) for p in path if not isinstance(p, int)]
            if parts[:2] in (["signing", "signers"], ["lab", "kernels"]) and len(parts) == 3:
                parts[2] = "*"
            seen[".".join(parts)] = tuple(allowed)
        return original(self, value, path, allowed, **kw)

    S._Reader.table = record  # type: ignore[method-assign]
    try:
        S.parse_settings(Path("kpipe.toml"), FULL)
    finally:
        S._Reader.table = original  # type: ignore[method-assign]
    return seen


def test_every_section_and_key_of_settings_is_in_the_readme():
    doc, code = readme_tables(), code_tables()
    assert set(S.SECTIONS) <= set(code), "the reader did not visit every top-level section"
    missing_sections = sorted(set(code) - set(doc))
    assert not missing_sections, f"README's kpipe.toml reference lacks section(s): {missing_sections}"
    missing = sorted(f"[{sec}] {k}" for sec, keys in code.items() for k in keys if k not in doc[sec])
    assert not missing, f"README's kpipe.toml reference lacks key(s): {missing}"
    stale = sorted(f"[{sec}] {k}" for sec, keys in doc.items() for k in keys if k not in code.get(sec, ()))
    assert not stale, f"README documents key(s) kpipe.toml does not accept: {stale}"


def test_every_documented_key_has_a_type_a_default_and_a_meaning():
    for sec, keys in readme_tables().items():
        for key, cells in keys.items():
            assert len(cells) == 3 and all(cells), f"[{sec}] {key}: type, default and meaning needed: {cells}"


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return json.dumps(list(value))
    if isinstance(value, (str, dict)):
        return json.dumps(value)
    return repr(value)


def test_documented_defaults_are_the_codes():
    doc = readme_tables()
    checked = 0
    for sec, cls in DATACLASSES.items():
        for f in fields(cls):
            if f.name not in doc.get(sec, {}):
                continue
            default = f.default if f.default is not MISSING else (
                f.default_factory() if f.default_factory is not MISSING else MISSING)  # type: ignore[misc]
            cell = doc[sec][f.name][1]
            m = re.match(r"^`([^`]*)`", cell)
            if default is MISSING or default is None or not m:
                continue  # required, unset, or computed ("from the release")
            assert m.group(1) == _toml_literal(default), f"[{sec}] {f.name}: README says {cell}, code {default!r}"
            checked += 1
    assert checked > 30


def _yaml_block(after: str) -> str:
    m = re.search(r"```yaml\n(.*?)```", section(README.read_text(), after), re.S)
    assert m, f"no YAML example under '### {after}'"
    return m.group(1)


def test_the_fleet_file_example_loads(tmp_path):
    from kpipe.fleet.inventory import load_inventory

    f = tmp_path / "fleet.yml"
    f.write_text(_yaml_block("The fleet file (fleet.yml)"))
    inv = load_inventory(None, [str(f)])
    assert sorted(inv.host_names) == ["db1", "web1", "web2"]
    assert sorted(h.name for h in inv.select("prod")) == ["db1", "web1", "web2"]
    web2 = next(h for h in inv.select("web2"))
    assert (web2.port, web2.user) == (2222, "ops")


def test_the_desired_state_example_applies():
    from kpipe.desired import DesiredState, apply_desired_file, glob_matcher, parse_desired_text

    doc = parse_desired_text(_yaml_block("The desired-state file (`kpipe audit -d FILE`)"))
    state = apply_desired_file(DesiredState(), doc, lambda pattern: ["web1"])
    assert set(state.patches["web1"]) == {"livepatch_cve_2026_1234", "livepatch_fix_cmdline"}
    assert state.forbidden["web1"][0].pattern == "kpatch_old_*"
    assert glob_matcher  # the matcher tests use; the example's pattern is an inventory pattern


@pytest.mark.parametrize("name", ["lab", "validation", "ansible", "audit"])
def test_sections_once_only_in_help_are_in_the_readme(name):
    assert f"#### [{name}]" in README.read_text()
