"""How fast a model's replicas prefill, learnt from the time to first token the gateway sees.

The prefix policy prices a replica's prefill backlog in seconds, so it needs the prefill rate:
a constant is right for one model on one GPU and wrong by 100× elsewhere (Llama-3-8B prefills
~30,000 tokens/s on an H100 and ~200 on two CPU cores). Too high a rate makes a cached replica
look cheap however long its queue, and affinity hot-spots.

Each streamed request gives a sample: the prompt tokens ahead of its first token on that
replica (the backlog the gateway had sent there and not seen start, plus its own uncached
tokens) and its time to first token. ``ttft ≈ overhead + tokens / rate`` is fitted by least
squares over exponentially decayed sums (recent traffic counts most: replicas and batch sizes
change), and the fit is used once it rests on enough spread in prompt sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PrefillFit"]


@dataclass(slots=True)
class PrefillFit:
    #: Weight of the past per new sample (0.98: a sample's weight halves after ~35 more).
    decay: float = 0.98
    min_samples: int = 16
    min_rate: float = 10.0
    max_rate: float = 1_000_000.0
    max_overhead_s: float = 2.0
    _n: float = 0.0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0
    _count: int = 0

    def observe(self, tokens: float, seconds: float) -> None:
        if tokens < 0 or seconds <= 0:
            return
        d = self.decay
        self._n = self._n * d + 1
        self._x = self._x * d + tokens
        self._y = self._y * d + seconds
        self._xx = self._xx * d + tokens * tokens
        self._xy = self._xy * d + tokens * seconds
        self._count += 1

    def estimate(self) -> tuple[float, float] | None:
        """(tokens per second, fixed seconds per request), or None while the data cannot say."""
        if self._count < self.min_samples:
            return None
        spread = self._n * self._xx - self._x * self._x
        if spread <= 1e-9 * max(1.0, self._n * self._xx):
            return None  # every prompt the same size: the slope is not identifiable
        slope = (self._n * self._xy - self._x * self._y) / spread
        if slope <= 0:
            return None
        overhead = (self._y - slope * self._x) / self._n
        rate = min(self.max_rate, max(self.min_rate, 1.0 / slope))
        return rate, min(self.max_overhead_s, max(0.0, overhead))
