"""The HTML audit report as a browser shows it (issue 12, "How it is checked"): headless Chromium renders
`kpipe audit --format html` of a real audit (SimFleet hosts, a recipe whose `fixes:` names a CVE, one host
patched, one exposed), takes a screenshot and dumps its DOM.

- the screenshot is a real PNG of the window's size whose pixels hold the page: the status colours of the
  stylesheet (the exposed host's red cell, the compliant green) and many colours of text;
- the DOM chromium built holds the scope line (host pattern, rollout, artifact) and the CVE table with its
  CVE column, the CVE and the exposed host.

A report without CVE data says so in a clean sentence (it printed "No recipe declares fixes: ." once).
"""

from __future__ import annotations

import hashlib
import html
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import kenv
from simfleet import simfleet_factory  # noqa: F401  (the session fixture)
from test_cve_fleet import CVE, DEMO_RECIPE, _apply, _journal_applied

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WIDTH, HEIGHT = 1000, 1000
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
RED, GREEN = (0xC6, 0x28, 0x28), (0x2E, 0x7D, 0x32)  # STATUS_COLOUR missing, compliant


@pytest.fixture(scope="module")
def chromium() -> str:
    """A headless Chromium on PATH (.ci/run installs chromium-headless-shell); fails under KPIPE_REQUIRE_REAL=1."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    kenv.require_or_skip(f"no headless Chromium on PATH (tried {', '.join(BROWSERS)})")
    raise AssertionError("unreachable")


def browse(chromium: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # root has no sandbox to drop into; no GPU here; a throwaway profile per call
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--force-device-scale-factor=1", *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def kpipe(ws: Path, *args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "kpipe", "-W", str(ws), *args], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode in ok, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit RGB or RGBA, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, ihdr = 8, b"", b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0], kind
        if kind == b"IHDR":
            ihdr = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", ihdr)
    assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = w * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif f == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif f == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif f == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return w, h, [bytes(r) for r in rows] if bpp == 3 else [bytes(r[i] for i in range(len(r)) if i % 4 != 3)
                                                           for r in rows]


@pytest.fixture(scope="module")
def report(simfleet_factory, tmp_path_factory) -> tuple[Path, str, str, str]:  # noqa: F811
    """An audit page of 2 SimFleet hosts: one patched (fixed), one exposed to the recipe's CVE."""
    from kpipe.workspace import open_workspace

    fleet = simfleet_factory(2)
    tmp = tmp_path_factory.mktemp("shot")
    ws_dir = fleet.write_workspace(tmp / "ws")
    (ws_dir / "recipes").mkdir()
    (ws_dir / "patches").mkdir()
    (ws_dir / "patches" / "fix.patch").write_text("--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n")
    (ws_dir / "recipes" / "demo-fix.yaml").write_text(DEMO_RECIPE)
    ws = open_workspace(str(ws_dir))
    good = tmp / "livepatch-demo.ko"
    good.write_bytes(b"the good module\n")
    sha = hashlib.sha256(good.read_bytes()).hexdigest()
    fixed, exposed = sorted(h.name for h in fleet.hosts)
    _apply(ws, fleet, fixed, good, sha)
    _journal_applied(ws, "r1", [fixed], sha)
    page = tmp / "audit.html"
    kpipe(ws_dir, "audit", "--format", "html", "-o", str(page), "--settle", "0", "--limit", "sim*", ok=(0, 1))
    return page, fixed, exposed, sha


def test_the_screenshot_is_a_real_png_of_the_page(report, chromium, tmp_path):
    page, *_ = report
    shot = tmp_path / "audit.png"
    browse(chromium, f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", page.as_uri())
    w, h, rows = png_pixels(shot.read_bytes())
    assert (w, h) == (WIDTH, HEIGHT)
    colours: dict[tuple[int, ...], int] = {}
    for row in rows[::2]:  # every other row is plenty to count what is on the screen
        for i in range(0, len(row), 3):
            px = tuple(row[i:i + 3])
            colours[px] = colours.get(px, 0) + 1
    assert colours.get(RED, 0) > 200, "no exposed (missing) cell drawn"
    assert colours.get(GREEN, 0) > 200, "no compliant swatch or cell drawn"
    white = colours.get((255, 255, 255), 0)
    assert white < 0.95 * sum(colours.values()), "an almost blank page"
    assert len(colours) > 50, f"only {len(colours)} colours: no text was drawn"

    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    blank_shot = tmp_path / "blank.png"
    browse(chromium, f"--screenshot={blank_shot}", f"--window-size={WIDTH},{HEIGHT}", blank.as_uri())
    assert len(png_pixels(blank_shot.read_bytes())[2]) == HEIGHT  # the same decoder reads a blank page too


def test_the_rendered_dom_holds_the_scope_line_and_the_cve_column(report, chromium):
    page, fixed, exposed, _ = report
    dom = browse(chromium, "--dump-dom", page.as_uri()).stdout
    scope = re.search(r'<div class="meta scope" id="scope">(.*?)</div>', dom, re.S)
    assert scope, dom[:3000]
    text = html.unescape(re.sub(r"<[^>]+>", "", scope.group(1)))
    assert re.fullmatch(r"Scope: hosts matching sim\* · rollout: r1 · artifact: art1", " ".join(text.split())), text
    table = re.search(r'<table class="cves">(.*?)</table>', dom, re.S)
    assert table, dom[:3000]
    header = re.findall(r"<th>(.*?)</th>", table.group(1))
    assert header[0] == "CVE" and "Exposed hosts" in header, header
    cells = [html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td>(.*?)</td>", table.group(1))]
    assert cells[0] == CVE and cells[header.index("Exposed hosts")] == exposed, cells
    assert fixed not in cells[header.index("Exposed hosts")]


def test_a_report_without_cve_data_says_so_in_a_clean_sentence(chromium, tmp_path):
    from kpipe.audit import AuditResult
    from kpipe.cve import CveReport
    from kpipe.report.htmlreport import render_html

    page = tmp_path / "empty.html"
    page.write_text(render_html(AuditResult(generated_at=0.0, hosts=(), cves=CveReport())))
    dom = browse(chromium, "--dump-dom", page.as_uri()).stdout
    cves = dom.split('<h2 id="cves">', 1)[1]
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", "", cves)).split())
    assert not re.search(r":\s*[.,;]", text), text  # no dangling colon before the full stop
    assert re.search(r"No recipe of this workspace lists the CVEs it fixes \(a fixes list\), so there is no CVE "
                     r"to report\.", text), text
