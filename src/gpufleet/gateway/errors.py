"""OpenAI-shaped errors — produced here and nowhere else.

Every error a client sees has the body ``{"error": {"message", "type", "param", "code"}}``, the
status the OpenAI API would use, and the request id header. Nothing else ever leaves the gateway
as an error: unexpected exceptions become a 500 of this shape, never a stack trace.
"""

from __future__ import annotations

import json

from starlette.responses import Response

__all__ = ["ApiError", "Unreachable", "error_response", "sse_error"]


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def error_response(error: ApiError) -> Response:
    return Response(
        json.dumps(error.body()).encode(),
        status_code=error.status,
        headers=error.headers,
        media_type="application/json",
    )


def sse_error(error: ApiError) -> bytes:
    """The last event of a stream that failed after its first byte was sent."""
    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"


# Constructors for the cases the gateway meets, so wording and codes stay consistent.


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def external_refused(model: str, tenant: str) -> ApiError:
    return ApiError(
        403,
        f"The model '{model}' is served by an endpoint outside the company (a hosted API): "
        f"prompts sent there leave it, and tenant '{tenant}' has not opted in (an admin sets "
        "allowExternalEndpoints: true on the Tenant)",
        type="permission_error",
        param="model",
        code="external_endpoint_not_allowed",
    )


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model '{model}' does not exist; GET /v1/models lists the models served here",
        param="model",
        code="model_not_found",
    )


def no_replica(model: str, detail: str, retry_after: int) -> ApiError:
    return ApiError(
        503,
        f"The model '{model}' has no ready replica: {detail}",
        type="service_unavailable",
        code="no_ready_replica",
        headers={"retry-after": str(retry_after)},
    )


def upstream_failed(model: str, detail: str) -> ApiError:
    return ApiError(
        502,
        f"The engine serving '{model}' failed: {detail}",
        type="upstream_error",
        code="engine_error",
    )


class Unreachable(ApiError):
    """Every replica the gateway could try refused its connection (an engine crashed, not yet
    seen so by the runtime): the dispatcher holds the request as for a model with none ready."""


def unreachable(model: str) -> Unreachable:
    return Unreachable(
        503,
        f"The model '{model}' has no ready replica: its engine is restarting",
        type="service_unavailable",
        code="no_ready_replica",
        headers={"retry-after": "2"},
    )


def quota_store_unavailable(what: str) -> ApiError:
    """The shared quota store (Redis) is away: ``what`` cannot be done now (503, retry soon)."""
    return ApiError(
        503,
        f"{what} right now (the shared quota store is unreachable); retry shortly",
        type="service_unavailable",
        code="quota_store_unavailable",
        headers={"retry-after": "2"},
    )
