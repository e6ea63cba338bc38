"""Cluster autoscaling on one machine: the autoscaler adds nodes for work that does not fit, and removes them.

Ray's fake multi-node provider (the one behind `ray.cluster_utils.AutoscalingCluster`) runs the real
autoscaler; its "nodes" are raylets on this machine. The worker types mirror cluster.yaml's, scaled down: a
type with N GPUs becomes N logical CPUs and N logical GPUs (Ray schedules GPUs as numbers; the CPU build
of torch sees none, so code on a "GPU" node runs on the CPU). The head offers 1 CPU and no GPU.

1. A real fine-tune (`run_finetune`) whose 2 Train workers ask for 2 CPUs each: nothing running can hold
   them, so the autoscaler adds a gpu_train_4x node, the Train placement group lands on it, the job
   finishes with its model exported, and the node is removed once idle.
2. The Serve app with one GPU per replica (the GPU-cluster setting of serve/config.yaml): the first replica
   brings up a gpu_serve node, load makes Serve add a replica, which brings up a second node; when the load
   stops the replica and its node go away.

`AutoscalingCluster` itself is not used: its start() and shutdown() run `ray stop --force`, which would kill
every Ray process on the machine (other test sessions' clusters too), and its constructor reads an
example.yaml the Ray wheel does not ship. `FakeAutoscalingCluster` below starts the same thing with
`ray start --head --block` in a private temp dir on free ports and stops only the processes it started.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from private_head import own_processes, stop_private_head

from aigc.placement import NodeType, load_cluster, node_types, place
from conftest import TEXT_RANDOM, free_port, haproxy_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HEAD = {"CPU": 1}
IDLE_TIMEOUT_MINUTES = 0.1  # 6 s: removal is observed within the test (cluster.yaml: 10 min)
OBJECT_STORE = 100 * 2**20  # per fake node; all of them share this machine's /dev/shm


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """Poll until predicate() is truthy (returned) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def fake_worker_types(cluster: dict, max_per_type: int = 2) -> dict[str, dict]:
    """cluster.yaml's worker types for the fake provider: N GPUs -> {CPU: N, GPU: N}; same min/max workers
    (max capped: no test needs more)."""
    out = {}
    for t in node_types(cluster).values():
        if t.is_head:
            continue
        gpus = int(t.resources["GPU"])
        out[t.name] = {"resources": {"CPU": gpus, "GPU": gpus, "object_store_memory": OBJECT_STORE},
                       "node_config": {}, "min_workers": t.min_workers, "max_workers": min(t.max_workers, max_per_type)}
    return out


class FakeAutoscalingCluster:
    """A head with the fake multi-node provider's autoscaler, isolated from any other Ray on the machine:
    its own temp dir (so `ray.init()` elsewhere never finds it), free ports, explicit address."""

    def __init__(self, head: dict[str, float], workers: dict[str, dict], idle_timeout_minutes: float):
        self.head, self.workers = dict(head), workers
        self.idle_timeout_minutes = idle_timeout_minutes
        self.temp = tempfile.mkdtemp(prefix="aigc-as-", dir="/tmp")  # short: socket paths < 108 chars
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def config(self, gcs_address: str) -> dict:
        return {
            "cluster_name": "aigc-fake", "max_workers": sum(w["max_workers"] for w in self.workers.values()),
            "upscaling_speed": 1.0, "idle_timeout_minutes": self.idle_timeout_minutes,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": gcs_address},
            "available_node_types": {**self.workers,
                                     "ray.head.default": {"resources": self.head, "node_config": {}, "max_workers": 0}},
            "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
            "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
            "rsync_filter": [], "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }

    def start(self, timeout: float = 180) -> str:
        import ray
        from ray._raylet import AuthenticationMode, get_authentication_mode

        port = free_port()
        self.address = f"{ray._private.services.get_node_ip_address()}:{port}"
        path = Path(self.temp) / "autoscaling.json"
        path.write_text(json.dumps(self.config(self.address)))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update({
            "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "PATH": f"{BIN}:{env.get('PATH', '')}",
            # the cluster must speak the auth mode this process will connect with
            "RAY_AUTH_MODE": "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled",
            **haproxy_env(self.temp),
        })
        cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--temp-dir={self.temp}",
               f"--autoscaling-config={path}", f"--num-cpus={self.head.get('CPU', 0)}", "--num-gpus=0",
               f"--object-store-memory={OBJECT_STORE}", "--include-dashboard=false", "--disable-usage-stats",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
        log = open(Path(self.temp) / "head.log", "w")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        address_file = Path(self.temp) / "ray_current_cluster"  # written once the head is up
        deadline = time.monotonic() + timeout
        while not address_file.is_file():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fake cluster head did not start:\n{(Path(self.temp) / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        return self.address

    def shutdown(self) -> None:
        if self.proc is not None:
            stop_private_head(self.proc, self.temp)
        else:
            shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    return load_cluster(ROOT / "cluster.yaml")


@pytest.fixture(scope="module")
def fake_cluster(cluster_yaml):
    """The fake autoscaling cluster, connected; yields the worker types by GPU count."""
    import ray

    workers = fake_worker_types(cluster_yaml)
    by_gpus = {w["resources"]["GPU"]: name for name, w in workers.items()}
    assert len(by_gpus) == len(workers), "worker types must differ in GPUs to be told apart"
    if ray.is_initialized():
        ray.shutdown()
    mp = pytest.MonkeyPatch()
    mp.delenv("RAY_ADDRESS", raising=False)  # it would override the explicit address below
    cluster = FakeAutoscalingCluster(HEAD, workers, IDLE_TIMEOUT_MINUTES)
    try:
        address = cluster.start()
        ray.init(address=address, log_to_driver=False)
        yield {"types": workers, "by_gpus": by_gpus, "head": ray.get_runtime_context().get_node_id()}
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        cluster.shutdown()
        mp.undo()
    assert own_processes(cluster.temp) == []  # nothing of ours is left running


def worker_nodes(ctx) -> list[tuple[str, str]]:
    """(node id, worker type) of every alive node but the head."""
    import ray

    return sorted((n["NodeID"], ctx["by_gpus"][n["Resources"].get("GPU", 0)])
                  for n in ray.nodes() if n["Alive"] and n["NodeID"] != ctx["head"])


class Watcher:
    """Samples the alive worker nodes and the placement groups' nodes in the background."""

    def __init__(self, ctx, interval: float = 0.5):
        self.ctx, self.interval = ctx, interval
        self.seen: dict[str, str] = {}  # node id -> type, every worker node ever alive
        self.peak = 0
        self.pg_nodes: set[str] = set()  # nodes that held a bundle of a created placement group
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import ray

        while not self.stop.is_set():
            try:
                nodes = worker_nodes(self.ctx)
                self.seen.update(nodes)
                self.peak = max(self.peak, len(nodes))
                for pg in ray.util.placement_group_table().values():
                    if pg.get("state") == "CREATED":
                        self.pg_nodes.update(pg.get("bundles_to_node_id", {}).values())
            except Exception:
                pass  # a sample lost while a node comes or goes
            self.stop.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)


def test_finetune_that_outgrows_the_head_adds_a_node_finishes_and_the_node_goes_away(fake_cluster, tmp_path):
    import ray

    from aigc.config import FinetuneConfig, load_config
    from aigc.finetune import run_finetune
    from aigc.modeldir import verify_model_dir

    cfg = load_config(FinetuneConfig, ROOT / "jobs" / "configs" / "tiny-cpu.yaml", [
        f"run.storage_path={tmp_path}", "run.name=autoscale", "run.evaluate=false", "run.samples=0",
        "data.embedded.n_train=600", "data.embedded.n_validation=80", "data.embedded.n_test=80",
        "data.block_size=64", "model.arch.n_embd=32", "model.arch.vocab_size=300",
        "optim.max_steps=6", "optim.warmup_steps=1", "optim.micro_batch_size=4", "eval.every_steps=3",
        "eval.max_batches=2", "eval.patience=null", "scaling.num_workers=2", "scaling.cpus_per_worker=2", *TEXT_RANDOM,
    ])
    types = {name: NodeType(name, w["resources"], w["min_workers"], w["max_workers"])
             for name, w in fake_cluster["types"].items()}
    types["head"] = NodeType("head", HEAD, is_head=True)
    # 2 workers x {CPU: 2}: not the head (1 CPU), not gpu_serve (1 CPU); Ray's bin-packing says gpu_train_4x
    assert place([{"CPU": 2}] * 2, types).nodes == {"gpu_train_4x": 1}
    assert worker_nodes(fake_cluster) == []

    t0 = time.monotonic()
    with Watcher(fake_cluster) as w:
        result = run_finetune(cfg)
        took = time.monotonic() - t0
        train_nodes = {n for n, t in w.seen.items() if t == "gpu_train_4x"}
    print(f"fine-tune on the autoscaled node took {took:.0f} s; worker nodes seen: {w.seen}")

    # the autoscaler added a gpu_train_4x node and the Train workers ran there
    assert len(train_nodes) == 1, w.seen
    assert w.pg_nodes & train_nodes, (w.pg_nodes, train_nodes)
    # the job finished: every step trained, both model directories exported and loadable
    assert result.metrics["step"] == cfg.optim.max_steps
    assert math.isfinite(result.best_metrics["val_loss"])
    for d in (result.best_dir, result.final_dir):
        verify_model_dir(d)
    # and once idle, the node is removed (idle timeout 6 s + an autoscaler round or two)
    t1 = time.monotonic()
    wait_for(lambda: worker_nodes(fake_cluster) == [], 120, "the idle worker nodes to be removed")
    print(f"worker nodes removed {time.monotonic() - t1:.0f} s after the job returned")
    dead = {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
    assert train_nodes <= dead


def _serve_args(model_dir: str) -> dict:
    """serve/config.yaml's app args and deployment options, on a GPU per replica (as on the GPU cluster),
    with the autoscaling delays shortened so a scale-up and a scale-down fit in the test."""
    shipped = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"][0]
    dep = shipped["deployments"][0]
    args = dict(shipped["args"], model_dir=model_dir, model_name="tiny", api_keys_env=None)
    args.update(num_cpus=1, num_gpus=1, max_ongoing_requests=8, graceful_shutdown_timeout_s=5,
                health_check_period_s=2, batching={"max_batch_size": 4})
    assert dep["ray_actor_options"]["num_cpus"] == args["num_cpus"]  # only the GPU differs from what ships
    args["autoscaling"] = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                           "upscale_delay_s": 1, "downscale_delay_s": 3, "look_back_period_s": 2,
                           "metrics_interval_s": 0.5}
    return args


def _replicas() -> Counter:
    from ray import serve

    st = serve.status().applications["aigc"].deployments["Model"]
    return Counter({str(k): v for k, v in st.replica_states.items()})


def test_serve_replicas_scaling_up_under_load_add_a_node(fake_cluster, tiny_model_dir):
    from ray import serve

    from aigc.serving.app import build_app

    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    app = build_app(_serve_args(str(tiny_model_dir)))
    assert worker_nodes(fake_cluster) == []
    t0 = time.monotonic()
    with ThreadPoolExecutor(1) as pool:  # serve.run waits for the first replica, i.e. for its node
        pool.submit(serve.run, app, name="aigc", route_prefix="/").result(timeout=240)
    print(f"first replica up on a new node after {time.monotonic() - t0:.0f} s")
    assert [t for _, t in worker_nodes(fake_cluster)] == ["gpu_serve"]
    assert _replicas() == Counter(RUNNING=1)

    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"model": "tiny", "prompt": "Introducing the", "max_tokens": 48, "temperature": 0}
    stop, codes = threading.Event(), Counter()

    def load():
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    codes[s.post(url, json=body, timeout=60).status_code] += 1
                except requests.RequestException:
                    codes["error"] += 1

    threads = [threading.Thread(target=load, daemon=True) for _ in range(8)]  # 8 ongoing > 1 x target 2
    t1 = time.monotonic()
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(worker_nodes(fake_cluster)) == 2, 180, "load to bring up a second node")
        assert [t for _, t in worker_nodes(fake_cluster)] == ["gpu_serve", "gpu_serve"]
        wait_for(lambda: _replicas() == Counter(RUNNING=2), 120, "the second replica to run on it")
        print(f"under load: 2 replicas on 2 gpu_serve nodes after {time.monotonic() - t1:.0f} s")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
    assert codes[200] > 0 and set(codes) == {200}, codes

    t2 = time.monotonic()
    wait_for(lambda: _replicas() == Counter(RUNNING=1), 120, "Serve to drop the extra replica")
    wait_for(lambda: len(worker_nodes(fake_cluster)) == 1, 120, "its idle node to be removed")
    print(f"load gone: back to 1 replica on 1 node after {time.monotonic() - t2:.0f} s")
    serve.delete("aigc")
    wait_for(lambda: worker_nodes(fake_cluster) == [], 120, "the last serving node to be removed")
