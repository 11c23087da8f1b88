"""The evidence store on S3 (moto's server): write-once puts, Object Lock retention that
even the writer cannot shorten, listing newest-first witness names."""

from __future__ import annotations

from typing import Any

import boto3
import pytest

from audit_worker.objectstore import ObjectExists, ObjectStoreError, S3Store
from tests.support import locked_bucket


@pytest.fixture
def bucket(aws_kwargs: dict[str, str]) -> tuple[Any, str]:
    client = boto3.client("s3", **aws_kwargs)
    return client, locked_bucket(client)


def test_put_once_refuses_an_existing_key_with_a_conditional_put(
    bucket: tuple[Any, str],
) -> None:
    client, bucket = bucket
    store = S3Store(bucket, "log", client)
    store.put("checkpoints/1", b"first")
    with pytest.raises(ObjectExists):
        store.put("checkpoints/1", b"second")
    assert store.get("checkpoints/1") == b"first"


def test_replaced_object_keeps_its_old_version_under_compliance_retention(
    bucket: tuple[Any, str],
) -> None:
    client, bucket = bucket
    store = S3Store(bucket, "log", client)
    store.put("checkpoint", b"v1")
    store.put("checkpoint", b"v2", replace=True)
    versions = client.list_object_versions(Bucket=bucket, Prefix="log/checkpoint")["Versions"]
    assert len(versions) == 2
    old = next(v for v in versions if not v["IsLatest"])
    with pytest.raises(client.exceptions.ClientError, match="AccessDenied"):
        client.delete_object(Bucket=bucket, Key="log/checkpoint", VersionId=old["VersionId"])
    assert store.get("checkpoint") == b"v2"


def test_keys_lists_under_the_prefix_in_order(bucket: tuple[Any, str]) -> None:
    client, bucket = bucket
    store = S3Store(bucket, "log/", client)
    for name in ("c/3", "c/1", "d/1", "c/2"):
        store.put(name, b"")
    assert store.keys("c/") == ["c/1", "c/2", "c/3"]
    assert store.keys("c/", limit=1) == ["c/1"]
    assert store.keys("c/", after="c/1") == ["c/2", "c/3"]
    assert store.get("c/9") is None


def test_missing_bucket_error_says_what_to_do(aws_kwargs: dict[str, str]) -> None:
    store = S3Store("no-such-bucket-here", "", boto3.client("s3", **aws_kwargs))
    with pytest.raises(ObjectStoreError, match=r"NoSuchBucket.*create the archive bucket"):
        store.put("x", b"")
