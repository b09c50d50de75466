"""``gpufleet sim``: the fleet's own policies run against emulated engines in virtual time.

``traces`` makes and ``trace_files`` replays the traffic; see docs/sim-traces.md. ``core``
runs it through the fleet (``simulate``), ``fleet`` sizes the models for it, ``tenants`` brings
the tenants' quotas and fair shares, ``external`` the hosted APIs a model may burst to, and
``result`` reports what it served and what it cost.
"""

from gpufleet.sim.core import GATEWAY_OVERHEAD_S, SimSettings, simulate
from gpufleet.sim.external import HostedLatency
from gpufleet.sim.fleet import SimModel, sim_model, unsimulated
from gpufleet.sim.result import (
    GpuUse,
    ModelResult,
    Objectives,
    Percentiles,
    ReplicaSpan,
    ScaleEvent,
    SimResult,
    TenantResult,
    render_table,
)
from gpufleet.sim.scaler import Scaler, ScalerFactory
from gpufleet.sim.tenants import SimTenant
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
    "GATEWAY_OVERHEAD_S",
    "Bursts",
    "GpuUse",
    "HostedLatency",
    "Lengths",
    "ModelResult",
    "Objectives",
    "Percentiles",
    "ReplicaSpan",
    "ScaleEvent",
    "Scaler",
    "ScalerFactory",
    "SharedPrefix",
    "SimModel",
    "SimResult",
    "SimSettings",
    "SimTenant",
    "TenantResult",
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
    "unsimulated",
    "write_trace",
]
