"""Routing policies on constructed endpoint states: ties, saturation, prefixes, sessions."""

from __future__ import annotations

from collections import Counter

import pytest

from gpufleet.routing import (
    POLICIES,
    Endpoint,
    RequestFeatures,
    features_of,
    make_policy,
    prompt_blocks,
)
from gpufleet.routing.chwbl import Chwbl
from gpufleet.routing.prefix import BLOCK_TOKENS, PrefixAware
from gpufleet.spec import RoutingSpec


def eps(*loads: int, backlog: tuple[int, ...] = ()) -> list[Endpoint]:
    return [
        Endpoint(f"r{i}", in_flight=n, backlog_tokens=backlog[i] if backlog else 0)
        for i, n in enumerate(loads)
    ]


def req(text: str, session: str | None = None) -> RequestFeatures:
    return features_of({"model": "m", "messages": [{"role": "user", "content": text}]}, session)


def test_spec_names_every_registered_policy() -> None:
    names = set(RoutingSpec.model_fields["policy"].annotation.__args__)  # type: ignore[union-attr]
    assert names == set(POLICIES)
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'"):
        make_policy("fastest")


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_no_endpoint_means_no_choice(name: str) -> None:
    assert make_policy(name).pick(req("hi"), [], 0.0) is None


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_single_endpoint_is_always_chosen(name: str) -> None:
    assert make_policy(name).pick(req("hi"), eps(7), 0.0).endpoint == "r0"  # type: ignore[union-attr]


def test_round_robin_cycles() -> None:
    policy = make_policy("round-robin")
    assert [policy.pick(req("x"), eps(0, 0, 0), 0).endpoint for _ in range(6)] == [
        "r0",
        "r1",
        "r2",
    ] * 2  # type: ignore[union-attr]


def test_least_outstanding_takes_the_least_and_rotates_ties() -> None:
    policy = make_policy("least-outstanding")
    assert policy.pick(req("x"), eps(3, 1, 2), 0).endpoint == "r1"  # type: ignore[union-attr]
    picks = Counter(policy.pick(req("x"), eps(2, 2, 5), 0).endpoint for _ in range(10))  # type: ignore[union-attr]
    assert set(picks) == {"r0", "r1"} and abs(picks["r0"] - picks["r1"]) <= 1
    waiting = [Endpoint("a", in_flight=0, waiting=4), Endpoint("b", in_flight=1)]
    assert policy.pick(req("x"), waiting, 0).endpoint == "b"  # type: ignore[union-attr]


def test_power_of_two_never_takes_the_worse_of_its_pair() -> None:
    policy = make_policy("power-of-two")
    picks = Counter(policy.pick(req("x"), eps(0, 9), 0).endpoint for _ in range(50))  # type: ignore[union-attr]
    assert picks == {"r0": 50}


def test_chwbl_is_sticky_per_prefix_and_bounded() -> None:
    policy = Chwbl()
    first = policy.pick(req("same question"), eps(0, 0, 0, 0), 0)
    assert first is not None
    assert all(
        policy.pick(req("same question"), eps(0, 0, 0, 0), 0).endpoint == first.endpoint
        for _ in range(5)
    )  # type: ignore[union-attr]
    spread = {policy.pick(req(f"question {i}"), eps(0, 0, 0, 0), 0).endpoint for i in range(40)}  # type: ignore[union-attr]
    assert len(spread) == 4
    # Its owner over the bound (1 + 1)/4 × 1.25 → 1: the walk moves on.
    loads = [5 if f"r{i}" == first.endpoint else 0 for i in range(4)]
    moved = policy.pick(req("same question"), eps(*loads), 0)
    assert moved is not None and moved.endpoint != first.endpoint


def test_chwbl_never_exceeds_its_load_bound() -> None:
    """(total + 1) / n × 1.25 with loads 9, 0, 0 is 4: the busy replica owns no key now."""
    policy = Chwbl()
    picks = {policy.pick(req(f"key {i}"), eps(9, 0, 0), 0).endpoint for i in range(60)}  # type: ignore[union-attr]
    assert picks == {"r1", "r2"}


def test_prefix_policy_with_everything_busy_takes_the_shortest_wait() -> None:
    choice = PrefixAware().pick(req("x" * 400), eps(9, 3, 9, backlog=(5000, 1000, 5000)), 0)
    assert choice is not None and choice.endpoint == "r1"


def test_prefix_policy_follows_the_cached_prefix() -> None:
    policy = PrefixAware()
    system = "You are the support assistant of a large shipping company. " * 40
    first = req(system + "Where is my parcel?")
    c1 = policy.pick(first, eps(0, 0, 0, 0), 0)
    assert c1 is not None and c1.cached_blocks == 0
    policy.record(first, c1)
    second = req(system + "Can I change the address?")
    c2 = policy.pick(second, eps(0, 0, 0, 0), 0)
    assert c2 is not None and c2.endpoint == c1.endpoint and c2.cached_blocks >= 30
    assert "cached blocks" in c2.reason


def test_prefix_policy_spills_when_the_cached_replica_is_saturated() -> None:
    policy = PrefixAware(prefill_tokens_per_s=1000)
    system = "Shared context for every user of this tenant. " * 60
    first = req(system + "q1")
    policy.record(first, policy.pick(first, eps(0, 0), 0))  # type: ignore[arg-type]
    cached_on = "r0" if policy.matched("r0", first.blocks) else "r1"
    other = "r1" if cached_on == "r0" else "r0"
    follow = req(system + "q2")
    saving = policy.matched(cached_on, follow.blocks) * BLOCK_TOKENS
    light = {cached_on: 0, other: 0}
    assert (
        policy.pick(follow, [Endpoint(k, backlog_tokens=v) for k, v in light.items()], 0).endpoint
        == cached_on
    )  # type: ignore[union-attr]
    heavy = {cached_on: saving * 3, other: 0}
    spilled = policy.pick(follow, [Endpoint(k, backlog_tokens=v) for k, v in heavy.items()], 0)
    assert (
        spilled is not None and spilled.endpoint == other and spilled.reason.startswith("spilled")
    )


def test_prefix_policy_forgets_a_gone_replica() -> None:
    policy = PrefixAware()
    r = req("x" * 400)
    policy.record(r, policy.pick(r, eps(0), 0))  # type: ignore[arg-type]
    assert policy.matched("r0", r.blocks) > 0
    policy.forget("r0")
    assert policy.matched("r0", r.blocks) == 0


def test_prefix_index_is_bounded_lru() -> None:
    policy = PrefixAware(capacity_blocks=10)
    a, b = req("a" * 640), req("b" * 640)  # ten blocks each
    policy.record(a, policy.pick(a, eps(0), 0))  # type: ignore[arg-type]
    policy.record(b, policy.pick(b, eps(0), 0))  # type: ignore[arg-type]
    assert policy.matched("r0", b.blocks) == 10 and policy.matched("r0", a.blocks) == 0


def test_session_affinity_is_sticky_and_moves_only_for_lost_replicas() -> None:
    policy = make_policy("session")
    before = {
        s: policy.pick(req("x", session=f"s{s}"), eps(0, 0, 0, 0), 0).endpoint for s in range(40)
    }  # type: ignore[union-attr]
    assert len(set(before.values())) == 4
    again = {
        s: policy.pick(req("y", session=f"s{s}"), eps(5, 0, 9, 0), 0).endpoint for s in range(40)
    }  # type: ignore[union-attr]
    assert again == before  # load does not move a session
    three = [e for e in eps(0, 0, 0, 0) if e.id != "r2"]
    after = {s: policy.pick(req("x", session=f"s{s}"), three, 0).endpoint for s in range(40)}  # type: ignore[union-attr]
    assert all(after[s] == before[s] for s in before if before[s] != "r2")


def test_blocks_chain_so_only_shared_prefixes_match() -> None:
    a = prompt_blocks("A" * 64 + "B" * 64 + "C" * 64)
    b = prompt_blocks("A" * 64 + "X" * 64 + "C" * 64)
    assert a[0] == b[0] and a[1] != b[1] and a[2] != b[2]
    assert prompt_blocks("short") == ()


def test_features_render_chat_stably() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "S" * 100},
            {"role": "user", "content": "hello"},
        ],
    }
    f = features_of(body)
    assert f == features_of(dict(body))
    assert f.prefix_key == "m:hello" and f.prompt_tokens > 25 and len(f.blocks) == 1


def test_prefill_fit_recovers_rate_and_overhead() -> None:
    import random as rnd

    from gpufleet.routing.prefill import PrefillFit

    fit = PrefillFit()
    r = rnd.Random(3)
    for i in range(15):
        fit.observe(100 + 50 * i, 0.02 + (100 + 50 * i) / 500)
    assert fit.estimate() is None  # too few samples yet
    for _ in range(60):
        tokens = r.randint(50, 2000)
        fit.observe(tokens, (0.02 + tokens / 500) * r.uniform(0.95, 1.05))
    estimate = fit.estimate()
    assert estimate is not None
    rate, overhead = estimate
    assert 450 < rate < 550 and 0 <= overhead < 0.2
    # The fleet changes (a faster GPU): recent samples win.
    for _ in range(300):
        tokens = r.randint(50, 2000)
        fit.observe(tokens, 0.01 + tokens / 5000)
    rate, _ = fit.estimate() or (0.0, 0.0)
    assert 4000 < rate < 6000


def test_prefill_fit_refuses_to_guess() -> None:
    from gpufleet.routing.prefill import PrefillFit

    same = PrefillFit()
    for _ in range(40):
        same.observe(500, 0.1)  # one prompt size: no slope to see
    assert same.estimate() is None
    backwards = PrefillFit()
    for i in range(40):
        backwards.observe(100 * i, 1.0 - 0.01 * i)  # longer prompts faster: noise, not prefill
    assert backwards.estimate() is None
