"""How a database connection authenticates: the URL's password, or an RDS IAM token.

With ``database_auth = iam`` (the default of the AWS stacks) the URL names the login but
carries no password. Every new connection asks `IamTokenProvider` for a token: a presigned
``rds-db:connect`` request that botocore signs locally with SigV4 from the process's AWS
credentials (on EKS, the IRSA role), valid for 15 minutes. asyncpg calls a callable
``password`` once per new connection (and awaits it when it returns an awaitable), so a
pool that opens a connection an hour after start-up still sends a fresh token; an open
connection is not affected when its token expires (RDS checks the token at login only).

AWS refuses IAM authentication without TLS ("IAM database authentication requires an
SSL connection", https://docs.aws.amazon.com/AmazonRDS/latest/UserGuide/UsingWithRDS.IAMDBAuth.html),
so an IAM URL without ``sslmode=require`` or stronger is refused here, before any attempt.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from audit_worker.errors import ConfigurationError

if TYPE_CHECKING:
    from audit_worker.config import WorkerSettings

__all__ = [
    "TOKEN_LIFETIME_SECONDS",
    "DatabaseAuth",
    "IamTokenProvider",
    "connect_password",
    "iam_provider_for_url",
    "settings_password",
]

DatabaseAuth = Literal["password", "iam"]
TOKEN_LIFETIME_SECONDS = 900
"""What botocore's ``generate_db_auth_token`` signs (``X-Amz-Expires=900``)."""
_TLS_MODES = frozenset({"require", "verify-ca", "verify-full"})


class IamTokenProvider:
    """A fresh RDS IAM authentication token each time it is called (asyncpg ``password``)."""

    def __init__(self, *, host: str, port: int, user: str, region: str,
                 client: Any | None = None) -> None:
        self.host, self.port, self.user, self.region = host, port, user, region
        self._client = client
        self.issued = 0
        """Tokens made so far: one per new connection."""

    def _rds(self) -> Any:
        if self._client is None:
            import boto3  # only the IAM mode needs it, and it is slow to import

            # One client for the process: it caches the credentials and refreshes them
            # (IRSA web identity) before they expire.
            self._client = boto3.session.Session().client("rds", region_name=self.region)
        return self._client

    def token(self) -> str:
        """Sign a token. Local SigV4, except when the credentials themselves need a refresh."""
        from botocore.exceptions import BotoCoreError

        try:
            token: str = self._rds().generate_db_auth_token(
                DBHostname=self.host, Port=self.port, DBUsername=self.user, Region=self.region)
        except BotoCoreError as exc:
            # NoCredentialsError and friends: say what is missing, never a credential.
            raise ConfigurationError(
                f"database_auth iam: cannot sign an RDS IAM token for login {self.user!r} "
                f"({type(exc).__name__}): give the process AWS credentials (on EKS the "
                "service account's eks.amazonaws.com/role-arn annotation, IRSA) with "
                "rds-db:connect on this login, or set AUDIT_DATABASE_AUTH=password"
            ) from None
        self.issued += 1
        return token

    async def __call__(self) -> str:
        # Off the event loop: a credential refresh is an STS call.
        return await asyncio.to_thread(self.token)


def iam_provider_for_url(url: str, *, region: str, client: Any | None = None
                         ) -> IamTokenProvider:
    """The token provider for a ``postgresql://login@host:port/db?sslmode=...`` URL.

    Refuses a URL that carries a password (it would be ignored, or worse, be a stale copy
    of a credential) and one without TLS, which RDS refuses for IAM logins.
    """
    parts = urlsplit(url)
    if parts.password:
        raise ConfigurationError(
            "database_url has a password, but database_auth is iam: remove the password "
            "from the URL (each connection signs a fresh token), or set "
            "AUDIT_DATABASE_AUTH=password (the value is not shown: it is secret)")
    if not parts.username or not parts.hostname:
        raise ConfigurationError(
            "database_url needs a login and a host for database_auth iam "
            "(postgresql://LOGIN@HOST:5432/DB?sslmode=verify-full)")
    modes = parse_qs(parts.query).get("sslmode", [])
    if not modes or modes[-1] not in _TLS_MODES:
        raise ConfigurationError(
            "database_url: database_auth iam needs TLS (RDS refuses IAM logins without "
            "it): add sslmode=verify-full to the URL")
    return IamTokenProvider(host=parts.hostname, port=parts.port or 5432,
                            user=unquote(parts.username), region=region, client=client)


def connect_password(url: str, auth: DatabaseAuth, *, region: str,
                     client: Any | None = None) -> IamTokenProvider | None:
    """What to pass as asyncpg's ``password``: None (the URL's own) or a token provider."""
    if auth == "password":
        return None
    return iam_provider_for_url(url, region=region, client=client)


def settings_password(settings: WorkerSettings) -> IamTokenProvider | None:
    """`connect_password` for the worker's own settings (database_url, auth, region)."""
    return connect_password(settings.database_url.get_secret_value(), settings.database_auth,
                            region=settings.aws_region)
