"""The whole loop as one job: search, report, winner export, deploy (or update) on Serve, a smoke request.

    python jobs/pipeline.py --config jobs/configs/pipeline-tiny-cpu.yaml             # in-process (local Ray)
    python jobs/pipeline.py --config jobs/configs/pipeline-tiny-cpu.yaml deploy.keep_serving=true
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
      python jobs/pipeline.py --config jobs/configs/pipeline-tiny-cpu.yaml            # against a running cluster

On a cluster the Serve app outlives the job; submitting again with a new search updates it in place. A
local in-process run takes its Ray (and the app) down when it ends unless deploy.keep_serving=true.
"""

from __future__ import annotations

import argparse
import sys
import time

from aigc.config import ConfigError, load_config
from aigc.data import DataError
from aigc.modeldir import ModelDirError
from aigc.pipeline import PipelineConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="pipeline YAML: a search config plus a deploy section")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. search.num_samples=2")
    args = p.parse_args(argv)
    try:
        cfg = load_config(PipelineConfig, args.config, args.overrides)
        from aigc.pipeline import run_pipeline  # starts Ray: only once the config is known to be good

        result = run_pipeline(cfg)
    except (ConfigError, DataError, ModelDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[aigc] done: report {result.report} | winner {result.winner_dir} | endpoint {result.url}/v1")
    if cfg.deploy.keep_serving:
        print("[aigc] serving until Ctrl-C")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
