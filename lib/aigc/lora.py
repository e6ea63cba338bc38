"""LoRA with the `peft` library: which modules get adapters, the checks made before any worker starts, the
adapter on a worker's model, and the export of a trained adapter from a ZeRO checkpoint.

Under ZeRO-3 an adapter's tensors live as shards on every rank; a `save_pretrained` on rank 0 alone writes
size-0 tensors (peft#2892). aigc never saves the adapter from a worker: every rank saves its DeepSpeed shard
(as full fine-tuning does) and the export consolidates the fp32 master weights with DeepSpeed's
`zero_to_fp32` (way (c) of shared/probe/round2/NOTES.md), keeps the `lora_` and `modules_to_save` tensors,
and puts them on the base's original weights. Resume is DeepSpeed's own `load_checkpoint` of the same
PeftModel: adapter, Adam moments, step and lr restored exactly.

The layout of an exported adapter and its base fingerprint are `aigc.modeldir`'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from aigc.config import FinetuneConfig, ModelSection, PeftSection
from aigc.modeldir import (
    METADATA,
    ModelDirError,
    check_adapter_base,
    load_adapter,
    load_model,
    local_dir,
    read_metadata,
    save_adapter_dir,
    verify_model_dir,
)
from aigc.modeling import freeze_all_but_top

ADAPTER_CONFIG = "adapter_config.json"  # in a checkpoint's hf/ folder: the run trained this adapter

# Every linear layer of the block, by model family: attention and MLP (the QLoRA paper's finding that
# adapting all of them matters more than the rank). GPT-2's are Conv1D, weights stored (in, out).
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGETS = {"gpt2": GPT2_TARGETS,
                   **{t: LLAMA_TARGETS for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo",
                                                 "olmo2", "granite", "cohere")}}
FAN_IN_FAN_OUT = {"gpt2"}


class LoraError(ValueError):
    """A LoRA setting that cannot work with this model; the message names the config key."""


def default_targets(model_type: str) -> list[str]:
    """The target modules of `model.peft.target_modules: null` for a model family (`config.model_type`):
    aigc's all-linear defaults, else peft's own table, else a LoraError asking for the key."""
    targets = DEFAULT_TARGETS.get(model_type) or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        raise LoraError(f"model.peft.target_modules: no default for model type {model_type!r}; list the modules "
                        "that get adapters")
    return list(targets)


def lora_config(peft: PeftSection, model_type: str) -> LoraConfig:
    """The peft LoraConfig of a `model.peft` section for a model family."""
    return LoraConfig(
        r=peft.r, lora_alpha=peft.alpha, lora_dropout=peft.dropout,
        target_modules=list(peft.target_modules or default_targets(model_type)),
        modules_to_save=list(peft.modules_to_save) or None, fan_in_fan_out=model_type in FAN_IN_FAN_OUT,
        task_type="CAUSAL_LM",
    )


def adaptable_modules(model: torch.nn.Module) -> list[str]:
    """Full names of the modules LoRA can wrap (linear and GPT-2 Conv1D layers)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D)]


def check_targets(lc: LoraConfig, model: torch.nn.Module) -> None:
    """Every target must name a linear layer of `model` and every module to save a module of it (peft's rule:
    the full name, or its dotted suffix); a LoraError naming the ones that match nothing and what exists."""
    layers, modules = adaptable_modules(model), [n for n, _ in model.named_modules() if n]

    def missing(wanted: list[str], names: list[str]) -> list[str]:
        return sorted(t for t in wanted if not any(n == t or n.endswith(f".{t}") for n in names))

    problems = []
    if bad := missing(list(lc.target_modules), layers):
        leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
        problems.append(f"model.peft.target_modules: {bad} match no layer of the model; the layers LoRA can adapt "
                        f"are named {leaves} (e.g. {layers[0] if layers else '-'})")
    if bad := missing(list(lc.modules_to_save or []), modules):
        leaves = sorted({n.rsplit(".", 1)[-1] for n in modules if not n.rsplit(".", 1)[-1].isdigit()})
        problems.append(f"model.peft.modules_to_save: {bad} match no module of the model; its modules are named "
                        f"{leaves}")
    if problems:
        raise LoraError("; ".join(problems))


def _meta_model(base: str) -> torch.nn.Module:
    """The base's architecture without its weights (meta device: no memory, no read of the weights)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))


def check_before_training(cfg: FinetuneConfig, base: str) -> None:
    """Everything LoRA can get wrong that the driver can see before a worker starts: a base that already holds
    an adapter (stacking one on a merged model) without `model.peft.resume_adapter`; an adapter to resume whose
    recorded base is not `base` (both fingerprints named); targets that match no module of the model (checked
    on a weightless copy). `base` is the resolved model path or hub id the workers will load."""
    p = cfg.model.peft
    if p.method == "none":
        return
    local = local_dir(base)  # a bucket's base: this node's verified copy (a hub id or local path: itself)
    base_meta = read_metadata(local) if os.path.isfile(os.path.join(local, METADATA)) else {}
    if base_meta.get("adapter") and not p.resume_adapter:
        b = base_meta["adapter"]["base"]
        raise LoraError(f"model.name_or_path: {base} already holds a LoRA adapter (on base {b['name_or_path']}); "
                        f"to train that adapter further set model.peft.resume_adapter={base} and "
                        f"model.name_or_path={b['name_or_path']}, or fine-tune a model without an adapter")
    if p.resume_adapter:
        meta = verify_model_dir(p.resume_adapter)
        if not meta.get("adapter"):
            raise LoraError(f"model.peft.resume_adapter: {p.resume_adapter} holds no adapter")
        try:
            check_adapter_base(meta, base, f"model.peft.resume_adapter={p.resume_adapter}")
        except ModelDirError as e:
            raise LoraError(f"{e} (model.name_or_path)") from None
        return  # its own targets, which matched the base it was trained on
    model = _meta_model(local)
    check_targets(lora_config(p, model.config.model_type), model)


def trainable_model(model: torch.nn.Module, m: ModelSection) -> tuple[torch.nn.Module, int, int]:
    """The model as it trains and its (trainable, total) parameter counts: with `model.peft.method: lora` a
    PeftModel whose base is frozen (a new adapter, or `model.peft.resume_adapter`'s); else the model with all
    but its top `model.train_top_n_blocks` blocks frozen (`aigc.modeling.freeze_all_but_top`)."""
    if m.peft.method == "none":
        return model, *freeze_all_but_top(model, m.train_top_n_blocks)
    freeze_all_but_top(model, 0)  # the base trains nothing; peft adds the trainable adapters
    if m.gradient_checkpointing:
        # recomputed blocks need an input that requires grad, or no gradient reaches the adapters
        model.enable_input_require_grads()
    if m.peft.resume_adapter:
        base = model.name_or_path
        model = load_adapter(model, m.peft.resume_adapter, is_trainable=True)
        model.peft_config["default"].base_model_name_or_path = base  # this run's base (same fingerprint)
    else:
        lc = lora_config(m.peft, model.config.model_type)
        check_targets(lc, model)
        model = get_peft_model(model, lc)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, trainable, sum(p.numel() for p in model.parameters())


def save_adapter_config(module: torch.nn.Module, hf_dir: str | os.PathLike) -> None:
    """Beside a checkpoint's HF config (rank 0): the adapter's config, which marks the checkpoint as a LoRA
    run's and names its base (`base_model_name_or_path`). Nothing for a model without an adapter."""
    if isinstance(module, PeftModel):
        module.peft_config["default"].save_pretrained(str(hf_dir))


def is_adapter_checkpoint(hf_dir: str | os.PathLike) -> bool:
    """A checkpoint's HF folder is a LoRA run's (see `save_adapter_config`)."""
    return (Path(hf_dir) / ADAPTER_CONFIG).is_file()


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors of a PeftModel state dict: LoRA's and the modules trained in full."""
    return {k: v for k, v in state.items() if "lora_" in k or ".modules_to_save." in k}


def export_adapter(state: dict[str, torch.Tensor], hf_dir: str, out_dir: str, *, merge: bool,
                   config: dict, metrics: dict, **extra: Any) -> str:
    """A LoRA model directory from a consolidated fp32 state dict of the trained PeftModel: its adapter
    tensors on the base's own weights (not the checkpoint's copy of them, which is bf16 on GPUs), the adapter
    in `adapter/`, and with `merge` the merged model beside it."""
    lc = LoraConfig.from_pretrained(hf_dir)
    base = lc.base_model_name_or_path
    model = get_peft_model(load_model(base, dtype=torch.float32, require_metadata=False).model, lc)
    wanted = adapter_state(state)
    missing, unexpected = model.load_state_dict(wanted, strict=False)
    lost = sorted(set(adapter_state(dict(model.named_parameters()))) - set(wanted))
    empty = sorted(k for k, v in wanted.items() if v.numel() == 0)
    if unexpected or lost or empty:
        raise RuntimeError(f"{hf_dir}: the checkpoint's adapter does not fit the model: unexpected {unexpected}, "
                           f"missing {lost}, empty {empty}")
    save_adapter_dir(model, AutoTokenizer.from_pretrained(hf_dir), out_dir, base=base, merge=merge, config=config,
                     metrics=metrics, step=int(metrics.get("step", 0)), **extra)
    return out_dir
