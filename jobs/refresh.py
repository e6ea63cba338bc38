"""`ray job submit --working-dir . -- python jobs/refresh.py --config FILE [a.b=value ...]`: one refresh cycle.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
      python jobs/refresh.py --config jobs/configs/refresh-tiny-cpu.yaml       # against a running cluster (cron)
    python jobs/refresh.py --config jobs/configs/refresh-tiny-cpu.yaml deploy.keep_serving=true   # in-process

The same as `aigc refresh` (see `aigc.refresh`): new settled files in refresh.incoming -> a candidate fine-tuned
from the served model -> promoted with a zero-downtime Serve update only if it beats the incumbent on the new
data by refresh.min_gain and stays within refresh.max_regression on the original test set. One submission is one
cycle; refresh.every makes it a long-lived loop. A killed cycle continues where it stopped on the next submission.
"""

from __future__ import annotations

import sys

from aigc.cli import refresh


def main(argv: list[str] | None = None) -> int:
    return refresh(argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
