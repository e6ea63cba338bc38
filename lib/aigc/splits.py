"""What the text and task loaders share: `DataError`, the `Splits` and `PackedData` containers, the file
checks, carving splits by ratio, and handing a validated dataset to Ray Data. (The split names and the
embedded corpus's files are `aigc.corpus`'s, which needs no Ray.)

`aigc.data` loads and packs plain text and `aigc.taskdata` the task formats; both build on this module, and
`aigc.data` hands a task format over to `aigc.taskdata`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.data

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
