"""One inference request as the request path carries it: the checked body, then what is sent.

``parse`` runs before anything else looks at a request (a malformed body is refused before the
model is even looked up); ``prepare`` runs once the model is known, since the tokens reserved
for the answer depend on its context length. Both are pure: no I/O, no clock.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpufleet.controller import ModelEntry
from gpufleet.gateway.auth import Principal
from gpufleet.gateway.errors import bad_request
from gpufleet.gateway.validate import check_chat, check_completion, check_embeddings, parse_body
from gpufleet.routing import RequestFeatures, features_of

__all__ = ["INFERENCE_ROUTES", "Outbound", "Parsed", "parse", "prepare", "renamed"]

Header = Callable[[str], str | None]

#: The inference routes: how each body is checked, and whether it asks for embeddings.
INFERENCE_ROUTES: dict[str, tuple[Callable[[dict[str, Any]], str], bool]] = {
    "/v1/chat/completions": (check_chat, False),
    "/v1/completions": (check_completion, False),
    "/v1/embeddings": (check_embeddings, True),
}


@dataclass(frozen=True, slots=True)
class Parsed:
    """A body that passed its route's checks: the model it names, before that is looked up."""

    data: dict[str, Any]
    raw: bytes
    model: str
    embeddings: bool


@dataclass(frozen=True, slots=True)
class Outbound:
    """What goes to the engines, and what the queue and the quotas weigh it by."""

    #: The model the client named (fallbacks and splits send the body on renamed).
    model: str
    data: dict[str, Any]
    raw: bytes
    stream: bool
    #: Usage was asked of the engine for the ledger: its extra event is taken out again.
    strip_usage: bool
    features: RequestFeatures
    #: Prompt plus the most the answer may take: reserved against quotas, the queue's cost.
    tokens: int
    priority: int

    def body_for(self, model: str) -> bytes:
        """The body addressed to ``model`` (engines check the model name)."""
        if model == self.model:
            return self.raw
        return json.dumps({**self.data, "model": model}).encode()


def renamed(body: bytes, model: str) -> bytes:
    """``body`` addressed to ``model``: an external endpoint's own name for the model."""
    data = json.loads(body)
    data["model"] = model
    return json.dumps(data).encode()


def parse(route: str, raw: bytes) -> Parsed:
    check, embeddings = INFERENCE_ROUTES[route]
    data = parse_body(raw)
    return Parsed(data, raw, check(data), embeddings)


def prepare(
    parsed: Parsed,
    entry: ModelEntry,
    principal: Principal,
    header: Header,
    session: str | None,
    default_max_tokens: int,
) -> Outbound:
    """The request for ``entry`` (the model the client named): usage asked for on streams,
    the tokens to reserve, and the queue priority (a caller may lower its own, never raise
    it). A completion longer than the whole context is refused here (see ``_check_fits``),
    and ``developer`` messages are sent as ``system`` ones (see ``_developer_as_system``)."""
    data, raw, embeddings = parsed.data, parsed.raw, parsed.embeddings
    if not embeddings:
        _check_fits(data, entry.spec.context_length)
        data, raw = _developer_as_system(data, raw)
    features = features_of(data, session)
    stream = data.get("stream") is True
    strip_usage = False
    if stream and not embeddings:
        # Ask the engine for usage so the ledger counts real tokens; the extra event is
        # taken out again unless the client asked for it.
        options = data.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage") is True):
            extra = options if isinstance(options, dict) else {}
            data = {**data, "stream_options": {**extra, "include_usage": True}}
            raw = json.dumps(data).encode()
            strip_usage = True
    output = data.get("max_tokens") or data.get("max_completion_tokens")
    if not isinstance(output, int) or embeddings:
        room = entry.spec.context_length - features.prompt_tokens
        output = 0 if embeddings else max(1, min(default_max_tokens, room))
    priority = principal.priority
    if header("x-gpufleet-priority") == "batch":
        priority = max(priority, 1)
    return Outbound(
        parsed.model,
        data,
        raw,
        stream,
        strip_usage,
        features,
        features.prompt_tokens + output,
        priority,
    )


def _check_fits(data: dict[str, Any], context_length: int) -> None:
    """Refuse a ``max_tokens`` (or ``max_completion_tokens``) larger than the model's context:
    such a completion can never fit, whatever the prompt, and OpenAI answers it with a 400.

    The prompt's size is not added in: ``features.prompt_tokens`` is a characters/4 estimate,
    not the model's tokenizer, and a refusal on an estimate would turn away requests that fit.
    A prompt that leaves too little room is the engine's to report, with its own token count.
    """
    for field in ("max_tokens", "max_completion_tokens"):
        value = data.get(field)
        if isinstance(value, int) and value > context_length:
            raise bad_request(
                f"{field} is too large: {value}. This model's maximum context length is "
                f"{context_length} tokens, so it supports at most {context_length} completion "
                f"tokens, whereas you provided {value}.",
                param=field,
                code="invalid_value",
            )


def _developer_as_system(data: dict[str, Any], raw: bytes) -> tuple[dict[str, Any], bytes]:
    """OpenAI's ``developer`` role is the ``system`` role renamed (for its o1 models and later);
    open models' chat templates and llama-cpp-python know only ``system`` (llama-cpp-python
    refuses the request), so the engines are sent ``system`` whatever the client called it."""
    messages = data.get("messages")  # checked on the chat route, anything on the others
    if not isinstance(messages, list) or not any(_developer(m) for m in messages):
        return data, raw
    renamed = [{**m, "role": "system"} if _developer(m) else m for m in messages]
    data = {**data, "messages": renamed}
    return data, json.dumps(data).encode()


def _developer(message: object) -> bool:
    return isinstance(message, dict) and message.get("role") == "developer"
