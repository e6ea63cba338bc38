"""Ray Train + DeepSpeed ZeRO (or plain DDP, `aigc.ddp`) fine-tuning: a pure `train_loop_per_worker(config)`.

Per worker: load the base model through the shared loader, apply dropout and freezing, `deepspeed.initialize`
(ZeRO 1/2/3, optional CPU offload) on the process group Ray made, train on this worker's disjoint shard with
periodic validation, early stopping and checkpoints (every rank saves its ZeRO shard, then
`ray.train.report` merges them). Resume comes through `ray.train.get_checkpoint()`: model, optimizer,
scheduler, step and the data position are restored exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from aigc import console, storage
from aigc.config import FinetuneConfig, expand
from aigc.data import model_inputs, train_batches
from aigc.ddp import build_engine
from aigc.lora import save_adapter_config, trainable_model
from aigc.modeldir import load_model
from aigc.modeling import param_groups, set_dropout
from aigc.privacy import DPPlan, PoissonBatches, check_budget
from aigc.schedule import make_scheduler
from aigc.template import ensure_chat_template
from aigc.zero import deepspeed_config, resolve_precision

CKPT_TAG = "ds"  # DeepSpeed tag inside every reported checkpoint: <ckpt>/ds/...
HF_SUBDIR = "hf"  # HF config + tokenizer saved beside the shards so an export needs nothing else
# DeepSpeed's JIT-compiled ops that aigc's runs load, by the builder names DeepSpeed's accelerator knows: the CPU Adam
# of optimizer offload (on any accelerator) and, on CPU workers, the shared-memory collectives.
PREBUILT_OPS = ("CPUAdamBuilder", "ShareMemCommBuilder")


def print0(*args: Any) -> None:
    """Log on rank 0 only (nanochat's print0). Written straight to the process's stdout: Train V2 patches
    `print` into its logger, which tees to stdout again, so a plain print shows every line twice."""
    if ray.train.get_context().get_world_rank() == 0:
        console.Progress.write(" ".join(map(str, args)))


def _fmt_secs(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _all_reduce_sum(values: list[float], device: Any) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _validate(engine: Any, shard: Any, micro_batch: int, max_batches: int | None) -> tuple[float, int]:
    """Mean next-token loss over this worker's validation shard, reduced over all workers.

    Every rank runs the same number of forwards (equal shards), which ZeRO-3's parameter gathering needs.
    """
    engine.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(shard.iter_torch_batches(batch_size=micro_batch, dtypes=torch.long)):
            if max_batches is not None and i >= max_batches:
                break
            batch = model_inputs(batch, engine.device)
            out = engine(**batch)
            n = int((batch["labels"][:, 1:] != -100).sum())  # the model predicts positions 1..T-1
            total += float(out.loss) * n
            count += n
    engine.train()
    total, count = _all_reduce_sum([total, count], engine.device)
    return total / max(count, 1), int(count)


@dataclass
class WorkerModel:
    """One worker's model as it trains: its DeepSpeed engine (`engine`) and what the loop needs beside it."""

    engine: Any
    scheduler: Any
    tokenizer: Any
    ds_config: dict[str, Any]
    trainable: int
    total: int

    @property
    def precision(self) -> str:
        return "bf16" if self.ds_config["bf16"]["enabled"] else "fp16" if self.ds_config["fp16"]["enabled"] else "fp32"


def build_worker_model(cfg: FinetuneConfig, base: str, world_size: int, dp: DPPlan | None = None) -> WorkerModel:
    """Load the base model through the shared loader, apply dropout, gradient checkpointing and freezing,
    and `deepspeed.initialize` it with this run's ZeRO config on the current process group (zero.stage 0: the
    plain DDP engine of `aigc.ddp`, DP-SGD with `dp`). On a GPU (scaling.use_gpu) the engine lives on this
    process's CUDA device, in bf16 where the GPU has it."""
    o = cfg.optim
    use_cuda = cfg.scaling.use_gpu and torch.cuda.is_available()
    torch.manual_seed(o.seed)
    loaded = load_model(base, require_metadata=False)
    model, tokenizer = loaded.model.train(), loaded.tokenizer
    if cfg.data.format == "chat":
        ensure_chat_template(tokenizer)  # as aigc.finetune.prepare did; the checkpoints save it for Serve
    set_dropout(model, cfg.model.dropout)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model, trainable, total = trainable_model(model, cfg.model)  # freezing, or LoRA adapters on a frozen base
    ds_cfg = deepspeed_config(cfg, world_size, use_cuda, use_cuda and torch.cuda.is_bf16_supported())
    if cfg.zero.stage == 0:  # no DeepSpeed: the batch and precision arithmetic of ds_cfg still describes the run
        precision = resolve_precision(o.precision, use_cuda, use_cuda and torch.cuda.is_bf16_supported())
        engine = build_engine(model, o, ray.train.torch.get_device(), "fp32" if precision == "fp16" else precision, dp)
        return WorkerModel(engine, engine.scheduler, tokenizer, ds_cfg, trainable, total)
    # read when DeepSpeed builds or loads an op (torch.utils.cpp_extension, in deepspeed.initialize), not at import
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", ops_cache(cfg.run.torch_extensions_dir))
    # on call, in the worker: the driver imports this module too, and importing DeepSpeed detects the accelerator
    # (on a CPU machine without DS_ACCELERATOR it prints a warning to stdout)
    import deepspeed

    with environment_ninja():
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, o.weight_decay), config=ds_cfg,
            lr_scheduler=make_scheduler(o),
        )
    return WorkerModel(engine, scheduler, tokenizer, ds_cfg, trainable, total)


def ops_cache(root: str) -> str:
    """This Python environment's folder of DeepSpeed's compiled ops under `root` (`run.torch_extensions_dir`).

    A build records the environment's paths, and torch rebuilds an op whose recorded build differs: two
    environments sharing one folder (two checkouts, a fresh clone's CI beside a working tree) would each rebuild
    it (~25-35 s an op) after the other. One folder per environment (its name, not hidden, and a hash of its
    path) keeps both. An explicit TORCH_EXTENSIONS_DIR is used as it is."""
    env = f"{os.path.basename(sys.prefix).lstrip('.')}-{hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]}"
    return os.path.join(expand(root), env)


@contextmanager
def environment_ninja() -> Iterator[None]:
    """PATH with this Python environment's own `ninja` first (the `ninja` package DeepSpeed depends on), for as
    long as DeepSpeed may build or load an op.

    torch runs the first `ninja` on PATH, and ninja versions record a build's command under different hashes
    (1.11 and 1.13 do): an op built by one counts as changed for the other, which rebuilds it (~22 s). A machine
    with a system ninja then rebuilt the ops whenever processes with and without the environment's `bin` on
    PATH (a plain `.venv/bin/python`, `ray start` from an activated shell) took turns: four times in one run of
    the suite. One ninja per environment, like one ops folder per environment (`ops_cache`)."""
    try:
        import ninja

        bin_dir = ninja.BIN_DIR
    except (ImportError, AttributeError):  # no such package: torch finds whichever ninja it finds
        yield
        return
    before = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([bin_dir, *([before] if before else [])])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


def build_ops(extensions_dir: str | None = None) -> dict[str, str]:
    """Compile DeepSpeed's ops that aigc's runs load (`PREBUILT_OPS`) into the ops cache now, so that no run compiles
    them on its workers (~25-35 s each on 2 cores). The cache is this environment's folder (`ops_cache`) under
    `extensions_dir`, else TORCH_EXTENSIONS_DIR, else this environment's folder under `run.torch_extensions_dir`'s
    default: where the workers look. A build is valid for one machine and Python environment. Returns op name ->
    compiled library; an op this accelerator has no builder for is skipped. `make setup` calls it
    (`aigc build-ops`)."""
    from aigc.config import RunSection

    if extensions_dir:
        os.environ["TORCH_EXTENSIONS_DIR"] = ops_cache(extensions_dir)
    else:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", ops_cache(RunSection.model_fields["torch_extensions_dir"].default))
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    built = {}
    with environment_ninja():
        for name in PREBUILT_OPS:
            builder = get_accelerator().create_op_builder(name)
            if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
                continue
            built[builder.NAME] = builder.load(verbose=False).__file__
    return built


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DeepSpeed (or DDP) rank. `config` = {"cfg": FinetuneConfig as dict, "base": model path or hub id,
    "privacy": the driver's `aigc.privacy.DPPlan` as a dict, or None}."""
    cfg = FinetuneConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    o, ev = cfg.optim, cfg.eval
    dp = DPPlan(**config["privacy"]) if config.get("privacy") else None
    built = build_worker_model(cfg, config["base"], world, dp)
    engine, scheduler, tokenizer, ds_cfg = built.engine, built.scheduler, built.tokenizer, built.ds_config
    mode = f"ZeRO-{cfg.zero.stage}" if cfg.zero.stage else "DDP" + (" + DP-SGD" if dp else "")
    print0(f"[aigc] {world} workers | {mode} | {built.trainable:,}/{built.total:,} params trainable | "
           f"{ds_cfg['train_batch_size']} blocks x {cfg.data.block_size} tokens per step | precision {built.precision}")

    # Everything needed to continue exactly where a checkpoint left off.
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_val_loss": math.inf, "bad_evals": 0,
             "tokens_seen": 0, "train_seconds": 0.0, "stopped_early": False}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with storage.checkpoint_dir(ckpt) as d:  # each rank its own copy
            _, client_state = engine.load_checkpoint(d, tag=CKPT_TAG)
        # DeepSpeed returns its own metadata keys in client_state too; take back only ours
        state.update({k: v for k, v in (client_state or {}).items() if k in state})
        print0(f"[aigc] resumed from checkpoint at step {state['step']} (epoch {state['epoch']}, "
               f"batch {state['batch_in_epoch']})")

    train_shard = ray.train.get_dataset_shard(f"train_{rank}")  # cut on the driver, see aigc.data.shard_datasets
    val_shard = ray.train.get_dataset_shard(f"validation_{rank}")
    poisson = None
    if dp:  # DP-SGD samples its batches (Poisson, per example) instead of walking the shuffled shard
        poisson = PoissonBatches.from_shard(train_shard, dp.sample_rate, o.grad_accum, o.seed, rank)
        if poisson.n * world != dp.n_examples:
            raise RuntimeError(f"privacy: the driver planned for {dp.n_examples} examples, the workers hold "
                               f"{poisson.n} x {world}")
        eps_end = check_budget(dp, engine.accountant.history, o.max_steps - state["step"])
        print0(f"[aigc] DP-SGD: noise multiplier {dp.noise_multiplier:.4g} | clip {dp.max_grad_norm:g} | sample rate "
               f"{dp.sample_rate:.4g} | epsilon {engine.epsilon():.3f} now, {eps_end:.3f} at step {o.max_steps} "
               f"(delta {dp.delta:g}, {dp.accountant})")
    last_reported = state["step"] if ckpt else -1

    def checkpoint_and_report(train_loss: float, tokens_per_s: float, final: bool) -> None:
        nonlocal last_reported
        val_loss, _ = _validate(engine, val_shard, o.micro_batch_size, ev.max_batches)
        if val_loss < state["best_val_loss"] - ev.min_delta:
            state["best_val_loss"], state["bad_evals"] = val_loss, 0
        else:
            state["bad_evals"] += 1
        if ev.patience is not None and state["bad_evals"] >= ev.patience:
            state["stopped_early"] = True
        metrics = {
            "step": state["step"], "epoch": state["epoch"], "train_loss": train_loss, "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)), "best_val_loss": state["best_val_loss"],
            "lr": scheduler.get_last_lr()[0], "tokens_seen": state["tokens_seen"], "tokens_per_s": tokens_per_s,
            "train_seconds": state["train_seconds"], "trainable_params": built.trainable, "total_params": built.total,
            "stopped_early": state["stopped_early"], "done": final or state["stopped_early"],
            **({"epsilon": engine.epsilon(), "delta": dp.delta} if dp else {}),
        }
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag=CKPT_TAG, client_state=dict(state))  # every rank: its own shard files
            if rank == 0:
                engine.module.config.save_pretrained(os.path.join(d, HF_SUBDIR))
                tokenizer.save_pretrained(os.path.join(d, HF_SUBDIR))
                save_adapter_config(engine.module, os.path.join(d, HF_SUBDIR))  # LoRA: what the export rebuilds
                with open(os.path.join(d, "metrics.json"), "w") as f:
                    json.dump(metrics, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        last_reported = state["step"]
        print0(f"[aigc] {cfg.run.name} step {state['step']:>5} | val loss {val_loss:.4f} | val ppl {metrics['val_ppl']:.2f} | "
               f"best {state['best_val_loss']:.4f}" + (f" | epsilon {metrics['epsilon']:.3f}" if dp else "")
               + (" | early stop" if state["stopped_early"] else ""))

    t0, tokens0, step0 = time.time(), state["tokens_seen"], state["step"]
    window_loss, window_n, train_loss = 0.0, 0, float("nan")
    t_prev = time.perf_counter()
    # rank 0 shows the steps: a bar on the driver's terminal, else a line every eval.log_every steps
    progress = console.Progress(o.max_steps, cfg.run.name, initial=state["step"]) if rank == 0 else None
    while state["step"] < o.max_steps and not state["stopped_early"]:
        skip = state["batch_in_epoch"]
        bucket = cfg.data.format != "text" and not cfg.data.packing  # one example per row: batch by length
        batches = (poisson.epoch(state["epoch"]) if poisson else
                   train_batches(train_shard, o.micro_batch_size, o.seed + state["epoch"], bucket))
        for i, batch in enumerate(batches):
            if i < skip:  # exact resume: the shard and its shuffle are deterministic, so skip what was seen
                continue
            n_tokens = int(batch["n_tokens"].sum())
            loss = engine(**model_inputs(batch, engine.device)).loss
            engine.backward(loss)
            engine.step()
            now = time.perf_counter()
            state["train_seconds"] += now - t_prev  # data + compute; validation and checkpoints excluded
            t_prev = now
            state["batch_in_epoch"] = i + 1
            state["tokens_seen"] += n_tokens * world  # equal shards: same on every rank
            window_loss += float(loss.detach())
            window_n += 1
            if engine.global_steps == state["step"]:
                continue  # inside a gradient-accumulation window
            state["step"] = engine.global_steps
            step = state["step"]
            if progress:
                progress.update(step)
            if step % ev.log_every == 0 or step == o.max_steps:
                train_loss = _all_reduce_sum([window_loss / window_n], engine.device)[0] / world
                window_loss, window_n = 0.0, 0
                elapsed = time.time() - t0
                tps = (state["tokens_seen"] - tokens0) / max(elapsed, 1e-9)
                eta = elapsed / max(step - step0, 1) * (o.max_steps - step)
                if progress:
                    progress.log(f"[aigc] {cfg.run.name} step {step:>5}/{o.max_steps} | loss {train_loss:.4f} | "
                                 f"lr {scheduler.get_last_lr()[0]:.2e} | {tps / 1e3:.1f}k tok/s | eta {_fmt_secs(eta)}",
                                 short=f"loss {train_loss:.4f} | {tps / 1e3:.1f}k tok/s")
            if step % ev.every_steps == 0 or step == o.max_steps:
                tps = (state["tokens_seen"] - tokens0) / max(time.time() - t0, 1e-9)
                checkpoint_and_report(train_loss, tps, final=step == o.max_steps)
                t_prev = time.perf_counter()
            if step >= o.max_steps or state["stopped_early"]:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            continue
        break
    if progress:
        progress.close()
    if last_reported != state["step"]:  # ended between validations (e.g. max_steps not a multiple)
        checkpoint_and_report(train_loss, 0.0, final=True)
