"""The entry point as users run it: `ray job submit` to a local head node, and bad input failing fast."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from private_head import stop_private_head
from test_output import noise_lines, user_shell_env

from conftest import TEXT_RANDOM, free_port, haproxy_env

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
JOB = ["jobs/finetune.py", "--config", "jobs/configs/tiny-cpu.yaml"]
SMALL = ["data.embedded.n_train=1200", "data.embedded.n_validation=150", "data.embedded.n_test=150",
         "data.block_size=64", "model.arch.n_embd=32", "model.arch.vocab_size=400", "optim.max_steps=20",
         "optim.warmup_steps=2", "eval.every_steps=10", "run.samples=1", *TEXT_RANDOM]


def run_job(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *JOB, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_bad_config_fails_fast_with_every_key_named():
    p = run_job("optim.lr=-1", "zero.stage=9", "optim.nonsense=1")
    assert p.returncode == 2
    for key in ("optim.lr", "zero.stage", "optim.nonsense: unknown key"):
        assert key in p.stderr
    assert "Started a local Ray instance" not in p.stdout + p.stderr  # rejected before Ray started


def test_bad_data_fails_before_workers_start(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "text under the wrong column"}) + "\n")
    p = run_job("data.source=files", "data.format=text", f"data.train_files=[{tmp_path / 'd.jsonl'}]",
                f"run.storage_path={tmp_path}")
    assert p.returncode == 2
    assert f"{tmp_path / 'd.jsonl'}: no column 'text' (data.text_column)" in p.stderr
    assert "RayTrainWorker" not in p.stdout + p.stderr


@pytest.fixture(scope="module")
def head_node():
    """`ray start --head --block` with token auth on free ports; stopped by signalling only its own process."""
    port, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="aigc-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    # a user's shell (the head's processes and the jobs' drivers inherit it): without conftest's RAY_DEDUP_LOGS=0,
    # which also turns off Ray's skip regex for forwarded lines, or the quiet settings an earlier test's in-process
    # run left in this process's environment, which would quiet the jobs' drivers for them
    env = {**user_shell_env(), "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}", **haproxy_env(temp)}
    # every listener on a free port: Ray's fixed defaults (the agent's 52365, the client server's 10001) collide
    # with any other Ray on the machine (a user's own, another test run's), and the job API is the agent's
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats",
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # ready = a job can be submitted (the job agent starts after the API)
            r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--", "true"], env=env,
                               capture_output=True)
            if r.returncode == 0:
                break
            assert head.poll() is None, head.stdout.read()
            time.sleep(2)
        else:
            pytest.fail("head node did not come up")
        yield address, env
    finally:  # a head that never came up is stopped too
        stop_private_head(head, temp)


def test_ray_job_submit_at_debug_level_produces_a_model_directory(head_node, tmp_path):
    """The README's way to troubleshoot a submitted job: AIGC_LOG_LEVEL=debug in the job's runtime_env brings
    back what the default level filters, from the driver and the workers (the default level on a cluster is
    the pipeline job's, below; in a user's shell, test_output.py's)."""
    from transformers import AutoModelForCausalLM

    from aigc.modeldir import verify_model_dir

    address, env = head_node
    p = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
         "--runtime-env-json", json.dumps({"env_vars": {"AIGC_LOG_LEVEL": "debug"}}), "--",
         "python", *JOB, *SMALL, "run.name=submitted", f"run.storage_path={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "succeeded" in p.stdout
    # log records that the worker hook and the driver drop at info
    kinds = {line.split(":")[0] for line in noise_lines(p.stdout + p.stderr)}
    assert {"Ray Train per-report INFO", "Ray Train checkpoint INFO", "Ray Data execution INFO"} <= kinds, kinds
    assert re.search(r"\[aigc\] submitted step +20 \| val loss", p.stdout)
    best = tmp_path / "submitted" / "best"
    meta = verify_model_dir(best)
    assert meta["step"] in (10, 20) and meta["evaluation"]["finetuned"]["test_ppl"] > 1
    assert AutoModelForCausalLM.from_pretrained(best).config.n_embd == 32


def test_pipeline_job_searches_reports_and_serves_the_winner(head_node, embedded_base, tmp_path):
    """The demo's pipeline on a `ray start` cluster, sized down: the session's embedded base (its overrides under
    `base.`), the brief -> ad task, and the smoke step's test briefs through /v1/chat/completions."""
    import requests

    address, env = head_node
    port = free_port()
    p = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
         "python", "jobs/pipeline.py", "--config", "jobs/configs/pipeline-tiny-cpu.yaml",
         f"search.storage_path={tmp_path}", "search.name=piped", "search.num_samples=2", "search.asha.enabled=false",
         "base.data.embedded.n_train=1200", "base.data.embedded.n_validation=150", "base.data.embedded.n_test=150",
         "base.data.block_size=192", "base.optim.max_steps=20", "base.optim.warmup_steps=2", "base.eval.every_steps=10",
         "base.eval.task_examples=8", "base.eval.task_max_tokens=32", "deploy.smoke_max_tokens=32",
         f"deploy.port={port}", "deploy.app_name=piped", *(f"base.{o}" for o in embedded_base.overrides)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    search = tmp_path / "piped"
    assert (search / "report.html").stat().st_size > 10_000 and (search / "trials.csv").is_file()
    assert (search / "winner" / "aigc.json").is_file()
    assert "endpoint: http://127.0.0.1" in p.stdout
    assert re.search(r"\[aigc\] rank +trial_id +status +lr", p.stdout)  # the search's own trial table
    assert noise_lines(p.stdout) == []  # the driver's filters and the workers' setup hook work on a cluster too
    assert "[aigc] brief: Product: " in p.stdout and "[aigc]    ad: " in p.stdout  # chat smoke, scored
    assert "completion nats / floor" in p.stdout  # the winner against the base
    # the app outlives the job on the cluster: it still answers after `ray job submit` returned
    r = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                      json={"model": "winner", "prompt": "Save", "max_tokens": 8, "seed": 1})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"]
