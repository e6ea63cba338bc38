"""The embedded pre-trained base: a tiny GPT-2 pre-trained once per machine on unconditional ad copy.

`model.name_or_path: embedded` means this base. The entry points (fine-tune, search, pipeline) call
:func:`resolve_base` once, which swaps in the path of the cached model directory, building it on a miss; from
there a task fine-tunes it exactly as it would a hub model (`from_pretrained`, the base's own tokenizer).

The base is pre-training run through the fine-tuning driver itself (`run_finetune` with `name_or_path: None`:
a random GPT-2 and a tokenizer trained on the corpus), on the settings of `model.pretrain`. On disk, under
`run.base_cache`:

    <fingerprint>/             the base: a verified model directory (aigc.json role "pretrained-base")
    <fingerprint>.lock         held (flock) by whoever builds it; a concurrent build waits, then reuses
    .build/base-<fp[:12]>/     the pre-training run while it trains; a crashed build resumes from it
    .<fingerprint>.tmp-*       a copy being moved into place (a crash leaves it; the next build removes it)

`run.base_cache` may be an object-store URI (a cluster without a shared disk): the base is then published at
`<uri>/<fingerprint>/` (marker last, `aigc.storage.publish_dir`), every node's loader reads it through its own
verified copy (`aigc.modeldir.local_dir`), and the build runs as an object-store run under `<uri>/.build/`. The
lock is then this machine's (under `~/.cache/aigc/locks`): two machines building at once both train, and the
second publish replaces the first with the same weights; a reader never sees a partial one.

The fingerprint hashes what changes the weights (recipe, architecture, corpus, optimisation, validation),
not paths or worker counts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from aigc import storage
from aigc.config import (
    EMBEDDED_BASE,
    DataSection,
    EvalSection,
    FinetuneConfig,
    ModelSection,
    OptimSection,
    PretrainRecipe,
    RunSection,
    ScalingSection,
    TrackingSection,
    expand,
    run_location,
    to_yaml,
)
from aigc.corpus import DEFAULT_GRAMMAR
from aigc.data import load_splits
from aigc.finetune import BEST_DIR, FinetuneResult, clean_run, run_finetune
from aigc.layout import RUN_CONFIG
from aigc.modeldir import METADATA, ModelDirError, copy_model_dir, verify_model_dir

# Part of the fingerprint: bump it when the pre-training code changes what a given config produces.
RECIPE = "aigc-embedded-base/1"
ROLE = "pretrained-base"
BUILD_DIR = ".build"

Builder = Callable[[FinetuneConfig], str]  # pre-training config -> the trained model directory


LOCKS = "~/.cache/aigc/locks"  # this machine's build locks of a cache on an object store


def base_cache_root(cfg: FinetuneConfig) -> str:
    """The cache root, a local folder or an object-store URI (the one place it is resolved)."""
    return expand(cfg.run.base_cache)


def _pretrain_run(p: PretrainRecipe, run: RunSection, scaling: ScalingSection) -> FinetuneConfig:
    """`p` as a fine-tuning config: the embedded unconditional corpus as plain text, a random GPT-2 with a
    tokenizer trained there, the best validated step kept, no early stop."""
    return FinetuneConfig(
        run=run,
        data=DataSection(source="embedded", format="text", block_size=p.block_size, embedded=p.corpus),
        model=ModelSection(name_or_path=None, arch=p.arch, dropout=p.dropout),
        optim=OptimSection(lr=p.lr, weight_decay=p.weight_decay, warmup_steps=p.warmup_steps, max_steps=p.max_steps,
                          micro_batch_size=p.batch_size // p.num_workers, grad_accum=1, seed=p.seed),
        scaling=scaling.model_copy(update={"num_workers": p.num_workers}),
        eval=EvalSection(every_steps=p.eval_every, patience=None, keep_top_k=1, log_every=max(1, p.eval_every // 4)),
        tracking=TrackingSection(enabled=False),  # a cache build, not a model line: never a registry version
    )


def base_fingerprint(p: PretrainRecipe) -> str:
    """sha256 of the canonical JSON of what changes the base's weights: the recipe (`model.pretrain` without
    `num_workers`: the global batch is fixed, so any worker count gives the same base), the grammar the corpus
    is drawn from, and `RECIPE`, the version of how `_pretrain_run` turns a recipe into a run (bump it when that
    changes). Not the whole derived run config: a new, defaulted field elsewhere must not invalidate every base."""
    recipe = p.model_dump(mode="json", exclude={"num_workers"})
    blob = json.dumps({"recipe": RECIPE, "grammar": DEFAULT_GRAMMAR.fingerprint(), "pretrain": recipe},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def pretrain_config(cfg: FinetuneConfig) -> FinetuneConfig:
    """The pre-training run of `cfg.model.pretrain`, named by its fingerprint in the cache's build area, with no
    evaluation or samples. It trains on `cfg.scaling` (GPUs when the task uses them) with
    `model.pretrain.num_workers` workers."""
    p = cfg.model.pretrain
    run = RunSection(name=f"base-{base_fingerprint(p)[:12]}", storage_path=storage.join(base_cache_root(cfg), BUILD_DIR),
                    evaluate=False, samples=0, torch_extensions_dir=cfg.run.torch_extensions_dir, base_cache=cfg.run.base_cache)
    return _pretrain_run(p, run, cfg.scaling)


def _train(pcfg: FinetuneConfig) -> str:
    """The default builder: pre-train through the fine-tuning driver; returns its best model directory."""
    result = run_finetune(pcfg)
    m = result.best_metrics
    print(f"[aigc] embedded base trained: best val loss {m.get('val_loss', float('nan')):.4f} at step "
          f"{m.get('step')} ({m.get('train_seconds', 0.0):.0f} s training)", flush=True)
    return result.best_dir or str(Path(result.run_dir) / BEST_DIR)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` for the block: another process (or thread) waits here until it is released.
    The kernel drops it when the holder dies, so a crashed build never leaves the cache locked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached(path: str, fingerprint: str) -> bool:
    """A complete, verified base of this fingerprint is at `path`; on an object store, a published one (every
    reader's download verifies its files)."""
    try:
        if storage.is_uri(path):
            storage.published_files(path)
            return json.loads(storage.read_bytes(storage.join(path, METADATA))).get("fingerprint") == fingerprint
        return verify_model_dir(path).get("fingerprint") == fingerprint
    except (ModelDirError, storage.StorageError, ValueError):
        return False


def _remove_leftovers(root: Path, fingerprint: str) -> list[Path]:
    """Delete what a crashed copy into place left (only ever called under the fingerprint's lock)."""
    gone = [p for p in root.glob(f".{fingerprint}.*") if p.is_dir()]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def _reset_stale_build(pcfg: FinetuneConfig) -> None:
    """A crashed build of the same config is resumed by Ray Train (same run name); one left by another
    config (another worker count: its ZeRO shards and data shards would not match) is started afresh."""
    saved = storage.join(run_location(pcfg), RUN_CONFIG)
    if storage.exists(saved) and storage.read_text(saved) != to_yaml(pcfg):
        clean_run(pcfg)


def ensure_base(cfg: FinetuneConfig, build: Builder | None = None) -> str:
    """The cached embedded base of `cfg.model.pretrain`, built on a miss; returns its model directory.

    A build holds `<fingerprint>.lock`: a concurrent caller waits and then reuses what it built. The trained
    model is copied next to its final name and renamed into place (`copy_model_dir`), so the cache never
    shows a partial base. `build` replaces the pre-training itself (tests inject a fake one).
    """
    fingerprint = base_fingerprint(cfg.model.pretrain)
    root = base_cache_root(cfg)
    remote = storage.is_uri(root)
    out = storage.join(root, fingerprint)
    shown = storage.redact(out)
    if _cached(out, fingerprint):
        print(f"[aigc] embedded base: reusing {shown}", flush=True)
        return out
    if remote:  # an unreachable or unauthorised bucket fails here, not after the build (not probed on a reuse)
        storage.check_writable(root)
    lock = Path(os.path.expanduser(LOCKS) if remote else root) / f"{fingerprint}.lock"
    with _locked(lock):
        if _cached(out, fingerprint):  # built by the caller we waited for
            print(f"[aigc] embedded base: reusing {shown}", flush=True)
            return out
        if not remote:
            for p in _remove_leftovers(Path(root), fingerprint):
                print(f"[aigc] embedded base: removed {p} left by an interrupted build", flush=True)
            if Path(out).exists():  # there but not a verified base of this fingerprint: never trusted, rebuilt
                shutil.rmtree(out)
        pcfg = pretrain_config(cfg)
        _reset_stale_build(pcfg)
        p = cfg.model.pretrain
        print(f"[aigc] pre-training the embedded base (fingerprint {fingerprint[:12]}, {p.max_steps} steps of "
              f"{p.batch_size} x {p.block_size} tokens, {p.num_workers} worker(s)) -> {shown}", flush=True)
        t0 = time.time()
        trained = (build or _train)(pcfg)
        meta = dict(role=ROLE, fingerprint=fingerprint, recipe=RECIPE, pretrain=p.model_dump(mode="json"),
                    build_seconds=round(time.time() - t0, 1))
        if remote:  # recorded locally, then published whole, marker last
            with tempfile.TemporaryDirectory(prefix="aigc-base-") as tmp:
                storage.publish_dir(copy_model_dir(trained, Path(tmp) / fingerprint, **meta), out)
        else:
            copy_model_dir(trained, out, **meta)
        clean_run(pcfg)  # checkpoints only served a resume (an object-store build's stored copy too)
        print(f"[aigc] embedded base: built {shown} in {time.time() - t0:.0f} s", flush=True)
    return out


def resolve_base(cfg: FinetuneConfig, build: Builder | None = None) -> FinetuneConfig:
    """`cfg` with `model.name_or_path: embedded` replaced by the cached base's directory (built if needed);
    any other config is returned as it is. Entry points call this once, before anything trains.

    The run's data is checked first (`load_splits`: files, columns, a sample of each, well under a second), so a
    bad file fails in seconds, not after the minutes a first use spends pre-training the base."""
    if cfg.model.name_or_path != EMBEDDED_BASE:
        return cfg
    load_splits(cfg.data)
    path = ensure_base(cfg, build)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": path})})


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """The fine-tune entry point: resolve the base (pre-training it on first use), then `run_finetune`."""
    return run_finetune(resolve_base(cfg))


def pretrain(cfg: FinetuneConfig) -> str:
    """The `aigc pretrain` verb: make sure the embedded base of `cfg.model.pretrain` is cached; its path."""
    path = ensure_base(cfg)
    print(f"[aigc] embedded base: {path}", flush=True)
    return path
