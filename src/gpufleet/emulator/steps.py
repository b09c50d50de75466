"""Decode steps between two changes of the batch, in closed form.

While the batch holds still, every decoding sequence gains one token of context per step, so a
roofline step time grows linearly: step ``j`` after the grid's origin lasts ``a + b·j``, and
boundary ``j`` (the moment every decoding sequence emits a token) falls at
``origin + j·a + b·j(j−1)/2``. ``count(t)`` inverts that quadratic, then settles the rounding
by comparing neighbours with the very expression ``time`` uses, so an event planned at
``time(j)`` always finds boundary ``j`` passed — the engine model depends on that to make
progress. Pure arithmetic: no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["StepGrid"]

#: Shortest step the grid accepts, so a degenerate performance model cannot stall ``count``.
_MIN_STEP_S = 1e-9


@dataclass(slots=True)
class StepGrid:
    origin: float | None = None  # boundary 0; None while nothing decodes
    a: float = _MIN_STEP_S  # the first step after the origin
    b: float = 0.0  # how much each further step is longer

    def plan(self, first_step: float, growth: float) -> None:
        self.a = max(_MIN_STEP_S, first_step)
        self.b = max(0.0, growth)

    def time(self, j: int) -> float:
        """When boundary ``j`` falls."""
        if self.origin is None:
            raise ValueError("the grid has no origin: nothing decodes")
        return self.origin + j * self.a + self.b * j * (j - 1) / 2

    def count(self, t: float) -> int:
        """How many boundaries (0, 1, …) have fallen by ``t``."""
        if self.origin is None or t < self.origin:
            return 0
        elapsed, a, b = t - self.origin, self.a, self.b
        if b > 0:
            h = a - b / 2
            j = int((math.sqrt(h * h + 2 * b * elapsed) - h) / b)
        else:
            j = int(elapsed / a)
        while self.time(j + 1) <= t:
            j += 1
        while j > 0 and self.time(j) > t:
            j -= 1
        return j + 1
