"""Two workers appending at once still build one gapless, consistent tree."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from audit_worker.config import WorkerSettings
from audit_worker.localenv.workload import produce
from audit_worker.service import Assembly
from audit_worker.verify import verify_log
from tests.support import drain, running_parts


async def test_two_workers_writing_at_once_build_one_consistent_tree(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    second = settings.model_copy(update={"consumer_name": "w2"})
    async with running_parts(settings) as a, running_parts(second) as b:
        produced = await produce(producer, settings.stream, 4000, chunk=250)

        async def work(parts: Assembly) -> int:
            total = await drain(parts, batch=100, idle_rounds=3)
            await parts.worker.sign_tree_head()
            return total

        counts = await asyncio.gather(work(a), work(b))
        assert sum(counts) == produced.good
        assert min(counts) > 0, f"both workers should have appended, got {counts}"
        async with a.pool.acquire() as conn:
            indices = [r[0] for r in await conn.fetch(
                "SELECT log_index FROM audit.events ORDER BY log_index")]
            report = await verify_log(
                conn, a.worker.signer.public_key_pem(), log_id=settings.log_id
            )
    assert indices == list(range(produced.good))
    assert report.ok, report.findings
    assert report.verified_size == produced.good
    # each worker's final tree head is consistent with the other's view
    assert a.worker.frontier.size <= produced.good and b.worker.frontier.size <= produced.good


async def test_restarted_worker_resumes_from_its_last_tree_head(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    async with running_parts(settings) as first:
        await produce(producer, settings.stream, 300)
        await drain(first)
        await first.worker.sign_tree_head()
        root_before = first.worker.frontier.root()
    async with running_parts(settings) as again:
        assert again.worker.frontier.size == 300
        assert again.worker.frontier.root() == root_before
        await produce(producer, settings.stream, 50)
        assert await drain(again) == 50
        await again.worker.sign_tree_head()
        async with again.pool.acquire() as conn:
            report = await verify_log(
                conn, again.worker.signer.public_key_pem(), log_id=settings.log_id
            )
    assert report.ok and report.verified_size == 350


async def test_a_worker_behind_the_log_signs_the_current_tree_not_its_stale_view(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    second = settings.model_copy(update={"consumer_name": "w2"})
    async with running_parts(settings) as a, running_parts(second) as b:
        await produce(producer, settings.stream, 200)
        await drain(a)
        assert b.worker.frontier.size == 0  # b has not appended anything yet
        head = await b.worker.sign_tree_head()
    assert head is not None and head.tree_size == 200
