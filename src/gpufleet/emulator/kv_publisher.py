"""The emulator's KV-cache event publisher: vLLM's ``--kv-events-config``, on the same wire.

A replica started with ``--kv-events-config '{"enable_kv_cache_events": true, "publisher":
"zmq", "endpoint": "tcp://*:5557", "topic": "kv-events"}'`` publishes what its KV cache stores
and evicts (``kvcache.BlockEventLog``) as vLLM 0.32 does, byte for byte in shape: ZeroMQ
multipart ``[topic, sequence (8 bytes, big-endian, from 0), msgpack EventBatch]``
(``routing.kv_events.encode_batch``), one batch per wake-up of the publishing loop — everything
the cache did since the last one, as vLLM sends one batch per engine step. As in vLLM, an
endpoint with ``*`` or ``::`` (or ``ipc://``/``inproc://``) is bound, any other is connected
to; a ``replay_endpoint`` is a ROUTER that answers ``[b"", start sequence]`` with every kept
batch from there (``buffer_steps`` of them) and an end marker of sequence −1, vLLM's replay
protocol. The socket is an XPUB, which a SUB cannot tell from vLLM's PUB: it lets the replica
count subscriptions, so tests wait until a subscriber is really attached instead of sleeping.

Several replicas in one process (``--replicas``): replica *i* publishes on the endpoint's port
+ *i* (and its replay port + *i*), as vLLM offsets a data-parallel rank's ports; an endpoint
ending in ``:*`` binds an ephemeral port for each. ``endpoint`` is where this replica really
listens, which ``GET /kv_event_sources`` reports. ``max_queue_size`` is accepted and unused:
batches are sent from the event loop as they form, with no queue between.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import zmq
import zmq.asyncio

from gpufleet.emulator.kvcache import BlockEventLog
from gpufleet.routing.kv_events import EventBatch, encode_batch
from gpufleet.supervise import Supervisor

__all__ = ["END_SEQ", "KvEventPublisher", "KvEventsConfig", "parse_kv_events_config"]

log = logging.getLogger("gpufleet.emulator.kv_events")

#: The replay answer's last message carries this sequence (−1) and an empty payload.
END_SEQ = (-1).to_bytes(8, "big", signed=True)


@dataclass(frozen=True, slots=True)
class KvEventsConfig:
    """vLLM's ``KVEventsConfig``: its fields, defaults and JSON names."""

    enable_kv_cache_events: bool = False
    publisher: Literal["null", "zmq"] | None = None  # None: "zmq" when enabled, else "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @property
    def publishes(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"

    def for_replica(self, i: int) -> KvEventsConfig:
        """Replica ``i``'s endpoints: the ports offset by ``i`` (vLLM's data-parallel rule)."""
        return replace(
            self,
            endpoint=_offset(self.endpoint, i),
            replay_endpoint=_offset(self.replay_endpoint, i) if self.replay_endpoint else None,
        )

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_kv_events_config(text: str) -> KvEventsConfig:
    """``--kv-events-config``'s JSON; raises ``ValueError`` naming the field at fault."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--kv-events-config is not JSON: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise ValueError("--kv-events-config must be a JSON object")
    fields = KvEventsConfig.__dataclass_fields__
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(
            f"--kv-events-config: unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}"
        )
    kinds: dict[str, tuple[type, ...]] = {"enable_kv_cache_events": (bool,), "endpoint": (str,),
        "replay_endpoint": (str, type(None)), "buffer_steps": (int,), "hwm": (int,),
        "max_queue_size": (int,), "topic": (str,), "publisher": (str, type(None))}  # fmt: skip
    for name, value in raw.items():
        if not isinstance(value, kinds[name]) or (
            isinstance(value, bool) and bool not in kinds[name]
        ):
            raise ValueError(f"--kv-events-config: {name} has the wrong type ({value!r})")
    publisher = raw.get("publisher")
    if publisher not in (None, "null", "zmq"):
        raise ValueError(
            f"--kv-events-config: publisher must be 'null' or 'zmq' (got {publisher!r})"
        )
    config = KvEventsConfig(**raw)
    if config.publisher is None:
        config = replace(config, publisher="zmq" if config.enable_kv_cache_events else "null")
    if config.buffer_steps < 1 or config.hwm < 0:
        raise ValueError("--kv-events-config: buffer_steps must be ≥ 1 and hwm ≥ 0")
    _check_endpoint("endpoint", config.endpoint)
    if config.replay_endpoint is not None:
        _check_endpoint("replay_endpoint", config.replay_endpoint)
    return config


def _offset(endpoint: str, i: int) -> str:
    if i == 0:
        return endpoint
    if endpoint.startswith(("ipc://", "inproc://")):
        return f"{endpoint}_dp{i}"
    head, _, port = endpoint.rpartition(":")
    return endpoint if port == "*" else f"{head}:{int(port) + i}"


def _check_endpoint(name: str, endpoint: str) -> None:
    if endpoint.startswith(("ipc://", "inproc://")):
        return
    port = endpoint.rpartition(":")[2]
    if not endpoint.startswith("tcp://") or not (port == "*" or port.isdigit()):
        raise ValueError(
            f"--kv-events-config: {name} must be tcp://HOST:PORT (HOST or PORT may be *), "
            f"ipc:// or inproc:// (got {endpoint!r})"
        )


def _binds(endpoint: str) -> bool:
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KvEventPublisher:
    """Publishes one replica's ``BlockEventLog`` on ZeroMQ until closed."""

    def __init__(
        self,
        config: KvEventsConfig,
        events: BlockEventLog,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.events = events
        self._clock = clock
        self._topic = config.topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._ctx = zmq.asyncio.Context.instance()
        self._pub: zmq.asyncio.Socket | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._loops = Supervisor()
        self._wake = asyncio.Event()
        #: Where the publisher really listens (bound) or connects, once started.
        self.endpoint = config.endpoint
        self.replay_endpoint = config.replay_endpoint
        self.sequence = 0  # the next batch's
        self.subscriptions = 0  # subscribe messages received (XPUB), minus unsubscribes
        self.batches = 0

    async def start(self) -> None:
        pub = self._ctx.socket(zmq.XPUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, self.config.hwm)
        pub.setsockopt(zmq.XPUB_VERBOSER, 1)  # every (un)subscribe reaches us, for counting
        if _binds(self.config.endpoint):
            pub.bind(self.config.endpoint)
            self.endpoint = _bound(self.config.endpoint, pub)
        else:
            pub.connect(self.config.endpoint)
        self._pub = pub
        if self.config.replay_endpoint is not None:
            replay = self._ctx.socket(zmq.ROUTER)
            replay.setsockopt(zmq.LINGER, 0)
            replay.bind(self.config.replay_endpoint)
            self.replay_endpoint = _bound(self.config.replay_endpoint, replay)
            self._replay = replay
            self._loops.spawn(f"kv-events-replay:{self.replay_endpoint}", self._serve_replay,
                              critical=False)  # fmt: skip
        self.events.on_pending = self._wake.set
        name = f"kv-events:{self.endpoint}"
        self._loops.spawn(name, self._publish, critical=False)
        self._loops.spawn(f"{name}:subscriptions", self._follow_subscriptions, critical=False)

    async def close(self) -> None:
        self.events.on_pending = None
        await self._loops.close()
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._replay = None

    def sources(self) -> dict[str, dict[str, Any]]:
        """``GET /kv_event_sources`` as vLLM answers it: the config per data-parallel rank (one
        replica is rank 0), with the endpoints this replica really uses."""
        config = replace(self.config, endpoint=self.endpoint, replay_endpoint=self.replay_endpoint)
        return {"0": config.as_json()}

    async def _publish(self) -> None:
        assert self._pub is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            events = self.events.drain()
            if not events:
                continue
            payload = encode_batch(EventBatch(self._clock(), tuple(events), 0))
            seq = self.sequence
            self.sequence += 1
            self._buffer.append((seq, payload))
            await self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
            self.batches += 1

    async def _follow_subscriptions(self) -> None:
        assert self._pub is not None
        while True:
            message = await self._pub.recv()
            if message[:1] == b"\x01":
                self.subscriptions += 1
            elif message[:1] == b"\x00":
                self.subscriptions -= 1

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning(
                    "kv-events replay: ignored a malformed request (%d frames)", len(frames)
                )
                continue
            client, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= first:
                    await self._replay.send_multipart(
                        (client, b"", seq.to_bytes(8, "big"), payload)
                    )
            await self._replay.send_multipart((client, b"", END_SEQ, b""))


def _bound(configured: str, sock: zmq.asyncio.Socket) -> str:
    """The configured endpoint with the port it got (``tcp://*:*`` → ``tcp://*:40123``): the
    host stays as given, ``*`` included, as vLLM reports it; a subscriber puts the replica's
    host there (``gateway.kv_subscriber.connect_endpoint``)."""
    if not configured.startswith("tcp://"):
        return configured
    port = sock.getsockopt_string(zmq.LAST_ENDPOINT).rpartition(":")[2]
    return f"{configured.rpartition(':')[0]}:{port}"
