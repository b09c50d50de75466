"""A simulation as one self-contained HTML file: the summary tables and plots drawn from them.

One file, nothing fetched: the plots are PNGs drawn by matplotlib's Agg canvas (no display,
no global pyplot state) and embedded as base64 data URIs, so the report can be mailed or
attached to an issue. matplotlib is an optional dependency (``gpufleet[sim]``); without it
``render_report`` raises ``ReportUnavailable`` saying what to install.

What is drawn comes from ``SimResult`` alone: GPUs in use and replicas over time from its
replica spans (with the scaling events marked), GPU-hours busy, idle and free by type, and
the latency percentiles per model (the result keeps percentiles, not samples over time).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gpufleet.errors import PermanentError
from gpufleet.sim.compare import Variant, attainment, compare_rows, comparison_table
from gpufleet.sim.result import ReplicaSpan, SimResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["ReportUnavailable", "render_report", "require_matplotlib", "write_report"]

INSTALL_HINT = "pip install 'gpufleet[sim]'"


class ReportUnavailable(PermanentError):
    """The HTML report needs matplotlib, which is not installed."""


def require_matplotlib() -> None:
    """Fail before a long simulation, not after it, when the report cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ReportUnavailable(
            "the HTML report draws its plots with matplotlib, which is not installed: "
            + INSTALL_HINT
        ) from exc


def _figure(width: float = 8.0, height: float = 3.2) -> Figure:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _unit(result: SimResult) -> tuple[float, str]:
    """Hours for a long run, minutes for a short one."""
    return (3600.0, "hours") if result.duration_s >= 7200 else (60.0, "minutes")


def _steps(
    spans: Sequence[ReplicaSpan], weight: str, unit: float
) -> tuple[list[float], list[float]]:
    """A step curve of the spans' sum (GPUs or replicas) over time."""
    changes: dict[float, float] = {}
    for s in spans:
        w = float(s.gpus) if weight == "gpus" else 1.0
        changes[s.start] = changes.get(s.start, 0.0) + w
        changes[s.end] = changes.get(s.end, 0.0) - w
    xs, ys, level = [0.0], [0.0], 0.0
    for t in sorted(changes):
        level += changes[t]
        xs.append(t / unit)
        ys.append(level)
    return xs, ys


def _over_time(result: SimResult, by: str) -> str:
    fig = _figure()
    ax = fig.subplots()
    unit, unit_name = _unit(result)
    keys = sorted({s.gpu_type if by == "gpu" else s.model for s in result.replicas})
    for key in keys:
        spans = [s for s in result.replicas if (s.gpu_type if by == "gpu" else s.model) == key]
        xs, ys = _steps(spans, "gpus" if by == "gpu" else "replicas", unit)
        xs.append(result.duration_s / unit)
        ys.append(ys[-1])
        ax.step(xs, ys, where="post", label=key)
    if by == "model":
        for unschedulable, marker, colour in ((False, "^", "tab:green"), (True, "x", "tab:red")):
            events = [e for e in result.events if e.unschedulable == unschedulable]
            if events:
                label = "unschedulable" if unschedulable else "scaling event"
                ax.scatter(
                    [e.t / unit for e in events],
                    [e.after for e in events],
                    marker=marker,
                    color=colour,
                    label=label,
                    zorder=3,
                )
    ax.set_xlabel(unit_name)
    ax.set_ylabel("GPUs in use" if by == "gpu" else "replicas")
    if keys:
        ax.legend(loc="upper right", fontsize="small")
    return _png(fig)


def _gpu_hours(result: SimResult) -> str:
    fig = _figure(6.0, 3.0)
    ax = fig.subplots()
    names = [g.gpu_type for g in result.gpus]
    busy = [g.hours_busy for g in result.gpus]
    idle = [g.hours_idle for g in result.gpus]
    free = [g.hours_free for g in result.gpus]
    ax.bar(names, busy, label="busy", color="tab:green")
    ax.bar(names, idle, bottom=busy, label="placed, idle", color="tab:orange")
    ax.bar(names, free, bottom=[b + i for b, i in zip(busy, idle, strict=True)], label="free")
    ax.set_ylabel("GPU-hours")
    ax.legend(fontsize="small")
    return _png(fig)


def _latency(result: SimResult) -> str:
    fig = _figure(9.0, 3.0)
    axes = fig.subplots(1, 3)
    rows = [*result.models, result.overall] if len(result.models) > 1 else result.models
    for ax, metric in zip(axes, ("ttft", "itl", "e2e"), strict=True):
        for i, q in enumerate(("p50", "p95", "p99")):
            values = [getattr(getattr(m, metric), q) or 0.0 for m in rows]
            ax.bar([j + (i - 1) * 0.27 for j in range(len(rows))], values, width=0.27, label=q)
        ax.set_xticks(range(len(rows)), [m.name for m in rows], fontsize="small")
        ax.set_title(f"{metric.upper()} (s)")
    axes[0].legend(fontsize="small")
    return _png(fig)


def _compare_plot(variants: Sequence[Variant]) -> str:
    fig = _figure(6.0, 3.5)
    ax = fig.subplots()
    for v in variants:
        cost = v.result.overall.cost_per_request or 0.0
        ax.scatter([cost], [attainment(v.result) * 100])
        ax.annotate(v.name, (cost, attainment(v.result) * 100), fontsize="small")
    ax.set_xlabel("cost per successful request ($)")
    ax.set_ylabel("SLO attainment (%)")
    return _png(fig)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _usd(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"${value:,.{digits}f}"


def _summary(result: SimResult) -> str:
    keys = [k for k in ("all", "ttft", "itl", "e2e") if k in result.overall.slo]
    header = ["model", "requests", "served", "refused", *(f"SLO {k}" for k in keys)]
    header += ["TTFT p50/95/99", "ITL p50/95/99", "E2E p50/95/99"]
    header += ["cost", "per request", "per 1M tokens"]
    rows = [
        [
            m.name,
            str(m.requests),
            str(m.served),
            str(m.refused),
            *(f"{m.slo[k]:.2%}" if k in m.slo else "-" for k in keys),
            *(
                " / ".join(_s(getattr(p, q)) for q in ("p50", "p95", "p99"))
                for p in (m.ttft, m.itl, m.e2e)
            ),
            _usd(m.cost),
            _usd(m.cost_per_request, 5),
            _usd(m.cost_per_million_tokens),
        ]
        for m in (*result.models, result.overall)
    ]
    return _table(header, rows)


def _tenants(result: SimResult) -> str:
    header = ["tenant", "class", "weight", "requests", "served", "refused (by reason)"]
    header += ["wait p50/99", "TTFT p50/99", "SLO", "cost"]
    rows = [
        [
            t.name,
            t.priority,
            f"{t.weight:g}",
            str(t.requests),
            str(t.served),
            ", ".join(f"{k} {v}" for k, v in t.refused_by.items()) or "0",
            f"{_s(t.wait.p50)} / {_s(t.wait.p99)}",
            f"{_s(t.ttft.p50)} / {_s(t.ttft.p99)}",
            "-" if t.slo is None else f"{t.slo:.2%}",
            _usd(t.cost),
        ]
        for t in result.tenants
    ]
    return _table(header, rows)


def _section(title: str, result: SimResult) -> str:
    o = result.objectives
    objectives = ", ".join(
        f"{k} ≤ {_s(v)}" for k, v in (("TTFT", o.ttft_s), ("ITL", o.itl_s), ("E2E", o.e2e_s)) if v
    )
    parts = [
        f"<section><h2>{html.escape(title)}</h2>",
        f"<p>{result.duration_s / 3600:.2f} h simulated; objectives: "
        f"{html.escape(objectives or 'none given')}; fleet cost {_usd(result.fleet_cost)}</p>",
        "<h3>Summary</h3>",
        _summary(result),
        "<h3>Tenants</h3>",
        _tenants(result),
        "<h3>GPUs in use over time</h3>",
        _over_time(result, "gpu"),
        "<h3>Replicas over time</h3>",
        _over_time(result, "model"),
        "<h3>GPU-hours by type</h3>",
        _gpu_hours(result),
        "<h3>Latency percentiles</h3>",
        _latency(result),
        "</section>",
    ]
    return "\n".join(parts)


_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1100px}"
    "table{border-collapse:collapse;font-size:0.9em}"
    "td,th{border:1px solid #ccc;padding:0.2em 0.5em;text-align:right}"
    "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
)


def render_report(variants: Sequence[Variant], title: str = "gpufleet sim") -> str:
    """The HTML of one variant's report, or of several with a comparison section first."""
    if not variants:
        raise ValueError("nothing to report")
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
    ]
    if len(variants) > 1:
        header, cells = comparison_table(compare_rows(variants))
        parts += [
            "<section><h2>Comparison</h2>",
            _table(header, cells),
            _compare_plot(variants),
            "</section>",
        ]
    for v in variants:
        parts.append(_section(v.name, v.result))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    path: str | Path, variants: Sequence[Variant], title: str = "gpufleet sim"
) -> None:
    Path(path).write_text(render_report(variants, title), encoding="utf-8")
