"""Data: `datasets` loads and validates text on the driver; Ray Data scrubs, tokenises and packs it in a
distributed map; each Train worker reads a disjoint, deterministic shard.

Errors about the data (missing or empty file, wrong column, non-text values, too little text) are raised
here, on the driver, before any worker starts, and name the file and the column. The task formats
(`data.format` prompt_completion and chat) are loaded, masked and packed by `aigc.taskdata`; `load_splits` and
`to_ray_blocks` hand them over. What both share (`DataError`, `Splits`, `PackedData`, ...) is `aigc.splits`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import datasets
import numpy as np
import torch
from ray.train import DataConfig

from aigc.config import DataSection
from aigc.corpus import SPLITS, ensure_embedded_corpus
from aigc.pii import scrub_batch
from aigc.splits import PII_KINDS, DataError, PackedData, Splits, carve, check_file, to_ray
from aigc.taskdata import load_task_splits, task_blocks

# What a row may feed the model: text blocks and padded task examples carry an attention mask, packed task
# blocks position ids that restart per example (and no mask; see aigc.taskdata). `model_inputs` picks them.
MODEL_COLUMNS = ("input_ids", "labels", "attention_mask", "position_ids")


def _load_file(path: str, column: str) -> Any:
    """One local file as a single-column (`text`) Dataset, with every check that names the file."""
    p, fmt = check_file(path)
    try:
        ds = datasets.load_dataset(fmt, data_files=str(p), split="train")
    except Exception as e:  # datasets raises many types for malformed files
        raise DataError(f"{path}: cannot be read as {fmt}: {type(e).__name__}: {e}") from None
    col = "text" if fmt == "text" else column
    return _text_column(ds, col, where=str(path))


def _text_column(ds: Any, column: str, where: str) -> Any:
    if column not in ds.column_names:
        raise DataError(f"{where}: no column {column!r} (data.text_column); columns are {ds.column_names}")
    feature = ds.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataError(f"{where}: column {column!r} holds {feature}, not text")
    nulls = sum(1 for v in ds[column] if v is None)
    if nulls:
        raise DataError(f"{where}: column {column!r} has {nulls} missing (null) values")
    ds = ds.select_columns([column])
    if feature.dtype != "string":  # parquet/csv may give large_string; files of one split must concatenate
        ds = ds.cast_column(column, datasets.Value("string"))
    if column != "text":
        ds = ds.rename_column(column, "text")
    ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True)
    if len(ds) == 0:
        raise DataError(f"{where}: column {column!r} has no non-empty text")
    return ds


def _concat(paths: list[str], column: str) -> Any:
    return datasets.concatenate_datasets([_load_file(p, column) for p in paths])


def load_splits(cfg: DataSection) -> Splits:
    """Validated train/validation/test text (or task examples) from the embedded corpus, local files, or a hub
    dataset."""
    if cfg.format != "text":
        return load_task_splits(cfg)
    if cfg.source == "hub":
        try:
            dd = datasets.load_dataset(cfg.hub_name, cfg.hub_config)
        except Exception as e:
            raise DataError(f"data.hub_name={cfg.hub_name!r}: cannot load: {type(e).__name__}: {e}") from None
        where = f"dataset {cfg.hub_name!r}"
        parts = {s: _text_column(dd[s], cfg.text_column, f"{where} split {s!r}") for s in SPLITS if s in dd}
        if "train" not in parts:
            raise DataError(f"{where}: has no 'train' split (splits: {list(dd)})")
        if len(parts) < 3:
            parts = dict(zip(SPLITS, carve(parts["train"], cfg.split_ratios, cfg.split_seed, where), strict=True))
        return Splits(**parts, origin={s: f"{where}[{s}]" for s in SPLITS})

    if cfg.source == "embedded":
        files = {s: [p] for s, p in ensure_embedded_corpus(cfg).items()}
        column = "text"
    else:
        files = {"train": cfg.train_files, "validation": cfg.validation_files, "test": cfg.test_files}
        column = cfg.text_column
    origin = {s: ", ".join(files[s]) if files[s] else f"carved from {', '.join(files['train'])}" for s in SPLITS}
    train = _concat(files["train"], column)
    if files["validation"]:
        return Splits(train, _concat(files["validation"], column), _concat(files["test"], column), origin)
    return Splits(*carve(train, cfg.split_ratios, cfg.split_seed, origin["train"]), origin=origin)


# ----------------------------------------------------------------------------------- tokenise + pack


def pack_ids(docs: list[list[int]], eos_id: int, block_size: int) -> dict[str, np.ndarray]:
    """Concatenate documents with EOS between them and cut into `block_size` blocks.

    Labels equal the inputs (the model shifts them); the tail that does not fill a block is kept as one
    padded block whose padding is masked with -100 in the labels and 0 in the attention mask, so no text is
    dropped and no padding is learned.
    """
    stream: list[int] = []
    for ids in docs:
        stream.extend(ids)
        stream.append(eos_id)
    n_full, tail = divmod(len(stream), block_size)
    n_blocks = n_full + (1 if tail > 1 else 0)  # a 1-token tail has nothing to predict
    input_ids = np.full((n_blocks, block_size), eos_id, dtype=np.int64)
    labels = np.full((n_blocks, block_size), -100, dtype=np.int64)
    mask = np.zeros((n_blocks, block_size), dtype=np.int64)
    for b in range(n_blocks):
        chunk = stream[b * block_size:(b + 1) * block_size]
        input_ids[b, :len(chunk)] = chunk
        labels[b, :len(chunk)] = chunk
        mask[b, :len(chunk)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "n_tokens": mask.sum(axis=1)}


def make_packer(tokenizer: Any, block_size: int, scrub_pii: bool) -> Callable[[dict], dict]:
    """The Ray Data map function: (optional PII scrub) -> tokenise -> pack. Ships the tokenizer by value."""

    def pack(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        counts: dict[str, int] = {}
        if scrub_pii:
            texts, counter = scrub_batch(texts)
            counts = dict(counter)
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        out = pack_ids(ids, tokenizer.eos_token_id, block_size)
        # per-batch PII counts ride on the first block so the driver can sum them without a second pass
        for kind in PII_KINDS:
            col = np.zeros(len(out["input_ids"]), dtype=np.int64)
            if len(col):
                col[0] = counts.get(kind, 0)
            out[f"pii_{kind}"] = col
        return out

    return pack


def to_ray_blocks(splits: Splits, tokenizer: Any, cfg: DataSection, docs_per_batch: int = 1000) -> PackedData:
    """Tokenise and pack every split with a distributed Ray Data map, materialise, and check the sizes."""
    if cfg.format != "text":
        return task_blocks(splits, tokenizer, cfg, docs_per_batch)
    pack = make_packer(tokenizer, cfg.block_size, cfg.scrub_pii)
    kinds = PII_KINDS
    counted = ["n_tokens", *(f"pii_{k}" for k in kinds)]
    out, blocks, tokens, pii = {}, {}, {}, dict.fromkeys(kinds, 0)
    for name in SPLITS:
        ds = to_ray(splits[name], docs_per_batch).map_batches(pack, batch_size=None, batch_format="numpy").materialize()
        # Sums of the small per-block columns, streamed to the driver: `Dataset.aggregate` runs a hash
        # shuffle that cost ~5 s a split here, for five integers.
        sums, blocks[name] = dict.fromkeys(counted, 0), ds.count()
        for batch in ds.select_columns(counted).iter_batches(batch_size=None, batch_format="numpy"):
            for c in counted:
                sums[c] += int(batch[c].sum())
        tokens[name] = sums["n_tokens"]
        for k in kinds:
            pii[k] += sums[f"pii_{k}"]
        if name == "train" and tokens[name] <= cfg.block_size:
            raise DataError(
                f"{splits.origin.get(name, name)}: split {name!r} has {tokens[name]} tokens, fewer than one "
                f"block (data.block_size={cfg.block_size})"
            )
        if tokens[name] < 2:
            raise DataError(f"{splits.origin.get(name, name)}: split {name!r} has no text to evaluate on")
        out[name] = ds
    return PackedData(out, blocks, tokens, pii)


def shard_datasets(packed: PackedData, world_size: int, names: tuple[str, ...] = ("train", "validation")) -> dict:
    """Disjoint, equal and *deterministic* per-rank shards, cut on the driver: `{"train_0": ..., ...}`.

    Ray's default `streaming_split` hands blocks to whichever worker asks first (a resumed run could see a
    different order), and any split made once the workers hold every CPU needs tasks that cannot be
    scheduled. `Dataset.split(equal=True)` on the materialised blocks, here, fixes the assignment, which
    makes 'skip the batches already seen this epoch' an exact resume.
    """
    out = {}
    for name in names:
        for rank, shard in enumerate(packed.datasets[name].split(world_size, equal=True)):
            out[f"{name}_{rank}"] = shard
    return out


def make_data_config() -> DataConfig:
    """Every worker reads only the shard named after its rank, so Ray must not split anything again."""
    return DataConfig(datasets_to_split=[])


# ----------------------------------------------------------------------------------- batches -> model

BUCKET_WINDOW = 16  # micro-batches sorted by length together; bigger pads less but mixes lengths less randomly


def train_batches(shard: Any, micro_batch: int, seed: int, bucket: bool) -> Iterator[dict[str, Any]]:
    """One epoch of training micro-batches (torch tensors) of a worker's shard, deterministic for a seed, so
    resume can skip what was seen. Packed blocks: a local shuffle. `bucket` (task examples, one per row):
    windows of BUCKET_WINDOW micro-batches are sorted by length, cut into micro-batches, and those visited in
    a seeded random order, so each batch holds similar lengths and `model_inputs` trims it to its longest.
    Each window drops its last partial micro-batch (equal shards: every rank runs the same number)."""
    shuffle = {"local_shuffle_buffer_size": max(4 * micro_batch, 64), "local_shuffle_seed": seed}
    if not bucket:
        yield from shard.iter_torch_batches(batch_size=micro_batch, drop_last=True, dtypes=torch.long, **shuffle)
        return
    gen = torch.Generator().manual_seed(seed)
    for window in shard.iter_torch_batches(batch_size=micro_batch * BUCKET_WINDOW, dtypes=torch.long, **shuffle):
        order = torch.argsort(window["n_tokens"], stable=True)
        chunks = [order[i:i + micro_batch] for i in range(0, len(order) - micro_batch + 1, micro_batch)]
        for j in torch.randperm(len(chunks), generator=gen).tolist():
            yield {k: v[chunks[j]] for k, v in window.items()}


def model_inputs(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """The keyword arguments of the model's forward for a batch: the model columns it has, on `device`,
    padding columns trimmed (a batch is as wide as its longest row), and `use_cache=False`: a KV cache,
    which transformers builds whenever the config says use_cache, silently turns a packed block's
    block-diagonal mask into a plain causal one (masking_utils skips packed detection with a cache)."""
    out = {k: batch[k] for k in MODEL_COLUMNS if k in batch}
    if "attention_mask" in out:
        width = int(out["attention_mask"].any(dim=0).nonzero().max()) + 1 if out["attention_mask"].any() else 1
        out = {k: v[:, :width] for k, v in out.items()}
    return {**{k: v.to(device) for k, v in out.items()}, "use_cache": False}
