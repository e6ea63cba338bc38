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

import json
from collections.abc import Callable, Iterator
from typing import Any

import datasets
import numpy as np

from aigc.config import DataSection
from aigc.corpus import SPLITS, ensure_embedded_corpus
from aigc.pii import scrub_batch
from aigc.splits import PII_KINDS, DataError, PackedData, Splits, carve, check_file, to_ray
from aigc.template import ROLES, Segment, TemplateError, chat_segments, encode_segments

MAX_LISTED = 10  # problems listed in one DataError; the rest are counted

# Per-example status, written by the encoder and read by the driver.
OK, TRUNCATED, TOO_LONG, NO_LOSS, RENDER_ERROR = range(5)


# ----------------------------------------------------------------------------------- rows and validation


def read_rows(path: str) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of a local file; `where` is 'file line N' for JSON lines, else 'file row N'."""
    p, builder = check_file(path)
    if builder == "text":
        raise DataError(f"{path}: plain text has no fields; task formats need .jsonl, .json, .csv or .parquet")
    if builder == "json":
        text = p.read_text()
        if text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON: {e}") from None
            for i, row in enumerate(rows, 1):
                yield f"{path} row {i}", row
            return
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n}: not valid JSON: {e}") from None
            yield f"{path} line {n}", row
        return
    try:
        ds = datasets.load_dataset(builder, data_files=str(p), split="train")
    except Exception as e:  # datasets raises many types for malformed files
        raise DataError(f"{path}: cannot be read as {builder}: {type(e).__name__}: {e}") from None
    for i, row in enumerate(ds, 1):
        yield f"{path} row {i}", row


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


def _validated(rows: Iterator[tuple[str, Any]], cfg: DataSection, what: str) -> Any:
    """Validate every row; one DataError lists the first problems and counts all. Returns a Dataset of the
    canonical columns (prompt/completion or messages) plus `source` and `row` for later messages."""
    check = chat_row if cfg.format == "chat" else prompt_completion_row
    problems: list[str] = []
    cols: dict[str, list] = {}
    for where, row in rows:
        canon = check(row, cfg, where, problems)
        if canon is not None:
            for k, v in {**canon, "source": where}.items():
                cols.setdefault(k, []).append(v)
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{what}: {len(problems)} bad row(s) for data.format={cfg.format}:\n  "
                        + "\n  ".join(problems[:MAX_LISTED]) + more)
    if not cols:
        raise DataError(f"{what}: no rows")
    return datasets.Dataset.from_dict(cols)


def load_task_splits(cfg: DataSection) -> Splits:
    """Validated train/validation/test examples of a task format, from files or a hub dataset."""
    if cfg.source == "embedded":
        files = {s: [p] for s, p in ensure_embedded_corpus(cfg).items()}
    elif cfg.source == "files":
        files = {"train": cfg.train_files, "validation": cfg.validation_files, "test": cfg.test_files}
    else:
        try:
            dd = datasets.load_dataset(cfg.hub_name, cfg.hub_config)
        except Exception as e:
            raise DataError(f"data.hub_name={cfg.hub_name!r}: cannot load: {type(e).__name__}: {e}") from None
        where = f"dataset {cfg.hub_name!r}"
        if "train" not in dd:
            raise DataError(f"{where}: has no 'train' split (splits: {list(dd)})")
        parts = {s: _validated(((f"{where}[{s}] row {i}", r) for i, r in enumerate(dd[s], 1)), cfg, f"{where}[{s}]")
                 for s in SPLITS if s in dd}
        if len(parts) < 3:
            parts = dict(zip(SPLITS, carve(parts["train"], cfg.split_ratios, cfg.split_seed, where), strict=True))
        return Splits(**parts, origin={s: f"{where}[{s}]" for s in SPLITS})

    def load(paths: list[str]) -> Any:
        return datasets.concatenate_datasets([_validated(read_rows(p), cfg, p) for p in paths])

    origin = {s: ", ".join(files[s]) if files[s] else f"carved from {', '.join(files['train'])}" for s in SPLITS}
    train = load(files["train"])
    if files["validation"]:
        return Splits(train, load(files["validation"]), load(files["test"]), origin)
    return Splits(*carve(train, cfg.split_ratios, cfg.split_seed, origin["train"]), origin=origin)


def training_texts(ds: Any) -> Iterator[str]:
    """The text of examples, to train the embedded tokenizer on (role markers as the default template writes)."""
    if "messages" in ds.column_names:
        for m in ds["messages"]:
            yield "".join(f"{x['role'].capitalize()}: {x['content']}\n" for x in json.loads(m))
    else:
        for p, c in zip(ds["prompt"], ds["completion"], strict=True):
            yield p + c


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


def pack_examples(ids: list[np.ndarray], labels: list[np.ndarray], block_size: int, pad: int) -> dict[str, np.ndarray]:
    """First-fit-decreasing packing of whole examples into `block_size` blocks, without cross-talk: position
    ids restart at 0 for every example (and for the padding at a block's end, its own segment), which
    transformers turns into a block-diagonal causal mask; padding has label -100."""
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
    shape = (len(bins), block_size)
    out = {"input_ids": np.full(shape, pad, dtype=np.int64), "labels": np.full(shape, -100, dtype=np.int64),
           "position_ids": np.zeros(shape, dtype=np.int64), "n_tokens": np.zeros(len(bins), dtype=np.int64),
           "n_loss": np.zeros(len(bins), dtype=np.int64)}
    for b, members in enumerate(bins):
        at = 0
        for i in members:
            n = len(ids[i])
            out["input_ids"][b, at:at + n] = ids[i]
            out["labels"][b, at:at + n] = labels[i]
            out["position_ids"][b, at:at + n] = np.arange(n)
            at += n
        out["position_ids"][b, at:] = np.arange(block_size - at)
        out["n_tokens"][b] = at
        out["n_loss"][b] = int((out["labels"][b] != -100).sum())
    return out


def make_blocker(block_size: int, packing: bool, pad: int) -> Callable[[dict], dict]:
    """Ray Data map 2: kept examples -> packed blocks, or one right-padded example per row with its
    attention mask (`aigc.data.train_batches` buckets rows by length and trims each batch to its longest)."""

    def block(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = np.isin(batch["status"], (OK, TRUNCATED))
        ids, labels, length = batch["input_ids"][keep], batch["labels"][keep], batch["length"][keep]
        if packing:
            return pack_examples([r[:n] for r, n in zip(ids, length, strict=True)],
                                 [r[:n] for r, n in zip(labels, length, strict=True)], block_size, pad)
        mask = (np.arange(block_size)[None, :] < length[:, None]).astype(np.int64)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "n_tokens": length,
                "n_loss": batch["n_loss"][keep]}

    return block


def task_blocks(splits: Splits, tokenizer: Any, cfg: DataSection, docs_per_batch: int = 1000) -> PackedData:
    """Render, tokenise, mask and truncate every example (Ray Data map 1); stop on rows that cannot be used;
    count what was dropped; then pack or pad (map 2). Everything materialised before any Train worker."""
    encode = make_encoder(tokenizer, cfg)
    block = make_blocker(cfg.block_size, cfg.packing, pad_id(tokenizer))
    counted = ["status", "length", "n_loss", "source", "error", *(f"pii_{k}" for k in PII_KINDS)]
    packed = PackedData({}, {}, {}, dict.fromkeys(PII_KINDS, 0))
    for name in SPLITS:
        examples = to_ray(splits[name], docs_per_batch).map_batches(encode, batch_size=None, batch_format="numpy")
        examples = examples.materialize()
        status_counts, bad = np.zeros(5, dtype=np.int64), []
        for b in examples.select_columns(counted).iter_batches(batch_size=None, batch_format="numpy"):
            status_counts += np.bincount(b["status"], minlength=5)
            for k in PII_KINDS:
                packed.pii[k] += int(b[f"pii_{k}"].sum())
            fatal = (b["status"] == RENDER_ERROR) | ((b["status"] == TOO_LONG) & (cfg.truncation == "error"))
            for i in np.flatnonzero(fatal)[:MAX_LISTED - len(bad)]:
                bad.append(b["source"][i] + ": " + (b["error"][i] or f"longer than data.block_size={cfg.block_size} "
                                                    "tokens (data.truncation=error; drop or truncate_prompt_left)"))
        if bad:
            raise DataError(f"{splits.origin.get(name, name)}: split {name!r}:\n  " + "\n  ".join(bad))
        ds = examples.map_batches(block, batch_size=None, batch_format="numpy").materialize()
        sums = {"n_tokens": 0, "n_loss": 0}
        for b in ds.select_columns(list(sums)).iter_batches(batch_size=None, batch_format="numpy"):
            for c in sums:
                sums[c] += int(b[c].sum())
        packed.datasets[name], packed.blocks[name], packed.tokens[name] = ds, ds.count(), sums["n_tokens"]
        packed.loss_tokens[name] = sums["n_loss"]
        packed.examples[name] = {"kept": int(status_counts[OK] + status_counts[TRUNCATED]),
                                 "prompt_truncated": int(status_counts[TRUNCATED]),
                                 "dropped_too_long": int(status_counts[TOO_LONG]),
                                 "dropped_no_loss": int(status_counts[NO_LOSS])}
        if sums["n_loss"] == 0:
            raise DataError(f"{splits.origin.get(name, name)}: split {name!r} has no example left to learn or "
                            f"evaluate on ({packed.examples[name]})")
    return packed
