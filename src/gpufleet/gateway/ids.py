"""The gateway's own request ids: UUIDs, the one id every engine is sent.

An engine sees only the gateway's id, never the client's ``x-request-id``: engines put their
own rules on that header (llama-cpp-python's server parses it as a version-4 UUID and answers
an empty 400 to anything else, so ``x-request-id: my-request-1`` or a batch line's
``batch_req_…`` failed every request), and a client's id is not unique. The client's id is
echoed back to it and kept in the ledger next to the gateway's (``client_request_id``).

An id is a version-4 UUID in its canonical form: 60 random bits drawn once per process, then a
62-bit counter in the variant's place. Unique across gateways and restarts like
``uuid.uuid4()``, without reading ``os.urandom`` on every request (measured ~4 % of a
request's CPU).
"""

from __future__ import annotations

import itertools
import os

__all__ = ["new_request_id"]

_VERSION_4 = 0x4 << 12  # the version nibble of the UUID's third group
_VARIANT_RFC = 0b10 << 62  # the variant bits that open the fourth group
_COUNTER_MASK = (1 << 62) - 1


def _prefix() -> str:
    high = int.from_bytes(os.urandom(8), "big") & ~(0xF << 12) | _VERSION_4
    h = f"{high:016x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:]}-"


_PREFIX = _prefix()
_COUNTER = itertools.count(1)


def new_request_id() -> str:
    low = f"{_VARIANT_RFC | (next(_COUNTER) & _COUNTER_MASK):016x}"
    return f"{_PREFIX}{low[:4]}-{low[4:]}"
