"""The whole loop as one job: search, report, winner export, deploy (or update) on Serve, a smoke request.

    python jobs/pipeline.py --config jobs/configs/pipeline-tiny-cpu.yaml             # in-process (local Ray)
    python jobs/pipeline.py --config jobs/configs/pipeline-tiny-cpu.yaml deploy.keep_serving=true
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
      python jobs/pipeline.py --config jobs/configs/pipeline-tiny-cpu.yaml            # against a running cluster

On a cluster the Serve app outlives the job; submitting again with a new search updates it in place. A
local in-process run takes its Ray (and the app) down when it ends unless deploy.keep_serving=true.
"""

from __future__ import annotations

import sys
import time

from aigc.cli import config_job
from aigc.pipeline import PipelineConfig


def main(argv: list[str] | None = None) -> int:
    done = config_job(argv, __doc__, PipelineConfig, "aigc.pipeline:run_pipeline",
                      config_help="pipeline YAML: a search config plus a deploy section",
                      example="search.num_samples=2")
    if done is None:
        return 2
    cfg, result = done
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
