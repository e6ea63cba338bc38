"""The on-disk names of a run folder and a search folder, and the one reader of their JSON-lines logs.

A fine-tuning run, `<run.storage_path>/<run.name>/` (`aigc.finetune`):

    config.yaml            the resolved job config
    metrics.jsonl          one line per report of the Train run (the learning curve, readable while it trains)
    checkpoint_*/          Ray Train's checkpoints (ZeRO shards + metrics.json)
    base/ best/ final/     model directories: the embedded base, the lowest-validation-loss and the last step
    summary.json           what `run_finetune` returned
    mlflow_run.json        the run's MLflow run (id, experiment, store), so a resumed run logs to the same one

A search, `<search.storage_path>/<search.name>/` (`aigc.search`, read back by `aigc.report`):

    search.yaml            the resolved search config (what the report and a resume compare against)
    base/                  the embedded base model (when no model.name_or_path is given)
    tune/<trial_id>/       Tune's per-trial params.json, result.json (one line per validation), error.txt
    trials/trial-<id>/     each trial's Train run (the layout above) plus trial.json and attempts.jsonl
    asha_stops.jsonl       one line per trial that ASHA stopped: when and at what loss
    winner/                the best trial's model directory (checksummed; what Serve deploys)
    report.html, report.md, trials.csv, plots/   see `aigc.report`
    mlflow_run.json        the search's MLflow run (each trial's child run: in its run folder, as above)

A storage root (`run.storage_path`, `search.storage_path`) also holds the default tracking store (`aigc.tracking`):

    mlflow.db              the SQLite database of MLflow's runs and model registry
    mlartifacts/           the artifacts of its runs, <experiment id>/<run id>/artifacts/

Only names live here (and `read_json_lines`): this module imports nothing of aigc, so the search, the
report and the fine-tuning driver can all use it without importing each other.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# a run folder
RUN_CONFIG = "config.yaml"
METRICS_LOG = "metrics.jsonl"
SUMMARY = "summary.json"
BASE_DIR, BEST_DIR, FINAL_DIR = "base", "best", "final"

# The driver's local copy of an object-store run's or search's own files (config, logs, report, models it reads):
# written here, published to the bucket (aigc.storage); Ray Train and Tune write their own files to the bucket.
STAGING = "~/.cache/aigc/staging"


def staging_dir(location: str, name: str) -> Path:
    """The staging folder of the object-store run or search at `location`, keyed by the location so that two
    buckets' runs of one name stay apart."""
    return Path(os.path.expanduser(STAGING)) / hashlib.sha256(location.encode()).hexdigest()[:12] / name


# a search folder
SEARCH_YAML = "search.yaml"
TUNE_DIR, TRIALS_DIR, WINNER_DIR = "tune", "trials", "winner"
ASHA_LEDGER = "asha_stops.jsonl"
TRIAL_DONE = "trial.json"  # in a trial's run folder: written when the trial has exported its model
TRIAL_ATTEMPTS = "attempts.jsonl"  # in a trial's run folder: one line per start (retries and resumes add lines)
REPORT_HTML, REPORT_MD, TRIALS_CSV, PLOTS_DIR = "report.html", "report.md", "trials.csv", "plots"

# tracking (aigc.tracking): a run's or search's MLflow run, and the default store in a storage root
TRACKING_RECORD = "mlflow_run.json"
TRACKING_DB, TRACKING_ARTIFACTS = "mlflow.db", "mlartifacts"

# what Ray Tune writes (its names, read by the report and a resume)
TUNE_STATE_GLOB = "experiment_state-*.json"  # one per driver session, named by its start time
TUNE_PARAMS, TUNE_RESULTS, TUNE_ERROR = "params.json", "result.json", "error.txt"


def trial_run_name(trial_id: str) -> str:
    """The name of a trial's Train run, and of its folder under `trials/`."""
    return f"trial-{trial_id}"


def read_json_lines(path: str | Path) -> list[dict[str, Any]]:
    """Every JSON line of a log, oldest first; [] when the file does not exist yet. A line that does not parse
    is skipped: it is the one being written right now (the logs are read while runs append to them)."""
    path = Path(path)
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out
