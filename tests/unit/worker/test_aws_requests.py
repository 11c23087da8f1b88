"""The worker's AWS requests, made by its own code on real botocore clients behind a
`Stubber` (tests/aws_stub.py): each request is validated against botocore's service model
and compared with the exact parameters expected, and each answer has the model's shape.

moto serves these operations too (tests/integration: test_evidence_store_s3.py,
service/test_health_endpoints.py, worker/test_bootstrap.py); these tests add what moto does
not check: the exact parameters (S3's conditional put and checksum), and answers moto
never gives.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from botocore.exceptions import ParamValidationError
from pydantic import SecretStr

from audit_worker.config import WorkerSettings
from audit_worker.db.bootstrap import master_url_from_secret
from audit_worker.errors import ConfigurationError
from audit_worker.health import HealthChecks, ServiceStatus
from audit_worker.objectstore import ObjectExists, S3Store
from audit_worker.resilience import CircuitBreaker
from tests.aws_stub import stubbed

SECRET_ARN = "arn:aws:secretsmanager:us-east-1:111122223333:secret:rds!db-1-AbCdEf"


def test_a_write_once_put_is_a_conditional_put_with_a_sha256_checksum() -> None:
    with stubbed("s3") as (client, stub):
        stub.add_response("put_object", {}, {
            "Bucket": "archive", "Key": "log/checkpoints/1", "Body": b"first",
            "ChecksumAlgorithm": "SHA256", "IfNoneMatch": "*"})
        stub.add_client_error("put_object", "PreconditionFailed", http_status_code=412,
                              expected_params={
                                  "Bucket": "archive", "Key": "log/checkpoints/1",
                                  "Body": b"second", "ChecksumAlgorithm": "SHA256",
                                  "IfNoneMatch": "*"})
        store = S3Store("archive", "log", client)
        store.put("checkpoints/1", b"first")
        with pytest.raises(ObjectExists):
            store.put("checkpoints/1", b"second")


def test_a_replacing_put_carries_no_condition() -> None:
    with stubbed("s3") as (client, stub):
        stub.add_response("put_object", {}, {
            "Bucket": "archive", "Key": "checkpoint", "Body": b"v2",
            "ChecksumAlgorithm": "SHA256"})
        S3Store("archive", "", client).put("checkpoint", b"v2", replace=True)


def test_get_and_a_paged_listing_send_what_the_s3_model_defines() -> None:
    import io

    from botocore.response import StreamingBody

    with stubbed("s3") as (client, stub):
        stub.add_response("get_object", {"Body": StreamingBody(io.BytesIO(b"v1"), 2)},
                          {"Bucket": "archive", "Key": "log/c/1"})
        stub.add_client_error("get_object", "NoSuchKey", http_status_code=404,
                              expected_params={"Bucket": "archive", "Key": "log/c/9"})
        stub.add_response("list_objects_v2", {
            "Contents": [{"Key": "log/c/2"}], "IsTruncated": True,
            "NextContinuationToken": "t1"},
            {"Bucket": "archive", "Prefix": "log/c/", "MaxKeys": 1000, "StartAfter": "log/c/1"})
        stub.add_response("list_objects_v2", {"Contents": [{"Key": "log/c/3"}],
                                              "IsTruncated": False},
                          {"Bucket": "archive", "Prefix": "log/c/", "MaxKeys": 1000,
                           "StartAfter": "log/c/1", "ContinuationToken": "t1"})
        store = S3Store("archive", "log", client)
        assert store.get("c/1") == b"v1"
        assert store.get("c/9") is None
        assert store.keys("c/", after="c/1") == ["c/2", "c/3"]


def test_the_s3_model_refuses_a_parameter_it_does_not_define() -> None:
    """The stubbed client is no accept-anything double (the checks above can fail). The
    model checks names, required members, types and nesting; botocore does not check enum
    values, which is why the tests above pin them with expected parameters."""
    with stubbed("s3") as (client, stub):
        stub.add_response("put_object", {})
        with pytest.raises(ParamValidationError, match="IfNoneMatches"):
            client.put_object(Bucket="archive", Key="k", Body=b"", IfNoneMatches="*")
        with pytest.raises(ParamValidationError, match="Bucket"):
            client.put_object(Key="k", Body=b"")
        client.put_object(Bucket="archive", Key="k", Body=b"", IfNoneMatch="*")


def test_the_master_login_is_read_with_get_secret_value() -> None:
    with stubbed("secretsmanager") as (client, stub):
        stub.add_response("get_secret_value", {
            "ARN": SECRET_ARN, "SecretString": json.dumps({"username": "master",
                                                           "password": "p@ss"})},
            {"SecretId": SECRET_ARN})
        url = master_url_from_secret("postgresql://db.internal:5432/audit?sslmode=require",
                                     SECRET_ARN, region="us-east-1", client=client)
    assert url == "postgresql://master:p%40ss@db.internal:5432/audit?sslmode=require"


def test_a_master_secret_access_denied_names_the_permission() -> None:
    with stubbed("secretsmanager") as (client, stub):
        stub.add_client_error("get_secret_value", "AccessDeniedException",
                              expected_params={"SecretId": SECRET_ARN})
        with pytest.raises(ConfigurationError, match="secretsmanager:GetSecretValue"):
            master_url_from_secret("postgresql://db.internal/audit", SECRET_ARN,
                                   region="us-east-1", client=client)


def _health(settings: WorkerSettings, clients: dict[str, Any]) -> HealthChecks:
    breakers: Any = {name: CircuitBreaker(name) for name in ("redis", "postgres", "kms")}
    return HealthChecks(settings, ServiceStatus(), breakers, redis=None,  # type: ignore[arg-type]
                        pool=lambda: None, aws_clients=clients)


async def test_the_external_check_describes_both_keys_and_heads_the_bucket() -> None:
    settings = WorkerSettings(
        database_url=SecretStr("postgresql://u@db/audit"),
        redis_url=SecretStr("redis://r:6379/0"),
        key_backend="kms", kms_data_key_id="alias/audit-data",
        kms_signing_key_id="alias/audit-sth", archive_bucket="audit-archive")
    with stubbed("kms") as (kms, kms_stub), stubbed("s3") as (s3, s3_stub):
        for key, usage in (("alias/audit-data", "ENCRYPT_DECRYPT"),
                           ("alias/audit-sth", "SIGN_VERIFY")):
            kms_stub.add_response("describe_key", {"KeyMetadata": {
                "KeyId": key, "KeyState": "Enabled", "KeyUsage": usage}}, {"KeyId": key})
        s3_stub.add_client_error("head_bucket", "404", http_status_code=404,
                                 expected_params={"Bucket": "audit-archive"})
        result = await _health(settings, {"kms": kms, "s3": s3}).external()
    assert [p.split(":")[0] for p in result.body["problems"]] == ["s3_archive_bucket"]
    assert result.body["details"]["kms_signing_key"] == {
        "key": "alias/audit-sth", "state": "Enabled", "usage": "SIGN_VERIFY", "problem": None}
