"""`python tune/search.py --config FILE [a.b=value ...]`: search fine-tuning hyperparameters with Ray Tune:
ASHA on validation loss, a report, the winner exported.

    python tune/search.py --config tune/configs/tiny-cpu.yaml                      # in-process (local Ray)
    python tune/search.py --config tune/configs/tiny-cpu.yaml search.num_samples=8 space.lr.high=1e-2
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token) \\
      ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
      python tune/search.py --config tune/configs/gpt2-gpu.yaml                   # against a running cluster
    aigc report ~/aigc/searches/tiny-cpu                                           # rebuild the report

The same as `aigc search` (what `ray job submit` runs). Each trial is a full Ray Train + DeepSpeed
fine-tune (the driver of jobs/finetune.py). Results land in <search.storage_path>/<search.name>/:
report.html, report.md, trials.csv, plots/, and winner/ (the best trial's model directory, which Serve
deploys). Running the same command again resumes an interrupted search without rerunning its finished
trials.
"""

from __future__ import annotations

import sys

from aigc.cli import search


def main(argv: list[str] | None = None) -> int:
    return search(argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
