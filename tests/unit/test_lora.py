"""LoRA without Ray: config errors, default targets, the checks before training, the adapter model directory
(merged and adapter-only) and the base fingerprint that ties an adapter to its base."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from aigc.config import ConfigError, FinetuneConfig, load_config
from aigc.lora import (
    GPT2_TARGETS,
    LLAMA_TARGETS,
    LoraError,
    check_before_training,
    check_targets,
    default_targets,
    export_adapter,
    lora_config,
    save_adapter_config,
    trainable_model,
)
from aigc.modeldir import (
    ADAPTER_DIR,
    METADATA,
    ModelDirError,
    copy_model_dir,
    fingerprint,
    load_adapter,
    load_model,
    save_model_dir,
    verify_model_dir,
)
from aigc.zero import deepspeed_config


def cfg(*overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, list(overrides))


def problems(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        cfg(*overrides)
    return str(e.value)


def test_config_errors_name_the_field():
    text = problems("model.peft.method=lora", "model.peft.r=0", "model.peft.alpha=-1")
    assert "model.peft.r: Input should be greater than 0" in text
    assert "model.peft.alpha: Input should be greater than 0" in text
    assert "model.train_top_n_blocks: 2 with model.peft.method=lora" in problems("model.peft.method=lora",
                                                                                 "model.train_top_n_blocks=2")
    assert "model.peft.method: qlora loads the base in 4-bit with bitsandbytes, which needs CUDA GPUs" in problems(
        "model.peft.method=qlora")
    assert "model.peft.r: not used with model.peft.method='none'" in problems("model.peft.r=4")
    assert "export.merge: false only applies to adapters" in problems("export.merge=false")
    assert "zero.param_persistence_threshold: only used with zero.stage=3" in problems(
        "zero.param_persistence_threshold=0")
    c = cfg("model.peft.method=lora", "model.train_top_n_blocks=0", "zero.stage=3", "zero.param_persistence_threshold=0")
    assert c.export.merge is True  # merged export by default
    z = deepspeed_config(c, 2, use_cuda=False)["zero_optimization"]
    assert z["stage3_param_persistence_threshold"] == 0
    assert "stage3_param_persistence_threshold" not in deepspeed_config(cfg("zero.stage=3"), 2, False)["zero_optimization"]


def test_default_targets_per_architecture():
    peft = cfg("model.peft.method=lora").model.peft
    gpt2 = lora_config(peft, "gpt2")
    assert sorted(gpt2.target_modules) == sorted(GPT2_TARGETS) and gpt2.fan_in_fan_out  # Conv1D: (in, out)
    llama = lora_config(peft, "llama")
    assert sorted(llama.target_modules) == sorted(LLAMA_TARGETS) and not llama.fan_in_fan_out
    with torch.device("meta"):  # every default names a layer of a real Llama
        tiny = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                            num_attention_heads=2, vocab_size=64))
    check_targets(llama, tiny)
    with pytest.raises(LoraError, match="model.peft.target_modules: no default for model type 'nonesuch'"):
        default_targets("nonesuch")


def test_targets_matching_nothing_fail_before_training_naming_what_exists(tiny_model_dir):
    c = cfg("model.peft.method=lora", "model.peft.target_modules=[q_proj, c_attn]", "model.peft.modules_to_save=[head]")
    with pytest.raises(LoraError) as e:
        check_before_training(c, str(tiny_model_dir))
    msg = str(e.value)
    assert "model.peft.target_modules: ['q_proj'] match no layer of the model" in msg
    assert "the layers LoRA can adapt are named ['c_attn', 'c_fc', 'c_proj', 'lm_head']" in msg
    assert "model.peft.modules_to_save: ['head'] match no module" in msg and "'ln_f'" in msg
    check_before_training(cfg("model.peft.method=lora", "model.peft.modules_to_save=[ln_f]"), str(tiny_model_dir))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A LoRA model on the tiny base with non-zero adapters (as after training), and its checkpoint-like HF
    folder: what `export_adapter` gets from a consolidated ZeRO checkpoint."""
    c = cfg("model.peft.method=lora", "model.peft.r=4", "model.peft.modules_to_save=[ln_f]")
    model, trainable, total = trainable_model(load_model(tiny_model_dir).model, c.model)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:  # B starts at zero, ln_f at the base's: trained, neither is
                p.normal_(0, 0.05)
    hf = tmp_path_factory.mktemp("ckpt") / "hf"
    model.config.save_pretrained(hf)
    load_model(tiny_model_dir).tokenizer.save_pretrained(hf)
    save_adapter_config(model, hf)
    ids = torch.tensor([[1, 5, 9, 30, 2, 7]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return {"model": model, "hf": str(hf), "ids": ids, "logits": logits, "trainable": trainable, "total": total,
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def test_lora_trains_only_adapters(trained):
    m = trained["model"]
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "modules_to_save.default" in n for n in names)
    assert trained["trainable"] == sum(p.numel() for n, p in m.named_parameters() if p.requires_grad)
    assert trained["trainable"] / trained["total"] < 0.1


def test_merged_export_loads_plainly_and_equals_the_adapter_model(trained, tiny_model_dir, tmp_path):
    from peft import PeftModel

    out = Path(export_adapter(trained["state"], trained["hf"], str(tmp_path / "m"), merge=True,
                              config={"t": 1}, metrics={"step": 3}))
    meta = verify_model_dir(out)
    assert {p.name for p in (out / ADAPTER_DIR).iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert meta["adapter"]["base"] == {"name_or_path": str(tiny_model_dir), "fingerprint": fingerprint(tiny_model_dir)}
    assert meta["adapter"]["merged"] and meta["adapter"]["r"] == 4 and set(meta["files"]) >= {
        f"{ADAPTER_DIR}/adapter_model.safetensors", "model.safetensors"}
    ids, want = trained["ids"], trained["logits"]
    with torch.no_grad():
        # plain transformers loads the merged weights, and does not apply the adapter a second time
        plain = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        peft = PeftModel.from_pretrained(load_model(tiny_model_dir).model, out / ADAPTER_DIR)(input_ids=ids).logits
        ours = load_model(out).model(input_ids=ids).logits
    assert (peft - want).abs().max() == 0
    assert (plain - want).abs().max() <= 1e-5 and (ours - plain).abs().max() == 0


def test_adapter_only_dir_loads_on_its_base_and_refuses_another(trained, tiny_model_dir, tmp_path):
    out = Path(export_adapter(trained["state"], trained["hf"], str(tmp_path / "a"), merge=False, config={},
                              metrics={}))
    assert not (out / "model.safetensors").exists() and not verify_model_dir(out)["adapter"]["merged"]
    with torch.no_grad():
        got = load_model(out).model(input_ids=trained["ids"]).logits
    assert (got - trained["logits"]).abs().max() <= 1e-5

    other = load_model(tiny_model_dir).model
    with torch.no_grad():
        other.transformer.wte.weight.mul_(2)
    other_dir = save_model_dir(other, load_model(tiny_model_dir).tokenizer, tmp_path / "other", config={})
    fps = fingerprint(tiny_model_dir)[:16], fingerprint(other_dir)[:16]
    with pytest.raises(ModelDirError) as e:
        load_model(out, base=other_dir)
    assert all(fp in str(e.value) for fp in fps)
    with pytest.raises(ModelDirError, match=fps[1]):
        load_adapter(other, out, base_fingerprint=fingerprint(other_dir))

    # LoRA on a directory that holds an adapter needs resume_adapter, and that adapter's own base
    lora = ["model.peft.method=lora"]
    with pytest.raises(LoraError, match="already holds a LoRA adapter.*model.peft.resume_adapter="):
        check_before_training(cfg(*lora), str(out))
    with pytest.raises(LoraError) as e:
        check_before_training(cfg(*lora, f"model.peft.resume_adapter={out}"), str(other_dir))
    assert all(fp in str(e.value) for fp in fps)
    check_before_training(cfg(*lora, f"model.peft.resume_adapter={out}"), str(tiny_model_dir))


def test_resumed_adapter_trains_on_from_its_weights(trained, tiny_model_dir, tmp_path):
    out = export_adapter(trained["state"], trained["hf"], str(tmp_path / "a"), merge=False, config={}, metrics={})
    c = cfg("model.peft.method=lora", f"model.peft.resume_adapter={out}")
    model, trainable, _ = trainable_model(load_model(tiny_model_dir).model, c.model)
    assert trainable == trained["trainable"]
    assert model.peft_config["default"].base_model_name_or_path == str(tiny_model_dir)
    with torch.no_grad():
        assert (model(input_ids=trained["ids"]).logits - trained["logits"]).abs().max() <= 1e-6


def test_tampered_adapter_refused(trained, tmp_path):
    out = Path(export_adapter(trained["state"], trained["hf"], str(tmp_path / "a"), merge=False, config={},
                              metrics={}))
    d = copy_model_dir(out, tmp_path / "b")
    cfg_file = d / ADAPTER_DIR / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "r": 2}))
    with pytest.raises(ModelDirError, match="adapter/adapter_config.json: sha256 mismatch"):
        load_model(d)
    assert os.path.isfile(out / METADATA)


def test_search_space_sets_lora_keys_and_the_report_shows_them(tmp_path):
    from aigc.report import render
    from aigc.report_data import SearchData, TrialRecord
    from aigc.search import tune_space
    from aigc.search_config import SearchConfig
    from aigc.trial import trial_config

    space = ["space.lora.r={kind: choice, values: [4, 16]}", "space.lora.dropout={kind: uniform, low: 0.0, high: 0.2}"]
    with pytest.raises(ConfigError, match="space.lora.dropout: LoRA settings are searched but base.model.peft.method"):
        load_config(SearchConfig, None, space)
    with pytest.raises(ConfigError, match=r"space.lora.r.values\[1\]: 0.0 is outside what model.peft.r accepts"):
        load_config(SearchConfig, None, ["base.model.peft.method=lora", "space.lora.r={kind: choice, values: [4, 0]}"])
    sc = load_config(SearchConfig, None, ["base.model.peft.method=lora", f"search.storage_path={tmp_path}", *space])
    assert {"lora.r", "lora.dropout", "lr"} <= set(tune_space(sc))
    t = trial_config(sc, {"lora.r": 16, "lora.dropout": 0.1, "lr": 1e-3}, "t1")
    assert (t.model.peft.r, t.model.peft.dropout, t.optim.lr) == (16, 0.1, 1e-3)

    history = [{"step": 10, "val_loss": 1.0, "trainable_params": 4096, "total_params": 50560}]
    trials = [TrialRecord(trial_id=f"t{r}", status="completed", params={"lora.r": r, "lr": 1e-3}, adapter=True,
                          history=[{**history[0], "trainable_params": 1024 * r}]) for r in (4, 16)]
    render(SearchData(str(tmp_path), sc.model_dump(mode="json"), trials), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "`lora.r`: choice [4.0, 16.0]" in md and "lora.r" in md.split("## Trials")[-1]
    assert "trainable_pct" in md and f"{100 * 4096 / 50560:.2f}" in md and "0.016" in md  # 4096 x 4 B = 0.016 MB
