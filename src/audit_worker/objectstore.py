"""Where evidence goes outside the database: the S3 Object Lock archive bucket, or a local
directory for dev and tests.

Objects are written once. On S3 a write-once put is a conditional PUT (``If-None-Match: *``,
refused with 412 when the key exists), and the bucket's Object Lock default retention keeps
every version for the retention period whatever the writer's rights. A directory store
refuses to replace a file the same way and leaves files read-only; it protects nothing
against the machine's owner, which is why only dev and tests use it.

Calls block (boto3): async callers run them in a thread.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from audit_worker.config import WorkerSettings

__all__ = [
    "DirectoryStore",
    "ObjectExists",
    "ObjectStore",
    "ObjectStoreError",
    "S3Store",
    "evidence_store",
    "open_store",
]


class ObjectStoreError(Exception):
    """The store cannot be reached or refused a request; the message says which and why."""


class ObjectExists(ObjectStoreError):
    """A write-once put found the key already written."""


class ObjectStore(Protocol):
    url: str

    def put(self, key: str, data: bytes, *, replace: bool = False) -> None:
        """Write `key`. Without `replace`, raise ObjectExists if it is already there."""
        ...

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is no such key."""
        ...

    def keys(self, prefix: str, *, limit: int = 1000, after: str | None = None) -> list[str]:
        """Keys under `prefix` in ascending order, after `after`, at most `limit`."""
        ...


def _check_key(key: str) -> None:
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts) or "\\" in key or "\x00" in key:
        raise ValueError(f"invalid object key {key!r}")


class DirectoryStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = self.root.as_uri() if self.root.is_absolute() else str(self.root)

    def put(self, key: str, data: bytes, *, replace: bool = False) -> None:
        _check_key(key)
        path = self.root / key
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o444)
                if replace:
                    os.replace(tmp, path)
                else:
                    os.link(tmp, path)  # atomic, and fails if the name exists
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        except FileExistsError:
            raise ObjectExists(f"{self.url}/{key} already exists") from None
        except OSError as exc:
            raise ObjectStoreError(f"cannot write {self.url}/{key}: {exc.strerror}") from None

    def get(self, key: str) -> bytes | None:
        _check_key(key)
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ObjectStoreError(f"cannot read {self.url}/{key}: {exc.strerror}") from None

    def keys(self, prefix: str, *, limit: int = 1000, after: str | None = None) -> list[str]:
        base = self.root
        found: list[str] = []
        if not base.is_dir():
            return found
        for dirpath, _, files in os.walk(base):
            rel = Path(dirpath).relative_to(base)
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                key = (rel / name).as_posix() if str(rel) != "." else name
                if key.startswith(prefix) and (after is None or key > after):
                    found.append(key)
        return sorted(found)[:limit]


class S3Store:
    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        self._client = client

    def _error(self, exc: Exception, action: str, key: str) -> ObjectStoreError:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
        hint = {
            "AccessDenied": "grant the worker's role s3:PutObject/s3:GetObject/s3:ListBucket "
            "on the archive bucket",
            "NoSuchBucket": "create the archive bucket (pulumi up) or fix AUDIT_ARCHIVE_BUCKET",
        }.get(code, "check the bucket and the network path to S3")
        return ObjectStoreError(f"S3 {action} of {self.url}{key} failed ({code}): {hint}")

    def put(self, key: str, data: bytes, *, replace: bool = False) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        _check_key(key)
        extra: dict[str, str] = {} if replace else {"IfNoneMatch": "*"}
        try:
            # Object Lock buckets refuse a PUT without an integrity checksum.
            self._client.put_object(
                Bucket=self.bucket, Key=self.prefix + key, Body=data,
                ChecksumAlgorithm="SHA256", **extra,
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise ObjectExists(f"{self.url}{key} already exists") from None
            raise self._error(exc, "PutObject", key) from None
        except BotoCoreError as exc:
            raise self._error(exc, "PutObject", key) from None

    def get(self, key: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        _check_key(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            return bytes(response["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._error(exc, "GetObject", key) from None
        except BotoCoreError as exc:
            raise self._error(exc, "GetObject", key) from None

    def keys(self, prefix: str, *, limit: int = 1000, after: str | None = None) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        args: dict[str, Any] = {
            "Bucket": self.bucket, "Prefix": self.prefix + prefix, "MaxKeys": min(limit, 1000),
        }
        if after is not None:
            args["StartAfter"] = self.prefix + after
        found: list[str] = []
        try:
            while len(found) < limit:
                page = self._client.list_objects_v2(**args)
                found += [o["Key"][len(self.prefix):] for o in page.get("Contents", [])]
                if not page.get("IsTruncated"):
                    break
                args["ContinuationToken"] = page["NextContinuationToken"]
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "ListObjectsV2", prefix) from None
        return found[:limit]


def open_store(url: str, *, s3_client: Callable[[], Any] | None = None) -> ObjectStore:
    """`s3://bucket/prefix`, `file:///path` or a plain directory path."""
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"{url!r}: an s3:// URL needs a bucket (s3://bucket/prefix)")
        if s3_client is None:
            import boto3

            client = boto3.client("s3")
        else:
            client = s3_client()
        return S3Store(parts.netloc, parts.path, client)
    if parts.scheme == "file":
        return DirectoryStore(Path(parts.path))
    if parts.scheme:
        raise ValueError(f"{url!r}: use s3://bucket/prefix, file:///path or a directory path")
    return DirectoryStore(Path(url))


def evidence_store(settings: WorkerSettings) -> ObjectStore | None:
    """The worker's evidence store (AUDIT_ARCHIVE_URL, else s3://AUDIT_ARCHIVE_BUCKET/)."""
    url = settings.evidence_url
    if url is None:
        return None

    def client() -> Any:
        import boto3
        from botocore.config import Config

        # Bounded: a slow or unreachable S3 delays a witness round, never the worker.
        config = Config(connect_timeout=5, read_timeout=10,
                        retries={"max_attempts": 3, "mode": "standard"})
        return boto3.client(
            "s3", region_name=settings.aws_region, endpoint_url=settings.aws_endpoint_url,
            config=config,
        )

    return open_store(url, s3_client=client)
