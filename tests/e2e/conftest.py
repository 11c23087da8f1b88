"""The local platform for end-to-end tests: real PostgreSQL (primary and streaming replica),
a Redis per site and worker processes, started once per test module.

The state directory is a fresh temp dir traversable by the unprivileged account PostgreSQL
runs as (pytest's tmp_path is not); everything is stopped and deleted afterwards.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from audit_worker.localenv.platform import LocalStack
from auditctl.platforms.local import LocalPlatform
from tests.e2e.support import wait_ready_sync


@pytest.fixture(scope="module")
def local_stack() -> Iterator[LocalStack]:
    root = Path(tempfile.mkdtemp(prefix="auditctl-e2e-"))
    root.chmod(0o755)
    stack = LocalStack.up(root / "platform", fast=True, image="0.1.0")
    try:
        wait_ready_sync(stack.worker_url("prod", "blue"))
        yield stack
    finally:
        stack.down()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def platform(local_stack: LocalStack) -> LocalPlatform:
    return LocalPlatform(local_stack)
