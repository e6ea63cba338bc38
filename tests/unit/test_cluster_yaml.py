"""cluster.yaml: valid against the schema Ray ships, pinned to pyproject's versions, safe by default (a head
without work, only SSH open), and big enough for every shipped job, search and Serve config."""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from aigc.clustercheck import (
    check,
    demand_of,
    fits,
    head_problems,
    images,
    ray_schema_path,
    read_pyproject,
    schema_problems,
    security_problems,
    serve_demand,
    storage_path,
    version_problems,
)
from aigc.config import FinetuneConfig, load_config
from aigc.placement import load_cluster, node_types, place

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster.yaml"
PYPROJECT = ROOT / "pyproject.toml"
GPU_JOBS = sorted((ROOT / "jobs" / "configs").glob("gpt2-*.yaml"))
SEARCHES = sorted((ROOT / "tune" / "configs").glob("*.yaml"))
GPU_SEARCH = ROOT / "tune" / "configs" / "gpt2-gpu.yaml"
SERVE = ROOT / "serve" / "config.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load_cluster(CLUSTER)


@pytest.fixture
def edited(cluster):
    """A deep copy to break on purpose."""
    return copy.deepcopy(cluster)


def worker_types(cluster) -> dict:
    return {n: t for n, t in cluster["available_node_types"].items() if n != cluster["head_node_type"]}


# ------------------------------------------------------------------------------------------- schema


def test_validates_against_the_schema_ray_ships(cluster):
    assert ray_schema_path().is_file()  # the file `ray up` itself validates against
    assert schema_problems(cluster) == []


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda c: c.update(max_workers="two"), r"^max_workers: 'two' is not of type 'integer'"),
        (lambda c: c["available_node_types"]["gpu_serve"]["resources"].update(GPU=0.5),
         r"^available_node_types\.gpu_serve\.resources\.GPU: 0\.5 is not of type 'integer'"),
        (lambda c: c["available_node_types"]["gpu_train_4x"].pop("node_config"),
         r"^available_node_types\.gpu_train_4x: 'node_config' is a required property"),
        (lambda c: c.update(idle_timeout="10m"), r"^<top level>: Additional properties are not allowed \('idle_timeout'"),
        (lambda c: c["provider"]["security_group"].update(Port=8265),
         r"^provider\.security_group: Additional properties are not allowed \('Port'"),
        (lambda c: c.update(head_node_type="missing"), r"^ray validate_config: ValueError: `head_node_type` must be one of"),
    ],
    ids=["max_workers-type", "fractional-gpu", "no-node-config", "unknown-key", "sg-unknown-key", "head-type"],
)
def test_a_broken_copy_is_rejected_with_the_key_named(edited, break_it, expected):
    break_it(edited)
    problems = schema_problems(edited)
    assert len(problems) == 1, problems
    assert re.search(expected, problems[0]), problems[0]


def test_every_schema_problem_is_listed_at_once(edited):
    edited["max_workers"] = "two"
    edited["upscaling_speed"] = "fast"
    edited["available_node_types"]["gpu_serve"]["min_workers"] = -0.5
    problems = schema_problems(edited)
    assert [p.split(":")[0] for p in problems] == [
        "available_node_types.gpu_serve.min_workers", "max_workers", "upscaling_speed"]


# ----------------------------------------------------------------------------------------- versions


def test_image_pins_the_ray_and_python_of_pyproject(cluster):
    import ray

    assert version_problems(cluster, PYPROJECT) == []
    (img,) = images(cluster)  # one image for every node
    assert img.ray == ray.__version__  # the laptop's `ray job submit` speaks the cluster's version
    project = read_pyproject(PYPROJECT)["project"]
    assert f"ray[train,tune,serve]>={'.'.join(img.ray.split('.')[:2])}" in project["dependencies"][0]
    assert img.platform == "gpu" or re.fullmatch(r"cu\d+", img.platform)


@pytest.mark.parametrize(
    "image, expected",
    [
        ("rayproject/ray:2.59.0-py311-gpu", ["Ray 2.59.0 in 'rayproject/ray:2.59.0-py311-gpu' is outside"]),
        ("rayproject/ray:2.60.0-py39-gpu", ["Python 3.9 in 'rayproject/ray:2.60.0-py39-gpu' is outside"]),
        ("rayproject/ray:latest-gpu", ["does not pin a Ray version and a Python version"]),
        ("rayproject/ray:2.60.0-py311-cpu", ["gpu_serve: has GPUs but runs", "gpu_train_4x: has GPUs",
                                             "gpu_train_8x: has GPUs"]),
    ],
)
def test_version_drift_is_reported(edited, image, expected):
    edited["docker"]["image"] = image
    problems = version_problems(edited, PYPROJECT)
    assert len(problems) == len(expected), problems
    for p, e in zip(problems, expected, strict=True):
        assert e in p


# ------------------------------------------------------------------------------------------- safety


def test_head_holds_no_work_and_workers_hold_the_gpus(cluster):
    assert head_problems(cluster) == []
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert all(t["resources"].get("GPU", 0) >= 1 for t in worker_types(cluster).values())


def test_a_head_with_cpus_or_gpus_is_reported(edited):
    edited["available_node_types"]["head"]["resources"] = {"CPU": 8, "GPU": 1}
    problems = head_problems(edited)
    assert len(problems) == 2 and "CPU: 8 lets work land on the head" in problems[0] and "GPU" in problems[1]
    edited["available_node_types"]["head"]["resources"] = {}
    assert "set CPU: 0" in head_problems(edited)[0]


def test_only_ssh_is_reachable_and_the_dashboard_binds_to_loopback(cluster):
    assert security_problems(cluster) == []
    assert cluster["provider"]["security_group"]["IpPermissions"] == []  # Ray adds SSH + intra-cluster itself
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in " ".join(cluster["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in cluster["file_mounts"]  # every node gets the client's token


def test_an_exposed_dashboard_is_reported(edited):
    edited["provider"]["security_group"]["IpPermissions"] = [
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "203.0.113.7/32"}]},
    ]
    edited["head_start_ray_commands"] = [c.replace("127.0.0.1", "0.0.0.0") for c in edited["head_start_ray_commands"]]
    edited["docker"]["run_options"] = ["-p 8000:8000"]
    problems = security_problems(edited)
    assert len(problems) == 3, problems
    assert "IpPermissions[0]: opens ports 8265-8265" in problems[0] and "dashboard/job server" in problems[0]
    assert "must bind to 127.0.0.1, got 0.0.0.0" in problems[1]
    assert "publishes a port" in problems[2]


# ------------------------------------------------------------------------------- setup, storage, scaling


def test_every_node_boots_a_current_gpu_driver_ami(cluster):
    """Without ImageId Ray launches its built-in default (Ubuntu 18.04, a CUDA 11.2 driver), which cannot run
    the CUDA 12 image."""
    for name, t in cluster["available_node_types"].items():
        assert re.fullmatch(r"resolve:ssm:/aws/service/deeplearning/ami/x86_64/[\w.-]*nvidia-driver[\w.-]*/latest/ami-id"
                            r"|ami-[0-9a-f]+", t["node_config"].get("ImageId", "")), name


def test_setup_installs_the_synced_project(cluster):
    remote = next(r for r, local in cluster["file_mounts"].items() if local in (".", "./"))
    assert any(re.search(rf"pip install .*-e {re.escape(remote)}\b", c) for c in cluster["setup_commands"])
    assert ".gitignore" in cluster["rsync_filter"]  # .venv and runs/ never leave the laptop
    # DeepSpeed's ops built after the install, in the same environment, and a failed build never fails the node
    pip = next(i for i, c in enumerate(cluster["setup_commands"]) if re.search(r"pip install .*-e ", c))
    ops = [i for i, c in enumerate(cluster["setup_commands"]) if re.match(r"aigc build-ops\b", c)]
    assert ops and ops[0] > pip and "||" in cluster["setup_commands"][ops[0]]


def test_storage_is_the_shared_folder_that_the_gpu_jobs_use(cluster):
    uri = storage_path(cluster)
    assert uri and uri.startswith("/mnt/shared/")
    assert GPU_JOBS, "no GPU job config shipped (jobs/configs/gpt2-*.yaml)"
    for path in GPU_JOBS:
        assert load_config(FinetuneConfig, path).run.storage_path == uri, path


def test_every_worker_type_scales_to_zero_within_the_global_cap(cluster):
    types = worker_types(cluster)
    assert 0 < cluster["idle_timeout_minutes"] <= 30
    assert all(t["min_workers"] == 0 < t["max_workers"] for t in types.values())
    assert sum(t["max_workers"] for t in types.values()) <= cluster["max_workers"]
    assert {"gpu_serve", "gpu_train_4x", "gpu_train_8x"} <= set(types)
    assert types["gpu_serve"]["resources"]["GPU"] == 1 and types["gpu_train_4x"]["resources"]["GPU"] == 4


# ----------------------------------------------------------------------------------------- capacity


@pytest.mark.parametrize("path", GPU_JOBS, ids=[p.stem for p in GPU_JOBS])
def test_each_gpu_job_fits_and_leaves_no_gpu_idle(cluster, path):
    """The nodes Ray's bin-packing launches for a GPU job hold exactly its GPUs (none paid for and idle)."""
    cfg = load_config(FinetuneConfig, path)
    types = node_types(cluster)
    assert cfg.scaling.use_gpu
    assert fits(cfg, types, cluster["max_workers"], str(path)) == []
    plan = place(demand_of(path).bundles, types, cluster["max_workers"])
    assert plan.unplaced == []
    launched = sum(types[t].resources["GPU"] * n for t, n in plan.nodes.items())
    assert launched == cfg.scaling.num_workers * cfg.scaling.gpus_per_worker, plan.nodes


def test_placement_is_rays_own_choice(cluster):
    """The node types `ray up`'s autoscaler would launch, by its utilisation scorer (cluster.yaml's comments)."""
    types, cap = node_types(cluster), cluster["max_workers"]
    assert place([{"CPU": 4, "GPU": 1}] * 4, types, cap).nodes == {"gpu_train_4x": 1}  # gpt2-zero2: one 4x node
    assert place([{"CPU": 6, "GPU": 1}] * 8, types, cap).nodes == {"gpu_train_4x": 2}  # gpt2-xl: two 4x
    assert place([{"CPU": 7, "GPU": 1}] * 8, types, cap).nodes == {"gpu_train_8x": 1}  # >= 7 CPUs: one 8x
    trial = [{"CPU": 0.02}, {"CPU": 3, "GPU": 1}, {"CPU": 3, "GPU": 1}]  # tune/configs/gpt2-gpu.yaml
    assert place(trial, types, cap).nodes == {"gpu_train_4x": 1}
    assert place(trial * 4, types, cap).nodes == {"gpu_train_4x": 2}  # 4 trials at once: 8 GPUs
    assert place([{"CPU": 1, "GPU": 1}] * 4, types, cap).nodes == {"gpu_serve": 4}  # GPU replicas: 1 per node
    assert place([{"CPU": 1}] * 3, types, cap).nodes == {"gpu_serve": 2}  # CPU work never lands on the head
    with_room = dict(types, head=replace(types["head"], resources={"CPU": 2}))
    assert place([{"CPU": 1}] * 3, with_room, cap).nodes == {"gpu_serve": 1}  # 2 on the head, 1 on a worker
    assert place([{"CPU": 1}] * 2, with_room, cap).nodes == {}


def test_no_gpu_training_lands_on_the_serving_type(cluster):
    """gpu_serve declares 2 CPUs: less than any shipped Train worker asks for, so a run's ranks are never
    spread over single-GPU nodes (and over the network)."""
    types = node_types(cluster)
    for path in [*GPU_JOBS, *([GPU_SEARCH] if GPU_SEARCH.is_file() else [])]:
        demand = demand_of(path)
        assert min(b["CPU"] for b in demand.bundles if b.get("GPU")) > types["gpu_serve"].resources["CPU"], path
        assert "gpu_serve" not in place(demand.bundles, types, cluster["max_workers"]).nodes, path


@pytest.mark.parametrize("path", SEARCHES, ids=[p.stem for p in SEARCHES])
def test_each_search_config_fits(cluster, path):
    """At least one trial (or search.max_concurrent of them) can be placed: trial actor + Train workers."""
    demand = demand_of(path)
    assert len(demand.bundles) >= 2 and demand.bundles[0]["CPU"] < 0.1  # the trial's actor, then its workers
    assert fits(demand, node_types(cluster), cluster["max_workers"]) == []


def test_the_gpu_search_config_fits(cluster):
    if not GPU_SEARCH.is_file():
        pytest.skip(f"{GPU_SEARCH.relative_to(ROOT)} is not shipped (yet): nothing to check")
    demand = demand_of(GPU_SEARCH)
    assert any(b.get("GPU") for b in demand.bundles)
    assert fits(demand, node_types(cluster), cluster["max_workers"]) == []


def test_the_serve_config_fits_as_shipped_and_on_gpus(cluster):
    if not SERVE.is_file():
        pytest.skip("serve/config.yaml is not shipped (yet): nothing to check")
    types = node_types(cluster)
    assert fits(demand_of(SERVE), types, cluster["max_workers"]) == []
    # The GPU variant its comment prescribes (num_gpus: 1): one replica per gpu_serve node, up to max_replicas.
    raw = yaml.safe_load(SERVE.read_text())
    dep = raw["applications"][0]["deployments"][0]
    dep["ray_actor_options"]["num_gpus"] = 1
    demand = serve_demand(raw, "serve/config.yaml with num_gpus: 1")
    n = dep["autoscaling_config"]["max_replicas"]
    assert len(demand.bundles) == n and all(b["GPU"] == 1 for b in demand.bundles)
    plan = place(demand.bundles, types, cluster["max_workers"])
    assert plan.nodes == {"gpu_serve": n} and plan.unplaced == []


def test_what_does_not_fit_is_reported_with_what_the_types_offer(cluster):
    types = node_types(cluster)
    too_many = FinetuneConfig.model_validate({"scaling": {"num_workers": 32, "use_gpu": True, "cpus_per_worker": 4}})
    (problem,) = fits(too_many, types, cluster["max_workers"], "big.yaml")
    # gpu_serve's 2 CPUs hold none of these; 2 x 4 + 1 x 8 = 16 GPUs: 16 of the 32 workers stay unplaced
    assert problem.startswith("big.yaml: 32 Train workers: 16 x {CPU: 4, GPU: 1} cannot be placed")
    assert "gpu_train_8x {CPU: 192, GPU: 8} x1" in problem
    fat = FinetuneConfig.model_validate({"scaling": {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 64,
                                                     "gpus_per_worker": 2}})
    assert fits(fat, types) == []  # 64 CPUs and 2 GPUs on one worker: only the 8x node has both
    assert place([{"CPU": 64, "GPU": 2}], types).nodes == {"gpu_train_8x": 1}
    assert fits({"applications": [{"name": "x", "import_path": "m:app", "deployments": [
        {"name": "D", "num_replicas": 1, "ray_actor_options": {"num_cpus": 1, "resources": {"TPU": 1}}}]}]}, types)


def test_the_whole_check_passes_and_names_its_file(tmp_path, cluster):
    assert check(CLUSTER) == []
    bad = dict(copy.deepcopy(cluster), max_workers=1)
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(bad))
    (tmp_path / "pyproject.toml").write_text(PYPROJECT.read_text())
    problems = check(tmp_path / "cluster.yaml", GPU_JOBS)
    # one worker node in all: the 8-rank job's first 4x node holds 4 workers, the other 4 have nowhere to go
    # (Ray's scorer chose 4x, and the cap forbids the second node)
    assert len(problems) == 1, problems
    assert "gpt2-xl-zero3-offload.yaml: 8 Train workers: 4 x {CPU: 6, GPU: 1} cannot be placed" in problems[0]
    assert "(cluster max_workers=1)" in problems[0]
