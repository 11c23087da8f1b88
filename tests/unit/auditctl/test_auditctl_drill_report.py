"""Drill plan, RTO, RPO, verdict and the three report renderings (pure, no servers)."""

from __future__ import annotations

import json
import re

import pytest

from auditctl.drill import (
    SWITCHOVER_STEPS,
    Canary,
    ConsistencyResult,
    DrillReport,
    compute_rpo,
    compute_rto,
    make_plan,
    plan_steps,
)
from auditctl.gates import GateResult
from auditctl.report import render_html, render_json, render_markdown, timeline_chart

T0 = 1_800_000_000.0


def test_the_drill_plan_follows_the_issue_order() -> None:
    keys = [s.key for s in plan_steps("drill")]
    assert keys == ["preflight", "declare", "freeze", "catch-up", "promote", "fence",
                    "activate", "switch-endpoint", "handoff", "canary", "consistency", "rpo"]
    failback = [s.key for s in plan_steps("failback")]
    assert failback[0] == "rebuild" and failback[-1] == "restore-replica"
    assert failback[1:-1] == keys


def test_make_plan_attaches_how_each_platform_does_a_step() -> None:
    plan = make_plan("drill", "local", "local", "prod", "dr", {"promote": "pg_promote()"},
                     rto_target_seconds=30)
    promote = next(s for s in plan.steps if s.key == "promote")
    assert promote.how == "pg_promote()" and plan.to_dict()["rto_target_seconds"] == 30


def test_rpo_counts_acknowledged_events_missing_in_the_target() -> None:
    rpo = compute_rpo(["a", "b", "c", "c"], ["a", "c", "z"], handed_off=4,
                      lag_at_t0_seconds=0.2, lag_at_t0_bytes=1024, window_seconds=900)
    assert (rpo.acknowledged, rpo.missing, rpo.missing_sample) == (3, 1, ("b",))
    planned = compute_rpo(["a", "b"], ["a", "b"], handed_off=0, lag_at_t0_seconds=None,
                          lag_at_t0_bytes=None, window_seconds=900)
    assert planned.missing == 0


def test_rto_is_declaration_to_first_verified_canary() -> None:
    assert compute_rto(T0, T0 + 3.5) == 3.5
    assert compute_rto(T0, None) is None


def report(*, rto: float = 4.0, missing: int = 0, verified: bool = True) -> DrillReport:
    plan = make_plan("drill", "local", "local", "prod", "dr", {}, rto_target_seconds=30)
    r = DrillReport("drill", "local", "local", "prod", "dr", plan, T0 - 2)
    r.preflight = [GateResult("replica-lag", "drill", True, "120 ms")]
    r.record("preflight", T0 - 2, T0 - 1, True, "all checks passed", problem=False)
    r.declared_at = T0
    for i, step in enumerate(SWITCHOVER_STEPS[2:], start=0):
        r.record(step.key, T0 + i * 0.3, T0 + i * 0.3 + 0.25, True, step.title)
    r.canaries = [Canary("e1", 10, 12, True, T0 + rto), Canary("e2", 11, 12, True, T0 + rto + 1)]
    r.consistency = ConsistencyResult(9, 12, "aa" * 32, "bb" * 32, verified, "3 proof hashes")
    r.rpo = compute_rpo(["x"] * 1 + [f"e{i}" for i in range(missing)], ["x"], handed_off=2,
                        lag_at_t0_seconds=0.1, lag_at_t0_bytes=512, window_seconds=900)
    r.finished_at = T0 + 6
    return r


def test_a_clean_planned_switchover_passes() -> None:
    r = report()
    assert r.ok and r.verdict() == [] and r.rto_seconds == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [({"rto": 31.0}, "exceeds the target"), ({"missing": 2}, "RPO 2 event"),
     ({"verified": False}, "not proven to extend")],
)
def test_a_drill_fails_on_rto_rpo_or_an_unproven_log(kwargs: dict[str, object],
                                                      reason: str) -> None:
    r = report(**kwargs)  # type: ignore[arg-type]
    assert not r.ok and any(reason in v for v in r.verdict())


def test_a_failed_step_and_a_failed_preflight_are_reported() -> None:
    r = report()
    r.record("promote", T0, T0 + 1, False, "pg_promote timed out")
    r.preflight.append(GateResult("keys", "drill", False, "different key"))
    verdict = r.verdict()
    assert "Promote the replica: pg_promote timed out" in verdict
    assert "pre-flight keys: different key" in verdict


def test_json_report_carries_the_figures_and_relative_times() -> None:
    data = json.loads(render_json(report()))
    assert data["ok"] and data["rto_seconds"] == 4.0 and data["rpo"]["missing"] == 0
    assert data["timeline"][0]["key"] == "preflight" and data["timeline"][0]["t_start"] == -2.0
    assert data["consistency"]["verified"] and data["plan"]["source"] == "prod"


def test_markdown_report_has_the_summary_table_and_timeline() -> None:
    text = render_markdown(report())
    assert text.startswith("# DR failover drill: local (prod → dr)")
    assert "**Result: PASSED**" in text
    assert "| RTO (T0 to first verified canary in dr) | 4.00 s | ≤ 30 s |" in text
    assert "| RPO: events acknowledged by prod, missing in dr | 0 of 1 | ≤ 0 |" in text
    assert text.count("\n| ") > 15 and "## Timeline" in text


def test_html_report_is_self_contained_with_an_svg_timeline() -> None:
    r = report()
    html = render_html(r)
    assert "<svg" in html and "<script" not in html
    assert not re.search(r"""(src|href)=["']https?://""", html)
    assert html.count("<rect") == len(r.timeline)
    assert "RTO 4.00 s" in html and "PASSED" in html


def test_html_escapes_what_it_is_given() -> None:
    r = report()
    r.record("rpo", T0, T0 + 1, False, "<b>bad</b>")
    assert "&lt;b&gt;bad&lt;/b&gt;" in render_html(r)


def test_the_chart_places_t0_rto_and_bars_on_one_axis() -> None:
    r = report()
    chart = timeline_chart(r, width=1000)
    first, last = chart.bars[0], chart.bars[-1]
    assert first.x < chart.t0_x  # pre-flight happens before T0
    assert chart.rto_x is not None and chart.t0_x < chart.rto_x < 1000
    assert all(b.width >= 2 for b in chart.bars) and last.y > first.y
    assert chart.ticks[0].x <= chart.t0_x
