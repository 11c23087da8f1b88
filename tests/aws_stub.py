"""Real botocore clients behind a `Stubber`, for the AWS calls moto cannot serve or answer
the way the real service does.

A stubbed client is not a hand-written double: botocore still validates every request
against the service model (unknown or missing parameters, wrong types, values outside an
enum raise ``ParamValidationError``), the Stubber checks ``expected_params`` exactly and
refuses a queued response whose shape the model does not allow. No request leaves the
process (the Stubber answers at ``before-call``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import botocore.session
from botocore.stub import Stubber

CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def stubbed_client(service: str, region: str = "us-east-1") -> tuple[Any, Stubber]:
    """A real botocore client for `service` and its (activated) Stubber."""
    client = botocore.session.get_session().create_client(
        service, region_name=region, **CREDENTIALS)
    stub = Stubber(client)
    stub.activate()
    return client, stub


class StubbedClients:
    """One stubbed client per service, handed out by `factory` (the shape of
    ``AwsSite.clients``): every call the code makes reaches the real botocore client."""

    def __init__(self, region: str = "us-east-1") -> None:
        self.region = region
        self.clients: dict[str, Any] = {}
        self.stubs: dict[str, Stubber] = {}

    def __getitem__(self, service: str) -> Stubber:
        if service not in self.stubs:
            self.clients[service], self.stubs[service] = stubbed_client(service, self.region)
        return self.stubs[service]

    @property
    def factory(self) -> Callable[[str], Any]:
        def client(service: str) -> Any:
            self[service]
            return self.clients[service]

        return client

    def assert_no_pending_responses(self) -> None:
        for stub in self.stubs.values():
            stub.assert_no_pending_responses()


@contextmanager
def stubbed(service: str, region: str = "us-east-1") -> Iterator[tuple[Any, Stubber]]:
    """`stubbed_client` that also checks, on leaving, that every queued answer was used."""
    client, stub = stubbed_client(service, region)
    try:
        yield client, stub
        stub.assert_no_pending_responses()
    finally:
        stub.deactivate()
