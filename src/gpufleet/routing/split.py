"""Canary and A-B splits: which deployment behind a public model name takes a request.

Weights are percentages of the public model's requests; what they leave stays on the model
itself. With a stickiness key (a session header) the choice is a hash of model and key, so a
user stays on one side for the whole split — and moves only if the weights change; without one
it is a fresh draw per request from an injected random source (tests seed it).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from gpufleet.routing.chwbl import hash64

__all__ = ["choose_split"]


def choose_split(
    model: str, splits: Sequence[tuple[str, int]], key: str | None, rng: random.Random
) -> str:
    if not splits:
        return model
    point = (hash64(f"{model}|{key}") % 10_000) / 100 if key is not None else rng.random() * 100
    edge = 0.0
    for target, weight in splits:
        edge += weight
        if point < edge:
            return target
    return model
