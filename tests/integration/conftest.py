"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import vhost_balloon.backend.balloon.discard
from tests.integration.discard_gate import Gate


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    """The first discard syscall waits until `gate.opened` is set."""
    installed = Gate()
    monkeypatch.setattr(vhost_balloon.backend.balloon.discard, "punch_hole", installed.punch_hole)
    yield installed
    installed.opened.set()
