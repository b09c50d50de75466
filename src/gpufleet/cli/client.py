"""A small HTTP client for the admin API, on the standard library (the CLI stays quick to start)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from gpufleet.errors import GpufleetError

__all__ = ["AdminClient", "ClientError"]


class ClientError(GpufleetError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AdminClient:
    def __init__(self, server: str, timeout_s: float = 30.0, api_key: str | None = None) -> None:
        self.server = server.rstrip("/")
        self.timeout = timeout_s
        self.api_key = api_key if api_key is not None else os.environ.get("GPUFLEET_API_KEY")

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json"} if data else {}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(
            self.server + path,
            data=data,
            method=method,
            headers=headers,
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = resp.read()
                ctype = resp.headers.get("content-type", "")
        except urllib.error.HTTPError as exc:
            message = _message(exc.read()) or f"HTTP {exc.code}"
            if exc.code == 401:
                message += (
                    " (set GPUFLEET_API_KEY to a key of this server; 'gpufleet up' prints the "
                    "admin key on its first start)"
                )
            raise ClientError(message, exc.code) from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise ClientError(
                f"no gpufleet server answers at {self.server} ({getattr(exc, 'reason', exc)}); "
                "start one with 'gpufleet up', or point --server / GPUFLEET_SERVER at it"
            ) from exc
        if ctype.startswith("application/json"):
            return json.loads(payload)
        return payload.decode("utf-8", "replace")


def _message(payload: bytes) -> str:
    try:
        data = json.loads(payload)
        return str(data["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return payload.decode("utf-8", "replace").strip()
