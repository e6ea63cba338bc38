"""Data: the driver checks the files (types, columns, a sample of rows) and never holds the corpus; Ray Data
tasks read every row, check it, scrub, tokenise and pack it into compact blocks (2 bytes a token with a
vocabulary under 65,536) in the object store; each Train worker reads a disjoint, deterministic shard, and
`model_inputs` rebuilds labels and masks from the compact rows where the batch is used.

Errors about the data (missing or empty file, wrong column, non-text values, too little text) are raised
before any worker starts and name the file and the column: from the driver's sample before Ray starts, or
from the Ray Data task that met the row. The task formats
(`data.format` prompt_completion and chat) are loaded, masked and packed by `aigc.taskdata`; `load_splits` and
`to_ray_blocks` hand them over. What both share (`DataError`, `Splits`, `PackedData`, ...) is `aigc.splits`'s.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from ray.train import DataConfig

from aigc.config import DataSection
from aigc.corpus import SPLITS
from aigc.pii import scrub_batch
from aigc.splits import (
    BLOCK_ROWS,
    FLAG_BITS,
    LOSS,
    PACKED,
    PADDED,
    PII_KINDS,
    SAMPLE_ROWS,
    START,
    TEXT,
    DataError,
    PackedData,
    Sample,
    Splits,
    SplitSource,
    check_file,
    column_sums,
    data_context,
    data_files,
    file_splits,
    materialize,
    sample,
    token_dtype,
)
from aigc.taskdata import load_task_splits, task_blocks

# What a row may feed the model: text blocks and padded task examples carry an attention mask, packed task
# blocks position ids that restart per example (and no mask; see aigc.taskdata). `model_inputs` picks them.
MODEL_COLUMNS = ("input_ids", "labels", "attention_mask", "position_ids")


# ----------------------------------------------------------------------------------- files -> splits


def text_of(column: str, row: Any, path: str, where: str, problems: list[str]) -> dict[str, str] | None:
    """{text} of one row of a text-format file (a line of a .txt file, else the row's `column`), None for a
    blank document; a row without usable text adds a problem naming the file, the column and the row."""
    if isinstance(row, str):
        text = row
    elif not isinstance(row, dict):
        problems.append(f"{path}: {where}: a row must be an object with column {column!r}, got {type(row).__name__}")
        return None
    elif column not in row:
        problems.append(f"{path}: no column {column!r} (data.text_column) in {where}; it has {sorted(row)}")
        return None
    elif row[column] is None:
        problems.append(f"{path}: column {column!r} has a missing (null) value in {where}")
        return None
    elif not isinstance(row[column], str):
        problems.append(f"{path}: column {column!r} holds {type(row[column]).__name__}, not text, in {where}")
        return None
    else:
        text = row[column]
    return {"text": text} if text.strip() else None


def check_text_file(path: str, column: str) -> Sample:
    """Check a text-format file on the driver from its first SAMPLE_ROWS rows (the cluster checks every row
    as it reads them); the sample."""
    checked = sample(path)
    count, values = checked.count, [r for _, r in checked.rows]
    if values and all(isinstance(v, dict) for v in values):
        columns = sorted({k for v in values for k in v})
        if column not in columns:
            raise DataError(f"{path}: no column {column!r} (data.text_column); columns are {columns}")
        values = [v.get(column) for v in values]
    of = "" if count is not None else f" in its first {SAMPLE_ROWS} rows"
    wrong = sorted({type(v).__name__ for v in values if v is not None and not isinstance(v, str)})
    if wrong:
        raise DataError(f"{path}: column {column!r} holds {', '.join(wrong)}, not text{of}")
    nulls = sum(v is None for v in values)
    if nulls:
        raise DataError(f"{path}: column {column!r} has {nulls} missing (null) values{of}")
    if count is not None and not any(v.strip() for v in values):
        raise DataError(f"{path}: column {column!r} has no non-empty text")
    return checked


def load_splits(cfg: DataSection) -> Splits:
    """The train/validation/test splits of the embedded corpus, local files or a hub dataset, checked on the
    driver (files, types, columns, and a sample of every file) but not read: each split is a `SplitSource`
    that the cluster reads (`to_ray_blocks`). Task formats: `aigc.taskdata.load_task_splits`."""
    if cfg.format != "text":
        return load_task_splits(cfg)
    files, column = data_files(cfg)
    samples = {}
    for path in dict.fromkeys(p for s in SPLITS for p in files[s]):
        check_file(path)
        samples[path] = check_text_file(path, column)
    source = SplitSource((), functools.partial(text_of, column), ("text",))
    return file_splits(files, source, cfg.split_ratios, cfg.split_seed, samples)


# ----------------------------------------------------------------------------------- tokenise + pack


def pack_ids(docs: list[list[int]], eos_id: int, block_size: int, dtype: Any = np.int32) -> dict[str, np.ndarray]:
    """Concatenate documents with EOS between them and cut into `block_size` blocks of compact token ids.

    The tail that does not fill a block is kept as one block padded with EOS; `n_tokens` says where its text
    ends, so `model_inputs` masks the padding (label -100, attention 0): no text is dropped and no padding is
    learned. Labels are the inputs (the model shifts them), so nothing else is stored.
    """
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs)) + 1  # each document and its EOS
    stream = np.full(int(lengths.sum()), eos_id, dtype=np.int64)
    text = np.ones(len(stream), dtype=bool)
    text[np.cumsum(lengths) - 1] = False
    stream[text] = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64, count=int(text.sum()))
    n_full, tail = divmod(len(stream), block_size)
    n_blocks = n_full + (1 if tail > 1 else 0)  # a 1-token tail has nothing to predict
    flat = np.full(n_blocks * block_size, eos_id, dtype=np.int64)
    flat[:min(len(stream), len(flat))] = stream[:len(flat)]
    n_tokens = np.clip(len(stream) - np.arange(n_blocks) * block_size, 0, block_size).astype(np.int32)
    return {"ids": flat.reshape(n_blocks, block_size).astype(dtype), "n_tokens": n_tokens,
            "layout": np.full(n_blocks, TEXT, dtype=np.uint8)}


def make_packer(tokenizer: Any, block_size: int, scrub_pii: bool) -> Callable[[dict], dict]:
    """The Ray Data map function: (optional PII scrub) -> tokenise -> pack into compact blocks (uint16 ids
    when the vocabulary has < 65,536 tokens). Ships the tokenizer by value."""
    dtype = token_dtype(len(tokenizer), FLAG_BITS[TEXT])

    def pack(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        counts: dict[str, int] = {}
        if scrub_pii:
            texts, counter = scrub_batch(texts)
            counts = dict(counter)
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        out = pack_ids(ids, tokenizer.eos_token_id, block_size, dtype)
        if scrub_pii:  # per-batch PII counts ride on the first block so the driver sums them in the same pass
            for kind in PII_KINDS:
                col = np.zeros(len(out["ids"]), dtype=np.int32)
                if len(col):
                    col[0] = counts.get(kind, 0)
                out[f"pii_{kind}"] = col
        return out

    return pack


def to_ray_blocks(splits: Splits, tokenizer: Any, cfg: DataSection, docs_per_batch: int = BLOCK_ROWS) -> PackedData:
    """Read, tokenise and pack every split with Ray Data tasks, materialise the compact blocks in the object
    store, and count them; the driver sees only the counts."""
    if cfg.format != "text":
        return task_blocks(splits, tokenizer, cfg, docs_per_batch)
    data_context()
    pack = make_packer(tokenizer, cfg.block_size, cfg.scrub_pii)
    counted = ["n_tokens", *(f"pii_{k}" for k in PII_KINDS if cfg.scrub_pii)]
    out = PackedData({}, {}, {}, dict.fromkeys(PII_KINDS, 0))
    for name in SPLITS:
        where = splits.origin.get(name, name)
        ds = materialize(splits[name].dataset(docs_per_batch).map_batches(pack, batch_size=None, batch_format="numpy"))
        sums = column_sums(ds, counted)
        out.datasets[name], out.blocks[name], out.tokens[name] = ds, ds.count(), sums["n_tokens"]
        out.bytes[name] = ds.size_bytes()
        for k in PII_KINDS:
            out.pii[k] += sums.get(f"pii_{k}", 0)
        if name == "train" and out.tokens[name] <= cfg.block_size:
            raise DataError(f"{where}: split {name!r} has {out.tokens[name]} tokens, fewer than one block "
                            f"(data.block_size={cfg.block_size})")
        if out.tokens[name] < 2:
            raise DataError(f"{where}: split {name!r} has no text to evaluate on")
    return out


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


def expand(batch: dict[str, Any]) -> dict[str, Any]:
    """The model columns of a batch of compact rows (torch tensors; see `aigc.splits`, "compact tokens"):
    text blocks: labels are the ids and the attention mask covers the first `n_tokens` positions; task rows:
    labels where the LOSS flag is set; padded rows get the attention mask, packed blocks position ids that
    restart at every START flag (each example, and the padding, counts from 0)."""
    ids, n = batch["ids"].long(), batch["n_tokens"].long()
    layout = int(batch["layout"].reshape(-1)[0])
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    inside = pos < n[:, None]
    if layout == TEXT:
        return {"input_ids": ids, "labels": torch.where(inside, ids, -100), "attention_mask": inside.long(),
                "n_tokens": n}
    flags, ids = ids & ((1 << FLAG_BITS[layout]) - 1), ids >> FLAG_BITS[layout]
    out = {"input_ids": ids, "labels": torch.where((flags & LOSS) > 0, ids, -100), "n_tokens": n}
    if layout == PADDED:
        return {**out, "attention_mask": inside.long()}
    assert layout == PACKED, layout
    start = torch.where((flags & START) > 0, pos, torch.zeros_like(pos))
    return {**out, "position_ids": pos - torch.cummax(start, dim=1).values}


def model_inputs(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """The keyword arguments of the model's forward for a batch (of compact rows, expanded by `expand`, or of
    model columns): the model columns it has, on `device`,
    padding columns trimmed (a batch is as wide as its longest row), and `use_cache=False`: a KV cache,
    which transformers builds whenever the config says use_cache, silently turns a packed block's
    block-diagonal mask into a plain causal one (masking_utils skips packed detection with a cache)."""
    if "ids" in batch:
        batch = expand(batch)
    out = {k: batch[k] for k in MODEL_COLUMNS if k in batch}
    if "attention_mask" in out:
        width = int(out["attention_mask"].any(dim=0).nonzero().max()) + 1 if out["attention_mask"].any() else 1
        out = {k: v[:, :width] for k, v in out.items()}
    return {**{k: v.to(device) for k, v in out.items()}, "use_cache": False}
