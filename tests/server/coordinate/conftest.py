"""Fixtures of the goal tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from tests.helpers import HttpServer, reply


@pytest.fixture
def held(http_server: HttpServer) -> Iterator[threading.Event]:
    """A route, /hold, that answers once the returned event is set."""
    release = threading.Event()

    def hold(request: BaseHTTPRequestHandler) -> None:
        release.wait(30)
        reply(b'{"held": true}')(request)

    http_server.routes["/hold"] = hold
    yield release
    release.set()
