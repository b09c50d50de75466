"""The real llama.cpp engine answers only the gateway: ``gpufleet up`` binds it to loopback and
starts it with a secret of its own (``GPUFLEET_ENGINE_KEY``, which its entry point hands to
llama-cpp-python's ``api_key``), which only gpufleet holds. A local user going straight to the
engine's port is refused; through the gateway everything works — chat, streams counted with
the engine (``stream_usage`` tokenizes there), probes (the replica stays Ready) — and the secret
shows nowhere: not in ``ps``, the admin API, ``gpufleet get replicas -o json``, events, the
engine's log or gpufleet's."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from gpufleet.engines.base import ENGINE_KEY_ENV, LLAMACPP_COUNT_PATH
from tests.integration.fleet import ADMIN_KEY, Fleet, gpufleet, smollm2_fleet

pytestmark = pytest.mark.engine

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    yield from smollm2_fleet(tmp_path_factory.mktemp("engine-keys"))


def direct(url: str, body: Any = None, key: str | None = None) -> int:
    """The status the engine answers a local user calling it straight, with ``key`` or none."""
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def engine_key(pid: int) -> str:
    """The secret, read where only its owner can: the engine process's environment."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    (key,) = [v.split(b"=", 1)[1] for v in environ if v.startswith(f"{ENGINE_KEY_ENV}=".encode())]
    return key.decode()


def test_the_engine_refuses_anyone_but_the_gateway(fleet: Fleet) -> None:
    (replica,) = fleet.replicas("smollm2")
    url = replica["url"]
    assert url.startswith("http://127.0.0.1:")  # loopback only
    key = engine_key(replica["pid"])
    assert len(key) >= 32
    count = url + LLAMACPP_COUNT_PATH + "/v1/chat/completions"
    for wrong in (None, "guessed", ADMIN_KEY):
        assert direct(url + "/v1/chat/completions", CHAT, wrong) == 401
        assert direct(url + "/v1/models", key=wrong) == 401
        assert direct(count, {"request": CHAT, "text": ""}, wrong) == 401
    # The key is the engine's: with it the engine answers (so the refusals above mean "no key").
    assert direct(url + "/v1/models", key=key) == 200
    assert direct(count, {"request": CHAT, "text": "Hello"}, key) == 200
    # Liveness stays open: it says nothing but "alive".
    assert direct(url + "/health") == 200


def test_through_the_gateway_everything_works(fleet: Fleet) -> None:
    client = OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0)
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert reply.choices and reply.usage is not None and reply.usage.prompt_tokens > 0
    # A stream asking for usage: the gateway counts it with the engine (tokenize routes, keyed).
    stream = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage for c in stream if c.usage is not None]
    assert len(usage) == 1 and usage[0].prompt_tokens > 0
    # The probes carry the key too: the replica became and stays Ready, never restarted.
    (replica,) = fleet.replicas("smollm2")
    assert (replica["phase"], replica["restarts"]) == ("Ready", 0)


def test_the_secret_shows_nowhere(fleet: Fleet) -> None:
    (replica,) = fleet.replicas("smollm2")
    key = engine_key(replica["pid"])
    cmdline = Path(f"/proc/{replica['pid']}/cmdline").read_bytes().decode(errors="replace")
    admin = {
        path: json.dumps(fleet.admin(path))
        for path in ("/admin/v1/replicas", "/admin/v1/models", "/admin/v1/events")
    }
    listed = gpufleet("get", "replicas", "-o", "json", "--server", fleet.server)
    assert listed.returncode == 0, listed.stderr
    assert replica["id"] in listed.stdout
    events = gpufleet("events", "smollm2", "--server", fleet.server, "-o", "json")
    assert events.returncode == 0, events.stderr
    request = urllib.request.Request(
        f"{fleet.server}/admin/v1/models/smollm2/logs?tail=100000",
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        engine_log = resp.read().decode()
    assert "--- gpufleet: attempt 1:" in engine_log  # the launch line is there, keyless
    places = {
        "ps (the engine's arguments)": cmdline,
        **admin,
        "gpufleet get replicas -o json": listed.stdout,
        "gpufleet events": events.stdout,
        "the engine's log": engine_log,
        "gpufleet's own log": fleet.stderr(),
    }
    assert [where for where, text in places.items() if key in text] == []
    # The engines' logs (an engine may print its own settings) and the store live in a data
    # directory that gpufleet made its owner's alone.
    assert fleet.data_dir.stat().st_mode & 0o777 == 0o700
