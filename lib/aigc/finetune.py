"""The fine-tuning driver: config -> data -> TorchTrainer(DeepSpeed) -> exported model directories -> evaluation.

Used by `jobs/finetune.py` and, once per trial, by the search. Everything that can be checked is checked on
the driver before a Train worker starts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.data
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from aigc import console, storage, tracking
from aigc.comparison import comparison_rows, example_lines
from aigc.config import (
    EMBEDDED_BASE,
    MIN_POSITIONS,
    FinetuneConfig,
    run_dir_of,
    run_location,
    to_yaml,
)
from aigc.corpus import ensure_embedded_corpus
from aigc.data import DataError, PackedData, load_splits, make_data_config, shard_datasets, to_ray_blocks
from aigc.ddp import fp32_state_dict, is_ddp_checkpoint
from aigc.evaluate import TaskEval, evaluate_model, task_eval_inputs, task_prompt
from aigc.generation import SamplingParams, generate
from aigc.layout import (
    BASE_DIR,
    BEST_DIR,
    FINAL_DIR,
    METRICS_LOG,
    RUN_CONFIG,
    SUMMARY,
    TRACKING_RECORD,
    read_json_lines,
)
from aigc.lora import check_before_training, export_adapter, is_adapter_checkpoint
from aigc.modeldir import (
    METADATA,
    ModelDirError,
    load_model,
    local_dir,
    read_metadata,
    save_model_dir,
    verify_model_dir,
)
from aigc.modeling import build_tiny_gpt2, train_tokenizer
from aigc.placement import worker_bundle
from aigc.privacy import DPPlan, plan, projected_epsilon
from aigc.runlog import ReportLog, TrackReports
from aigc.taskdata import training_texts
from aigc.template import ensure_chat_template
from aigc.train import CKPT_TAG, HF_SUBDIR, train_loop_per_worker


@dataclass
class FinetuneResult:
    run_dir: str
    best_dir: str | None
    final_dir: str | None
    metrics: dict[str, Any]  # last reported training metrics
    best_metrics: dict[str, Any]
    evaluation: dict[str, Any] = field(default_factory=dict)  # {"base": {...}, "finetuned": {...}}
    data: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, str]] = field(default_factory=list)
    # an object-store run: where it is stored (best/ and final/ published under it); run_dir, best_dir and
    # final_dir are then the driver's local copies
    location: str | None = None


def init_ray(address: str | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS (set by `ray job submit`) or a running `ray start` head, else
    start a local Ray. Token auth (Ray 2.60) is read from RAY_AUTH_MODE/RAY_AUTH_TOKEN by Ray itself. Every
    worker process runs aigc.console's setup hook, so it prints at the driver's AIGC_LOG_LEVEL."""
    console.setup()  # idempotent; the entry points ran it before importing Ray (Ray reads its log knobs at import)
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True, runtime_env=console.runtime_env())
    ray.data.DataContext.get_current().enable_progress_bars = False  # job logs are files, not terminals


def start_tracking(cfg: FinetuneConfig, run_dir: Path) -> tracking.TrackedRun | None:
    """The run's MLflow run with its config as params (the same MLflow run when the run resumes); None when
    `tracking.enabled` is false."""
    # an object-store run's default SQLite store lives beside its staging folder (SQLite needs a file system):
    # set tracking.uri to a server for one store that outlives the driver's machine
    root = run_dir.parent if storage.is_uri(cfg.run.storage_path) else cfg.run.storage_path
    tracker = tracking.open_tracker(cfg.tracking, root)
    if tracker is None:
        return None
    return tracker.start_run(cfg.run.name, params=cfg.model_dump(mode="json"), tags={tracking.KIND_TAG: "finetune"},
                             record=run_dir / TRACKING_RECORD)


def finish_tracking(run: tracking.TrackedRun, run_dir: Path, out: FinetuneResult) -> None:
    """The run's config, metrics log, summary and before/after evaluation as artifacts; its best model registered
    as the `challenger`; the MLflow run finished."""
    run.log_artifacts([run_dir / RUN_CONFIG, run_dir / METRICS_LOG, run_dir / SUMMARY])
    if out.evaluation:
        run.log_evaluation(out.evaluation)
    registered = run.register_model(out.best_dir, alias=tracking.CHALLENGER) if out.best_dir else None
    run.end()
    print(f"[aigc] tracked: MLflow run {run.run_id} in {run.tracker.uri}"
          + (f"; best model is {run.tracker.registered_model} version {registered.version} ({tracking.CHALLENGER})"
             if registered else ""), flush=True)


def read_metrics_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every report of a run, oldest first ([] before the first validation)."""
    return read_json_lines(Path(run_dir) / METRICS_LOG)


# what a resumed object-store run reads back into its staging folder, beside the base model it built (not the
# checkpoints: Train reads those)
RUN_FILES = [RUN_CONFIG, METRICS_LOG, SUMMARY, TRACKING_RECORD]


def pull_run_files(loc: str, run_dir: Path) -> None:
    """An object-store run's own files into a fresh staging folder, so a resumed run continues its metrics log,
    base model and tracked run wherever its driver runs now."""
    shutil.rmtree(run_dir, ignore_errors=True)
    storage.pull_files(loc, run_dir, RUN_FILES)
    if storage.exists(storage.join(loc, BASE_DIR)):
        storage.fetch_dir(storage.join(loc, BASE_DIR), run_dir / BASE_DIR, verify=verify_model_dir)


def push_run_files(loc: str, run_dir: Path) -> None:
    """The staging folder's own files to the object store (the base model published whole, once, marker last)."""
    storage.push_files(run_dir, loc, RUN_FILES)
    if (run_dir / BASE_DIR).is_dir():
        storage.publish_dir_once(run_dir / BASE_DIR, storage.join(loc, BASE_DIR))


def prepare_base(cfg: FinetuneConfig, run_dir: Path, train_texts: Any) -> str:
    """The base model every worker loads: a hub id / local path as given (its own tokenizer), or with no
    `model.name_or_path` a tokenizer trained on the train split and a random tiny GPT-2, saved once as a model
    directory (a resumed run reuses it, so its tokenizer and initial weights stay identical).

    The embedded pre-trained base ('embedded') is resolved to its cached directory by the entry points
    (`aigc.pretrain.resolve_base`), which may have to build it: a Ray Train run of its own, not a step here."""
    if cfg.model.name_or_path == EMBEDDED_BASE:
        raise ValueError(f"model.name_or_path={EMBEDDED_BASE!r} reached the fine-tuning driver unresolved: call "
                         "aigc.pretrain.resolve_base(cfg) first (the fine-tune, search and pipeline entry points do)")
    if cfg.model.name_or_path:
        return cfg.model.name_or_path
    base = run_dir / BASE_DIR
    try:
        verify_model_dir(base)
        return str(base)
    except ModelDirError:
        pass
    tok = train_tokenizer(iter(train_texts), cfg.model.arch.vocab_size)
    model = build_tiny_gpt2(cfg.model.arch, len(tok), n_positions=max(cfg.data.block_size, MIN_POSITIONS),
                            eos_token_id=tok.eos_token_id, seed=cfg.optim.seed)
    save_model_dir(model, tok, base, config=cfg.model_dump(mode="json"), metrics={}, step=0, role="base")
    return str(base)


def _check_sizes(cfg: FinetuneConfig, packed: PackedData, origin: dict[str, str]) -> None:
    """Each worker needs at least one micro-batch of train blocks and one validation block (a block is one
    padded example when task data is not packed)."""
    w, o = cfg.scaling.num_workers, cfg.optim
    need = w * o.micro_batch_size * o.grad_accum
    if packed.blocks["train"] < need:
        raise DataError(
            f"{origin['train']}: {packed.blocks['train']} train blocks of {cfg.data.block_size} tokens, but one "
            f"optimizer step needs {need} (scaling.num_workers={w} x optim.micro_batch_size={o.micro_batch_size}"
            f" x optim.grad_accum={o.grad_accum}); add data or lower data.block_size"
        )
    if packed.blocks["validation"] < w:
        raise DataError(f"{origin['validation']}: {packed.blocks['validation']} validation blocks for {w} workers; "
                        "each worker needs at least one")


def _remote_options(cfg: FinetuneConfig) -> dict[str, Any]:
    """Resources of the export/eval tasks: a GPU when training used them, else one CPU."""
    return {"num_cpus": 1, "num_gpus": 1 if cfg.scaling.use_gpu else 0}


def export_checkpoint(ckpt_dir: str, out_dir: str, config: dict, metrics: dict, **extra: Any) -> str:
    """Consolidate a reported ZeRO checkpoint (any stage, offload or not) into the model directory format
    with DeepSpeed's own `zero_to_fp32`, so the weights are exactly the fp32 master weights (zero.stage 0:
    the DDP engine's own checkpoint, `aigc.ddp`)."""
    if is_ddp_checkpoint(ckpt_dir, CKPT_TAG):
        state = fp32_state_dict(ckpt_dir, CKPT_TAG)
    else:
        # on call, in the export task: importing DeepSpeed detects the accelerator (on a CPU machine without
        # DS_ACCELERATOR it prints a warning to stdout), which the driver, importing this module, must not
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=CKPT_TAG)
    hf = os.path.join(ckpt_dir, HF_SUBDIR)
    if is_adapter_checkpoint(hf):
        merge = (config.get("export") or {}).get("merge", True)
        return export_adapter(state, hf, out_dir, merge=merge, config=config, metrics=metrics, **extra)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"{ckpt_dir}: checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    save_model_dir(model, AutoTokenizer.from_pretrained(hf), out_dir, config=config, metrics=metrics,
                   step=int(metrics.get("step", 0)), **extra)
    return out_dir


def _export_task(checkpoint: Any, exports: list[tuple[str, dict, dict]], config: dict) -> list[str]:
    """Export one checkpoint on whichever node the task runs, once per `(out_dir, metrics, extra)` (best and final are
    often the same checkpoint: one task, one download, one import of DeepSpeed): into `out_dir`, or for an
    object-store URI into a temp folder that is then published there (visible once complete)."""
    out = []
    with storage.checkpoint_dir(checkpoint) as d:
        for out_dir, metrics, extra in exports:
            if not storage.is_uri(out_dir):
                out.append(export_checkpoint(d, out_dir, config, metrics, source_checkpoint=checkpoint.path, **extra))
                continue
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, "model")
                export_checkpoint(d, local, config, metrics, source_checkpoint=checkpoint.path, **extra)
                out.append(storage.publish_dir(local, out_dir))
    return out


def _read_docs(path: str, limit: int = 1000) -> list[dict[str, Any]] | None:
    """Test documents with their exact nats (embedded text corpus files carry them); None for other data.
    (Task rows carry the nats of their completion instead: `aigc.evaluate.task_eval_inputs`.)"""
    docs = []
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            if "nats" not in d:
                return None
            docs.append({"text": d["text"], "nats": float(d["nats"])})
            if len(docs) >= limit:
                break
    return docs


@dataclass
class Prepared:
    """What every worker of a run (or every trial of a search) shares: the base model and the packed data."""

    base: str  # model path or hub id the workers load
    packed: PackedData
    splits: Any
    data_info: dict[str, Any]


def prepare(cfg: FinetuneConfig, run_dir: Path) -> Prepared:
    """Check the data files, prepare the base model, then read, tokenise and pack on the cluster: all before
    any worker starts. The driver holds the split sources and the packed blocks' references and counts, never
    the corpus.

    Task formats also report, per split, the fraction of tokens that carry loss and how many examples were
    kept, had their prompt truncated, or were dropped (too long, or nothing left to learn)."""
    splits = load_splits(cfg.data)  # bad files fail here, before Ray starts; nothing is read but a sample
    init_ray()
    base = prepare_base(cfg, run_dir, training_texts(splits.train))  # streamed, only to train a tokenizer
    check_before_training(cfg, base)  # LoRA: adapter on adapter, resumed adapter's base, targets
    tokenizer = AutoTokenizer.from_pretrained(local_dir(base))  # a bucket's base: this node's verified copy
    if tokenizer.eos_token_id is None:
        raise DataError(f"model.name_or_path={base!r}: the tokenizer has no EOS token to separate documents")
    if cfg.data.format == "chat" and ensure_chat_template(tokenizer):
        print("[aigc] data: the tokenizer has no chat template; using aigc's default (saved with the model)", flush=True)
    packed = to_ray_blocks(splits, tokenizer, cfg.data)
    _check_sizes(cfg, packed, splits.origin)
    info = {"blocks": packed.blocks, "tokens": packed.tokens, "origin": splits.origin,
            "bytes_per_token": {s: round(packed.bytes[s] / max(packed.tokens[s], 1), 2) for s in packed.bytes},
            "pii_scrubbed": packed.pii if cfg.data.scrub_pii else None}
    if cfg.data.format != "text":
        info.update(loss_token_fraction=packed.loss_fraction(), examples=packed.examples)
    print(f"[aigc] data: {json.dumps({k: v for k, v in info.items() if k != 'origin'})}", flush=True)
    return Prepared(base, packed, splits, info)


def run_finetune(cfg: FinetuneConfig, callbacks: list[Any] | None = None, prepared: Prepared | None = None) -> FinetuneResult:
    """Train, export best/final model directories, evaluate before/after; returns where everything is.

    `prepared` lets a search share one base model and one packed dataset across all its trials.
    """
    console.setup()
    run_dir, loc = run_dir_of(cfg), run_location(cfg)
    remote = storage.is_uri(loc)
    if remote:
        storage.check_writable(loc)  # a missing or unauthorised bucket fails here, before any worker starts
        pull_run_files(loc, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_CONFIG).write_text(to_yaml(cfg))
    prepared = prepared or prepare(cfg, run_dir)
    if remote:
        push_run_files(loc, run_dir)  # the config and the base before training, as a local run has them
    init_ray()
    tracked = start_tracking(cfg, run_dir)
    base, packed = prepared.base, prepared.packed
    if remote and Path(base) == run_dir / BASE_DIR:  # a base built here: every node reads the bucket's copy
        base = storage.join(loc, BASE_DIR)

    sc = cfg.scaling
    dp = plan_privacy(cfg, packed.blocks["train"])  # before any worker: a budget the steps would pass stops here
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "base": base, "privacy": dp and dp.to_dict()},
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=worker_bundle(sc)),
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=str(run_dir.parent) if "://" not in cfg.run.storage_path else cfg.run.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.eval.keep_top_k, checkpoint_score_attribute="val_loss",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=sc.max_failures),
            logging_config=console.train_logging(),
            callbacks=[ReportLog(str(run_dir / METRICS_LOG), storage.join(loc, METRICS_LOG) if remote else None),
                       *([TrackReports(tracked)] if tracked else []), *(callbacks or [])],
        ),
        datasets=shard_datasets(packed, sc.num_workers),
        dataset_config=make_data_config(),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{run_dir}: training reported no checkpoint (error: {result.error})")

    best_ckpt = result.get_best_checkpoint("val_loss", "min") or result.checkpoint
    best_metrics = next((m for c, m in (result.best_checkpoints or []) if c.path == best_ckpt.path), result.metrics)
    final_metrics = next((m for c, m in (result.best_checkpoints or []) if c.path == result.checkpoint.path), result.metrics)
    cfg_dict = cfg.model_dump(mode="json")
    export = ray.remote(_export_task).options(**_remote_options(cfg))
    best_dir, final_dir = str(run_dir / BEST_DIR), str(run_dir / FINAL_DIR)
    targets = {d: storage.join(loc, d) if remote else str(run_dir / d) for d in (BEST_DIR, FINAL_DIR)}
    dp_meta = {"privacy": dp.to_dict()} if dp else {}  # aigc.json: the plan beside the metrics' epsilon and delta
    meta = {"run": cfg.run.name, **dp_meta}
    best_export = (targets[BEST_DIR], best_metrics, {"role": "best", **meta})
    final_export = (targets[FINAL_DIR], final_metrics, {"role": "final", **meta})
    if best_ckpt.path == result.checkpoint.path:
        ray.get(export.remote(best_ckpt, [best_export, final_export], cfg_dict))
    else:
        ray.get([export.remote(best_ckpt, [best_export], cfg_dict), export.remote(result.checkpoint, [final_export], cfg_dict)])
    if remote:  # the driver evaluates and samples its own verified copies
        for d in (BEST_DIR, FINAL_DIR):
            shutil.rmtree(run_dir / d, ignore_errors=True)  # a previous attempt's copy
            storage.fetch_dir(targets[d], run_dir / d, verify=verify_model_dir)
    print(f"[aigc] exported best (step {best_metrics.get('step')}, val loss {best_metrics.get('val_loss'):.4f}) -> "
          f"{best_dir}", flush=True)

    out = FinetuneResult(str(run_dir), best_dir, final_dir, dict(result.metrics), dict(best_metrics),
                         data=prepared.data_info, location=storage.redact(loc) if remote else None)
    task = task_eval_inputs(cfg, prepared.splits)
    if cfg.run.evaluate:  # the tasks read the bucket's copies of an object-store run's models (any node)
        out.evaluation = evaluate_against_base(cfg, prepared, best_dir, task, base=base,
                                               read_from=targets[BEST_DIR] if remote else None)
    if cfg.run.samples:
        out.samples = sample_generations(best_dir, cfg.run.samples, task=task)
        for s in out.samples:
            print(f"[aigc] sample: {s['prompt']!r} -> {s['completion']!r}", flush=True)
    (run_dir / SUMMARY).write_text(json.dumps(asdict(out), indent=2, default=str))
    if remote:
        if out.evaluation:  # recorded in best's aigc.json: published again, marker last
            storage.publish_dir(best_dir, targets[BEST_DIR])
        push_run_files(loc, run_dir)
    if dp:
        print(f"[aigc] model card: {best_dir} was trained with differential privacy: "
              f"({best_metrics['epsilon']:.3f}, {dp.delta:g})-DP per training example (DP-SGD, noise multiplier "
              f"{dp.noise_multiplier:.4g}, clip {dp.max_grad_norm:g}, sample rate {dp.sample_rate:.4g}, "
              f"{dp.accountant} accountant)", flush=True)
    if tracked:
        finish_tracking(tracked, run_dir, out)
        if remote:
            push_run_files(loc, run_dir)  # its tracking record
    return out


def plan_privacy(cfg: FinetuneConfig, n_train_examples: int) -> DPPlan | None:
    """The run's DP-SGD plan (`aigc.privacy.plan`) from its config and the training rows, printed; None without
    privacy. Raises PrivacyBudgetError when the configured steps cannot stay within privacy.target_epsilon."""
    if not cfg.privacy.enabled:
        return None
    o = cfg.optim
    dp = plan(cfg.privacy, n_train_examples, cfg.scaling.num_workers, o.micro_batch_size * o.grad_accum,
                      o.max_steps)
    eps = projected_epsilon(dp, [], o.max_steps)
    print(f"[aigc] privacy: {dp.n_examples} examples, sample rate {dp.sample_rate:.4g}, noise multiplier "
          f"{dp.noise_multiplier:.4g}, clip {dp.max_grad_norm:g}: epsilon {eps:.3f} at delta {dp.delta:g} after "
          f"{o.max_steps} steps ({dp.accountant})", flush=True)
    return dp


def evaluate_before_after(cfg: FinetuneConfig, base: str, tuned: str, packed: PackedData,
                          task: TaskEval | None = None) -> dict:
    """The base and the fine-tuned model evaluated side by side on the test split, one Ray task each: test
    loss/perplexity, and the grammar-entropy ratio (embedded text) or the task metrics (`task`, from
    `aigc.evaluate.task_eval_inputs`: completion nats / floor, validity, fidelity, diversity)."""
    docs = None
    if cfg.data.source == "embedded" and cfg.data.format == "text":
        docs = _read_docs(ensure_embedded_corpus(cfg.data)["test"])
    remote = ray.remote(evaluate_model).options(**_remote_options(cfg))
    base_is_aigc = storage.exists(storage.join(base, METADATA))  # a local folder, a bucket's, or a hub id (no)
    test, task_ref = packed.datasets["test"], ray.put(task)  # the test rows travel once, not once per model
    before, after = ray.get([remote.remote(base, test, docs, base_is_aigc, task=task_ref),
                             remote.remote(tuned, test, docs, True, task=task_ref)])
    return {"base": before, "finetuned": after}


def evaluate_against_base(cfg: FinetuneConfig, prepared: Prepared, tuned: str, task: TaskEval | None, *,
                          base: str | None = None, read_from: str | None = None) -> dict:
    """`evaluate_before_after` of `tuned` against the prepared base (or `base`, where the tasks load it), recorded
    in `tuned`'s aigc.json and printed: what a run does with its best model and a search with its winner. The
    tasks load `read_from` when given (an object-store copy of `tuned`, which may be on another node)."""
    ev = evaluate_before_after(cfg, base or prepared.base, read_from or tuned, prepared.packed, task)
    record_evaluation(tuned, ev)
    print_comparison(ev)
    return ev


def record_evaluation(model_dir: str, evaluation: dict) -> None:
    """Add the before/after evaluation to the model directory's metadata (the weights are untouched)."""
    meta = read_metadata(model_dir)
    meta["evaluation"] = evaluation
    tmp = os.path.join(model_dir, f".{METADATA}.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, default=str)
    os.replace(tmp, os.path.join(model_dir, METADATA))


def print_comparison(ev: dict) -> None:
    """The base-vs-fine-tuned table (rows both sides have) and the fine-tuned model's example completions."""
    b, a = ev["base"], ev["finetuned"]
    print(f"[aigc] {'':34} {'base':>12} {'fine-tuned':>12}", flush=True)
    for label, before, after in comparison_rows(b, a):
        print(f"[aigc] {label:34} {before:>12} {after:>12}", flush=True)
    if "true_nats_per_doc" in a:
        print(f"[aigc] grammar entropy: {a['true_nats_per_doc']:.2f} nats per test document", flush=True)
    if "floor_nats_per_example" in a:
        print(f"[aigc] conditional floor: {a['floor_nats_per_example']:.2f} nats per test completion", flush=True)
    for line in example_lines(a):
        print(f"[aigc] fine-tuned example: {line}", flush=True)


DEMO_PROMPTS = ["Introducing the", "Save", "Our new", "Limited time:", "Discover"]  # text data only


def sample_generations(model_dir: str, n: int, max_tokens: int = 40, task: TaskEval | None = None) -> list[dict[str, str]]:
    """A few generations (temperature 0.7, top-p 0.95) from a model directory through the shared generation
    path: from the text DEMO_PROMPTS, or for task data (`task`) from the first test prompts, rendered and
    tokenised as training did, with up to `task.max_tokens` new tokens."""
    loaded = load_model(model_dir)
    if task is None:
        texts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(n)]
        prompts: list[Any] = texts
    else:
        if task.data.format == "chat":
            ensure_chat_template(loaded.tokenizer)
        pairs = [task_prompt(row, loaded.tokenizer, task.data.format) for row in task.examples[:n]]
        texts, prompts, max_tokens = [p[0] for p in pairs], [p[1] for p in pairs], task.max_tokens
    params = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=max_tokens, seed=0)
    outs = generate(loaded.model, loaded.tokenizer, prompts, params)
    return [{"prompt": p, "completion": o.text} for p, o in zip(texts, outs, strict=True)]


def clean_run(cfg: FinetuneConfig) -> None:
    """Delete a run's folder (used to start a run of the same name from scratch): its stored copy too."""
    if storage.is_uri(run_location(cfg)):
        storage.delete_dir(run_location(cfg))
    shutil.rmtree(run_dir_of(cfg), ignore_errors=True)
