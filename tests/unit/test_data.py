"""Data: compact packing and the labels and masks built from it, bad input failing with the file and column
named, and the driver checking files without reading them whole."""

import json

import numpy as np
import pytest
import torch

from aigc import splits as splits_module
from aigc.config import DataSection
from aigc.data import DataError, expand, load_splits, pack_ids
from aigc.splits import SAMPLE_ROWS, SplitSource, token_dtype


def unpacked(out):
    """What the model sees of compact rows: `expand` of them as torch tensors (as Ray hands them over)."""
    return {k: v.numpy() for k, v in expand({k: torch.from_numpy(v) for k, v in out.items()}).items()}


def texts(split):
    return [r["text"] for r in split.rows()]


def test_pack_puts_eos_between_documents_and_labels_equal_inputs():
    eos = 0
    out = unpacked(pack_ids([[5, 6, 7], [8, 9], [10, 11, 12, 13]], eos_id=eos, block_size=4))
    stream = [5, 6, 7, 0, 8, 9, 0, 10, 11, 12, 13, 0]  # 12 tokens -> exactly 3 full blocks
    assert out["input_ids"].reshape(-1).tolist() == stream
    assert np.array_equal(out["labels"], out["input_ids"])
    assert out["attention_mask"].all() and out["n_tokens"].tolist() == [4, 4, 4]


def test_tail_is_padded_and_masked_not_dropped():
    out = unpacked(pack_ids([[1, 2, 3, 4, 5]], eos_id=0, block_size=4))  # 6 tokens -> 1 full block + 2-token tail
    assert out["input_ids"].shape == (2, 4)
    assert out["labels"][1].tolist() == [5, 0, -100, -100]  # padding never learned
    assert out["attention_mask"][1].tolist() == [1, 1, 0, 0]
    assert out["n_tokens"].tolist() == [4, 2]


def test_tokens_are_stored_in_two_bytes_when_the_vocabulary_fits():
    assert token_dtype(65_536, 0) == np.uint16 and token_dtype(65_537, 0) == np.int32
    assert token_dtype(16_384, 2) == np.uint16 and token_dtype(16_385, 2) == np.int32  # task rows: 2 flag bits
    docs = [[65_535, 1, 2] * 40, [7] * 30]
    out = pack_ids(docs, eos_id=0, block_size=64, dtype=token_dtype(65_536, 0))
    assert out["ids"].dtype == np.uint16 and set(out) == {"ids", "n_tokens", "layout"}  # no labels, no mask
    n_tokens = int(out["n_tokens"].sum())
    assert n_tokens == 152 and sum(v.nbytes for v in out.values()) / n_tokens <= 2 * 64 * 3 / 152 + 0.1
    model = unpacked(out)
    assert model["input_ids"].reshape(-1)[:n_tokens].tolist() == [t for d in docs for t in (*d, 0)]  # round trip
    assert (model["labels"] == -100).sum() == 3 * 64 - n_tokens


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def files_cfg(tmp_path, train, **kw):
    return DataSection(source="files", train_files=[train], **kw)


def test_jsonl_carved_by_ratio_with_fixed_seed(tmp_path):
    f = write(tmp_path / "d.jsonl", [{"body": f"document number {i}"} for i in range(100)])
    cfg = files_cfg(tmp_path, f, text_column="body", split_ratios=(0.8, 0.1, 0.1))
    a, b = load_splits(cfg), load_splits(cfg)
    assert (len(a.train), len(a.validation), len(a.test)) == (80, 10, 10)
    assert texts(a.test) == texts(b.test)  # same carve every run
    assert not set(texts(a.train)) & set(texts(a.test))
    assert sorted(texts(a.train) + texts(a.validation) + texts(a.test)) == sorted(f"document number {i}" for i in range(100))


def test_csv_parquet_and_txt_load(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.csv").write_text("text,label\nhello there,1\ngeneral kenobi,2\n")
    pq.write_table(pa.table({"text": ["one doc", "two doc"]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("line one\nline two\n")
    cfg = DataSection(source="files", train_files=[str(tmp_path / "a.csv"), str(tmp_path / "c.txt")],
                     validation_files=[str(tmp_path / "b.parquet")], test_files=[str(tmp_path / "c.txt")])
    s = load_splits(cfg)
    assert texts(s.train) == ["hello there", "general kenobi", "line one", "line two"]
    assert texts(s.validation) == ["one doc", "two doc"]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: str(p / "missing.jsonl"), "missing.jsonl: no such file"),
        (lambda p: (p / "empty.jsonl").touch() or str(p / "empty.jsonl"), "empty.jsonl: file is empty"),
        (lambda p: write(p / "col.jsonl", [{"body": "x"}]), "col.jsonl: no column 'text'"),
        (lambda p: write(p / "num.jsonl", [{"text": 1}, {"text": 2}]), "num.jsonl: column 'text' holds"),
        (lambda p: write(p / "null.jsonl", [{"text": "a"}, {"text": None}]), "null.jsonl: column 'text' has 1 missing"),
        (lambda p: str(p / "x.docx"), "unsupported file type"),
    ],
)
def test_bad_files_named_in_error(tmp_path, make, match):
    with pytest.raises(DataError, match=match):
        load_splits(files_cfg(tmp_path, make(tmp_path)))


def test_too_few_documents_to_carve(tmp_path):
    f = write(tmp_path / "tiny.jsonl", [{"text": "only one"}])
    with pytest.raises(DataError, match="too few to carve"):
        load_splits(files_cfg(tmp_path, f))


def test_packer_scrubs_pii_before_tokenising_and_counts_it():
    from aigc.data import make_packer
    from aigc.modeling import train_tokenizer

    texts = ["Write to jane.doe@example.com or call (555) 123-4567.", "Card 4111 1111 1111 1111 on file."]
    tok = train_tokenizer(texts * 20, vocab_size=300)
    out = make_packer(tok, block_size=16, scrub_pii=True)({"text": np.array(texts, dtype=object)})
    model = unpacked({k: v for k, v in out.items() if not k.startswith("pii_")})
    decoded = tok.decode(model["input_ids"][model["attention_mask"] == 1])
    assert "jane.doe" not in decoded and "4111" not in decoded and "[EMAIL]" in decoded and "[CARD]" in decoded
    assert {k: int(out[f"pii_{k}"].sum()) for k in ("email", "phone", "card")} == {"email": 1, "phone": 1, "card": 1}


def test_the_driver_checks_a_sample_and_reads_nothing_else(tmp_path, monkeypatch):
    """`load_splits` returns split sources (files, not rows) after reading SAMPLE_ROWS rows of a file: a bad
    row beyond them is the cluster's to find, and the carve's row count is left for the cluster to count."""
    rows = [{"text": f"document {i}"} for i in range(SAMPLE_ROWS + 500)]
    rows[SAMPLE_ROWS + 100] = {"text": 12}
    f = write(tmp_path / "big.jsonl", rows)
    pulled = []
    real = splits_module.stream_rows

    def counting(fh, path):
        for item in real(fh, path):
            pulled.append(item)
            yield item

    monkeypatch.setattr(splits_module, "stream_rows", counting)
    s = load_splits(files_cfg(tmp_path, f))
    assert len(pulled) <= SAMPLE_ROWS + 1  # the sample, and the one row that showed there is more
    assert isinstance(s.train, SplitSource) and s.train.files == (f,) and s.train.carve.counts == (None,)
    with pytest.raises(DataError, match=r"big.jsonl: column 'text' holds int, not text, in .*big.jsonl line 1101"):
        monkeypatch.setattr(splits_module, "count_rows", lambda files, known: (len(rows),))  # no Ray here
        for split in (s.train, s.validation, s.test):  # the row is in one of them
            list(split.rows())  # reading every row (here, on the driver) finds it, naming file, column and line


def test_corpus_cli_writes_the_splits(tmp_path):
    from aigc.cli import main

    assert main(["corpus", "--out", str(tmp_path), "--n-train", "20", "--n-validation", "5", "--n-test", "5"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grammar.json", "test.jsonl", "train.jsonl", "validation.jsonl"]
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 20
