"""What a Train run's controller does with each report: append it to the run's metrics log, log it to MLflow.

Train runs these callbacks in its controller, a fresh process per run that otherwise imports only Ray Train and
torch; unpickling a callback imports the module that defines it. So they live here, beside nothing heavier than
storage and tracking, rather than in `aigc.finetune` (which would cost the controller ~3 s of importing
transformers, DeepSpeed and the data pipeline before the run's workers are created).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from aigc import storage, tracking


class ReportLog(UserCallback):
    """Appends every report (rank 0's metrics + checkpoint path) to `<run_dir>/metrics.jsonl`, across
    restarts and resumed runs: the learning curve of a run, readable while it trains."""

    def __init__(self, path: str, location: str | None = None):
        self.path, self.location = path, location  # location: the log's copy in an object-store run

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        row = dict(metrics[0], checkpoint=checkpoint.path if checkpoint else None, timestamp=time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        if self.location:  # in the bucket as it grows: a run stopped early (ASHA, a killed driver) keeps its curve
            try:
                storage.write_bytes(self.location, Path(self.path).read_bytes())
            except storage.StorageError as e:
                print(f"[aigc] could not copy the metrics log to {storage.redact(self.location)}: {e}", flush=True)


class TrackReports(UserCallback):
    """Logs every report's metrics (rank 0's) to the run's MLflow run at its optimizer step. Train calls it in its
    controller (one process, on the driver's node), never on a worker."""

    def __init__(self, run: tracking.TrackedRun):
        self.run = run

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        try:
            self.run.log_metrics(metrics[0], step=int(metrics[0].get("step", 0)))
        except Exception as e:  # a tracking store that is down must not stop the training (metrics.jsonl has it all)
            print(f"[aigc] tracking: could not log step {metrics[0].get('step')} to MLflow: {e}", flush=True)
