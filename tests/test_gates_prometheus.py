"""The Prometheus gate against a real Prometheus server (Debian's `prometheus`), on loopback.

The test serves a text exposition with one sample per simulated host (label `host`) on a free loopback
port, starts Prometheus scraping it every second (temp config and storage), and rolls out to SimFleet
hosts with [rollout.prometheus] asking `kpipe_test_errors` by `host`: the rollout passes while every host
is under the threshold and halts (and rolls back) when one host breaks it. Prometheus is stopped by PID.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import kenv
from kpipe.prometheus import PromCheck, query
from kpipe.rollout.gate import GateConfig
from simfleet import simfleet_factory  # noqa: F401  (the session fixture)
from test_gates import run, setup

pytestmark = pytest.mark.timeout(600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Exporter:
    """A text exposition of `kpipe_test_errors{host=...}` from a dict the test changes."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                lines = ["# TYPE kpipe_test_errors gauge"]
                lines += [f'kpipe_test_errors{{host="{h}"}} {v}' for h, v in sorted(exporter.values.items())]
                body = ("\n".join(lines) + "\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    binary = kenv.require_tool("prometheus")
    exporter = Exporter()
    d: Path = tmp_path_factory.mktemp("prometheus")
    (d / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: kpipe-test\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{exporter.port}']\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(d / "prometheus.log", "w") as log:
        proc = subprocess.Popen([binary, f"--config.file={d / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={d / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(url + "/-/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert proc.poll() is None, (d / "prometheus.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "prometheus did not become ready"
                time.sleep(0.3)
            yield url, exporter
        finally:
            proc.terminate()  # by PID: the process this fixture started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            exporter.close()


def scraped(url: str, want: dict[str, float]) -> None:
    """Wait until Prometheus answers `want` for every host (it scrapes every second)."""
    q = url + "/api/v1/query?" + urllib.parse.urlencode({"query": "kpipe_test_errors"})
    deadline = time.monotonic() + 60
    got: dict[str, float] = {}
    while time.monotonic() < deadline:
        with urllib.request.urlopen(q, timeout=5) as r:
            doc = json.load(r)
        got = {s["metric"]["host"]: float(s["value"][1]) for s in doc["data"]["result"]}
        if all(got.get(h) == v for h, v in want.items()):
            return
        time.sleep(0.5)
    raise AssertionError(f"prometheus never showed {want}: {got}")


def test_the_query_reads_one_value_per_host_from_a_real_server(prometheus):
    url, exporter = prometheus
    exporter.values.update({"alpha": 0.25, "beta": 2.0})
    scraped(url, {"alpha": 0.25, "beta": 2.0})
    assert query(PromCheck(url, 'max by (host) (kpipe_test_errors{host=~"alpha|beta"})', 1, host_label="host")) \
        == {"alpha": 0.25, "beta": 2.0}


def test_rollout_passes_under_the_threshold_and_halts_when_one_host_breaks_it(prometheus, simfleet_factory,
                                                                               tmp_path):
    url, exporter = prometheus
    check = PromCheck(url, "max by (host) (kpipe_test_errors)", 0.5, host_label="host")
    good = simfleet_factory(2)
    exporter.values.update({h.name: 0.1 for h in good.hosts})
    scraped(url, {h.name: 0.1 for h in good.hosts})
    ws, journal, rid = setup(good, tmp_path / "good", GateConfig({}, check), soak_s=1.0, verify_interval_s=0.5)
    s = run(ws, journal, rid)
    assert s.state == "completed" and set(s.hosts.values()) == {"applied"}, s

    bad_fleet = simfleet_factory(3)
    bad = bad_fleet.hosts[1]
    values = {h.name: (0.9 if h is bad else 0.1) for h in bad_fleet.hosts}
    exporter.values.update(values)
    scraped(url, values)
    ws, journal, rid = setup(bad_fleet, tmp_path / "bad", GateConfig({}, check))
    s = run(ws, journal, rid)
    assert s.state == "rolled_back" and set(s.hosts.values()) == {"rolled_back"}, s
    assert [h for h, r in s.reasons.items() if "prometheus:" in r] == [bad.name], s.reasons
    assert "is 0.9 for" in s.reasons[bad.name] and "> threshold 0.5" in s.reasons[bad.name]
    assert bad.name in s.halt_reason
