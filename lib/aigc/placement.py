"""What aigc asks of Ray, and where it fits: resource bundles, node types, bin-packing, cluster capacity.

The one rule for a Train worker's bundle (`worker_bundle`) and a search trial's (`trial_bundles`) lives
here; the fine-tuning driver, the search, the cluster check and the report's cost columns all call it.
Packing is Ray's own (the autoscaler's bin-packing and utilisation scorer, through `aigc.raycompat`), so a
plan made here is the one the scheduler and the autoscaler make.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aigc import raycompat
from aigc.config import ConfigError, ScalingSection, read_yaml

Resources = dict[str, float]

TRIAL_DRIVER_CPU = 0.02  # a search trial's own actor only waits on its Train run; its workers hold the real CPUs
CLUSTER_YAML = Path("cluster.yaml")  # relative to the repository root, where `ray up` runs
# The cluster launcher writes the cluster.yaml it was given here on the head node; its autoscaler reads it
# (`--autoscaling-config`), and so does Ray Tune (ray.tune.execution.cluster_info) to tell a launched cluster.
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
UNBOUNDED = 10_000  # the node count planned for a type without a max (n bundles never need more than n nodes)

# ------------------------------------------------------------------------------------------- bundles


def worker_bundle(scaling: ScalingSection) -> Resources:
    """What one Ray Train worker asks of Ray: `scaling.cpus_per_worker` CPUs, and `gpus_per_worker` GPUs
    when `use_gpu`."""
    return {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}


def trial_bundles(scaling: ScalingSection) -> tuple[Resources, list[Resources]]:
    """What one search trial holds while it trains: its Tune actor's bundle, and one per Train worker."""
    return {"CPU": TRIAL_DRIVER_CPU}, [worker_bundle(scaling) for _ in range(scaling.num_workers)]


def trial_resources(scaling: ScalingSection) -> Resources:
    """The sum of a trial's bundles (what its wall time is charged at), e.g. 0.02 + 2 x 0.49 = 1.0 CPU."""
    actor, workers = trial_bundles(scaling)
    out: Resources = {}
    for bundle in (actor, *workers):
        for r, v in bundle.items():
            out[r] = out.get(r, 0.0) + v
    return out


# ---------------------------------------------------------------------------------------- node types


@dataclass(frozen=True)
class NodeType:
    """A kind of node the cluster has or may launch, with its declared resources and count bounds."""

    name: str
    resources: Mapping[str, float]
    min_workers: int = 0
    max_workers: int = 0
    is_head: bool = False


def load_cluster(path: str | Path = CLUSTER_YAML) -> dict[str, Any]:
    """cluster.yaml as a dict (a missing file or bad YAML is a ConfigError naming the file)."""
    return read_yaml(path)


def node_types(cluster: Mapping[str, Any]) -> dict[str, NodeType]:
    """Node types with their declared resources; the head type is marked (its one node always exists)."""
    head = cluster.get("head_node_type")
    out = {}
    for name, nt in (cluster.get("available_node_types") or {}).items():
        out[name] = NodeType(name, dict(nt.get("resources") or {}), int(nt.get("min_workers", 0)),
                             0 if name == head else int(nt.get("max_workers", cluster.get("max_workers", 0))),
                             name == head)
    return out


def autoscaler_node_types(bootstrap: Path = BOOTSTRAP_CONFIG) -> list[NodeType]:
    """The worker types the cluster can grow by: from the autoscaler's config in the GCS (autoscaler v2,
    KubeRay) or else the cluster launcher's bootstrap config on this head, read as cluster.yaml is read.
    Empty on a fixed cluster."""
    try:
        groups = raycompat.autoscaler_node_groups()
    except Exception:  # not connected, or a Ray without the call: treat as no autoscaler
        groups = None
    if groups:
        return [NodeType(name, res, lo, UNBOUNDED if hi < 0 else hi) for name, res, lo, hi in groups if hi != 0 and res]
    path = bootstrap.expanduser()
    if not path.is_file():
        return []
    try:
        launched = load_cluster(path)
        cap = int(launched.get("max_workers", UNBOUNDED))
        types = [replace(t, resources={k: float(v) for k, v in t.resources.items()},
                         max_workers=min(cap, t.max_workers))
                 for t in node_types(launched).values() if not t.is_head]
    except (ConfigError, AttributeError, TypeError, ValueError) as e:
        print(f"[aigc] warning: cannot read the autoscaler config {path} ({e}); planning from live nodes only",
              flush=True)
        return []
    return [t for t in types if t.max_workers > 0 and t.resources]


# ------------------------------------------------------------------------------------------- packing

# Ray's scheduler counts resources in units of 1/10,000 (its FixedPoint); packing in those units makes
# 0.02 + 2 x 0.49 exactly 1.0 CPU, as the raylet sees it, where floats leave 2 - ... = -1e-16.
RESOURCE_UNITS = 10_000


def _to_units(res: Mapping[str, float]) -> dict[str, int]:
    return {k: round(float(v) * RESOURCE_UNITS) for k, v in res.items()}


def _from_units(res: Mapping[str, int]) -> Resources:
    return {k: v / RESOURCE_UNITS for k, v in res.items()}


def bin_pack(nodes: list[Resources], bundles: list[Resources]) -> tuple[list[Resources], list[Resources]]:
    """(bundles that do not fit, what is left on each node) when `bundles` are packed onto `nodes` by the
    Ray autoscaler's own bin-packing, in Ray's resource units."""
    unplaced, left = raycompat.bin_pack_residual([_to_units(n) for n in nodes], [_to_units(b) for b in bundles])
    return [_from_units(b) for b in unplaced], [_from_units(n) for n in left]


@dataclass
class Placement:
    """The worker nodes a demand needs, per type, and the bundles that no type can hold."""

    nodes: dict[str, int] = field(default_factory=dict)  # worker type -> nodes the demand needs
    unplaced: list[Resources] = field(default_factory=list)


def place(bundles: list[Resources], types: Mapping[str, NodeType], max_workers: int | None = None) -> Placement:
    """The worker nodes the autoscaler would launch for `bundles`, by Ray's own bin-packing: what fits on
    the head goes there, then node types are added one at a time by Ray's utilisation scorer (the one the
    cluster launcher's autoscaler uses) until everything is placed or no type may grow."""
    head = next((t for t in types.values() if t.is_head), None)
    residual = [dict(b) for b in bundles]
    if head is not None:
        residual, _ = bin_pack([dict(head.resources)], residual)
    config = {t.name: {"resources": _to_units(t.resources), "min_workers": t.min_workers,
                       "max_workers": t.max_workers} for t in types.values()}
    nodes, unplaced = raycompat.nodes_for(config, {head.name: 1} if head else {}, head.name if head else "",
                                          max_workers if max_workers is not None else 10**6,
                                          [_to_units(b) for b in residual])
    return Placement({k: v for k, v in nodes.items() if v}, [_from_units(b) for b in unplaced])


# ------------------------------------------------------------------------------------------ capacity


def fitting_trials(nodes: list[Resources], scaling: ScalingSection, limit: int = 10_000) -> int:
    """How many trials' bundles the nodes hold at once, added one trial at a time as Tune starts them and
    packed as Ray's autoscaler packs (`bin_pack`; a Train worker's bundle sits on one node).

    e.g. one node {CPU: 2}, 2 workers x 0.49 CPU + 0.02 for the trial actor = 1.0 CPU a trial -> 2 trials.
    """
    actor, workers = trial_bundles(scaling)
    asked = set(actor) | {r for w in workers for r in w}
    free = [{r: v for r, v in n.items() if r in asked} for n in nodes]  # node:<ip>, memory, ... never asked for
    n = 0
    while n < limit:
        unplaced, left = bin_pack(free, [actor, *workers])
        if unplaced:
            break
        free, n = left, n + 1
    return n


def cluster_capacity(live: list[Resources], types: list[NodeType], most: int = UNBOUNDED) -> list[Resources]:
    """The nodes the cluster can have: the live ones plus, per autoscaled type, the workers it may still add
    (a live node whose CPU and GPU counts match a type counts against that type's max_workers), at most
    `most` of each type (n bundles never use more than n nodes of one type)."""
    nodes = [dict(n) for n in live]
    unmatched = list(live)
    for t in types:
        same = [n for n in unmatched
                if all(float(n.get(r, 0.0)) == float(t.resources.get(r, 0.0)) for r in ("CPU", "GPU"))]
        for n in same[: t.max_workers]:
            unmatched.remove(n)
        nodes += [dict(t.resources) for _ in range(min(most, max(0, t.max_workers - len(same))))]
    return nodes


def describe(nodes: list[Resources]) -> str:
    """Nodes' CPU and GPU counts for a message, e.g. `{CPU: 2}; {CPU: 48, GPU: 4}`."""
    return "; ".join("{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(n.items()) if k in ("CPU", "GPU")) + "}"
                     for n in nodes) or "no alive nodes"
