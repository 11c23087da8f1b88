"""The RDS IAM token provider: one fresh token per new connection, exactly what botocore signs.

A local PostgreSQL checks passwords, not SigV4, so acceptance by RDS cannot be proved
here; what is proved is that the token is botocore's own presigned ``rds-db:connect``
request for this host, port, login and region, valid 900 s.
(That asyncpg calls it at every new connection is asyncpg 0.32's documented behaviour for
a callable ``password``; an integration test of it is still to be written.)
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import boto3
import pytest

from audit_worker.db.credentials import TOKEN_LIFETIME_SECONDS, IamTokenProvider, connect_password
from audit_worker.errors import ConfigurationError

URL = "postgresql://audit_worker@db.example.internal:5432/audit?sslmode=verify-full"


def _client() -> object:
    session = boto3.session.Session(aws_access_key_id="AKIDEXAMPLE",
                                    aws_secret_access_key="secret-example",
                                    region_name="eu-west-1")
    return session.client("rds")


def test_the_token_is_a_presigned_rds_db_connect_request_for_the_login() -> None:
    provider = connect_password(URL, "iam", region="eu-west-1", client=_client())
    assert isinstance(provider, IamTokenProvider)
    token = provider.token()
    parts = urlsplit("https://" + token)
    query = parse_qs(parts.query)
    assert (parts.hostname, parts.port) == ("db.example.internal", 5432)
    assert query["Action"] == ["connect"] and query["DBUser"] == ["audit_worker"]
    assert query["X-Amz-Expires"] == [str(TOKEN_LIFETIME_SECONDS)]
    credential = query["X-Amz-Credential"][0].split("/")
    assert credential[2:4] == ["eu-west-1", "rds-db"]
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]


@pytest.mark.parametrize(("url", "field"), [
    ("postgresql://audit_worker:pw@h:5432/audit?sslmode=verify-full", "has a password"),
    ("postgresql://audit_worker@h:5432/audit", "needs TLS"),
    ("postgresql://audit_worker@h:5432/audit?sslmode=prefer", "needs TLS"),
    ("postgresql://h:5432/audit?sslmode=verify-full", "needs a login"),
])
def test_iam_urls_that_rds_would_refuse_are_refused_first(url: str, field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        connect_password(url, "iam", region="eu-west-1", client=_client())


def test_password_mode_keeps_the_urls_password() -> None:
    assert connect_password("postgresql://u:p@h/db", "password", region="eu-west-1") is None
