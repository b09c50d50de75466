"""The process's heap settled after start-up, so garbage collection does not stall the loop.

A full (generation 2) collection walks every tracked object the process holds. After start-up
that is mostly what never dies — modules, pydantic models, SQLAlchemy metadata, the Kubernetes
client's classes — hundreds of thousands of objects, and walking them held the event loop for
70–99 ms several times in every 10 s of load (``gpufleet.loop_watch`` logged it: "garbage
collection inside it: gen2 85 ms"), which was the gateway's p99 under load. ``settle`` runs
once start-up is done: one collection, then ``gc.freeze()`` moves every survivor to the
permanent generation, which collections skip, and the young generation's threshold is raised
from 700 to 20,000 allocations so that the short-lived objects of requests in flight die before
a collection looks at them. Measured with ``bench/gateway_process.py`` (32 connections, one
core; docs/benchmarks.md): gen2 pauses 70–99 ms → 3–6 ms, loaded p99 112 → 39 ms.

This is what large Python services do (Instagram's ``gc.freeze`` after fork); memory does not
grow from it: frozen objects are the ones that live anyway, and cycles among request objects
are still collected. This module imports nothing from gpufleet.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "settle"]

#: Allocations (net of deallocations) between two young-generation collections.
YOUNG_THRESHOLD = 20_000


def settle() -> None:
    """Collect once, freeze what survived start-up, and space young collections out."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
