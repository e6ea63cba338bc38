"""`python jobs/pretrain.py [--config FILE] [a.b=value ...]`: pre-train the embedded base once and cache it.

    python jobs/pretrain.py                                                      # the default base
    python jobs/pretrain.py --config jobs/configs/tiny-cpu.yaml model.pretrain.max_steps=1000
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
      python jobs/pretrain.py --config jobs/configs/tiny-cpu.yaml                 # against a running cluster

The base is cached under `run.base_cache` by a hash of `model.pretrain` (worker counts aside); the first
fine-tune, search or pipeline that needs it builds it the same way, so running this first is optional.
"""

from __future__ import annotations

import sys

from aigc.cli import pretrain


def main(argv: list[str] | None = None) -> int:
    return pretrain(argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
