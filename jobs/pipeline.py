"""`python jobs/pipeline.py --config FILE [a.b=value ...]`: the whole loop as one job: search, report, winner
export, deploy (or update) on Serve, a smoke request.

    python jobs/pipeline.py --config jobs/configs/pipeline-tiny-cpu.yaml             # in-process (local Ray)
    python jobs/pipeline.py --config jobs/configs/pipeline-tiny-cpu.yaml deploy.keep_serving=true
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
      python jobs/pipeline.py --config jobs/configs/pipeline-tiny-cpu.yaml            # against a running cluster

The same as `aigc pipeline` (what `ray job submit` runs). On a cluster the Serve app outlives the job;
submitting again with a new search updates it in place. A local in-process run takes its Ray (and the
app) down when it ends unless deploy.keep_serving=true.
"""

from __future__ import annotations

import sys

from aigc.cli import pipeline


def main(argv: list[str] | None = None) -> int:
    return pipeline(argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
