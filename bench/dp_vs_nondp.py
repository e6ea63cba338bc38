"""DP-SGD against plain fine-tuning on the same base, task, canaries and seed, in one run: tokens/s, peak worker
memory, final task quality (completion loss / the exact floor, validity, fidelity) and canary exposure, at
epsilon 8 and epsilon 1, printed as ratios DP / plain.

    .venv/bin/python bench/dp_vs_nondp.py                                    # jobs/configs/tiny-cpu.yaml, 3 runs
    .venv/bin/python bench/dp_vs_nondp.py --examples 50 optim.max_steps=150 eval.every_steps=50 \
        "data.embedded={n_train: 1000, n_validation: 100, n_test: 100, seed: 0}"      # the README's figures

Every run trains on the embedded task's train split with `--canaries` made-up card numbers inserted `--repeats`
times each (`aigc.canary`), at zero.stage=0 and data.packing=false (what DP needs), on the same data and seed.
The plain run is the config as given (full fine-tuning); the DP runs add `--dp` (default: LoRA rank 8 on every
linear layer, lr 1e-2: a few parameters to clip and noise, the issue's practical pairing) and
privacy.target_epsilon 8 and 1 (the noise multiplier calibrated so optim.max_steps spend it). Exposure is each
canary's rank among `--candidates` random secrets of its format under the best model (quality too; epsilon
is what the whole run spent, the best step's is in its aigc.json), in bits (log2 of the
candidates = ranked first; ~1.4 = never seen); the base's exposure to the same canaries is printed beside it
(a pre-trained model's prior over digits already favours some secrets). tokens/s and peak RSS are
`bench/lora_vs_full.py`'s `measure`.

Targets (issue 15): exposure under DP far below the plain run's; the quality cost of DP at epsilon 8 and 1 stated.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from lora_vs_full import measure
from task_quality import check

from aigc.canary import make_canaries, model_exposures, with_canaries
from aigc.config import FinetuneConfig, load_config, run_dir_of
from aigc.finetune import BEST_DIR, clean_run, init_ray, read_metrics_log
from aigc.pretrain import ensure_base

ROOT = Path(__file__).resolve().parents[1]
DP = ["model.peft.method=lora", "model.peft.r=8", "model.peft.alpha=16", "optim.lr=1e-2"]
SHOWN = ("tokens_per_s", "peak_rss_mb", "floor_ratio", "valid_pct", "faithful_pct", "exposure_bits")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "jobs/configs/tiny-cpu.yaml"))
    p.add_argument("--examples", type=int, default=100, help="test briefs generated for validity/fidelity")
    p.add_argument("--canaries", type=int, default=4, help="made-up card numbers inserted into the train rows")
    p.add_argument("--repeats", type=int, default=10, help="copies of each canary")
    p.add_argument("--candidates", type=int, default=999, help="random secrets each canary is ranked among")
    p.add_argument("--dp", nargs="*", default=DP, help="overrides of the DP runs only")
    p.add_argument("overrides", nargs="*", help="config overrides of every run, e.g. optim.max_steps=200")
    a = p.parse_args()

    t0 = time.time()
    init_ray()
    canaries = make_canaries(a.canaries, seed=0)
    data_dir = tempfile.mkdtemp(prefix="aigc-bench-dp-")
    common = [f"eval.task_examples={a.examples}", "run.samples=0", "zero.stage=0", "data.packing=false", *a.overrides]

    def run(name: str, *extra: str) -> dict[str, float]:
        cfg = with_canaries(load_config(FinetuneConfig, a.config, [*common, *extra, f"run.name=bench-dp-{name}"]),
                            canaries, a.repeats, data_dir)
        clean_run(cfg)  # a run of the same name would resume from its last checkpoint: no training to measure
        out = measure(cfg)
        out.pop("optimizer_mb")  # ZeRO's optimizer files; the DDP engine keeps one state file
        exposures = model_exposures(run_dir_of(cfg) / BEST_DIR, canaries, cfg.data, a.candidates)
        out["exposure_bits"] = sum(exposures) / len(exposures)
        out["epsilon_spent"] = read_metrics_log(run_dir_of(cfg))[-1].get("epsilon", float("inf"))  # the whole run
        print(f"[bench] {name}: exposures {[round(x, 2) for x in exposures]}", flush=True)
        return out

    plain = run("plain")
    dp = {eps: run(f"eps{eps:g}", *a.dp, "privacy.enabled=true", f"privacy.target_epsilon={eps}") for eps in (8.0, 1.0)}
    cfg = with_canaries(load_config(FinetuneConfig, a.config, common), canaries, a.repeats, data_dir)
    base = model_exposures(ensure_base(cfg), canaries, cfg.data, a.candidates)

    print(f"\n== DP-SGD vs plain fine-tuning ({a.examples} test briefs, {a.canaries} canaries x {a.repeats}, "
          f"{a.candidates + 1} candidates each; {time.time() - t0:.0f} s) ==")
    print(f"{'':20} {'plain':>10} {'DP eps 8':>10} {'DP eps 1':>10} {'eps8/plain':>11} {'eps1/plain':>11}")
    for k in ("epsilon_spent", *SHOWN):
        v, e8, e1 = plain[k], dp[8.0][k], dp[1.0][k]
        ratios = [x / v if v and k != "epsilon_spent" else float("nan") for x in (e8, e1)]
        print(f"{k:20} {v:>10.3f} {e8:>10.3f} {e1:>10.3f} {ratios[0]:>11.3f} {ratios[1]:>11.3f}")
    print(f"{'base exposure_bits':20} {sum(base) / len(base):>10.3f}   (the pre-trained base, never fine-tuned)\n")
    for eps in (8.0, 1.0):
        check(f"exposure plain - DP eps {eps:g} (bits)", plain["exposure_bits"] - dp[eps]["exposure_bits"], ">= 4",
              plain["exposure_bits"] - dp[eps]["exposure_bits"] >= 4)


if __name__ == "__main__":
    main()
