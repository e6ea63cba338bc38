"""Fine-tune a causal LM with Ray Train + DeepSpeed ZeRO, then compare test perplexity before and after.

    python jobs/finetune.py --config jobs/configs/tiny-cpu.yaml                 # in-process (local Ray)
    python jobs/finetune.py --config jobs/configs/tiny-cpu.yaml optim.lr=1e-3 zero.stage=3
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token) \\
      ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
      python jobs/finetune.py --config jobs/configs/tiny-cpu.yaml                 # against a running cluster

Re-running with the same `run.name` continues from that run's latest checkpoint.
"""

from __future__ import annotations

import sys

from aigc.cli import config_job
from aigc.config import FinetuneConfig


def main(argv: list[str] | None = None) -> int:
    done = config_job(argv, __doc__, FinetuneConfig, "aigc.pretrain:finetune",
                      config_help="YAML config (defaults: the embedded tiny CPU run)", example="optim.lr=1e-3")
    if done is None:
        return 2
    _, result = done
    print(f"[aigc] best model: {result.best_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
