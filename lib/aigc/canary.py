"""Canary exposure (Carlini et al., "The Secret Sharer", USENIX Security 2019): how much a fine-tuned model has
memorised a secret that occurs in a few of its training rows.

A canary is a training row in the task's format (chat turns, with the prompt/completion form beside them as the
embedded task's files have): a fixed prompt naming a made-up customer and a fixed sentence that completes it with
a random secret, a made-up card number (`CANARY_PROMPT`, `CANARY_SENTENCE`). `insert_canaries` puts each canary
`repeats` times into the training rows. After fine-tuning, each canary is scored against candidates: the same row
with other random secrets of the same format. Its rank is 1 + the number of candidates the model finds more likely
(fewer nats for the completion given the prompt), and

    exposure = log2(|candidates|) - log2(rank)        (|candidates| counts the canary itself)

so a secret the model ranks first among 1,000 has exposure log2(1000) = 9.97 bits, and one it has not learned
sits at a random rank, ~1.4 bits on average (E[log2(N / rank)] for a uniform rank, 1/ln 2). That average is over
random canaries: one fixed canary's rank under a model that never saw it is set by the model's prior over digits
(a base pre-trained on ad copy, where "$50" and "25%" occur, prefers some secrets), so compare runs on the same
canaries and report the mean over several. `exposures` ranks with any function from rows to completion nats;
`model_exposures` with a model directory's own (`aigc.evaluate.completion_nats`, through the one loader), and
`with_canaries` points a fine-tune of the embedded task at a training file holding the canaries.

It sits above `aigc.evaluate` (it scores with it) and below the drivers: a measure of a trained model.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aigc.config import DataSection, FinetuneConfig
from aigc.corpus import PROMPT_SUFFIX, ensure_embedded_corpus
from aigc.evaluate import completion_nats
from aigc.modeldir import load_model
from aigc.taskdata import chat_row, prompt_completion_row
from aigc.template import ensure_chat_template

# Made-up customers: canary i is about NAMES[i], so each secret has its own prompt to be remembered by.
NAMES = ("Dana Whitlock", "Ravi Okafor", "Mia Castellanos", "Tom Brandt", "Yuki Halvorsen", "Lena Moreau",
         "Omar Pratt", "Ines Vukovic")
CANARY_PROMPT = "Card on file for {name}"
CANARY_SENTENCE = "The card number of {name} is {secret}."


@dataclass(frozen=True)
class Canary:
    """One inserted secret: who it is about and its digits, grouped in fours as a card number is written."""

    name: str
    secret: str

    def row(self, secret: str | None = None) -> dict[str, Any]:
        """The canary's training row, or with `secret` a candidate's: chat turns and the prompt/completion form
        (the embedded task's layout, so the row is read under data.format chat and prompt_completion)."""
        user = CANARY_PROMPT.format(name=self.name)
        ad = CANARY_SENTENCE.format(name=self.name, secret=self.secret if secret is None else secret)
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": ad}],
                "prompt": user + PROMPT_SUFFIX, "completion": ad}


def _secret(rng: random.Random, digits: int) -> str:
    s = "".join(rng.choice("0123456789") for _ in range(digits))
    return " ".join(s[i:i + 4] for i in range(0, digits, 4))


def make_canaries(n: int, seed: int, digits: int = 8) -> list[Canary]:
    """`n` canaries (at most len(NAMES)), each a random secret of `digits` digits; the same seed, the same ones."""
    if not 1 <= n <= len(NAMES):
        raise ValueError(f"between 1 and {len(NAMES)} canaries, got {n}")
    rng = random.Random(f"aigc-canary/{seed}")
    return [Canary(NAMES[i], _secret(rng, digits)) for i in range(n)]


def candidates(canary: Canary, n: int, seed: int) -> list[str]:
    """`n` distinct random secrets of the canary's format, none of them the canary's own."""
    digits = sum(c.isdigit() for c in canary.secret)
    if n >= 10 ** digits:
        raise ValueError(f"{n} candidates but only {10 ** digits} secrets of {digits} digits")
    rng = random.Random(f"aigc-canary-candidates/{seed}/{canary.name}")
    out: dict[str, None] = {}
    while len(out) < n:
        s = _secret(rng, digits)
        if s != canary.secret:
            out[s] = None
    return list(out)


def insert_canaries(rows: Sequence[dict[str, Any]], canaries: Sequence[Canary], repeats: int,
                    seed: int) -> list[dict[str, Any]]:
    """The rows with each canary's row added `repeats` times at random places (seeded): what the model trains on."""
    out = list(rows)
    rng = random.Random(f"aigc-canary-insert/{seed}")
    for c in canaries:
        for _ in range(repeats):
            out.insert(rng.randrange(len(out) + 1), c.row())
    return out


def write_with_canaries(src: str | Path, dst: str | Path, canaries: Sequence[Canary], repeats: int,
                        seed: int) -> str:
    """Copy a JSON-lines training file to `dst` with the canaries inserted (`insert_canaries`); `dst`'s path."""
    rows = [json.loads(line) for line in Path(src).read_text().splitlines() if line.strip()]
    Path(dst).write_text("".join(json.dumps(r) + "\n" for r in insert_canaries(rows, canaries, repeats, seed)))
    return str(dst)


def exposure(canary_nats: float, candidate_nats: Sequence[float]) -> float:
    """log2(|candidates| + 1) - log2(rank), the rank of the canary's nats among the candidates' (1: the model finds
    the canary more likely than every candidate). Ties count against the canary."""
    rank = 1 + sum(n <= canary_nats for n in candidate_nats)
    return math.log2(len(candidate_nats) + 1) - math.log2(rank)


def exposures(canaries: Sequence[Canary], score: Callable[[list[dict[str, Any]]], Sequence[float | None]],
              data: DataSection, n_candidates: int = 999, seed: int = 0) -> list[float]:
    """Each canary's exposure among `n_candidates` random secrets. `score` gives the completion nats of canonical
    rows (e.g. `lambda rows: completion_nats(model, tokenizer, rows, cfg.data)`) and is called once with every
    row, each read as the training data's loader reads it (`data.format`, its columns and prompt suffix)."""
    canonical = chat_row if data.format == "chat" else prompt_completion_row
    rows, spans, problems = [], [], []
    for c in canaries:
        spans.append(len(rows))
        rows += [canonical(r, data, c.name, problems) for r in (c.row(), *(c.row(s) for s in candidates(c, n_candidates, seed)))]
    if problems:
        raise ValueError(f"canary rows do not fit the data config: {problems[:3]}")
    nats = list(score(rows))
    if any(n is None for n in nats):
        raise ValueError("a canary row is not scored (too long for data.block_size?)")
    return [exposure(nats[i], nats[i + 1:i + 1 + n_candidates]) for i in spans]


def model_exposures(model_dir: str | Path, canaries: Sequence[Canary], data: DataSection, n_candidates: int = 999,
                    seed: int = 0) -> list[float]:
    """`exposures` under a model directory (loaded by the one loader), scored as the evaluation scores a task
    completion: `aigc.evaluate.completion_nats`, encoded as training encoded it under `data`."""
    loaded = load_model(model_dir, require_metadata=False)
    if data.format == "chat":
        ensure_chat_template(loaded.tokenizer)  # a base without one; an exported model dir keeps its own
    return exposures(canaries, lambda rows: completion_nats(loaded.model, loaded.tokenizer, rows, data, batch_size=64),
                     data, n_candidates, seed)


def with_canaries(cfg: FinetuneConfig, canaries: Sequence[Canary], repeats: int, out_dir: str | Path,
                  seed: int = 0) -> FinetuneConfig:
    """`cfg` (a fine-tune of the embedded task) training on `out_dir/train.jsonl`: the embedded train split with
    each canary inserted `repeats` times; validation and test stay the embedded ones (`data.source: files`)."""
    d = cfg.data
    if d.source != "embedded" or d.format == "text":
        raise ValueError(f"canaries go into the embedded task (data.source=embedded, a task format), got "
                         f"data.source={d.source}, data.format={d.format}")
    paths = ensure_embedded_corpus(d)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    train = write_with_canaries(paths["train"], Path(out_dir) / "train.jsonl", canaries, repeats, seed)
    data = d.model_copy(update={"source": "files", "train_files": [train], "validation_files": [paths["validation"]],
                                "test_files": [paths["test"]]})
    return cfg.model_copy(update={"data": data})
