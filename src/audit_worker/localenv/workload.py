"""Synthetic producers for the demo, benchmarks and chaos tests. No real PHI: every
identifier is an obviously fake test value."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis


def synthetic_event(n: int) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "action": "CRUDE"[n % 5],
        "code": "rest-read",
        "outcome": 0,
        "occurred": datetime.now(UTC).isoformat(),
        "agent": {"who": f"clinician-{n % 200}", "role": "physician", "network": "10.0.0.7"},
        "source": {"observer": "ehr-synthetic", "site": "ward-3"},
        "patient": f"MRN-TEST-{n % 5000:06d}",
        "entity": [{"type": "Observation", "id": f"obs-{n}"}],
        "purpose_of_use": ["TREAT"],
        "detail": "synthetic chart access for load testing",
    }


def malformed_event(n: int) -> bytes:
    """One of several realistic kinds of bad input, by turn."""
    kind = n % 4
    if kind == 0:
        return b'{"event_id": "not-a-uuid"'
    event = synthetic_event(n)
    if kind == 1:
        event["action"] = "X"
    elif kind == 2:
        del event["agent"]
    else:
        event["occurred"] = "2026-01-01T00:00:00"  # no timezone
    return json.dumps(event).encode()


@dataclass
class Produced:
    good: int = 0
    malformed: int = 0
    seconds: float = 0.0
    event_ids: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.good + self.malformed


async def produce(
    redis: Redis,
    stream: str,
    count: int,
    *,
    rate: float | None = None,
    malformed_every: int = 0,
    chunk: int = 500,
    keep_ids: bool = False,
) -> Produced:
    """XADD `count` entries, in pipelined chunks, at `rate` per second if given.
    Every `malformed_every`-th entry is malformed (0: none)."""
    out = Produced()
    started = time.perf_counter()
    sent = 0
    while sent < count:
        n = min(chunk if rate is None else max(1, int(rate / 20)), count - sent)
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(sent, sent + n):
                if malformed_every and i % malformed_every == malformed_every - 1:
                    pipe.xadd(stream, {"event": malformed_event(i)})
                    out.malformed += 1
                else:
                    event = synthetic_event(i)
                    if keep_ids:
                        out.event_ids.append(event["event_id"])
                    pipe.xadd(stream, {"event": json.dumps(event).encode()})
                    out.good += 1
            await pipe.execute()
        sent += n
        if rate is not None:
            ahead = sent / rate - (time.perf_counter() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
    out.seconds = time.perf_counter() - started
    return out


def main() -> None:
    """`python -m audit_worker.localenv.workload REDIS_URL COUNT [--rate R]`: a producer
    process, so that benchmarks do not share the worker's event loop."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("redis_url")
    parser.add_argument("count", type=int)
    parser.add_argument("--stream", default="audit:events")
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--malformed-every", type=int, default=0)
    args = parser.parse_args()

    async def go() -> Produced:
        redis = Redis.from_url(args.redis_url)
        try:
            return await produce(
                redis, args.stream, args.count, rate=args.rate,
                malformed_every=args.malformed_every,
            )
        finally:
            await redis.aclose()

    done = asyncio.run(go())
    print(json.dumps({"good": done.good, "malformed": done.malformed, "seconds": done.seconds}))


if __name__ == "__main__":
    main()
