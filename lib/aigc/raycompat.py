"""Every place aigc reaches into Ray's or Tune's private parts, and nowhere else.

Each piece below is one top-level function (or the small class that runs one) that names the Ray version it
was written against and the public API that would replace it. pyproject pins `ray>=2.60,<2.61`, and
`tests/unit/test_raycompat.py` fails when the installed Ray is not `CHECKED_RAY_VERSION`: upgrading Ray means
re-reading each piece against the new Ray's source, then moving the constant.

Each piece imports its private module itself, so that a piece whose module moved in another Ray breaks only
its own callers (and the ones that can do without it, the placement-group reaper and the autoscaler read,
carry on), and so that importing this module for bin-packing does not import Tune.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHECKED_RAY_VERSION = "2.60.0"


@contextmanager
def _quiet(logger: str, level: int) -> Iterator[None]:
    """Raise a Ray logger's level for the duration (its messages are what the caller reports itself)."""
    log = logging.getLogger(logger)
    before = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(before)


# ---------------------------------------------------------------------------- the autoscaler's own maths


def bin_pack_residual(nodes: list[dict[str, int]], bundles: list[dict[str, int]]
                      ) -> tuple[list[dict[str, int]], list[dict[str, int]]]:
    """(bundles that do not fit, what is left on each node): the autoscaler's first-fit bin-packing.

    Ray 2.60: `ray.autoscaler._private.resource_demand_scheduler.get_bin_pack_residual`, in Ray's resource
    units. Public replacement: none (the autoscaler SDK's `request_resources` asks a live cluster; nothing
    packs offline)."""
    from ray.autoscaler._private.resource_demand_scheduler import get_bin_pack_residual

    return get_bin_pack_residual(nodes, bundles)


def nodes_for(types: Mapping[str, dict[str, Any]], existing: dict[str, int], head_type: str, max_to_add: int,
              bundles: list[dict[str, int]]) -> tuple[dict[str, int], list[dict[str, int]]]:
    """(nodes to launch per type, bundles no type can hold): what the autoscaler would add for `bundles`, by
    its default utilisation scorer. `types` maps a type name to {"resources", "min_workers", "max_workers"}.

    Ray 2.60: `get_nodes_for` + `_default_utilization_scorer` from
    `ray.autoscaler._private.resource_demand_scheduler`, `NodeAvailabilitySummary` from
    `ray.autoscaler._private.node_provider_availability_tracker`. Public replacement: none (see
    `bin_pack_residual`)."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    scorer = functools.partial(_default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({}))
    # "could not find a node type": the caller reports what is left unplaced itself
    with _quiet("ray.autoscaler._private.resource_demand_scheduler", logging.ERROR):
        return get_nodes_for(dict(types), existing, head_type, max_to_add, bundles, scorer)


def validate_cluster_config(cluster: Mapping[str, Any]) -> None:
    """What `ray up` checks offline before it calls the cloud; raises ValueError / RuntimeError /
    AssertionError on a problem. `cluster` is not modified.

    Ray 2.60: `prepare_config` + `validate_config` from `ray.autoscaler._private.util`. Public replacement:
    none (`ray up` runs them, with side effects; the JSON schema, `ray/autoscaler/ray-schema.json`, is the
    public half)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    # "setting max workers for head node type to 0" is not news
    with _quiet("ray.autoscaler._private.util", logging.WARNING):
        validate_config(prepare_config(copy.deepcopy(dict(cluster))))


# -------------------------------------------------------------------------------- the cluster's state


def autoscaler_node_groups() -> list[tuple[str, dict[str, float], int, int]] | None:
    """(name, resources, min_count, max_count) of each node group the connected cluster's autoscaler may
    launch (max_count -1 = unbounded); None when there is no autoscaler config in the GCS.

    Ray 2.60: `ray._private.state.state.get_cluster_config()` (autoscaler v2 / KubeRay write it). Public
    replacement: none; `ray.autoscaler.v2.sdk.get_cluster_status` reports the nodes, not the groups'
    bounds."""
    import ray._private.state

    cc = ray._private.state.state.get_cluster_config()
    if cc is None or not cc.node_group_configs:
        return None
    return [(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.min_count), int(g.max_count))
            for g in cc.node_group_configs]


def reap_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creating actor has died; returns how many.

    When Tune stops a trial (ASHA) or a search is interrupted, the trial's actor dies and takes its Train
    controller with it, but the controller's worker placement group lives as long as the *job* (Ray's rule
    for groups made by non-detached actors). Ray Train's own PlacementGroupCleaner frees it through the
    state API, which needs the dashboard (absent on `ray.init(include_dashboard=False)`) and a single Ray
    instance per host; without it the reservation (here 2 x 0.49 CPU) stays and the next trial waits for
    ever. A group whose creator is dead can never be used again: removing it is always safe.

    Ray 2.60: `ray._private.state.state._connect_and_get_accessor().get_placement_group_table()`, decoded
    with `ray.core.generated.gcs_pb2`: the public `ray.util.placement_group_table()` drops the creator
    fields used here. Public replacement: `ray.util.state.list_placement_groups` once it reports the
    creator without the dashboard, or Ray Train removing its group when its controller dies.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        made_by_actor = pg.creator_actor_id and not ray.ActorID(pg.creator_actor_id).is_nil()  # not a driver's
        if (made_by_actor and pg.creator_actor_dead and pg.state != gcs_pb2.PlacementGroupTableData.REMOVED
                and not pg.is_detached and not pg.creator_job_dead and pg.creator_job_id.hex() == job):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
    return removed


class PlacementGroupReaper:
    """Runs `reap_orphaned_placement_groups` every few seconds while a search runs (see its docstring); a
    context manager. It stops itself (and says so) if the private call fails: never takes the search down."""

    def __init__(self, every_s: float = 3.0):
        self._stop, self._every = threading.Event(), every_s
        self._thread = threading.Thread(target=self._loop, name="aigc-pg-reaper", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            self.sweep()

    def sweep(self) -> None:
        try:
            n = reap_orphaned_placement_groups()
        except Exception as e:  # a private Ray API: never let it take the search down
            print(f"[aigc] could not check for orphaned placement groups: {type(e).__name__}: {e}", flush=True)
            self._stop.set()
            return
        if n:
            print(f"[aigc] freed {n} placement group(s) left by stopped trials", flush=True)

    def __enter__(self) -> PlacementGroupReaper:
        self.sweep()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sweep()


def serve_running() -> bool:
    """Whether Serve's controller runs on the connected Ray (its proxies hold their port already).

    Ray 2.60: `ray.serve.context._get_global_client(raise_if_no_controller_running=False)`. Public replacement:
    none (`serve.status()` raises without a controller, and `serve.start` starts one)."""
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False) is not None


def cluster_address(address: str | None) -> str | None:
    """The running cluster `ray.init(address)` would connect to (RAY_ADDRESS, a `ray start` head on this
    machine); None when it would start a Ray of its own, which dies with this process.

    Ray 2.60: `ray._private.services.canonicalize_bootstrap_address`. Public replacement: none
    (`ray.init` decides internally)."""
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(address)


# ------------------------------------------------------------------------------------------ Tune's state


def tune_trial_states(state_file: str | Path) -> dict[str, dict[str, Any]]:
    """trial_id -> {"status", "config", "num_failures", "start_time"} from one of Tune's
    `experiment_state-*.json` files; {} when it cannot be read (being written, or not Tune's format).

    Ray 2.60: the file's "trial_data" is a list of [trial JSON, run-metadata JSON] pairs (Tune's
    `Trial.get_json_state`). Read as plain JSON so that the report needs no Ray. Public replacement:
    `ray.tune.ExperimentAnalysis(path).trials` (imports Tune and restores every trial object)."""
    try:
        raw = json.loads(Path(state_file).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    out = {}
    for entry in raw.get("trial_data", []):
        try:
            trial = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
            meta = json.loads(entry[1]) if isinstance(entry[1], str) else entry[1]
        except (IndexError, TypeError, json.JSONDecodeError):
            continue
        if "trial_id" in trial:
            out[trial["trial_id"]] = {"status": trial.get("status"), "config": trial.get("config") or {},
                                      "num_failures": (meta or {}).get("num_failures", 0),
                                      "start_time": (meta or {}).get("start_time")}
    return out


def replay_into_asha(scheduler: Any, trial_id: str, results: list[dict[str, Any]], time_attr: str,
                     metric: str) -> None:
    """Record a trial's past results in an ASHA scheduler's rungs, as the scheduler would have recorded them
    live: at each rung, the first result at or past its milestone (none at the horizon `max_t`, where a
    trial has finished rather than been judged). `results` are in order and all carry both keys.

    Ray 2.60: `AsyncHyperBandScheduler._brackets` (one `_Bracket` when brackets=1), `_Bracket._rungs` (a list
    of (milestone, {trial_id: metric x _metric_op})), `_max_t`, `_metric_op` (-1 for min, +1 for max: a rung keeps "higher is better").
    Public replacement: none; Tune saves no scheduler state, so a resumed ASHA starts with empty rungs
    (a `Tuner.restore` that restored the scheduler, or `TrialScheduler.restore` being called, would do)."""
    (bracket,) = scheduler._brackets
    for milestone, recorded in bracket._rungs:
        first = next((r for r in results if r[time_attr] >= milestone), None)
        if first is not None and first[time_attr] < scheduler._max_t:
            recorded[trial_id] = scheduler._metric_op * first[metric]


def set_restored_variant_limit(searcher: Any, limit: int) -> None:
    """Give a `BasicVariantGenerator` restored from a saved search this driver's trials-at-once limit.

    Ray 2.60: the generator keeps its limit in `max_concurrent` (Tune ignores `max_concurrent_trials` for
    it), and `set_state` restores the whole saved `__dict__`, the saved limit with it, while the cluster
    the search resumes on may be another size. Public replacement: `Tuner.restore` accepting a new
    `TuneConfig` (or `max_concurrent_trials`) for the restored searcher."""
    searcher.max_concurrent = limit
