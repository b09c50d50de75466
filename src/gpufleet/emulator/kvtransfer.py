"""Prefill/decode disaggregation: vLLM's KV-transfer contract, the roles, and the links.

**The contract** (vLLM's ``NixlConnector`` with ``kv_role: kv_both``, driven by a proxy: llm-d,
NVIDIA Dynamo, AIBrix, vLLM's ``toy_proxy_server.py``; ``gateway.disagg`` here):

1. *Prefill call*: the client's body with ``max_tokens: 1``, ``stream: false`` and
   ``kv_transfer_params: {do_remote_decode: true, do_remote_prefill: false, remote_engine_id:
   null, remote_block_ids: null, remote_host: null, remote_port: null}``. The replica answers as
   usual plus a top-level ``kv_transfer_params`` (``offer``): ``{do_remote_prefill: true,
   do_remote_decode: false, remote_block_ids: [ints], remote_engine_id: str, remote_host: str,
   remote_port: int, tp_size: int}`` — vLLM's ``NixlConnector.request_finished``. A streamed
   prefill call is answered as a plain stream, without them (vLLM's stream chunks carry none).
2. *Decode call*: the client's body (streamed or not) with those ``kv_transfer_params``. The
   replica pulls the prompt's KV and decodes without prefilling (``model``: ``RemoteKV``). One
   whose ``remote_*`` fields are null or missing is served as a plain request (vLLM prefills
   it locally); unknown fields are ignored, as vLLM does.

``remote_block_ids`` are the prompt's full 16-token blocks' chained hashes cut to 53 bits
(``block_ids``), so they survive a proxy that reads JSON numbers as doubles (JavaScript, Go's
``any``), and a decode call whose ids are not its own prompt's — the proxy changed the prompt
between the two calls — is refused (400): a check vLLM's physical block ids cannot give, made
here so that such a proxy bug shows instead of decoding over another prompt's KV. The pull is
modelled time: the decode replica never calls the prefill replica, which does not hold the
blocks for it (they stay in its prefix cache, evictable, as any finished prompt's).

**Roles** are vLLM's ``kv_role`` names: ``kv_both`` (the default, and what gpufleet launches)
serves prefill calls, decode calls and plain requests; ``kv_producer`` refuses a decode call and
``kv_consumer`` a prefill call (400, OpenAI's error shape); both serve plain requests.

**What a pull costs**: ``latency + tokens × bytes per token ÷ bandwidth``, for the prompt tokens
not already in the decode replica's cache (its cached prefix is not pulled; the trailing partial
block is). KV bytes per token are the sizing layer's ``PerfModel.kv_bytes_per_token`` (2 ×
layers × KV heads × head dim × dtype bytes). NVLink, InfiniBand and RoCE are **per-GPU** links:
an HGX/DGX H100 node has one 400 Gb/s ConnectX-7 port per GPU, and each tensor-parallel rank
pulls its own shard over its own link, so ``min(TP here, TP there)`` links run in parallel, each
moving ``2 × layers × ⌈KV heads ÷ links⌉ × head dim × dtype bytes`` per token (heads that TP
replicates, as an MLA latent is, are moved by every rank). TCP is one NIC per **host**, shared by
every rank. Line rate is assumed (real transfers reach less: many small per-block, per-layer
descriptors); ``--kv-link-gbytes-per-s`` calibrates it.

Link figures (GB = 10⁹ bytes, one direction):

- ``nvlink``: 450 GB/s per GPU — NVLink 4 on H100 SXM, 900 GB/s total bidirectional (NVIDIA
  H100 datasheet). Within one NVLink domain only (an 8-GPU HGX node).
- ``infiniband``: 50 GB/s per GPU — NDR, 400 Gb/s per port (NVIDIA ConnectX-7 / Quantum-2;
  DGX H100 has eight such ports, one per GPU). **The default**: disaggregated pools (llm-d,
  Dynamo) place prefill and decode replicas on different nodes, so the KV crosses the GPU
  fabric; NVLink would make the transfer nearly free and hide the cost that decides whether
  disaggregation pays.
- ``roce``: 50 GB/s per GPU — 400 GbE, the same ConnectX-7 port in Ethernet mode.
- ``tcp``: 3.125 GB/s per host — 25 GbE, a typical front-end NIC, 25 × 10⁹ ÷ 8.

Per-transfer latencies are **estimates**, not measurements: a one-sided RDMA write takes a few
microseconds on the wire (perftest's ``ib_write_lat`` on ConnectX-class NICs), and NIXL adds
preparing descriptors, posting, and a completion notice to the prefill side, so tens of
microseconds: ``nvlink`` 10 µs, ``infiniband`` 25 µs, ``roce`` 30 µs (Ethernet switching and
congestion control add a little); ``tcp`` 500 µs (a kernel round trip in a data centre is
50–200 µs and the bytes are copied through host memory). ``--kv-transfer-latency-ms``
overrides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

from gpufleet.emulator.model import RemoteKV
from gpufleet.sizing.performance import PerfModel

__all__ = [
    "DEFAULT_KV_LINK",
    "KV_LINKS",
    "KV_ROLES",
    "BadTransferParams",
    "KVLink",
    "KVRole",
    "TransferParams",
    "block_ids",
    "kv_link",
    "offer",
    "refusal",
    "remote_kv",
]

_T = TypeVar("_T")

KVRole = Literal["kv_both", "kv_producer", "kv_consumer"]
KV_ROLES: tuple[KVRole, ...] = get_args(KVRole)


@dataclass(frozen=True, slots=True)
class KVLink:
    name: str
    gbytes_per_s: float  # one link, one direction, 10⁹ bytes/s
    latency_s: float  # per transfer
    per_gpu: bool  # one link per GPU (ranks pull in parallel), or one per host

    def __post_init__(self) -> None:
        if self.gbytes_per_s <= 0 or self.latency_s < 0:
            raise ValueError(f"a KV link needs bandwidth > 0 and latency ≥ 0 (got {self})")


KV_LINKS: dict[str, KVLink] = {
    link.name: link
    for link in (
        KVLink("nvlink", 450.0, 10e-6, per_gpu=True),
        KVLink("infiniband", 50.0, 25e-6, per_gpu=True),
        KVLink("roce", 50.0, 30e-6, per_gpu=True),
        KVLink("tcp", 3.125, 500e-6, per_gpu=False),
    )
}
DEFAULT_KV_LINK = "infiniband"


def kv_link(
    name: str = DEFAULT_KV_LINK,
    gbytes_per_s: float | None = None,
    latency_ms: float | None = None,
) -> KVLink:
    """The named link, its bandwidth or latency overridden where given."""
    base = KV_LINKS.get(name)
    if base is None:
        raise ValueError(f"unknown KV link {name!r}: one of {', '.join(KV_LINKS)}")
    return KVLink(
        name,
        base.gbytes_per_s if gbytes_per_s is None else gbytes_per_s,
        base.latency_s if latency_ms is None else latency_ms / 1000,
        base.per_gpu,
    )


def remote_kv(perf: PerfModel, link: KVLink, remote_tp: int | None = None) -> RemoteKV:
    """What a pull to a replica of ``perf`` costs from one of ``remote_tp`` GPUs (its own TP
    when unknown): the ranks pair up, each pair moving its shard."""
    a = perf.arch
    links = max(1, min(perf.tp, remote_tp or perf.tp))
    heads = -(-a.kv_heads // links)  # a rank holds at least one head: replicated past kv_heads
    per_link = 2 * a.layers * heads * a.head_dim * perf.kv_dtype_bytes
    lanes = links if link.per_gpu else 1
    return RemoteKV(links * per_link, lanes * link.gbytes_per_s * 1e9, link.latency_s)


def block_ids(hashes: Sequence[int]) -> list[int]:
    """The ids a prefill answer gives its prompt's full blocks: their hashes cut to 53 bits."""
    return [h >> 11 for h in hashes]


class BadTransferParams(ValueError):
    """``kv_transfer_params`` is malformed: a 400 naming the field (``field``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class TransferParams:
    """A request's ``kv_transfer_params``, checked."""

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: str | None = None
    remote_block_ids: tuple[int, ...] | None = None
    remote_host: str | None = None
    remote_port: int | None = None
    tp_size: int | None = None

    @property
    def prefill_call(self) -> bool:
        """Prefill here, then offer the KV to a decode elsewhere."""
        return self.do_remote_decode

    @property
    def decode_call(self) -> bool:
        """The prompt was prefilled elsewhere (whether or not it says where)."""
        return self.do_remote_prefill

    @property
    def pulls(self) -> bool:
        """A decode call that names where its KV is: pulled, not prefilled here."""
        return self.do_remote_prefill and None not in (
            self.remote_engine_id,
            self.remote_block_ids,
            self.remote_host,
            self.remote_port,
        )

    @classmethod
    def parse(cls, raw: object) -> TransferParams | None:
        """``raw`` from a request body; None when absent or null. Raises ``BadTransferParams``."""
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise BadTransferParams("kv_transfer_params", "kv_transfer_params must be an object")
        params = cls(
            do_remote_decode=_flag(raw, "do_remote_decode"),
            do_remote_prefill=_flag(raw, "do_remote_prefill"),
            remote_engine_id=_optional(raw, "remote_engine_id", str, "a string"),
            remote_block_ids=_block_ids(raw),
            remote_host=_optional(raw, "remote_host", str, "a string"),
            remote_port=_optional(raw, "remote_port", int, "an integer"),
            tp_size=_optional(raw, "tp_size", int, "an integer"),
        )
        if params.do_remote_decode and params.do_remote_prefill:
            raise BadTransferParams(
                "kv_transfer_params",
                "kv_transfer_params: do_remote_decode and do_remote_prefill cannot both be true",
            )
        if params.remote_port is not None and not 0 < params.remote_port < 65536:
            raise BadTransferParams(
                "kv_transfer_params.remote_port",
                "kv_transfer_params.remote_port must be a port number (1–65535)",
            )
        if params.tp_size is not None and params.tp_size < 1:
            raise BadTransferParams(
                "kv_transfer_params.tp_size", "kv_transfer_params.tp_size must be ≥ 1"
            )
        return params


def _flag(raw: dict[object, object], name: str) -> bool:
    value = raw.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadTransferParams(
            f"kv_transfer_params.{name}", f"kv_transfer_params.{name} must be a boolean"
        )
    return value


def _optional(raw: dict[object, object], name: str, kind: type[_T], what: str) -> _T | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):  # JSON true is no integer
        raise BadTransferParams(
            f"kv_transfer_params.{name}", f"kv_transfer_params.{name} must be {what}"
        )
    return value


def _block_ids(raw: dict[object, object]) -> tuple[int, ...] | None:
    value = raw.get("remote_block_ids")
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        raise BadTransferParams(
            "kv_transfer_params.remote_block_ids",
            "kv_transfer_params.remote_block_ids must be a list of integers",
        )
    return tuple(value)


def refusal(role: KVRole, params: TransferParams) -> BadTransferParams | None:
    """Why a replica of ``role`` refuses a call with ``params`` (a 400); None if it serves it."""
    if role == "kv_producer" and params.decode_call:
        return BadTransferParams(
            "kv_transfer_params.do_remote_prefill",
            "this replica is a KV producer (kv_role kv_producer): it refuses decode calls "
            "(kv_transfer_params.do_remote_prefill true); send them to a kv_consumer or kv_both",
        )
    if role == "kv_consumer" and params.prefill_call:
        return BadTransferParams(
            "kv_transfer_params.do_remote_decode",
            "this replica is a KV consumer (kv_role kv_consumer): it refuses prefill calls "
            "(kv_transfer_params.do_remote_decode true); send them to a kv_producer or kv_both",
        )
    return None


def offer(
    engine_id: str, hashes: Sequence[int], host: str, port: int, tp: int
) -> dict[str, object]:
    """A prefill answer's top-level ``kv_transfer_params``, as ``NixlConnector`` returns them."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": block_ids(hashes),
        "remote_engine_id": engine_id,
        "remote_host": host,
        "remote_port": port,
        "tp_size": tp,
    }
