"""The gateway's KV-event subscriber against a scripted publisher on real ZeroMQ sockets: lost,
repeated and undecodable batches, replays, restarts — the index is never left believing a
block the engine may have dropped."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import zmq
import zmq.asyncio

from gpufleet.gateway.kv_subscriber import KvEventSubscriber, connect_endpoint
from gpufleet.routing.kv_events import (
    AllBlocksCleared,
    BlockStored,
    EventBatch,
    KvBlockIndex,
    block_keys,
    encode_batch,
)
from tests.conftest import eventually

TOPIC = b"kv-events"
END = (-1).to_bytes(8, "big", signed=True)


def block(i: int) -> list[int]:
    return [i] * 4


def store(i: int) -> bytes:
    """A batch storing block ``i`` (tokens ``[i] * 4``) as the first of a sequence."""
    event = BlockStored((1000 + i,), None, tuple(block(i)), 4, None, "GPU", None)
    return encode_batch(EventBatch(float(i), (event,), 0))


class Publisher:
    """An engine's publisher, by hand: an XPUB (to know the subscription arrived) and
    optionally vLLM's replay ROUTER, answering from ``kept``."""

    def __init__(self, replay: bool) -> None:
        ctx = zmq.asyncio.Context.instance()
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind("tcp://127.0.0.1:*")
        self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.router = None
        self.replay_endpoint = None
        if replay:
            self.router = ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.bind("tcp://127.0.0.1:*")
            self.replay_endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.kept: dict[int, bytes] = {}

    async def subscribed(self) -> None:
        assert (await self.pub.recv())[:1] == b"\x01"

    async def send(self, seq: int, payload: bytes, *, keep: bool = True) -> None:
        if keep:
            self.kept[seq] = payload
        await self.pub.send_multipart((TOPIC, seq.to_bytes(8, "big"), payload))

    async def answer_replay(self) -> int:
        assert self.router is not None
        client, empty, start = await self.router.recv_multipart()
        first = int.from_bytes(start, "big")
        for seq in sorted(s for s in self.kept if s >= first):
            await self.router.send_multipart(
                (client, empty, seq.to_bytes(8, "big"), self.kept[seq])
            )
        await self.router.send_multipart((client, empty, END, b""))
        return first

    def close(self) -> None:
        self.pub.close(linger=0)
        if self.router is not None:
            self.router.close(linger=0)


@asynccontextmanager
async def following(replay: bool = False) -> AsyncIterator[tuple[Publisher, KvEventSubscriber]]:
    pub = Publisher(replay)
    index = KvBlockIndex()
    sub = KvEventSubscriber(index, "r", pub.endpoint, replay_endpoint=pub.replay_endpoint)
    await sub.start()
    try:
        await pub.subscribed()
        yield pub, sub
    finally:
        await sub.close()
        pub.close()


def held(sub: KvEventSubscriber, *blocks: int) -> list[int]:
    return [sub.index.matched("r", block_keys(block(i), 4)) for i in blocks]


async def test_batches_in_order_are_applied() -> None:
    async with following() as (pub, sub):
        for seq in range(3):
            await pub.send(seq, store(seq))
        await eventually(lambda: sub.stats().batches == 3, "three batches")
        assert held(sub, 0, 1, 2) == [1, 1, 1]
        stats = sub.stats()
        assert (stats.gaps, stats.resets, stats.last_sequence) == (0, 0, 2)
        assert sub.subscribed()


async def test_a_gap_without_replay_resets_the_replica() -> None:
    async with following() as (pub, sub):
        await pub.send(0, store(0))
        await pub.send(2, store(2))  # 1 lost: it might have removed block 0
        await eventually(lambda: sub.stats().batches == 2, "two batches")
        assert held(sub, 0, 2) == [0, 1]
        stats = sub.stats()
        assert (stats.gaps, stats.resets, stats.last_sequence) == (1, 1, 2)


async def test_a_gap_closed_by_replay_keeps_everything() -> None:
    async with following(replay=True) as (pub, sub):
        await pub.send(0, store(0))
        await eventually(lambda: sub.stats().batches == 1, "the first batch")
        pub.kept[1] = store(1)  # published, never received
        await pub.send(2, store(2))
        assert await pub.answer_replay() == 1
        await eventually(lambda: sub.stats().batches == 3, "the replayed batch and the next")
        assert held(sub, 0, 1, 2) == [1, 1, 1]
        stats = sub.stats()
        assert (stats.gaps, stats.resets, stats.replays, stats.replayed_batches) == (1, 0, 1, 1)


async def test_a_replay_that_cannot_close_the_gap_keeps_only_the_tail() -> None:
    async with following(replay=True) as (pub, sub):
        await pub.send(0, store(0))
        await eventually(lambda: sub.stats().batches == 1, "the first batch")
        pub.kept.update({2: store(2)})  # 1 is gone from the publisher's buffer too
        await pub.send(3, store(3))
        await pub.answer_replay()
        await eventually(lambda: sub.stats().last_sequence == 3, "caught up")
        assert held(sub, 0, 2, 3) == [0, 1, 1]
        assert sub.stats().resets == 1


async def test_the_first_batch_replays_the_history_before_it() -> None:
    async with following(replay=True) as (pub, sub):
        pub.kept.update({0: store(0), 1: store(1)})  # before this subscriber came
        await pub.send(2, store(2))
        assert await pub.answer_replay() == 0
        await eventually(lambda: sub.stats().batches == 3, "history and the batch")
        assert held(sub, 0, 1, 2) == [1, 1, 1]


async def test_a_sequence_that_goes_back_is_a_restart() -> None:
    async with following() as (pub, sub):
        await pub.send(0, store(0))
        await pub.send(1, store(1))
        await pub.send(0, store(5))  # a new engine process: its cache started empty
        await eventually(lambda: sub.stats().batches == 3, "three batches")
        assert held(sub, 0, 1, 5) == [0, 0, 1]
        assert (sub.stats().gaps, sub.stats().last_sequence) == (1, 0)


async def test_bad_messages_are_counted_and_the_stream_goes_on() -> None:
    async with following() as (pub, sub):
        await pub.send(0, store(0))
        await pub.pub.send_multipart((TOPIC, b"\x00"))  # not [topic, seq, payload]
        await pub.send(1, b"\xc1")  # not msgpack: batch 1 is lost
        await pub.send(2, encode_batch(EventBatch(2.0, (AllBlocksCleared(),))))
        await pub.send(3, store(3))
        await eventually(lambda: sub.stats().last_sequence == 3, "past the bad ones")
        stats = sub.stats()
        assert stats.errors == {"frame": 1, "msgpack": 1}
        assert held(sub, 0, 3) == [0, 1] and stats.gaps == 0


async def test_a_longer_topic_sharing_the_prefix_is_not_ours() -> None:
    async with following() as (pub, sub):
        await pub.pub.send_multipart((TOPIC + b"-other", (0).to_bytes(8, "big"), store(9)))
        await pub.send(0, store(0))
        await eventually(lambda: sub.stats().batches == 1, "our batch")
        assert held(sub, 9, 0) == [0, 1]


async def test_a_vanished_publisher_resets_the_replica() -> None:
    async with following() as (pub, sub):
        await pub.send(0, store(0))
        await eventually(lambda: held(sub, 0) == [1], "indexed")
        pub.pub.close(linger=0)
        await eventually(lambda: not sub.subscribed(), "disconnected")
        assert held(sub, 0) == [0]


def test_connect_endpoint_puts_the_host_in_a_wildcard() -> None:
    assert connect_endpoint("tcp://*:5557", "10.0.0.7") == "tcp://10.0.0.7:5557"
    assert connect_endpoint("tcp://0.0.0.0:5557", "engine-0.svc") == "tcp://engine-0.svc:5557"
    assert connect_endpoint("tcp://*:5557", "fd00::7") == "tcp://[fd00::7]:5557"
    assert connect_endpoint("tcp://10.1.1.1:5557", "10.0.0.7") == "tcp://10.1.1.1:5557"
    assert connect_endpoint("ipc:///tmp/kv", "x") == "ipc:///tmp/kv"
