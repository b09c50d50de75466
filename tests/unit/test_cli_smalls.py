"""The CLI's small promises: kubectl's kinds, tables that never cut a key, the emulator's help.

``get`` and ``delete`` talk to a stand-in admin API on the loopback (canned replies, the requests
recorded), so the real HTTP client and the real rendering run.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from gpufleet.cli.main import app
from gpufleet.cli.tables import Kind, event_table, print_table, resource_table

ROOT = Path(__file__).resolve().parents[2]
AT = "2026-12-02T16:45:33.123456+00:00"
REPLICA_ID = "llama-3-8b-instruct-g12-7f3c9a1b2d4e5f60"
MODEL = {
    "name": "llama-3-8b-instruct",
    "engine": "llamacpp",
    "status": "Ready",
    "ready": 1,
    "desired": 1,
    "generation": 12,
    "source": "hf:meta-llama/Meta-Llama-3-8B-Instruct-GGUF/Meta-Llama-3-8B-Instruct-Q4_K_M.gguf",
    "problem": "",
    "rollout": "",
}
REPLICA = {
    "id": REPLICA_ID,
    "model": "llama-3-8b-instruct",
    "generation": 12,
    "phase": "Ready",
    "url": "http://127.0.0.1:41234",
    "pid": 4242,
    "restarts": 0,
    "message": "serving",
}
EVENT = {
    "at": AT,
    "model": "llama-3-8b-instruct",
    "type": "Normal",
    "reason": "ScaledUp",
    "message": "scaled from 1 to 2 replicas: the queue held more than 8 requests for 30 seconds",
}
REPLIES = {
    "/admin/v1/models": {"models": [MODEL]},
    "/admin/v1/replicas": {"replicas": [REPLICA]},
    "/admin/v1/events": {"events": [EVENT]},
}


@dataclass
class AdminStub:
    url: str
    seen: list[tuple[str, str]] = field(default_factory=list)


@pytest.fixture
def admin() -> Iterator[AdminStub]:
    stub = AdminStub("")

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: object) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            stub.seen.append(("GET", self.path))
            reply = REPLIES.get(self.path.split("?")[0])
            if reply is None:
                self._reply(404, {"error": {"message": "not found"}})
            else:
                self._reply(200, reply)

        def do_DELETE(self) -> None:
            stub.seen.append(("DELETE", self.path))
            self._reply(200, {"deleted": self.path.rsplit("/", 1)[-1]})

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="admin-stub", daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def gpufleet(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "80"})
    return result.exit_code, result.output


def test_kinds_are_accepted_singular_and_plural() -> None:
    for kind in Kind:
        singular = kind.value.removesuffix("s")
        assert Kind.parse(kind.value) is kind
        assert Kind.parse(singular) is kind
        assert Kind.parse(singular.upper()) is kind
    assert Kind.parse("node") is None
    assert Kind.parse("s") is None


@pytest.mark.parametrize(
    ("word", "path", "shown"),
    [
        ("model", "/admin/v1/models", MODEL["source"]),
        ("models", "/admin/v1/models", MODEL["source"]),
        ("replica", "/admin/v1/replicas", REPLICA_ID),
        ("replicas", "/admin/v1/replicas", REPLICA_ID),
        ("event", "/admin/v1/events", "2026-12-02T16:45:33"),
        ("events", "/admin/v1/events", "2026-12-02T16:45:33"),
    ],
)
def test_get_takes_each_kind_in_both_numbers(
    admin: AdminStub, word: str, path: str, shown: str
) -> None:
    code, output = gpufleet("get", word, "--server", admin.url)
    assert code == 0, output
    assert admin.seen == [("GET", path)]
    assert shown in output


def test_get_refuses_an_unknown_kind_without_calling_the_server(admin: AdminStub) -> None:
    code, output = gpufleet("get", "nodes", "--server", admin.url)
    assert code == 1
    assert "unknown kind 'nodes'" in output
    assert admin.seen == []


def test_delete_takes_model_in_both_numbers_and_refuses_other_kinds(admin: AdminStub) -> None:
    for word in ("model", "models"):
        code, output = gpufleet("delete", word, "llama", "--server", admin.url)
        assert code == 0, output
        assert "model/llama deleted" in output
    assert admin.seen == [("DELETE", "/admin/v1/models/llama")] * 2
    code, output = gpufleet("delete", "replica", "llama-0", "--server", admin.url)
    assert code == 1 and "cannot delete 'replica'" in output
    assert len(admin.seen) == 2


def test_piped_tables_at_80_columns_keep_every_value_whole(admin: AdminStub) -> None:
    code, output = gpufleet("get", "replicas", "--server", admin.url)
    assert code == 0, output
    row = next(line for line in output.splitlines() if REPLICA_ID in line)
    assert all(v in row for v in (REPLICA["url"], "4242", "serving"))
    assert "…" not in output
    code, output = gpufleet("events", "--server", admin.url)
    assert code == 0, output
    row = next(line for line in output.splitlines() if "2026-12-02T16:45:33" in line)
    assert EVENT["message"] in row and "…" not in output


def test_wide_shows_more_columns_and_full_times(admin: AdminStub) -> None:
    code, output = gpufleet("get", "events", "-o", "wide", "--server", admin.url)
    assert code == 0, output
    assert AT in output
    code, output = gpufleet("get", "replicas", "-o", "wide", "--server", admin.url)
    assert code == 0, output
    assert "GEN" in output.splitlines()[0] and REPLICA_ID in output
    code, output = gpufleet("events", "-o", "wide", "--server", admin.url)
    assert code == 0 and AT in output


@pytest.mark.parametrize("width", [80, 40])
def test_a_terminal_table_wraps_text_but_never_cuts_ids_or_times(width: int) -> None:
    screen = io.StringIO()
    console = Console(file=screen, width=width, force_terminal=True, color_system=None)
    print_table(resource_table(Kind.replicas, [REPLICA]), console=console)
    print_table(event_table([EVENT]), console=console)
    text = screen.getvalue()
    assert REPLICA_ID in text and REPLICA["url"] in text
    assert "2026-12-02T16:45:33" in text and "llama-3-8b-instruct" in text
    assert "…" not in text
    # The free text wraps at word breaks to fit the terminal instead of being cut.
    assert all(word in text for word in EVENT["message"].split())


def test_wide_on_a_terminal_keeps_rows_on_one_line() -> None:
    screen = io.StringIO()
    console = Console(file=screen, width=80, force_terminal=True, color_system=None)
    print_table(event_table([EVENT], wide=True), wide=True, console=console)
    row = next(line for line in screen.getvalue().splitlines() if AT in line)
    assert EVENT["message"] in row


def test_a_real_process_piped_at_columns_80_cuts_nothing(admin: AdminStub) -> None:
    """As a user's pipe sees it: a fresh console that reads COLUMNS=80 from the environment."""
    result = subprocess.run(
        [sys.executable, "-m", "gpufleet", "get", "event", "--server", admin.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "2026-12-02T16:45:33" in line)
    assert EVENT["message"] in row and "…" not in result.stdout


def test_emulate_help_lists_the_emulator_options() -> None:
    code, output = gpufleet("emulate", "--help")
    assert code == 0, output
    for option in ("--arch", "--gpu", "--replicas", "--port", "--time-scale", "--fail-rate"):
        assert option in output
    assert "usage: gpufleet emulate" in output
