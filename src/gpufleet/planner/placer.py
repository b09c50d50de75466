"""Where one replica can go: best fit on shared GPUs, TP groups on one node, TP × PP groups
across nodes for a replica bigger than any node, MIG instances.

Scores rank candidates by the planner's objectives in order: never two replicas of one model on
one GPU when avoidable (no redundancy in that), a GPU already in use before an empty one
(fewest GPUs), then spread a model's replicas across nodes, then prefer nodes that
hold the weights, then the preferred GPU type, then the tightest fit. Whole GPUs are visited
tightest first from the fleet's sorted index, and the scan stops early once nothing later can
score better, so each decision costs a bisection and a short walk, not a pass over the fleet.
"""

from __future__ import annotations

from collections.abc import Mapping

from gpufleet.hardware import mig_layout_problem
from gpufleet.planner.fleet import Fleet, Gpu
from gpufleet.planner.model import Deployment, Placement, ReplicaKey

__all__ = ["Placer", "degrees"]

_SCAN_LIMIT = 512  # whole GPUs looked at per type per decision


def degrees(deployment: Deployment) -> list[int]:
    return sorted(deployment.memory_per_gpu)


class Placer:
    def __init__(self, fleet: Fleet, deployments: Mapping[str, Deployment]) -> None:
        self.fleet = fleet
        self.deployments = deployments
        self.relayouts: list[tuple[str, int, tuple[str, ...], str]] = []

    # -- entry ------------------------------------------------------------------------------

    def place(
        self,
        key: ReplicaKey,
        *,
        allow_empty: bool = True,
        exclude: frozenset[tuple[str, int]] = frozenset(),
    ) -> Placement | None:
        dep = self.deployments[key.deployment]
        for tp in degrees(dep):
            need = dep.memory_per_gpu[tp]
            if tp == 0:
                found = self._cpu(key, dep, need)
            elif dep.sharing == "mig" and tp == 1:
                found = self._mig(key, dep, need, allow_empty=allow_empty)
            elif tp == 1:
                found = self._single(key, dep, need, allow_empty=allow_empty, exclude=exclude)
            else:
                found = self._group(key, dep, tp, need, allow_empty=allow_empty, exclude=exclude)
                if found is None:
                    found = self._across(
                        key, dep, tp, need, allow_empty=allow_empty, exclude=exclude
                    )
            if found is not None:
                return found
        return None

    def fits(self, gpu: Gpu, dep: Deployment, need: int) -> bool:
        if gpu.layout is not None or gpu.exclusive or not self.fleet.allowed(gpu, dep):
            return False
        if dep.sharing == "exclusive":
            return not gpu.in_use and gpu.usable >= need
        return gpu.free >= need and len(gpu.replicas) < gpu.max_replicas

    def shapes(self, dep: Deployment, degree: int) -> list[tuple[str, int, int]]:
        """(GPU type, TP, PP) a replica of ``degree`` GPUs can take across nodes, best first.

        Only for a degree no node of the type can hold: splitting what fits one node over
        several would trade NVLink for the network. TP is a node size of the type that divides
        the degree (the largest first: fewest nodes, fewest pipeline bubbles); preferred types
        first.
        """
        if degree < 2:
            return []
        shapes: list[tuple[str, int, int]] = []
        for gpu_type in self.types_for(dep):
            sizes = set(self.fleet.node_sizes(gpu_type).values())
            if not sizes or degree <= max(sizes):
                continue
            for tp in sorted(sizes, reverse=True):
                if degree % tp == 0:
                    shapes.append((gpu_type, tp, degree // tp))
        return shapes

    def types_for(self, dep: Deployment) -> list[str]:
        """Whole-GPU types ``dep`` may use, most preferred first."""
        present = self.fleet.types()
        if dep.gpu_types:
            return [t for t in dep.gpu_types if t in present]
        return present

    def make(self, key: ReplicaKey, gpus: list[Gpu], need: int, *, exclusive: bool) -> Placement:
        """A placement on ``gpus``: those on the first one's node are the leader's stage, each
        further node's a worker's (in the order given)."""
        first = gpus[0]
        stages: dict[str, list[int]] = {}
        for gpu in gpus:
            stages.setdefault(gpu.node, []).append(gpu.index)
        slice_ = None
        sliced = [g for g in gpus if g.time_slicing > 1]
        if sliced:
            # One slice index, free on every time-sliced GPU of the group.
            taken = {self.fleet.placements[k].time_slice for g in sliced for k in g.replicas}
            slice_ = next(i for i in range(len(taken) + 1) if i not in taken)
        return Placement(
            replica=key,
            node=first.node,
            gpus=tuple(stages.pop(first.node)),
            gpu_type=first.type,
            memory_per_gpu=first.usable if exclusive else need,
            memory_fraction=round((first.usable if exclusive else need) / first.memory, 4),
            time_slice=slice_,
            workers=tuple((node, tuple(indices)) for node, indices in stages.items()),
        )

    # -- kinds of placement -----------------------------------------------------------------

    def _score(self, gpu: Gpu, dep: Deployment) -> tuple[int, int, int, int, int, int, str, int]:
        # Two replicas of one model on one GPU buy no redundancy: avoided before anything else.
        twin = sum(1 for r in gpu.replicas if r.deployment == dep.name)
        spread = self.fleet.on_node(gpu.node, dep.name) if dep.spread == "preferred" else 0
        cached = self._uncached(gpu.node, dep)
        return (
            twin,
            0 if gpu.in_use else 1,
            spread,
            cached,
            self.fleet.type_rank(gpu, dep),
            gpu.free,
            gpu.node,
            gpu.index,
        )

    def _uncached(self, node: str, dep: Deployment) -> int:
        return int(
            dep.name in self.fleet.cached_anywhere and dep.name not in self.fleet.cached[node]
        )

    def _single(
        self,
        key: ReplicaKey,
        dep: Deployment,
        need: int,
        *,
        allow_empty: bool,
        exclude: frozenset[tuple[str, int]],
    ) -> Placement | None:
        best: tuple[tuple[int, int, int, int, int, int, str, int], Gpu] | None = None
        types = [t for t in self.fleet.types() if not dep.gpu_types or t in dep.gpu_types]
        for gpu_type in types:
            scanned = 0
            for gpu in self.fleet.whole_gpus_by_free(gpu_type, need):
                scanned += 1
                if scanned > _SCAN_LIMIT:
                    break
                if (gpu.node, gpu.index) in exclude or not self.fits(gpu, dep, need):
                    continue
                if not gpu.in_use and not allow_empty:
                    continue
                if dep.spread == "required" and self.fleet.on_node(gpu.node, dep.name):
                    continue
                score = self._score(gpu, dep)
                if best is None or score < best[0]:
                    best = (score, gpu)
                if score[:4] == (0, 0, 0, 0) or (score[1] == 1 and best[0][:2] == (0, 0)):
                    break  # nothing later in this type can beat it
        if best is None:
            return None
        return self.make(key, [best[1]], need, exclusive=dep.sharing == "exclusive")

    def _group(
        self,
        key: ReplicaKey,
        dep: Deployment,
        tp: int,
        need: int,
        *,
        allow_empty: bool,
        exclude: frozenset[tuple[str, int]],
    ) -> Placement | None:
        best: tuple[tuple[int, int, int, int, int, str], list[Gpu]] | None = None
        for node in self._group_candidates(dep, allow_empty=allow_empty):
            gpus = self.fleet.by_node[node]
            on_node = self.fleet.on_node(node, dep.name)
            if dep.spread == "required" and on_node:
                continue
            by_type: dict[str, list[Gpu]] = {}
            for gpu in gpus:
                if (gpu.node, gpu.index) in exclude or not self.fits(gpu, dep, need):
                    continue
                if not gpu.in_use and not allow_empty:
                    continue
                by_type.setdefault(gpu.type, []).append(gpu)
            for gpu_type, candidates in by_type.items():
                if len(candidates) < tp:
                    continue
                chosen = sorted(candidates, key=lambda g: (0 if g.in_use else 1, g.free, g.index))[
                    :tp
                ]
                score = (
                    sum(0 if g.in_use else 1 for g in chosen),
                    on_node if dep.spread == "preferred" else 0,
                    self._uncached(node, dep),
                    dep.gpu_types.index(gpu_type) if gpu_type in dep.gpu_types else 0,
                    sum(g.free for g in chosen),
                    node,
                )
                if best is None or score < best[0]:
                    best = (score, chosen)
        if best is None:
            return None
        gpus = sorted(best[1], key=lambda g: g.index)
        return self.make(key, gpus, need, exclusive=dep.sharing == "exclusive")

    def _across(
        self,
        key: ReplicaKey,
        dep: Deployment,
        degree: int,
        need: int,
        *,
        allow_empty: bool,
        exclude: frozenset[tuple[str, int]],
    ) -> Placement | None:
        """Bigger than a node: TP GPUs on each of PP nodes of one type (see ``shapes``). Nodes
        rank as TP groups do; the chosen ones become stages in name order."""
        for gpu_type, tp, pp in self.shapes(dep, degree):
            ranked: list[tuple[tuple[int, int, int, int, str], list[Gpu]]] = []
            for node, gpus in self.fleet.by_node.items():
                on_node = self.fleet.on_node(node, dep.name)
                if dep.spread == "required" and on_node:
                    continue
                candidates = [
                    g
                    for g in gpus
                    if g.type == gpu_type
                    and (g.node, g.index) not in exclude
                    and self.fits(g, dep, need)
                    and (allow_empty or g.in_use)
                ]
                if len(candidates) < tp:
                    continue
                chosen = sorted(candidates, key=lambda g: (0 if g.in_use else 1, g.free, g.index))[
                    :tp
                ]
                score = (
                    sum(0 if g.in_use else 1 for g in chosen),
                    on_node if dep.spread == "preferred" else 0,
                    self._uncached(node, dep),
                    sum(g.free for g in chosen),
                    node,
                )
                ranked.append((score, sorted(chosen, key=lambda g: g.index)))
            if len(ranked) < pp:
                continue
            ranked.sort(key=lambda entry: entry[0])
            stages = sorted((gpus for _, gpus in ranked[:pp]), key=lambda gpus: gpus[0].node)
            return self.make(
                key,
                [g for gpus in stages for g in gpus],
                need,
                exclusive=dep.sharing == "exclusive",
            )
        return None

    def _group_candidates(self, dep: Deployment, *, allow_empty: bool) -> list[str]:
        """Nodes in use, plus the first empty node of each kind: an empty node identical to an
        earlier one cannot score better (names break ties), so the rest need no look."""
        nodes = list(self.fleet.busy_nodes)
        if allow_empty:
            for group in self.fleet.empty_nodes().values():
                firsts: dict[int, str] = {}
                for node in group:
                    firsts.setdefault(self._uncached(node, dep), node)
                    if len(firsts) == 2 or dep.name not in self.fleet.cached_anywhere:
                        break
                nodes.extend(firsts.values())
        return sorted(nodes)

    def _mig(
        self, key: ReplicaKey, dep: Deployment, need: int, *, allow_empty: bool
    ) -> Placement | None:
        best: tuple[tuple[int, str, int, int], Gpu, int] | None = None
        for gpu in self.fleet.gpus:
            if gpu.layout is None or not self.fleet.allowed(gpu, dep):
                continue
            if dep.spread == "required" and self.fleet.on_node(gpu.node, dep.name):
                continue
            for i, (memory, owner) in enumerate(
                zip(gpu.instance_memory, gpu.instance_owner, strict=True)
            ):
                if owner is None and memory >= need:
                    score = (memory, gpu.node, gpu.index, i)
                    if best is None or score < best[0]:
                        best = (score, gpu, i)
        if best is None and allow_empty:
            best = self._relayout(dep, need)
        if best is None:
            return None
        _, gpu, i = best
        assert gpu.layout is not None
        memory = gpu.instance_memory[i]
        return Placement(
            replica=key,
            node=gpu.node,
            gpus=(gpu.index,),
            gpu_type=gpu.type,
            memory_per_gpu=need,
            memory_fraction=round(min(1.0, need / memory), 4),
            mig_profile=gpu.layout[i],
            mig_instance=i,
        )

    def _relayout(
        self, dep: Deployment, need: int
    ) -> tuple[tuple[int, str, int, int], Gpu, int] | None:
        """Carve an empty MIG-capable GPU into instances of the smallest profile that fits."""
        for gpu in self.fleet.gpus:
            if not gpu.mig_capable or gpu.in_use or not self.fleet.allowed(gpu, dep):
                continue
            if dep.spread == "required" and self.fleet.on_node(gpu.node, dep.name):
                continue
            if gpu.layout is not None and any(o is not None for o in gpu.instance_owner):
                continue
            acc = self.fleet.catalog[gpu.type]
            profiles = sorted(
                (p for p in acc.mig_profiles if p.memory_bytes >= need),
                key=lambda p: p.memory_bytes,
            )
            for profile in profiles:
                for count in range(profile.max_count, 0, -1):
                    layout = [profile.name] * count
                    if mig_layout_problem(acc, layout) is None:
                        self.fleet.set_layout(gpu, layout, acc)
                        reason = f"{count}× {profile.name} for {dep.name}, which asks for its own MIG instance"
                        self.relayouts.append((gpu.node, gpu.index, tuple(layout), reason))
                        return ((0, gpu.node, gpu.index, 0), gpu, 0)
        return None

    def _cpu(self, key: ReplicaKey, dep: Deployment, need: int) -> Placement | None:
        best: tuple[tuple[int, int, str], str] | None = None
        for node, free in self.fleet.node_memory_free.items():
            if free is not None and free < need:
                continue
            if dep.spread == "required" and self.fleet.on_node(node, dep.name):
                continue
            score = (
                self.fleet.on_node(node, dep.name) if dep.spread == "preferred" else 0,
                -(free or 0),
                node,
            )
            if best is None or score < best[0]:
                best = (score, node)
        if best is None:
            return None
        return Placement(
            replica=key,
            node=best[1],
            gpus=(),
            gpu_type=None,
            memory_per_gpu=need,
            memory_fraction=0.0,
        )
