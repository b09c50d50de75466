"""``gpufleet render``: the Kubernetes objects for a models file, for GitOps (Argo CD, Flux).

A disaggregated model comes out as its two pools (``runtime.kubernetes.manifests``): the decode
pool's workloads and the prefill pool's, ``disaggregation.prefill.replicas`` of them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from gpufleet.cli.output import fail, spec_problems
from gpufleet.errors import GpufleetError, SpecError

__all__ = ["render_command"]


def render_command(
    file: Annotated[list[Path], typer.Option("--file", "-f", help="models YAML; repeatable")],
    namespace: Annotated[str, typer.Option(help="namespace of the engines")] = "gpufleet",
    target: Annotated[str, typer.Option(help="what to render for (kubernetes)")] = "kubernetes",
    inventory: Annotated[
        Path | None,
        typer.Option("--inventory", "-i", help="kind: Inventory YAML: pin replicas to nodes"),
    ] = None,
    crds: Annotated[bool, typer.Option("--crds", help="also print the CRDs")] = False,
    model_cache: Annotated[
        str, typer.Option(help="PersistentVolumeClaim holding the weights")
    ] = "gpufleet-model-cache",
    model_cache_pvc: Annotated[
        bool,
        typer.Option(
            help="emit that claim; --no-model-cache-pvc when it exists (the Helm chart's)"
        ),
    ] = True,
    model_cache_size: Annotated[str, typer.Option(help="size of the claim")] = "500Gi",
    model_cache_storage_class: Annotated[
        str | None, typer.Option(help="StorageClass of the claim (default: the cluster's)")
    ] = None,
    model_cache_access_mode: Annotated[
        str,
        typer.Option(help="access mode of the claim; ReadWriteMany unless one node runs all"),
    ] = "ReadWriteMany",
    engine_port: Annotated[
        int, typer.Option(help="port engines listen on in their pods", min=1, max=65535)
    ] = 8000,
    keda: Annotated[
        str | None,
        typer.Option(
            help="scale with KEDA instead: the Prometheus URL it reads gpufleet's metrics from"
        ),
    ] = None,
) -> None:
    """Print plain manifests for the models and tenants in FILE (deterministic output)."""
    from gpufleet.cli.sizing import size_pools_here
    from gpufleet.hardware import load_inventory
    from gpufleet.runtime.kubernetes import RenderSettings, render, to_yaml
    from gpufleet.runtime.kubernetes.checks import check
    from gpufleet.runtime.kubernetes.common import ModelCache
    from gpufleet.spec import load_file_resources
    from gpufleet.spec.crd import crds as crd_documents

    if target != "kubernetes":
        raise fail(f"unknown --target {target!r}; the one there is: kubernetes")
    try:
        models, tenants = [], []
        for f in file:
            m, t = load_file_resources(f)
            models += m
            tenants += t
        fleet = load_inventory(inventory) if inventory is not None else None
        cache = (
            ModelCache(
                size=model_cache_size,
                storage_class=model_cache_storage_class,
                access_mode=model_cache_access_mode,
            )
            if model_cache_pvc
            else None
        )
        settings = RenderSettings(
            namespace=namespace,
            model_cache_claim=model_cache,
            model_cache=cache,
            engine_port=engine_port,
            keda_prometheus=keda,
        )
        deployments = None
        if fleet is not None:
            # Sized as ``plan`` sizes them (a disaggregated model: both pools); a model
            # Kubernetes cannot run is left to ``render``, which says why.
            deployments = {
                d.name: d
                for m in models
                if m.spec.engine != "external" and not check(m, settings)
                for d in size_pools_here(m)
            }
        objects = render(models, tenants, settings, inventory=fleet, deployments=deployments)
    except SpecError as exc:
        spec_problems(exc.problems)
        raise typer.Exit(1) from exc
    except GpufleetError as exc:
        raise fail(str(exc)) from exc
    sys.stdout.write(to_yaml([*(crd_documents() if crds else []), *objects]))
