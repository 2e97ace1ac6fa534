"""pytest plugin: a real local OpenAI-compatible server (``captions.testing.server``) as fixtures.

Registered by ``tests/conftest.py`` (``pytest_plugins``). ``fake_openai`` is one running server
that expects ``TEST_KEY``; ``start_fake_openai(**config)`` starts more (each with its own log),
all stopped at teardown. Change ``server.config`` while it runs to inject faults.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from captions.testing.server import FakeConfig, FakeOpenAI

TEST_KEY = "sk-test-SECRET123"  # tests assert that "SECRET123" never leaks

__all__ = ["TEST_KEY", "FakeConfig", "FakeOpenAI", "fake_openai", "start_fake_openai"]


@pytest.fixture
def start_fake_openai() -> Iterator[Callable[..., FakeOpenAI]]:
    """Factory: ``start_fake_openai(latency=0.1, ...)`` -> a running server expecting TEST_KEY."""
    servers: list[FakeOpenAI] = []

    def start(**config: Any) -> FakeOpenAI:
        server = FakeOpenAI(FakeConfig(**{"api_key": TEST_KEY, **config})).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def fake_openai(start_fake_openai: Callable[..., FakeOpenAI]) -> FakeOpenAI:
    """One running fake server expecting TEST_KEY."""
    return start_fake_openai()
