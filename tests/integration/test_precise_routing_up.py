"""`routing.prefixIndex: precise` under `gpufleet up`: the gateway routes on what the engines
report they hold (their KV-cache events), not on where it sent prompts before.

Two emulated replicas (the emulator publishes vLLM's KV-cache events on the ports the local
runtime gives it). A prompt goes through the gateway to replica A; then, behind the gateway's
back, A's cache is emptied (``/reset_prefix_cache``) and B is sent the same prompt. The next
request with that prefix goes to B under precise routing — its engine holds the prefix — and
back to A under approximate routing, which still believes A holds it: the same scenario tells
the two apart, so the precise assertion can fail.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from gpufleet.engines import parse_vllm
from tests.integration.fleet import ADMIN_KEY, Fleet, start_fleet, wait_until

CONFIGS = Path(__file__).parents[1] / "data" / "configs"
SYSTEM = "You answer questions about the warehouse's shipping rules, briefly. " * 24


def _spec(tmp: Path, index: str) -> Path:
    spec = tmp / "models.yaml"
    spec.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: llama}\n"
        f"spec:\n  source: file:{CONFIGS / 'llama-3-8b.json'}\n  engine: emulator\n"
        "  resources: {gpus: 1, gpuTypes: [H100]}\n  replicas: {min: 2, max: 2}\n"
        f"  routing: {{policy: prefix, prefixIndex: {index}}}\n"
    )
    return spec


def _get(url: str, key: str | None = None) -> str:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        body: bytes = r.read()
    return body.decode()


def _post(url: str, body: dict[str, Any], key: str | None = None) -> Any:
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def _engine_key(pid: int) -> str:
    """The engine's key, as the runtime handed it over (the test plays a client of the engine
    that holds it)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(
        v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"GPUFLEET_ENGINE_KEY=")
    )


def _load(replica: dict[str, Any]) -> tuple[float, float]:
    """The engine's prefix-cache queries and hits so far (tokens)."""
    load = parse_vllm(_get(replica["url"] + "/metrics"))
    return load.prefix_queries, load.prefix_hits


def _gateway_metric(fleet: Fleet, name: str, **labels: str) -> float:
    total = 0.0
    for line in _get(fleet.server + "/metrics", ADMIN_KEY).splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


@pytest.mark.parametrize("index", ["precise", "approximate"])
def test_the_gateway_routes_to_the_replica_whose_engine_holds_the_prefix(
    tmp_path: Path, index: str
) -> None:
    fleet = start_fleet(tmp_path / "data", _spec(tmp_path, index))
    try:
        client = OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0)
        replicas = wait_until(
            lambda: (
                (rs := fleet.replicas("llama"))
                and len(rs) == 2
                and all(r["phase"] == "Ready" for r in rs)
                and rs
            ),
            timeout=60,
        )
        if index == "precise":  # both engines' event streams are followed
            wait_until(
                lambda: all(
                    f'replica="{r["id"]}"' in _get(fleet.server + "/metrics", ADMIN_KEY)
                    for r in replicas
                ),
                timeout=30,
            )
        client.chat.completions.create(model="llama", messages=_messages("first?"), max_tokens=2)
        queried = [r for r in replicas if _load(r)[0]]
        assert len(queried) == 1, "one replica served the first request"
        a = queried[0]
        b = next(r for r in replicas if r["id"] != a["id"])
        # Behind the gateway's back: A forgets the prompt, B learns it.
        assert _post(a["url"] + "/reset_prefix_cache", {})["success"] is True
        _post(
            b["url"] + "/v1/chat/completions",
            {"model": "llama", "messages": _messages("second?"), "max_tokens": 2},
            _engine_key(b["pid"]),
        )
        if index == "precise":
            wait_until(
                lambda: (
                    _gateway_metric(fleet, "gpufleet_prefix_index_blocks", replica=b["id"]) > 0
                    and _gateway_metric(fleet, "gpufleet_prefix_index_blocks", replica=a["id"]) == 0
                ),
                timeout=30,
            )
        before = {r["id"]: _load(r) for r in replicas}
        client.chat.completions.create(model="llama", messages=_messages("third?"), max_tokens=2)
        after = {r["id"]: _load(r) for r in replicas}
        asked = {rid: after[rid][0] - before[rid][0] for rid in after}
        hit = {rid: after[rid][1] - before[rid][1] for rid in after}
        if index == "precise":
            # B served it from its cache; A, where the gateway sent the prompt first, got
            # nothing: the gateway believed the engines, not its own history.
            assert asked[a["id"]] == 0 and asked[b["id"]] > 0, asked
            assert hit[b["id"]] >= 16 * 10, hit
            assert _gateway_metric(fleet, "gpufleet_prefix_lookups_total", index="precise") >= 2
        else:
            # Approximate routing sends it back to A, whose engine no longer holds it.
            assert asked[b["id"]] == 0 and asked[a["id"]] > 0, asked
            assert hit[a["id"]] == 0, hit
    finally:
        assert fleet.stop() == 0
