"""Resources per role, placed with one Ray placement group.

Every actor of the job gets a bundle: one per learner (`trainer.learner_cpus/learner_gpus`), one per rollout
worker (`rollout.cpus_per_worker/gpus_per_worker`), one per reward model (`reward.models[].num_cpus/num_gpus`).
Reserving them together means the job starts only when all of it fits (no learner waiting forever for a GPU a
rollout worker took), and a restarted actor goes back into its own bundle. Before reserving, each bundle is
checked against the nodes and the totals against the cluster, so a job that can never be placed fails at once
with the settings to change, instead of Ray waiting forever.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rl.config import JobConfig


class PlacementError(RuntimeError):
    """The cluster cannot hold the job's actors; the message names the settings."""


@dataclass
class Bundle:
    role: str  # "learner", "rollout", "reward_model"
    index: int
    setting: str  # the config keys that size it, for error messages
    resources: dict[str, float]


@dataclass
class Placement:
    """The job's placement group and which bundle each actor uses."""

    group: PlacementGroup | None
    bundles: list[Bundle] = field(default_factory=list)

    def options(self, role: str, index: int) -> dict[str, Any]:
        """`actor.options(**...)` for actor `index` of `role`: its resources, scheduled in its bundle."""
        for position, b in enumerate(self.bundles):
            if b.role == role and b.index == index:
                opts: dict[str, Any] = {
                    "num_cpus": b.resources.get("CPU", 0.0),
                    "num_gpus": b.resources.get("GPU", 0.0),
                }
                if self.group is not None:
                    opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                        self.group, placement_group_bundle_index=position
                    )
                return opts
        raise KeyError(f"no bundle for {role} {index}")

    def remove(self) -> None:
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None


def job_bundles(cfg: JobConfig) -> list[Bundle]:
    def res(cpus: float, gpus: float) -> dict[str, float]:
        return {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}

    t, r = cfg.trainer, cfg.rollout
    bundles = [
        Bundle("learner", i, "trainer.learner_cpus/learner_gpus", res(t.learner_cpus, t.learner_gpus))
        for i in range(t.num_learners)
    ]
    bundles += [
        Bundle("rollout", i, "rollout.cpus_per_worker/gpus_per_worker", res(r.cpus_per_worker, r.gpus_per_worker))
        for i in range(r.num_workers)
    ]
    bundles += [
        Bundle("reward_model", i, f"reward.models[{m.name}].num_cpus/num_gpus", res(m.num_cpus, m.num_gpus))
        for i, m in enumerate(cfg.reward.models)
    ]
    return bundles


def check_fits(bundles: list[Bundle], nodes: list[dict[str, float]], cluster: dict[str, float]) -> None:
    """Raise PlacementError if some bundle fits on no node, or the bundles together exceed the cluster."""
    for b in bundles:
        if not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in b.resources.items()) for node in nodes):
            biggest = max(nodes, key=lambda n: n.get("CPU", 0.0), default={})
            raise PlacementError(
                f"a {b.role} actor needs {_fmt(b.resources)} ({b.setting}) but no node of the Ray cluster has that "
                f"much "
                f"(largest node: {_fmt({k: biggest.get(k, 0.0) for k in b.resources})}): lower {b.setting}, or add a "
                f"bigger node"
            )
    for resource in sorted({k for b in bundles for k in b.resources}):
        parts: dict[str, float] = {}
        for b in bundles:
            if b.resources.get(resource):
                parts[b.setting] = parts.get(b.setting, 0.0) + b.resources[resource]
        need, have = sum(parts.values()), cluster.get(resource, 0.0)
        if need > have + 1e-9:
            detail = ", ".join(f"{k} {v:g} in all" for k, v in parts.items())
            raise PlacementError(
                f"the job needs {need:g} {resource}s ({detail}) but the Ray cluster has {have:g}: lower those, or "
                f"give the "
                f"local instance more with cluster.num_cpus (logical CPUs may exceed the cores)"
            )


def place(cfg: JobConfig) -> Placement:
    """Reserve every actor's bundle (waiting at most `cluster.placement_timeout_s`)."""
    bundles = job_bundles(cfg)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    check_fits(bundles, nodes, ray.cluster_resources())
    group = placement_group([b.resources for b in bundles], strategy=cfg.cluster.placement_strategy, name="")
    ready, _ = ray.wait([group.ready()], timeout=cfg.cluster.placement_timeout_s)
    if not ready:
        remove_placement_group(group)
        raise PlacementError(
            f"could not place the job's {len(bundles)} actors "
            f"({', '.join(f'{b.role} {_fmt(b.resources)}' for b in bundles)}) with strategy "
            f"{cfg.cluster.placement_strategy} within {cfg.cluster.placement_timeout_s:g} s; available now: "
            f"{_fmt(ray.available_resources())}. "
            f"Other jobs may hold the resources, or the strategy cannot be met (STRICT_* on too few nodes)."
        )
    return Placement(group, bundles)


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU")) or "nothing"
