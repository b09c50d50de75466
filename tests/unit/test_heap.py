"""The heap settled after start-up (issue 17): survivors frozen out of the collector's walks,
young collections spaced out."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gpufleet import heap


@pytest.fixture
def restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored")
def test_settle_freezes_what_lives_and_spaces_young_collections() -> None:
    gc.unfreeze()
    kept = [[i] for i in range(1000)]  # tracked containers that outlive start-up
    older = gc.get_threshold()[1:]
    heap.settle()
    assert gc.get_freeze_count() >= len(kept)
    assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, *older)
    assert all(gc.is_tracked(k) for k in kept)
