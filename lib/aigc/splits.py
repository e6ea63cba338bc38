"""What the text and task loaders share: the split names, `DataError`, the `Splits` and `PackedData`
containers, the file checks, the embedded corpus on disk, carving splits by ratio, and handing a validated
dataset to Ray Data.

`aigc.data` loads and packs plain text and `aigc.taskdata` the task formats; both build on this module, and
`aigc.data` hands a task format over to `aigc.taskdata`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.data

from aigc.config import DataConfig
from aigc.corpus import DEFAULT_GRAMMAR, write_corpus, write_task_corpus

SPLITS = ("train", "validation", "test")
PII_KINDS = ("email", "phone", "card", "national_id")
# file suffix -> `datasets` builder
FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """Input data cannot be used; the message names the file (or dataset) and the column."""


@dataclass
class Splits:
    """Validated train/validation/test data as `datasets.Dataset`s: one column `text`, or for the task formats
    `prompt` and `completion` (or `messages`, as JSON) and `source` (file and line, for messages)."""

    train: Any
    validation: Any
    test: Any
    origin: dict[str, str] = field(default_factory=dict)  # split -> where it came from, for messages

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)


@dataclass
class PackedData:
    """Every split tokenised, packed (or padded) and materialised in Ray Data, with what the run reports."""

    datasets: dict[str, Any]  # split -> materialized ray.data.Dataset of blocks (or padded examples)
    blocks: dict[str, int]  # rows: blocks, or examples when task data is not packed
    tokens: dict[str, int]  # tokens that are not padding
    pii: dict[str, int]
    loss_tokens: dict[str, int] = field(default_factory=dict)  # task formats: tokens whose label is not -100
    examples: dict[str, dict[str, int]] = field(default_factory=dict)  # task formats: kept / dropped counts

    def loss_fraction(self) -> dict[str, float]:
        """Per split, the fraction of tokens that carry loss (1.0 minus the first token for text)."""
        return {s: round(self.loss_tokens[s] / max(self.tokens[s], 1), 4) for s in self.loss_tokens}


def embedded_corpus_dir(cfg: DataConfig) -> Path:
    """The embedded corpus is generated once per (grammar, kind, seed, sizes) into the user's cache and then read
    as files. `data.format` picks the kind: plain ads for `text` (pre-training), brief -> ad rows otherwise."""
    e = cfg.embedded
    kind = "ads" if cfg.format == "text" else "task"
    root = Path(os.path.expanduser("~/.cache/aigc/corpus"))
    return root / f"{kind}-{DEFAULT_GRAMMAR.fingerprint()}-seed{e.seed}-{e.n_train}-{e.n_validation}-{e.n_test}"


def ensure_embedded_corpus(cfg: DataConfig) -> dict[str, str]:
    """split -> path of the embedded corpus's jsonl file, written first if this cache does not hold it yet."""
    out = embedded_corpus_dir(cfg)
    paths = {s: str(out / f"{s}.jsonl") for s in SPLITS}
    if not all(os.path.isfile(p) for p in paths.values()):
        e = cfg.embedded
        write = write_corpus if cfg.format == "text" else write_task_corpus
        paths = write(out, n_train=e.n_train, n_validation=e.n_validation, n_test=e.n_test, seed=e.seed)
    return paths


def check_file(path: str) -> tuple[Path, str]:
    """A local data file that exists and is not empty, and the `datasets` builder for its type."""
    p = Path(path).expanduser()
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unsupported file type {p.suffix!r}; use one of {sorted(FORMATS)}")
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    if p.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    return p, fmt


def carve(ds: Any, ratios: tuple[float, float, float], seed: int, where: str) -> tuple[Any, Any, Any]:
    """Split one dataset into train/validation/test by ratio with a fixed seed (same split every run)."""
    n = len(ds)
    n_val, n_test = round(n * ratios[1]), round(n * ratios[2])
    if n - n_val - n_test < 1 or (ratios[1] > 0 and n_val < 1) or (ratios[2] > 0 and n_test < 1):
        raise DataError(f"{where}: {n} documents are too few to carve splits {ratios} (data.split_ratios)")
    shuffled = ds.shuffle(seed=seed)
    return (
        shuffled.select(range(n_val + n_test, n)),
        shuffled.select(range(n_val)),
        shuffled.select(range(n_val, n_val + n_test)),
    )


def to_ray(ds: Any, docs_per_block: int) -> Any:
    """A `datasets.Dataset` as a Ray Dataset of several Arrow blocks (so the map runs in parallel tasks).

    `ray.data.from_huggingface` re-resolves the dataset's source files inside the Ray workers; handing over
    the Arrow table the driver already validated is both faster and exactly what was checked.
    """
    table = ds.flatten_indices().data.table
    return ray.data.from_arrow([table.slice(i, docs_per_block) for i in range(0, max(len(table), 1), docs_per_block)])
