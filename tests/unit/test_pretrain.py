"""The embedded base's cache: fingerprint, build once, concurrent and crashed builds, resolution (no training:
the pre-training itself is replaced by a builder that copies a tiny model directory)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aigc.config import ConfigError, FinetuneConfig, PretrainRecipe, load_config, to_yaml
from aigc.data import DataError
from aigc.finetune import prepare_base
from aigc.modeldir import verify_model_dir
from aigc.pretrain import ROLE, base_fingerprint, ensure_base, pretrain_config, resolve_base

ROOT = Path(__file__).resolve().parents[2]


def embedded_cfg(cache: Path, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, ["model.name_or_path=embedded", f"run.base_cache={cache}", *overrides])


class FakeBuilder:
    """Stands in for pre-training: counts its runs and hands back an existing model directory."""

    def __init__(self, model_dir: Path, seconds: float = 0.0, fail: bool = False):
        self.model_dir, self.seconds, self.fail = model_dir, seconds, fail
        self.runs: list[FinetuneConfig] = []

    def __call__(self, pcfg: FinetuneConfig) -> str:
        self.runs.append(pcfg)
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("pre-training crashed")
        return str(self.model_dir)


def cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name != ".build")


def test_fingerprint_is_stable_across_processes():
    here = base_fingerprint(PretrainRecipe())
    code = "from aigc.config import PretrainRecipe; from aigc.pretrain import base_fingerprint; " \
           "print(base_fingerprint(PretrainRecipe()))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "lib")})
    assert other.stdout.strip() == here and len(here) == 64


@pytest.mark.parametrize("change", [
    {"arch": {"n_layer": 3, "n_embd": 128, "n_head": 4, "vocab_size": 512}},
    {"arch": {"n_layer": 4, "n_embd": 128, "n_head": 4, "vocab_size": 1024}},
    {"max_steps": 601}, {"seed": 1}, {"lr": 1e-3}, {"batch_size": 64}, {"block_size": 64},
    {"corpus": {"n_train": 20000, "n_validation": 500, "n_test": 500, "seed": 2}},
])
def test_fingerprint_changes_with_what_changes_the_weights(change):
    assert base_fingerprint(PretrainRecipe(**change)) != base_fingerprint(PretrainRecipe())


def test_fingerprint_ignores_workers_and_paths(tmp_path):
    assert base_fingerprint(PretrainRecipe(num_workers=1)) == base_fingerprint(PretrainRecipe(num_workers=4))
    a, b = embedded_cfg(tmp_path / "a"), embedded_cfg(tmp_path / "b", "scaling.num_workers=1", "run.name=other")
    assert base_fingerprint(a.model.pretrain) == base_fingerprint(b.model.pretrain)


def test_pretrain_config_is_a_plain_text_run_from_random_init(tmp_path):
    cfg = embedded_cfg(tmp_path, "model.pretrain.num_workers=4", "model.pretrain.batch_size=32",
                       "scaling.cpus_per_worker=0.5")
    p = pretrain_config(cfg)
    assert p.model.name_or_path is None and p.model.arch == cfg.model.pretrain.arch
    assert p.data.source == "embedded" and p.data.embedded == cfg.model.pretrain.corpus
    assert (p.run.evaluate, p.run.samples) == (False, 0)
    assert p.scaling.num_workers * p.optim.micro_batch_size * p.optim.grad_accum == 32  # the global batch
    assert p.scaling.cpus_per_worker == 0.5  # the task's placement, the recipe's worker count
    assert Path(p.run.storage_path).parent == tmp_path and p.run.name == f"base-{base_fingerprint(cfg.model.pretrain)[:12]}"


def test_builds_once_then_reuses(tmp_path, tiny_model_dir, capsys):
    cfg, build = embedded_cfg(tmp_path), FakeBuilder(tiny_model_dir)
    first = ensure_base(cfg, build)
    assert "pre-training the embedded base" in capsys.readouterr().out
    second = ensure_base(cfg, build)
    assert second == first and len(build.runs) == 1
    assert f"embedded base: reusing {first}" in capsys.readouterr().out
    fp = base_fingerprint(cfg.model.pretrain)
    assert Path(first) == tmp_path / fp
    meta = verify_model_dir(first)
    assert meta["role"] == ROLE and meta["fingerprint"] == fp and meta["pretrain"] == cfg.model.pretrain.model_dump(mode="json")
    assert cache_entries(tmp_path) == [fp, f"{fp}.lock"]
    assert not (tmp_path / ".build" / fp).exists()  # the pre-training run is removed once the base is cached


def test_concurrent_callers_build_once(tmp_path, tiny_model_dir):
    cfg, build = embedded_cfg(tmp_path), FakeBuilder(tiny_model_dir, seconds=1.0)
    paths: list[str] = []
    threads = [threading.Thread(target=lambda: paths.append(ensure_base(cfg, build))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fp = base_fingerprint(cfg.model.pretrain)
    assert len(build.runs) == 1 and paths == [str(tmp_path / fp)] * 3
    assert cache_entries(tmp_path) == [fp, f"{fp}.lock"]
    verify_model_dir(paths[0])


def test_concurrent_processes_build_once(tmp_path, tiny_model_dir):
    """Two processes (the real case: two jobs on one machine) race for the same base: one builds it, the other
    waits on the lock and reuses it."""
    log = tmp_path / "builds.log"
    code = f"""
import time
from aigc.config import FinetuneConfig, load_config
from aigc.pretrain import ensure_base
def build(pcfg):
    with open({str(log)!r}, "a") as f:
        f.write("built\\n")
    time.sleep(2.0)
    return {str(tiny_model_dir)!r}
cfg = load_config(FinetuneConfig, None, ["model.name_or_path=embedded", "run.base_cache={tmp_path / 'cache'}"])
print(ensure_base(cfg, build))
"""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "lib")}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert log.read_text() == "built\n" and outs[0] == outs[1]
    verify_model_dir(outs[0])


def test_a_crashed_build_leaves_nothing_that_breaks_the_next(tmp_path, tiny_model_dir):
    cfg = embedded_cfg(tmp_path)
    fp = base_fingerprint(cfg.model.pretrain)
    with pytest.raises(RuntimeError, match="crashed"):
        ensure_base(cfg, FakeBuilder(tiny_model_dir, fail=True))
    assert cache_entries(tmp_path) == [f"{fp}.lock"]  # no base appeared, and the lock is free again
    # what a process killed while copying into place leaves: a temp copy, and a half-written base
    (tmp_path / f".{fp}.tmp-deadbeef").mkdir()
    (tmp_path / f".{fp}.tmp-deadbeef" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / fp).mkdir()
    (tmp_path / fp / "config.json").write_text("{}")
    build = FakeBuilder(tiny_model_dir)
    path = ensure_base(cfg, build)
    assert len(build.runs) == 1 and verify_model_dir(path)["fingerprint"] == fp
    assert cache_entries(tmp_path) == [fp, f"{fp}.lock"]


def test_an_interrupted_pretraining_run_resumes_only_with_the_same_config(tmp_path, tiny_model_dir):
    cfg = embedded_cfg(tmp_path, "model.pretrain.num_workers=1")
    fp, pcfg = base_fingerprint(cfg.model.pretrain), pretrain_config(cfg)
    run_dir = Path(pcfg.run.storage_path) / pcfg.run.name
    kept = []

    def build(_: FinetuneConfig) -> str:
        kept.append((run_dir / "checkpoint_000001").exists())
        return str(tiny_model_dir)

    def interrupted_run_of(other: FinetuneConfig) -> None:
        shutil.rmtree(tmp_path / fp, ignore_errors=True)
        (run_dir / "checkpoint_000001").mkdir(parents=True)
        (run_dir / "config.yaml").write_text(to_yaml(pretrain_config(other)))

    interrupted_run_of(cfg)  # same recipe, same worker count: left for Ray Train to resume
    ensure_base(cfg, build)
    other = embedded_cfg(tmp_path, "model.pretrain.num_workers=2")
    assert base_fingerprint(other.model.pretrain) == fp
    interrupted_run_of(other)  # same base, another worker count: its shards would not load, so start afresh
    ensure_base(cfg, build)
    assert kept == [True, False]


def test_resolve_base_swaps_in_the_cached_path(tmp_path, tiny_model_dir):
    cfg, build = embedded_cfg(tmp_path), FakeBuilder(tiny_model_dir)
    resolved = resolve_base(cfg, build)
    assert resolved.model.name_or_path == str(tmp_path / base_fingerprint(cfg.model.pretrain))
    assert resolved.model_dump(exclude={"model": {"name_or_path"}}) == cfg.model_dump(exclude={"model": {"name_or_path"}})
    assert resolve_base(resolved, build) is resolved and len(build.runs) == 1  # resolving twice is a no-op
    plain = load_config(FinetuneConfig, None, ["model.name_or_path=gpt2"])
    assert resolve_base(plain, build) is plain


def test_a_bad_data_file_fails_before_the_base_is_built(tmp_path, tiny_model_dir):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "text under the wrong column"}) + "\n")
    cfg, build = embedded_cfg(tmp_path, "data.source=files", "data.format=text",
                              f"data.train_files=[{tmp_path / 'd.jsonl'}]"), FakeBuilder(tiny_model_dir)
    with pytest.raises(DataError, match=r"d\.jsonl: no column 'text' \(data\.text_column\)"):
        resolve_base(cfg, build)
    assert build.runs == [] and not (tmp_path / base_fingerprint(cfg.model.pretrain)).exists()


def test_unresolved_embedded_base_is_refused_by_the_driver(tmp_path):
    with pytest.raises(ValueError, match="resolve_base"):
        prepare_base(embedded_cfg(tmp_path), tmp_path, ["some text"])


def test_config_checks_the_base_recipe_only_when_it_is_used(tmp_path):
    bad = ["model.pretrain.batch_size=33", "model.pretrain.warmup_steps=700", "model.pretrain.arch.n_head=3",
           "data.block_size=512"]
    with pytest.raises(ConfigError) as e:
        embedded_cfg(tmp_path, *bad)
    keys = {p.split(":")[0] for p in e.value.problems}
    assert keys == {"model.pretrain.batch_size", "model.pretrain.warmup_steps", "model.pretrain.arch.n_head",
                    "data.block_size"}
    load_config(FinetuneConfig, None, bad[:3])  # a run that does not fine-tune the embedded base ignores them


def test_a_bucket_cache_publishes_the_base_once_for_every_node(s3_server, tmp_path, tiny_model_dir, capsys):
    """`run.base_cache` on an object store: the base is published at <uri>/<fingerprint> (any node reads it
    through its verified copy), the build is an object-store run any node can join, and a second caller reuses
    the bucket's copy; the fine-tune's driver takes the URI as its base."""
    import uuid

    from aigc import storage
    from aigc.modeldir import local_dir

    root = f"{s3_server.root}/bases-{uuid.uuid4().hex[:8]}"
    cfg, build = embedded_cfg(root), FakeBuilder(tiny_model_dir)
    fp = base_fingerprint(cfg.model.pretrain)
    first = ensure_base(cfg, build)
    assert first == f"{root}/{fp}" and len(build.runs) == 1
    assert build.runs[0].run.storage_path == f"{root}/.build"
    assert storage.published_files(first)  # marker written: complete
    assert ensure_base(cfg, build) == first and len(build.runs) == 1
    assert f"embedded base: reusing {first}" in capsys.readouterr().out
    meta = verify_model_dir(local_dir(first))
    assert meta["role"] == ROLE and meta["fingerprint"] == fp
    resolved = resolve_base(cfg, build)
    assert resolved.model.name_or_path == first and prepare_base(resolved, tmp_path / "run", []) == first
    with pytest.raises(ConfigError, match="run.base_cache: .*no filesystem for the ftp:// scheme"):
        embedded_cfg("ftp://host/bases")
