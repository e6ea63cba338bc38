"""Search efficiency: ASHA against the same grid trained to the end, in one run on one machine.

    .venv/bin/python bench/search_efficiency.py                       # 8-point grid, tiny model, ~10 min on 2 cores
    .venv/bin/python bench/search_efficiency.py --max-steps 120 --keep /tmp/bench-searches

Both searches run the identical grid (learning rate x dropout, the tiny-cpu search template) through
`aigc.search.run_search`, one after the other on the same Ray cluster:
  grid   every configuration trained to base.optim.max_steps (ASHA off)
  asha   the same configurations, in the same order, with ASHA on validation loss (grace 1 round, rf 3)
Compute is counted two ways: optimizer steps trained (what ASHA decides; every step costs the same) and
CPU-hours (wall time x CPUs held, which also counts each trial's fixed start-up: worker processes,
DeepSpeed initialisation). Printed: both searches' best validation loss and compute, and the ratios.
Target: ASHA's best within 2% of the grid's best for at most 40% of the grid's compute.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Tune runs a grid in the order listed (dropout varying fastest). Sorted learning rates are ASHA's worst
# case (every new trial beats all before it, so nothing is stopped); this is a fixed shuffle of them
# (numpy default_rng(0).permutation), the kind of order a random search produces.
LRS = [3.0e-3, 3.0e-4, 1.0e-3, 1.0e-2]
DROPOUTS = [0.0, 0.1]
GRACE_ROUNDS, RF = 1, 3


def overrides(storage: str, name: str, asha: bool, max_steps: int, every: int) -> list[str]:
    return [
        f"search.storage_path={storage}", f"search.name={name}", "search.algorithm=grid", "search.num_samples=1",
        f"search.asha.enabled={str(asha).lower()}", f"search.asha.grace_period={GRACE_ROUNDS}",
        f"search.asha.reduction_factor={RF}",
        f"space.lr={{kind: choice, values: {LRS}, low: null, high: null}}",
        f"space.dropout={{kind: choice, values: {DROPOUTS}, low: null, high: null}}",
        "space.weight_decay={kind: choice, values: [0.01]}",
        f"base.optim.max_steps={max_steps}", f"base.eval.every_steps={every}", "base.optim.warmup_steps=5",
        "base.eval.log_every=1000",
    ]


def run(storage: str, name: str, asha: bool, max_steps: int, every: int) -> dict:
    from aigc.config import load_config
    from aigc.report import load_search, summary
    from aigc.search import SearchConfig, run_search

    cfg = load_config(SearchConfig, ROOT / "tune" / "configs" / "tiny-cpu.yaml",
                      overrides(storage, name, asha, max_steps, every))
    t0 = time.time()
    result = run_search(cfg)
    wall = time.time() - t0
    data = load_search(result.search_dir)
    s = summary(data)
    return {"name": name, "best": s["best"].best_val_loss, "best_trial": s["best"].trial_id,
            "best_params": s["best"].params, "steps": s["steps"], "cpu_h": s["cpu_hours"], "wall": wall,
            "stopped": s["counts"].get("stopped by ASHA", 0), "trials": s["trials"], "dir": result.search_dir,
            "data": data}


def _percentile(xs: list[float], q: float) -> float:
    """numpy's default (linear) percentile, q in [0, 1]; plain Python because it runs ~10^6 times."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


def replay_orders(data, max_steps: int, every: int, concurrency: int = 2) -> list[tuple[float, float]]:
    """ASHA's rule replayed on the grid's own measured curves for every order the trials could arrive in:
    (steps ratio, best-loss ratio) per order. Timing model: each trial's measured median start-up time and
    seconds per validation round, `concurrency` trials at a time (as in the real runs)."""
    import heapq
    import itertools

    import numpy as np

    trials = [t for t in data.trials if t.history]
    curves = {t.trial_id: {h["step"]: h["val_loss"] for h in t.history} for t in trials}
    first = np.median([t.history[0]["time_total_s"] for t in trials])
    per_round = np.median([(t.history[-1]["time_total_s"] - t.history[0]["time_total_s"]) / (len(t.history) - 1)
                           for t in trials])
    grid_best = min(min(c.values()) for c in curves.values())
    rungs_at = [GRACE_ROUNDS * every * RF ** k for k in range(8) if GRACE_ROUNDS * every * RF ** k < max_steps]
    out = []
    for order in itertools.permutations(curves):
        rungs: dict[int, dict[str, float]] = {m: {} for m in rungs_at}
        queue, events, steps, seq = list(order), [], {}, itertools.count()

        def start(tid: str, t0: float, events: list = events, seq: itertools.count = seq) -> None:
            for k in range(1, max_steps // every + 1):
                heapq.heappush(events, (t0 + first + (k - 1) * per_round, next(seq), tid, k * every))

        for _ in range(concurrency):
            if queue:
                start(queue.pop(0), 0.0)
        ended: set[str] = set()
        while events:
            t, _, tid, step = heapq.heappop(events)
            if tid in ended:
                continue
            steps[tid], loss, stop = step, curves[tid][step], False
            for m in sorted(rungs, reverse=True):  # as Tune's _Bracket: highest unrecorded rung reached
                if step >= m and tid not in rungs[m]:
                    rec = rungs[m]
                    stop = bool(rec) and -loss < _percentile([-v for v in rec.values()], 1 - 1 / RF)
                    rec[tid] = loss
                    break
            if stop or step >= max_steps:
                ended.add(tid)
                if queue:
                    start(queue.pop(0), t)
        best = min(min(v for s, v in curves[tid].items() if s <= steps[tid]) for tid in steps)
        out.append((sum(steps.values()) / (len(curves) * max_steps), best / grid_best))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-steps", type=int, default=90, help="steps of a full trial")
    p.add_argument("--every", type=int, default=10, help="validation (and ASHA rung) spacing in steps")
    p.add_argument("--keep", help="keep both searches (reports included) under this folder")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    storage = args.keep or tempfile.mkdtemp(prefix="aigc-bench-search-")
    if not os.environ.get("RAY_ADDRESS"):
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        grid = run(storage, "grid", False, args.max_steps, args.every)
        asha = run(storage, "asha", True, args.max_steps, args.every)
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(storage, ignore_errors=True)

    n = len(LRS) * len(DROPOUTS)
    print(f"\n{n}-point grid (lr {LRS} x dropout {DROPOUTS}), {args.max_steps} steps a full trial, "
          f"validation every {args.every}, {os.cpu_count()} CPUs")
    print(f"{'':6} {'best val loss':>13} {'best trial':>14} {'steps':>7} {'CPU-hours':>10} {'wall s':>8} {'stopped':>8}")
    for r in (grid, asha):
        print(f"{r['name']:6} {r['best']:13.4f} {r['best_trial']:>14} {r['steps']:7d} {r['cpu_h']:10.4f} "
              f"{r['wall']:8.0f} {r['stopped']:>5}/{r['trials']}")
    loss_ratio = asha["best"] / grid["best"]
    step_ratio = asha["steps"] / grid["steps"]
    cpu_ratio = asha["cpu_h"] / grid["cpu_h"]
    print(f"\nbest loss  asha/grid = {loss_ratio:.4f}   (target <= 1.02: {'met' if loss_ratio <= 1.02 else 'MISSED'})")
    print(f"steps      asha/grid = {step_ratio:.3f}    (target <= 0.40: {'met' if step_ratio <= 0.40 else 'MISSED'})")
    print(f"CPU-hours  asha/grid = {cpu_ratio:.3f}    (includes each trial's fixed start-up)")
    print(f"wall time  asha/grid = {asha['wall'] / grid['wall']:.3f}")
    print(f"best configuration: grid {grid['best_params']}, asha {asha['best_params']}")
    replay = replay_orders(grid["data"], args.max_steps, args.every)
    steps = sorted(r for r, _ in replay)
    met = sum(1 for r, b in replay if r <= 0.40 and b <= 1.02)
    print(f"\nASHA replayed on the grid's measured curves over all {len(replay)} arrival orders: steps ratio median "
          f"{steps[len(steps) // 2]:.3f} (min {steps[0]:.3f}, max {steps[-1]:.3f}); best loss within 2% in "
          f"{sum(1 for _, b in replay if b <= 1.02)}/{len(replay)} orders; both targets met in {met}/{len(replay)}")
    if args.keep:
        print(f"reports: {grid['dir']}/report.html {asha['dir']}/report.html")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
