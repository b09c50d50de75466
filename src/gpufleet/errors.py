"""The one exception tree of gpufleet.

Foreign errors (pydantic, YAML, OS, HTTP clients) are translated at the boundary with
``raise … from``. Whether an error is worth retrying is a property of its class, so callers
(the controller's reconcile loop above all) decide retries from the type, never from a message.
"""

from __future__ import annotations

__all__ = [
    "EngineUnavailableError",
    "GpufleetError",
    "NotFoundError",
    "PermanentError",
    "SourceError",
    "SpecError",
    "StoreError",
    "TemporaryError",
]


class GpufleetError(Exception):
    """Base of every error gpufleet raises on purpose."""


class PermanentError(GpufleetError):
    """Retrying will not help until a person changes something."""


class TemporaryError(GpufleetError):
    """Worth retrying after a delay."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SpecError(PermanentError):
    """A resource document is invalid. ``problems`` holds one line per field at fault."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class SourceError(PermanentError):
    """A model source cannot be resolved to weights on this machine."""


class EngineUnavailableError(PermanentError):
    """The engine a model asks for is not installed or not supported by this runtime."""


class NotFoundError(GpufleetError):
    """A named object does not exist."""


class StoreError(TemporaryError):
    """The store could not be reached or answered with an error."""
