"""Other systems' autoscaling algorithms, as their code defines them, as simulator scalers.

The autoscaler benchmark (bench/autoscale_sim.py) compares gpufleet's ``decide`` with these,
each implemented from the source, not imitated by our own policy with other settings. Each sees
what gpufleet's sees — the requests in flight and queued at the gateway, one sample a second
(``gpufleet.sim.scaler``) — and acts only at its own interval. The pure formulas are module
functions so that tests check them by hand.

**KubeAI** (github.com/substratusai/kubeai, now kubeai-project/kubeai; read at commit
2f32ef4, July 2025):

- ``internal/modelautoscaler/autoscaler.go`` ``Start``: every ``modelAutoscaling.interval`` it
  sums the proxy's active-requests gauge (``kubeai.inference.requests.active``, raised in
  ``internal/modelproxy/handler.go`` for the whole life of a request, waiting included — our
  ``in_flight``) over KubeAI's instances, pushes it into a moving average and asks for
  ``ceil(average / spec.targetRequests)``;
- ``internal/movingaverage/simple.go``: a plain mean over a ring of
  ``AverageWindowCount() = ceil(timeWindow / interval)`` values, seeded with zeros;
- ``internal/config/system.go``: ``interval`` defaults to 10 s, ``timeWindow`` to 10 min
  (also ``charts/kubeai/values.yaml``); ``RequiredConsecutiveScaleDowns =
  ceil(scaleDownDelaySeconds / interval)``;
- ``internal/modelclient/scale.go`` ``Scale``: clamp to [minReplicas, maxReplicas]; a scale-down
  happens only once the count of consecutive scale-down decisions has reached the required
  number (each earlier one increments it); any other decision resets it to zero;
- ``api/k8s/v1/model_types.go``: ``targetRequests`` defaults to 100, ``scaleDownDelaySeconds``
  to 30. A request for a model at zero replicas scales it to one at once
  (``ScaleAtLeastOneReplica``), which the simulator's wake does for every scaler.

**Kubernetes HPA, fed by KEDA** (kubernetes/kubernetes ``pkg/controller/podautoscaler``;
kedacore/keda):

- KEDA serves each trigger as an external metric of type ``AverageValue`` (its default metric
  type) and the HPA asks for it at each sync; ``replica_calculator.go``
  ``GetExternalPerPodMetricReplicas``: ``ratio = metric / (target × currentReplicas)``; when
  ``|1 − ratio| > tolerance`` the answer is ``ceil(metric / target)``, else the current count;
- ``horizontal.go``: with no ``behavior`` set (KEDA sets none unless
  ``advanced.horizontalPodAutoscalerConfig.behavior`` is given) ``normalizeDesiredReplicas``
  runs ``stabilizeRecommendation`` — the highest recommendation within
  ``downscaleStabilisationWindow`` — then ``convertDesiredReplicasWithRules``: at most
  ``max(scaleUpLimitFactor × current, scaleUpLimitMinimum) = max(2 × current, 4)`` and within
  [min, max] (``pkg/apis/autoscaling/v2/defaults.go`` states the same default as policies: 100 %
  or 4 pods per 15 s up, 100 % per 15 s down);
- kube-controller-manager defaults: ``--horizontal-pod-autoscaler-sync-period`` 15 s,
  ``--horizontal-pod-autoscaler-tolerance`` 0.1,
  ``--horizontal-pod-autoscaler-downscale-stabilization`` 5 min;
- KEDA (``pkg/scaling/executor/scale_executor.go``: ``defaultCooldownPeriod = 5 * 60``;
  ``pollingInterval`` defaults to 30 s, KEDA's ScaledObject docs): KEDA itself only moves
  between zero and one replica — every ``pollingInterval`` a trigger is active when its value
  exceeds ``activationThreshold`` (default 0); active at zero → one replica; inactive for
  ``cooldownPeriod`` since the last active poll → zero. Above one the HPA decides.

Not modelled, and in the baselines' favour: Prometheus's scrape delay before KEDA sees the
metric (the HPA here reads the gateway's gauge at its sync) and KubeAI's scrape of several
proxies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpufleet.autoscale import Sample
from gpufleet.sim.scaler import Scaler, ScalerFactory
from gpufleet.spec import ModelSpec

__all__ = [
    "HpaScaler",
    "KubeAIScaler",
    "hpa_external_per_pod",
    "hpa_normalize",
    "keda_hpa",
    "kubeai",
    "kubeai_desired",
]

# KubeAI defaults (internal/config/system.go, api/k8s/v1/model_types.go).
KUBEAI_INTERVAL_S = 10.0
KUBEAI_TIME_WINDOW_S = 600.0
KUBEAI_SCALE_DOWN_DELAY_S = 30.0
KUBEAI_TARGET_REQUESTS = 100
# Kubernetes HPA defaults (kube-controller-manager flags, horizontal.go constants).
HPA_SYNC_S = 15.0
HPA_TOLERANCE = 0.1
HPA_DOWNSCALE_WINDOW_S = 300.0
HPA_SCALE_UP_FACTOR = 2.0
HPA_SCALE_UP_MINIMUM = 4
# KEDA defaults (ScaledObject).
KEDA_POLLING_S = 30.0
KEDA_COOLDOWN_S = 300.0
KEDA_ACTIVATION = 0.0


def kubeai_desired(history: Sequence[float], target_requests: float) -> int:
    """KubeAI's recommendation: ceil(mean of the window's active-request sums / target)."""
    return math.ceil(sum(history) / len(history) / target_requests)


def hpa_external_per_pod(
    metric: float, target: float, current: int, tolerance: float = HPA_TOLERANCE
) -> int:
    """``GetExternalPerPodMetricReplicas``: ceil(metric / target) unless within tolerance."""
    ratio = metric / (target * current)
    if abs(1.0 - ratio) > tolerance:
        return math.ceil(metric / target)
    return current


def hpa_normalize(
    current: int, recommendation: int, recent: Sequence[int], lo: int, hi: int
) -> int:
    """``normalizeDesiredReplicas`` without ``behavior``: the highest of ``recommendation`` and
    the ``recent`` ones (those within the downscale stabilization window), then at most
    max(2 × current, 4) and within [lo, hi]."""
    stabilized = max([recommendation, *recent])
    up_limit = int(max(HPA_SCALE_UP_FACTOR * current, HPA_SCALE_UP_MINIMUM))
    ceiling = min(hi, up_limit)
    return max(lo, min(stabilized, ceiling))


def _due(now: float, next_at: float) -> bool:
    return now + 1e-9 >= next_at


@dataclass
class KubeAIScaler:
    """KubeAI's ``modelautoscaler`` over the simulator's samples (see the module docstring)."""

    target_requests: float = KUBEAI_TARGET_REQUESTS
    min_replicas: int = 1
    max_replicas: int = 1_000
    interval_s: float = KUBEAI_INTERVAL_S
    time_window_s: float = KUBEAI_TIME_WINDOW_S
    scale_down_delay_s: float = KUBEAI_SCALE_DOWN_DELAY_S
    name: str = "kubeai"
    history: list[float] = field(default_factory=list)
    index: int = 0
    consecutive_downs: int = 0
    next_at: float = 0.0

    def __post_init__(self) -> None:
        count = math.ceil(self.time_window_s / self.interval_s)  # AverageWindowCount
        self.history = [0.0] * count  # movingaverage.NewSimple(make([]float64, n))
        self.next_at = self.interval_s  # a ticker's first tick is one interval in

    def decide(self, sample: Sample, ready: int, current: int, now: float) -> int:
        if not _due(now, self.next_at):
            return current
        self.next_at += self.interval_s
        self.history[self.index] = sample.in_flight
        self.index = (self.index + 1) % len(self.history)
        want = kubeai_desired(self.history, self.target_requests)
        want = max(self.min_replicas, min(want, self.max_replicas))  # enforceReplicaBounds
        required = math.ceil(self.scale_down_delay_s / self.interval_s)
        if current > want:
            if self.consecutive_downs < required:
                self.consecutive_downs += 1
                return current
        else:
            self.consecutive_downs = 0
        return want


@dataclass
class HpaScaler:
    """The Kubernetes HPA on a KEDA external metric (``AverageValue``), with KEDA's activation
    between zero and one replica (see the module docstring)."""

    target: float
    min_replicas: int = 1
    max_replicas: int = 1_000
    sync_s: float = HPA_SYNC_S
    tolerance: float = HPA_TOLERANCE
    downscale_window_s: float = HPA_DOWNSCALE_WINDOW_S
    polling_s: float = KEDA_POLLING_S
    cooldown_s: float = KEDA_COOLDOWN_S
    activation: float = KEDA_ACTIVATION
    name: str = "keda-hpa"
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    next_sync: float = 0.0
    next_poll: float = 0.0
    last_active: float = 0.0

    def __post_init__(self) -> None:
        self.next_sync = self.sync_s
        self.next_poll = self.polling_s

    def decide(self, sample: Sample, ready: int, current: int, now: float) -> int:
        want = current
        if self.min_replicas == 0 and _due(now, self.next_poll):  # KEDA's own loop
            self.next_poll += self.polling_s
            if sample.in_flight > self.activation:
                self.last_active = now
                if want == 0:
                    want = 1
            elif want > 0 and now - self.last_active >= self.cooldown_s:
                want = 0
        if _due(now, self.next_sync):  # the HPA's loop; it does not act at zero
            self.next_sync += self.sync_s
            if want > 0:
                raw = hpa_external_per_pod(sample.in_flight, self.target, want, self.tolerance)
                cutoff = now - self.downscale_window_s
                recent = [r for t, r in self.recommendations if t >= cutoff]
                self.recommendations = [(t, r) for t, r in self.recommendations if t >= cutoff]
                self.recommendations.append((now, raw))
                want = hpa_normalize(
                    want, raw, recent, max(1, self.min_replicas), self.max_replicas
                )
        return want


def kubeai(target_requests: float) -> ScalerFactory:
    """A factory for ``SimSettings.scalers``: a fresh KubeAI scaler (defaults but the target)
    bounded by the model's ``replicas``."""

    def make(spec: ModelSpec) -> Scaler:
        return KubeAIScaler(target_requests, spec.replicas.min, spec.replicas.max)

    return make


def keda_hpa(target: float) -> ScalerFactory:
    """A factory for ``SimSettings.scalers``: a fresh HPA-on-KEDA scaler (defaults but the
    target) bounded by the model's ``replicas``."""

    def make(spec: ModelSpec) -> Scaler:
        return HpaScaler(target, spec.replicas.min, spec.replicas.max)

    return make
