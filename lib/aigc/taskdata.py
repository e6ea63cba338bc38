"""Task data: prompt -> completion and chat rows, validated on the driver, tokenised and masked by Ray Data.

Rows are checked one by one when the splits load (before Ray starts): every problem names the file, the line
(row number) and the field. Ray Data then renders (chat template), tokenises and masks each example (labels
-100 outside the completion / assistant turns), applies `data.truncation`, and, in a second map, packs examples
into blocks or pads them one per row. The driver reads the per-example status between the two maps, so an
example that is too long or whose template fails to render stops the run with its row named, and dropped
examples are counted, before any Train worker starts.

Packing without cross-talk. transformers 5 (`masking_utils.find_packed_sequence_indices`) turns `position_ids`
that restart at 0 into a block-diagonal causal mask, on eager and sdpa, CPU and GPU (flash-attention reads the
same position ids), but only when no `attention_mask` and no KV cache are passed: a model whose config has
`use_cache=True` builds a cache even in training and silently gets a plain causal mask, so the batches carry
`use_cache=False` (`aigc.data.model_inputs`). Packed blocks therefore hold `position_ids` and no
`attention_mask`; the first token of every example has label -100 (the token before it belongs to another
example). `tests/unit/test_taskdata.py` checks a packed block's loss against its examples one at a time.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

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
    START,
    DataError,
    PackedData,
    Sample,
    Splits,
    SplitSource,
    check_file,
    column_sums,
    data_context,
    data_files,
    file_rows,
    file_splits,
    materialize,
    sample,
    token_dtype,
    where,
)
from aigc.template import ROLES, Segment, TemplateError, chat_segments, encode_segments

MAX_LISTED = 10  # problems listed in one DataError; the rest are counted

# Per-example status, written by the encoder and read by the driver.
OK, TRUNCATED, TOO_LONG, NO_LOSS, RENDER_ERROR = range(5)


# ----------------------------------------------------------------------------------- rows and validation


def read_rows(path: str) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of a local file, streamed; `where` is 'file line N' for JSON lines, else
    'file row N'."""
    _, builder = check_file(path)
    if builder == "text":
        raise DataError(f"{path}: plain text has no fields; task formats need .jsonl, .json, .csv or .parquet")
    for n, row in file_rows(path):
        yield where(path, n), row


def _text_field(row: dict, name: str, problems: list[str], where: str, optional: bool = False) -> str | None:
    if name not in row or row[name] is None:
        if not optional:
            problems.append(f"{where}: field {name!r}: {'missing' if name not in row else 'null'}")
        return None
    if not isinstance(row[name], str):
        problems.append(f"{where}: field {name!r}: holds {type(row[name]).__name__}, not text")
        return None
    return row[name]


def prompt_completion_row(row: Any, cfg: DataSection, where: str, problems: list[str]) -> dict[str, str] | None:
    """{prompt, completion} of one row (input column and prompt suffix applied), or None with its problems."""
    if not isinstance(row, dict):
        problems.append(f"{where}: a row must be an object with fields, got {type(row).__name__}")
        return None
    n = len(problems)
    prompt = _text_field(row, cfg.prompt_column, problems, where)
    completion = _text_field(row, cfg.completion_column, problems, where)
    extra = _text_field(row, cfg.input_column, problems, where, optional=True) if cfg.input_column else None
    if prompt is not None and not prompt.strip() and not (extra or "").strip():
        problems.append(f"{where}: field {cfg.prompt_column!r}: empty (the completion would start with no context)")
    if completion is not None and not completion.strip():
        problems.append(f"{where}: field {cfg.completion_column!r}: empty (nothing to learn)")
    if len(problems) > n:
        return None
    if extra and extra.strip():
        prompt = f"{prompt}\n\n{extra}" if prompt.strip() else extra
    return {"prompt": prompt + cfg.prompt_suffix, "completion": completion}


def chat_row(row: Any, cfg: DataSection, where: str, problems: list[str]) -> dict[str, str] | None:
    """{messages: JSON} of one row, cut after its last assistant turn, or None with its problems. Other
    fields of the row (a brief, its nats) are ignored; so are keys of a message other than role and content."""
    col = cfg.messages_column
    if not isinstance(row, dict):
        problems.append(f"{where}: a row must be an object with fields, got {type(row).__name__}")
        return None
    msgs = row.get(col)
    if not isinstance(msgs, list) or not msgs:
        what = "missing" if col not in row else "null" if msgs is None else f"holds {type(msgs).__name__}, not a list"
        problems.append(f"{where}: field {col!r}: {'empty' if msgs == [] else what}")
        return None
    n, out, last = len(problems), [], None
    for j, m in enumerate(msgs):
        f = f"{col}[{j}]"
        if not isinstance(m, dict):
            problems.append(f"{where}: field {f!r}: a message must be an object with role and content")
            continue
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            problems.append(f"{where}: field '{f}.role': {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            problems.append(f"{where}: field '{f}.content': holds {type(content).__name__}, not text")
        elif role == "assistant" and not content.strip():
            problems.append(f"{where}: field '{f}.content': empty assistant turn (nothing to learn)")
        if role == "assistant":
            last = j
        out.append({"role": role, "content": content})
    if last is None and len(problems) == n:
        problems.append(f"{where}: field {col!r}: no assistant turn (nothing to learn)")
    if len(problems) > n:
        return None
    return {"messages": json.dumps(out[:last + 1], ensure_ascii=False)}


def report_problems(fmt: str, problems: list[str], what: str) -> None:
    """One DataError listing the first MAX_LISTED problems of `what` and counting all of them."""
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise DataError(f"{what}: {len(problems)} bad row(s) for data.format={fmt}:\n  "
                    + "\n  ".join(problems[:MAX_LISTED]) + more)


def task_row(cfg: DataSection, row: Any, path: str, where: str, problems: list[str]) -> dict[str, str] | None:
    """The canonical row (prompt/completion or messages) of one raw row, with `source` (where it is)."""
    canon = (chat_row if cfg.format == "chat" else prompt_completion_row)(row, cfg, where, problems)
    return None if canon is None else {**canon, "source": where}


def check_task_file(path: str, cfg: DataSection) -> Sample:
    """Validate the first SAMPLE_ROWS rows of a task file on the driver, every problem listed at once (the
    cluster validates every row as it reads them); the sample."""
    _, builder = check_file(path)
    if builder == "text":
        raise DataError(f"{path}: plain text has no fields; task formats need .jsonl, .json, .csv or .parquet")
    checked = sample(path)
    problems: list[str] = []
    for n, row in checked.rows:
        task_row(cfg, row, path, where(path, n), problems)
    if problems:
        report_problems(cfg.format, problems, path)
    if not checked.rows:
        raise DataError(f"{path}: no rows")
    return checked


def load_task_splits(cfg: DataSection) -> Splits:
    """Train/validation/test examples of a task format from the embedded task, files or a hub dataset: every
    file checked on the driver (a sample of its rows), none read; see `aigc.data.load_splits`."""
    files, _ = data_files(cfg)
    samples = {p: check_task_file(p, cfg) for s in SPLITS for p in files[s]}
    columns = ("messages", "source") if cfg.format == "chat" else ("prompt", "completion", "source")
    source = SplitSource((), functools.partial(task_row, cfg), columns,
                         report=functools.partial(report_problems, cfg.format))
    return file_splits(files, source, cfg.split_ratios, cfg.split_seed, samples)


def training_texts(split: Any) -> Iterator[str]:
    """The text of a split's rows, streamed, to train the embedded tokenizer on (task examples with the role
    markers the default template writes)."""
    for row in split.rows():
        if "text" in row:
            yield row["text"]
        elif "messages" in row:
            yield "".join(f"{x['role'].capitalize()}: {x['content']}\n" for x in json.loads(row["messages"]))
        else:
            yield row["prompt"] + row["completion"]


# ---------------------------------------------------------------------------- tokenise, mask, truncate


def fit_example(ids: list[int], train: list[bool], cfg: DataSection) -> tuple[list[int], list[int], int]:
    """(input ids, labels, status) of one example: labels are the ids on completion tokens (everywhere with
    `train_on_prompt`) and -100 elsewhere, including the first token, which nothing before it predicts.

    Longer than `block_size`: TOO_LONG, unless `truncation` is truncate_prompt_left and the last completion
    fits with at least one token of context before it; then the prompt is cut from the left (TRUNCATED), and
    what remains of a completion cut partway is context, not loss.
    """
    status = OK
    if len(ids) > cfg.block_size:
        last_start = next((i for i in range(len(train) - 1, 0, -1) if train[i] and not train[i - 1]), 0)
        cut = len(ids) - cfg.block_size
        if cfg.truncation != "truncate_prompt_left" or cut >= last_start:
            return [], [], TOO_LONG
        ids, train, status = ids[cut:], list(train[cut:]), TRUNCATED
        for i in range(len(train)):
            if not train[i]:
                break
            train[i] = False
    labels = [t if (tr or cfg.train_on_prompt) else -100 for t, tr in zip(ids, train, strict=True)]
    if labels:
        labels[0] = -100
    if all(label == -100 for label in labels):
        return [], [], NO_LOSS
    return ids, labels, status


def example_segments(row: dict[str, Any], tokenizer: Any, fmt: str) -> list[Segment]:
    """The prompt and completion segments of one canonical row (chat: through the chat template)."""
    if fmt == "chat":
        return chat_segments(tokenizer, json.loads(row["messages"]))
    return [Segment(row["prompt"], False), Segment(row["completion"], True)]


def encode_example(row: dict[str, Any], tokenizer: Any, fmt: str) -> tuple[list[int], list[bool]]:
    """Token ids of one example and which of them are completion. A prompt_completion prompt is tokenised as
    Serve's /v1/completions does (with the tokenizer's own special tokens, e.g. a BOS) and the completion
    ends with EOS; a chat conversation as Serve's chat path does (`aigc.template.encode_segments`)."""
    if fmt == "chat":
        return encode_segments(tokenizer, example_segments(row, tokenizer, fmt))
    p = tokenizer(row["prompt"])["input_ids"]
    c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + c, [False] * len(p) + [True] * len(c)


def _scrub_rows(rows: list[dict[str, Any]], fmt: str) -> dict[str, int]:
    """Replace PII in every prompt, completion and message content, in place; counts per kind."""
    if fmt == "chat":
        convs = [json.loads(r["messages"]) for r in rows]
        texts, counts = scrub_batch([m["content"] for c in convs for m in c])
        it = iter(texts)
        for r, c in zip(rows, convs, strict=True):
            r["messages"] = json.dumps([{**m, "content": next(it)} for m in c], ensure_ascii=False)
        return dict(counts)
    prompts, c1 = scrub_batch([r["prompt"] for r in rows])
    completions, c2 = scrub_batch([r["completion"] for r in rows])
    for r, p, c in zip(rows, prompts, completions, strict=True):
        r["prompt"], r["completion"] = p, c
    return dict(c1 + c2)


def make_encoder(tokenizer: Any, cfg: DataSection) -> Callable[[dict], dict]:
    """Ray Data map 1: canonical rows -> one row per example, ids and labels padded to block_size, with its
    length, loss-token count, status and where it came from. Ships the tokenizer by value."""
    width, pad = cfg.block_size, pad_id(tokenizer)

    def encode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [k for k in ("prompt", "completion", "messages", "source") if k in batch]
        rows = [dict(zip(keys, vals, strict=True)) for vals in zip(*(batch[k] for k in keys), strict=True)]
        n = len(rows)
        pii = _scrub_rows(rows, cfg.format) if cfg.scrub_pii else {}
        out = {"input_ids": np.full((n, width), pad, dtype=np.int64), "labels": np.full((n, width), -100, dtype=np.int64),
               "length": np.zeros(n, dtype=np.int64), "n_loss": np.zeros(n, dtype=np.int64),
               "status": np.zeros(n, dtype=np.int64), "error": np.array([""] * n, dtype=object)}
        for i, row in enumerate(rows):
            try:
                ids, labels, status = fit_example(*encode_example(row, tokenizer, cfg.format), cfg)
            except TemplateError as e:
                out["status"][i], out["error"][i] = RENDER_ERROR, str(e)
                continue
            out["status"][i], out["length"][i] = status, len(ids)
            out["input_ids"][i, :len(ids)] = ids
            out["labels"][i, :len(ids)] = labels
            out["n_loss"][i] = sum(label != -100 for label in labels)
        out["source"] = np.array([r["source"] for r in rows], dtype=object)
        for kind in PII_KINDS:  # per-batch counts ride on the first row, as for text
            out[f"pii_{kind}"] = np.zeros(n, dtype=np.int64)
            if n:
                out[f"pii_{kind}"][0] = pii.get(kind, 0)
        return out

    return encode


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------- pack or pad


def pack_examples(ids: list[np.ndarray], labels: list[np.ndarray], block_size: int, pad: int,
                  dtype: Any = np.int32) -> dict[str, np.ndarray]:
    """First-fit-decreasing packing of whole examples into `block_size` blocks of compact rows, without
    cross-talk: each example's first token (and the padding at a block's end, its own segment) carries START,
    so `aigc.data.model_inputs` restarts position ids there, which transformers turns into a block-diagonal
    causal mask; tokens whose label is not -100 carry LOSS; padding carries neither."""
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        b = next((b for b, f in enumerate(free) if f >= len(ids[i])), None)
        if b is None:
            bins.append([])
            free.append(block_size)
            b = len(bins) - 1
        bins[b].append(i)
        free[b] -= len(ids[i])
    bits = FLAG_BITS[PACKED]
    values = np.full((len(bins), block_size), pad << bits, dtype=np.int64)
    n_tokens, n_loss = np.zeros(len(bins), dtype=np.int32), np.zeros(len(bins), dtype=np.int32)
    for b, members in enumerate(bins):
        at = 0
        for i in members:
            n = len(ids[i])
            values[b, at:at + n] = flagged(ids[i], labels[i], bits)
            n_loss[b] += int((np.asarray(labels[i]) != -100).sum())
            at += n
        if at < block_size:
            values[b, at] |= START
        n_tokens[b] = at
    return {"ids": values.astype(dtype), "n_tokens": n_tokens, "n_loss": n_loss,
            "layout": np.full(len(bins), PACKED, dtype=np.uint8)}


def flagged(ids: np.ndarray, labels: np.ndarray, bits: int) -> np.ndarray:
    """One example's stored values: id << bits | LOSS where it has a label, START on its first token."""
    flags = np.where(np.asarray(labels) != -100, LOSS, 0)
    if len(flags):
        flags[0] |= START
    return (np.asarray(ids, dtype=np.int64) << bits) | flags


def make_blocker(block_size: int, packing: bool, pad: int, dtype: Any = np.int32) -> Callable[[dict], dict]:
    """Kept examples (of `make_encoder`) -> packed blocks, or one right-padded example per row whose attention
    mask `model_inputs` builds from its length (`aigc.data.train_batches` buckets rows by length and trims each
    batch to its longest); compact rows either way."""

    def block(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = np.isin(batch["status"], (OK, TRUNCATED))
        ids, labels, length = batch["input_ids"][keep], batch["labels"][keep], batch["length"][keep]
        if packing:
            return pack_examples([r[:n] for r, n in zip(ids, length, strict=True)],
                                 [r[:n] for r, n in zip(labels, length, strict=True)], block_size, pad, dtype)
        # padding holds the pad id and no flag; START is not needed (each row is one example)
        values = (ids.astype(np.int64) << FLAG_BITS[PADDED]) | np.where(labels != -100, LOSS, 0)
        return {"ids": values.astype(dtype), "n_tokens": length.astype(np.int32),
                "n_loss": batch["n_loss"][keep].astype(np.int32), "layout": np.full(len(ids), PADDED, dtype=np.uint8)}

    return block


COUNTS = ("ok", "truncated", "too_long", "no_loss")  # per-batch status counts, riding on the first row


def make_task_packer(tokenizer: Any, cfg: DataSection) -> Callable[[dict], dict]:
    """The Ray Data map of task rows: render, tokenise, mask and truncate (`make_encoder`); stop on rows that
    cannot be used, naming them; pack or pad what is kept (`make_blocker`). Status counts (and PII counts)
    ride on the first row; a batch that keeps nothing emits one empty row (n_tokens 0) to carry them, which
    `task_blocks` removes."""
    encode = make_encoder(tokenizer, cfg)
    pad = pad_id(tokenizer)
    block = make_blocker(cfg.block_size, cfg.packing, pad, token_dtype(len(tokenizer), FLAG_BITS[PACKED]))

    def pack(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        enc = encode(batch)
        status = enc["status"]
        fatal = (status == RENDER_ERROR) | ((status == TOO_LONG) & (cfg.truncation == "error"))
        bad = [enc["source"][i] + ": " + (enc["error"][i] or f"longer than data.block_size={cfg.block_size} "
                                          "tokens (data.truncation=error; drop or truncate_prompt_left)")
               for i in np.flatnonzero(fatal)[:MAX_LISTED]]
        if bad:
            raise DataError("\n  ".join(bad))
        out = block(enc)
        if not len(out["ids"]) and len(status):
            out = {k: np.zeros((1, *v.shape[1:]), dtype=v.dtype) for k, v in out.items()}
            out["ids"][:] = pad << FLAG_BITS[PACKED]
            out["layout"][:] = PACKED if cfg.packing else PADDED
        by_status = np.bincount(status, minlength=5)
        counts = dict(zip(COUNTS, (by_status[OK], by_status[TRUNCATED], by_status[TOO_LONG], by_status[NO_LOSS]),
                          strict=True))
        counts.update({f"pii_{k}": int(enc[f"pii_{k}"].sum()) for k in PII_KINDS if cfg.scrub_pii})
        for name, value in counts.items():
            col = np.zeros(len(out["ids"]), dtype=np.int32)
            if len(col):
                col[0] = value
            out[f"n_{name}" if name in COUNTS else name] = col
        return out

    return pack


def _drop_carriers(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keep = batch["n_tokens"] > 0
    return {k: v[keep] for k, v in batch.items()}


def task_blocks(splits: Splits, tokenizer: Any, cfg: DataSection, docs_per_batch: int = BLOCK_ROWS) -> PackedData:
    """Read, validate, render, tokenise, mask, truncate and pack (or pad) every split in Ray Data tasks
    (`make_task_packer`), materialise the compact rows, and count them; rows that cannot be used stop the
    run, named, before any Train worker starts."""
    data_context()
    pack = make_task_packer(tokenizer, cfg)
    counted = ["n_tokens", "n_loss", *(f"n_{c}" for c in COUNTS), *(f"pii_{k}" for k in PII_KINDS if cfg.scrub_pii)]
    packed = PackedData({}, {}, {}, dict.fromkeys(PII_KINDS, 0))
    for name in SPLITS:
        origin = splits.origin.get(name, name)
        try:
            ds = materialize(splits[name].dataset(docs_per_batch).map_batches(pack, batch_size=None,
                                                                              batch_format="numpy"))
        except DataError as e:
            raise DataError(f"{origin}: split {name!r}:\n  {e}") from None
        sums = column_sums(ds, counted)
        if sums["empty_rows"]:  # a batch kept nothing: drop the row that carried its counts
            ds = materialize(ds.map_batches(_drop_carriers, batch_size=None, batch_format="numpy"))
        packed.datasets[name], packed.blocks[name], packed.tokens[name] = ds, ds.count(), sums["n_tokens"]
        packed.loss_tokens[name], packed.bytes[name] = sums["n_loss"], ds.size_bytes()
        for k in PII_KINDS:
            packed.pii[k] += sums.get(f"pii_{k}", 0)
        packed.examples[name] = {"kept": sums["n_ok"] + sums["n_truncated"], "prompt_truncated": sums["n_truncated"],
                                 "dropped_too_long": sums["n_too_long"], "dropped_no_loss": sums["n_no_loss"]}
        if sums["n_loss"] == 0:
            raise DataError(f"{origin}: split {name!r} has no example left to learn or evaluate on "
                            f"({packed.examples[name]})")
    return packed
