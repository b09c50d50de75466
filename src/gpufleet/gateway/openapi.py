"""The gateway's OpenAPI 3.1 document (``GET /openapi.json``).

Written by hand, not generated: the hot path uses plain Starlette routes with hand-written
validation (microseconds, field-named errors), so there are no pydantic request models to
derive it from. A test fuzzes the running gateway against this document (schemathesis), which
keeps the two honest with each other.
"""

from __future__ import annotations

from typing import Any

__all__ = ["openapi_document"]

_ERROR = {
    "description": "An OpenAI-style error",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["message", "type"],
                        "properties": {
                            "message": {"type": "string"},
                            "type": {"type": "string"},
                            "param": {"type": ["string", "null"]},
                            "code": {"type": ["string", "null"]},
                        },
                    }
                },
            }
        }
    },
}
_ANY_JSON = {"content": {"application/json": {"schema": {"type": "object"}}}}
_ERRORS = {str(code): _ERROR for code in (400, 401, 403, 404, 405, 409, 413, 422, 429, 502, 503)}

_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "user", "assistant"]},
        "content": {"type": "string", "maxLength": 200},
    },
}
_SAMPLING = {
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 16},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "stream": {"type": "boolean"},
    "user": {"type": "string", "maxLength": 64},
}


_FIELDS_NOTE = (
    "Top-level fields beyond those listed: OpenAI's and the documented extensions of vLLM, "
    "SGLang and llama.cpp pass to the engine; any other is a 400 (code unknown_parameter)."
)


def _inference(summary: str, body: dict[str, Any]) -> dict[str, Any]:
    body = {**body, "description": _FIELDS_NOTE}
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {
                "200": {"description": "The engine's answer (JSON, or SSE when streaming)"},
                **_ERRORS,
            },
        }
    }


def _admin(
    method: str,
    summary: str,
    *,
    body: dict[str, Any] | None = None,
    params: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": "OK", **_ANY_JSON}, **_ERRORS},
    }
    if method == "post" and "key" in summary.lower():
        op["responses"]["201"] = {"description": "Created", **_ANY_JSON}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = params
    return {method: op}


def _path_param(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[a-z0-9_-]{1,40}$"},
    }


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


_LIMITS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "requestsPerMinute": {"type": "integer", "minimum": 1},
        "tokensPerMinute": {"type": "integer", "minimum": 1},
        "concurrency": {"type": "integer", "minimum": 1},
        "budget": {
            "type": "object",
            "required": ["usd"],
            "properties": {
                "usd": {"type": "number", "exclusiveMinimum": 0},
                "period": {"type": "string", "enum": ["day", "week", "month"]},
            },
        },
    },
}


def openapi_document(models: list[str] | None = None) -> dict[str, Any]:
    """The document; ``models`` (those served now) become the enum of the ``model`` fields."""
    model: dict[str, Any] = {"type": "string"}
    if models:
        model["enum"] = sorted(models)
    paths: dict[str, Any] = {
        "/v1/chat/completions": _inference(
            "Chat completion",
            {
                "type": "object",
                "required": ["model", "messages"],
                "properties": {
                    "model": model,
                    "messages": {"type": "array", "items": _MESSAGE, "minItems": 1, "maxItems": 4},
                    **_SAMPLING,
                },
            },
        ),
        "/v1/completions": _inference(
            "Text completion",
            {
                "type": "object",
                "required": ["model", "prompt"],
                "properties": {
                    "model": model,
                    "prompt": {"type": "string", "maxLength": 400},
                    **_SAMPLING,
                },
            },
        ),
        "/v1/embeddings": _inference(
            "Embeddings",
            {
                "type": "object",
                "required": ["model", "input"],
                "properties": {
                    "model": model,
                    "input": {
                        "oneOf": [
                            {"type": "string", "maxLength": 400},
                            {
                                "type": "array",
                                "items": {"type": "string", "maxLength": 100},
                                "maxItems": 4,
                            },
                        ]
                    },
                },
            },
        ),
        "/v1/models": {
            "get": {
                "summary": "Models this key may use",
                "responses": {"200": {"description": "OK", **_ANY_JSON}, **_ERRORS},
            }
        },
        "/v1/models/{name}": {
            "get": {
                "summary": "One model",
                "parameters": [_path_param("name")],
                "responses": {"200": {"description": "OK", **_ANY_JSON}, **_ERRORS},
            }
        },
        "/healthz": {
            "get": {
                "summary": "Serving health: 503 while a loop that follows the fleet is down",
                "security": [],
                "responses": {
                    "200": {"description": "OK"},
                    "503": {"description": "A background loop is down (loops_down)"},
                },
            }
        },
        "/livez": {
            "get": {
                "summary": "Liveness: the process answers",
                "security": [],
                "responses": {"200": {"description": "OK"}},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness",
                "security": [],
                "responses": {
                    "200": {"description": "Ready"},
                    "503": {"description": "A model has no ready replica"},
                },
            }
        },
        "/admin/v1/models": {
            **_admin("get", "List models (operator)"),
            **_admin(
                "post",
                "Apply model documents, all or nothing (operator)",
                body={
                    "type": "object",
                    "required": ["documents"],
                    "properties": {"documents": {"type": "array", "items": {"type": "object"}}},
                },
            ),
        },
        "/admin/v1/models/{name}": {
            **_admin("get", "One model (operator)", params=[_path_param("name")]),
            **_admin("delete", "Delete a model (operator)", params=[_path_param("name")]),
        },
        "/admin/v1/jobs": {
            **_admin(
                "get", "List GPU jobs (operator)", params=[_query("tenant", {"type": "string"})]
            ),
            **_admin(
                "post",
                "Submit GpuJob documents, all or nothing (operator)",
                body={
                    "type": "object",
                    "required": ["documents"],
                    "properties": {"documents": {"type": "array", "items": {"type": "object"}}},
                },
            ),
        },
        "/admin/v1/jobs/{name}": _admin(
            "get", "One GPU job (operator)", params=[_path_param("name")]
        ),
        "/admin/v1/jobs/{name}/cancel": _admin(
            "post", "Cancel a GPU job (operator)", params=[_path_param("name")]
        ),
        "/admin/v1/replicas": _admin(
            "get", "Replicas (operator)", params=[_query("model", {"type": "string"})]
        ),
        "/admin/v1/events": _admin(
            "get", "Events (operator)", params=[_query("model", {"type": "string"})]
        ),
        "/admin/v1/tenants": {
            **_admin("get", "List tenants (admin)"),
            **_admin(
                "post",
                "Create or update a tenant (admin)",
                body={
                    "type": "object",
                    "required": ["metadata"],
                    "properties": {
                        "metadata": {
                            "type": "object",
                            "required": ["name"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {
                                    "type": "string",
                                    "pattern": "^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$",
                                }
                            },
                        },
                        "spec": {
                            "type": "object",
                            "properties": {
                                "limits": _LIMITS,
                                "priority": {"type": "string", "enum": ["interactive", "batch"]},
                                "weight": {
                                    "type": "number",
                                    "exclusiveMinimum": 0,
                                    "maximum": 1000,
                                },
                            },
                        },
                    },
                },
            ),
        },
        "/admin/v1/tenants/{name}": _admin(
            "delete", "Delete a tenant and revoke its keys (admin)", params=[_path_param("name")]
        ),
        "/admin/v1/tenants/{name}/quota": _admin(
            "get", "A tenant's quota use (admin)", params=[_path_param("name")]
        ),
        "/admin/v1/keys": {
            **_admin("get", "List API keys (admin)", params=[_query("tenant", {"type": "string"})]),
            **_admin(
                "post",
                "Create an API key, shown once (admin)",
                body={
                    "type": "object",
                    "properties": {
                        "tenant": {"type": "string"},
                        "name": {"type": "string"},
                        "role": {"type": "string", "enum": ["admin", "operator", "user"]},
                        "limits": _LIMITS,
                        "expires_in_days": {"type": "number"},
                    },
                },
            ),
        },
        "/admin/v1/keys/{prefix}": _admin(
            "delete", "Revoke an API key (admin)", params=[_path_param("prefix")]
        ),
        "/admin/v1/usage": _admin(
            "get",
            "Usage totals (operator)",
            params=[
                _query("by", {"type": "string", "enum": ["tenant", "model", "key"]}),
                _query("since", {"type": "string"}),
                _query("tenant", {"type": "string"}),
            ],
        ),
        "/admin/v1/usage/requests": _admin(
            "get",
            "Ledger rows (operator)",
            params=[
                _query("since", {"type": "string"}),
                _query("tenant", {"type": "string"}),
                _query("limit", {"type": "integer"}),
            ],
        ),
        "/admin/v1/gpus": _admin(
            "get", "GPUs and MIG instances now, who holds them, idle (operator)"
        ),
        "/admin/v1/gpus/history": _admin(
            "get",
            "GPU history: 2 s samples for the last hour, 1-minute rows for a week (operator)",
            params=[
                _query("since", {"type": "string"}),
                _query("until", {"type": "string"}),
                _query("device", {"type": "string"}),
                _query("model", {"type": "string"}),
                _query("node", {"type": "string"}),
                _query("resolution", {"type": "string", "enum": ["2s", "1m"]}),
            ],
        ),
    }
    paths.update(_batch_paths())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gpufleet gateway",
            "version": "v1",
            "description": "OpenAI-compatible inference API and the gpufleet admin API",
        },
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": paths,
    }


def _batch_paths() -> dict[str, Any]:
    """The OpenAI Files and Batches API."""
    upload = {
        "type": "object",
        "required": ["file", "purpose"],
        "properties": {
            "file": {"type": "string", "format": "binary"},
            "purpose": {"type": "string", "enum": ["batch", "user_data"]},
        },
    }
    batch = {
        "type": "object",
        "required": ["input_file_id", "endpoint", "completion_window"],
        "properties": {
            "input_file_id": {"type": "string", "maxLength": 40},
            "endpoint": {
                "type": "string",
                "enum": ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"],
            },
            "completion_window": {"type": "string", "enum": ["24h"]},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    return {
        "/v1/files": {
            "post": {
                "summary": "Upload a file (JSONL of requests for a batch)",
                "requestBody": {
                    "required": True,
                    "content": {"multipart/form-data": {"schema": upload}},
                },
                "responses": {"200": {"description": "The file", **_ANY_JSON}, **_ERRORS},
            },
            **_admin(
                "get",
                "Files of the caller's tenant",
                params=[_query("purpose", {"type": "string"})],
            ),
        },
        "/v1/files/{id}": {
            **_admin("get", "A file", params=[_path_param("id")]),
            **_admin("delete", "Delete a file", params=[_path_param("id")]),
        },
        "/v1/files/{id}/content": {
            "get": {
                "summary": "A file's content",
                "parameters": [_path_param("id")],
                "responses": {"200": {"description": "The bytes"}, **_ERRORS},
            }
        },
        "/v1/batches": {
            **_admin("post", "Create a batch from an uploaded file", body=batch),
            **_admin(
                "get",
                "Batches of the caller's tenant, newest first",
                params=[
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 100}),
                    _query("after", {"type": "string"}),
                ],
            ),
        },
        "/v1/batches/{id}": _admin("get", "A batch and its progress", params=[_path_param("id")]),
        "/v1/batches/{id}/cancel": _admin("post", "Cancel a batch", params=[_path_param("id")]),
    }
