"""Table definitions (SQLAlchemy Core). Migrations in ``migrations/versions`` must match them."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)

__all__ = [
    "HEAD_REVISION",
    "api_keys",
    "aware",
    "batch_lines",
    "batches",
    "events",
    "files",
    "gpu_devices",
    "gpu_jobs",
    "gpu_samples",
    "inventories",
    "metadata",
    "model_revisions",
    "models",
    "replica_spans",
    "scale_state",
    "tenants",
    "ui_sessions",
    "usage",
    "usage_daily",
    "usage_dead_letters",
    "usage_refusals_daily",
]


def aware(value: dt.datetime) -> dt.datetime:
    """A ``DateTime(timezone=True)`` value as read back: SQLite returns it without its zone."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


#: The newest migration; a test checks it against the migration scripts.
HEAD_REVISION = "0009"

metadata = MetaData()

models = Table(
    "models",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("namespace", String(63), nullable=False),
    Column("name", String(63), nullable=False),
    # Bumped whenever the spec changes; replicas carry the generation they were started for.
    Column("generation", Integer, nullable=False),
    Column("document", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("namespace", "name", name="uq_models_namespace_name"),
)

events = Table(
    "events",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("namespace", String(63), nullable=False),
    Column("model", String(63), nullable=False),
    Column("type", String(16), nullable=False),  # Normal | Warning
    Column("reason", String(64), nullable=False),
    Column("message", Text, nullable=False),
    Index("ix_events_model_at", "namespace", "model", "at"),
)

_BIGINT = BigInteger().with_variant(Integer, "sqlite")

tenants = Table(
    "tenants",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("document", JSON, nullable=False),  # the Tenant resource (limits, priority, weight)
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    # The key's first characters ("gpf_" + 8): shown in listings, used to find the key.
    Column("prefix", String(16), primary_key=True),
    # SHA-256 of the whole key; the key itself is never stored (keys are 192 random bits, so a
    # fast hash is the right one: nothing to brute-force).
    Column("hash", String(64), nullable=False),
    Column("tenant", String(63), nullable=False),
    Column("name", String(63), nullable=False),
    Column("role", String(16), nullable=False),  # admin | operator | user
    Column("limits", JSON, nullable=True),  # per-key quotas (LimitsSpec document) or NULL
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    # Gateways poll for rows changed since their last look (revocation within a second).
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_api_keys_updated", "updated_at"),
    Index("ix_api_keys_tenant", "tenant"),
)

usage = Table(
    "usage",
    metadata,
    Column("id", _BIGINT, primary_key=True, autoincrement=True),
    # At most once per request: a retried batch cannot count a request twice.
    Column("request_id", String(128), nullable=False, unique=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("tenant", String(63), nullable=False),
    Column("key_prefix", String(16), nullable=False),
    Column("model", String(63), nullable=False),
    Column("replica", String(128), nullable=False),
    Column("route", String(32), nullable=False),
    Column("status", Integer, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("cached_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("ttft_ms", Float, nullable=True),
    Column("duration_ms", Float, nullable=False),
    Column("gpu_seconds", Float, nullable=False),
    Column("cost_usd", Float, nullable=False),
    Column("client_request_id", String(128), nullable=True),
    # Sent to an endpoint outside the company; token counts the gateway's estimate (rows from
    # before these columns read as neither).
    Column("external", Boolean, nullable=False, server_default=false()),
    Column("estimated", Boolean, nullable=False, server_default=false()),
    Index("ix_usage_at", "at"),
    Index("ix_usage_tenant_at", "tenant", "at"),
    Index("ix_usage_model_at", "model", "at"),
    Index("ix_usage_key_at", "key_prefix", "at"),
)

# Daily rollups kept with every batch written to ``usage``: reports over months read these,
# not millions of rows.
usage_daily = Table(
    "usage_daily",
    metadata,
    Column("day", Date, nullable=False),
    Column("tenant", String(63), nullable=False),
    Column("key_prefix", String(16), nullable=False),
    Column("model", String(63), nullable=False),
    Column("requests", _BIGINT, nullable=False),
    Column("errors", _BIGINT, nullable=False),
    Column("prompt_tokens", _BIGINT, nullable=False),
    Column("cached_tokens", _BIGINT, nullable=False),
    Column("completion_tokens", _BIGINT, nullable=False),
    Column("gpu_seconds", Float, nullable=False),
    Column("cost_usd", Float, nullable=False),
    # Of these, what went to endpoints outside the company, and the requests whose token counts
    # are estimates: columns, not a key, so reports read no more rows for them.
    Column("external_requests", _BIGINT, nullable=False, server_default="0"),
    Column("external_prompt_tokens", _BIGINT, nullable=False, server_default="0"),
    Column("external_completion_tokens", _BIGINT, nullable=False, server_default="0"),
    Column("external_cost_usd", Float, nullable=False, server_default="0"),
    Column("estimated_requests", _BIGINT, nullable=False, server_default="0"),
    PrimaryKeyConstraint("day", "tenant", "key_prefix", "model", name="pk_usage_daily"),
)

# Requests refused before they reached an engine (401, 429, 503, validation errors), counted
# per day, not one row each: a row per refusal would let abuse grow the ledger. ``model`` and
# ``key_prefix`` are empty where they were not known (a bad key, a model that does not exist).
usage_refusals_daily = Table(
    "usage_refusals_daily",
    metadata,
    Column("day", Date, nullable=False),
    Column("tenant", String(63), nullable=False),
    Column("key_prefix", String(16), nullable=False),
    Column("model", String(63), nullable=False),
    Column("status", Integer, nullable=False),
    Column("reason", String(64), nullable=False),
    Column("refused", _BIGINT, nullable=False),
    PrimaryKeyConstraint(
        "day", "tenant", "key_prefix", "model", "status", "reason", name="pk_usage_refusals_daily"
    ),
)

# Ledger rows the store rejected for a fixed reason (a value it cannot hold, an unreadable
# spool line): set aside with the error, so they never block the rows behind them. ``key`` is
# the request id, or a hash of the line without one (a replayed dead letter is kept once).
usage_dead_letters = Table(
    "usage_dead_letters",
    metadata,
    Column("id", _BIGINT, primary_key=True, autoincrement=True),
    Column("key", String(128), nullable=False, unique=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("error", Text, nullable=False),
    Column("line", Text, nullable=False),
)

# The autoscaler's decisions that must survive a restart: the replica count it last asked for
# and when the model last had a request (the scale-to-zero timer), on the wall clock.
scale_state = Table(
    "scale_state",
    metadata,
    Column("namespace", String(63), nullable=False),
    Column("model", String(63), nullable=False),
    Column("desired", Integer, nullable=False),
    Column("last_active", Float, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("namespace", "model", name="pk_scale_state"),
)

# Every generation of every model's spec, kept for rollouts: a canary runs beside the last
# promoted generation, and a rolled-back generation hands the model back to it — after a
# restart too. status: new, active (promoted), rolled-back.
model_revisions = Table(
    "model_revisions",
    metadata,
    Column("namespace", String(63), nullable=False),
    Column("model", String(63), nullable=False),
    Column("generation", Integer, nullable=False),
    Column("document", JSON, nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("namespace", "model", "generation", name="pk_model_revisions"),
)

# The Files and Batches API (OpenAI-compatible). A file's content lives in the store, so that
# every gateway replica can read what another was sent.
files = Table(
    "files",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant", String(63), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("filename", String(255), nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("content", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_files_tenant", "tenant", "created_at"),
)

batches = Table(
    "batches",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant", String(63), nullable=False),
    Column("key_prefix", String(16), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(40), nullable=False),
    Column("completion_window", String(8), nullable=False),
    Column("status", String(16), nullable=False),
    Column("output_file_id", String(40), nullable=True),
    Column("error_file_id", String(40), nullable=True),
    Column("total", Integer, nullable=False),
    Column("completed", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("meta", JSON, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("in_progress_at", DateTime(timezone=True), nullable=True),
    Column("finalizing_at", DateTime(timezone=True), nullable=True),
    Column("completed_at", DateTime(timezone=True), nullable=True),
    Column("cancelling_at", DateTime(timezone=True), nullable=True),
    Column("cancelled_at", DateTime(timezone=True), nullable=True),
    Column("expired_at", DateTime(timezone=True), nullable=True),
    #: The gateway running the batch, and until when its claim holds (renewed while it runs).
    Column("owner", String(64), nullable=True),
    Column("lease_until", DateTime(timezone=True), nullable=True),
    Index("ix_batches_tenant", "tenant", "created_at"),
    Index("ix_batches_status", "status"),
)

# One row per input line; its answer is written once (pending → done | failed), which is what
# makes the output hold every line exactly once across restarts and retries.
batch_lines = Table(
    "batch_lines",
    metadata,
    Column("batch_id", String(40), nullable=False),
    Column("line", Integer, nullable=False),
    Column("custom_id", String(512), nullable=False),
    Column("body", JSON, nullable=False),
    Column("status", String(8), nullable=False),
    Column("result", JSON, nullable=True),
    PrimaryKeyConstraint("batch_id", "line", name="pk_batch_lines"),
    Index("ix_batch_lines_status", "batch_id", "status"),
)

# What each replica held, and for how long: the capacity side of the cost report (every placed
# GPU, or share of one, × its price, busy or idle). A span is open (``ended_at`` NULL) while its
# replica exists; the controller moves ``seen_at`` on while it watches it, so a span left open
# by a process that died ends at its last ``seen_at``, not at "now".
replica_spans = Table(
    "replica_spans",
    metadata,
    Column("id", _BIGINT, primary_key=True, autoincrement=True),
    Column("namespace", String(63), nullable=False),
    Column("model", String(63), nullable=False),
    Column("replica", String(128), nullable=False),
    Column("generation", Integer, nullable=False),
    Column("gpus", Float, nullable=False),  # GPUs held (a share for a slice)
    Column("gpu_type", String(32), nullable=True),
    Column("price_per_hour", Float, nullable=False),  # of the whole replica
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("seen_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True), nullable=True),
    Index("ix_replica_spans_open", "ended_at", "replica"),
    Index("ix_replica_spans_started", "started_at"),
)

# The fleet's inventory as the operator last read it from the nodes (one row per namespace it
# runs in): gateways on Kubernetes may not list nodes, and the cost report needs the GPUs that
# nothing holds.
inventories = Table(
    "inventories",
    metadata,
    Column("namespace", String(63), primary_key=True),
    Column("document", JSON, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Console sessions: the SHA-256 of a random token held in an HttpOnly cookie, and the API key
# it was opened with (its role and tenant are read from the key on every request, so revoking
# the key ends the session).
ui_sessions = Table(
    "ui_sessions",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("key_prefix", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index("ix_ui_sessions_key", "key_prefix"),
)

# GPUs and MIG instances the telemetry has seen, each once: history rows name a device by this
# small id rather than its 40-character UUID (a week of 1-minute rows for 1,000 GPUs is ten
# million rows).
gpu_devices = Table(
    "gpu_devices",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("device", String(96), nullable=False, unique=True),  # GPU or MIG instance UUID
    Column("node", String(253), nullable=False),
    Column("gpu_index", String(64), nullable=False),  # "0", or "0/mig-1g.10gb/3"
    Column("name", String(128), nullable=False),
    Column("parent", String(96), nullable=True),  # a MIG instance's GPU
    Column("memory_total", BigInteger, nullable=True),
    Index("ix_gpu_devices_node", "node"),
)

# GPU history in two resolutions (``resolution`` in seconds): the samples themselves (2 s) for
# an hour, and 1-minute rows (averages; the maximum of memory) for a week. ``at`` is unix
# seconds, an integer: SQLite keeps it in 4–6 bytes where a DateTime's text takes 26.
gpu_samples = Table(
    "gpu_samples",
    metadata,
    Column("device_id", Integer, nullable=False),
    Column("resolution", SmallInteger, nullable=False),
    Column("at", BigInteger, nullable=False),
    Column("memory_used", BigInteger, nullable=True),
    Column("util", Float, nullable=True),
    Column("sm_active", Float, nullable=True),
    Column("power_w", Float, nullable=True),
    Column("temp_c", Float, nullable=True),
    Column("replica", String(128), nullable=True),  # NULL: idle
    Column("model", String(63), nullable=True),
    PrimaryKeyConstraint("device_id", "resolution", "at", name="pk_gpu_samples"),
    Index("ix_gpu_samples_at", "resolution", "at"),
    Index("ix_gpu_samples_model", "model", "resolution", "at"),
)

# GPU jobs (``kind: GpuJob``): one row per job, whatever its attempts — what makes a job
# neither lost nor run twice across restarts of gpufleet. ``phase`` is where it is
# (Queued, Running, Preempting, Cancelling, Succeeded, Failed, Cancelled); ``attempt`` the attempts started
# so far; ``placement`` where the running attempt holds GPUs (JSON), ``pid`` its process
# (``gpufleet up``) to adopt or reap after a restart.
gpu_jobs = Table(
    "gpu_jobs",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("tenant", String(63), nullable=False),
    Column("document", JSON, nullable=False),
    Column("phase", String(16), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("failures", Integer, nullable=False),
    Column("preemptions", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("placement", JSON, nullable=True),
    Column("pid", Integer, nullable=True),
    Column("gpu_seconds", Float, nullable=False),
    Column("cost_usd", Float, nullable=False),
    Column("submitted_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Index("ix_gpu_jobs_phase", "phase"),
)
