"""One replica's KV-cache event stream into the gateway's ``KvBlockIndex``: a ZeroMQ SUB client.

The engine (vLLM with ``--kv-events-config``, or the emulator) publishes multipart
``[topic, sequence, payload]`` messages, sequence counting from 0 per engine process
(``routing.kv_events`` has the payload). A subscriber sees only what is published after its
subscription reaches the publisher, and a PUB socket drops messages when a subscriber falls
behind its high-water mark or is disconnected — so the sequence decides what the index may
believe:

- the next sequence: the batch is applied;
- a jump forward (messages lost): with a ``replay_endpoint`` the missing batches are asked for
  (vLLM's replay protocol: ``[b"", start]`` to its ROUTER, answered by ``[b"", seq, payload]``
  each and ``seq = −1`` last) and applied if they close the gap; otherwise the replica's index
  is reset, then the replayed tail (if any) and the batch are applied;
- a jump back (the engine restarted, its cache empty): reset;
- a disconnect (the engine gone, or the network): reset, since whether the engine lived on
  cannot be told;
- the first batch after a reset: applied; with a ``replay_endpoint``, the engine's kept history
  (vLLM keeps 10,000 batches) is replayed first, so blocks cached before the gateway subscribed
  count too.

After a reset the index holds only what later events prove, a subset of the engine's cache
(``KvBlockIndex``'s guarantee): routing may miss a cached prefix, never count one that is
gone. A payload that does not decode is a lost batch (reset); events of unknown types are
skipped; each kind of failure is counted and logged once. The receive loop runs under a
``Supervisor`` (restart with back-off), so no error ends the subscription for good; ZeroMQ
itself reconnects (100 ms, backing off to 5 s).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from gpufleet.routing.kv_events import EventBatch, KvBlockIndex, KvEventDecodeError, decode_batch
from gpufleet.supervise import Supervisor

__all__ = ["KvEventSubscriber", "SubscriberStats", "connect_endpoint"]

log = logging.getLogger("gpufleet.gateway.kv_events")

_END_SEQ = -1
#: Messages queued in the SUB socket before ZeroMQ drops (vLLM's publisher default: 100,000).
_RCVHWM = 100_000


def connect_endpoint(endpoint: str, host: str) -> str:
    """Where to connect for an engine's (bind) ``endpoint`` on ``host``: a wildcard host — as
    vLLM reports ``tcp://*:5557`` in ``GET /kv_event_sources`` — becomes ``host``."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    address, _, port = endpoint[len("tcp://") :].rpartition(":")
    if address in ("*", "0.0.0.0", "::", "[::]", "[*]"):
        address = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"tcp://{address}:{port}"


@dataclass(frozen=True, slots=True)
class SubscriberStats:
    """What one subscription has seen, for metrics and tests."""

    subscribed: bool
    batches: int  # applied, replayed ones included
    events: int
    skipped_events: int  # of unknown types or malformed
    gaps: int  # jumps in the sequence, forward or back
    resets: int  # the replica's index reset (gap not closed, disconnect, bad payload)
    replays: int  # replay requests made
    replayed_batches: int
    errors: dict[str, int]  # decode and frame failures by kind
    last_sequence: int | None


class KvEventSubscriber:
    """Follows one replica's KV events into ``index`` under ``replica_id`` until closed."""

    def __init__(
        self,
        index: KvBlockIndex,
        replica_id: str,
        endpoint: str,
        topic: str = "kv-events",
        *,
        replay_endpoint: str | None = None,
        replay_timeout_s: float = 2.0,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.index = index
        self.replica_id = replica_id
        self.endpoint = endpoint
        self.topic = topic
        self.replay_endpoint = replay_endpoint
        self.replay_timeout_s = replay_timeout_s
        self._ctx = context if context is not None else zmq.asyncio.Context.instance()
        self._loops = Supervisor()
        self._name = f"kv-events:{replica_id}"
        self._connected = False
        self._expected: int | None = None  # None: fresh (after a reset), any sequence starts
        self._logged: set[str] = set()
        self._batches = self._events = self._skipped = 0
        self._gaps = self._resets = self._replays = self._replayed = 0
        self._errors: dict[str, int] = {}

    async def start(self) -> None:
        self._loops.spawn(self._name, self._run, critical=False)

    async def close(self) -> None:
        await self._loops.close()

    def subscribed(self) -> bool:
        """Connected to the publisher (handshake done, not disconnected since)."""
        return self._connected

    def stats(self) -> SubscriberStats:
        last = self._expected - 1 if self._expected is not None else None
        return SubscriberStats(
            self._connected, self._batches, self._events, self._skipped, self._gaps,
            self._resets, self._replays, self._replayed, dict(self._errors), last,
        )  # fmt: skip

    # -- the loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, _RCVHWM)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        # Whatever came before this socket is unknown: start from nothing (not counted).
        self.index.reset(self.replica_id)
        self._expected = None
        try:
            sock.connect(self.endpoint)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._watch(monitor), name=f"{self._name}:monitor")
                tasks.create_task(self._receive(sock), name=f"{self._name}:receive")
        finally:
            self._connected = False
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                self._connected = False
                self._reset("disconnected")

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        topic = self.topic.encode()
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3 or len(frames[1]) != 8:
                self._error(
                    "frame", f"a message of {len(frames)} frames, not [topic, seq, payload]"
                )
                continue
            if frames[0] != topic:
                continue  # a longer topic that only shares our prefix
            await self._on_message(int.from_bytes(frames[1], "big"), frames[2])

    async def _on_message(self, seq: int, payload: bytes) -> None:
        expected = self._expected
        if expected is not None and seq != expected:
            self._gaps += 1
            if seq < expected:
                self._note("restart", f"sequence went back to {seq} (expected {expected}): "
                           "the engine restarted; its index starts again")  # fmt: skip
                self._reset("restarted")
                expected = None
            else:
                self._note("gap", f"missed batches {expected}..{seq - 1}")
                await self._close_gap(expected, seq)
        if expected is None and self.replay_endpoint is not None and seq > 0:
            await self._close_gap(0, seq)  # the engine's history before this batch
        try:
            batch = decode_batch(payload)
        except KvEventDecodeError as exc:
            self._error(exc.kind, str(exc))
            self._reset(f"batch {seq} did not decode")
            self._expected = seq + 1
            return
        self._apply(batch)
        self._expected = seq + 1

    async def _close_gap(self, first: int, upto: int) -> None:
        """Apply batches ``first``..``upto − 1`` from the replay endpoint; when they do not all
        come, reset and apply the contiguous run that ends at ``upto − 1``, if any."""
        got = await self._replay(first) if self.replay_endpoint is not None else []
        run = [(s, p) for s, p in got if first <= s < upto]
        closed = [s for s, _ in run] == list(range(first, upto))
        if not closed:
            if self._expected is not None:
                self._reset(f"batches {first}..{upto - 1} lost")
            tail: list[tuple[int, bytes]] = []
            for s, p in reversed(run):  # the run that ends just before ``upto``
                if s != upto - 1 - len(tail):
                    break
                tail.append((s, p))
            run = tail[::-1]
        for s, p in run:
            try:
                batch = decode_batch(p)
            except KvEventDecodeError as exc:
                self._error(exc.kind, str(exc))
                self._reset(f"replayed batch {s} did not decode")
                continue
            self._apply(batch)
            self._replayed += 1

    async def _replay(self, first: int) -> list[tuple[int, bytes]]:
        """The batches the publisher still keeps from ``first`` on ([] if it does not answer)."""
        assert self.replay_endpoint is not None
        self._replays += 1
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        got: list[tuple[int, bytes]] = []
        try:
            sock.connect(self.replay_endpoint)
            await sock.send_multipart((b"", first.to_bytes(8, "big")))
            async with asyncio.timeout(self.replay_timeout_s):
                while True:
                    frames = await sock.recv_multipart()
                    if len(frames) != 3 or len(frames[1]) != 8:
                        self._error("replay-frame", f"a replay message of {len(frames)} frames")
                        continue
                    seq = int.from_bytes(frames[1], "big", signed=True)
                    if seq == _END_SEQ:
                        return got
                    got.append((seq, frames[2]))
        except TimeoutError:
            self._note("replay-timeout", f"replay from {first} not answered within "
                       f"{self.replay_timeout_s:g} s at {self.replay_endpoint}")  # fmt: skip
            return []
        finally:
            sock.close(linger=0)

    # -- bookkeeping ------------------------------------------------------------------------

    def _apply(self, batch: EventBatch) -> None:
        self.index.apply(self.replica_id, batch)
        self._batches += 1
        self._events += len(batch.events)
        if batch.skipped:
            self._skipped += len(batch.skipped)
            for what in batch.skipped:
                self._note(f"skipped:{what.split(':')[0]}", f"skipped an event: {what}")

    def _reset(self, why: str) -> None:
        self.index.reset(self.replica_id)
        self._expected = None
        self._resets += 1
        log.debug("%s: index reset (%s)", self._name, why)

    def _error(self, kind: str, message: str) -> None:
        self._errors[kind] = self._errors.get(kind, 0) + 1
        self._note(f"error:{kind}", message)

    def _note(self, kind: str, message: str) -> None:
        """Log the first occurrence of each kind as a warning, the rest at debug level (the
        counters in ``stats`` say how many)."""
        if kind in self._logged:
            log.debug("%s: %s", self._name, message)
        else:
            self._logged.add(kind)
            log.warning("%s (%s): %s", self._name, self.endpoint, message)
