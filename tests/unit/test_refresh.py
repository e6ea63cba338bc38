"""The refresh without Ray: the embedded drift's exact nats, file settling, the promotion gate, the lock, and whole
cycles (promotion, rejection, a kill in each phase, rollback, MLflow aliases) with the heavy steps (training,
evaluation, the Serve update) replaced by fakes that make real model directories."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

import pytest

from aigc.config import ConfigError, load_config
from aigc.corpus import (
    DEFAULT_GRAMMAR,
    DRIFT_WEEKS,
    brief_logprob,
    conditional_grammar,
    sample_task_rows,
    to_prompt_completion,
    week_grammar,
    write_drift_batch,
)
from aigc.grammar import Grammar
from aigc.modeldir import files_fingerprint, load_model, read_metadata, save_model_dir
from aigc.modeling import build_tiny_gpt2
from aigc.refresh import (
    INITIAL,
    PROMOTING,
    WINDOW,
    RefreshBusy,
    RefreshError,
    Steps,
    decide,
    read_lineage,
    refresh_lock,
    replay_count,
    run_cycle,
    run_refresh,
    run_rollback,
    settled_files,
    split_of,
)
from aigc.refresh_config import LINEAGE_DIR, MARKER, SERVED, STATE, RefreshConfig
from aigc.taskmetrics import parse_ad

ROOT = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------------- drift


def test_reweight_changes_weights_drops_zero_alternatives_and_prunes_rules():
    g = Grammar({"S": [(1, "{A}"), (1, "{B}")], "A": [(1, "a"), (3, "aa")], "B": [(1, "b")]}, start="S")
    w = g.reweight({"S": {"{B}": 0.0}, "A": {"a": 3.0}})
    assert w.alternatives("S") == ["{A}"] and "B" not in w._rules  # B is unreachable: dropped
    assert w.logprob("a") == pytest.approx(math.log(0.5)) and w.logprob("b") == -math.inf
    with pytest.raises(ValueError, match="every alternative has weight 0"):
        g.reweight({"B": {"b": 0.0}})
    with pytest.raises(ValueError, match="no alternative"):
        g.reweight({"A": {"zzz": 1.0}})


def test_default_corpus_is_unchanged_by_drift():
    assert DEFAULT_GRAMMAR.fingerprint() == "588622a4074364c3"  # keys the corpus and base caches
    rows = sample_task_rows(20, seed=7)
    assert all("week" not in r for r in rows) and rows == sample_task_rows(20, seed=7, week=None)


def test_each_week_shifts_the_distribution_and_keeps_exact_nats():
    cats = {w: {r["brief"]["category"] for r in sample_task_rows(300, seed=w, week=w)} for w in range(4)}
    assert "travel" not in cats[0] | cats[1] and "travel" in cats[2] and "footwear" not in cats[3]
    assert len({week_grammar(w).fingerprint() for w in range(len(DRIFT_WEEKS))}) == len(DRIFT_WEEKS)
    bogo = sum(r["brief"]["offer"].startswith("buy one") for r in sample_task_rows(400, seed=3, week=1)) / 400
    assert bogo > 0.4  # 6 / 11 of the holiday week's offers, against 1 / 6 otherwise
    for w in range(len(DRIFT_WEEKS)):
        for r in sample_task_rows(40, seed=11, week=w):
            ad = r["messages"][1]["content"]
            assert r["week"] == w and parse_ad(ad) == r["brief"]  # valid and faithful under DEFAULT_GRAMMAR too
            assert -conditional_grammar(r["brief"], w).logprob(ad) == pytest.approx(r["nats"], rel=1e-9)
            assert week_grammar(w).logprob(ad) == pytest.approx(brief_logprob(r["brief"], w) - r["nats"], rel=1e-9)


def test_drift_batch_file_is_the_weeks_rows(tmp_path):
    path = write_drift_batch(tmp_path / "week-02" / "part-0.jsonl", 2, 30, seed=5)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert len(rows) == 30 and {r["week"] for r in rows} == {2}
    assert rows[0]["completion"] == rows[0]["messages"][1]["content"] and rows[0]["prompt"].endswith("\n")


# ------------------------------------------------------------------------------------------ small pieces


def test_a_growing_file_is_not_taken_until_it_settles(tmp_path):
    now = time.time()
    (tmp_path / "old.jsonl").write_text("{}\n")
    os.utime(tmp_path / "old.jsonl", (now - 120, now - 120))
    (tmp_path / "growing.jsonl").write_text("{}\n")  # modified just now: still being written
    (tmp_path / ".tmp.jsonl").write_text("{}\n")
    (tmp_path / "_part.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("x")
    os.utime(tmp_path / "notes.txt", (now - 120, now - 120))
    (tmp_path / "batch").mkdir()
    (tmp_path / "batch" / "part-0.jsonl").write_text("{}\n")
    assert settled_files(tmp_path, "*.jsonl", 60, now) == [tmp_path / "old.jsonl"]
    (tmp_path / "batch" / MARKER).touch()  # the writer says the folder is complete: no need to wait
    assert settled_files(tmp_path, "*.jsonl", 60, now) == [tmp_path / "batch" / "part-0.jsonl", tmp_path / "old.jsonl"]
    assert len(settled_files(tmp_path, "*.jsonl", 60, now + 61)) == 3  # growing.jsonl, once unchanged for 60 s


def test_gate_promotes_only_better_on_new_and_within_bound_on_old():
    inc = {"new": {"test_loss": 2.0}, "old": {"test_loss": 1.0}}

    def cand(new, old):
        return {"new": {"test_loss": new}, "old": {"test_loss": old}}

    ok = decide(inc, cand(1.9, 1.01), 0.01, 0.02)
    assert ok.promote and ok.gain == pytest.approx(0.05) and ok.regression == pytest.approx(0.01)
    assert ok.reason.startswith("promoted")
    small = decide(inc, cand(1.99, 1.0), 0.01, 0.02)
    assert not small.promote and "not better enough on the new data" in small.reason
    forgets = decide(inc, cand(1.5, 1.03), 0.01, 0.02)
    assert not forgets.promote and "forgets too much" in forgets.reason and "not better" not in forgets.reason
    diverged = decide(inc, cand(float("nan"), 1.0), 0.01, 0.02)
    assert not diverged.promote and "diverged" in diverged.reason


def test_split_by_row_hash_and_replay_arithmetic():
    rows = [{"i": i} for i in range(2000)]
    splits = [split_of(r, 0.1, 0.2) for r in rows]
    assert splits == [split_of(r, 0.1, 0.2) for r in rows]  # the same row, the same split, every time
    assert abs(splits.count("test") / 2000 - 0.2) < 0.04 and abs(splits.count("validation") / 2000 - 0.1) < 0.03
    assert replay_count(700, 0.3) == 300 and replay_count(10, 0.0) == 0  # 300 / (300 + 700) = 0.3


def test_second_holder_of_the_lock_exits_naming_the_first(tmp_path):
    with refresh_lock(tmp_path):
        with pytest.raises(RefreshBusy, match=f"pid {os.getpid()}"):
            with refresh_lock(tmp_path, timeout_s=0.2):
                pass
    released = threading.Event()

    def hold():
        with refresh_lock(tmp_path):
            released.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    time.sleep(0.2)
    threading.Timer(0.3, released.set).start()
    with refresh_lock(tmp_path, timeout_s=5):  # waits for the first holder, then runs
        pass
    t.join()


def test_shipped_refresh_configs_are_valid_and_bad_keys_are_named():
    shipped = sorted((ROOT / "jobs" / "configs").glob("refresh-*.yaml"))
    assert [p.name for p in shipped] == ["refresh-tiny-cpu.yaml"]
    for path in shipped:
        load_config(RefreshConfig, path)
    cfg = load_config(RefreshConfig, shipped[0])
    assert cfg.drift.weeks == 3 and cfg.refresh.max_cycles == 3 and cfg.refresh.every == 0  # three weeks, 3 cycles
    with pytest.raises(ConfigError) as e:
        load_config(RefreshConfig, None, ["finetune.run.name=x", "finetune.model.name_or_path=null",
                                          "refresh.max_cycles=2", "finetune.tracking.enabled=false"])
    for key in ("finetune.run.name", "refresh.initial_model", "refresh.max_cycles", "finetune.tracking"):
        assert key in str(e.value)
    with pytest.raises(ConfigError, match="refresh.nope: unknown key"):
        load_config(RefreshConfig, None, ["refresh.nope=1"])


# ------------------------------------------------------------------------------------- cycles with fakes


class Fakes:
    """Steps that make real (tiny, random) model directories and a Serve that is a variable. `loss` maps a model
    directory to its loss on the new and the old data; `fail` names a step that raises once (a kill)."""

    def __init__(self, tokenizer_dir: str, out: Path):
        self.tok = load_model(tokenizer_dir).tokenizer
        self.out, self.trained, self.deployed = out, [], []
        self.serving: str | None = None
        self.loss: dict[str, tuple[float, float]] = {}
        self.next_loss = (1.0, 1.0)
        self.losses: list[tuple[float, float]] = []  # taken first, one per training
        self.fail: str | None = None

    def _maybe_fail(self, step: str) -> None:
        if self.fail == step:
            self.fail = None
            raise KeyboardInterrupt(f"killed during {step}")

    def train(self, ft) -> str:
        self._maybe_fail("train")
        self.trained.append(ft.run.name)
        model = build_tiny_gpt2(type("A", (), {"n_layer": 1, "n_embd": 16, "n_head": 2})(), len(self.tok), 128,
                                self.tok.eos_token_id, seed=len(self.trained))
        out = save_model_dir(model, self.tok, self.out / ft.run.name / "best", config={}, metrics={}, step=1)
        self.loss[str(out)] = self.losses.pop(0) if self.losses else self.next_loss
        return str(out)

    def evaluate(self, ft, incumbent: str, candidate: str) -> dict:
        old = "windows" not in ft.data.test_files[0]
        pick = 1 if old else 0
        return {"base": {"test_loss": self.loss.get(incumbent, (2.0, 1.0))[pick]},
                "finetuned": {"test_loss": self.loss[candidate][pick]}}

    def deploy(self, model_dir: str) -> None:
        self._maybe_fail("deploy")
        self.deployed.append(model_dir)
        self.serving = files_fingerprint(read_metadata(model_dir))

    def steps(self) -> Steps:
        return Steps(self.train, self.evaluate, self.deploy, lambda: self.serving)


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    """A refresh over prompt/completion files: the original data, an incoming folder, the tiny model served first."""
    data = tmp_path / "data"
    data.mkdir()
    files = {}
    for i, split in enumerate(("train", "validation", "test")):
        rows = [to_prompt_completion(r) for r in sample_task_rows(30, seed=100 + i)]
        files[split] = data / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    overrides = [f"refresh.storage_path={tmp_path / 'root'}", f"refresh.incoming={incoming}",
                 f"refresh.initial_model={tiny_model_dir}", "refresh.settle_s=30", "refresh.eval_rows=10",
                 "finetune.data.source=files", "finetune.data.format=prompt_completion",
                 f"finetune.data.train_files=[{files['train']}]", f"finetune.data.validation_files=[{files['validation']}]",
                 f"finetune.data.test_files=[{files['test']}]", "tracking.enabled=false"]
    return tmp_path, incoming, overrides, Fakes(str(tiny_model_dir), tmp_path / "fake-runs")


def arrive(incoming: Path, name: str, n: int, seed: int, age_s: float = 120) -> Path:
    path = incoming / name
    path.write_text("".join(json.dumps(to_prompt_completion(r)) + "\n" for r in sample_task_rows(n, seed=seed)))
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_cycles_promote_reject_survive_kills_and_roll_back(setup, tiny_model_dir):
    tmp, incoming, overrides, fake = setup
    cfg = load_config(RefreshConfig, None, overrides)
    root = tmp / "root"
    steps = fake.steps()

    # nothing new: the initial model is deployed, recorded and kept
    assert run_cycle(cfg, steps).outcome == "no-data"
    assert json.loads((root / SERVED).read_text())["model"] == INITIAL and fake.deployed == [str(tiny_model_dir)]

    # a new file arrives, and one still being written: a kill during training, then one during the Serve update
    arrive(incoming, "week-1.jsonl", 60, seed=1)
    arrive(incoming, "growing.jsonl", 20, seed=9, age_s=0)
    fake.next_loss, fake.fail = (1.5, 1.005), "train"
    with pytest.raises(KeyboardInterrupt):
        run_cycle(cfg, steps)
    assert json.loads((root / STATE).read_text())["phase"] == WINDOW
    arrive(incoming, "late.jsonl", 60, seed=2)  # arrives after the window was taken: not part of this cycle
    fake.fail = "deploy"
    with pytest.raises(KeyboardInterrupt):
        run_cycle(cfg, steps)
    state = json.loads((root / STATE).read_text())
    assert state["phase"] == PROMOTING and json.loads((root / SERVED).read_text())["model"] == INITIAL
    result = run_cycle(cfg, steps)
    assert result.outcome == "promoted" and not (root / STATE).exists()
    assert fake.trained == [result.model]  # the window was trained once, in a run named after it
    assert [f["path"] for f in result.window["files"]] == ["week-1.jsonl"]  # not growing.jsonl, not late.jsonl
    served = json.loads((root / SERVED).read_text())
    assert served["model"] == result.model and fake.serving == served["fingerprint"]
    rec = read_lineage(root)[result.model]
    assert rec["parent"] == INITIAL and rec["generation"] == 1 and rec["decision"]["promote"]
    assert rec["window"]["files"][0]["sha256"] and rec["window"]["rows"]["replay"] == replay_count(
        rec["window"]["rows"]["train"], cfg.refresh.replay_fraction)
    assert rec["metrics"]["candidate"]["new"]["test_loss"] == 1.5 and "promoted" in rec["decision"]["reason"]

    # the next window is worse: rejected, the incumbent keeps serving, the lineage says why
    fake.next_loss = (2.5, 1.5)
    rejected = run_cycle(cfg, steps)
    assert rejected.outcome == "rejected" and rejected.served == result.model
    why = read_lineage(root)[rejected.model]["decision"]["reason"]
    assert "not better enough on the new data" in why and "forgets too much" in why
    assert run_cycle(cfg, steps).outcome == "already-decided"  # the same window is not trained again
    assert len(fake.trained) == 2

    # rollback: to the one served before, then forward again by name; an unknown name is refused
    assert run_rollback(cfg, None, steps)["model"] == INITIAL
    assert fake.deployed[-1] == str(tiny_model_dir) and json.loads((root / SERVED).read_text())["model"] == INITIAL
    assert run_rollback(cfg, result.model, steps)["model"] == result.model
    with pytest.raises(RefreshError, match="no such model"):
        run_rollback(cfg, "cand-nope", steps)
    history = [h["model"] for h in json.loads((root / SERVED).read_text())["history"]]
    assert history == [INITIAL, result.model, INITIAL, result.model]
    assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()  # tracking.enabled=false
    assert sorted(p.stem for p in (root / LINEAGE_DIR).glob("*.json")) == sorted([INITIAL, result.model, rejected.model])
    report = (root / "report" / "report.html").read_text()
    assert result.model in report and "original test" in report and "week-1.jsonl" in report
    assert f"rollback from {INITIAL} to {result.model}" in report  # redrawn after a rollback too


def test_champion_follows_serve_and_challenger_the_candidate(setup, monkeypatch):
    from aigc.tracking import CHALLENGER, CHAMPION, open_tracker

    tmp, incoming, overrides, fake = setup
    monkeypatch.chdir(tmp)
    cfg = load_config(RefreshConfig, None, [*overrides, "tracking.enabled=true", "refresh.every=0",
                                            "refresh.max_cycles=2"])
    arrive(incoming, "week-1.jsonl", 60, seed=1)
    fake.next_loss = (1.5, 1.0)
    results = run_refresh(cfg, fake.steps())
    assert [r.outcome for r in results] == ["promoted", "no-data"]
    tracker = open_tracker(cfg.tracking, tmp / "root")
    assert tracker.version_by_alias(CHAMPION).fingerprint == fake.serving
    assert tracker.version_by_alias(CHALLENGER).fingerprint == fake.serving
    run = tracker.client.search_runs([tracker.experiment_id], "tags.`aigc.kind` = 'refresh'")[0]
    assert run.data.metrics["gain"] == pytest.approx(0.25) and run.data.tags["aigc.decision"] == "promoted"
    run_rollback(cfg, None, fake.steps())
    assert tracker.version_by_alias(CHAMPION).fingerprint == fake.serving != tracker.version_by_alias(CHALLENGER).fingerprint


def test_readme_cronjob_submits_the_refresh_job_with_the_k8s_image_and_token():
    import re
    import shlex

    import yaml

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Keeping a model current"):readme.index("## From laptop to GPU cluster")]
    cron = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    rayjob = yaml.safe_load((ROOT / "k8s" / "rayjob-finetune.yaml").read_text())
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    job = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert cron["kind"] == "CronJob" and job["image"] == head["image"]
    token = next(e for e in job["env"] if e["name"] == "RAY_AUTH_TOKEN")["valueFrom"]["secretKeyRef"]
    assert token["name"] == rayjob["spec"]["rayClusterSpec"]["authOptions"]["secretName"]
    cmd = job["command"]
    script, config, overrides = cmd[cmd.index("--") + 2], cmd[cmd.index("--config") + 1], cmd[cmd.index("--config") + 2:]
    app = "/home/ray/aigc/"
    assert script == app + "jobs/refresh.py" and config.startswith(app)
    load_config(RefreshConfig, ROOT / config.removeprefix(app), overrides)
    line = next(x for x in section.splitlines() if "jobs/refresh.py" in x and x.startswith("0 3"))
    words = shlex.split(line)
    load_config(RefreshConfig, ROOT / words[words.index("--config") + 1], [w for w in words if w.startswith("refresh.")])


def test_without_an_initial_model_the_original_data_is_fine_tuned_first_and_drift_weeks_arrive(setup, tiny_model_dir):
    tmp, incoming, _, fake = setup
    cfg = load_config(RefreshConfig, None, [
        f"refresh.storage_path={tmp / 'root'}", f"refresh.incoming={incoming}", f"finetune.model.name_or_path={tiny_model_dir}",
        "finetune.data.format=chat", "finetune.data.embedded={n_train: 40, n_validation: 10, n_test: 10, seed: 0}",
        "drift.weeks=1", "drift.rows_per_week=60", "tracking.enabled=false", "refresh.every=0", "refresh.max_cycles=2"])
    fake.losses = [(2.0, 1.0), (1.5, 1.0)]  # the initial model, then week 1's candidate
    results = run_refresh(cfg, fake.steps())
    assert [r.outcome for r in results] == ["promoted", "no-data"]  # one week of drift: one window
    assert fake.trained[0] == INITIAL and len(fake.trained) == 2  # the original data first, then week 1
    initial = read_lineage(tmp / "root")[INITIAL]
    assert initial["window"]["id"] == "original" and "week-00" in initial["window"]["files"][0]["path"]
    assert [f["path"] for f in results[0].window["files"]] == ["week-01/part-0.jsonl"]
    assert (incoming / "week-01" / MARKER).is_file()
    report = (tmp / "root" / "report" / "report.html").read_text()
    assert "week-01/part-0.jsonl" in report and "exact floor" in report  # chat rows scored, with their nats
