"""Drill and failback reports: Markdown, JSON and a self-contained HTML page whose
timeline chart is an inline SVG (no script, nothing loaded from elsewhere).

`render_markdown`, `render_json`, `render_html` and `timeline_chart` are pure;
`write_reports` writes the three files next to each other under ``reports/``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from auditctl.drill import DrillReport

CHART_WIDTH = 960
LABEL_WIDTH = 250
ROW_HEIGHT = 26
CHART_TOP = 30


def _fmt_seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def _when(at: float | None) -> str:
    if at is None:
        return "n/a"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) + f".{int(at * 1000) % 1000:03d}"


def render_json(report: DrillReport) -> str:
    return json.dumps(report.to_dict(), indent=2, sort_keys=False, default=str) + "\n"


def render_markdown(report: DrillReport) -> str:
    data = report.to_dict()
    rpo = report.rpo
    title = "DR failover drill" if report.kind == "drill" else "DR failback"
    lines = [
        f"# {title}: {report.environment} ({report.source} → {report.target})",
        "",
        f"**Result: {'PASSED' if report.ok else 'FAILED'}**  ",
        f"Platform: {report.platform}; planned switchover; declared (T0) at "
        f"{_when(report.declared_at)}.",
        "",
        "| figure | measured | target |",
        "| --- | --- | --- |",
        f"| RTO (T0 to first verified canary in {report.target}) | "
        f"{_fmt_seconds(report.rto_seconds)} | ≤ {report.plan.rto_target_seconds:g} s |",
    ]
    if rpo is not None:
        lines += [
            f"| RPO: events acknowledged by {report.source}, missing in {report.target} | "
            f"{rpo.missing} of {rpo.acknowledged} | ≤ {report.plan.rpo_target_events} |",
            f"| replication lag at T0 (heartbeat) | {_fmt_seconds(rpo.lag_at_t0_seconds)} | |",
            f"| replication lag at T0 (WAL) | "
            f"{'n/a' if rpo.lag_at_t0_bytes is None else f'{rpo.lag_at_t0_bytes:,} bytes'} | |",
            f"| intake backlog handed off | {rpo.handed_off} entries | |",
        ]
    for name, value in report.figures.items():
        lines.append(f"| {name.replace('_', ' ')} | {value} | |")
    if report.consistency is not None:
        c = report.consistency
        lines += [
            "",
            "## Consistency proof",
            "",
            f"{'Verified' if c.verified else 'NOT verified'}: the tree of {c.new_size} leaves "
            f"in {report.target} (root `{c.new_root[:16]}…`) extends {report.source}'s last "
            f"signed tree head of {c.old_size} leaves (root `{c.old_root[:16]}…`). {c.detail}",
        ]
    if report.canaries:
        lines += ["", "## Canaries", "", "| event id | log index | tree size | verified |",
                  "| --- | --- | --- | --- |"]
        for canary in report.canaries:
            lines.append(
                f"| `{canary.event_id}` | {canary.log_index} | {canary.tree_size} | "
                f"{'yes, at T0+' + format(report.relative(canary.verified_at), '.2f') + ' s' if canary.verified and canary.verified_at else 'no'} |"  # noqa: E501
            )
    lines += ["", "## Pre-flight", "", "| check | result | detail |", "| --- | --- | --- |"]
    for gate in report.preflight:
        lines.append(f"| {gate.name} | {'ok' if gate.passed else 'FAILED'} | {gate.detail} |")
    lines += ["", "## Timeline", "", "| step | from T0 | to T0 | seconds | result | detail |",
              "| --- | --- | --- | --- | --- | --- |"]
    for entry in data["timeline"]:
        lines.append(
            f"| {entry['title']} | {entry['t_start']:+.2f} | {entry['t_end']:+.2f} | "
            f"{entry['seconds']:.2f} | {'ok' if entry['ok'] else 'FAILED'} | {entry['detail']} |"
        )
    verdict = report.verdict()
    if verdict:
        lines += ["", "## Problems", ""] + [f"- {v}" for v in verdict]
    if report.leaves_behind:
        lines += ["", "## What this leaves behind", ""] + [f"- {v}" for v in report.leaves_behind]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Bar:
    y: float
    x: float
    width: float
    label: str
    seconds: str
    ok: bool


@dataclass(frozen=True)
class Tick:
    x: float
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bars: tuple[Bar, ...]
    ticks: tuple[Tick, ...]
    t0_x: float
    rto_x: float | None
    rto_label: str
    plot_left: int
    plot_bottom: float


def _tick_step(span: float) -> float:
    raw = span / 8
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for factor in (1, 2, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def timeline_chart(report: DrillReport, width: int = CHART_WIDTH) -> Chart:
    """Bars per step on a seconds-from-T0 axis, with T0 and the RTO point marked."""
    rows = report.timeline
    starts = [report.relative(e.started_at) for e in rows] or [0.0]
    ends = [report.relative(e.ended_at) for e in rows] or [1.0]
    rto = report.rto_seconds
    lo = min(0.0, *starts)
    hi = max(1.0, *ends, rto or 0.0)
    span = hi - lo
    plot = width - LABEL_WIDTH - 20

    def x(t: float) -> float:
        return round(LABEL_WIDTH + (t - lo) / span * plot, 1)

    bars = tuple(
        Bar(CHART_TOP + i * ROW_HEIGHT, x(s), round(max(2.0, x(e) - x(s)), 1), row.title,
            f"{row.seconds:.2f} s", row.ok)
        for i, (row, s, e) in enumerate(zip(rows, starts, ends, strict=True))
    )
    step = _tick_step(span)
    first = math.ceil(lo / step) * step
    count = int((hi - first) / step) + 1
    ticks = tuple(Tick(x(first + i * step), f"{first + i * step:g}s") for i in range(count))
    bottom = CHART_TOP + len(rows) * ROW_HEIGHT
    return Chart(
        width, int(bottom + 40), bars, ticks, x(0.0), None if rto is None else x(rto),
        "" if rto is None else f"RTO {rto:.2f} s", LABEL_WIDTH, bottom,
    )


def render_html(report: DrillReport) -> str:
    env = Environment(
        loader=PackageLoader("auditctl", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    template = env.get_template("report.html.j2")
    return template.render(
        report=report, data=report.to_dict(), chart=timeline_chart(report),
        when=_when, seconds=_fmt_seconds,
    )


def write_reports(report: DrillReport, directory: Path) -> dict[str, Path]:
    """Write ``<kind>-<environment>-<time>.{md,json,html}``; return the paths by format."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(report.started_at))
    base = directory / f"{report.kind}-{report.environment}-{stamp}"
    paths = {
        "markdown": base.with_suffix(".md"),
        "json": base.with_suffix(".json"),
        "html": base.with_suffix(".html"),
    }
    paths["markdown"].write_text(render_markdown(report), encoding="utf-8")
    paths["json"].write_text(render_json(report), encoding="utf-8")
    paths["html"].write_text(render_html(report), encoding="utf-8")
    return paths
