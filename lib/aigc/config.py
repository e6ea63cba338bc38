"""One config system: typed pydantic models per concern, layered defaults -> YAML -> `a.b=value`.

Every problem (unknown key, wrong type, bad range, inconsistent combination) is collected and
raised once as :class:`ConfigError`, named by its full dotted key, before any Ray resource is used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aigc import storage
from aigc.layout import staging_dir


class ConfigError(ValueError):
    """A configuration is invalid; `problems` lists every problem as 'full.key: message'."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"invalid {source} ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- data


class EmbeddedCorpus(Strict):
    """The commerce ad-copy corpus the package generates (see `aigc.corpus`); used when no files are given."""

    n_train: int = Field(4000, ge=1, description="documents in the train split")
    n_validation: int = Field(400, ge=1, description="documents in the validation split")
    n_test: int = Field(400, ge=1, description="documents in the test split")
    seed: int = Field(0, description="seed of the grammar sampler")


class DataSection(Strict):
    """Where the text comes from and how it becomes fixed-length training blocks."""

    source: Literal["embedded", "files", "hub"] = Field(
        "embedded", description="embedded corpus, local files, or a dataset name for `datasets.load_dataset`"
    )
    train_files: list[str] = Field(default_factory=list, description="local .txt/.jsonl/.json/.csv/.parquet files")
    validation_files: list[str] = Field(default_factory=list, description="validation files; empty -> carve by ratio")
    test_files: list[str] = Field(default_factory=list, description="test files; empty -> carve by ratio")
    hub_name: str | None = Field(None, description="dataset name (or path) for `datasets.load_dataset`")
    hub_config: str | None = Field(None, description="dataset configuration name, if the dataset has several")
    format: Literal["text", "prompt_completion", "chat"] = Field(
        "text",
        description="text: plain documents packed with EOS between them; prompt_completion: rows with a prompt and a "
        "completion (OpenAI legacy fine-tuning JSONL), loss on the completion; chat: rows with `messages: [{role, "
        "content}, ...]` (OpenAI chat fine-tuning JSONL), loss on the assistant turns",
    )
    text_column: str = Field("text", min_length=1, description="column holding the documents (format text)")
    prompt_column: str = Field("prompt", min_length=1, description="column holding the prompt (format prompt_completion)")
    completion_column: str = Field(
        "completion", min_length=1, description="column holding the completion (format prompt_completion)"
    )
    input_column: str | None = Field(
        None,
        description="optional column appended to the prompt after a blank line when non-empty: alpaca-style files use "
        "prompt_column=instruction, input_column=input, completion_column=output (format prompt_completion)",
    )
    prompt_suffix: str = Field(
        "",
        description="text appended to every prompt, e.g. '\\n' or OpenAI's legacy separator '\\n\\n###\\n\\n'; send "
        "prompts with the same suffix at inference (format prompt_completion)",
    )
    messages_column: str = Field("messages", min_length=1, description="column holding the conversation (format chat)")
    train_on_prompt: bool = Field(
        False,
        description="also learn the prompt (system and user turns for chat); false: labels are -100 everywhere but "
        "the completion / assistant turns",
    )
    packing: bool = Field(
        True,
        description="task formats: several examples share a block, each attending only to itself (position ids reset "
        "per example); false: one example per row, padded per batch with length bucketing. Text is always packed",
    )
    truncation: Literal["error", "drop", "truncate_prompt_left"] = Field(
        "error",
        description="an example longer than block_size: fail naming its row, drop it (counted), or cut the prompt "
        "from the left (the completion is never cut; one that cannot fit is dropped and counted)",
    )
    split_ratios: tuple[float, float, float] = Field(
        (0.9, 0.05, 0.05), description="train/validation/test fractions used when splits are carved from one set"
    )
    split_seed: int = Field(0, description="seed of the carve, so the splits are the same on every run")
    block_size: int = Field(
        128, ge=8, le=65536,
        description="tokens per training block (documents packed, EOS between); for task formats the longest example",
    )
    scrub_pii: bool = Field(False, description="replace e-mails, phones, card and national ID numbers before tokenising")
    embedded: EmbeddedCorpus = Field(default_factory=EmbeddedCorpus, description="the generated corpus (source embedded)")

    @model_validator(mode="after")
    def _keys_fit_the_format(self) -> DataSection:
        """A key changed for another format would be silently ignored; say so instead. (Compared with the
        defaults, not `model_fields_set`: a dumped and re-validated config sets every key.)"""
        only = {"text": ("text_column",), "chat": ("messages_column",),
                "prompt_completion": ("prompt_column", "completion_column", "input_column", "prompt_suffix")}
        only["chat"] += ("train_on_prompt", "truncation")
        only["prompt_completion"] += ("train_on_prompt", "truncation")
        unused = {k for fmt, keys in only.items() if fmt != self.format for k in keys} - set(only[self.format])
        if self.format == "text":
            unused.add("packing")
        wrong = sorted(k for k in unused if getattr(self, k) != type(self).model_fields[k].default)
        if wrong:
            raise ValueError(f"data.{', data.'.join(wrong)}: not used with data.format={self.format!r}")
        return self


# -------------------------------------------------------------------------------------------- model


class TinyArch(Strict):
    """A GPT-2-style architecture built from a config (no pretrained weights): the embedded default."""

    n_layer: int = Field(2, ge=1, description="transformer blocks")
    n_embd: int = Field(64, ge=8, description="width of the residual stream (a multiple of n_head)")
    n_head: int = Field(2, ge=1, description="attention heads per block")
    vocab_size: int = Field(512, ge=260, description="size of the byte-level BPE vocabulary trained on the train split")


# `model.name_or_path: embedded` names the embedded pre-trained base (built once, cached: see aigc.pretrain)
EMBEDDED_BASE = "embedded"
# The tiny GPT-2 gets at least this many positions, so a base pre-trained on short blocks fine-tunes on longer ones.
MIN_POSITIONS = 256


class PretrainRecipe(Strict):
    """The embedded base (`model.name_or_path: embedded`): a tiny GPT-2 pre-trained on unconditional ad copy,
    its BPE tokenizer trained there, cached under `run.base_cache` by a hash of this section (without
    `num_workers`), so it is built once per machine. Sized so that pre-training takes a few minutes on 2 cores:
    4 x 128 wide, vocabulary 512 = 0.89M parameters; 600 steps x 32 blocks x 128 tokens = 2.5M tokens, about
    1.6 passes over 20,000 documents of ~75 tokens."""

    arch: TinyArch = Field(default_factory=lambda: TinyArch(n_layer=4, n_embd=128, n_head=4, vocab_size=512),
                           description="the base's architecture and tokenizer vocabulary")
    corpus: EmbeddedCorpus = Field(
        default_factory=lambda: EmbeddedCorpus(n_train=20000, n_validation=500, n_test=500, seed=1),
        description="the unconditional ad corpus it learns from (seed 1: not the fine-tuning splits of seed 0)",
    )
    block_size: int = Field(128, ge=8, le=4096, description="tokens per pre-training block")
    max_steps: int = Field(600, ge=1, description="optimizer steps of pre-training")
    batch_size: int = Field(32, ge=1, description="blocks per optimizer step, over all workers together")
    lr: float = Field(3e-3, gt=0.0, le=1.0, description="peak learning rate (cosine decay to 10%)")
    warmup_steps: int = Field(30, ge=0, description="linear warmup steps")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW decoupled weight decay")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout while pre-training (kept in the base's config)")
    eval_every: int = Field(100, ge=1, description="validate every N steps; the base is the best validated step")
    seed: int = Field(0, description="seed of the initial weights and of the data order")
    num_workers: int = Field(
        2, ge=1, description="Train workers that pre-train (not part of the cache key: same recipe, same base)"
    )


class PeftSection(Strict):
    """Parameter-efficient fine-tuning with the `peft` library: LoRA adapters on a frozen base (aigc.lora)."""

    method: Literal["none", "lora", "qlora"] = Field(
        "none", description="none: train the model's own weights (model.train_top_n_blocks); lora: train low-rank "
                            "adapters on the frozen base; qlora: LoRA on a 4-bit base (bitsandbytes, CUDA only)"
    )
    r: int = Field(8, gt=0, description="LoRA rank: the inner width of each adapter (B @ A is out x r x in)")
    alpha: float = Field(16.0, gt=0.0, description="LoRA scaling numerator: the update is (alpha / r) * B @ A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input (0 keeps resume exact)")
    target_modules: list[str] | None = Field(
        None, description="module names (suffixes) that get adapters; None: the architecture's default (GPT-2: "
                          "c_attn, c_proj, c_fc; Llama-style: q/k/v/o_proj, gate/up/down_proj)"
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="modules trained in full beside the adapters and saved with them "
                                          "(e.g. ln_f, the final norm)"
    )
    resume_adapter: str | None = Field(
        None, description="an exported model directory holding an adapter whose training continues here (its own "
                          "r, alpha and targets; model.name_or_path must be the base it was trained on)"
    )

    def problems(self, use_gpu: bool, train_top_n_blocks: int | None) -> list[str]:
        """What this section cannot do with the rest of the config; keys named in full."""
        key, out = "model.peft", []
        if self.method == "none":
            changed = [k for k, f in type(self).model_fields.items()
                       if k != "method" and getattr(self, k) != f.get_default(call_default_factory=True)]
            return [f"{key}.{k}: not used with {key}.method='none' (set {key}.method=lora)" for k in changed]
        if self.method == "qlora":
            out.append(f"{key}.method: qlora loads the base in 4-bit with bitsandbytes, which needs CUDA GPUs: "
                       "set scaling.use_gpu=true or use method: lora" if not use_gpu else
                       f"{key}.method: qlora (4-bit base) is not supported under DeepSpeed ZeRO here; use method: lora")
        if train_top_n_blocks:
            out.append(f"model.train_top_n_blocks: {train_top_n_blocks} with {key}.method={self.method}: an adapter "
                       f"cannot carry whole trained blocks; use 0 or null (adapters only) and list modules to train "
                       f"in full in {key}.modules_to_save")
        return out


class ModelSection(Strict):
    """The base model: a hub id or local directory for `from_pretrained`, the embedded pre-trained base, or a
    tiny GPT-2 built from `arch`."""

    name_or_path: str | None = Field(
        None, description="hub id (e.g. 'gpt2') or local model directory; 'embedded': the embedded pre-trained base "
                          "(model.pretrain, cached); None: a random tiny GPT-2 from model.arch, tokenizer trained "
                          "on the train split"
    )
    arch: TinyArch = Field(default_factory=TinyArch, description="the tiny GPT-2 built when name_or_path is None")
    pretrain: PretrainRecipe = Field(default_factory=PretrainRecipe,
                                     description="how the embedded base is pre-trained (model.name_or_path=embedded)")
    dropout: float | None = Field(
        None, ge=0.0, lt=1.0, description="residual/attention/embedding dropout; None keeps the model's own"
    )
    train_top_n_blocks: int | None = Field(
        None, ge=0, description="freeze all but the top N transformer blocks (+ final norm); None trains everything"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    peft: PeftSection = Field(default_factory=PeftSection, description="LoRA adapters instead of full fine-tuning")


# ------------------------------------------------------------------------------------- optimisation


class OptimSection(Strict):
    """AdamW with decoupled weight decay (none on biases and norms), warmup then decay."""

    lr: float = Field(3e-3, gt=0.0, le=1.0, description="peak learning rate, reached at the end of warmup")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW decoupled weight decay (not on biases/norms)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW (beta1, beta2) moment decay rates")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon added to the denominator")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="decay after warmup, from lr down to lr * min_lr_ratio at max_steps"
    )
    warmup_steps: int = Field(20, ge=0, description="optimizer steps of linear warmup from ~0 to lr")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final lr as a fraction of lr")
    max_steps: int = Field(300, ge=1, description="optimizer steps (each = micro_batch * grad_accum * workers blocks)")
    micro_batch_size: int = Field(8, ge=1, description="blocks per worker per forward")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    grad_clip: float = Field(1.0, ge=0.0, description="global gradient-norm clip; 0 disables")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 on CPU"
    )
    seed: int = Field(0, description="seed of torch on every worker, the tiny model's weight init and the data shuffle")


class ZeroSection(Strict):
    """DeepSpeed ZeRO: what is partitioned across workers and what is offloaded to host memory."""

    stage: Literal[0, 1, 2, 3] = Field(
        2, description="0: plain PyTorch DDP without DeepSpeed (every worker holds everything; cheaper for small models, "
        "and what privacy.enabled needs); 1 optimizer state, 2 + gradients, 3 + parameters partitioned across workers",
    )
    offload_optimizer: bool = Field(False, description="optimizer state in CPU memory (DeepSpeedCPUAdam)")
    offload_param: bool = Field(False, description="parameters in CPU memory (stage 3 only)")
    overlap_comm: bool = Field(True, description="overlap gradient reduction with backward")
    param_persistence_threshold: int | None = Field(
        None, ge=0, description="stage 3: parameters with fewer elements stay whole on every rank "
                                "(stage3_param_persistence_threshold); None keeps DeepSpeed's 1e5; 0 shards all"
    )


class ExportSection(Strict):
    """What an exported model directory holds beside the tokenizer and aigc.json."""

    merge: bool = Field(
        True, description="LoRA: also write the merged full model (what plain transformers and vLLM load); false: "
                          "the adapter only, loaded onto its recorded base by aigc.modeldir.load_model"
    )


class PrivacySection(Strict):
    """Differentially private fine-tuning (DP-SGD with Opacus, `aigc.privacy`): each example's gradient is clipped
    to `max_grad_norm` and Gaussian noise is added to their sum, on batches drawn by Poisson sampling. The
    guarantee is (epsilon, delta) per training example: one row of the data (a prompt/completion pair or a
    conversation). Needs zero.stage=0 and one example per row (data.packing=false); per-example clipping replaces
    optim.grad_clip."""

    enabled: bool = Field(False, description="train with DP-SGD; the other keys are used only when true")
    target_epsilon: float | None = Field(
        None, gt=0.0, description="epsilon the whole run may spend at delta: the noise multiplier is calibrated so "
        "optim.max_steps reach it (give this or noise_multiplier)",
    )
    noise_multiplier: float | None = Field(
        None, gt=0.0, description="noise std / max_grad_norm, fixed (give this or target_epsilon); epsilon is reported",
    )
    delta: float | None = Field(
        None, gt=0.0, lt=1.0, description="delta of the guarantee; None: 1/N rounded down to a power of ten, N the "
        "training examples (1,500 -> 1e-4)",
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="per-example gradient clip (L2 norm over trainable parameters)")
    accountant: Literal["rdp", "prv"] = Field(
        "prv", description="privacy accountant: prv (privacy random variables, tighter) or rdp (Renyi DP)"
    )


class ScalingSection(Strict):
    """Ray Train workers: one DeepSpeed rank each."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (DeepSpeed ranks, data-parallel)")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL; false: CPU workers with gloo")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs Ray reserves for each worker")
    gpus_per_worker: float = Field(1.0, gt=0.0, description="used when use_gpu")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the last checkpoint; -1 = unlimited")


class EvalSection(Strict):
    """Periodic validation, early stopping and checkpoint retention; the size of the task evaluation."""

    every_steps: int = Field(50, ge=1, description="validate (and checkpoint) every N optimizer steps")
    max_batches: int | None = Field(None, ge=1, description="cap validation batches per worker; None = whole split")
    patience: int | None = Field(5, ge=1, description="stop after N validations without improvement; None = never")
    min_delta: float = Field(0.0, ge=0.0, description="improvement smaller than this does not count")
    keep_top_k: int = Field(2, ge=1, description="checkpoints kept by lowest validation loss (latest is kept too)")
    log_every: int = Field(10, ge=1, description="rank-0 progress line every N steps")
    task_examples: int = Field(
        200, ge=1,
        description="task data (prompt_completion, chat): test prompts the before/after evaluation generates a "
        "greedy and a sampled completion for (validity, fidelity, distinct-2, memorisation)",
    )
    task_max_tokens: int = Field(
        128, ge=1, description="task data: new tokens at most per evaluation generation (an embedded ad is <= ~100)"
    )


class RunSection(Strict):
    """Names and storage: re-running the same name continues from its latest checkpoint."""

    name: str = Field(
        "tiny-cpu", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="the run's folder under storage_path; the same name resumes from its latest checkpoint",
    )
    storage_path: str = Field(
        "~/aigc/runs", description="a local folder, or on a multi-node cluster an object store URI (s3://bucket/path, "
        "gs://...; endpoint and credentials from the AWS environment or the URI's query: aigc.storage) or a folder "
        "every node shares (EFS/NFS)"
    )
    torch_extensions_dir: str = Field(
        "~/.cache/aigc/torch_extensions",
        description="where DeepSpeed caches compiled ops, a folder per Python environment under it (TORCH_EXTENSIONS_DIR, "
                    "when set, is used as it is): `aigc build-ops` fills it (make setup runs it); a run that finds an "
                    "op missing compiles it on its workers, ~25-35 s each"
    )
    samples: int = Field(3, ge=0, description="generations printed from the fine-tuned model at the end")
    evaluate: bool = Field(True, description="test perplexity of base and fine-tuned model after training")
    base_cache: str = Field(
        "~/aigc/bases", description="where embedded pre-trained bases are cached, one folder per config hash; on a "
                                    "multi-node cluster an object store URI (s3://bucket/bases) or a folder every node "
                                    "shares"
    )


class TrackingSection(Strict):
    """Experiment tracking and the model registry (MLflow, from the driver side only, see `aigc.tracking`): the
    config as flattened params, the metrics of every validation, the before/after tables and reports as
    artifacts, and each exported model as a version of a registered model (aliases `champion`, `challenger`)."""

    enabled: bool = Field(True, description="false: nothing is logged and no tracking file or database is written")
    uri: str | None = Field(
        None, pattern=r"^[A-Za-z][A-Za-z0-9+.-]*:",
        description="MLflow tracking URI, e.g. http://mlflow.internal:5000 for a shared server or "
                    "postgresql://...; None: sqlite:///<storage root>/mlflow.db (a file, nothing to start; the "
                    "storage root is run.storage_path for a fine-tune, search.storage_path for a search)",
    )
    experiment: str = Field(
        "aigc", min_length=1, max_length=500,
        description="MLflow experiment the runs go to; created on first use with its artifacts under the storage "
                    "root (a shared server keeps its own artifact store)",
    )
    registered_model: str = Field(
        "aigc", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,249}$",
        description="registered model whose versions the exported models become: alias `challenger` is the last "
                    "candidate, `champion` what Serve runs",
    )


class FinetuneConfig(Strict):
    """Everything one fine-tuning run needs; `jobs/finetune.py` loads it."""

    run: RunSection = Field(default_factory=RunSection, description="the run's name, storage and final steps")
    data: DataSection = Field(default_factory=DataSection, description="where the text comes from, how it is blocked")
    model: ModelSection = Field(default_factory=ModelSection, description="the base model and what of it trains")
    optim: OptimSection = Field(default_factory=OptimSection, description="optimizer, schedule, batch and precision")
    zero: ZeroSection = Field(default_factory=ZeroSection, description="DeepSpeed ZeRO partitioning and offload")
    scaling: ScalingSection = Field(default_factory=ScalingSection, description="Ray Train workers and their resources")
    eval: EvalSection = Field(default_factory=EvalSection, description="validation, early stopping, checkpoints kept")
    export: ExportSection = Field(default_factory=ExportSection, description="what the exported model directory holds")
    privacy: PrivacySection = Field(default_factory=PrivacySection,
                                    description="differentially private fine-tuning (DP-SGD): epsilon, delta, clipping")
    tracking: TrackingSection = Field(default_factory=TrackingSection,
                                      description="MLflow tracking of the run and registry of its best model")

    def problems(self) -> list[str]:
        """Cross-field checks that no single field can make; each names the keys involved."""
        out = []
        d, z, m, o = self.data, self.zero, self.model, self.optim
        if abs(sum(d.split_ratios) - 1.0) > 1e-6 or min(d.split_ratios) < 0:
            out.append(f"data.split_ratios: must be three non-negative fractions summing to 1, got {d.split_ratios}")
        if d.source == "files" and not d.train_files:
            out.append("data.train_files: required when data.source is 'files'")
        if d.source == "hub" and not d.hub_name:
            out.append("data.hub_name: required when data.source is 'hub'")
        if d.source != "files" and (d.train_files or d.validation_files or d.test_files):
            out.append(f"data.train_files: files are given but data.source is '{d.source}'; set data.source=files")
        if bool(d.validation_files) != bool(d.test_files):
            out.append("data.validation_files: give both validation_files and test_files, or neither (carve by ratio)")
        if z.offload_param and z.stage != 3:
            out.append(f"zero.offload_param: needs zero.stage=3, got zero.stage={z.stage}")
        if z.param_persistence_threshold is not None and z.stage != 3:
            out.append(f"zero.param_persistence_threshold: only used with zero.stage=3, got zero.stage={z.stage}")
        out += m.peft.problems(self.scaling.use_gpu, m.train_top_n_blocks)
        if not self.export.merge and m.peft.method == "none":
            out.append("export.merge: false only applies to adapters (model.peft.method=lora); a full fine-tune "
                       "always exports its whole model")
        if z.offload_optimizer and z.stage == 0:
            out.append("zero.offload_optimizer: needs zero.stage >= 1")
        if o.precision == "fp16" and not self.scaling.use_gpu:
            out.append("optim.precision: fp16 needs scaling.use_gpu=true (CPU trains in fp32 or bf16)")
        if m.name_or_path is None and m.arch.n_embd % m.arch.n_head:
            out.append(f"model.arch.n_head: must divide model.arch.n_embd ({m.arch.n_embd} % {m.arch.n_head} != 0)")
        if m.name_or_path is None and d.block_size > 4096:
            out.append("data.block_size: the embedded tiny model supports at most 4096 positions")
        if m.name_or_path == EMBEDDED_BASE:
            out += _pretrain_problems(m.pretrain, d.block_size)
            if problem := storage.scheme_problem(self.run.base_cache):
                out.append(f"run.base_cache: {problem}")
        if o.warmup_steps >= o.max_steps:
            out.append(f"optim.warmup_steps: must be below optim.max_steps ({o.warmup_steps} >= {o.max_steps})")
        if problem := storage.scheme_problem(self.run.storage_path):
            out.append(f"run.storage_path: {problem}")
        if self.eval.every_steps > o.max_steps:
            out.append(f"eval.every_steps: {self.eval.every_steps} > optim.max_steps={o.max_steps}: nothing would be validated")
        if z.stage == 0 and o.precision == "fp16":
            out.append("optim.precision: zero.stage=0 (plain DDP) trains in fp32 or bf16, not fp16")
        return out + _privacy_problems(self)


def _privacy_problems(cfg: FinetuneConfig) -> list[str]:
    """DP-SGD's requirements on the rest of the config (see PrivacySection)."""
    p, d = cfg.privacy, cfg.data
    if not p.enabled:
        changed = sorted(k for k in type(p).model_fields if k != "enabled"
                         and getattr(p, k) != type(p).model_fields[k].default)
        return [f"privacy.{k}: not used with privacy.enabled=false" for k in changed]
    out = []
    if (p.target_epsilon is None) == (p.noise_multiplier is None):
        out.append("privacy.target_epsilon: give exactly one of privacy.target_epsilon and privacy.noise_multiplier")
    if cfg.zero.stage != 0:
        out.append(f"privacy.enabled: needs zero.stage=0 (plain DDP), got zero.stage={cfg.zero.stage}: Opacus clips and "
                   "noises each example's gradient on the real parameters before the workers reduce them, while ZeRO "
                   "replaces the parameters with flat partitioned buffers and reduces the gradients itself")
    if d.format == "text":
        out.append("privacy.enabled: needs one example per row, but data.format=text packs documents into blocks (a "
                   "block mixes documents, a document spans blocks); use data.format=prompt_completion or chat with "
                   "data.packing=false")
    elif d.packing:
        out.append("privacy.enabled: needs data.packing=false: the unit sampled and clipped must be one example (one row "
                   "of the data), not a packed block of several")
    if cfg.model.gradient_checkpointing:
        out.append("privacy.enabled: model.gradient_checkpointing is not supported: the recomputed forward would record "
                   "each layer's activations for the per-example gradients twice")
    return out


def _pretrain_problems(p: PretrainRecipe, block_size: int) -> list[str]:
    """What the embedded base's own recipe must satisfy (checked when a config fine-tunes from it)."""
    out, key = [], "model.pretrain"
    if p.arch.n_embd % p.arch.n_head:
        out.append(f"{key}.arch.n_head: must divide {key}.arch.n_embd ({p.arch.n_embd} % {p.arch.n_head} != 0)")
    if p.batch_size % p.num_workers:
        out.append(f"{key}.batch_size: {p.batch_size} blocks do not split evenly over {key}.num_workers={p.num_workers}")
    if p.warmup_steps >= p.max_steps:
        out.append(f"{key}.warmup_steps: must be below {key}.max_steps ({p.warmup_steps} >= {p.max_steps})")
    if p.eval_every > p.max_steps:
        out.append(f"{key}.eval_every: {p.eval_every} > {key}.max_steps={p.max_steps}: nothing would be validated")
    positions = max(p.block_size, MIN_POSITIONS)
    if block_size > positions:
        out.append(f"data.block_size: {block_size} tokens, but the embedded base has {positions} positions "
                   f"(max of {key}.block_size and {MIN_POSITIONS})")
    return out


# ------------------------------------------------------------------------------------------ loading

C = TypeVar("C", bound=Strict)


def parse_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """`a.b=value` strings -> nested dict; values parse as YAML scalars/lists (`lr=1e-3`, `files=[a,b]`)."""
    tree: dict[str, Any] = {}
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"{item!r}: overrides look like section.key=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            problems.append(f"{key}: cannot parse value {raw!r}: {e}")
            continue
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                problems.append(f"{key}: conflicts with an earlier override of {part}")
                break
            node = nxt
        else:
            node[parts[-1]] = value
    return tree, problems


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `top` wins; neither input is modified."""
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _format_errors(err: ValidationError, prefix: str = "") -> list[str]:
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        key = f"{prefix}{key}" if key else prefix.rstrip(".") or "<root>"
        if e["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key")
        else:
            problems.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return problems


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping from a file; a missing file or a non-mapping document is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"{p}: no such config file"])
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{p}: not valid YAML: {e}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: the top level must be a mapping of sections, got {type(data).__name__}"])
    return data


def build(model: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Validate a plain dict against `model`, raising one ConfigError with every problem."""
    try:
        cfg = model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e), source) from None
    problems = cfg.problems() if hasattr(cfg, "problems") else []
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(model: type[C], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> C:
    """Code defaults, then the YAML file, then `a.b=value` overrides; every problem reported at once."""
    data = read_yaml(path) if path else {}
    tree, problems = parse_overrides(overrides or [])
    if problems:
        raise ConfigError(problems, "overrides")
    return build(model, deep_merge(data, tree), str(path or "config"))


def to_yaml(cfg: BaseModel) -> str:
    """The fully resolved config as YAML (what a run actually used)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def expand(path: str) -> str:
    """`~` and env vars expanded; URIs (`s3://...`) untouched."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(os.path.expandvars(path)))


def run_location(cfg: FinetuneConfig) -> str:
    """Where the run is stored: `<run.storage_path>/<run.name>`, a local folder or an object-store URI."""
    return storage.join(expand(cfg.run.storage_path), cfg.run.name)


def run_dir_of(cfg: FinetuneConfig) -> Path:
    """The run's local folder: the run folder itself, or for an object-store run the driver's staging copy
    (keyed by the location, so two buckets' runs of one name stay apart)."""
    loc = run_location(cfg)
    return staging_dir(loc, cfg.run.name) if storage.is_uri(loc) else Path(loc)
