"""Tenancy as an operator meets it under ``gpufleet up``: the first admin key, the CLI for
tenants, keys and usage, ``--no-auth``, and the gateway fuzzed against its OpenAPI document.

Engines are the engine emulator (``engine: emulator``), so these run in seconds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.integration.fleet import ADMIN_KEY, gpufleet, start_fleet

CONFIGS = Path(__file__).parents[1] / "data" / "configs"


def emulated(tmp_path: Path) -> Path:
    spec = tmp_path / "models.yaml"
    spec.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: llama}\n"
        f"spec:\n  source: file:{CONFIGS / 'llama-3-8b.json'}\n  engine: emulator\n"
        "  resources: {gpus: 1, gpuTypes: [H100]}\n"
    )
    return spec


def test_first_start_prints_an_admin_key_once_and_the_cli_manages_tenants(
    tmp_path: Path,
) -> None:
    spec = emulated(tmp_path)
    data = tmp_path / "data"
    fleet = start_fleet(data, spec, env={"GPUFLEET_ADMIN_KEY": ""})
    try:
        printed = [line for line in fleet.banner if line.startswith("gpufleet admin key")]
        assert len(printed) == 1
        admin_key = printed[0].rsplit(" ", 1)[1]
        assert admin_key.startswith("gpf_") and len(admin_key) >= 32
        cli = {"GPUFLEET_SERVER": fleet.server, "GPUFLEET_API_KEY": admin_key}

        made = gpufleet("tenants", "create", "acme", "--rpm", "2", env=cli)
        assert made.returncode == 0, made.stderr
        assert "tenant/acme created" in made.stdout
        key = gpufleet("keys", "create", "--tenant", "acme", "--name", "app", env=cli)
        assert key.returncode == 0, key.stderr
        user_key = key.stdout.strip()
        assert user_key.startswith("gpf_") and "only time it is shown" in key.stderr

        client = OpenAI(base_url=fleet.base_url, api_key=user_key, max_retries=0)
        for _ in range(2):
            client.chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
        assert "2 requests per minute" in str(caught.value)
        assert caught.value.response.headers["retry-after"].isdigit()

        usage = gpufleet("usage", "--by", "tenant", "-o", "json", env=cli)
        assert usage.returncode == 0, usage.stderr
        rows = {r["tenant"]: r for r in json.loads(usage.stdout)["usage"]}
        assert rows["acme"]["requests"] == 2 and rows["acme"]["completion_tokens"] == 6
        assert rows["acme"]["gpu_seconds"] > 0 and rows["acme"]["cost_usd"] > 0
        table = gpufleet("usage", "--by", "model", env=cli)
        assert "llama" in table.stdout and "COST" in table.stdout

        # GitOps: tenants are declared in YAML beside models and applied like them.
        tenants = tmp_path / "tenants.yaml"
        tenants.write_text(
            "apiVersion: gpufleet.io/v1alpha1\nkind: Tenant\nmetadata: {name: globex}\n"
            "spec: {limits: {concurrency: 4}, priority: batch}\n"
        )
        applied = gpufleet("apply", "-f", str(tenants), env=cli)
        assert applied.returncode == 0 and "tenant/globex created" in applied.stdout
        again = gpufleet("apply", "-f", str(tenants), env=cli)
        assert "tenant/globex unchanged" in again.stdout
        shown = gpufleet("tenants", "list", env=cli)
        assert "globex" in shown.stdout and "batch" in shown.stdout

        listed = gpufleet("keys", "list", "--tenant", "acme", env=cli)
        assert user_key[:12] in listed.stdout and user_key not in listed.stdout
        # A user key cannot administer; without a key the CLI says how to get one.
        denied = gpufleet("get", "models", env={**cli, "GPUFLEET_API_KEY": user_key})
        assert denied.returncode == 1 and "role 'operator'" in denied.stderr
        anonymous = gpufleet("get", "models", env={**cli, "GPUFLEET_API_KEY": ""})
        assert anonymous.returncode == 1 and "GPUFLEET_API_KEY" in anonymous.stderr

        revoked = gpufleet("keys", "revoke", user_key[:12], env=cli)
        assert revoked.returncode == 0, revoked.stderr
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        # Served, then SIGINT at once: the row is written on the way out.
        OpenAI(base_url=fleet.base_url, api_key=admin_key, max_retries=0).completions.create(
            model="llama", prompt="last words", max_tokens=2
        )
    finally:
        fleet.stop()
    again = start_fleet(data, env={"GPUFLEET_ADMIN_KEY": ""})
    try:
        assert not [line for line in again.banner if "admin key" in line]  # shown once only
        cli = {"GPUFLEET_SERVER": again.server, "GPUFLEET_API_KEY": admin_key}
        ok = gpufleet("tenants", "list", env=cli)
        assert ok.returncode == 0 and "acme" in ok.stdout
        # Every request served before the restart is in the ledger (flushed at shutdown).
        usage = gpufleet("usage", "--by", "tenant", "-o", "json", env=cli)
        rows = {r["tenant"]: r for r in json.loads(usage.stdout)["usage"]}
        assert rows["acme"]["requests"] == 2
        assert rows["default"]["requests"] == 1 and rows["default"]["completion_tokens"] == 2
    finally:
        again.stop()


def test_no_auth_is_explicit_and_said_loudly(tmp_path: Path) -> None:
    fleet = start_fleet(tmp_path / "data", emulated(tmp_path), env={"GPUFLEET_ADMIN_KEY": ""})
    fleet.stop()
    open_fleet = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpufleet",
            "up",
            "--no-auth",
            "--port",
            str(fleet.port),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert open_fleet.stdout is not None
        for line in open_fleet.stdout:
            if line.startswith("gpufleet ready"):
                break
        client = OpenAI(base_url=fleet.base_url, api_key="anything", max_retries=0)
        assert [m.id for m in client.models.list()] == ["llama"]
    finally:
        open_fleet.terminate()
        _, err = open_fleet.communicate(timeout=30)
    assert "authentication is OFF (--no-auth)" in err


def test_the_gateway_survives_fuzzing_against_its_openapi_document(tmp_path: Path) -> None:
    """schemathesis: every operation, generated and stateful phases; no answer may be a 5xx."""
    runner = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    fleet = start_fleet(tmp_path / "data", emulated(tmp_path))
    try:
        result = subprocess.run(
            [
                runner,
                "run",
                f"{fleet.server}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--header",
                f"Authorization: Bearer {ADMIN_KEY}",
                "--max-examples",
                "25",
                "--seed",
                "7",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            cwd=tmp_path,  # schemathesis keeps its example database in the working directory
        )
        assert result.returncode == 0, result.stdout[-4000:]
        assert " passed" in result.stdout
        assert "Traceback" not in fleet.stderr()
    finally:
        fleet.stop()
