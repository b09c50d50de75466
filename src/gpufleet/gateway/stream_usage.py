"""Usage for streams whose engine reports none, counted by the engine's own tokenizer.

The gateway asks every engine for ``stream_options.include_usage``; vLLM answers with a usage
event, llama-cpp-python (0.3) ignores the option and streams no usage at all. For such a stream
the gateway counts after the engine's last event, with the engine itself, never with a
characters-per-token guess:

- one call to the engine's counting route (``LLAMACPP_COUNT_PATH`` + the route, which gpufleet's
  llama.cpp entry point ``engines/llamacpp_main.py`` adds): the request goes through the
  engine's own chat template, tokenizer and context check and is stopped where generation
  would begin, so the prompt is counted exactly and never evaluated; the streamed text goes
  through the engine's tokenizer, less what it adds to an empty text (a BOS). Re-tokenising
  the text is how OpenAI-compatible engines count a completion they did not count themselves;
  it can differ from the sampled tokens where the model chose a non-canonical split, which a
  model rarely does.
- an engine without that route (a 404) is counted as before it existed: the request sent
  again, not streamed and with ``max_tokens: 1`` (the engine reports ``usage.prompt_tokens``),
  and the text through ``POST /extras/tokenize/count``. That evaluates the whole prompt again
  whenever another request ran on the engine since (llama.cpp keeps only the last prompt):
  with 16 streams at once it cost llama.cpp 9 % of its tokens/s (docs/benchmarks.md).

llama-cpp-python serialises these calls behind its model lock, which is why the count is made
only after the engine's last event (gpufleet runs it with ``interrupt_requests`` off, so a count
never cuts another request short), and before the gateway passes ``[DONE]`` on: clients hang
up at ``[DONE]``, which would cancel the count, and the stream's ledger row is spooled before
its last byte leaves, so a gateway killed right after answering loses no row. The price: on
llama.cpp the count queues behind what the engine generates for others, and a client's
``[DONE]`` waits for it. When a count fails the
gateway keeps its estimate and says so in its log: the outcome stays uncounted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gpufleet.engines.base import LLAMACPP_COUNT_PATH
from gpufleet.gateway.upstream_http import (
    Broken,
    ConnectTimeout,
    Unconnected,
    UpstreamClient,
    UpstreamError,
)

__all__ = ["StreamCount", "ask_unstreamed", "count_stream", "streamed_text", "usage_event"]

log = logging.getLogger("gpufleet.gateway.stream_usage")

_TOKENIZE_COUNT = "/extras/tokenize/count"


@dataclass(frozen=True, slots=True)
class StreamCount:
    prompt_tokens: int
    completion_tokens: int


def streamed_text(events: Iterable[bytes]) -> tuple[str, dict[str, Any]]:
    """The completion text of a stream's events (chat deltas or completion text), and the
    first event's ``id``/``created``/``model`` for the usage event the gateway adds."""
    parts: list[str] = []
    head: dict[str, Any] = {}
    for block in events:
        for event in block.split(b"\n\n"):
            if not event.startswith(b"data: {"):
                continue
            try:
                data = json.loads(event[6:])
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            if not head:
                head = {k: data[k] for k in ("id", "created", "model") if k in data}
            for choice in data.get("choices") or ():
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta")
                text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                if isinstance(text, str):
                    parts.append(text)
    return "".join(parts), head


def _counting_body(body: bytes) -> bytes | None:
    """The request again, not streamed and one token long: its answer's usage counts the
    prompt as the engine templated it."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    data = {k: v for k, v in data.items() if k not in ("stream_options", "n", "logprobs")}
    data.update(stream=False, max_tokens=1)
    data.pop("max_completion_tokens", None)
    return json.dumps(data).encode()


async def _answer(
    http: UpstreamClient,
    base: str,
    path: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    optional: bool = False,
) -> Any:
    """The engine's JSON answer; a refusal (4xx, 5xx) or a body that is not JSON is a
    ``ValueError``. With ``optional``, None when the engine has no such path (404)."""
    status, payload = await http.fetch(base, path, body, headers)
    if optional and status == 404:
        return None
    if status >= 400:
        raise ValueError(f"{path} answered {status}")
    return json.loads(payload)


async def _tokens(http: UpstreamClient, base: str, text: str, headers: Mapping[str, str]) -> int:
    count = (
        await _answer(http, base, _TOKENIZE_COUNT, json.dumps({"input": text}).encode(), headers)
    ).get("count")
    if not isinstance(count, int):
        raise ValueError(f"tokenize count answered {count!r}")
    return count


async def count_stream(
    http: UpstreamClient,
    base: str,
    route: str,
    body: bytes,
    text: str,
    request_id: str,
    auth: Mapping[str, str] | None = None,
) -> StreamCount | None:
    """Count a finished stream's tokens with the engine at ``base`` (``auth``: the headers
    its secret needs): through its counting route, or the old way where it has none; None when
    it cannot."""
    headers = {"content-type": "application/json", "x-request-id": request_id, **(auth or {})}
    try:
        counted = await _counted(http, base, route, body, text, headers)
        if counted is None:
            counted = await _counted_again(http, base, route, body, text, headers)
    except (UpstreamError, TimeoutError, ValueError, AttributeError) as exc:
        log.warning("could not count the stream %s: %s: %s", request_id, type(exc).__name__, exc)
        return None
    return counted


async def _counted(
    http: UpstreamClient,
    base: str,
    route: str,
    body: bytes,
    text: str,
    headers: Mapping[str, str],
) -> StreamCount | None:
    """The count from the engine's counting route in one call; None when it has none (404)."""
    request = json.loads(body)
    if not isinstance(request, dict):
        raise ValueError("the request is not a JSON object")
    payload = json.dumps({"request": request, "text": text}).encode()
    path = LLAMACPP_COUNT_PATH + route
    counts = await _answer(http, base, path, payload, headers, optional=True)
    if counts is None:
        return None
    prompt, completion = counts.get("prompt_tokens"), counts.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        raise ValueError(f"the count answered {counts!r}")
    return StreamCount(prompt, completion)


async def _counted_again(
    http: UpstreamClient,
    base: str,
    route: str,
    body: bytes,
    text: str,
    headers: Mapping[str, str],
) -> StreamCount | None:
    """The count of an engine without the counting route: the request again for its prompt
    tokens, the text through ``/extras/tokenize/count``."""
    counting = _counting_body(body)
    if counting is None:
        return None
    usage = (await _answer(http, base, route, counting, headers)).get("usage") or {}
    prompt = usage.get("prompt_tokens")
    if not isinstance(prompt, int):
        raise ValueError(f"the engine's answer had no prompt_tokens: {usage!r}")
    completion = 0
    if text:
        completion = await _tokens(http, base, text, headers) - await _tokens(
            http, base, "", headers
        )
    return StreamCount(prompt, max(0, completion))


def usage_event(head: dict[str, Any], route: str, count: StreamCount) -> bytes:
    """The OpenAI-shaped last chunk of a stream asked for usage: no choices, the usage."""
    chunk = {
        "id": head.get("id", ""),
        "object": "chat.completion.chunk" if "chat" in route else "text_completion",
        "created": head.get("created", 0),
        "model": head.get("model", ""),
        "choices": [],
        "usage": {
            "prompt_tokens": count.prompt_tokens,
            "completion_tokens": count.completion_tokens,
            "total_tokens": count.prompt_tokens + count.completion_tokens,
        },
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def ask_unstreamed(
    http: UpstreamClient,
    base: str,
    route: str,
    body: bytes,
    request_id: str,
    auth: Mapping[str, str] | None = None,
) -> tuple[int, bytes] | None:
    """The engine's status and body for the request again, not streamed and one token long.

    llama-cpp-python answers a streamed request it refuses (a prompt beyond the context) with a
    200 and no event, its reason only in its log; asked this way it answers the refusal (made
    before any decoding) as an error body. None when the engine cannot be asked."""
    asking = _counting_body(body)
    if asking is None:
        return None
    headers = {"content-type": "application/json", "x-request-id": request_id, **(auth or {})}
    failure: Exception | None = None
    for _ in range(2):
        try:
            return await http.fetch(base, route, asking, headers)
        except ConnectTimeout as exc:
            failure = exc
            break
        except (Broken, Unconnected) as exc:
            # The engine closes the connection its failed stream came on just after the
            # stream's end, which may have put it back in the pool first: once more, anew.
            failure = exc
        except (UpstreamError, TimeoutError) as exc:
            failure = exc
            break
    log.warning(
        "could not ask the engine about %s: %s: %s", request_id, type(failure).__name__, failure
    )
    return None
