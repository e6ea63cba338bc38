"""Task quality on the embedded brief -> ad task: the fine-tuned model against its pre-trained base and against
the exact conditional floor, measured in one run, printed beside the issue's targets.

    .venv/bin/python bench/task_quality.py                                         # jobs/configs/tiny-cpu.yaml
    .venv/bin/python bench/task_quality.py --config jobs/configs/task-quality-cpu.yaml
    .venv/bin/python bench/task_quality.py --winner ~/aigc/searches/pipeline-tiny-cpu/winner   # a demo's winner

It fine-tunes with the config (the embedded base is built first if it is not cached) and evaluates base and
fine-tuned model on the same N test briefs (`--examples`, default 200, greedy and one temperature-1 sample
each). The baseline of the loss ratio is the grammar itself: the exact nats of each test ad given its brief,
computed in the same run, so 1.0 is the floor no model can beat. `--winner DIR` reads the evaluation a search
recorded in its winner's aigc.json instead of training.

Targets (issue 10): demo winner >= 95% valid, >= 95% faithful (greedy, 200 briefs), completion loss <= 1.5x the
floor; the quality config <= 1.1x the floor; the base near 0% faithful.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from aigc.config import FinetuneConfig, load_config
from aigc.finetune import print_comparison
from aigc.modeldir import read_metadata
from aigc.pretrain import finetune

ROOT = Path(__file__).resolve().parents[1]


def check(label: str, value: float, target: str, ok: bool) -> None:
    print(f"{label:44} {value:>9.3f}   target {target:10} {'ok' if ok else 'MISSED'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "jobs/configs/tiny-cpu.yaml"))
    p.add_argument("--examples", type=int, default=200, help="test briefs generated for validity/fidelity")
    p.add_argument("--winner", help="a search's winner/ directory: report its recorded evaluation, no training")
    p.add_argument("--floor-target", type=float, default=1.5, help="completion loss / floor target (quality: 1.1)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.max_steps=800")
    a = p.parse_args()

    t0 = time.time()
    if a.winner:
        ev = read_metadata(a.winner).get("evaluation")
        if not ev:
            raise SystemExit(f"{a.winner}: its aigc.json has no evaluation (the search ran with run.evaluate=false?)")
    else:
        cfg = load_config(FinetuneConfig, a.config, [f"eval.task_examples={a.examples}", "run.samples=0",
                                                     "run.name=bench-task-quality", *a.overrides])
        ev = finetune(cfg).evaluation
        print_comparison(ev)
    base, tuned = ev["base"], ev["finetuned"]
    if "greedy_faithful_pct" not in tuned:
        raise SystemExit("the evaluation has no task metrics: is the data the embedded brief -> ad task?")
    print(f"\n== task quality ({tuned.get('task_examples')} test briefs; {time.time() - t0:.0f} s) ==")
    check("RATIO completion nats / exact floor", tuned["floor_ratio"], f"<= {a.floor_target}",
          tuned["floor_ratio"] <= a.floor_target)
    check("valid ads, greedy (%)", tuned["greedy_valid_pct"], ">= 95", tuned["greedy_valid_pct"] >= 95)
    check("faithful to the brief, greedy (%)", tuned["greedy_faithful_pct"], ">= 95",
          tuned["greedy_faithful_pct"] >= 95)
    check("base faithful, greedy (%)", base["greedy_faithful_pct"], "~ 0", base["greedy_faithful_pct"] <= 5)
    check("fidelity gained (points)", tuned["greedy_faithful_pct"] - base["greedy_faithful_pct"], ">= 50",
          tuned["greedy_faithful_pct"] - base["greedy_faithful_pct"] >= 50)


if __name__ == "__main__":
    main()
