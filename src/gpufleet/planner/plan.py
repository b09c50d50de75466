"""``plan()``: where every replica runs, what must be preempted or moved, and why.

A replica bigger than any node runs tensor parallel within nodes and pipeline parallel
across them: TP = GPUs per node, PP = nodes, all of one GPU type (vLLM's multi-node layout —
tensor parallelism needs NVLink, pipeline stages only pass activations over the network).

The order follows the objectives. Running replicas whose placement is still valid stay put
(stability). The rest are placed highest priority first, largest first (best-fit decreasing);
a replica that finds no room may preempt strictly lower-priority ones, which go back in the
queue and are placed elsewhere if there is room, or reported as preempted. Then
defragmentation empties lightly used GPUs into the others while that frees whole GPUs —
migrations of running replicas only when a GPU is freed by them. For small instances an
optimising pass (a MILP, see ``optimise``) competes and the plan with fewer GPUs wins.

Pure: the inventory, deployments and current placements in; a Plan with a reason for every
eviction, migration, MIG re-layout and unplaced replica out. Deterministic: every iteration
is over sorted names.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping

from gpufleet.hardware import CATALOG, Accelerator
from gpufleet.planner.fleet import Fleet, Gpu
from gpufleet.planner.model import (
    Deployment,
    Eviction,
    Migration,
    MigRelayout,
    Placement,
    Plan,
    PlanSettings,
    ReplicaKey,
    Unplaced,
)
from gpufleet.planner.placer import Placer, degrees
from gpufleet.spec import Inventory

__all__ = ["plan"]

GiB = 1 << 30


def plan(
    inventory: Inventory,
    deployments: Iterable[Deployment],
    current: Iterable[Placement] = (),
    settings: PlanSettings | None = None,
    catalog: Mapping[str, Accelerator] = CATALOG,
) -> Plan:
    settings = settings or PlanSettings()
    deps = {d.name: d for d in sorted(deployments, key=lambda d: d.name)}
    result = _Planning(inventory, deps, list(current), settings, catalog)
    heuristic = result.run()
    if _optimisable(
        deps, heuristic, list(current), settings
    ) and heuristic.gpus_used > _lower_bound(deps, settings, inventory, catalog):
        from gpufleet.planner.optimise import optimise

        better = optimise(inventory, deps, settings, catalog, heuristic)
        if better is not None and better.gpus_used < heuristic.gpus_used:
            return better
    return heuristic


def _lower_bound(
    deps: Mapping[str, Deployment],
    settings: PlanSettings,
    inventory: Inventory,
    catalog: Mapping[str, Accelerator],
) -> int:
    """GPUs any plan of these TP-1 replicas needs: memory volume, engine count, big replicas."""
    fleet = Fleet(inventory, settings, catalog)
    whole = [g for g in fleet.gpus if g.layout is None]
    if not whole:
        return 0
    usable = max(g.usable for g in whole)
    slots = max(g.max_replicas for g in whole)
    needs = [d.memory_per_gpu[1] for d in deps.values() for _ in range(d.replicas)]
    return max(
        math.ceil(sum(needs) / usable),
        math.ceil(len(needs) / slots),
        sum(1 for n in needs if n * 2 > usable),
        max((d.replicas for d in deps.values()), default=0),  # twins never share a GPU
    )


def _optimisable(
    deps: Mapping[str, Deployment], plan: Plan, current: list[Placement], settings: PlanSettings
) -> bool:
    replicas = sum(d.replicas for d in deps.values())
    return (
        not current
        and not plan.unplaced
        and 0 < replicas <= settings.optimise_max_replicas
        and all(
            d.sharing == "memory" and list(d.memory_per_gpu) == [1] and d.spread != "required"
            for d in deps.values()
        )
        and not plan.relayouts
    )


class _Planning:
    def __init__(
        self,
        inventory: Inventory,
        deps: Mapping[str, Deployment],
        current: list[Placement],
        settings: PlanSettings,
        catalog: Mapping[str, Accelerator],
    ) -> None:
        self.fleet = Fleet(inventory, settings, catalog)
        self.deps = deps
        self.settings = settings
        self.placer = Placer(self.fleet, deps)
        self.current = {p.replica: p for p in current}
        self.evictions: list[Eviction] = []
        self.migrations: list[Migration] = []
        self.unplaced: list[Unplaced] = []
        self.preempted_by: dict[ReplicaKey, ReplicaKey] = {}

    def priority(self, key: ReplicaKey) -> int:
        return self.deps[key.deployment].priority

    def run(self) -> Plan:
        wanted = [ReplicaKey(d.name, i) for d in self.deps.values() for i in range(d.replicas)]
        wanted_set = set(wanted)
        for p in sorted(self.current.values(), key=lambda p: (-self.priority_of(p), p.replica)):
            if p.replica in wanted_set and self._still_valid(p):
                self.fleet.add(p, exclusive=self.deps[p.replica.deployment].sharing == "exclusive")
        queue = [self._entry(k) for k in wanted if k not in self.fleet.placements]
        heapq.heapify(queue)
        while queue:
            key = heapq.heappop(queue)[-1]
            placement = self.placer.place(key)
            if placement is None:
                for victim in self._preempt(key):
                    self._evict(victim, key)
                    heapq.heappush(queue, self._entry(victim))
                placement = self.placer.place(key)
            if placement is None:
                self.unplaced.append(Unplaced(key, self._reason(key)))
                continue
            self._add(placement)
        while self.settings.defragment and self._defragment() and self._retry_unplaced():
            pass
        return self._result()

    def _retry_unplaced(self) -> bool:
        """Place what found no room before defragmentation freed GPUs; True if any was placed."""
        placed = False
        still: list[Unplaced] = []
        for u in sorted(self.unplaced, key=lambda u: self._entry(u.replica)):
            placement = self.placer.place(u.replica)
            if placement is None:
                still.append(u)
            else:
                self._add(placement)
                placed = True
        self.unplaced = still
        return placed

    def priority_of(self, p: Placement) -> int:
        dep = self.deps.get(p.replica.deployment)
        return dep.priority if dep else -1

    def _entry(self, key: ReplicaKey) -> tuple[int, int, str, int, ReplicaKey]:
        dep = self.deps[key.deployment]
        size = min(tp * m if tp else m for tp, m in dep.memory_per_gpu.items())
        return (-dep.priority, -size, key.deployment, key.index, key)

    def _add(self, placement: Placement) -> None:
        self.fleet.add(
            placement, exclusive=self.deps[placement.replica.deployment].sharing == "exclusive"
        )

    # -- validity of what runs ----------------------------------------------------------------

    def _still_valid(self, p: Placement) -> bool:
        dep = self.deps[p.replica.deployment]
        degree = p.gpu_count
        if degree not in dep.memory_per_gpu:
            return False
        need = dep.memory_per_gpu[degree]
        if not p.gpus:
            free = self.fleet.node_memory_free.get(p.node, 0)
            return (
                p.node in self.fleet.by_node
                and p.memory_per_gpu == need
                and (free is None or free >= need)
            )
        if p.workers and (
            p.mig_instance is not None
            or len(set(p.nodes)) != p.pp
            or any(len(gpus) != p.tp for _, gpus in p.workers)
        ):
            return False
        gpus = [self.fleet.gpu(node, i) for node, indices in p.stages for i in indices]
        if any(g is None for g in gpus):
            return False
        real = [g for g in gpus if g is not None]
        if len({g.type for g in real}) != 1:
            return False
        if p.mig_instance is not None:
            g = real[0]
            return (
                dep.sharing == "mig"
                and g.layout is not None
                and p.mig_instance < len(g.layout)
                and g.layout[p.mig_instance] == p.mig_profile
                and g.instance_owner[p.mig_instance] is None
                and g.instance_memory[p.mig_instance] >= need
                and self.fleet.allowed(g, dep)
            )
        expected = real[0].usable if dep.sharing == "exclusive" else need
        return p.memory_per_gpu == expected and all(
            self.placer.fits(g, dep, expected) for g in real
        )

    # -- preemption ---------------------------------------------------------------------------

    def _preempt(self, key: ReplicaKey) -> list[ReplicaKey]:
        """The cheapest set of strictly lower-priority replicas whose removal makes room."""
        dep = self.deps[key.deployment]
        options: list[tuple[int, int, int, str, list[ReplicaKey]]] = []
        for tp in degrees(dep):
            need = dep.memory_per_gpu[tp]
            if dep.sharing == "mig" and tp == 1:
                options += self._mig_victims(dep, need)
                continue
            if tp == 0:
                continue
            for node, gpus in self.fleet.by_node.items():
                if dep.spread == "required" and self.fleet.on_node(node, dep.name):
                    continue
                per_gpu = [(g, self._victims_on(g, dep, need)) for g in gpus]
                usable = [(g, v) for g, v in per_gpu if v is not None]
                by_type: dict[str, list[tuple[Gpu, list[ReplicaKey]]]] = {}
                for g, v in usable:
                    by_type.setdefault(g.type, []).append((g, v))
                for group in by_type.values():
                    if len(group) < tp:
                        continue
                    group.sort(key=lambda gv: (self._cost(gv[1]), gv[0].index))
                    victims = sorted({v for _, vs in group[:tp] for v in vs})
                    if victims:
                        worst = max(self.priority(v) for v in victims)
                        freed = sum(self.fleet.placements[v].memory_per_gpu for v in victims)
                        options.append((worst, len(victims), freed, node, victims))
            if not options:
                options += self._across_victims(dep, tp, need)
            if options:
                break  # the smallest TP degree that can make room wins
        return min(options)[-1] if options else []

    def _across_victims(
        self, dep: Deployment, degree: int, need: int
    ) -> list[tuple[int, int, int, str, list[ReplicaKey]]]:
        """For a replica bigger than a node: the cheapest PP nodes to clear TP GPUs on."""
        options: list[tuple[int, int, int, str, list[ReplicaKey]]] = []
        for gpu_type, tp, pp in self.placer.shapes(dep, degree):
            per_node: list[tuple[tuple[int, int], str, list[ReplicaKey]]] = []
            for node, gpus in self.fleet.by_node.items():
                if dep.spread == "required" and self.fleet.on_node(node, dep.name):
                    continue
                usable = [
                    (g, v)
                    for g in gpus
                    if g.type == gpu_type
                    for v in (self._victims_on(g, dep, need),)
                    if v is not None
                ]
                if len(usable) < tp:
                    continue
                usable.sort(key=lambda gv: (self._cost(gv[1]), gv[0].index))
                victims = sorted({v for _, vs in usable[:tp] for v in vs})
                per_node.append((self._cost(victims), node, victims))
            if len(per_node) < pp:
                continue
            per_node.sort(key=lambda entry: (entry[0], entry[1]))
            chosen = per_node[:pp]
            victims = sorted({v for _, _, vs in chosen for v in vs})
            if victims:
                worst = max(self.priority(v) for v in victims)
                freed = sum(self.fleet.placements[v].memory_per_gpu for v in victims)
                nodes = ",".join(sorted(node for _, node, _ in chosen))
                options.append((worst, len(victims), freed, nodes, victims))
        return options

    def _mig_victims(
        self, dep: Deployment, need: int
    ) -> list[tuple[int, int, int, str, list[ReplicaKey]]]:
        """A lower-priority MIG instance big enough, or a MIG-capable GPU held only by lower priority."""
        options: list[tuple[int, int, int, str, list[ReplicaKey]]] = []
        for gpu in self.fleet.gpus:
            if not self.fleet.allowed(gpu, dep) or not gpu.mig_capable:
                continue
            if dep.spread == "required" and self.fleet.on_node(gpu.node, dep.name):
                continue
            for memory, owner in zip(gpu.instance_memory, gpu.instance_owner, strict=True):
                if owner is not None and memory >= need and self.priority(owner) < dep.priority:
                    options.append((self.priority(owner), 1, memory, gpu.name, [owner]))
            holders = sorted({*gpu.replicas, *(o for o in gpu.instance_owner if o is not None)})
            if holders and all(self.priority(h) < dep.priority for h in holders):
                # Emptied, the GPU can be re-laid out; only if some profile would fit.
                acc = self.fleet.catalog.get(gpu.type)
                if acc is not None and any(p.memory_bytes >= need for p in acc.mig_profiles):
                    worst = max(self.priority(h) for h in holders)
                    options.append((worst, len(holders), gpu.used, gpu.name, holders))
        return options

    def _victims_on(self, gpu: Gpu, dep: Deployment, need: int) -> list[ReplicaKey] | None:
        if gpu.layout is not None or not self.fleet.allowed(gpu, dep):
            return None
        lower = sorted(
            (r for r in gpu.replicas if self.priority(r) < dep.priority),
            key=lambda r: (self.priority(r), -gpu.replicas[r], r),
        )
        if len(lower) < len(gpu.replicas) and (gpu.exclusive or dep.sharing == "exclusive"):
            return None
        free, slots = gpu.free, gpu.max_replicas - len(gpu.replicas)
        chosen: list[ReplicaKey] = []
        for r in lower:
            if free >= need and slots >= 1 and dep.sharing != "exclusive":
                break
            chosen.append(r)
            free += gpu.replicas[r]
            slots += 1
        if dep.sharing == "exclusive":
            return chosen if not (set(gpu.replicas) - set(chosen)) and gpu.usable >= need else None
        return chosen if free >= need and slots >= 1 else None

    def _cost(self, victims: list[ReplicaKey]) -> tuple[int, int]:
        return (max((self.priority(v) for v in victims), default=-1), len(victims))

    def _evict(self, victim: ReplicaKey, by: ReplicaKey) -> None:
        placement = self.fleet.remove(victim)
        self.preempted_by[victim] = by
        if self.current.get(victim) == placement:
            reason = (
                f"preempted by {by} (priority {self.priority(by)} > {self.priority(victim)}); "
                "drained gracefully, then re-placed if there is room"
            )
            self.evictions.append(Eviction(placement, reason))

    # -- defragmentation ------------------------------------------------------------------------

    def _defragment(self) -> bool:
        """Empty GPUs into others until none can be; True if any GPU was freed."""
        fleet = self.fleet
        any_freed = False
        while True:
            freed = False
            candidates = sorted(
                (
                    g
                    for g in fleet.gpus
                    if g.layout is None and g.replicas and g.used * 2 <= g.usable
                ),
                key=lambda g: (len(g.replicas), g.used, g.node, g.index),
            )
            for gpu in candidates:
                if gpu.replicas and self._empty(gpu):
                    freed = any_freed = True
            if not freed:
                return any_freed

    def _empty(self, gpu: Gpu) -> bool:
        moving = sorted(gpu.replicas, key=lambda r: (-gpu.replicas[r], r))
        for r in moving:
            p = self.fleet.placements[r]
            if p.gpu_count != 1 or self.deps[r.deployment].sharing != "memory":
                return False
        before = {r: self.fleet.remove(r) for r in moving}
        after: dict[ReplicaKey, Placement] = {}
        here = frozenset({(gpu.node, gpu.index)})
        for r in moving:
            placement = self.placer.place(r, allow_empty=False, exclude=here)
            if (
                placement is None
                or placement.gpu_count != 1
                or self._worse_spread(r, before[r], placement)
            ):
                for done in after:
                    self.fleet.remove(done)
                for old in before.values():
                    self._add(old)
                return False
            self._add(placement)
            after[r] = placement
        for r, new in after.items():
            old = before[r]
            if self.current.get(r) == old:
                self.migrations.append(
                    Migration(old, new, f"frees {gpu.name} (consolidating onto GPUs in use)")
                )
        return True

    def _worse_spread(self, key: ReplicaKey, old: Placement, new: Placement) -> bool:
        """Consolidation must not put a model's replicas together that were apart."""
        target = self.fleet.gpu(new.node, new.gpus[0])
        assert target is not None
        if any(r.deployment == key.deployment for r in target.replicas):
            return True
        spread = self.deps[key.deployment].spread
        return (
            spread != "none"
            and new.node != old.node
            and self.fleet.on_node(new.node, key.deployment) > 0
        )

    # -- reporting --------------------------------------------------------------------------

    def _reason(self, key: ReplicaKey) -> str:
        dep = self.deps[key.deployment]
        parts = []
        allowed = [g for g in self.fleet.gpus if self.fleet.allowed(g, dep)]
        types = f" (allowed types: {', '.join(dep.gpu_types)})" if dep.gpu_types else ""
        for tp in degrees(dep):
            need = dep.memory_per_gpu[tp]
            if tp == 0:
                parts.append(f"needs {need / GiB:.1f} GiB of node memory; no node has it free")
                continue
            if dep.sharing == "mig" and tp == 1:
                parts.append(
                    f"needs a MIG instance with {need / GiB:.1f} GiB; none free and no empty MIG-capable GPU{types}"
                )
                continue
            whole = [g for g in allowed if g.layout is None and not g.exclusive]
            if not whole:
                parts.append(f"TP {tp}: no whole GPU available{types}")
                continue
            # Free memory on a GPU that may take no further engine is no room: leave it out.
            open_ = [g for g in whole if len(g.replicas) < g.max_replicas]
            if tp > 1:
                parts += self._group_reasons(dep, tp, need, open_)
            elif open_:
                best = max(open_, key=lambda g: (g.free, g.node, -g.index))
                parts.append(
                    f"needs {need / GiB:.1f} GiB per GPU at TP 1; largest free is {best.free / GiB:.1f} GiB on {best.name}{types}"
                )
            else:
                limit = max(g.max_replicas for g in whole)
                rule = "one engine per GPU" if limit == 1 else f"at most {limit} engines per GPU"
                parts.append(
                    f"needs {need / GiB:.1f} GiB per GPU at TP 1; none of the {len(whole)} allowed GPUs can take another engine ({rule}){types}"
                )
        if key in self.preempted_by:
            by = self.preempted_by[key]
            parts.insert(0, f"preempted by {by} (priority {self.priority(by)} > {dep.priority})")
        return "; ".join(parts) or "no GPU or node in the inventory"

    def _group_reasons(self, dep: Deployment, tp: int, need: int, open_: list[Gpu]) -> list[str]:
        """Why no group of ``tp`` GPUs was found (``open_``: the allowed whole GPUs that may take
        another engine): on one node, or across nodes when no node is that big."""
        room = set(open_)
        sizes = {t: self.fleet.node_sizes(t) for t in self.placer.types_for(dep)}
        largest = max((n for by_node in sizes.values() for n in by_node.values()), default=0)
        reasons: list[str] = []
        if largest >= tp:
            counts = {
                node: sum(1 for g in gs if g in room and g.free >= need)
                for node, gs in self.fleet.by_node.items()
            }
            node, have = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
            reasons.append(
                f"TP {tp} needs {tp} GPUs with {need / GiB:.1f} GiB free each on one node; the "
                f"best, {node}, has {have} GPU{'' if have == 1 else 's'} with that much free"
            )
        shapes = self.placer.shapes(dep, tp)
        for gpu_type, per_node, pp in shapes:
            have = sum(
                1
                for node, gs in self.fleet.by_node.items()
                if not (dep.spread == "required" and self.fleet.on_node(node, dep.name))
                and sum(1 for g in gs if g.type == gpu_type and self.placer.fits(g, dep, need))
                >= per_node
            )
            reasons.append(
                f"TP {per_node} × PP {pp} needs {pp} nodes with {per_node} free {gpu_type} each "
                f"({need / GiB:.1f} GiB per GPU); have {have}"
            )
        if largest < tp and not shapes:
            reasons.append(
                f"{tp} GPUs: more than any node has (the largest has {largest}), and no node's "
                f"GPU count divides {tp} to run it pipeline parallel across nodes"
            )
        return reasons

    def _result(self) -> Plan:
        given, total = self.fleet.memory_in_use()
        relayouts = tuple(
            MigRelayout(n, g, layout, why) for n, g, layout, why in self.placer.relayouts
        )
        return Plan(
            placements=tuple(sorted(self.fleet.placements.values(), key=lambda p: p.replica)),
            evictions=tuple(self.evictions),
            migrations=tuple(self.migrations),
            relayouts=relayouts,
            unplaced=tuple(sorted(self.unplaced, key=lambda u: u.replica)),
            gpus_used=self.fleet.gpus_used(),
            gpus_total=len(self.fleet.gpus),
            memory_utilisation=round(given / total, 4) if total else 0.0,
        )
