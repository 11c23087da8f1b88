"""`auditctl`: blue-green promotion, rollback, DR drills and failback for the audit log.

Every command prints its progress to stderr, a summary at the end, and with ``--output
json`` the result as one JSON document on stdout. Exit codes: 0 healthy or succeeded,
1 unhealthy, failed or refused, 2 usage error, 3 paused waiting for a person.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Coroutine
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from auditctl.environments import Profile, load_profile
from auditctl.errors import AuditctlError
from auditctl.gates import Thresholds

T = TypeVar("T")
PAUSED_EXIT = 3

app = typer.Typer(
    help=__doc__,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)
local_app = typer.Typer(
    help="Start and stop the local environment (ENV `local`) on this machine.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(local_app, name="local")
err = Console(stderr=True, highlight=False)


class Output(StrEnum):
    text = "text"
    json = "json"


EnvArg = Annotated[str, typer.Argument(help="environment: local, dev, staging, prod or dr")]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="text or json")]
StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir", envvar="AUDITCTL_LOCAL_DIR",
        help="local environment's state directory (default: .local/platform of the checkout)",
    ),
]


# --------------------------------------------------------------------------- plumbing


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except AuditctlError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None


def _emit(output: Output, data: Any) -> None:
    if output is Output.json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _profile(env: str) -> Profile:
    try:
        return load_profile(env)
    except AuditctlError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def _platforms(profile: Profile, state_dir: Path | None) -> Any:
    """The platform object for an environment (it implements both interfaces)."""
    if profile.platform == "local":
        from auditctl.platforms import local_state_dir
        from auditctl.platforms.local import LocalPlatform

        return LocalPlatform.open(local_state_dir(profile, state_dir), profile.name)
    from auditctl.platforms.aws import AwsKubernetesPlatform

    return AwsKubernetesPlatform.connect(profile)


class ConsoleProgress:
    """Progress lines on stderr."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def step(self, name: str, detail: str = "") -> None:
        self.console.print(f"[dim]…[/dim] {name}" + (f" [dim]{detail}[/dim]" if detail else ""))

    def done(self, name: str, ok: bool, detail: str = "", seconds: float | None = None) -> None:
        mark = "[green]✔[/green]" if ok else "[red]✘[/red]"
        took = f" [dim]({seconds:.2f}s)[/dim]" if seconds is not None else ""
        self.console.print(f"{mark} {name}{took}" + (f": {detail}" if detail else ""))

    def note(self, message: str) -> None:
        self.console.print(f"[yellow]•[/yellow] {message}")


# --------------------------------------------------------------------------- status


@app.command(epilog="""
**Examples**

```
# one look at the local environment
auditctl status local

# wait up to two minutes for prod to become healthy, for a script
auditctl status prod --watch --timeout 120 --output json
```

Exit 0 only when Healthy; Progressing, Paused and Degraded exit 1. Changes nothing.
""")
def status(
    env: EnvArg,
    output: OutputOpt = Output.text,
    watch: Annotated[bool, typer.Option(help="repeat until Healthy or --timeout")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to --watch")] = 60.0,
    state_dir: StateDirOpt = None,
) -> None:
    """**auditctl status ENV**: slots with their images and readiness, the active slot and
    its epoch, stream lag, dead letters, the log's size and the age of its last signed tree
    head, and the replica's lag."""
    from auditctl.observe import assess, gather

    profile = _profile(env)
    platform = _run(_open(profile, state_dir))
    deadline = time.monotonic() + timeout
    while True:
        view = _run(gather(platform, platform))
        health, _ = assess(view)
        if health == "Healthy" or not watch or time.monotonic() >= deadline:
            break
        time.sleep(2)
    data = view.to_dict()
    data["strategy"] = {"kind": "BlueGreen", "promotion": profile.promotion_mode,
                        "scale_down_delay_seconds": profile.scale_down_delay_seconds}
    if output is Output.json:
        _emit(output, data)
    else:
        _print_status(data)
    if health != "Healthy":
        raise typer.Exit(1)


async def _open(profile: Profile, state_dir: Path | None) -> Any:
    return _platforms(profile, state_dir)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _print_status(data: dict[str, Any]) -> None:
    colour = {"Healthy": "green", "Progressing": "yellow", "Paused": "yellow"}.get(
        data["status"], "red")
    out = Console(highlight=False)
    images = [f"{s['image']} ({','.join(s['roles'])})" for s in data["slots"] if s["roles"]]
    log, stream, replica = data["log"], data["stream"], data["replica"]
    out.print(f"[bold]Name:[/bold]         audit-worker ({data['environment']}, "
              f"{data['platform']})")
    out.print(f"[bold]Status:[/bold]       [{colour}]{data['status']}[/{colour}]")
    for problem in data["problems"]:
        out.print(f"              [{colour}]{problem}[/{colour}]")
    strategy = data["strategy"]
    out.print(f"[bold]Strategy:[/bold]     BlueGreen, {strategy['promotion']}, scale-down delay "
              f"{strategy['scale_down_delay_seconds']:g}s")
    out.print("[bold]Images:[/bold]       " + "\n              ".join(images or ["-"]))
    if data["active_slot"]:
        out.print(f"[bold]Control key:[/bold]  epoch {data['epoch']} names {data['active_slot']}")
    if log["tree_size"] is not None:
        out.print(f"[bold]Log:[/bold]          {log['rows']:,} rows, last signed tree head "
                  f"{log['tree_size']:,} leaves, {_age(log['last_signed_tree_head_age_seconds'])}"
                  f" ago; {log['dead_letters']:,} dead letters")
    if stream:
        lag = "≥" if stream["lag_capped"] else ""
        out.print(f"[bold]Stream:[/bold]       {stream['length']:,} entries, lag {lag}"
                  f"{stream['lag']}, pending {stream['pending']}")
    if replica:
        lag = "-" if replica["lag_bytes"] is None else f"{replica['lag_bytes']:,} bytes"
        secs = replica["lag_seconds"]
        out.print(f"[bold]Replica:[/bold]      {replica['primary_site']} -> "
                  f"{replica['replica_site']}: {replica['state']}, lag {lag}"
                  + (f" ({secs * 1000:.1f} ms)" if secs is not None else ""))
    if data["endpoint_site"]:
        out.print(f"[bold]Endpoint:[/bold]     intake and database -> {data['endpoint_site']} "
                  f"(primary database: {data['primary_site']})")
    if data["promotion"]:
        p = data["promotion"]
        out.print(f"[bold]Promotion:[/bold]    {p['image']} {p['from_slot']} -> {p['to_slot']}: "
                  f"{p['phase']} ({p['aftermath']})")
    table = Table("NAME", "KIND", "STATUS", "AGE", "INFO", box=None, pad_edge=False)
    table.add_row("⟳ audit-worker", "Rollout", data["status"], "", "")
    for i, s in enumerate(data["slots"]):
        branch = "└──" if i == len(data["slots"]) - 1 else "├──"
        if not s["running"]:
            state = "• ScaledDown"
        elif s["ready"]:
            state = "[green]✔ Ready[/green]"
        else:
            state = "[red]✘ NotReady[/red]"
        info = " ".join(filter(None, [",".join(s["roles"]), s["image"],
                                      f"{s['state']} epoch {s['epoch']}" if s["running"] else ""]))
        table.add_row(f"{branch}□ {s['slot']}", "Slot", state, _age(s["age_seconds"]), info)
    out.print()
    out.print(table)


# --------------------------------------------------------------------------- promote


def _thresholds(readiness_timeout: float, smoke_events: int, max_error_rate: float,
                max_latency: float, max_dead_letter_growth: int) -> Thresholds:
    return Thresholds(
        readiness_timeout_seconds=readiness_timeout, smoke_events=smoke_events,
        max_error_rate=max_error_rate, max_latency_p99_seconds=max_latency,
        max_dead_letter_growth=max_dead_letter_growth,
    )


@app.command(epilog="""
**Examples**

```
# release 0.2.0 to the local environment (automatic promotion there)
auditctl promote local --image 0.2.0

# prod stops before the switch; a person confirms after looking at the gates
auditctl promote prod --image 1.4.0
auditctl promote prod --yes

# return once the switch is done; the old slot stays up for the scale-down delay
auditctl promote staging --image 1.4.0 --detach
```

**What it leaves behind.** Completed: the new image is the active slot (a new control-key
epoch), the old slot scaled down after the delay. A failed gate before the switch: the
active slot untouched (same slot, same epoch), the preview slot scaled down. A failed
gate after the switch: the previous slot active again (a new epoch), the new one scaled
down. Paused (manual environments): the new image runs in the preview slot, passed the
gates, and waits for `--yes` or `auditctl rollback`. Exit 0 completed, 1 aborted or rolled
back, 3 paused.
""")
def promote(
    env: EnvArg,
    image: Annotated[str | None, typer.Option(help="image tag to release")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y",
                                      help="switch without stopping for a person")] = False,
    detach: Annotated[bool, typer.Option(help="return after the switch; do not wait out "
                                              "the scale-down delay")] = False,
    scale_down_delay: Annotated[float | None, typer.Option(
        help="seconds the old slot is kept for rollback (default: the environment's)")] = None,
    readiness_timeout: Annotated[float, typer.Option(help="readiness deadline, s")] = 60.0,
    smoke_events: Annotated[int, typer.Option(help="smoke events per gate")] = 3,
    max_error_rate: Annotated[float, typer.Option(help="dead-lettered/received")] = 0.01,
    max_latency: Annotated[float, typer.Option(help="p99 event latency, s")] = 2.0,
    max_dead_letter_growth: Annotated[int, typer.Option(help="new dead letters allowed")] = 0,
    output: OutputOpt = Output.text,
    state_dir: StateDirOpt = None,
) -> None:
    """**auditctl promote ENV --image TAG**: the blue-green release. Expand-only migrations,
    the new image in the idle slot, readiness, the gates (smoke events proven in the log,
    dead letters, error rate and latency from /metrics, a consistency proof across the
    switch), the switch, and the old slot kept for the scale-down delay."""
    from auditctl.release import PromoteOptions
    from auditctl.release import promote as run_promote

    profile = _profile(env)
    platform = _run(_open(profile, state_dir))
    options = PromoteOptions(
        image=image, yes=yes, detach=detach, scale_down_delay_seconds=scale_down_delay,
        thresholds=_thresholds(readiness_timeout, smoke_events, max_error_rate, max_latency,
                               max_dead_letter_growth),
    )
    record = _run(run_promote(
        platform, options, environment=profile.name, auto_promote=profile.auto_promote,
        scale_down_delay_seconds=profile.scale_down_delay_seconds,
        progress=ConsoleProgress(err),
    ))
    if output is Output.json:
        _emit(output, record.to_dict())
    else:
        _print_promotion(record)
    if record.phase.value == "paused":
        raise typer.Exit(PAUSED_EXIT)
    if record.phase.value in ("aborted", "rolled-back"):
        raise typer.Exit(1)


def _print_promotion(record: Any) -> None:
    table = Table("stage", "gate", "result", "detail", title="gates", title_justify="left")
    for gate in record.gates:
        table.add_row(gate.stage, gate.name, "[green]pass[/green]" if gate.passed
                      else "[red]FAIL[/red]", gate.detail)
    err.print(table)
    colour = "green" if record.phase.value in ("completed", "scale-down-delay") else (
        "yellow" if record.phase.value == "paused" else "red")
    err.print(f"[bold]{record.image}[/bold] {record.from_slot} -> {record.to_slot}: "
              f"[{colour}]{record.phase.value}[/{colour}]"
              + (f" ({record.reason})" if record.reason else ""))
    if record.switch_seconds is not None:
        err.print(f"switch: {record.switch_seconds * 1000:.0f} ms until both slots "
                  f"acknowledged epoch {record.epoch_after}")
    err.print(f"now: {record.aftermath().summary}")


# --------------------------------------------------------------------------- rollback


ROLLBACK_EPILOG = """
**Examples**

```
# switch back while the old slot is still up (within the scale-down delay)
auditctl rollback local

# abort a promotion paused before its switch (same command, Argo's vocabulary)
auditctl abort prod
```

**What it leaves behind.** Before the switch: the active slot untouched, the preview
slot scaled down, the promotion marked aborted. After the switch: the previous slot active
again under a new control-key epoch, the new slot scaled down, the promotion marked
rolled-back. After the delay there is no instant rollback: promote the previous image.
"""


def _rollback(env: str, output: Output, state_dir: Path | None) -> None:
    from auditctl.release import rollback as run_rollback

    profile = _profile(env)
    platform = _run(_open(profile, state_dir))
    record = _run(run_rollback(platform, environment=profile.name,
                               progress=ConsoleProgress(err)))
    if output is Output.json:
        _emit(output, record.to_dict())
    else:
        err.print(f"{record.image}: [yellow]{record.phase.value}[/yellow]; "
                  f"{record.aftermath().summary}")
        if record.rollback_seconds is not None:
            err.print(f"switch back: {record.rollback_seconds * 1000:.0f} ms")


@app.command(epilog=ROLLBACK_EPILOG)
def rollback(env: EnvArg, output: OutputOpt = Output.text, state_dir: StateDirOpt = None) -> None:
    """**auditctl rollback ENV**: switch back to the previous slot within the scale-down
    window, or abort a promotion that has not switched yet."""
    _rollback(env, output, state_dir)


@app.command(epilog=ROLLBACK_EPILOG)
def abort(env: EnvArg, output: OutputOpt = Output.text, state_dir: StateDirOpt = None) -> None:
    """**auditctl abort ENV**: the same as `rollback`."""
    _rollback(env, output, state_dir)


# --------------------------------------------------------------------------- drill


@app.command(epilog="""
**Examples**

```
# what would happen, and the pre-flight checks now (writes one heartbeat row)
auditctl drill local --plan

# run it: planned switchover to the replica's site, report under reports/
auditctl drill local --execute

# the same, with a stricter recovery-time target
auditctl drill dr --execute --rto-target 20
```

**What it leaves behind.** The replica's site is the primary: its database promoted, its
active slot consuming its intake, the intake and database records naming it; the old
primary's database stopped (fenced), its workers scaled down, its intake backlog handed
off. A report in Markdown, JSON and HTML under `reports/`. `auditctl failback ENV`
returns. With `--plan`: nothing but a heartbeat row.
""")
def drill(
    env: EnvArg,
    plan: Annotated[bool, typer.Option("--plan", help="show the plan and run pre-flight")] = False,
    execute: Annotated[bool, typer.Option("--execute", help="run the drill")] = False,
    rto_target: Annotated[float, typer.Option(help="recovery time objective, s")] = 30.0,
    rpo_window: Annotated[float, typer.Option(
        help="seconds before T0 whose events count for RPO")] = 900.0,
    reports_dir: Annotated[Path | None, typer.Option(help="default: reports/ of the checkout")
                           ] = None,
    output: OutputOpt = Output.text,
    state_dir: StateDirOpt = None,
) -> None:
    """**auditctl drill ENV --plan | --execute**: a DR failover drill. Pre-flight (replica
    lag by heartbeat, DR capacity, keys), freeze the primary's consumers, catch up, promote
    the replica, activate DR workers, switch DNS, canaries, a consistency proof that DR's
    log extends prod's last signed tree head; RTO and RPO in a report."""
    from auditctl.failover import DrillOptions, preflight_only
    from auditctl.failover import drill as run_drill

    if plan == execute:
        err.print("[red]error:[/red] pass exactly one of --plan and --execute")
        raise typer.Exit(2)
    profile = _profile(env)
    platform = _run(_open(profile, state_dir))
    options = DrillOptions(
        reports_dir=reports_dir or profile.root / "reports", rto_target_seconds=rto_target,
        rpo_window_seconds=rpo_window,
    )
    progress = ConsoleProgress(err)
    if plan:
        drill_plan, checks = _run(preflight_only(platform, options, progress))
        if output is Output.json:
            _emit(output, {"plan": drill_plan.to_dict(),
                           "preflight": [c.to_dict() for c in checks]})
        else:
            table = Table("#", "step", "what", "how here", title=f"DR drill plan: "
                          f"{drill_plan.source} -> {drill_plan.target}", title_justify="left")
            for i, step in enumerate(drill_plan.steps, 1):
                table.add_row(str(i), step.title, step.what, step.how)
            err.print(table)
        if not all(c.passed for c in checks):
            raise typer.Exit(1)
        return
    report = _run(run_drill(platform, options, progress))
    _report_summary(report, options.report_paths, output)


@app.command(epilog="""
**Examples**

```
# after a drill: back to prod, with the same report
auditctl failback local
```

**What it leaves behind.** The home site (prod) is the primary again, its active slot
consuming, the records naming it; the other site's database rebuilt with pg_rewind as its
streaming replica: the environment as it was before the drill. A report under `reports/`.
""")
def failback(
    env: EnvArg,
    rto_target: Annotated[float, typer.Option(help="recovery time objective, s")] = 30.0,
    reports_dir: Annotated[Path | None, typer.Option(help="default: reports/ of the checkout")
                           ] = None,
    output: OutputOpt = Output.text,
    state_dir: StateDirOpt = None,
) -> None:
    """**auditctl failback ENV**: the reverse path of a drill. Rebuild the old primary as a
    replica of the current one (pg_rewind), switch back to it in a planned switchover, then
    rebuild the other site as the replica."""
    from auditctl.failover import DrillOptions
    from auditctl.failover import failback as run_failback

    profile = _profile(env)
    platform = _run(_open(profile, state_dir))
    options = DrillOptions(reports_dir=reports_dir or profile.root / "reports",
                           rto_target_seconds=rto_target)
    report = _run(run_failback(platform, options, ConsoleProgress(err)))
    _report_summary(report, options.report_paths, output)


def _report_summary(report: Any, paths: dict[str, Path], output: Output) -> None:
    if output is Output.json:
        data = report.to_dict()
        data["reports"] = {k: str(v) for k, v in paths.items()}
        _emit(output, data)
    else:
        rto, rpo = report.rto_seconds, report.rpo
        colour = "green" if report.ok else "red"
        err.print(f"[bold]{report.kind} {report.source} -> {report.target}:[/bold] "
                  f"[{colour}]{'PASSED' if report.ok else 'FAILED'}[/{colour}]")
        err.print("RTO: " + ("not measured" if rto is None else
                             f"{rto:.2f} s (target {report.plan.rto_target_seconds:g} s)"))
        if rpo is not None:
            lag = "n/a" if rpo.lag_at_t0_seconds is None else f"{rpo.lag_at_t0_seconds:.3f} s"
            err.print(f"RPO: {rpo.missing} event(s) missing of {rpo.acknowledged} acknowledged; "
                      f"replication lag at T0 {lag}")
        for problem in report.verdict():
            err.print(f"[red]•[/red] {problem}")
        for line in report.leaves_behind:
            err.print(f"[dim]→ {line}[/dim]")
        for kind, path in paths.items():
            err.print(f"report ({kind}): {path}")
    if not report.ok:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- local


@local_app.command("up", epilog="""
**Examples**

```
# the ports of environments/local.yaml, durable commits
auditctl local up

# free ports and fsync off (tests, a quick look)
auditctl local up --free-ports --fast
```

**What it leaves behind.** Running processes: PostgreSQL (prod, primary) with a streaming
replica (dr), a Redis per site, prod's blue slot running IMAGE; state in
`.local/platform/state.json`. Stop them with `auditctl local down`.
""")
def local_up(
    image: Annotated[str, typer.Option(help="image tag of the first release")] = "0.1.0",
    fast: Annotated[bool, typer.Option(help="fsync and synchronous_commit off")] = False,
    free_ports: Annotated[bool, typer.Option(help="pick free ports, not local.yaml's")] = False,
    output: OutputOpt = Output.text,
    state_dir: StateDirOpt = None,
) -> None:
    """**auditctl local up**: start the local environment (`auditctl ... local`)."""
    from audit_worker.localenv.platform import LocalPorts, LocalStack
    from auditctl.platforms import local_state_dir

    profile = _profile("local")
    directory = local_state_dir(profile, state_dir)
    ports = None
    if not free_ports and profile.local_ports is not None:
        ports = LocalPorts.from_settings(*profile.local_ports)
    with err.status("starting PostgreSQL (primary and streaming replica), Redis, a worker"):
        try:
            stack = LocalStack.up(directory, ports=ports, fast=fast, image=image)
        except (FileExistsError, RuntimeError) as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
        ready = _run(_wait_ready(stack.worker_url("prod", "blue"), 60))
    state = json.loads(stack.state.to_json())
    if output is Output.json:
        _emit(output, state)
    else:
        err.print(f"local environment up in {directory} (blue slot "
                  f"{'ready' if ready else 'NOT ready'})")
        for name, site in stack.state.sites.items():
            err.print(f"  {name}: postgres {site.pg_port}, redis {site.redis_port}, workers "
                      + ", ".join(f"{w.slot} :{w.port}" for w in site.workers.values()))
    if not ready:
        raise typer.Exit(1)


async def _wait_ready(url: str, timeout: float) -> bool:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(url + "/readyz")).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    return False


@local_app.command("down", epilog="""
**Examples**

```
# stop everything, keep the data for the next `local up`'s inspection
auditctl local down

# stop and delete the data directories
auditctl local down --purge
```
""")
def local_down(
    purge: Annotated[bool, typer.Option(help="also delete the data")] = False,
    state_dir: StateDirOpt = None,
) -> None:
    """**auditctl local down**: stop every process of the local environment."""
    from audit_worker.localenv.platform import LocalStack
    from auditctl.platforms import local_state_dir

    directory = local_state_dir(_profile("local"), state_dir)
    try:
        stack = LocalStack(directory)
    except FileNotFoundError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    stack.down(purge=purge)
    err.print(f"local environment in {directory} stopped" + (" and deleted" if purge else ""))


if __name__ == "__main__":
    app()
