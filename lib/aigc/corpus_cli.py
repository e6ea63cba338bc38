"""`aigc corpus --out DIR`: write the embedded commerce corpus as train/validation/test jsonl files."""

from __future__ import annotations

import argparse
import json

from aigc.corpus import write_corpus


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="aigc corpus", description=__doc__)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-validation", type=int, default=400)
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    paths = write_corpus(a.out, n_train=a.n_train, n_validation=a.n_validation, n_test=a.n_test, seed=a.seed)
    print(json.dumps(paths, indent=2))
    return 0
