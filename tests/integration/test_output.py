"""What a user sees: the tiny fine-tune job's whole output in a shell, at the default level. (AIGC_LOG_LEVEL=debug
bringing everything back is checked on the `ray job submit` run in test_jobs.py, the way the README says to
troubleshoot a job.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aigc.console import LEVEL_ENV, PROGRESS_ENV, QUIET_ENV
from conftest import TEXT_RANDOM

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
JOB = [sys.executable, "jobs/finetune.py", "--config", "jobs/configs/tiny-cpu.yaml",
       "data.embedded.n_train=1200", "data.embedded.n_validation=150", "data.embedded.n_test=150",
       "data.block_size=64", "model.arch.n_embd=32", "model.arch.vocab_size=400", "optim.warmup_steps=2",
       "eval.every_steps=10", "eval.log_every=5", *TEXT_RANDOM]

# What `make demo` printed before aigc.console (one signature per kind of noise, from the library that
# printed it): none of these may reach the default output.
NOISE = {
    "torch FutureWarning (DeepSpeed's collectives)": r"all_gather_into_tensor",
    "Ray Data's deprecation warning (Train's DatasetManager)": r"exclude_resources",
    "Ray Train core-worker error (PreemptionWatcher)": r"PreemptionWatcher",
    "raylet worker-count warning": r"PYTHON worker processes have been started",
    "Ray Train per-report INFO": r"Reporting training result",
    "Ray Train worker-group INFO": r"Started training worker group|Setting up process group|Requesting resources",
    "Ray Train checkpoint INFO": r"Checkpoint successfully created",
    "Ray Data execution INFO": r"Starting execution of Dataset|execution finished in|registers for logging",
    "Ray Data progress-bar warning": r"Progress bars disabled",
    "Ray token-auth notice": r"Token authentication is enabled",
    "Tune reporter tables": r"Trial status:|Configuration for experiment|Current best trial",
    "HF progress bars": r"Generating train split|Loading weights|Writing model shards|Flattening the indices",
    "DeepSpeed op-build print": r"DeepSpeed deepspeed\.ops\.\S+ built successfully",
    "DeepSpeed zero_to_fp32 prints": r"Processing zero checkpoint|Loading checkpoint shards",
    "transformers loss_type warning": r"loss_type=None",
    "Ray Serve INFO": r"Proxy starting on node|Got updated endpoints|Started Serve in namespace",
    "MLflow's database INFO": r"Creating initial MLflow database tables|Updating database tables",
}


def noise_lines(output: str) -> list[str]:
    """Every line of `output` that matches a known-noise signature, with the kind it is."""
    return [f"{kind}: {line}" for line in output.splitlines() for kind, pat in NOISE.items() if re.search(pat, line)]


def user_shell_env() -> dict[str, str]:
    """This process's environment as a user's shell has it: no test-only settings (Ray also changes its output when
    it sees PYTEST_CURRENT_TEST) and none of what console.setup() put here when an earlier test ran a job in it."""
    drop = {"RAY_DEDUP_LOGS", "PYTEST_CURRENT_TEST", LEVEL_ENV, PROGRESS_ENV, *QUIET_ENV,
            "RAY_DEDUP_LOGS_SKIP_REGEX", "RAY_DEDUP_LOGS_ALLOW_REGEX"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def run_job(tmp_path: Path, *overrides: str) -> str:
    p = subprocess.run([*JOB, *overrides, f"run.storage_path={tmp_path}"], cwd=ROOT, env=user_shell_env(),
                       capture_output=True, text=True, timeout=900)
    out = re.sub(r"\x1b\[[0-9;]*m", "", p.stdout + p.stderr)  # Ray colours prefixes and the dashboard URL
    assert p.returncode == 0, out[-4000:]
    return out


def test_default_output_is_the_aigc_lines_and_ray_essentials(tmp_path):
    out = run_job(tmp_path, "run.name=quiet", "optim.max_steps=20", "run.samples=1")
    assert noise_lines(out) == []
    for line in [r"View the dashboard at http", r"\[aigc\] data: \{\"blocks\"",
                 r"\[aigc\] 2 workers \| ZeRO-2 \|",
                 r"\[aigc\] quiet step +5/20 \| loss [\d.]+ \| lr \S+ \| [\d.]+k tok/s \| eta \d+m\d\ds",
                 r"\[aigc\] quiet step +20 \| val loss [\d.]+ \| val ppl [\d.]+ \| best [\d.]+",
                 r"\[aigc\] exported best \(step \d+, val loss [\d.]+\) ->", r"\[aigc\] test perplexity +[\d.]+ +[\d.]+",
                 r"\[aigc\] sample: 'Introducing the' ->", r"\[aigc\] tracked: MLflow run \w+ in sqlite:///",
                 r"\[aigc\] best model: "]:
        assert re.search(line, out), f"missing {line!r} in:\n{out}"
    # every step line of rank 0 once: Ray neither deduplicates nor repeats them
    assert len(re.findall(r"\[aigc\] quiet step +\d+/20 ", out)) == 4
