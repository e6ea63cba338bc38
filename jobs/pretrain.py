"""Pre-train the embedded base (`model.name_or_path: embedded`) once and cache it; a cached one is reused.

    python jobs/pretrain.py                                                      # the default base
    python jobs/pretrain.py --config jobs/configs/tiny-cpu.yaml model.pretrain.max_steps=1000
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token) \\
      ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
      python jobs/pretrain.py --config jobs/configs/tiny-cpu.yaml                 # against a running cluster

The base is cached under `run.base_cache` by a hash of `model.pretrain` (worker counts aside); the first
fine-tune, search or pipeline that needs it builds it the same way, so running this first is optional.
"""

from __future__ import annotations

import sys

from aigc.cli import config_job
from aigc.config import FinetuneConfig


def main(argv: list[str] | None = None) -> int:
    done = config_job(argv, __doc__, FinetuneConfig, "aigc.pretrain:pretrain",
                      config_help="YAML config whose model.pretrain and run.base_cache say which base (defaults: "
                                  "the shipped embedded base)", example="model.pretrain.max_steps=1000")
    return 2 if done is None else 0


if __name__ == "__main__":
    sys.exit(main())
