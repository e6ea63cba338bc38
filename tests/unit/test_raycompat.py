"""aigc.raycompat: the one module that touches Ray's and Tune's private parts, pinned to the Ray it was read against."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import ray
from ray.tune.schedulers import AsyncHyperBandScheduler

from aigc import raycompat

LIB = Path(raycompat.__file__).parent


def test_the_installed_ray_is_the_one_the_private_pieces_were_checked_against():
    """Fails on a Ray upgrade: re-read every piece of aigc/raycompat.py against the new Ray's source (each
    names what it uses), fix what moved, then set CHECKED_RAY_VERSION to the new version."""
    assert ray.__version__ == raycompat.CHECKED_RAY_VERSION, (
        f"Ray {ray.__version__} is installed but aigc/raycompat.py was checked against "
        f"{raycompat.CHECKED_RAY_VERSION}: re-check each of its pieces, then update CHECKED_RAY_VERSION")


def _private_uses(path: Path) -> list[str]:
    """`ray._private`/`ray.*._private` imports and `._brackets`/`._rungs`/`._max_t`/`._metric_op` reads."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom | ast.Import):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found += [n for n in names if n.startswith("ray") and "._private" in f".{n}"]
        elif isinstance(node, ast.Attribute) and node.attr in ("_private", "_brackets", "_rungs", "_max_t",
                                                               "_metric_op"):
            found.append(node.attr)
    return found


def test_no_other_module_of_the_library_reaches_into_ray_private_parts():
    offenders = {p.name: uses for p in sorted(LIB.rglob("*.py"))
                 if p.name != "raycompat.py"
                 and (uses := _private_uses(p))}
    assert offenders == {}
    assert _private_uses(LIB / "raycompat.py")  # the check itself sees what it looks for


def test_replayed_results_land_in_the_rungs_as_asha_records_them():
    """A resumed search rebuilds ASHA's rungs from result.json lines: the first result at or past each
    milestone, stored as Tune stores it (negated for mode=min), and nothing at the horizon."""
    asha = AsyncHyperBandScheduler(time_attr="step", metric="val_loss", mode="min", max_t=40, grace_period=10,
                                   reduction_factor=2)
    results = [{"step": s, "val_loss": 5.0 - s / 10} for s in (10, 15, 20, 30, 40)]
    raycompat.replay_into_asha(asha, "t_0", results, "step", "val_loss")
    rungs = dict((m, dict(r)) for m, r in asha._brackets[0]._rungs)
    assert rungs == {10: {"t_0": -4.0}, 20: {"t_0": -3.0}, 40: {}}  # a result at max_t is a finished trial
    asha_max = AsyncHyperBandScheduler(time_attr="step", metric="acc", mode="max", max_t=40, grace_period=10)
    raycompat.replay_into_asha(asha_max, "t_1", [{"step": 12, "acc": 0.5}], "step", "acc")
    assert dict(asha_max._brackets[0]._rungs[-1][1]) == {"t_1": 0.5}


def test_tune_state_files_are_read_without_tune(tmp_path):
    state = tmp_path / "experiment_state-2026-01-01_00-00-00.json"
    state.write_text(json.dumps({"trial_data": [
        [json.dumps({"trial_id": "a", "status": "TERMINATED", "config": {"lr": 0.1}}), json.dumps({"num_failures": 2})],
        ["not json", "{}"],
    ]}))
    assert raycompat.tune_trial_states(state) == {
        "a": {"status": "TERMINATED", "config": {"lr": 0.1}, "num_failures": 2, "start_time": None}}
    state.write_text('{"trial_data": [')  # being written
    assert raycompat.tune_trial_states(state) == {}
