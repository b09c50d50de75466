"""KEDA instead of gpufleet's autoscaler: a ScaledObject per model on gpufleet's own metrics.

The gateway exports requests in flight and queued per model; KEDA reads their sum from
Prometheus and scales the model's one Deployment to keep ``autoscaling.targetInFlight`` per
replica, within ``replicas.min``-``max``, waiting ``scaleDownDelay`` before scaling down and
``scaleToZeroAfter`` before zero, as gpufleet's autoscaler would.
"""

from __future__ import annotations

from typing import Any

from gpufleet.runtime.kubernetes.common import LABEL_MODEL, RenderSettings, meta
from gpufleet.spec import Model

__all__ = ["scaled_object"]


def scaled_object(model: Model, settings: RenderSettings) -> dict[str, Any]:
    """KEDA on the gateway's metrics: requests in flight and queued, per replica."""
    spec = model.spec
    name = model.name
    query = (
        f'sum(gpufleet_requests_in_flight{{model="{name}"}}) + '
        f'sum(gpufleet_queue_depth{{model="{name}"}} or vector(0))'
    )
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": meta(f"engine-{name}", settings.namespace, {LABEL_MODEL: name}),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": f"engine-{name}",
            },
            "minReplicaCount": spec.replicas.min,
            "maxReplicaCount": spec.replicas.max,
            "cooldownPeriod": int(spec.autoscaling.scale_to_zero_after),
            "pollingInterval": 15,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {
                        "scaleDown": {
                            "stabilizationWindowSeconds": int(spec.autoscaling.scale_down_delay)
                        }
                    }
                }
            },
            "triggers": [
                {
                    "type": "prometheus",
                    "metadata": {
                        "serverAddress": settings.keda_prometheus,
                        "query": query,
                        "threshold": f"{spec.autoscaling.target_in_flight:g}",
                    },
                }
            ],
        },
    }
