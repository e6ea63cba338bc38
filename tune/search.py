"""Search fine-tuning hyperparameters with Ray Tune: ASHA on validation loss, a report, the winner exported.

    python tune/search.py --config tune/configs/tiny-cpu.yaml                      # in-process (local Ray)
    python tune/search.py --config tune/configs/tiny-cpu.yaml search.num_samples=8 space.lr.high=1e-2
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token) \\
      ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
      python tune/search.py --config tune/configs/gpt2-gpu.yaml                   # against a running cluster
    aigc report ~/aigc/searches/tiny-cpu                                           # rebuild the report

Each trial is a full Ray Train + DeepSpeed fine-tune (the driver of jobs/finetune.py). Results land in
<search.storage_path>/<search.name>/: report.html, report.md, trials.csv, plots/, and winner/ (the best
trial's model directory, which Serve deploys). Running the same command again resumes an interrupted
search without rerunning its finished trials.
"""

from __future__ import annotations

import sys

from aigc.cli import config_job
from aigc.search_config import SearchConfig


def main(argv: list[str] | None = None) -> int:
    done = config_job(argv, __doc__, SearchConfig, "aigc.search:run_search",
                      config_help="search YAML (defaults: the embedded tiny model, 8 random trials)",
                      example="space.lr.high=1e-2")
    if done is None:
        return 2
    _, result = done
    print(f"[aigc] report: {result.report['report.html']}")
    if result.interrupted:
        print("[aigc] the search was interrupted; run the same command again to resume it")
        return 1
    if result.errors:
        print(f"[aigc] {len(result.errors)} of {len(result.trials)} trials failed: "
              + "; ".join(f"{tid}: {err}" for tid, err in sorted(result.errors.items())), file=sys.stderr)
    if result.winner_dir is None:
        print("error: no trial reported a validation loss, so there is no winner; the report's Errors section "
              "has each failure in full", file=sys.stderr)
        return 1
    print(f"[aigc] winner: {result.winner_dir} (trial {result.best_trial}, val loss "
          f"{result.best_metrics.get('val_loss', float('nan')):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
