"""What the integration tests on the machine's own Redis share: its URL, and a namespace of
keys a test owns (deleted after it), so tests never see each other's counters."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import redis

#: The Redis server running on this machine (and on CI's) at its standard port.
REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture
def namespace() -> Iterator[str]:
    ns = f"gpufleet-test:{secrets.token_hex(4)}"
    yield ns
    client = redis.Redis.from_url(REDIS)
    keys = list(client.scan_iter(match=f"{ns}:*"))
    if keys:
        client.delete(*keys)
    client.close()
