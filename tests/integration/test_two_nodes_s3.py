"""Two Ray nodes and no shared run folder: a head and a second node (`ray.cluster_utils.Cluster`, two raylets on
this machine, as Ray's own multi-node tests run them), a 2-worker ZeRO-3 fine-tune with one worker on each node
(each worker asks for a whole node's CPUs) and the run stored on the S3 server. Each rank uploads its own shards,
so the checkpoint in the bucket holds both; the export consolidates them from the bucket; killing the second
node's worker restarts the group from the bucket's checkpoint."""

from __future__ import annotations

import os

import psutil
import pytest
from test_finetune import kill_after_first_report, tiny_cfg

from aigc import storage
from aigc.config import run_dir_of
from aigc.finetune import read_metrics_log, run_finetune
from aigc.modeldir import verify_model_dir
from aigc.train import CKPT_TAG

pytestmark = pytest.mark.integration
CPUS_PER_NODE = 2


@pytest.fixture(scope="module")
def two_nodes(s3_server):
    """The cluster, connected, after the S3 environment is set (both nodes' workers inherit it)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    mp = pytest.MonkeyPatch()
    mp.delenv("RAY_ADDRESS", raising=False)
    cluster = Cluster(initialize_head=True, shutdown_at_exit=False,
                      head_node_args={"num_cpus": CPUS_PER_NODE, "include_dashboard": False})
    second = cluster.add_node(num_cpus=CPUS_PER_NODE)
    try:
        ray.init(address=cluster.address, log_to_driver=True)
        cluster.wait_for_nodes()
        yield cluster.head_node, second
    finally:
        ray.shutdown()
        cluster.shutdown()  # its own nodes' processes only (never `ray stop`)
        mp.undo()


def train_workers(node) -> list[psutil.Process]:
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    return [p for p in raylet.children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]


def test_zero3_across_two_nodes_on_s3_checkpoints_both_ranks_and_resumes_after_a_node_loses_its_worker(
        two_nodes, s3_server, tmp_path):
    head, second = two_nodes
    steps = 20
    cfg = tiny_cfg(tmp_path, "two-nodes", f"run.storage_path={s3_server.root}/two-nodes", "zero.stage=3",
                   "zero.param_persistence_threshold=0", f"scaling.cpus_per_worker={CPUS_PER_NODE}",
                   "scaling.max_failures=2", f"optim.max_steps={steps}", "eval.every_steps=5", "run.evaluate=false",
                   "run.samples=0", "tracking.enabled=false")
    seen: dict[str, int] = {}

    def the_second_nodes_worker():  # once both nodes hold a rank
        on_head, on_second = train_workers(head), train_workers(second)
        if not (on_head and on_second):
            return None
        seen.update(head=len(on_head), second=len(on_second))
        return on_second[0]

    killer, killed = kill_after_first_report(run_dir_of(cfg), the_second_nodes_worker)
    result = run_finetune(cfg)
    killer.join(timeout=5)

    assert killed and seen == {"head": 1, "second": 1}  # one rank on each node, and the second's was killed
    log = read_metrics_log(result.run_dir)
    done = [r["step"] for r in log]
    assert done == sorted(done) and done[0] == 5 and done[-1] == steps  # resumed from a checkpoint, not step 0
    loc = f"{s3_server.root}/two-nodes/two-nodes"
    ckpt = storage.join(loc, os.path.basename(log[-1]["checkpoint"]), CKPT_TAG)
    shards = storage.listdir(ckpt)
    for rank in (0, 1):  # each node uploaded its own rank's parameter and optimizer shards
        assert {f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
                f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"} <= set(shards), shards
    meta = verify_model_dir(result.final_dir)  # consolidated from both ranks' shards in the bucket
    assert meta["step"] == steps and log[-1]["val_loss"] < log[0]["val_loss"]
    assert set(storage.published_files(f"{loc}/final")) >= {"model.safetensors"}
