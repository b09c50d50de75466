"""The engine emulator as an engine: ``engine: emulator`` in a Model spec runs emulated replicas.

The source names an architecture (a ``config.json``, its folder, or a GGUF), the first entry of
``resources.gpuTypes`` the GPU it pretends to be (H100 if none), ``resources.gpus`` the
tensor-parallel degree. Replicas speak vLLM's metric names, so the vLLM parser reads them.

A benchmark or test hook: with ``GPUFLEET_EMULATOR_COMMAND`` set in the environment of the
process that launches engines (``gpufleet up``), every emulated replica runs that command
instead — e.g. ``python bench/null_engine.py {port}`` — so a benchmark can put a fast upstream
of its own behind the real gateway, launched and supervised as any engine is, without a field
in the Model schema that a user could set by mistake. ``{host}``, ``{port}`` and ``{model}``
(the served name) are filled in; the command must serve ``/v1/models`` (readiness) and
``/health`` (liveness). Its secret, as the emulator's, comes in ``GPUFLEET_ENGINE_KEY`` (an
environment variable, not a placeholder: arguments show in ``ps``); a command that enforces
it answers 401 without it, one that ignores it still serves the gateway. The variable is read once, when gpufleet imports its adapters, and
every launch it changes logs a warning, so a stray setting does not go unnoticed.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

from gpufleet.engines.base import ENGINE_KEY_ENV, LOCAL, KvEvents, Launch, Placement, ReadinessProbe
from gpufleet.engines.metrics import EngineLoad, parse_vllm
from gpufleet.spec import ModelSpec

__all__ = ["COMMAND_ENV", "EmulatorEngine"]

log = logging.getLogger("gpufleet.engines")

#: The environment variable that replaces the emulator's command (a benchmark and test hook).
COMMAND_ENV = "GPUFLEET_EMULATOR_COMMAND"


class EmulatorEngine:
    name = "emulator"
    metrics_path: str | None = "/metrics"
    api_key_env: str | None = ENGINE_KEY_ENV

    def __init__(self, command: str | None = None) -> None:
        #: A command template run instead of the emulator; None runs the emulator.
        self.command = command or None

    @classmethod
    def from_env(cls) -> EmulatorEngine:
        return cls(os.environ.get(COMMAND_ENV))

    def unavailable_reason(self) -> str | None:
        return None  # part of gpufleet itself

    def launch(
        self,
        spec: ModelSpec,
        *,
        weights: Path,
        served_name: str,
        host: str,
        port: int,
        placement: Placement = LOCAL,
        api_key: str | None = None,
        kv_events: KvEvents | None = None,
    ) -> Launch:
        env = {ENGINE_KEY_ENV: api_key} if api_key is not None else {}
        if self.command is not None:
            return self._replaced(served_name, host, port, env)
        gpu = placement.gpu_type or (
            spec.resources.gpu_types[0] if spec.resources.gpu_types else "H100"
        )
        tp = len(placement.gpu_indices) or max(1, spec.resources.gpus)
        argv = [
            sys.executable, "-m", "gpufleet.emulator",
            "--arch", str(weights),
            "--name", served_name,
            "--gpu", gpu,
            "--tp", str(tp),
            "--host", host,
            "--port", str(port),
        ]  # fmt: skip
        if placement.memory_fraction is not None:
            argv += ["--gpu-memory-utilization", f"{placement.memory_fraction:.3f}"]
        if kv_events is not None:
            argv += ["--kv-events-config", kv_events.config(spec.engine_args)]
        argv += spec.engine_args
        return Launch(
            argv=tuple(argv),
            env=env,
            readiness=ReadinessProbe("GET", "/v1/models", timeout_s=60.0),
            metrics_path="/metrics",
            stop_grace_s=5.0,
        )

    def _replaced(self, served_name: str, host: str, port: int, env: dict[str, str]) -> Launch:
        """The hook's command, its placeholders filled in; a bad template is the replica's
        failure (ValueError), never the process's."""
        assert self.command is not None
        fields = {"host": host, "port": port, "model": served_name}
        try:
            argv = tuple(word.format(**fields) for word in shlex.split(self.command))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"{COMMAND_ENV}={self.command!r} is not a valid command template "
                f"({type(exc).__name__}: {exc}); it may use {{host}}, {{port}} and {{model}}"
            ) from exc
        if not argv:
            raise ValueError(f"{COMMAND_ENV} is set but holds no command")
        log.warning("replica of %s runs %s (from %s)", served_name, shlex.join(argv), COMMAND_ENV)
        return Launch(
            argv=argv,
            env=env,
            readiness=ReadinessProbe("GET", "/v1/models", timeout_s=60.0),
            metrics_path="/metrics",
            stop_grace_s=5.0,
        )

    def parse_metrics(self, text: str) -> EngineLoad | None:
        return parse_vllm(text)
