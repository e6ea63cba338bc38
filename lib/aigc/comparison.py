"""The base-vs-fine-tuned table of an evaluation (`aigc.evaluate`), as rows of text: one definition for the
driver's printed table and the search report. Plain dicts in, strings out; imports nothing heavy, so the
report can use it without torch."""

from __future__ import annotations

from typing import Any

# (label, key, format); a row is shown only when both sides have its key.
ROWS = (
    ("test loss (nats/token)", "test_loss", "{:.4f}"),
    ("test perplexity", "test_ppl", "{:.2f}"),
    ("nats per document", "nats_per_doc", "{:.2f}"),
    ("x grammar entropy (1.0 = floor)", "entropy_ratio", "{:.3f}"),
    ("completion nats per example", "completion_nats_per_example", "{:.2f}"),
    ("completion nats / floor", "floor_ratio", "{:.3f}"),
    ("valid ads (greedy, n={n})", "greedy_valid_pct", "{:.1f}%"),
    ("faithful to brief (greedy)", "greedy_faithful_pct", "{:.1f}%"),
    ("faithful, right tone (greedy)", "greedy_tone_pct", "{:.1f}%"),
    ("valid ads (sampled)", "sampled_valid_pct", "{:.1f}%"),
    ("faithful to brief (sampled)", "sampled_faithful_pct", "{:.1f}%"),
    ("distinct-2 (sampled, n={n})", "sampled_distinct_2", "{:.3f}"),
    ("memorised (exact train copies)", "sampled_memorised_pct", "{:.1f}%"),
)

# Shown once the validity row has named n (the same prompts feed every generation row).
_N_SHOWN_BY = {"sampled_distinct_2": "greedy_valid_pct"}


def comparison_rows(base: dict[str, Any], tuned: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, base value, fine-tuned value) for every row both evaluations have, formatted."""
    out = []
    keys = {key for _, key, _ in ROWS if key in base and key in tuned}
    for label, key, fmt in ROWS:
        if key not in keys:
            continue
        n = tuned.get("task_examples")
        if "{n}" in label:
            label = label.format(n=n) if n is not None and _N_SHOWN_BY.get(key) not in keys else \
                label.replace(", n={n}", "")
        out.append((label, fmt.format(base[key]), fmt.format(tuned[key])))
    return out


def example_lines(evaluation: dict[str, Any]) -> list[str]:
    """The evaluation's example prompts and greedy completions, one per line (valid/faithful when known)."""
    lines = []
    for ex in evaluation.get("examples") or []:
        marks = [name for name in ("valid", "faithful") if ex.get(name)]
        unmet = [f"not {name}" for name in ("valid", "faithful") if name in ex and not ex[name]]
        tag = f" [{', '.join(marks + unmet)}]" if marks or unmet else ""
        lines.append(f"{ex['prompt']!r} -> {ex['completion']!r}{tag}")
    return lines
