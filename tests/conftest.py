"""Shared fixtures: a real local Ray cluster per module, a tiny exported model, and clean-up of global state."""

from __future__ import annotations

import os
import socket
from typing import NamedTuple

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train V2's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and takes one
# report per worker per poll, and a worker's `ray.train.report` waits in a queue of one until then: a tiny test run
# that validates every 10 steps spends seconds blocked on those polls, and the run's end needs two more. The suite
# polls every 0.5 s: test_finetune.py 204 s -> 172 s back to back; runs with fewer, slower reports gain little. A
# poll that takes longer is awaited in the next round, not counted as a failure (that is
# RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 minutes, unchanged). Set before any Ray starts: local clusters,
# `ray start` heads and job drivers inherit it; Train passes it on to its controller. Users keep Ray's default
# (the README says when to lower it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_env(state_dir: str | None = None) -> dict[str, str]:
    """Settings for the HAProxy of a Ray a test starts, where the environment turns it on (RAY_SERVE_ENABLE_HA_PROXY=1,
    opt-in: docs/serving.md): its stats and Prometheus listeners on free ports (Ray's
    defaults, 8404 and 9101, are one per machine: two test clusters that both serve would collide, and an HAProxy
    orphaned by a killed cluster would break every later one). With state_dir, its config, sockets and state live
    there, so a clean-up that finds a cluster's processes by its temp dir finds HAProxy too."""
    env = {"RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}
    if state_dir is not None:
        base = os.path.join(state_dir, "hap")  # Ray adds the node id: the socket paths stay under 108 characters
        env.update({"RAY_SERVE_HAPROXY_SERVER_STATE_BASE": base,
                    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{base}/server-state",
                    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{base}/haproxy.cfg",
                    "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{base}/admin.sock",
                    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{base}/metrics.sock"})
    return env


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# DeepSpeed picks its accelerator by itself; saying which silences the warning. Compiled ops are cached
# across runs in this environment's folder of `run.torch_extensions_dir` (aigc.train.ops_cache): `make setup`
# builds them (`aigc build-ops`), else the first run that needs one does (~25-35 s each).
os.environ.setdefault("DS_ACCELERATOR", "cuda" if has_cuda() else "cpu")


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray cluster with the 2 CPUs this machine has (never one started by `ray start`)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ.update(haproxy_env())  # read by the Serve processes this cluster starts, which inherit them
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ctx
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(autouse=True)
def _no_leaked_process_group():
    yield
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass


def save_tiny_model_dir(out, n_embd: int = 32):
    """An exported aigc model directory at `out`: tokenizer trained on the embedded corpus, tiny random GPT-2 of
    2 layers and 2 heads, `n_embd` wide."""
    from aigc.config import TinyArch
    from aigc.corpus import sample_ads
    from aigc.modeldir import save_model_dir
    from aigc.modeling import build_tiny_gpt2, train_tokenizer

    texts = [d["text"] for d in sample_ads(300, seed=1)]
    tok = train_tokenizer(texts, vocab_size=300)
    arch = TinyArch(n_layer=2, n_embd=n_embd, n_head=2, vocab_size=300)
    model = build_tiny_gpt2(arch, len(tok), 128, tok.eos_token_id)
    return save_model_dir(model, tok, out, config={"test": True}, metrics={}, step=0)


def save_random_adapter_dir(base, out, seed: int) -> str:
    """An adapter-only directory on `base` with random non-zero adapters (as after training)."""
    import torch

    from aigc.config import FinetuneConfig, load_config
    from aigc.lora import trainable_model
    from aigc.modeldir import load_model, save_adapter_dir

    lm = load_model(base)
    model, _, _ = trainable_model(lm.model, load_config(FinetuneConfig, None, ["model.peft.method=lora"]).model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B starts at zero: the adapter would change nothing
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return str(save_adapter_dir(model, lm.tokenizer, out, base=str(base), merge=False, config={}, metrics={}))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An exported aigc model directory: tokenizer trained on the embedded corpus, tiny random GPT-2."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny")


# The mechanics tests (ZeRO stages, resume, jobs, search, autoscaling, output) run the plain-text path on a random
# tiny GPT-2 built from the config: cheap, and independent of the pre-trained base. The shipped configs fine-tune the
# embedded base on the brief -> ad task; that path is tested with the `embedded_base` fixture below.
TEXT_RANDOM = ["data.format=text", "model.name_or_path=null"]


class EmbeddedBase(NamedTuple):
    path: str  # the cached base's model directory
    overrides: list[str]  # config overrides under which `model.name_or_path: embedded` resolves to `path`


# A pre-training recipe small enough for a test: 2 x 32 wide, 120 steps of 16 x 64-token blocks (~8 s of
# training), 1 worker.
TINY_PRETRAIN = [
    "model.pretrain.arch={n_layer: 2, n_embd: 32, n_head: 2, vocab_size: 400}",
    "model.pretrain.corpus={n_train: 1500, n_validation: 200, n_test: 200, seed: 1}",
    "model.pretrain.block_size=64", "model.pretrain.max_steps=120", "model.pretrain.batch_size=16",
    "model.pretrain.lr=1e-2", "model.pretrain.warmup_steps=5", "model.pretrain.eval_every=40",
    "model.pretrain.num_workers=1",
]


@pytest.fixture(scope="session")
def embedded_base(tmp_path_factory):
    """One pre-trained embedded base for the whole suite, built through `aigc.pretrain.ensure_base` on a private
    local Ray (or the module's, when one is up) into a session cache."""
    import ray

    from aigc.config import FinetuneConfig, load_config
    from aigc.pretrain import ensure_base

    cache = tmp_path_factory.mktemp("bases")
    overrides = ["model.name_or_path=embedded", f"run.base_cache={cache}", *TINY_PRETRAIN]
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        path = ensure_base(load_config(FinetuneConfig, None, overrides))
    finally:
        if started:
            ray.shutdown()
    return EmbeddedBase(path, overrides)


class S3Server(NamedTuple):
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    root: str  # s3://<bucket>: the endpoint and credentials come from the AWS environment the fixture sets


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 protocol server (moto's threaded server) on a loopback port with one bucket, and the standard
    AWS environment pointing at it, set before any Ray cluster starts so Train workers and Serve replicas get it.
    (Ray's own storage tests use this server; MinIO is not installable here.)"""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "aigc-test-key-id",
           "AWS_SECRET_ACCESS_KEY": "aigc-test-secret-value", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="aigc")
    yield S3Server(endpoint, "aigc", "s3://aigc")
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()
