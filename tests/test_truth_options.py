"""Rollout options are finite and bounded wherever they come from (issue 8, item 10, beyond the CLI).

The command line checks its own numbers (tests/test_truth_rollout_cli.py); these are the other doors:
a recipe's `rollout:` section, a stored plan read back, and `rollout start --plan ID` given options
that would reshape the reviewed plan (refused, exit 2, rather than silently ignored).
"""

from __future__ import annotations

import math

import pytest

from kpipe import recipes
from kpipe.errors import ConfigError
from kpipe.recipes.schema import parse_duration
from kpipe.rollout.journal import Journal
from kpipe.rollout.planner import RolloutOptions
from kpipe.workspace import load_workspace
from recipe_ws import make_workspace
from simfleet import simfleet_factory  # noqa: F401  (the session fixture)
from test_truth_rollout_cli import kp, no_trace, setup_ws

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field,value", [
    ("soak_s", NAN), ("soak_s", INF), ("soak_s", -1.0), ("soak_s", 8 * 24 * 3600.0),
    ("verify_interval_s", NAN), ("verify_interval_s", 1e-7), ("verify_interval_s", 0.0),
    ("step_timeout_s", NAN), ("step_timeout_s", -1.0), ("step_timeout_s", INF), ("step_timeout_s", 0.0),
    ("forks", 0), ("forks", 10**6),
])
def test_options_refuse_values_no_command_line_would_accept(field, value):
    with pytest.raises(ConfigError) as e:
        RolloutOptions(**{field: value})
    assert "rollout" in e.value.message or "--forks" in e.value.message


def test_a_stored_plan_with_nan_is_refused_when_read_back():
    d = RolloutOptions().to_dict()
    d["soak_s"] = NAN
    with pytest.raises(ConfigError):
        RolloutOptions.from_dict(d)


@pytest.mark.parametrize("text", ["0", "30", "5m", "1h30m", "0.5"])
def test_durations_that_are_durations(text):
    assert math.isfinite(parse_duration(text) or 0)


@pytest.mark.parametrize("value", [NAN, INF, -INF, -1, True, "", "forever", "nan", "inf"])
def test_durations_that_are_not(value):
    assert parse_duration(value) is None


@pytest.mark.parametrize("soak", [".nan", ".inf", "-.inf", "999999999", "200h"])
def test_recipe_soak_that_is_not_a_sane_duration_is_a_lint_error(tmp_path, soak):
    text = ("builder: kpatch-build\nkernels: [5.10.0-amd64-UOS]\npatches: [fix.patch]\n"
            f"rollout:\n  soak: {soak}\n")
    ws = load_workspace(make_workspace(tmp_path, {"r": text}, patches={"fix.patch": ""}))
    errs = [p for p in recipes.lint(ws) if p.severity == "error"]
    assert any(p.file == "recipes/r.yaml" and p.line == 5 and "soak" in p.message for p in errs), errs


@pytest.fixture(scope="module")
def one_host(simfleet_factory):
    return simfleet_factory(1)


@pytest.mark.parametrize("extra", [("--soak", "5"), ("--waves", "1"), ("--max-failures", "1"),
                                   ("--rollback-policy", "all"), ("--persist",), ("--skip-preflight",),
                                   ("--verify-interval", "3"), ("--step-timeout", "30"), ("--no-probe",),
                                   ("--limit", "nothing")])
def test_start_plan_refuses_options_that_would_reshape_it(one_host, tmp_path, extra):
    ws, art = setup_ws(one_host, tmp_path)
    planned = kp(ws, "rollout", "plan", art.id, "--waves", "100%", "--json")
    no_trace(planned)
    r = kp(ws, "rollout", "start", "--plan", "last", "--yes", *extra, ok=(2,))
    assert r.stderr.startswith("kpipe: error: --plan runs a stored plan as it was made"), r.stderr
    assert extra[0] in r.stderr.splitlines()[0]
    no_trace(r)
    assert [r.state for r in Journal(ws.store).list()] == ["planned"]  # nothing ran
    assert not one_host.hosts[0].patches() and not one_host.hosts[0].staged()


# -- `rollback --limit` locks only the hosts it rolls back -----------------------------------------------
def test_rollback_limit_leaves_other_hosts_to_other_rollouts(simfleet_factory, tmp_path):
    import subprocess
    import sys

    from test_truth_rollout import artifact, enabled, kpipe, make_plan, run, workspace

    fleet = simfleet_factory(2)
    a_host, b_host = fleet.hosts
    ws = workspace(fleet, tmp_path)
    art = artifact(ws, fleet, tmp_path, "x")
    _, journal, rid_x = make_plan(ws, fleet, art, fleet.hosts)
    assert run(ws, journal, rid_x).state == "completed"
    # another rollout, driven by a live process, holds b_host
    _, _, rid_y = make_plan(ws, fleet, artifact(ws, fleet, tmp_path, "y"), [b_host])
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        journal.acquire(rid_y, pid=holder.pid, hosts={b_host.name: "livepatch_demo"})
        r = kpipe(ws, "rollout", "rollback", rid_x, "--limit", a_host.name, "--yes")
        assert r.returncode == 0, r.stdout + r.stderr
        assert not enabled(a_host) and enabled(b_host)
        # the whole rollback still needs b_host, and says who holds it
        r = kpipe(ws, "rollout", "rollback", rid_x, "--yes")
        assert r.returncode == 10 and rid_y in r.stderr, r.stdout + r.stderr
        assert enabled(b_host)
    finally:
        holder.kill()
        holder.wait()
