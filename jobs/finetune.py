"""Fine-tune a causal LM with Ray Train + DeepSpeed ZeRO, then compare test perplexity before and after.

    python jobs/finetune.py --config jobs/configs/tiny-cpu.yaml                 # in-process (local Ray)
    python jobs/finetune.py --config jobs/configs/tiny-cpu.yaml optim.lr=1e-3 zero.stage=3
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token) \\
      ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
      python jobs/finetune.py --config jobs/configs/tiny-cpu.yaml                 # against a running cluster

Re-running with the same `run.name` continues from that run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from aigc.config import ConfigError, FinetuneConfig, load_config
from aigc.data import DataError
from aigc.modeldir import ModelDirError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (defaults: the embedded tiny CPU run)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-3")
    args = p.parse_args(argv)
    try:
        cfg = load_config(FinetuneConfig, args.config, args.overrides)
        from aigc.finetune import run_finetune  # imports Ray: only after the config is known to be good

        result = run_finetune(cfg)
    except (ConfigError, DataError, ModelDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[aigc] best model: {result.best_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
