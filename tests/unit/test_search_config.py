"""Search config, concurrency arithmetic and the report builder: fast, no Ray cluster."""

from __future__ import annotations

import csv
import json
import math
import zlib
from pathlib import Path

import pytest
import yaml

from aigc.config import ConfigError, load_config
from aigc.placement import (
    NodeType,
    autoscaler_node_types,
    bin_pack,
    cluster_capacity,
    fitting_trials,
    trial_bundles,
    trial_resources,
    worker_bundle,
)
from aigc.report import FILES, render
from aigc.report_data import SearchData, TrialRecord, importance, load_search, spearman
from aigc.report_plots import PLOTS
from aigc.search import check_batch_sizes, check_resume, plan_concurrency, tune_space
from aigc.search_config import SearchConfig, check_algorithm, search_dir_of, total_trials
from aigc.trial import ended_before, trial_config
from aigc.tuning import searcher

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "tune" / "configs").glob("*.yaml"))
TINY = ROOT / "tune" / "configs" / "tiny-cpu.yaml"
# The expected messages below name numbers: pin the trial length they follow from (60 steps, validated every 10 =
# 6 rounds, 5 warmup steps) rather than the shipped config's, which is sized for the task.
ROUNDS_6 = ["base.optim.max_steps=60", "base.eval.every_steps=10", "base.optim.warmup_steps=5"]


# ------------------------------------------------------------------------------------------- config


def test_both_shipped_configs_are_there():
    assert {p.name for p in SHIPPED} >= {"tiny-cpu.yaml", "gpt2-gpu.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_search_config_validates(path):
    cfg = load_config(SearchConfig, path)
    assert cfg.space.searched(), "a shipped search searches something"
    assert total_trials(cfg) >= 4


def test_tiny_config_fits_two_cores_two_at_a_time():
    cfg = load_config(SearchConfig, TINY)
    assert total_trials(cfg) == 4
    assert fitting_trials([{"CPU": 2.0}], cfg.base.scaling) == 2
    assert plan_concurrency(cfg, [{"CPU": 2.0}]) == 2
    assert cfg.search.asha.enabled and not cfg.base.scaling.use_gpu


def test_gpt2_config_is_gpt2_on_gpus_zero2_bf16():
    cfg = load_config(SearchConfig, ROOT / "tune" / "configs" / "gpt2-gpu.yaml")
    b = cfg.base
    assert b.model.name_or_path == "gpt2"
    assert b.scaling.use_gpu and b.zero.stage == 2 and b.optim.precision == "bf16"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["space.lr.low=0.1", "space.lr.high=0.01"], "space.lr.low: must be below space.lr.high"),
        (["space.lr.low=0.01", "space.lr.high=0.01"], "space.lr.low: must be below space.lr.high"),
        (["space.lr.low=0"], "space.lr.low: a log-uniform range needs low > 0"),
        (["space.lr.low=-1e-3"], "space.lr.low: a log-uniform range needs low > 0"),
        (["space.lr.high=2.0"], "space.lr.high: 2.0 is outside what optim.lr accepts"),
        (["space.weight_decay={kind: loguniform, low: 0, high: 0.1}"], "space.weight_decay.low: a log-uniform"),
        (["space.weight_decay.values=[0.0, -0.1]"], "space.weight_decay.values[1]"),
        (["space.weight_decay.values=[]"], "space.weight_decay.values: a choice needs at least one value"),
        (["space.dropout.high=1.0"], "space.dropout.high: 1.0 is outside what model.dropout accepts"),
        (["space.dropout.low=0.3"], "space.dropout.low: must be below space.dropout.high"),
        (["space.dropout.kind=loguniform"], "space.dropout.kind: 'loguniform' is not allowed"),
        (["space.lr.kind=choice"], "space.lr.values: a choice needs at least one value"),
        (["space.warmup_steps={kind: choice, values: [0, 60]}"], "space.warmup_steps.values[1]: 60 warmup steps"),
        (["space.micro_batch_size={kind: choice, values: [2.5]}"], "space.micro_batch_size.values[0]: micro_batch_size"),
        (["space.micro_batch_size={kind: uniform, low: 1, high: 8}"], "space.micro_batch_size.kind"),
        (["space.momentum={kind: uniform, low: 0, high: 1}"], "space.momentum: unknown key"),
        (["space.lr.scale=log"], "space.lr.scale: unknown key"),
        (["search.asha.grace_period=6"], "search.asha.grace_period: 6 rounds leaves ASHA nothing to stop"),
        (["search.asha.max_t=7"], "search.asha.max_t: 7 rounds > the 6 validation rounds"),
        (["search.asha.reduction_factor=1"], "search.asha.reduction_factor"),
        (["search.algorithm=bayes"], "search.algorithm"),
        (["search.storage_path=abfs://bucket/x"], "search.storage_path: abfs://bucket/x: no filesystem for the abfs:// scheme (install adlfs)"),
        (["base.optim.warmup_steps=100"], "base.optim.warmup_steps: must be below optim.max_steps"),
        (["base.optim.lr=0"], "base.optim.lr"),
        (["space.lr=null", "space.weight_decay=null", "space.dropout=null"], "space: no hyperparameter is searched"),
    ],
)
def test_invalid_search_rejected_with_full_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(SearchConfig, TINY, [*ROUNDS_6, *overrides])
    assert any(p.startswith(key) for p in e.value.problems), e.value.problems


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(SearchConfig, TINY, [*ROUNDS_6, "space.lr.low=0.1", "space.lr.high=0.01", "space.dropout.high=1.5",
                                         "base.optim.warmup_steps=100"])
    keys = {p.split(":")[0] for p in e.value.problems}
    assert keys >= {"space.lr.low", "space.dropout.high", "base.optim.warmup_steps"}


def test_weight_decay_may_include_zero_as_a_choice():
    cfg = load_config(SearchConfig, TINY, ["space.weight_decay.values=[0, 1.0e-3, 0.1]"])
    assert cfg.space.weight_decay.candidates() == [0.0, 1e-3, 0.1]


def test_invalid_range_rejected_before_ray_starts(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tune_search_entry", ROOT / "tune" / "search.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--config", str(TINY), "space.lr.low=0.1", "space.lr.high=0.01"])
    assert rc == 2
    assert "space.lr.low" in capsys.readouterr().err
    import ray

    assert not ray.is_initialized()


# ------------------------------------------------------------------------------------ trial config


def test_trial_config_sets_the_sampled_values_and_names_the_run(tmp_path):
    cfg = load_config(SearchConfig, TINY, [f"search.storage_path={tmp_path}", "search.name=s",
                                           "space.micro_batch_size={kind: choice, values: [4, 8]}"])
    t = trial_config(cfg, {"lr": 1.5e-3, "weight_decay": 0.0, "dropout": 0.05, "micro_batch_size": 4.0}, "ab12_00003")
    assert (t.optim.lr, t.optim.weight_decay, t.model.dropout) == (1.5e-3, 0.0, 0.05)
    assert t.optim.micro_batch_size == 4 and isinstance(t.optim.micro_batch_size, int)
    assert t.run.name == "trial-ab12_00003"
    assert Path(t.run.storage_path) == search_dir_of(cfg) / "trials" == tmp_path / "s" / "trials"
    assert t.run.evaluate is False and t.run.samples == 0
    assert t.optim.max_steps == cfg.base.optim.max_steps  # everything else comes from base


def test_grid_space_is_the_product_of_the_candidates():
    cfg = load_config(SearchConfig, TINY, ["search.algorithm=grid", "search.num_samples=1",
                                           "space.lr={kind: loguniform, low: 1.0e-4, high: 1.0e-2, grid_points: 3}"])
    space = tune_space(cfg)
    assert space["lr"] == {"grid_search": pytest.approx([1e-4, 1e-3, 1e-2])}
    assert space["weight_decay"] == {"grid_search": [0.0, 0.01, 0.1]}
    assert len(space["dropout"]["grid_search"]) == 3
    assert total_trials(cfg) == 27


def test_random_space_uses_log_and_uniform_domains():
    from ray.tune.search.sample import Categorical, Float

    cfg = load_config(SearchConfig, TINY)
    space = tune_space(cfg)
    assert isinstance(space["lr"], Float) and space["lr"].lower == cfg.space.lr.low and space["lr"].upper == cfg.space.lr.high
    assert "LogUniform" in type(space["lr"].sampler).__name__
    assert isinstance(space["weight_decay"], Categorical) and 0.0 in space["weight_decay"].categories


# ------------------------------------------------------------------------------------- concurrency


def _scaling(**scaling):
    return load_config(SearchConfig, TINY, [f"base.scaling.{k}={v}" for k, v in scaling.items()]).base.scaling


def test_concurrency_arithmetic():
    # 0.02 + 2 x 0.49 = 1.0 CPU a trial
    assert fitting_trials([{"CPU": 2.0}], _scaling()) == 2
    assert fitting_trials([{"CPU": 1.99}], _scaling()) == 1
    assert fitting_trials([{"CPU": 16.0}], _scaling()) == 16
    # 1 worker x 1 CPU + 0.02: a second trial needs 1.02 of the 0.98 left
    assert fitting_trials([{"CPU": 2.0}], _scaling(num_workers=1, cpus_per_worker=1)) == 1
    # GPU workers: 2 nodes x 4 GPUs, 2 GPUs a trial -> 4; 3 GPUs a trial -> 2 (bundles may span nodes)
    gpu = {"use_gpu": "true", "gpus_per_worker": 1, "cpus_per_worker": 2}
    nodes = [{"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}]
    assert fitting_trials(nodes, _scaling(num_workers=2, **gpu)) == 4
    assert fitting_trials(nodes, _scaling(num_workers=3, **gpu)) == 2
    assert fitting_trials([{"CPU": 64.0}], _scaling(num_workers=1, **gpu)) == 0  # no GPU at all
    # live nodes as ray.nodes() lists them: resources no trial asks for do not get in the way
    assert fitting_trials([{"CPU": 2.0, "memory": 8e9, "node:10.0.0.1": 1.0}], _scaling()) == 2


def test_fractional_cpus_pack_in_rays_units_not_floats():
    """0.2 + 0.1 CPU fill a 0.3-CPU node for Ray's scheduler (1/10,000 units); in floats 0.3 - 0.2 < 0.1."""
    assert bin_pack([{"CPU": 0.3}], [{"CPU": 0.1}, {"CPU": 0.2}]) == ([], [{"CPU": 0.0}])
    assert bin_pack([{"CPU": 0.3}], [{"CPU": 0.2}, {"CPU": 0.2}]) == ([{"CPU": 0.2}], [{"CPU": 0.1}])
    # 3 x 0.1 CPU workers + 0.02 for the trial: 0.32 a trial; 0.96 holds exactly 3
    assert fitting_trials([{"CPU": 0.96}], _scaling(cpus_per_worker=0.1, num_workers=3)) == 3


def test_a_trial_holds_its_actor_and_its_workers_bundles():
    """The one rule for what a Train worker asks of Ray, and a trial's sum (what the report charges)."""
    gpu = _scaling(num_workers=2, use_gpu="true", gpus_per_worker=1, cpus_per_worker=2)
    assert worker_bundle(gpu) == {"CPU": 2.0, "GPU": 1.0}
    assert worker_bundle(_scaling()) == {"CPU": 0.49}  # no GPU key at all on CPU
    assert trial_bundles(gpu) == ({"CPU": 0.02}, [{"CPU": 2.0, "GPU": 1.0}] * 2)
    assert trial_resources(gpu) == pytest.approx({"CPU": 4.02, "GPU": 2.0})


def test_an_unbounded_node_type_plans_up_to_the_trial_count():
    """A type without max_workers (the GCS reports -1) offers as many nodes as the trials could use."""
    cfg = load_config(SearchConfig, TINY, ["search.num_samples=50", "search.algorithm=random", "search.max_concurrent=null"])
    assert plan_concurrency(cfg, [{"CPU": 0.0}], [NodeType("cpu", {"CPU": 1.0}, max_workers=10_000)]) == 50
    assert len(cluster_capacity([], [NodeType("cpu", {"CPU": 1.0}, max_workers=10_000)], most=150)) == 150


def test_concurrency_is_capped_by_the_config_and_the_trial_count():
    cfg = load_config(SearchConfig, TINY, ["search.max_concurrent=1"])
    assert plan_concurrency(cfg, [{"CPU": 8.0}]) == 1
    cfg = load_config(SearchConfig, TINY, ["search.max_concurrent=50"])
    assert plan_concurrency(cfg, [{"CPU": 8.0}]) == 4  # only 4 trials; 8 would fit
    assert plan_concurrency(cfg, [{"CPU": 3.0}]) == 3  # never more than fit


def test_a_trial_that_cannot_fit_is_an_error_naming_the_keys():
    cfg = load_config(SearchConfig, TINY, ["base.scaling.cpus_per_worker=4"])
    with pytest.raises(ConfigError) as e:
        plan_concurrency(cfg, [{"CPU": 2.0}])
    msg = str(e.value)
    assert "base.scaling.num_workers" in msg and "base.scaling.cpus_per_worker=4" in msg and "CPU: 2" in msg


def test_an_autoscaling_cluster_plans_from_the_node_types_it_may_add(tmp_path):
    """cluster.yaml's head has 0 CPUs: with no worker up yet, the search plans from the types the launcher
    may add (read from the bootstrap config it writes on the head) instead of refusing to start."""
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text((ROOT / "cluster.yaml").read_text())
    types = autoscaler_node_types(bootstrap)
    assert {t.name: (t.resources, t.max_workers) for t in types} == {
        "gpu_serve": ({"CPU": 2.0, "GPU": 1.0}, 4),
        "gpu_train_4x": ({"CPU": 48.0, "GPU": 4.0}, 2),
        "gpu_train_8x": ({"CPU": 192.0, "GPU": 8.0}, 1),
    }
    cfg = load_config(SearchConfig, ROOT / "tune" / "configs" / "gpt2-gpu.yaml")
    head = [{"CPU": 0.0}]
    with pytest.raises(ConfigError):
        plan_concurrency(cfg, head)  # live nodes only: nothing fits
    # 2 GPU workers a trial: 2 per gpu_train_4x (x2), 4 on the gpu_train_8x; gpu_serve's 2 CPUs hold no worker
    assert plan_concurrency(cfg, head, types) == 8
    # a gpu_train_4x already up counts against its type's max_workers, not on top of it
    up = [*head, {"CPU": 48.0, "GPU": 4.0}]
    assert len(cluster_capacity(up, types)) == len(cluster_capacity(head, types))
    too_big = load_config(SearchConfig, ROOT / "tune" / "configs" / "gpt2-gpu.yaml",
                          ["base.scaling.gpus_per_worker=16"])
    with pytest.raises(ConfigError) as e:
        plan_concurrency(too_big, head, types)
    msg = str(e.value)
    assert "the autoscaler may add 4 x gpu_serve" in msg and "2 x gpu_train_4x {CPU: 48, GPU: 4}" in msg


def test_node_types_without_a_launcher_config_are_none(tmp_path):
    assert autoscaler_node_types(tmp_path / "absent.yaml") == []
    (tmp_path / "bad.yaml").write_text("available_node_types: [not, a, mapping]\n")
    assert autoscaler_node_types(tmp_path / "bad.yaml") == []
    assert cluster_capacity([{"CPU": 2.0}], [NodeType("t", {"CPU": 4.0}, max_workers=0)]) == [{"CPU": 2.0}]


def test_micro_batch_sizes_must_fit_the_data():
    cfg = load_config(SearchConfig, TINY, ["space.micro_batch_size={kind: choice, values: [8, 64]}"])
    check_batch_sizes(cfg, train_blocks=128)  # 64 x 2 workers = 128 blocks: exactly one step
    with pytest.raises(ConfigError) as e:
        check_batch_sizes(cfg, train_blocks=127)
    assert e.value.problems[0].startswith("space.micro_batch_size.values[1]: 64 x 2 workers")


def test_resume_refuses_a_changed_search_but_allows_operational_changes(tmp_path):
    cfg = load_config(SearchConfig, TINY, [f"search.storage_path={tmp_path}"])
    sdir = search_dir_of(cfg)
    assert check_resume(cfg, sdir) is False  # nothing there yet
    sdir.mkdir(parents=True)
    (sdir / "search.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    changed = load_config(SearchConfig, TINY, [f"search.storage_path={tmp_path}", "space.lr.high=0.009"])
    assert check_resume(changed, sdir) is False  # never reached Tune (e.g. a data error): start again
    (sdir / "tune").mkdir()
    (sdir / "tune" / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    assert check_resume(load_config(SearchConfig, TINY, [f"search.storage_path={tmp_path}", "search.max_concurrent=1"]),
                        sdir) is True
    with pytest.raises(ConfigError) as e:
        check_resume(load_config(SearchConfig, TINY, [f"search.storage_path={tmp_path}", "space.lr.high=0.009"]), sdir)
    assert any(p.startswith(f"space.lr.high: {cfg.space.lr.high}") for p in e.value.problems)


def test_a_trial_that_ended_just_before_an_interrupt_is_not_run_again(tmp_path):
    """Tune may restore a trial as unfinished when the search was interrupted between the trial's end (its
    trial.json, or ASHA's ledger line) and Tune saving its experiment state: its own files say it ended."""
    sdir, run_dir = tmp_path / "s", tmp_path / "s" / "trials" / "trial-t_00001"
    run_dir.mkdir(parents=True)
    assert ended_before(sdir, run_dir, "t_00001") is None  # no ledger, no trial.json: run it
    (sdir / "asha_stops.jsonl").write_text(json.dumps({"trial_id": "t_00000", "step": 10}) + "\n{\"trial_id\": \"t_0")
    assert ended_before(sdir, run_dir, "t_00001") is None  # another trial's stop; a line cut short is skipped
    with open(sdir / "asha_stops.jsonl", "a") as f:
        f.write("\n" + json.dumps({"trial_id": "t_00001", "step": 10}) + "\n")
    assert ended_before(sdir, run_dir, "t_00001") == "was stopped by ASHA"
    other = sdir / "trials" / "trial-t_00002"
    other.mkdir()
    (other / "trial.json").write_text("{}")
    assert ended_before(sdir, other, "t_00002") == "finished"


# ------------------------------------------------------------------------------------------- report


def _png_ok(path: Path) -> tuple[int, int]:
    """Walk the PNG chunks and check every CRC; returns (width, height)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    pos, chunks = 8, []
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert zlib.crc32(kind + body) == int.from_bytes(data[pos + 8 + n:pos + 12 + n], "big"), f"{path}: bad CRC"
        chunks.append(kind)
        pos += 12 + n
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _synthetic() -> SearchData:
    """6 trials where the loss falls with log(lr): 3 completed, 2 stopped by ASHA, 1 error, 1 pending."""
    cfg = load_config(SearchConfig, TINY).model_dump(mode="json")
    trials = []
    for i, lr in enumerate([3e-4, 1e-3, 3e-3, 1e-2, 2e-4]):
        final = 6.0 - 0.5 * math.log10(lr / 1e-4)
        stop = 20 if i in (0, 4) else None
        steps = list(range(10, (stop or 60) + 1, 10))
        hist = [{"step": s, "val_loss": final + 2.0 / s * 10 + 0.01 * i, "val_ppl": math.exp(final), "timestamp": 1000 + 30 * i + s,
                 "time_total_s": float(s)} for s in steps]
        trials.append(TrialRecord(
            trial_id=f"abc_{i:05d}", status="stopped by ASHA" if stop else "completed",
            params={"lr": lr, "weight_decay": [0.0, 0.01, 0.1][i % 3], "dropout": 0.04 * i}, history=hist,
            asha_stop_step=stop, wall_s=60.0 + i, cpu_hours=(60.0 + i) / 3600, model_dir=None if stop else f"/x/{i}"))
    trials.append(TrialRecord(trial_id="abc_00005", status="error", params={"lr": 5e-3, "weight_decay": 0.0, "dropout": 0.1},
                              error="RuntimeError: worker died", error_text="Failure # 1\nRuntimeError: worker died"))
    trials.append(TrialRecord(trial_id="abc_00006", status="pending", params={"lr": 1e-4, "weight_decay": 0.1, "dropout": 0.0}))
    trials.sort(key=lambda t: (t.best_val_loss is None, t.best_val_loss or 0))
    return SearchData("/tmp/search", cfg, trials, winner={"path": "/tmp/search/winner", "trial": trials[0].trial_id,
                                                          "metrics": {}, "step": 60}, started=1000.0)


def test_report_builder_writes_exactly_the_report_files_with_valid_pngs(tmp_path):
    data = _synthetic()
    files = render(data, tmp_path)
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert written == set(FILES) == set(files)
    for name in PLOTS:
        w, h = _png_ok(tmp_path / "plots" / f"{name}.png")
        assert w > 300 and h > 150

    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert [r["trial_id"] for r in rows] == [t.trial_id for t in data.trials]  # every trial, ranked
    assert rows[0]["rank"] == "1" and rows[0]["trial_id"] == "abc_00003"  # lr 1e-2: lowest loss
    assert rows[-1]["rank"] == "" and rows[-1]["status"] == "pending"
    by_id = {r["trial_id"]: r for r in rows}
    assert by_id["abc_00000"]["asha_stopped"] == "True" and by_id["abc_00000"]["asha_stop_step"] == "20"
    assert by_id["abc_00005"]["error"] == "RuntimeError: worker died"
    assert {"lr", "weight_decay", "dropout", "best_val_loss", "final_val_loss", "best_val_ppl", "steps", "wall_s",
            "cpu_hours", "gpu_hours", "status"} <= set(rows[0])

    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(PLOTS)
    assert "src='plots/" not in page and "http://" not in page and "https://" not in page  # self-contained
    for t in data.trials:
        assert t.trial_id in page
    assert "/tmp/search/winner" in page and "RuntimeError: worker died" in page
    md = (tmp_path / "report.md").read_text()
    assert all(f"(plots/{p}.png)" in md for p in PLOTS)
    assert all(t.trial_id in md for t in data.trials)
    assert "Median trial" in md and "Best configuration" in md


def test_importance_ranks_the_parameter_that_drives_the_loss_first():
    step, ranked = importance(_synthetic())
    assert step == 20  # the last step every trial with results reached (two were stopped at 20)
    assert ranked[0][0] == "lr" and ranked[0][1] < -0.9  # higher lr -> lower loss
    assert spearman([1, 2, 3], [3, 3, 3]) != spearman([1, 2, 3], [3, 3, 3])  # nan for a constant side


def test_report_on_an_empty_search_still_writes_every_file(tmp_path):
    data = SearchData(str(tmp_path), load_config(SearchConfig, TINY).model_dump(mode="json"), [])
    render(data, tmp_path / "r")
    for name in FILES:
        assert (tmp_path / "r" / name).is_file()
    for name in PLOTS:
        _png_ok(tmp_path / "r" / "plots" / f"{name}.png")


def test_load_search_reads_tune_and_train_folders(tmp_path):
    """A hand-made search folder with Tune's on-disk layout: statuses, ranks and the ASHA ledger."""
    cfg = load_config(SearchConfig, TINY)
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    exp = tmp_path / "tune"
    statuses = {"t_0": "TERMINATED", "t_1": "TERMINATED", "t_2": "ERROR", "t_3": "RUNNING", "t_4": "PENDING"}
    last_step = {"t_0": 60, "t_1": 20, "t_2": 10, "t_3": 30}
    for i, tid in enumerate(["t_0", "t_1", "t_2", "t_3"]):  # t_4 never started: no folder
        d = exp / tid
        d.mkdir(parents=True)
        (d / "params.json").write_text(json.dumps({"lr": 10 ** (-3 - i), "weight_decay": 0.0, "dropout": 0.1}))
        lines = [{"step": s, "val_loss": 5.0 - s / 100 + i, "val_ppl": 1.0, "timestamp": 100 + s, "time_total_s": s,
                  "run_done": s == 60, "stopped_early": False} for s in range(10, last_step.get(tid, 0) + 1, 10)]
        (d / "result.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (exp / "t_2" / "error.txt").write_text("Failure # 1 (occurred at x)\nTraceback...\n  File x\nValueError: boom\n")
    trial_data = [[json.dumps({"trial_id": t, "status": s, "config": {"lr": 1.0}}), json.dumps({"num_failures": int(t == "t_2")})]
                  for t, s in statuses.items()]
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": trial_data}))
    (tmp_path / "asha_stops.jsonl").write_text(json.dumps({"trial_id": "t_1", "step": 20, "val_loss": 5.8}) + "\n")
    # t_1's run reported once more (its own log) before Tune's stop reached it: not part of its curve
    (tmp_path / "trials" / "trial-t_1").mkdir(parents=True)
    (tmp_path / "trials" / "trial-t_1" / "metrics.jsonl").write_text(
        json.dumps({"step": 30, "val_loss": 4.0, "val_ppl": 1.0, "timestamp": 130}) + "\n")
    best = tmp_path / "trials" / "trial-t_0" / "best"
    best.mkdir(parents=True)
    (best / "aigc.json").write_text("{}")

    data = load_search(tmp_path)
    got = {t.trial_id: t for t in data.trials}
    assert {k: t.status for k, t in got.items()} == {"t_0": "completed", "t_1": "stopped by ASHA", "t_2": "error",
                                                     "t_3": "running", "t_4": "pending"}
    assert [t.trial_id for t in data.trials] == ["t_0", "t_1", "t_2", "t_3", "t_4"]  # by best val loss; no results last
    assert got["t_1"].asha_stop_step == 20 and got["t_0"].asha_stop_step is None
    assert got["t_1"].steps == 20 and [h["step"] for h in got["t_1"].history] == [10, 20]
    assert got["t_2"].error == "ValueError: boom" and got["t_2"].num_failures == 1
    assert got["t_0"].model_dir == str(best) and got["t_1"].model_dir is None
    assert got["t_0"].best_val_loss == pytest.approx(4.4) and got["t_0"].steps == 60
    assert got["t_4"].params == {"lr": 1.0}  # never started: the config from Tune's state
    assert got["t_0"].cpu_hours == pytest.approx(60 * 1.0 / 3600)  # 60 s x (0.02 + 2 x 0.49) CPU


def test_the_learning_curve_keeps_reports_tune_missed_while_interrupted(tmp_path):
    """Interrupted at step 30, Tune's result.json lacks that report; the Train run resumed after it and its
    own metrics.jsonl has it. The curve has every step, and Tune's line wins where both have one."""
    cfg = load_config(SearchConfig, TINY)
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    d = tmp_path / "tune" / "t_0"
    d.mkdir(parents=True)
    (d / "params.json").write_text(json.dumps({"lr": 1e-3, "weight_decay": 0.0, "dropout": 0.1}))
    tune_lines = [{"step": s, "val_loss": 5.0 - s / 100, "timestamp": 100 + s, "time_total_s": s,
                   "run_done": s == 40} for s in (10, 20, 40)]
    (d / "result.json").write_text("".join(json.dumps(x) + "\n" for x in tune_lines))
    run = tmp_path / "trials" / "trial-t_0"
    run.mkdir(parents=True)
    log = [{"step": s, "val_loss": 5.0 - s / 100 + (0.5 if s == 20 else 0), "timestamp": 100.5 + s, "done": s == 40}
           for s in (10, 20, 30, 40)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log))
    (run / "trial.json").write_text(json.dumps({"wall_s": 50.0}))

    (t,) = load_search(tmp_path).trials
    assert [h["step"] for h in t.history] == [10, 20, 30, 40]
    assert t.history[1]["val_loss"] == pytest.approx(4.8)  # Tune's line, not the log's
    assert t.history[2]["timestamp"] == pytest.approx(130.5) and t.history[3]["run_done"] is True
    assert t.status == "completed" and t.steps == 40


# ---------------------------------------------------------------------------------------- algorithms


def test_optuna_is_an_optional_extra_with_a_clear_error(monkeypatch):
    import sys

    cfg = load_config(SearchConfig, TINY, ["search.algorithm=optuna"])  # valid without optuna installed
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    with pytest.raises(ConfigError) as e:
        check_algorithm(cfg)
    assert e.value.problems[0].startswith("search.algorithm: 'optuna' needs the optional extra")


def test_searchers_carry_the_seed_and_the_concurrency():
    gen, limit = searcher(load_config(SearchConfig, TINY, ["search.seed=7"]), 2)
    assert limit is None and gen.max_concurrent == 2  # Tune ignores max_concurrent_trials for a generator
    pytest.importorskip("optuna")
    opt, limit = searcher(load_config(SearchConfig, TINY, ["search.algorithm=optuna", "search.seed=7"]), 3)
    assert type(opt).__name__ == "OptunaSearch" and limit == 3  # Tune wraps a Searcher in a ConcurrencyLimiter


def test_a_resumed_generator_takes_this_drivers_limit(monkeypatch):
    """Tune restores a variant generator's saved state, its trials-at-once limit with it; a search resumed on
    another cluster size runs as many trials at once as fit now."""
    from aigc.tuning import SeededVariants

    saved = searcher(load_config(SearchConfig, TINY), 2)[0].get_state()
    monkeypatch.setattr(SeededVariants, "resume_limit", 5)
    restored = SeededVariants()
    restored.set_state(saved)
    assert restored.max_concurrent == 5
    monkeypatch.setattr(SeededVariants, "resume_limit", 0)  # no limit of this driver's: the saved one stays
    restored.set_state(saved)
    assert restored.max_concurrent == 2
