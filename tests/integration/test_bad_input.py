"""Bad input in front of the real SmolLM2 on llama.cpp: a 400 OpenAI-shaped error from the
gateway, never the engine's validation dump, and the gateway keeps serving.

llama-cpp-python answers an unknown role with a pydantic dump naming its own source files, and
a ``max_tokens`` beyond the context with a 200; the gateway must answer both before the engine
sees them. The official ``openai`` SDK is the client where it can send the body.

The second half is the gate for the gateway's HTTP server layer (and any later change of
server): every class of bad input, sent as bytes — malformed, truncated or cut-short JSON, wrong
types, huge and negative numbers, unknown fields, invalid UTF-8, oversized bodies from clients
that send all before reading — is a 4xx OpenAI-shaped error, and the gateway serves on.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.integration.fleet import ADMIN_KEY, Fleet, smollm2_fleet

pytestmark = pytest.mark.engine

USER = {"role": "user", "content": "Name a colour."}
#: What must never reach a client: the engine's internals.
INTERNALS = ("Traceback", "llama_cpp", ".py", "pydantic", "validation error")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    yield from smollm2_fleet(tmp_path_factory.mktemp("bad-input"))


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> OpenAI:
    return OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=60)


def refused(client: OpenAI, **kw: Any) -> dict[str, Any]:
    """The body's ``error`` object of a request the SDK raised ``BadRequestError`` for."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2", **kw)
    text = caught.value.response.text
    error: dict[str, Any] = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == caught.value.type == "invalid_request_error"
    assert (caught.value.param, caught.value.code) == (error["param"], error["code"])
    assert not [s for s in INTERNALS if s in text], text
    assert caught.value.response.headers["x-request-id"]
    return error


def answers(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2", messages=[USER], max_tokens=4, temperature=0
    )
    assert reply.choices[0].message.content is not None


def test_an_unknown_role_is_400_naming_it(client: OpenAI) -> None:
    error = refused(client, messages=[USER, {"role": "wizard", "content": "x"}], max_tokens=4)
    assert (error["param"], error["code"]) == ("messages[1].role", "invalid_value")
    assert "'developer'" in error["message"]
    answers(client)


def test_an_unknown_content_part_is_400_naming_it(client: OpenAI) -> None:
    parts = [{"type": "text", "text": "x"}, {"type": "hologram"}]
    error = refused(client, messages=[{"role": "user", "content": parts}], max_tokens=4)
    assert (error["param"], error["code"]) == ("messages[0].content[1].type", "invalid_value")
    answers(client)


def test_a_developer_message_is_served_as_a_system_message(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "developer", "content": "Answer in one word."}, USER],
        max_tokens=4,
        temperature=0,
    )
    assert reply.choices[0].message.content is not None


@pytest.mark.parametrize("max_tokens", [2049, 5000, 10**12])
def test_a_completion_longer_than_the_context_is_400_like_openai(
    client: OpenAI, max_tokens: int
) -> None:
    error = refused(client, messages=[USER], max_tokens=max_tokens)
    assert (error["param"], error["code"]) == ("max_tokens", "invalid_value")
    assert error["message"].startswith(f"max_tokens is too large: {max_tokens}.")
    assert "maximum context length is 2048 tokens" in error["message"]
    answers(client)


def test_deep_nesting_is_400_at_any_depth(client: OpenAI, fleet: Fleet) -> None:
    deep: Any = []
    for _ in range(80):
        deep = [deep]
    error = refused(client, messages=[USER], max_tokens=4, extra_body={"x": deep})
    assert "nests arrays and objects more than 64 deep" in error["message"]
    # Far deeper than any JSON encoder the SDK would use: sent as bytes.
    raw = b'{"model": "smollm2", "messages": [], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    request = urllib.request.Request(
        fleet.base_url + "/chat/completions",
        data=raw,
        headers={"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400
    body = json.loads(caught.value.read())
    assert "nests arrays and objects more than 64 deep" in body["error"]["message"]
    answers(client)


# The gate for the HTTP server layer: every class of bad input, sent as bytes, is a 4xx
# OpenAI-shaped error, promptly, and the gateway serves the next request.

CHAT = b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]'


def chat_with(extra: str) -> bytes:
    return CHAT + b", " + extra.encode() + b"}"


def post(
    fleet: Fleet, body: Any, path: str = "/chat/completions", **headers: str
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        fleet.base_url + path,
        data=body,
        headers={"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"}
        | {k.replace("_", "-"): v for k, v in headers.items()},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode()
        assert not [s for s in INTERNALS if s in text], text
        assert exc.headers["x-request-id"]
        return exc.code, json.loads(text)


def openai_error(body: dict[str, Any]) -> dict[str, Any]:
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    return error


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        pytest.param(b"{not json", None, id="malformed"),
        pytest.param(CHAT[:-12], None, id="truncated"),
        pytest.param(b"", None, id="empty"),
        pytest.param(b'["smollm2"]', None, id="not-an-object"),
        pytest.param(CHAT.replace(b"hi", b"\xff\xfe\xc3") + b"}", None, id="invalid-utf8"),
        pytest.param(chat_with('"temperature": NaN'), None, id="nan"),
        pytest.param(b'{"model": 7, "messages": []}', "model", id="type-model"),
        pytest.param(b'{"model": "smollm2", "messages": "hi"}', "messages", id="type-messages"),
        pytest.param(chat_with('"max_tokens": "8"'), "max_tokens", id="type-max_tokens"),
        pytest.param(chat_with('"temperature": "hot"'), "temperature", id="type-temperature"),
        pytest.param(chat_with('"stream": "yes"'), "stream", id="type-stream"),
        pytest.param(chat_with('"stop": 5'), "stop", id="type-stop"),
        pytest.param(chat_with('"seed": 1.5'), "seed", id="type-seed"),
        pytest.param(chat_with('"max_tokens": 1' + "0" * 30), "max_tokens", id="huge-max_tokens"),
        pytest.param(chat_with('"n": 1000000000'), "n", id="huge-n"),
        pytest.param(chat_with('"temperature": 1e308'), "temperature", id="huge-temperature"),
        pytest.param(chat_with('"seed": ' + "9" * 5000), None, id="huge-digits"),
        pytest.param(chat_with('"max_tokens": -1'), "max_tokens", id="negative-max_tokens"),
        pytest.param(chat_with('"n": -3'), "n", id="negative-n"),
        pytest.param(chat_with('"top_p": -0.5'), "top_p", id="negative-top_p"),
        pytest.param(chat_with('"max_token": 8'), "max_token", id="unknown-field"),
    ],
)
def test_bad_input_is_a_400_and_the_gateway_serves_on(
    fleet: Fleet, client: OpenAI, raw: bytes, param: str | None
) -> None:
    status, body = post(fleet, raw)
    assert status == 400
    assert openai_error(body)["param"] == param
    answers(client)


def test_unknown_fields_are_refused_on_every_route_and_engine_extensions_pass(
    fleet: Fleet, client: OpenAI
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="smollm2", messages=[USER], max_tokens=4, extra_body={"temprature": 0}
        )
    assert caught.value.param == "temprature" and caught.value.code == "unknown_parameter"
    assert "Unrecognized request argument supplied: temprature" in caught.value.message
    for path, body in (
        ("/completions", b'{"model": "smollm2", "prompt": "x", "tools": []}'),
        ("/embeddings", b'{"model": "smollm2", "input": "x", "max_tokens": 4}'),
    ):
        status, error = post(fleet, body, path)
        assert status == 400 and openai_error(error)["code"] == "unknown_parameter", path
    # llama-cpp-python's own sampling fields reach it (and vLLM's are known too).
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[USER],
        max_tokens=4,
        extra_body={"top_k": 1, "min_p": 0.05, "repeat_penalty": 1.1},
    )
    assert reply.choices[0].message.content is not None


def test_a_body_shorter_than_its_content_length_then_closed_leaves_no_trace(
    fleet: Fleet, client: OpenAI
) -> None:
    with socket.create_connection(("127.0.0.1", fleet.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n"
            + f"authorization: Bearer {ADMIN_KEY}\r\ncontent-length: 1000\r\n\r\n".encode()
            + CHAT[:20]
        )
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(65536) == b""  # nothing to answer a client that left
    answers(client)
    assert "Traceback" not in fleet.stderr()


# Oversized bodies: a 413 every client can read, the body never buffered.

LIMIT = 8 << 20  # gpufleet up's default --max-body-bytes


def too_large(status: int, body: dict[str, Any]) -> None:
    assert status == 413
    error = openai_error(body)
    assert error["code"] == "request_too_large" and f"({LIMIT} bytes)" in error["message"]


def test_an_oversized_body_is_a_413_urllib_reads_though_it_sends_all_first(
    fleet: Fleet, client: OpenAI
) -> None:
    too_large(*post(fleet, b"x" * (LIMIT + 1)))
    # Chunked, past the limit mid-way.
    chunks = (b"x" * (1 << 20) for _ in range(12))
    too_large(*post(fleet, chunks, transfer_encoding="chunked"))
    answers(client)


def test_the_openai_sdk_gets_the_413(client: OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "x" * (LIMIT + 1)}]
        )
    assert caught.value.status_code == 413 and caught.value.code == "request_too_large"
    answers(client)


def test_a_slow_sender_reads_the_413_before_sending_and_is_drained_to_a_clean_close(
    fleet: Fleet, client: OpenAI
) -> None:
    size = 48 << 20
    with socket.create_connection(("127.0.0.1", fleet.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n"
            + f"authorization: Bearer {ADMIN_KEY}\r\ncontent-length: {size}\r\n\r\n".encode()
        )
        reply = b""
        while b"}}" not in reply:  # the whole answer, before a byte of body was sent
            chunk = sock.recv(65536)
            assert chunk, reply
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 ") and b"connection: close" in head.lower()
        too_large(413, json.loads(body))
        for _ in range(size // (1 << 20)):
            sock.sendall(b"x" * (1 << 20))
        assert sock.recv(65536) == b""  # then a clean close, not a reset
    answers(client)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_expecting_100_continue_gets_the_413_without_sending_the_body(
    fleet: Fleet, tmp_path: Path
) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b"x" * (LIMIT + 1))
    done = subprocess.run(
        [
            *("curl", "-sS", "-v", "-H", f"authorization: Bearer {ADMIN_KEY}"),
            *("--data-binary", f"@{big}", fleet.base_url + "/chat/completions"),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert b"> Expect: 100-continue" in done.stderr and b"100 Continue" not in done.stderr
    too_large(413, json.loads(done.stdout))


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_200_mib_body_is_refused_without_being_buffered(fleet: Fleet, client: OpenAI) -> None:
    before = peak_rss(fleet.proc.pid)
    chunks = (b"x" * (1 << 20) for _ in range(200))
    too_large(*post(fleet, chunks, content_length=str(200 << 20)))
    assert peak_rss(fleet.proc.pid) - before < 64 << 20  # loosely: far below the body's size
    answers(client)
