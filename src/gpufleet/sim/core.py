"""The simulator's core: a fleet in virtual time, run by the production policies.

One heap of events, ordered by virtual time (no asyncio, no sleeping, no clock read but the
one that times the run itself): a request arriving (the trace is read one request ahead, never
whole), a replica's engine changing its batch (``EngineModel.next_event_time``), a replica
becoming ready, a held request's hold running out, and the autoscaler's tick. At one instant
engines go first, so a slot freed at ``t`` serves a request arriving at ``t``.

What runs unchanged from production:

- **routing** — the policy the model's spec names (``make_policy``, as the gateway's
  ``Upstream`` does), fed the gateway's own per-replica counts (in flight, prefill backlog,
  awaiting a first token) and the engine's (waiting, running, KV use — read exactly here, where
  the gateway scrapes them every 250 ms). A prefix-aware policy is calibrated with the engine's
  prefill rate, which the gateway learns from observed TTFTs.
- **autoscaling** — ``gpufleet.autoscale.decide`` every ``tick_s`` with the samples the
  controller takes (in flight, arrivals, KV use, engine queues, TTFT p90), bounded by what the
  planner can place (``controller.capacity.PlannerCapacity``, the controller's own bound, which
  calls ``plan``); a model the fleet cannot hold keeps the planner's reason. A request for a
  model at zero replicas wakes it at once, as the gateway asks the controller to.
- **engines** — ``emulator.model.EngineModel`` per replica, built as the emulator server builds
  it, timed by the sizing layer's ``PerfModel`` for the placement's GPU type.

- **admission** — each request's tenant (``sim.tenants``): its quotas counted by the gateway's
  ``QuotaCounters`` at arrival and settled at the end, then the model's fair queue
  (``FairOrder``: priority, then weighted fair share, bounded in length and wait) when its
  ``slots`` per routable replica are all taken; its cost metered by the ledger's ``BusyMeter``.
- **GPU jobs** — ``sim.jobs``: queued jobs admitted, held and released through the same
  ``PlannerCapacity``, in the live scheduler's order, at each tick; a job the autoscaler's plan
  displaces is preempted, and the replica that takes its GPUs starts once it has exited.
- **burst** — ``routing.cost`` (``sim.external``): the model and its alternatives ranked by
  ``rank_by_cost`` as the gateway ranks them, the chain walked as its dispatch walks it (a
  tenant not opted in never reaches an external-only deployment). An ``engine: external``
  model is a hosted API there: no replicas, always ready, a fixed latency, charged per token.

The gateway's HTTP path is modelled, not run: a model with no replica ready holds requests (in
arrival order) for up to ``hold_s``, as the gateway's ``hold`` does; the fixed time the gateway
adds to every request (auth, proxying, the ledger) is ``gateway_overhead_s``, added to each
request's TTFT and end-to-end latency. A replica being stopped takes no new requests and ends
when its last one does (its ``drain`` is not cut short).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from gpufleet.autoscale import Sample, ScaleState, decide, initial_state
from gpufleet.controller.capacity import PlannerCapacity
from gpufleet.emulator.kvcache import BLOCK_TOKENS
from gpufleet.emulator.model import EngineModel, Generation, RequestTooLarge
from gpufleet.planner import Placement, PlanSettings, ReplicaKey
from gpufleet.policies.busy_meter import BusyMeter, MeterTicket
from gpufleet.policies.costs import CostLine, Span, UsageTotals, cost_report, inventory_gpus
from gpufleet.policies.fair_order import FairOrder, Refusal
from gpufleet.policies.pricing import Pricing
from gpufleet.policies.quota_counters import QuotaCounters
from gpufleet.policies.quota_rules import Demand, QuotaExceeded, Ticket
from gpufleet.routing import Endpoint, RequestFeatures, RoutingPolicy, make_policy
from gpufleet.sim.external import NOT_ALLOWED, RecentTtfts, route
from gpufleet.sim.fleet import EngineParams, SimModel
from gpufleet.sim.jobs import SimJobs
from gpufleet.sim.result import (
    GpuUse,
    ModelResult,
    Objectives,
    ReplicaSpan,
    ScaleEvent,
    SimResult,
    percentiles,
)
from gpufleet.sim.scaler import ScalerFactory
from gpufleet.sim.tenants import DEFAULT_TENANT, SimTenant, TenantBook, sim_tenants
from gpufleet.sim.traces import TraceRequest, block_hashes
from gpufleet.spec import Inventory, ModelSpec, Tenant

__all__ = ["GATEWAY_OVERHEAD_S", "SimSettings", "simulate"]

# Event kinds, in the order they run at one instant (_DONE: a hosted API's answer ends).
_ENGINE, _DONE, _READY, _ARRIVAL, _HELD, _QUEUE, _TICK = range(7)

#: What a client's TTFT holds beyond its engine's (HTTP both ways, authentication, routing,
#: proxying): measured on a live ``gpufleet up`` with emulated replicas by bench/sim_vs_live.py
#: (docs/benchmarks.md) as the client's mean TTFT − the engines' mean TTFT, 5–6 ms on a 2-core
#: VM (of which the gateway's own timing sees about 2 ms).
GATEWAY_OVERHEAD_S = 0.005


@dataclass(frozen=True, slots=True)
class SimSettings:
    #: The autoscaler's sampling and decision interval (the controller's default: 1 s).
    tick_s: float = 1.0
    #: How long a request waits for a replica of a model with none ready (starting, scaled to
    #: zero) before it is refused (the gateway's ``hold_s``).
    hold_s: float = 60.0
    #: The fair queue's bounds per model (the gateway's ``queue_max_length``,
    #: ``queue_max_wait_s``): waiters past the first, refused at once; the wait, refused after.
    queue_max_length: int = 1000
    queue_max_wait_s: float = 30.0
    #: Added to every request's TTFT and end-to-end latency (``GATEWAY_OVERHEAD_S``).
    gateway_overhead_s: float = GATEWAY_OVERHEAD_S
    #: Replicas at ``replicas.min`` are ready at time 0; else they start loading then.
    warm_start: bool = True
    #: Routing policy for every model instead of the one its spec names.
    routing: str | None = None
    plan_settings: PlanSettings | None = None
    seed: int | None = None
    #: Called at each autoscaler tick with the virtual time reached (a progress bar's feed).
    progress: Callable[[float], None] | None = None
    #: Model name → a factory of the scaler to run instead of ``gpufleet.autoscale.decide``
    #: (``gpufleet.sim.scaler``; a benchmark's baseline). Unnamed models run the production one.
    scalers: Mapping[str, ScalerFactory] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class _Request:
    trace: TraceRequest
    model: _Model
    tenant: TenantBook
    arrived: float
    held: bool = False  # waiting for the model's first ready replica
    ticket: Ticket | None = None  # its quota reservation, when its tenant has limits
    meter: MeterTicket | None = None
    replica: _Replica | None = None
    prefill: int = 0  # uncached prompt tokens the gateway counts in the replica's backlog
    prefilled: bool = False
    features: RequestFeatures | None = None
    hashes: list[int] | None = None
    first_token: float = 0.0  # sent to a hosted API: when its first token comes


@dataclass(eq=False, slots=True)
class _Replica:
    id: str
    model: _Model
    engine: EngineModel
    params: EngineParams
    started_at: float
    ready: bool = False
    stopping: bool = False
    ended_at: float | None = None
    in_flight: int = 0
    backlog: int = 0
    prefilling: int = 0
    scheduled: float | None = None
    busy_since: float | None = None
    busy_s: float = 0.0
    requests: dict[Generation, _Request] = field(default_factory=dict)
    #: What the router saw here last, kept while nothing it reads has changed.
    endpoint: Endpoint | None = None


def _endpoint(r: _Replica) -> Endpoint:
    """The replica as the router sees it now; the last one built while its counts hold still.

    Between two requests of a model few of its replicas change, and building a frozen
    dataclass costs more than comparing its fields (the simulator does this per replica per
    request).
    """
    engine = r.engine
    waiting, running = float(engine.waiting), float(engine.running)
    usage = engine.cache.usage
    e = r.endpoint
    if (
        e is None
        or e.in_flight != r.in_flight
        or e.backlog_tokens != r.backlog
        or e.prefilling != r.prefilling
        or e.waiting != waiting
        or e.running != running
        or e.kv_usage != usage
    ):
        e = r.endpoint = Endpoint(
            r.id, r.in_flight, r.backlog, r.prefilling, waiting, running, usage
        )
    return e


class _Model:
    """A model's gateway queue, replicas, autoscaler state and statistics."""

    def __init__(
        self, sized: SimModel, policy: RoutingPolicy, settings: SimSettings, now: float
    ) -> None:
        self.sized = sized
        self.name = sized.name
        self.spec: ModelSpec = sized.model.spec
        self.hosted = sized.hosted
        self.recent = RecentTtfts()  # what cost routing judges it by
        self.charged = 0.0  # per token, at its price list (an external model)
        self.policy = policy
        self.order: FairOrder[_Request] = FairOrder(
            max_length=settings.queue_max_length, max_wait_s=settings.queue_max_wait_s
        )
        #: When the fair queue's next deadline event is due (one pending at a time).
        self.queue_deadline: float | None = None
        #: Requests waiting for a first ready replica, in arrival order; departed ones linger.
        self.held: deque[_Request] = deque()
        self.holding = 0
        self.replicas: list[_Replica] = []  # held, not stopping; index = its ReplicaKey index
        self.routable: list[_Replica] = []
        self.in_flight = 0
        self.created = 0
        self.state: ScaleState = initial_state(self.spec, now)
        self.window: deque[Sample] = deque()
        self.arrivals = 0  # since the last tick
        self.recent_ttfts: list[float] = []
        self.unplaced: str | None = None  # the planner's reason while it falls short
        self.last_unplaced: str | None = None
        self.calibrated = False
        # Statistics.
        self.requests = self.served = self.refused = 0
        self.refused_by: dict[str, int] = {}
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0
        self.ttft = array("d")
        self.itl = array("d")
        self.e2e = array("d")
        self.met = {"ttft": 0, "itl": 0, "e2e": 0, "all": 0}
        self.spans: list[_Replica] = []
        self.replica_seconds = 0.0
        self.replicas_max = 0
        self.count_since = now

    @property
    def queued(self) -> int:
        return self.order.waiting + self.holding

    @property
    def ready(self) -> bool:
        return bool(self.routable) or self.hosted is not None

    @property
    def capacity(self) -> int:
        n = len(self.routable) if self.hosted is None else len(self.spec.endpoints)
        return n * self.sized.slots_per_replica

    def has_room(self) -> bool:
        """A request here would not wait in the fair queue (the gateway's ``has_room``)."""
        return self.ready and not self.order.waiting and self.order.in_flight < self.capacity

    def count_change(self, now: float, before: int) -> None:
        self.replica_seconds += before * (now - self.count_since)
        self.count_since = now
        self.replicas_max = max(self.replicas_max, len(self.replicas))


class _Simulation:
    def __init__(
        self,
        models: Sequence[SimModel],
        inventory: Inventory,
        trace: Iterable[TraceRequest],
        objectives: Objectives,
        settings: SimSettings,
        tenants: Iterable[Tenant | SimTenant],
        jobs: SimJobs | None = None,
    ) -> None:
        if not models:
            raise ValueError("nothing to simulate: no models")
        self.settings = settings
        self.objectives = objectives
        self.inventory = inventory
        self.models = {
            m.name: _Model(
                m, make_policy(settings.routing or m.model.spec.routing.policy), settings, 0.0
            )
            for m in models
        }
        #: The models the fleet runs (placed and scaled); the rest are external.
        self.fleet = [m for m in self.models.values() if m.hosted is None]
        self.tenants = {t.name: TenantBook(t) for t in sim_tenants(tenants)}
        self.quotas = QuotaCounters()
        self.pricing = Pricing()
        self.meter = BusyMeter()
        self.overhead = settings.gateway_overhead_s
        self.first = self.models[models[0].name]
        unknown = sorted(set(settings.scalers) - set(self.models))
        if unknown:
            raise ValueError(
                f"scalers given for {', '.join(map(repr, unknown))}, which "
                f"{'is' if len(unknown) == 1 else 'are'} not simulated (models: "
                f"{', '.join(self.models)})"
            )
        self.scalers = {n: f(self.models[n].spec) for n, f in settings.scalers.items()}
        sized = {m.name: m.deployment for m in models}
        self.capacity = PlannerCapacity(
            inventory,
            size=lambda name, spec: sized.get(name),
            settings=settings.plan_settings,
        )
        self.jobs = jobs
        if jobs is not None:
            jobs.attach(self.capacity, {n: b.tenant.weight for n, b in self.tenants.items()})
        self.placements: dict[ReplicaKey, Placement] = {}
        self.last_wants: dict[str, int] | None = None
        self.bounds: Mapping[str, tuple[int, str]] = {}
        self.events: list[ScaleEvent] = []
        self.heap: list[tuple[float, int, int, object]] = []
        self.seq = 0
        self.trace: Iterator[TraceRequest] = iter(trace)
        self.exhausted = False
        self.last_arrival = 0.0
        self.now = 0.0
        self.end = 0.0
        self.in_system = 0
        self.seen = 0  # requests arrived

    # The event loop.

    def push(self, t: float, kind: int, obj: object) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, obj))

    def run(self) -> None:
        self.rescale(0.0, {m.name: m.state.desired for m in self.fleet}, "initial")
        if self.settings.warm_start:
            for m in self.models.values():
                for r in m.replicas:
                    self.ready(r, 0.0)
        self.next_arrival()
        self.push(self.settings.tick_s, _TICK, None)
        heap, pop = self.heap, heapq.heappop
        while heap:
            t, kind, _, obj = pop(heap)
            self.now = t
            if kind == _ENGINE:
                assert isinstance(obj, _Replica)
                if obj.scheduled == t:
                    obj.scheduled = None
                    self.engine_changed(obj, obj.engine.advance(t), t)
                    self.after(obj, t)
                    self.end = t
            elif kind == _DONE:
                assert isinstance(obj, _Request)
                self.answered(obj, t)
                self.end = t
            elif kind == _ARRIVAL:
                assert isinstance(obj, TraceRequest)
                self.arrive(obj, t)
                self.next_arrival()
                self.end = t
            elif kind == _READY:
                assert isinstance(obj, _Replica)
                if not obj.stopping:
                    self.ready(obj, t)
            elif kind == _HELD:
                assert isinstance(obj, _Request)
                if obj.held:
                    obj.held = False
                    obj.model.holding -= 1
                    self.refuse(obj, t, "no_replica")
                    self.end = t
            elif kind == _QUEUE:
                assert isinstance(obj, _Model)
                obj.queue_deadline = None
                for waiter in obj.order.expire(t):
                    self.refuse(waiter.item, t, "queue_timeout")
                    self.end = t
                self.queue_timer(obj)
            elif self.exhausted and not self.in_system and not (self.jobs and self.jobs.pending(t)):
                break  # nothing left to happen but ticks
            else:
                self.end = t
                if self.settings.progress is not None:
                    self.settings.progress(t)
                self.tick(t)
                self.push(t + self.settings.tick_s, _TICK, None)
        for m in self.models.values():
            m.count_change(self.end, len(m.replicas))
            for r in list(m.replicas):
                self.end_replica(r, self.end)
        if self.jobs is not None:
            self.jobs.close(self.end)

    def next_arrival(self) -> None:
        request = next(self.trace, None)
        if request is None:
            self.exhausted = True
            return
        if request.at < self.last_arrival:
            raise ValueError(
                f"the trace goes back in time: a request at {request.at} after one at "
                f"{self.last_arrival} (traces must be sorted by arrival)"
            )
        self.last_arrival = request.at
        self.push(request.at, _ARRIVAL, request)

    # Requests.

    def tenant(self, name: str | None) -> TenantBook:
        name = name or DEFAULT_TENANT
        book = self.tenants.get(name)
        if book is None:
            book = self.tenants[name] = TenantBook(SimTenant(name))
        return book

    def arrive(self, trace: TraceRequest, t: float) -> None:
        named = self.first if trace.model is None else self.models.get(trace.model)
        if named is None:
            raise ValueError(f"the trace names model {trace.model!r}, which is not simulated")
        book = self.tenant(trace.tenant)
        request = _Request(trace, named, book, t)
        named.arrivals += 1
        book.requests += 1
        self.in_system += 1
        self.seen += 1
        tenant = book.tenant
        if not tenant.limits.empty():  # admitted on the named model's estimate, as the gateway
            tokens = trace.prompt_tokens + trace.output_tokens
            demand = Demand(tokens, self.pricing.estimate(named, tokens))
            try:
                request.ticket = self.quotas.admit(f"r{self.seen}", tenant.scopes, demand, t)
            except QuotaExceeded as exc:
                named.requests += 1
                self.refuse(request, t, exc.limit)
                return
        m, allowed = route(named, self.models, self.pricing, t, tenant.allow_external)
        request.model = m
        m.requests += 1
        if not allowed:  # external-only, and the tenant has not opted in
            self.refuse(request, t, NOT_ALLOWED)
            return
        if m.hosted is None and m.state.desired == 0 and m.unplaced is None:
            self.wake(m, t)
        if m.ready:
            self.enqueue(request, t)
        else:
            request.held = True
            m.held.append(request)
            m.holding += 1
            self.push(t + self.settings.hold_s, _HELD, request)

    def enqueue(self, request: _Request, t: float) -> None:
        """A slot now, or a place in the model's fair queue, or a refusal (the queue full)."""
        m = request.model
        order = m.order
        if order.take(m.capacity):
            self.dispatch(request, t)
            return
        tenant = request.tenant.tenant
        waiter = order.enqueue(
            request,
            tenant.name,
            t,
            priority=tenant.priority,
            weight=tenant.weight,
            cost=float(request.trace.prompt_tokens + request.trace.output_tokens),
        )
        if isinstance(waiter, Refusal):
            self.refuse(request, t, "queue_full")
        elif m.queue_deadline is None:
            self.queue_timer(m)

    def queue_timer(self, m: _Model) -> None:
        """One pending event per model, at its fair queue's next deadline."""
        deadline = m.order.next_deadline()
        if deadline is not None and deadline < math.inf:
            m.queue_deadline = deadline
            self.push(deadline, _QUEUE, m)

    def unhold(self, m: _Model, t: float) -> None:
        """A replica is ready: the held requests go to the fair queue in arrival order."""
        held = m.held
        while held and m.routable:
            request = held.popleft()
            if request.held:
                request.held = False
                m.holding -= 1
                self.enqueue(request, t)

    def drain_queue(self, m: _Model, t: float) -> None:
        order, capacity = m.order, m.capacity
        while order.waiting:
            waiter = order.grant(capacity)
            if waiter is None:
                break
            self.dispatch(waiter.item, t)

    def dispatch(self, request: _Request, t: float) -> None:
        m, trace = request.model, request.trace
        request.tenant.waits.append(t - request.arrived)
        if m.hosted is not None:  # a hosted API: its answer ends after its fixed latency
            request.first_token = t + m.hosted.ttft_s
            m.in_flight += 1
            self.push(t + m.hosted.duration(trace.output_tokens), _DONE, request)
            return
        if request.features is None:
            hashes = block_hashes(trace)
            request.hashes = hashes
            key = trace.prefix_group if trace.prefix_group is not None else f"#{m.requests}"
            request.features = RequestFeatures(
                tuple(hashes), f"{m.name}:{key}", trace.prompt_tokens, trace.session
            )
        routable = m.routable
        endpoints = [_endpoint(r) for r in routable]
        choice = m.policy.pick(request.features, endpoints, t)
        replica = None
        if choice is not None:
            chosen = choice.endpoint
            for r in routable:
                if r.id == chosen:
                    replica = r
                    break
        if choice is None or replica is None:
            raise RuntimeError(f"{m.name}: the routing policy chose no ready replica")
        m.policy.record(request.features, choice)
        engine = replica.engine
        self.engine_changed(replica, engine.advance(t), t)
        try:
            gen = engine.submit_blocks(
                trace.prompt_tokens, request.hashes or [], trace.output_tokens, t
            )
        except RequestTooLarge:
            m.order.release()
            self.refuse(request, t, "too_large")
            return
        request.replica = replica
        weight = float(trace.prompt_tokens + trace.output_tokens)
        request.meter = self.meter.start(replica.id, weight, t)
        request.prefill = max(0, trace.prompt_tokens - choice.cached_blocks * BLOCK_TOKENS)
        replica.requests[gen] = request
        replica.in_flight += 1
        replica.backlog += request.prefill
        replica.prefilling += 1
        m.in_flight += 1
        self.after(replica, t)

    def engine_changed(self, replica: _Replica, changed: list[Generation], t: float) -> None:
        for gen in changed:
            request = replica.requests.get(gen)
            if request is None:
                continue
            if not request.prefilled and gen.phase in ("decode", "done"):
                request.prefilled = True
                replica.backlog -= request.prefill
                replica.prefilling -= 1
            if gen.phase == "done":
                del replica.requests[gen]
                self.finish(request, gen)

    def after(self, replica: _Replica, t: float) -> None:
        """Book-keeping once a replica's engine moved: its next event, busy time, its end."""
        engine = replica.engine
        nxt = engine.next_event_time()
        if nxt is not None and nxt != replica.scheduled:
            replica.scheduled = nxt
            self.push(nxt, _ENGINE, replica)
        if engine.running:
            if replica.busy_since is None:
                replica.busy_since = t
        elif replica.busy_since is not None:
            replica.busy_s += t - replica.busy_since
            replica.busy_since = None
        if replica.stopping and not replica.in_flight and replica.ended_at is None:
            self.end_replica(replica, t)

    def finish(self, request: _Request, gen: Generation) -> None:
        m, replica = request.model, request.replica
        assert replica is not None and gen.finished_at is not None
        assert request.meter is not None
        replica.in_flight -= 1
        tokens = gen.prompt_tokens + gen.max_tokens
        replica_s = self.meter.stop(request.meter, gen.finished_at)
        cost = replica_s * replica.params.price_per_hour / 3600
        self.pricing.observe(m, replica_s, tokens)
        first = gen.first_token_at if gen.first_token_at is not None else gen.finished_at
        m.cached_tokens += gen.cached_tokens
        self.served(request, gen.prompt_tokens, gen.max_tokens, first, gen.finished_at, cost)

    def answered(self, request: _Request, t: float) -> None:
        """A hosted API's answer ended at ``t``: charged at its price list, per token."""
        m, trace = request.model, request.trace
        cost = self.pricing.charge(m.spec, trace.prompt_tokens, trace.output_tokens) or 0.0
        m.charged += cost
        self.served(request, trace.prompt_tokens, trace.output_tokens, request.first_token, t, cost)

    def served(
        self, request: _Request, prompt: int, output: int, first: float, end: float, cost: float
    ) -> None:
        """A request answered: its slot back, then quota, statistics and the next waiter."""
        m, book = request.model, request.tenant
        m.in_flight -= 1
        m.order.release()
        self.in_system -= 1
        if request.ticket is not None:
            self.quotas.settle(request.ticket, tokens=prompt + output, cost_usd=cost)
        m.served += 1
        m.prompt_tokens += prompt
        m.completion_tokens += output
        book.served += 1
        book.prompt_tokens += prompt
        book.completion_tokens += output
        book.cost += cost
        ttft = first - request.arrived + self.overhead
        e2e = end - request.arrived + self.overhead
        itl = (end - first) / (output - 1) if output > 1 else 0.0
        m.ttft.append(ttft)
        m.e2e.append(e2e)
        book.ttft.append(ttft)
        book.e2e.append(e2e)
        if output > 1:
            m.itl.append(itl)
        m.recent.add(end, ttft)
        if m.hosted is None:
            m.recent_ttfts.append(ttft)  # the autoscaler's sample
        o, met = self.objectives, m.met
        ok_ttft = o.ttft_s is None or ttft <= o.ttft_s
        ok_itl = o.itl_s is None or itl <= o.itl_s
        ok_e2e = o.e2e_s is None or e2e <= o.e2e_s
        met["ttft"] += ok_ttft
        met["itl"] += ok_itl
        met["e2e"] += ok_e2e
        ok = ok_ttft and ok_itl and ok_e2e
        met["all"] += ok
        book.met += ok
        self.drain_queue(m, self.now)

    def refuse(self, request: _Request, t: float, reason: str) -> None:
        m = request.model
        m.refused += 1
        m.refused_by[reason] = m.refused_by.get(reason, 0) + 1
        request.tenant.refused[reason] += 1
        if request.ticket is not None:
            self.quotas.settle(request.ticket, tokens=0, cost_usd=0.0)  # owes nothing
        self.in_system -= 1

    # Replicas and scaling.

    def ready(self, replica: _Replica, t: float) -> None:
        m = replica.model
        replica.ready = True
        m.routable.append(replica)
        if not m.calibrated:
            calibrate = getattr(m.policy, "calibrate", None)
            if calibrate is not None:
                perf = replica.params.perf
                calibrate(perf.prefill_tokens_per_s(), perf.request_overhead_s)
            m.calibrated = True
        self.unhold(m, t)
        self.drain_queue(m, t)

    def start_replica(self, m: _Model, index: int, t: float) -> _Replica:
        placement = self.placements.get(ReplicaKey(m.name, index))
        params = m.sized.engine(placement)
        m.created += 1
        engine = EngineModel(params.perf, params.kv_tokens, params.max_num_seqs)
        engine.now = t
        replica = _Replica(f"{m.name}-{m.created}", m, engine, params, t)
        m.spans.append(replica)
        # On GPUs a preempted job still holds, the engine starts once the job has exited.
        begin = t if self.jobs is None else self.jobs.handover(placement, t, m.sized.startup_s)
        self.push(begin + m.sized.startup_s, _READY, replica)
        return replica

    def end_replica(self, replica: _Replica, t: float) -> None:
        if replica.ended_at is not None:
            return
        if replica.busy_since is not None:
            replica.busy_s += t - replica.busy_since
            replica.busy_since = None
        replica.ended_at = t
        m = replica.model
        if replica in m.replicas:
            m.replicas.remove(replica)
        if replica in m.routable:
            m.routable.remove(replica)
        m.policy.forget(replica.id)

    def stop_replica(self, replica: _Replica, t: float) -> None:
        m = replica.model
        replica.stopping = True
        m.replicas.remove(replica)
        if replica in m.routable:
            m.routable.remove(replica)
        if not replica.in_flight:
            self.end_replica(replica, t)

    def wake(self, m: _Model, t: float) -> None:
        m.state = dataclasses.replace(m.state, desired=1, last_active=t)
        wants = {other.name: other.state.desired for other in self.fleet}
        self.rescale(t, wants, "a request is waiting for a replica")

    def tick(self, t: float) -> None:
        wants: dict[str, int] = {}
        reasons: dict[str, str] = {}
        for m in self.fleet:
            ready = len(m.routable)
            usage = [r.engine.cache.usage for r in m.routable]
            ttft_p90 = None
            if m.recent_ttfts:
                ordered = sorted(m.recent_ttfts)
                ttft_p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
            sample = Sample(
                t,
                float(m.in_flight + m.queued),
                m.arrivals,
                sum(usage) / len(usage) if usage else None,
                float(sum(r.engine.waiting for r in m.routable)),
                ttft_p90,
            )
            m.arrivals = 0
            m.recent_ttfts.clear()
            plugged = self.scalers.get(m.name)
            if plugged is not None:
                want = plugged.decide(sample, ready, m.state.desired, t)
                m.state = dataclasses.replace(m.state, desired=want)
                wants[m.name], reasons[m.name] = want, plugged.name
                continue
            a = m.spec.autoscaling
            window = m.window
            window.append(sample)
            horizon = t - max(a.stable_window, a.panic_window)
            while window and window[0].t <= horizon:
                window.popleft()
            decision = decide(window, m.spec, m.state, ready, t)
            m.state = decision.state
            wants[m.name] = decision.desired
            reasons[m.name] = decision.reason
        self.rescale(t, wants, reasons)
        if self.jobs is not None:
            self.jobs.tick(t)

    def rescale(self, t: float, wants: dict[str, int], reasons: str | dict[str, str]) -> None:
        """Bound what the autoscaler wants by what the planner can place, then start or stop
        replicas to match (the controller's pass, with its reasons)."""
        if wants != self.last_wants:
            asked = {name: (self.models[name].spec, n) for name, n in wants.items()}
            self.bounds = self.capacity.bound(asked)
            self.placements = {p.replica: p for p in self.capacity.placements}
            self.last_wants = dict(wants)
            if self.jobs is not None:
                self.jobs.planned(t)  # the jobs it displaced are preempted
        for name, want in wants.items():
            m = self.models[name]
            reason = reasons if isinstance(reasons, str) else reasons[name]
            after, unschedulable = want, False
            bound = self.bounds.get(name)
            if bound is not None and bound[0] < want:
                after = max(bound[0], 0)
                m.state = dataclasses.replace(m.state, desired=after)
                if m.unplaced != bound[1]:
                    unschedulable = True
                    reason = f"wants {want} replicas; {bound[1]}"
                m.unplaced = m.last_unplaced = bound[1]
            elif want > 0:
                m.unplaced = None
            before = len(m.replicas)
            if after != before or unschedulable:
                self.events.append(ScaleEvent(t, name, before, after, reason, unschedulable))
            if after == before:
                continue
            m.count_change(t, before)
            while len(m.replicas) < after:
                m.replicas.append(self.start_replica(m, len(m.replicas), t))
            while len(m.replicas) > after:
                self.stop_replica(m.replicas[-1], t)
            m.count_change(t, len(m.replicas))

    # Results.

    def result(self, wall_s: float) -> SimResult:
        end = self.end
        spans: list[Span] = []
        usage: list[UsageTotals] = []
        by_type: dict[str, list[float]] = {}  # type → placed GPU-s, busy GPU-s
        lives: list[ReplicaSpan] = []
        for m in self.models.values():
            busy_cost, busy_gpu_s = m.charged, 0.0  # an external model's is its charges
            for r in m.spans:
                ended = r.ended_at if r.ended_at is not None else end
                p = r.params
                spans.append(Span(m.name, r.id, p.gpus, p.price_per_hour, r.started_at, ended))
                busy_cost += r.busy_s * p.price_per_hour / 3600
                busy_gpu_s += r.busy_s * p.gpus
                acc = by_type.setdefault(p.gpu_type or "cpu", [0.0, 0.0])
                acc[0] += (ended - r.started_at) * p.gpus
                acc[1] += r.busy_s * p.gpus
                lives.append(
                    ReplicaSpan(m.name, p.gpu_type or "cpu", p.gpus, r.started_at, ended, r.busy_s)
                )
            usage.append(
                UsageTotals(
                    m.name,
                    "",
                    "",
                    m.requests,
                    m.served,
                    m.prompt_tokens,
                    m.completion_tokens,
                    busy_gpu_s,
                    busy_cost,
                    0.0,
                )
            )
        inventory = inventory_gpus(self.inventory)
        per_token = [m.name for m in self.models.values() if m.hosted is not None]
        report = cost_report(
            spans, usage, since=0.0, until=end, by="model", inventory_gpus=inventory,
            per_token=per_token,
        )  # fmt: skip
        lines = {line.name: line for line in report.lines}
        models = [self.model_result(m, lines.get(m.name), end) for m in self.models.values()]
        overall = self.overall(models)
        gpus = []
        for gpu_type, count, price in inventory:
            placed, busy = by_type.get(gpu_type, [0.0, 0.0])
            gpus.append(
                GpuUse(
                    gpu_type,
                    count,
                    price,
                    placed / 3600,
                    busy / 3600,
                    max(0.0, count * end - placed) / 3600,
                )
            )
        return SimResult(
            end,
            self.objectives,
            models,
            overall,
            gpus,
            self.events,
            report.total_cost,
            report.fleet_idle_cost,
            self.settings.seed,
            wall_s,
            sorted(lives, key=lambda r: r.start),
            [self.tenants[name].result() for name in sorted(self.tenants)],
            report.per_token_cost,
        )

    def model_result(self, m: _Model, line: CostLine | None, end: float) -> ModelResult:
        arrived = m.requests
        slo = {k: v / arrived for k, v in m.met.items()} if arrived else {}
        placed = (line.placed_cost or 0.0) if line else 0.0
        return ModelResult(
            m.name,
            m.requests,
            m.served,
            m.refused,
            m.prompt_tokens,
            m.completion_tokens,
            m.cached_tokens,
            percentiles(m.ttft),
            percentiles(m.itl),
            percentiles(m.e2e),
            slo,
            m.replicas_max,
            m.replica_seconds / end if end > 0 else float(len(m.replicas)),
            (line.gpu_hours_placed or 0.0) if line else 0.0,
            sum(r.busy_s * r.params.gpus for r in m.spans) / 3600,
            placed,
            line.busy_cost if line else 0.0,
            line.cost_per_successful_request if line else None,
            line.cost_per_million_tokens if line else None,
            m.last_unplaced,
            dict(sorted(m.refused_by.items())),
            line.per_token_cost if line else 0.0,
        )

    def overall(self, models: list[ModelResult]) -> ModelResult:
        every = list(self.models.values())
        arrived = sum(m.requests for m in models)
        met = {k: sum(m.met[k] for m in every) for k in ("ttft", "itl", "e2e", "all")}
        placed = sum(m.cost_placed for m in models)
        per_token = sum(m.cost_per_token for m in models)
        cost = placed + per_token
        served = sum(m.served for m in models)
        refused_by: dict[str, int] = {}
        for m in models:
            for reason, n in m.refused_by.items():
                refused_by[reason] = refused_by.get(reason, 0) + n
        tokens = sum(m.prompt_tokens + m.completion_tokens for m in models)
        return ModelResult(
            "(all)",
            arrived,
            served,
            sum(m.refused for m in models),
            sum(m.prompt_tokens for m in models),
            sum(m.completion_tokens for m in models),
            sum(m.cached_tokens for m in models),
            percentiles([x for m in every for x in m.ttft]),
            percentiles([x for m in every for x in m.itl]),
            percentiles([x for m in every for x in m.e2e]),
            {k: v / arrived for k, v in met.items()} if arrived else {},
            sum(m.replicas_max for m in models),
            sum(m.replicas_mean for m in models),
            sum(m.gpu_hours_placed for m in models),
            sum(m.gpu_hours_busy for m in models),
            placed,
            sum(m.cost_busy for m in models),
            cost / served if served else None,
            cost / tokens * 1e6 if tokens else None,
            None,
            dict(sorted(refused_by.items())),
            per_token,
        )


def simulate(
    models: Sequence[SimModel],
    inventory: Inventory,
    trace: Iterable[TraceRequest],
    objectives: Objectives | None = None,
    settings: SimSettings | None = None,
    tenants: Iterable[Tenant | SimTenant] = (),
    jobs: SimJobs | None = None,
) -> SimResult:
    """Run ``trace`` (sorted by arrival; read lazily) through a fleet of ``models`` placed on
    ``inventory``, with ``tenants``' quotas and shares and GPU ``jobs`` on what the models leave
    free (their outcome: ``jobs.result()``), in virtual time, and report what it served, how
    fast, and what it cost."""
    sim = _Simulation(
        models,
        inventory,
        trace,
        objectives or Objectives(),
        settings or SimSettings(),
        tenants,
        jobs,
    )
    started = time.perf_counter()
    sim.run()
    return sim.result(time.perf_counter() - started)
