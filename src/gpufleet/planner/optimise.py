"""An exact pass for small instances: bin packing as a MILP, solved by SciPy's HiGHS.

Variables ``x[r, g]`` (replica r on GPU g) and ``y[g]`` (GPU g in use); each replica on exactly
one GPU; per GPU, memory and engine count within capacity and only if in use, and at most one
replica of each model; minimise GPUs in use. It covers what the heuristic's best-fit can get wrong on tight mixes — TP 1, memory
sharing, no MIG — and runs under a time limit; ``plan`` keeps whichever plan uses fewer GPUs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from gpufleet.hardware import Accelerator
from gpufleet.planner.fleet import Fleet
from gpufleet.planner.model import Deployment, Plan, PlanSettings, ReplicaKey
from gpufleet.planner.placer import Placer
from gpufleet.spec import Inventory

__all__ = ["optimise"]

_MAX_VARIABLES = 20_000


def optimise(
    inventory: Inventory,
    deps: Mapping[str, Deployment],
    settings: PlanSettings,
    catalog: Mapping[str, Accelerator],
    incumbent: Plan,
) -> Plan | None:
    fleet = Fleet(inventory, settings, catalog)
    placer = Placer(fleet, deps)
    replicas = [ReplicaKey(d.name, i) for d in deps.values() for i in range(d.replicas)]
    gpus = [g for g in fleet.gpus if g.layout is None]
    if not replicas or not gpus or len(replicas) * len(gpus) > _MAX_VARIABLES:
        return None
    need = [deps[r.deployment].memory_per_gpu[1] for r in replicas]
    allowed = [
        [fleet.allowed(g, deps[r.deployment]) and g.usable >= need[i] for g in gpus]
        for i, r in enumerate(replicas)
    ]
    n_r, n_g = len(replicas), len(gpus)
    n_x = n_r * n_g

    def x(i: int, j: int) -> int:
        return i * n_g + j

    groups = sorted({r.deployment for r in replicas})
    n_rows = n_r + 2 * n_g + len(groups) * n_g
    rows = lil_matrix((n_rows, n_x + n_g))
    lower = np.zeros(n_rows)
    upper = np.zeros(n_rows)
    # No two replicas of one model on one GPU (the heuristic's first rule, hard here).
    for d, name in enumerate(groups):
        for j in range(n_g):
            row = n_r + 2 * n_g + d * n_g + j
            for i, r in enumerate(replicas):
                if r.deployment == name:
                    rows[row, x(i, j)] = 1
            lower[row], upper[row] = -np.inf, 1
    for i in range(n_r):
        for j in range(n_g):
            rows[i, x(i, j)] = 1
        lower[i] = upper[i] = 1
    for j, g in enumerate(gpus):
        for i in range(n_r):
            rows[n_r + j, x(i, j)] = need[i]
            rows[n_r + n_g + j, x(i, j)] = 1
        rows[n_r + j, n_x + j] = -g.usable
        rows[n_r + n_g + j, n_x + j] = -g.max_replicas
        lower[n_r + j] = lower[n_r + n_g + j] = -np.inf
    # An integral objective lets HiGHS round its LP bound up and prove optimality early.
    cost = np.concatenate([np.zeros(n_x), np.ones(n_g)])
    upper_bounds = np.ones(n_x + n_g)
    for i in range(n_r):
        for j in range(n_g):
            if not allowed[i][j]:
                upper_bounds[x(i, j)] = 0
    result = milp(
        cost,
        constraints=LinearConstraint(rows.tocsr(), lower, upper),
        integrality=np.ones(n_x + n_g),
        bounds=Bounds(np.zeros(n_x + n_g), upper_bounds),
        options={"time_limit": settings.optimise_time_limit_s, "disp": False},
    )
    if result.x is None:
        return None
    solution = np.round(result.x).astype(int)
    for i, r in enumerate(replicas):
        j = next(j for j in range(n_g) if solution[x(i, j)])
        fleet.add(placer.make(r, [gpus[j]], need[i], exclusive=False))
    given, total = fleet.memory_in_use()
    return Plan(
        placements=tuple(sorted(fleet.placements.values(), key=lambda p: p.replica)),
        gpus_used=fleet.gpus_used(),
        gpus_total=len(fleet.gpus),
        memory_utilisation=round(given / total, 4) if total else 0.0,
        solver="milp (HiGHS)" if result.status == 0 else "milp (HiGHS, time limit)",
    )
