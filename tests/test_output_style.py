"""Consistent output (issue 12, item 10): one casing for table headers, counts with the right plural, the
validate table shows what needs attention (passing checks with --verbose), check ids name the check, the
HTML report states its scope and folds the statuses nobody has, and `kpipe sign FILE` keeps the file's mode.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from kpipe import audit as A  # noqa: E402
from kpipe.audit import AppliedRecord as R  # noqa: E402
from kpipe.audit import ObservedHost as H  # noqa: E402
from kpipe.audit import ObservedPatch as P  # noqa: E402
from kpipe.report import render  # noqa: E402

pytestmark = pytest.mark.timeout(600)
UNITS = {"MiB"}  # a unit keeps its own casing inside a lower-case header


def kp(*args: str, cwd: Path, ok: tuple[int, ...] = (0,), umask: int | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("KPIPE_DEBUG", "KPIPE_WORKSPACE")}
    env["COLUMNS"] = "250"
    r = subprocess.run([sys.executable, "-m", "kpipe", *args], cwd=cwd, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=300, env=env,
                       preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)
    assert r.returncode in ok, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    return r


def rich_headers(out: str) -> list[list[str]]:
    """The header cells of every Rich table in `out` (the line after each top border)."""
    lines = out.splitlines()
    return [[c.strip() for c in lines[i + 1].strip().strip("┃").split("┃")]
            for i, line in enumerate(lines) if line.lstrip().startswith("┏") and i + 1 < len(lines)]


def assert_one_casing(headers: list[str], where: str) -> None:
    for h in headers:
        words = [w for w in h.split() if w not in UNITS]
        assert all(w == w.lower() for w in words), f"{where}: header {h!r} is not lower-case"


def unreachable_inventory(folder: Path, names: list[str]) -> Path:
    with socket.socket() as s:  # a loopback port nobody listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lines = ["[web]"] + [f"{n} ansible_host=127.0.0.1 ansible_port={port}" for n in names]
    (folder / "hosts.ini").write_text("\n".join(lines) + "\n")
    return folder / "hosts.ini"


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    kp("init", str(root), cwd=tmp_path)
    toml = (root / "kpipe.toml").read_text()
    assert "\ninventories = []" in toml
    (root / "kpipe.toml").write_text(toml.replace("\ninventories = []", '\ninventories = ["hosts.ini"]', 1))
    unreachable_inventory(root, ["web1"])
    return root


# -- one casing ------------------------------------------------------------------------------------------
def test_table_headers_have_one_casing(ws):
    tables = {}
    for args in (("fleet", "list"), ("kernels", "list"), ("rollout", "list"), ("artifacts", "list"), ("builds",),
                 ("recipe", "list")):
        out = kp(*args, cwd=ws).stdout
        # piped, most lists print tab-separated rows under one header line (no boxes: issue 12, item 7)
        first = out.splitlines()[0] if out.strip() else ""
        tables[" ".join(args)] = [first.split("\t")] if "\t" in first else rich_headers(out)
    assert tables["fleet list"] and tables["kernels list"] and tables["recipe list"], tables
    for where, found in tables.items():
        for headers in found:
            assert_one_casing(headers, where)
    # the audit's plain-text table (--output) and its Rich table
    kp("audit", "--format", "table", "--output", "audit.txt", cwd=ws)
    assert_one_casing((ws / "audit.txt").read_text().splitlines()[0].split(), "audit --output")
    for headers in rich_headers(kp("audit", cwd=ws).stdout):
        assert_one_casing(headers, "audit")


# -- plurals -----------------------------------------------------------------------------------------------
def test_counts_take_the_right_plural(ws):
    assert kp("fleet", "list", cwd=ws).stdout.splitlines()[0].strip() == "1 host"
    kp("audit", "--format", "table", "--output", "one.txt", cwd=ws)
    assert re.search(r"^1 host, 0 compliant;", (ws / "one.txt").read_text(), re.M)
    unreachable_inventory(ws, ["web1", "web2"])
    assert kp("fleet", "list", cwd=ws).stdout.splitlines()[0].strip() == "2 hosts"
    r = kp("fleet", "facts", "--strict", cwd=ws, ok=(6,))
    assert "of the 2 hosts" in r.stderr or "of 2 hosts" in r.stderr, r.stderr
    assert "host(s)" not in r.stdout + r.stderr


# -- validate: the table shows what needs attention; ids name the check --------------------------------------
def test_validate_hides_passing_checks_unless_verbose_and_ids_name_the_check(tmp_path):
    from test_elf_support import RELEASE, sample_module

    ko = tmp_path / "m.ko"
    ko.write_bytes(sample_module().read_bytes())
    kp("keys", "generate", "--key", "k.pem", "--cert", "c.pem", cwd=tmp_path)
    kp("sign", "m.ko", "--key", "k.pem", "--cert", "c.pem", cwd=tmp_path)

    quiet = kp("validate", "m.ko", "--kernel", RELEASE, "--cert", "c.pem", cwd=tmp_path, ok=(0, 3)).stdout
    rows = [line for line in quiet.splitlines() if line.startswith("│")]
    assert not any(" info " in line for line in rows), quiet
    assert re.search(r"\d+ checks passed \(--verbose lists them\)", quiet), quiet

    loud = kp("validate", "m.ko", "--kernel", RELEASE, "--cert", "c.pem", "--verbose", cwd=tmp_path, ok=(0, 3)).stdout
    info = {m.group(1) for m in re.finditer(r"│ info\s+│ (\S+)", loud)}
    assert {"sig.verify", "sig.present", "elf.class"} <= info, loud
    # a valid signature is reported by the check that verified it, not under a failure's name
    assert "sig.invalid" not in loud and "sig.missing" not in loud


# -- the HTML report ---------------------------------------------------------------------------------------
class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.summary_rows: list[str] = []
        self._in_summary = False
        self._td = 0

    def handle_starttag(self, tag, attrs):
        if tag == "table" and ("class", "summary") in attrs:
            self._in_summary = True
        if tag == "tr" and self._in_summary:
            self._td = 0

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_summary = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_summary and data.strip():
            self.summary_rows.append(data.strip())


def test_html_report_states_its_scope_and_folds_statuses_nobody_has(ws):
    kp("audit", "--format", "html", "--output", "r.html", "--limit", "web1", cwd=ws)
    page = _Page()
    page.feed((ws / "r.html").read_text())
    text = " ".join(" ".join(page.text).split())
    assert "Scope: hosts matching web1" in text, text
    assert "rollouts: none" in text and "artifacts: none" in text
    # only the statuses somebody has stand in the summary table; the rest are folded
    assert "unreachable" in page.summary_rows and "compliant" not in page.summary_rows, page.summary_rows
    assert re.search(r"\d+ statuses with no host and no verdict", text), text
    assert "1 hosts" not in text and "0 of 1 host compliant" in text


def test_html_scope_names_the_rollouts_and_artifacts_of_the_desired_state():
    desired = A.desired_from_records([R(1, "r-2026-a", "h1", "livepatch-fix", "applied", "art1", "c" * 64, "k"),
                                      R(2, "r-2026-b", "h2", "livepatch-fix", "applied", "art2", "c" * 64, "k")])
    result = A.evaluate(desired, [H("h1", kernel="k", patches={"livepatch_fix": P("livepatch_fix", True, False, {})}),
                                  H("h2", kernel="k", patches={})], generated_at=1)
    page = _Page()
    page.feed(render(result, "html", limit="web:&prod"))
    text = " ".join(" ".join(page.text).split())
    assert "Scope: hosts matching web:&prod" in text, text
    assert "rollouts: r-2026-a, r-2026-b" in text and "artifacts: art1, art2" in text, text


# -- sign keeps the mode -----------------------------------------------------------------------------------
def test_sign_in_place_keeps_the_mode_and_a_new_file_follows_the_umask(tmp_path):
    from test_elf_support import sample_module

    ko = tmp_path / "m.ko"
    ko.write_bytes(sample_module().read_bytes())
    ko.chmod(0o640)
    kp("keys", "generate", "--key", "k.pem", "--cert", "c.pem", cwd=tmp_path)
    kp("sign", "m.ko", "--key", "k.pem", "--cert", "c.pem", cwd=tmp_path)
    assert stat.S_IMODE(ko.stat().st_mode) == 0o640
    kp("sign", "m.ko", "--key", "k.pem", "--cert", "c.pem", "--output", "new.ko", cwd=tmp_path, umask=0o022)
    assert stat.S_IMODE((tmp_path / "new.ko").stat().st_mode) == 0o644
