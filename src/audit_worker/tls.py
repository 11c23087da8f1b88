"""TLS for the worker's connections: PostgreSQL (asyncpg) and Redis (``rediss://``).

Every connection the worker makes goes through here: the service's pool, the health
checks, the CLI (`migrate`, `verify`, `prove`, dead letters) and `verify`'s worker
processes.

PostgreSQL. The URL's ``sslmode`` (or ``PGSSLMODE``) says how much is checked, libpq's
vocabulary:

* ``verify-full`` (what the AWS stacks write): the server's chain must lead to a CA in
  the ``database_ca_file`` setting and its certificate must name the host of the URL
  (``CERT_REQUIRED`` and ``check_hostname``).
* ``verify-ca``: the chain is checked, the host name is not.
* anything else, or none: asyncpg's own handling (no CA read). Local servers and the test
  suite's plain servers use that.

The CA never comes from ``~/.postgresql/root.crt`` (``HOME`` is ``/tmp`` in the image, and
a libpq default would hide where trust comes from): a URL that names ``sslrootcert`` with a
verify mode is refused, so there is one place for it. The image ships the RDS global
bundle at `DEFAULT_DATABASE_CA_FILE`, the default of that setting (see the Dockerfile).

Redis. ``rediss://`` turns TLS on; the chain and the host name are always checked. The
CA is the ``redis_ca_file`` setting added to the system trust store (redis-py builds its
context from ``ssl.create_default_context()``); unset, the system store alone, which is
what ElastiCache's in-transit encryption needs (its certificates chain to a public CA
that Debian's ``ca-certificates`` in the base image holds). A URL that turns certificate
checks off (``ssl_cert_reqs``, ``ssl_check_hostname``) or names its own CA is refused.

A certificate that does not verify is a configuration error, not an outage: the message
names the setting and the fix, and never holds the URL or a password.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qs, urlsplit

import asyncpg

from audit_worker.errors import TlsError

if TYPE_CHECKING:
    from audit_worker.config import WorkerSettings

__all__ = [
    "DEFAULT_DATABASE_CA_FILE",
    "connect",
    "create_pool",
    "explain",
    "postgres_context",
    "redis_options",
    "startup_failure",
]

DEFAULT_DATABASE_CA_FILE = Path("/etc/ssl/certs/rds-global-bundle.pem")
"""Where the Dockerfile installs the RDS global CA bundle (checksum-pinned)."""

Dependency = Literal["postgres", "redis"]
_VERIFY_MODES = frozenset({"verify-ca", "verify-full"})
_SETTING = {"postgres": "AUDIT_DATABASE_CA_FILE", "redis": "AUDIT_REDIS_CA_FILE"}
_URL = {"postgres": "AUDIT_DATABASE_URL", "redis": "AUDIT_REDIS_URL"}
_NAME = {"postgres": "PostgreSQL", "redis": "Redis"}
# OpenSSL verify codes (x509_vfy.h): the chain does not reach a trusted CA...
_UNTRUSTED = frozenset({2, 18, 19, 20, 21})
# ...or the certificate does not name the host that was dialled.
_WRONG_HOST = frozenset({62, 64})
# Query parameters of a rediss:// URL that would loosen or bypass the checks made here.
_REDIS_TLS_PARAMS = frozenset({
    "ssl_cert_reqs", "ssl_check_hostname", "ssl_ca_certs", "ssl_ca_path", "ssl_ca_data",
})


def _sslmode(url: str) -> str | None:
    modes = parse_qs(urlsplit(url).query).get("sslmode")
    return modes[-1] if modes else os.environ.get("PGSSLMODE")


def _load_ca(context: ssl.SSLContext, ca_file: Path, dependency: Dependency) -> None:
    setting = _SETTING[dependency]
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except FileNotFoundError:
        raise TlsError(
            f"{setting}: {ca_file} does not exist. TLS to {_NAME[dependency]} is set to "
            "check certificates, which needs the CA that signed the server's certificate: "
            f"mount that CA bundle and point {setting} at it (the image ships the RDS "
            f"global bundle at {DEFAULT_DATABASE_CA_FILE})"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(
            f"{setting}: {ca_file} is not a readable PEM CA bundle "
            f"({type(exc).__name__}): point {setting} at the CA bundle (PEM) that signed "
            f"the {_NAME[dependency]} server's certificate"
        ) from None


def postgres_context(url: str, ca_file: Path) -> ssl.SSLContext | None:
    """The SSL context for asyncpg's ``ssl``, or None to leave the URL to asyncpg.

    Refuses (`TlsError`) a verify mode whose CA file is missing or unreadable, and a URL
    that names ``sslrootcert`` (the CA is the ``database_ca_file`` setting).
    """
    mode = _sslmode(url)
    if mode not in _VERIFY_MODES:
        return None
    if "sslrootcert" in parse_qs(urlsplit(url).query):
        raise TlsError(
            "AUDIT_DATABASE_URL names sslrootcert: the worker reads the database CA from "
            "AUDIT_DATABASE_CA_FILE only; remove sslrootcert from the URL and set "
            "AUDIT_DATABASE_CA_FILE to that path (the URL is not shown: it is secret)"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # what RDS' parameter group enforces
    context.check_hostname = mode == "verify-full"
    _load_ca(context, ca_file, "postgres")
    return context


def redis_options(url: str, ca_file: Path | None) -> dict[str, Any]:
    """Keyword arguments for ``Redis.from_url`` that make ``rediss://`` verify-full."""
    if not url.startswith("rediss://"):
        return {}
    loosening = sorted(_REDIS_TLS_PARAMS & set(parse_qs(urlsplit(url).query)))
    if loosening:
        raise TlsError(
            f"AUDIT_REDIS_URL sets {', '.join(loosening)}: the worker always checks the "
            "Redis certificate and its host name; remove those parameters and name the CA "
            "with AUDIT_REDIS_CA_FILE if the system trust store lacks it (the URL is not "
            "shown: it is secret)"
        )
    options: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True,
                               "ssl_min_version": ssl.TLSVersion.TLSv1_2}
    if ca_file is not None:
        # Fail here, with the setting's name, rather than at the first command.
        _load_ca(ssl.create_default_context(), ca_file, "redis")
        options["ssl_ca_certs"] = str(ca_file)
    return options


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and its causes and contexts (redis-py raises its ConnectionError inside the
    handler of the ssl error, so the ssl error is the context)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def explain(
    exc: BaseException, dependency: Dependency, ca_file: Path | None
) -> TlsError | None:
    """A `TlsError` naming the setting and the fix when `exc` is a failed TLS handshake
    or certificate check; None for anything else. Never quotes the URL."""
    name, setting, url_setting = _NAME[dependency], _SETTING[dependency], _URL[dependency]
    for link in _chain(exc):
        if isinstance(link, TlsError):
            return link
        if isinstance(link, ssl.SSLCertVerificationError):
            code = link.verify_code
            if code in _WRONG_HOST:
                # The message would quote the host; the setting is enough to find it.
                return TlsError(
                    f"TLS to {name}: the server's certificate does not name the host in "
                    f"{url_setting} (certificate check with host name, verify-full). "
                    "Connect by a name the certificate holds: on AWS the endpoint "
                    "address itself, not an IP address or a CNAME of it"
                )
            trust = str(ca_file) if ca_file is not None else "the system trust store"
            if code in _UNTRUSTED:
                where = f"{setting} ({trust})" if ca_file is not None else (
                    f"the system trust store ({setting} is unset)")
                return TlsError(
                    f"TLS to {name}: the server's certificate does not chain to a CA in "
                    f"{where}: {link.verify_message}. Set {setting} to the CA bundle that "
                    "signed it" + (
                        f" (for RDS the global bundle the image ships at "
                        f"{DEFAULT_DATABASE_CA_FILE})" if dependency == "postgres" else "")
                )
            return TlsError(
                f"TLS to {name}: the server's certificate failed verification against "
                f"{trust} ({link.verify_message}): renew the server certificate, or set "
                f"{setting} to the CA bundle that signed it"
            )
        if isinstance(link, ssl.SSLError):
            return TlsError(
                f"TLS to {name} failed during the handshake ({type(link).__name__}: "
                f"{link.reason or 'no reason given'}): check that the server speaks TLS on "
                f"that port ({url_setting}) and accepts TLS 1.2 or later"
            )
    return None


def startup_failure(exc: BaseException, settings: WorkerSettings) -> TlsError | None:
    """`explain` for an error met while the worker connects at start-up, whichever of
    PostgreSQL or Redis raised it."""
    from redis.exceptions import RedisError

    chain = _chain(exc)
    if any(isinstance(link, RedisError) for link in chain):
        return explain(exc, "redis", settings.redis_ca_file)
    return explain(exc, "postgres", settings.database_ca_file)


async def connect(url: str, *, ca_file: Path, **kwargs: Any) -> asyncpg.Connection:
    """``asyncpg.connect`` with the context of `postgres_context`; a failed certificate
    check raises `TlsError`. Other keyword arguments go to asyncpg (``password``...)."""
    context = postgres_context(url, ca_file)
    extra: Mapping[str, Any] = {"ssl": context} if context is not None else {}
    try:
        return await asyncpg.connect(url, **extra, **kwargs)
    except Exception as exc:
        failure = explain(exc, "postgres", ca_file)
        if failure is not None:
            raise failure from None  # the chain would repeat the host
        raise


async def create_pool(url: str, *, ca_file: Path, **kwargs: Any) -> asyncpg.Pool:
    """``asyncpg.create_pool`` with the context of `postgres_context` (every connection
    of the pool, including ones opened later, uses it); see `connect`."""
    context = postgres_context(url, ca_file)
    extra: Mapping[str, Any] = {"ssl": context} if context is not None else {}
    try:
        pool = await asyncpg.create_pool(url, **extra, **kwargs)
    except Exception as exc:
        failure = explain(exc, "postgres", ca_file)
        if failure is not None:
            raise failure from None
        raise
    assert pool is not None
    return pool
