"""What a routing policy sees and returns; the registry of policies by name.

A policy is a small class with ``pick(request, endpoints, now) -> Choice | None`` over plain
values, and ``record(request, choice)`` to learn from its own decisions (the prefix index). No
I/O, no clock of its own: the gateway, the tests and the simulator call the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar

__all__ = [
    "POLICIES",
    "Choice",
    "Endpoint",
    "RequestFeatures",
    "RoutingPolicy",
    "make_policy",
    "register",
]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One ready replica as the router sees it at this instant."""

    id: str
    #: Requests the gateway has in flight there (its own count: the freshest signal).
    in_flight: int = 0
    #: Uncached prompt tokens of those requests still to prefill, as the gateway estimates them.
    backlog_tokens: int = 0
    #: Of the requests in flight, those still waiting for their first token.
    prefilling: int = 0
    #: From the engine's metrics when it has them (second signal, ≤ 250 ms old).
    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    #: Leading prompt blocks other gateways routed here (shared hints), if configured.
    hinted_blocks: int = 0
    #: Leading prompt blocks the engine itself reports cached (its KV-cache events: precise
    #: routing), in the policy's blocks of ``prefix.BLOCK_TOKENS`` tokens; None: not known,
    #: the policy estimates (approximate index, hints). When known it is the whole truth.
    cached_blocks: int | None = None


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    #: Chained hashes of the prompt's fixed-size blocks (see ``prefix.prompt_blocks``).
    blocks: tuple[int, ...] = ()
    #: Key for hash-based policies: the start of the first user message (KubeAI's choice).
    prefix_key: str = ""
    prompt_tokens: int = 0
    session: str | None = None


@dataclass(frozen=True, slots=True)
class Choice:
    endpoint: str
    reason: str
    cached_blocks: int = 0


class RoutingPolicy(Protocol):
    name: ClassVar[str]

    def pick(
        self, request: RequestFeatures, endpoints: Sequence[Endpoint], now: float
    ) -> Choice | None: ...

    def record(self, request: RequestFeatures, choice: Choice) -> None: ...

    def forget(self, endpoint: str) -> None: ...


POLICIES: dict[str, Callable[[], RoutingPolicy]] = {}


P = TypeVar("P", bound=RoutingPolicy)


def register(cls: type[P]) -> type[P]:
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str) -> RoutingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown routing policy {name!r}; known: {', '.join(sorted(POLICIES))}"
        ) from None
