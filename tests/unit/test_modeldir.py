"""One model-directory format, one loader: exact file set, checksums enforced, pickles refused."""

import json

import pytest
import torch

from aigc.modeldir import METADATA, ModelDirError, copy_model_dir, load_model, verify_model_dir


def test_exact_file_set_and_plain_transformers_load(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in tiny_model_dir.iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", METADATA}
    meta = json.loads((tiny_model_dir / METADATA).read_text())
    assert set(meta["files"]) == names - {METADATA} and all(len(h) == 64 for h in meta["files"].values())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("Save 20%", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == len(tok)


def test_loader_equals_plain_transformers(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    loaded = load_model(tiny_model_dir)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for (k, a), (_, b) in zip(loaded.model.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_tampered_weights_rejected(tiny_model_dir, tmp_path):
    d = copy_model_dir(tiny_model_dir, tmp_path / "m")
    with open(d / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ModelDirError, match="model.safetensors: sha256 mismatch"):
        load_model(d)


def test_pickled_weights_and_strays_refused(tiny_model_dir, tmp_path):
    d = copy_model_dir(tiny_model_dir, tmp_path / "m")
    torch.save({}, d / "pytorch_model.bin")
    with pytest.raises(ModelDirError) as e:
        verify_model_dir(d)
    assert "pytorch_model.bin: unsafe" in str(e.value) and "not listed" in str(e.value)


def test_missing_metadata_and_missing_dir(tmp_path):
    with pytest.raises(ModelDirError, match="no such model directory"):
        verify_model_dir(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ModelDirError, match="not an aigc model directory"):
        load_model(tmp_path / "plain")


def test_copy_adds_metadata_and_stays_verified(tiny_model_dir, tmp_path):
    out = copy_model_dir(tiny_model_dir, tmp_path / "winner", trial="t1")
    assert verify_model_dir(out)["trial"] == "t1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_cache_pruning_keeps_the_newest_copies_and_the_one_in_use_and_drops_stale_partials(tmp_path, monkeypatch):
    import os
    import time

    from aigc import modeldir

    cache = tmp_path / "cache"
    monkeypatch.setattr(modeldir, "MODEL_CACHE", str(cache))
    now = time.time()
    ages = {"a": 50, "b": 40, "c": 30, "d": 20, "merged-e": 10, ".f.partial": 2 * 86400, ".g.partial": 60}
    for name, age in ages.items():
        (cache / name).mkdir(parents=True)
        (cache / name / "x").write_text(name)
        os.utime(cache / name, (now - age, now - age))
    assert modeldir.prune_cache(0) == [".f.partial"]  # 0 keeps every copy; a partial a day old goes all the same
    # the two most recently used stay, and "a" (oldest, but the copy a reader is taking now)
    assert sorted(modeldir.prune_cache(2, spare=cache / "a")) == ["b", "c"]
    assert sorted(p.name for p in cache.iterdir()) == [".g.partial", "a", "d", "merged-e"]
    monkeypatch.setenv("AIGC_MODEL_CACHE_KEEP", "some")
    with pytest.raises(ModelDirError, match="AIGC_MODEL_CACHE_KEEP='some'"):
        modeldir.cache_keep()
    monkeypatch.setenv("AIGC_MODEL_CACHE_KEEP", "-1")
    with pytest.raises(ModelDirError, match="whole number"):
        modeldir.cache_keep()
    monkeypatch.delenv("AIGC_MODEL_CACHE_KEEP")
    assert modeldir.cache_keep() == 8
