"""Faults under load: how long until a tenant is served again, and whether the ledger lost rows.

Issue 16 asks for two numbers per fault: the recovery time, and the rows lost (goal 0). This
runs ``gpufleet up`` as a user does — a child process on real HTTP, SmolLM2 on llama.cpp (two
replicas), its own PostgreSQL store (``--store``) and a persistent Redis (``--redis``, AOF),
both the fault tests' private servers (tests/faults) — with one tenant whose key has a
concurrency limit. As many closed-loop clients as that limit send short chat completions (one of
them streamed), each with its own ``x-request-id``, which the ledger keeps as
``client_request_id``. The faults, one at a time, each after the one before has recovered:

- an engine SIGKILLed (one of the two replicas, then both): the controller restarts it;
- an engine hung (SIGSTOP, one replica) for ``--outage`` seconds, then SIGCONT;
- Redis SIGKILLed, restarted from its append-only file after ``--outage`` seconds;
- PostgreSQL stopped (fast shutdown), started again after ``--outage`` seconds;
- gpufleet itself SIGKILLed and started again at once on the same data directory and port.

Recovery is measured by the clients, not by a health check, from the healing (the restart,
SIGCONT) where there is one, from the fault otherwise: to the first answer to a request sent
after the fault, and until every client has been answered after the window's last failure.
With as many clients as the tenant's concurrency limit, the second is the tenant's full
concurrency usable again: a slot the gateway failed to release is a 429 for some client until
it is released, and a fault is "not recovered" while any client still fails. A client
whose request failed waits 0.1 s before the next (ignoring Retry-After, so that the recovery is
the gateway's, not the client's back-off). "Held" answers took more than 1 s longer than the
baseline's p99 (of their kind, streamed or not).

After the last fault the load stops and the ledger is read through the admin API: an answered
request (200, a stream to its ``[DONE]``) without exactly one row is a row lost (none) or a
duplicate (more). A request is counted in the window of the last fault before it ended.

Run (from the repository root, as root for PostgreSQL's ``runuser``; about 3 minutes):

    python -m bench.faults [--clients 3] [--outage 4] [--keep]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import pct, table
from tests.faults.postgres_server import PostgresServer
from tests.faults.redis_server import RedisServer
from tests.integration.fleet import ADMIN_KEY, SMOLLM2_YAML, Fleet, alive, start_fleet, wait_until

MODEL = "smollm2"
#: SmolLM2 on two replicas: one engine down leaves one serving.
MODELS_YAML = SMOLLM2_YAML.rstrip() + "\n  replicas: {min: 2, max: 2}\n"
TENANT = "faults"
#: How long a client waits for one answer: past the gateway's 60 s hold.
REQUEST_TIMEOUT_S = 120.0
#: A client's pause after a failed request.
FAILURE_PAUSE_S = 0.1
#: Quiet time (no failure, every client answered) before the next fault.
STEADY_S = 4.0
#: A fault not recovered from by then is reported as such and the run goes on.
RECOVERY_TIMEOUT_S = 60.0
BASELINE_S = 8.0
#: An answer this much slower than the baseline's p99 (of its kind) was held.
HELD_S = 1.0
#: Answers each client gets before the baseline is measured.
WARMUP_ANSWERS = 3


@dataclass(frozen=True)
class Result:
    client: int
    rid: str
    stream: bool
    start: float
    end: float
    #: "200", or the failure: "503 quota_store_unavailable", "200 stream broken", "conn refused".
    outcome: str

    @property
    def ok(self) -> bool:
        return self.outcome == "200"


@dataclass
class Phase:
    name: str
    at: float
    healed: float
    recovered: bool = True


# -- the clients --------------------------------------------------------------------------------


def _error_code(body: bytes) -> str:
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return ""
    return f" {code}" if code else ""


def ask(port: int, key: str, rid: str, *, stream: bool, max_tokens: int) -> str:
    """One chat completion; its outcome as ``Result.outcome`` says."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Say one word about {rid}."}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(body),
            headers={
                "authorization": f"Bearer {key}",
                "x-request-id": rid,
                "content-type": "application/json",
            },
        )
        resp = conn.getresponse()
        text = resp.read()
    except ConnectionRefusedError:
        return "conn refused"
    except TimeoutError:
        return "timeout"
    except (ConnectionError, http.client.HTTPException):
        return "conn broken"
    finally:
        conn.close()
    if resp.status != 200:
        return f"{resp.status}{_error_code(text)}"
    if stream:
        return "200" if text.rstrip().endswith(b"data: [DONE]") else "200 stream broken"
    try:
        json.loads(text)["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return "200 bad body"
    return "200"


@dataclass
class Load:
    """``clients`` closed-loop clients (client 0 streams) against whatever serves ``port``."""

    port: int
    key: str
    clients: int
    max_tokens: int
    t0: float = field(default_factory=time.monotonic)
    results: list[Result] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start(self) -> None:
        for c in range(self.clients):
            t = threading.Thread(target=self._client, args=(c,), name=f"client-{c}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(REQUEST_TIMEOUT_S + 5)

    def answered(self, client: int) -> int:
        return sum(1 for r in list(self.results) if r.client == client and r.ok)

    def _client(self, c: int) -> None:
        seq = 0
        while not self._stop.is_set():
            rid = f"fault-{c}-{seq:06d}"
            seq += 1
            start = self.now()
            outcome = ask(self.port, self.key, rid, stream=c == 0, max_tokens=self.max_tokens)
            result = Result(c, rid, c == 0, start, self.now(), outcome)
            self.results.append(result)
            if not result.ok:
                self._stop.wait(FAILURE_PAUSE_S)


# -- what the results say (pure) ----------------------------------------------------------------


def in_window(results: list[Result], start: float, end: float) -> list[Result]:
    return [r for r in results if start <= r.end < end]


def recovery(
    window: list[Result], at: float, healed: float, clients: int
) -> tuple[float, float] | None:
    """Seconds from ``healed`` to the first answer to a request sent after the fault (``at``),
    and to every client answered after the window's last failure; None while not so.

    Ends, not starts, are compared with ``healed``: a client may send a request a moment before
    the healing is noted (Redis answers before ``restart`` returns) and be answered after it."""
    answers = [r for r in window if r.ok and r.end >= healed]
    fresh = [r.end for r in answers if r.start >= at]
    if not fresh:
        return None
    since = max([healed, *(r.end for r in window if not r.ok)])
    last: list[float] = []
    for c in range(clients):
        mine = [r.end for r in answers if r.client == c and r.end >= since]
        if not mine:
            return None
        last.append(min(mine))
    return min(fresh) - healed, max(last) - healed


def failures(window: list[Result]) -> str:
    counts = Counter(r.outcome for r in window if not r.ok)
    return ", ".join(f"{what} ×{n}" for what, n in sorted(counts.items())) or "none"


def ledger_check(window: list[Result], rows: dict[str, int]) -> tuple[int, int]:
    """Answered requests without a row, and requests with more than one."""
    lost = sum(1 for r in window if r.ok and rows.get(r.rid, 0) == 0)
    duplicates = sum(1 for r in window if rows.get(r.rid, 0) > 1)
    return lost, duplicates


# -- the faults ---------------------------------------------------------------------------------


@dataclass
class Bench:
    root: Path
    clients: int
    outage_s: float
    max_tokens: int
    redis: RedisServer
    postgres: PostgresServer
    fleet: Fleet | None = None
    load: Load | None = None
    phases: list[Phase] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def models(self) -> Path:
        return self.root / "models.yaml"

    def up(self, port: int | None = None) -> Fleet:
        options = ("--store", self.postgres.url, "--redis", self.redis.url)
        fleet = start_fleet(self.root / "data", self.models, port=port, options=options)
        if fleet.stderr_path not in self.logs:
            self.logs.append(fleet.stderr_path)
        return fleet

    def admin_post(self, path: str, body: dict[str, Any]) -> Any:
        assert self.fleet is not None
        request = urllib.request.Request(
            self.fleet.server + path,
            data=json.dumps(body).encode(),
            headers={"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())

    def ready_engines(self) -> list[int]:
        assert self.fleet is not None
        try:
            replicas = self.fleet.replicas(MODEL)
        except OSError:
            return []
        return [r["pid"] for r in replicas if r["phase"] == "Ready" and r["pid"]]

    def both_ready(self) -> list[int]:
        pids: list[int] = wait_until(
            lambda: len(self.ready_engines()) == 2 and self.ready_engines(), 120
        )
        return pids

    # Each fault returns when it has healed (for one that heals by itself: at once).

    def kill_engines(self, n: int) -> None:
        for pid in self.both_ready()[:n]:
            os.kill(pid, signal.SIGKILL)

    def hang_engine(self) -> None:
        pid = self.both_ready()[0]
        os.kill(pid, signal.SIGSTOP)
        time.sleep(self.outage_s)
        os.kill(pid, signal.SIGCONT)

    def kill_redis(self) -> None:
        self.redis.kill()
        time.sleep(self.outage_s)
        self.redis.restart()

    def stop_postgres(self) -> None:
        self.postgres.stop()
        time.sleep(self.outage_s)
        self.postgres.start()

    def kill_gpufleet(self) -> None:
        assert self.fleet is not None
        engines = self.fleet.engine_pids()
        self.fleet.stop(signal.SIGKILL)
        wait_until(lambda: not [p for p in engines if alive(p)], timeout=30)
        # start_fleet writes its stderr file afresh: keep the first life's.
        first = self.fleet.stderr_path
        kept = first.with_name(f"{first.stem}-before-kill.log")
        shutil.copyfile(first, kept)
        self.logs.insert(0, kept)
        self.fleet = self.up(port=self.fleet.port)

    def inject(self, name: str, fault: Callable[[], None], heals: bool) -> None:
        assert self.load is not None
        self.both_ready()
        at = self.load.now()
        fault()
        phase = Phase(name, at, self.load.now() if heals else at)
        self.phases.append(phase)
        print(
            f"  {name}: injected at {at:.1f} s, healed after {phase.healed - at:.1f} s", flush=True
        )
        phase.recovered = self.settle(phase.at, phase.healed)
        if not phase.recovered:
            print(f"  {name}: NOT recovered within {RECOVERY_TIMEOUT_S:g} s", flush=True)

    def settle(self, since: float, healed: float) -> bool:
        """Wait until every client has been answered after the last failure and nothing has
        failed for ``STEADY_S``; False if that does not happen within the timeout."""
        assert self.load is not None
        load = self.load
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while time.monotonic() < deadline:
            window = in_window(list(load.results), since, float("inf"))
            done = recovery(window, since, healed, self.clients)
            quiet_since = max([healed, *(r.end for r in window if not r.ok)])
            if done is not None and load.now() - max(healed + done[1], quiet_since) >= STEADY_S:
                return True
            time.sleep(0.2)
        return False


def ledger_rows(fleet: Fleet) -> dict[str, int]:
    rows = fleet.admin("/admin/v1/usage/requests?since=6h&limit=10000")["requests"]
    return Counter(str(r["client_request_id"]) for r in rows)


def slots_in_use(fleet: Fleet) -> int:
    used: int = fleet.admin(f"/admin/v1/tenants/{TENANT}/quota")["used"].get("concurrency", 0)
    return used


def run(clients: int, outage_s: float, max_tokens: int, keep: bool) -> None:
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="gpufleet-faults-"))
    redis = RedisServer(root / "redis", appendonly=True)
    postgres = PostgresServer()
    bench = Bench(root, clients, outage_s, max_tokens, redis, postgres)
    bench.models.write_text(MODELS_YAML)
    try:
        redis.start()
        postgres.start()
        bench.fleet = bench.up()
        bench.admin_post(
            "/admin/v1/tenants",
            {
                "metadata": {"name": TENANT},
                "spec": {
                    "limits": {
                        "concurrency": clients,
                        "budget": {"usd": 1000.0, "period": "month"},
                    }
                },
            },
        )
        key = bench.admin_post("/admin/v1/keys", {"tenant": TENANT, "name": "load"})["key"]
        bench.both_ready()
        print(f"gpufleet up ready in {bench.fleet.ready_after_s:.1f} s; load starts", flush=True)
        load = bench.load = Load(bench.fleet.port, key, clients, max_tokens)
        load.start()
        # Warm-up: the engines' first answers are slow (prompt cache, page faults).
        wait_until(lambda: min(load.answered(c) for c in range(clients)) >= WARMUP_ANSWERS, 120)
        bench.phases.append(Phase("(baseline, no fault)", load.now(), load.now()))
        time.sleep(BASELINE_S)

        o = f"{outage_s:g} s"
        bench.inject("engine SIGKILL, 1 of 2 replicas", lambda: bench.kill_engines(1), False)
        bench.inject("engine SIGKILL, 2 of 2 replicas", lambda: bench.kill_engines(2), False)
        bench.inject(f"engine SIGSTOP {o} (1 of 2), SIGCONT", bench.hang_engine, True)
        bench.inject(f"Redis SIGKILL, restart from AOF after {o}", bench.kill_redis, True)
        bench.inject(f"PostgreSQL stop, start after {o}", bench.stop_postgres, True)
        bench.inject("gpufleet SIGKILL, restart same data dir", bench.kill_gpufleet, True)
        load.stop()
        fleet = bench.fleet
        assert fleet is not None
        rows = ledger_rows(fleet)
        deadline = time.monotonic() + 15
        while (held_slots := slots_in_use(fleet)) and time.monotonic() < deadline:
            time.sleep(0.5)
        report(bench, load, rows, held_slots, time.monotonic() - started)
        if keep:
            with (root / "results.jsonl").open("w") as f:
                for r in load.results:
                    f.write(json.dumps({**asdict(r), "rows": rows.get(r.rid, 0)}) + "\n")
            (root / "phases.json").write_text(json.dumps([asdict(p) for p in bench.phases]))
        fleet.stop(signal.SIGTERM, timeout=60)
    finally:
        if bench.load is not None:
            bench.load.stop()
        if bench.fleet is not None and bench.fleet.proc.poll() is None:
            bench.fleet.stop(signal.SIGKILL)
        postgres.close()
        redis.close()
        if keep:
            print(f"kept: {root} (gpufleet logs: {', '.join(str(p) for p in bench.logs)})")
        else:
            shutil.rmtree(root, ignore_errors=True)


def held_bounds(baseline: list[Result]) -> dict[bool, float]:
    """Per kind (streamed or not): an answer slower than this was held — ``HELD_S`` past the
    baseline's p99 (a multiple would not do: streams vary several-fold on a busy machine)."""
    bounds: dict[bool, float] = {}
    for stream in (False, True):
        seconds = [r.end - r.start for r in baseline if r.ok and r.stream == stream]
        bounds[stream] = pct(seconds, 99) + HELD_S if seconds else HELD_S
    return bounds


def report(bench: Bench, load: Load, rows: dict[str, int], held_slots: int, took_s: float) -> None:
    results = list(load.results)
    baseline = in_window(results, bench.phases[0].at, bench.phases[1].at)
    held_after = held_bounds(baseline)
    bounds = [p.at for p in bench.phases[1:]] + [float("inf")]
    out: list[list[str]] = []
    for phase, end in zip(bench.phases, bounds, strict=True):
        window = in_window(results, phase.at, end)
        answered = [r for r in window if r.ok]
        held = sum(1 for r in answered if r.end - r.start > held_after[r.stream])
        lost, dups = ledger_check(window, rows)
        first, full = "-", "-"
        if phase is not bench.phases[0]:
            rec = recovery(window, phase.at, phase.healed, bench.clients)
            if rec is not None:
                first, full = f"{rec[0]:.2f}", f"{rec[1]:.2f}"
            if not phase.recovered:
                full = f"not within {RECOVERY_TIMEOUT_S:g}"
        out.append(
            [
                phase.name,
                f"{phase.healed - phase.at:.1f}",
                first,
                full,
                f"{len(answered)} ({held})",
                failures(window),
                str(lost),
                str(dups),
            ]
        )
    print()
    for stream, what in ((False, "plain"), (True, "streamed")):
        seconds = [r.end - r.start for r in baseline if r.ok and r.stream == stream]
        print(
            f"baseline {what}: {len(seconds)} answered, p50 {pct(seconds, 50):.2f} s, "
            f"p99 {pct(seconds, 99):.2f} s; held = answered after more than "
            f"{held_after[stream]:.2f} s"
        )
    print(
        f"{bench.clients} clients (client 0 streams), tenant concurrency {bench.clients}, "
        f"max_tokens {bench.max_tokens}; recovery from the healing where there is one"
    )
    print(
        table(
            [
                "fault",
                "down s",
                "first answer s",
                "all clients answered s",
                "answered (held)",
                "failed by status",
                "rows lost",
                "duplicates",
            ],
            out,
        )
    )
    total = sum(1 for r in results if r.ok)
    lost, dups = ledger_check(results, rows)
    failed_with_row = sum(1 for r in results if not r.ok and rows.get(r.rid))
    tracebacks = sum(p.read_text(errors="replace").count("Traceback") for p in bench.logs)
    print(
        f"{len(results)} requests, {total} answered; ledger rows lost {lost}, duplicates "
        f"{dups}; failed requests with a row (they reached an engine) {failed_with_row}; "
        f"tenant slots still in use 15 s after the load stopped: {held_slots}; tracebacks in "
        f"gpufleet's logs: {tracebacks}; run {took_s:.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3, help="= the tenant's concurrency")
    parser.add_argument("--outage", type=float, default=4.0, help="seconds a fault lasts")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the data dir and logs")
    args = parser.parse_args()
    run(args.clients, args.outage, args.max_tokens, args.keep)


if __name__ == "__main__":
    main()
