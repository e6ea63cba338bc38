"""LoRA against full fine-tuning on the same base and task, in one run: trainable parameters, peak worker memory,
optimizer-state size, tokens/s and final task quality, printed as ratios LoRA / full.

    .venv/bin/python bench/lora_vs_full.py                                   # jobs/configs/tiny-cpu.yaml, both runs
    .venv/bin/python bench/lora_vs_full.py --examples 50 optim.max_steps=200 \
        --lora model.peft.method=lora model.peft.r=5 model.peft.alpha=10 optim.lr=1e-2 optim.max_steps=500  # smaller

Both runs take the config and the overrides; the LoRA run adds `--lora` (default: rank 5 on every linear layer,
alpha 10, lr 1e-2 for 1,500 steps: adapters start at zero and need a larger step than full weights, and more of
them; the table prints both runs' steps and training seconds, so the time that buys is in the figures). Peak
worker memory is the largest resident set of one Ray Train worker, sampled every 0.2 s (on a GPU machine DeepSpeed's own memory
lines are in the job log); the optimizer state is the size of the last checkpoint's ZeRO optimizer files (fp32
master weights + Adam moments); tokens/s is training tokens over training seconds (validation excluded).

Targets (issue 11): LoRA within 10% of full fine-tuning's task quality with <= 5% of its trainable parameters.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import ray
from task_quality import check

from aigc.config import FinetuneConfig, load_config
from aigc.finetune import init_ray, read_metrics_log
from aigc.pretrain import finetune
from aigc.train import CKPT_TAG

ROOT = Path(__file__).resolve().parents[1]
# rank 5 (4.4% of the embedded base's parameters), a larger step (adapters start at zero) and 2.5x the steps:
# at the full run's 600 steps LoRA had learned to write valid ads but not yet to copy the brief's offer
LORA = ["model.peft.method=lora", "model.peft.r=5", "model.peft.alpha=10", "optim.lr=1e-2", "optim.max_steps=1500"]


class PeakWorkerRss:
    """Samples the resident memory of this Ray node's Train workers (children of its raylet) in a thread."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
        self._raylet = psutil.Process(raylet)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for p in self._raylet.children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(p.cmdline()):
                        self.peak = max(self.peak, p.memory_info().rss)
                except psutil.Error:
                    pass

    def __enter__(self) -> PeakWorkerRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def measure(cfg: FinetuneConfig) -> dict[str, float]:
    """One fine-tune and what it cost and reached."""
    with PeakWorkerRss() as rss:
        result = finetune(cfg)
    last = read_metrics_log(result.run_dir)[-1]
    optim = sum(p.stat().st_size for p in (Path(last["checkpoint"]) / CKPT_TAG).rglob("*optim_states.pt"))
    tuned = result.evaluation["finetuned"]
    return {"trainable_pct": 100 * last["trainable_params"] / last["total_params"], "peak_rss_mb": rss.peak / 2**20,
            "optimizer_mb": optim / 2**20, "tokens_per_s": last["tokens_seen"] / max(last["train_seconds"], 1e-9),
            "train_seconds": last["train_seconds"], "steps": last["step"],
            "floor_ratio": tuned["floor_ratio"], "valid_pct": tuned["greedy_valid_pct"],
            "faithful_pct": tuned["greedy_faithful_pct"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "jobs/configs/tiny-cpu.yaml"))
    p.add_argument("--examples", type=int, default=200, help="test briefs generated for validity/fidelity")
    p.add_argument("--lora", nargs="*", default=LORA, help="overrides of the LoRA run only")
    p.add_argument("overrides", nargs="*", help="config overrides of both runs, e.g. optim.max_steps=300")
    a = p.parse_args()

    t0 = time.time()
    init_ray()
    # runs of their own in a fresh folder: a rerun must not resume an earlier one (its RSS and speed unmeasured)
    runs = tempfile.mkdtemp(prefix="aigc-bench-lora-")
    common = [f"eval.task_examples={a.examples}", "run.samples=0", f"run.storage_path={runs}", *a.overrides]
    full = measure(load_config(FinetuneConfig, a.config, [*common, "run.name=bench-lora-vs-full-full"]))
    lora = measure(load_config(FinetuneConfig, a.config, [*common, *a.lora, "run.name=bench-lora-vs-full-lora"]))

    print(f"\n== LoRA vs full fine-tuning ({a.examples} test briefs; {time.time() - t0:.0f} s) ==")
    print(f"{'':36} {'full':>10} {'LoRA':>10} {'LoRA/full':>10}")
    for k, v in full.items():
        print(f"{k:36} {v:>10.3f} {lora[k]:>10.3f} {lora[k] / v if v else float('nan'):>10.3f}")
    print()
    check("RATIO trainable params LoRA/full", lora["trainable_pct"] / full["trainable_pct"], "<= 0.05",
          lora["trainable_pct"] / full["trainable_pct"] <= 0.05)
    check("RATIO floor ratio LoRA/full", lora["floor_ratio"] / full["floor_ratio"], "<= 1.10",
          lora["floor_ratio"] / full["floor_ratio"] <= 1.10)
    for k in ("valid_pct", "faithful_pct"):
        ratio = lora[k] / full[k] if full[k] else float("nan")
        check(f"RATIO {k} LoRA/full", ratio, ">= 0.90", ratio >= 0.90)


if __name__ == "__main__":
    main()
