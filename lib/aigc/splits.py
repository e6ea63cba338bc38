"""What the text and task loaders share: `DataError`, the file checks, reading rows of a file in a stream (on
the driver for a sample, in Ray Data read tasks for all of it), carving splits by ratio, the lazy `SplitSource`
of each split, the compact token layout, and the `PackedData` the cluster hands back. (The split names and the
embedded corpus's files are `aigc.corpus`'s, which needs no Ray.)

Nothing here holds a corpus. The driver reads the first `SAMPLE_ROWS` rows of every file to check them; Ray
Data's file reader (`RowSource`, a `FileBasedDatasource`, so local paths and object-store URIs take the same
code) streams every row on the cluster, numbered by file and line so that problems found there still name them.

`aigc.data` loads and packs plain text and `aigc.taskdata` the task formats; both build on this module, and
`aigc.data` hands a task format over to `aigc.taskdata`.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray.data
from ray.data.datasource import FileBasedDatasource

from aigc.config import DataSection
from aigc.corpus import SPLITS, ensure_embedded_corpus

PII_KINDS = ("email", "phone", "card", "national_id")
# file suffix -> how its rows are read
FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SAMPLE_ROWS = 1000  # rows of every file the driver checks before Ray starts; the cluster checks every row
CHUNK_ROWS = 1000  # rows per table a read task yields (Ray joins them into blocks)
BLOCK_ROWS = 2000  # rows per block, about: one tokenise/pack task each (a task costs Ray ~40 ms on its own)
READ_CPUS = 0.25  # a read task only splits lines; a different CPU request keeps Ray from fusing it with the
# tokenising map, so a single file's blocks are tokenised by parallel tasks, not by its one read task
READ_AHEAD_BLOCKS = 8  # blocks a read task may yield before its consumer takes them (Ray Data's default: 2)

# ----------------------------------------------------------------------------------- compact tokens
#
# Packed rows hold one integer per token position, nothing else per token: `ids` is uint16 when every stored
# value fits (< 65,536), else int32, so at most 4 bytes a token. Task formats keep two flag bits below the
# token id: value = id << 2 | LOSS (the token is a label) | START (an example, or the padding, starts here).
# Labels, attention masks and position ids are rebuilt from them where the batch is used
# (`aigc.data.model_inputs`). Per row: `n_tokens` (int32, tokens before the padding), `layout` (uint8).
TEXT, PADDED, PACKED = 0, 1, 2  # layout: text blocks; one task example per row; task examples packed
LOSS, START = 1, 2
FLAG_BITS = {TEXT: 0, PADDED: 2, PACKED: 2}


def token_dtype(vocab_size: int, flag_bits: int) -> np.dtype:
    """uint16 when ids (shifted by the flag bits) stay below 65,536, else int32: at most 4 bytes a token."""
    if (vocab_size << flag_bits) <= 1 << 16:
        return np.dtype(np.uint16)
    if (vocab_size << flag_bits) > 1 << 31:
        raise DataError(f"a vocabulary of {vocab_size:,} tokens does not fit the int32 token layout")
    return np.dtype(np.int32)


def encode_tokens(ids: np.ndarray, flags: np.ndarray | int, flag_bits: int, dtype: np.dtype) -> np.ndarray:
    """Token ids (and, for task layouts, their LOSS/START flags) as the stored integers."""
    return ((np.asarray(ids, dtype=np.int64) << flag_bits) | flags).astype(dtype)


class DataError(ValueError):
    """Input data cannot be used; the message names the file (or dataset) and the column."""


@dataclass
class PackedData:
    """Every split tokenised, packed (or padded) and materialised in Ray Data, with what the run reports."""

    datasets: dict[str, Any]  # split -> materialized ray.data.Dataset of compact rows (see "compact tokens")
    blocks: dict[str, int]  # rows: blocks, or examples when task data is not packed
    tokens: dict[str, int]  # tokens that are not padding
    pii: dict[str, int]
    loss_tokens: dict[str, int] = field(default_factory=dict)  # task formats: tokens whose label is not -100
    examples: dict[str, dict[str, int]] = field(default_factory=dict)  # task formats: kept / dropped counts
    bytes: dict[str, int] = field(default_factory=dict)  # object-store bytes of each split's rows

    def loss_fraction(self) -> dict[str, float]:
        """Per split, the fraction of tokens that carry loss (1.0 minus the first token for text)."""
        return {s: round(self.loss_tokens[s] / max(self.tokens[s], 1), 4) for s in self.loss_tokens}


# ------------------------------------------------------------------------------------------- files


def check_file(path: str) -> tuple[Path, str]:
    """A local data file that exists and is not empty, and how its rows are read (text, json, csv, parquet)."""
    p = Path(path).expanduser()
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unsupported file type {p.suffix!r}; use one of {sorted(FORMATS)}")
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    if p.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    return p, fmt


def _lines(f: Any) -> Iterator[str]:
    """Decoded lines of a binary stream, read in 16 MiB chunks (a line is never held twice)."""
    rest = b""
    for chunk in iter(lambda: f.read(1 << 24), b""):
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            yield line.decode("utf-8").rstrip("\r")
    if rest:
        yield rest.decode("utf-8").rstrip("\r")


def stream_rows(f: Any, path: str, parse: bool = True) -> Iterator[tuple[int, Any]]:
    """(number, row) of every row of a file's binary stream `f`: JSON lines (blank lines skipped, numbered by
    line), a JSON array's elements, CSV and Parquet rows (dicts), plain text lines (strings); numbered from 1.
    `parse=False` leaves JSON lines as their text (the reader's tasks parse them where they are checked)."""
    kind = FORMATS[Path(path).suffix.lower()]
    if kind == "parquet":
        n = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=CHUNK_ROWS):
            for row in batch.to_pylist():
                n += 1
                yield n, row
        return
    if kind == "csv":
        try:
            reader = pacsv.open_csv(f)
        except pa.ArrowInvalid as e:
            raise DataError(f"{path}: cannot be read as csv: {e}") from None
        n = 0
        for batch in reader:
            for row in batch.to_pylist():
                n += 1
                yield n, row
        return
    if kind == "text":
        yield from enumerate(_lines(f), 1)
        return
    lines = _lines(f)
    first = next(lines, "")
    if first.lstrip().startswith("["):  # a JSON array: not streamable, the read task holds this one file
        text = "\n".join([first, *lines])
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON: {e}") from None
        yield from enumerate(rows, 1)
        return
    for n, line in enumerate(itertools.chain([first], lines), 1):
        if line.strip():
            yield n, json_line(line, path, n) if parse else line


def json_line(line: str, path: str, n: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {n}: not valid JSON: {e}") from None


def where(path: str, n: int) -> str:
    """How messages name a row: 'file line N' for JSON lines, else 'file row N'."""
    p = Path(path)
    line = FORMATS.get(p.suffix.lower()) == "json" and p.suffix.lower() == ".jsonl"
    return f"{path} {'line' if line else 'row'} {n}"


def file_rows(path: str) -> Iterator[tuple[int, Any]]:
    """`stream_rows` of a local file, on this process."""
    p, _ = check_file(path)
    with open(p, "rb") as f:
        yield from stream_rows(f, path)


# ------------------------------------------------------------------------------------------- carving


@dataclass(frozen=True)
class Carve:
    """Which rows of the carved files a split gets: row i (counted over the files in order) goes to the part
    its rank `(a * i + b) mod n` falls in: [0, n_val) validation, [n_val, n_val + n_test) test, the rest
    train. An affine permutation with `a` coprime to `n`, both drawn from the seed: exact sizes, the same on
    every run and in every task, computed per row with no shuffle (the rows are streamed once). The ranks of
    neighbouring rows are `a` apart, so each part is spread evenly over the files."""

    part: int  # 0 train, 1 validation, 2 test
    counts: tuple[int | None, ...]  # rows per file; None: not counted yet (`resolved`)
    ratios: tuple[float, float, float]
    seed: int
    where: str = ""

    def resolved(self, files: tuple[str, ...]) -> Carve:
        """With every file's rows counted (by Ray Data tasks for files the driver did not count)."""
        if None not in self.counts:
            return self
        counts = count_rows(files, self.counts)
        check_carve(sum(counts), self.ratios, self.where)
        return replace(self, counts=counts)

    @functools.cached_property
    def _affine(self) -> tuple[int, int, int]:
        n = sum(self.counts)  # type: ignore[arg-type]
        if n >= 1 << 32:
            raise DataError(f"{self.where}: {n:,} rows are more than carving supports (2**32); give "
                            "data.validation_files and data.test_files")
        rng = np.random.default_rng(self.seed)
        # a < 2**31 and n < 2**32 keep a * i below 2**63
        a = next((int(x) for x in rng.integers(1, min(max(n, 2), 1 << 31), size=64) if math.gcd(int(x), n) == 1), 1)
        return n, a, int(rng.integers(0, max(n, 1)))

    def keep(self, file: int, ordinals: np.ndarray) -> np.ndarray:
        """Mask of the rows (0-based ordinals within file number `file`) that belong to this split."""
        n, a, b = self._affine
        index = sum(self.counts[:file]) + np.asarray(ordinals, dtype=np.int64)  # type: ignore[arg-type]
        rank = (a * index + b) % max(n, 1)
        n_val, n_test = round(n * self.ratios[1]), round(n * self.ratios[2])
        part = np.where(rank < n_val, 1, np.where(rank < n_val + n_test, 2, 0))
        return part == self.part


def check_carve(n: int, ratios: tuple[float, float, float], where_: str) -> None:
    """Enough rows for every non-empty part."""
    n_val, n_test = round(n * ratios[1]), round(n * ratios[2])
    if n - n_val - n_test < 1 or (ratios[1] > 0 and n_val < 1) or (ratios[2] > 0 and n_test < 1):
        raise DataError(f"{where_}: {n} documents are too few to carve splits {ratios} (data.split_ratios)")


# ------------------------------------------------------------------------------------------ reading


class RowSource(FileBasedDatasource):
    """Ray Data reader of every supported file type: each block holds `file` (its index in `paths`), `row`
    (line or row number, for messages), `ordinal` (0-based row index within the file, for carving) and `raw`
    (the row: a text line, or JSON). With `carve`, only the rows of that split; with `count_only`, one row per
    block with how many rows it read (what carving needs to know first)."""

    def __init__(self, paths: list[str], carve: Carve | None = None, count_only: bool = False, chunk: int = CHUNK_ROWS):
        self.files = [str(Path(p).expanduser().resolve()) for p in paths]
        super().__init__(self.files, file_extensions=None)
        self.index = {p: i for i, p in enumerate(self.files)}
        self.carve, self.count_only, self.chunk = carve, count_only, chunk

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> Any:
        if path.lower().endswith(".parquet"):  # the footer first: random access
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
        file = self.index[str(Path(path).resolve())]
        text = FORMATS[Path(path).suffix.lower()] == "text" or path.lower().endswith(".jsonl")  # rows as text
        rows: list[tuple[int, Any]] = []
        start = 0
        for item in stream_rows(f, path, parse=False):
            rows.append(item)
            if len(rows) == self.chunk:
                yield self._block(file, start, rows, text)
                start, rows = start + len(rows), []
        if rows or start == 0:
            yield self._block(file, start, rows, text)

    def _block(self, file: int, start: int, rows: list[tuple[int, Any]], text: bool) -> pa.Table:
        if self.count_only:
            return pa.table({"file": [file], "rows": [len(rows)]})
        ordinal = np.arange(start, start + len(rows), dtype=np.int64)
        keep = self.carve.keep(file, ordinal) if self.carve else np.ones(len(rows), dtype=bool)
        kept = [r for r, k in zip(rows, keep, strict=True) if k]
        raw = [r if text else json.dumps(r, ensure_ascii=False, default=str) for _, r in kept]
        return pa.table({"file": pa.array([file] * len(kept), pa.int32()), "row": pa.array([n for n, _ in kept], pa.int64()),
                         "ordinal": pa.array(ordinal[keep]), "raw": pa.array(raw, pa.large_string())})


# A canonicaliser turns one raw row into the canonical row of a format ({"text"}, {"prompt", "completion"},
# {"messages"}), or None for a row to skip, appending what is wrong with it to `problems`.
Canon = Callable[[Any, str, str, list[str]], dict[str, Any] | None]


@dataclass(frozen=True)
class SplitSource:
    """One split, not read: the files it comes from, the part of them when carved, and how a raw row becomes
    a canonical row (`canon(row, path, where, problems)`). `rows()` streams it on the driver; `dataset()` is
    the lazy Ray Dataset of canonical rows the cluster tokenises; neither ever holds the whole split."""

    files: tuple[str, ...]
    canon: Canon
    columns: tuple[str, ...]  # the canonical columns, in order
    carve: Carve | None = None
    rows_estimate: tuple[float, ...] = ()  # rows per file: counted, or estimated from the sample's row size
    report: Callable[[list[str], str], None] | None = None  # raises the DataError for problems of `what`

    def _problems(self, problems: list[str], what: str) -> None:
        if problems:
            if self.report:
                self.report(problems, what)
            raise DataError("\n".join(problems))

    def resolved(self) -> SplitSource:
        """This split with its carve's row counts known."""
        return replace(self, carve=self.carve.resolved(self.files)) if self.carve else self

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every canonical row of the split, streamed on this process (carve applied)."""
        carve = self.resolved().carve
        for i, path in enumerate(self.files):
            rows = file_rows(path)
            for start in itertools.count(0, CHUNK_ROWS):
                chunk = list(itertools.islice(rows, CHUNK_ROWS))
                if not chunk:
                    break
                keep = carve.keep(i, np.arange(start, start + len(chunk))) if carve else [True] * len(chunk)
                for (n, row), kept in zip(chunk, keep, strict=True):
                    if not kept:
                        continue
                    problems: list[str] = []
                    out = self.canon(row, path, where(path, n), problems)
                    self._problems(problems, path)
                    if out is not None:
                        yield out

    def to_list(self) -> list[dict[str, Any]]:
        """Every canonical row in a list: for the small splits (test examples) only."""
        return list(self.rows())

    def __len__(self) -> int:
        return sum(1 for _ in self.rows())

    def dataset(self, rows_per_block: int = BLOCK_ROWS) -> Any:
        """The split as a lazy Ray Dataset of canonical rows: read, carved and checked by Ray Data tasks.

        Its blocks (one tokenise/pack task each, and where packing restarts) are cut from the files' sizes alone
        (`override_num_blocks`: about `rows_per_block` rows each, by the row counts or estimates), never from
        the CPUs the cluster has now: the same data gives the same blocks, so the same packed rows, on a
        resumed run or another cluster."""
        carve = self.resolved().carve
        blocks = max(len(self.files), math.ceil(sum(self.rows_estimate or (0,)) / rows_per_block))
        read = ray.data.read_datasource(RowSource(list(self.files), carve), num_cpus=READ_CPUS,
                                        override_num_blocks=blocks)
        return read.map_batches(self._canonical, batch_size=None, batch_format="pyarrow")

    def _canonical(self, block: pa.Table) -> dict[str, np.ndarray]:
        files, rows, raws = block["file"].to_pylist(), block["row"].to_pylist(), block["raw"].to_pylist()
        out: dict[str, list] = {c: [] for c in self.columns}
        problems: list[str] = []
        for file, n, raw in zip(files, rows, raws, strict=True):
            path = self.files[file]
            row = raw if FORMATS[Path(path).suffix.lower()] == "text" else json_line(raw, path, n)
            canon = self.canon(row, path, where(path, n), problems)
            if canon is not None:
                for c in self.columns:
                    out[c].append(canon[c])
        self._problems(problems, ", ".join(sorted({self.files[f] for f in set(files)})))
        return {c: np.array(v, dtype=object) for c, v in out.items()}


def count_rows(files: tuple[str, ...], known: tuple[int | None, ...]) -> tuple[int, ...]:
    """Rows per file: the driver's sample counted the small files; Ray Data tasks count the others (once per
    file version in this process)."""
    todo = [p for p, k in zip(files, known, strict=True) if k is None and _stat(p) not in _COUNTED]
    if todo:
        got = dict.fromkeys(todo, 0)
        ds = ray.data.read_datasource(RowSource(todo, count_only=True), num_cpus=READ_CPUS)
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for f, n in zip(b["file"], b["rows"], strict=True):
                got[todo[int(f)]] += int(n)
        _COUNTED.update({_stat(p): n for p, n in got.items()})
    return tuple(int(k) if k is not None else _COUNTED[_stat(p)] for p, k in zip(files, known, strict=True))


_COUNTED: dict[tuple[str, int, int], int] = {}


def _stat(path: str) -> tuple[str, int, int]:
    st = Path(path).expanduser().stat()
    return str(Path(path).expanduser().resolve()), st.st_size, st.st_mtime_ns


@dataclass
class Splits:
    """Train/validation/test `SplitSource`s (not read), and where each came from, for messages."""

    train: Any
    validation: Any
    test: Any
    origin: dict[str, str] = field(default_factory=dict)  # split -> where it came from, for messages

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)


@dataclass
class Sample:
    """The first SAMPLE_ROWS (number, row) of a file; its row count when they are all of it, else None; and
    its rows, counted or estimated from the sampled rows' size (what `SplitSource.dataset` cuts blocks by)."""

    rows: list[tuple[int, Any]]
    count: int | None
    estimate: float


def sample(path: str) -> Sample:
    rows, complete = [], True
    for item in file_rows(path):
        if len(rows) == SAMPLE_ROWS:
            complete = False
            break
        rows.append(item)
    if complete:
        return Sample(rows, len(rows), float(len(rows)))
    row_bytes = sum(len(r if isinstance(r, str) else json.dumps(r, default=str)) + 1 for _, r in rows) / len(rows)
    return Sample(rows, None, Path(path).expanduser().stat().st_size / row_bytes)


def file_splits(files: dict[str, list[str]], source: SplitSource, ratios: tuple[float, float, float], seed: int,
                samples: dict[str, Sample]) -> Splits:
    """Splits of checked files: the given validation/test files, or all three carved from the train files.
    Rows per file are known where the driver's sample reached the end; Ray Data counts the others on first use."""
    origin = {s: ", ".join(files[s]) if files[s] else f"carved from {', '.join(files['train'])}"
              for s in ("train", "validation", "test")}

    def of(paths: list[str], carve: Carve | None = None) -> SplitSource:
        return replace(source, files=tuple(paths), carve=carve, rows_estimate=tuple(samples[p].estimate for p in paths))

    if files["validation"]:
        return Splits(*(of(files[s]) for s in ("train", "validation", "test")), origin=origin)
    known = tuple(samples[p].count for p in files["train"])
    if None not in known:
        check_carve(sum(known), ratios, origin["train"])  # type: ignore[arg-type]
    return Splits(*(of(files["train"], Carve(part, known, ratios, seed, origin["train"])) for part in range(3)),
                  origin=origin)


def hub_files(cfg: DataSection) -> dict[str, list[str]]:
    """A hub dataset's splits as Parquet files beside its `datasets` cache (written once, streamed from the
    memory-mapped cache), so that hub data takes the same file path as local files."""
    try:
        import datasets  # only for hub data (~1 s to import: not in every Train worker)

        dd = datasets.load_dataset(cfg.hub_name, cfg.hub_config)
    except Exception as e:
        raise DataError(f"data.hub_name={cfg.hub_name!r}: cannot load: {type(e).__name__}: {e}") from None
    if "train" not in dd:
        raise DataError(f"dataset {cfg.hub_name!r}: has no 'train' split (splits: {list(dd)})")
    files = {s: [] for s in SPLITS}
    have = [s for s in SPLITS if s in dd]
    for s in have if len(have) == 3 else ["train"]:
        out = Path(dd[s].cache_files[0]["filename"]).parent / f"aigc-{s}.parquet" if dd[s].cache_files else None
        if out is None:
            raise DataError(f"dataset {cfg.hub_name!r}: split {s!r} has no cache files to read from")
        if not out.is_file():
            dd[s].to_parquet(str(out))
        files[s] = [str(out)]
    return files


def data_files(cfg: DataSection) -> tuple[dict[str, list[str]], str]:
    """split -> files (validation and test empty: carve them from train), and the column of the text."""
    if cfg.source == "embedded":
        return {s: [p] for s, p in ensure_embedded_corpus(cfg).items()}, "text"
    if cfg.source == "hub":
        return hub_files(cfg), cfg.text_column
    return {"train": cfg.train_files, "validation": cfg.validation_files, "test": cfg.test_files}, cfg.text_column


def materialize(ds: Any) -> Any:
    """`ds.materialize()`, with a DataError raised by a Ray Data task (a bad row found on the cluster)
    re-raised as itself, naming the file, column and row."""
    try:
        return ds.materialize()
    except Exception as e:
        found = find_data_error(e)
        if found is None:
            raise
        raise found from None


def column_sums(ds: Any, columns: list[str]) -> dict[str, int]:
    """Sums of small per-row columns (and `empty_rows`: rows whose `n_tokens` is 0), streamed to the driver:
    `Dataset.aggregate` runs a hash shuffle that cost ~5 s a split here, for a few integers."""
    sums = dict.fromkeys([*columns, "empty_rows"], 0)
    for batch in ds.select_columns(columns).iter_batches(batch_size=None, batch_format="numpy"):
        for c in columns:
            sums[c] += int(batch[c].sum())
        sums["empty_rows"] += int((batch["n_tokens"] == 0).sum())
    return sums


def data_context() -> None:
    """The driver's Ray Data settings for preparing data. Block order is kept through every map: the packed
    rows, and so each rank's shard (and a resumed run's position in it), are the same on every run. A map
    task's own exception (a DataError naming a bad row) reaches the driver as itself, not as Ray Data's
    "UDF failed".

    And the tokenise/pack tasks get every CPU: by default Ray Data reserves half the cluster's resources,
    split evenly, for each operator of a pipeline, so on a small cluster the read (a fraction of a CPU,
    waiting on nothing) kept the tokenising operator to about one task at a time (measured on 2 CPUs: 50
    pack tasks run one after another; bench/data_scaling.py). These pipelines are two operators that are
    run to completion, read then pack, with nothing downstream to starve; and a read task may run further
    ahead of its consumer (8 blocks, not 2) so that it finishes and frees its CPU share sooner."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.raise_original_map_exception = True
    ctx.op_resource_reservation_enabled = False
    ctx._max_num_blocks_in_streaming_gen_buffer = READ_AHEAD_BLOCKS


def find_data_error(e: BaseException) -> DataError | None:
    """The DataError a Ray Data task raised, from the exception the driver got (a RayTaskError whose `cause`
    it is, with `raise_original_map_exception`; see `data_context`)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, DataError) or type(e) is DataError:
            # Ray Data appends its retry advice to the message; the problem is what comes before it
            return DataError(str(cause if isinstance(cause, DataError) else e).split("\nFailed to apply UDF")[0])
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None
