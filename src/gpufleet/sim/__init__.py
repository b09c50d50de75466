"""``gpufleet sim``: the fleet's own policies run against emulated engines in virtual time.

``traces`` makes and ``trace_files`` replays the traffic; see docs/sim-traces.md. ``core``
runs it through the fleet (``simulate``), ``fleet`` sizes the models for it and ``result``
reports what it served and what it cost.
"""

from gpufleet.sim.core import SimSettings, simulate
from gpufleet.sim.fleet import SimModel, sim_model
from gpufleet.sim.result import (
    GpuUse,
    ModelResult,
    Objectives,
    Percentiles,
    ReplicaSpan,
    ScaleEvent,
    SimResult,
    render_table,
)
from gpufleet.sim.trace_files import TraceError, read_trace, write_trace
from gpufleet.sim.traces import (
    BLOCK_TOKENS,
    Bursts,
    Lengths,
    SharedPrefix,
    TraceRequest,
    batch_night,
    block_hashes,
    chats,
    diurnal,
    diurnal_rate,
    merge,
    poisson,
)

__all__ = [
    "BLOCK_TOKENS",
    "Bursts",
    "GpuUse",
    "Lengths",
    "ModelResult",
    "Objectives",
    "Percentiles",
    "ReplicaSpan",
    "ScaleEvent",
    "SharedPrefix",
    "SimModel",
    "SimResult",
    "SimSettings",
    "TraceError",
    "TraceRequest",
    "batch_night",
    "block_hashes",
    "chats",
    "diurnal",
    "diurnal_rate",
    "merge",
    "poisson",
    "read_trace",
    "render_table",
    "sim_model",
    "simulate",
    "write_trace",
]
