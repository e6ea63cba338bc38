"""Keep the served model current: one refresh cycle re-fine-tunes on new data and promotes only what is better.

A cycle (`run_cycle`, what `aigc refresh` and `jobs/refresh.py` run once, or every `refresh.every` seconds):

1. **window**: the settled data files in `refresh.incoming` that the served model's lineage has not trained on
   (a file is taken once unchanged for `refresh.settle_s`, or at once in a folder holding `_SUCCESS`; never a
   file still being written). Its rows are split by row hash into train / validation / test; the train part
   gets a replay share (`refresh.replay_fraction`) of earlier rows, and everything is copied into the window's
   folder with each file's sha256, so the training never reads `incoming` itself.
2. **train**: a candidate fine-tuned from the served model (`aigc.finetune.run_finetune`, full or LoRA per
   `finetune.model.peft`) in a run named after the window, so a killed cycle's training resumes, never restarts.
3. **evaluate**: candidate and incumbent on the same held-out sets: the window's test rows ("new") and the
   original test set ("old"), with the task metrics (validity, fidelity on the embedded task).
4. **decide**: promote only if the candidate's loss on "new" is at least `refresh.min_gain` (relative) below the
   incumbent's and its loss on "old" at most `refresh.max_regression` above it (`decide`).
5. **promote**: the pipeline's zero-downtime Serve update (`aigc.pipeline.deploy`), done once Serve answers with
   the candidate's fingerprint; then the lineage record, `served.json`, the registry's `champion` alias.

Every cycle writes a lineage record per model (parent, data window with files and sha256, config, metrics,
decision and why), logs an MLflow run (the candidate registered as `challenger`), and redraws the refresh
report. `run_rollback` redeploys the previous (or a named) model the same way and moves `champion` back.

Crash safety: `state.json` (written atomically) says which phase the cycle in flight has finished; the next
invocation continues from there (a Serve update in flight is redone: deploying the same model again is a
no-op), so a window is trained once and the served model, `served.json` and the lineage agree once it ends.
A cycle holds `refresh.lock` (flock) in the storage root: a second one waits `refresh.lock_timeout_s`, then
exits naming the holder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import requests
from ray import serve

from aigc import tracking
from aigc.config import EMBEDDED_BASE, EmbeddedCorpus, FinetuneConfig, build, expand, run_dir_of
from aigc.corpus import DRIFT_WEEKS, ensure_embedded_corpus, write_drift_batch, write_task_corpus
from aigc.evaluate import task_eval_inputs
from aigc.finetune import evaluate_before_after, init_ray, prepare, run_finetune
from aigc.layout import BEST_DIR, SUMMARY, TRACKING_RECORD
from aigc.modeldir import files_fingerprint, read_metadata, verify_model_dir
from aigc.pipeline import deploy
from aigc.pipeline_config import DeploySection
from aigc.pretrain import resolve_base
from aigc.refresh_config import (
    DRIFT_DIR,
    INITIAL,
    LINEAGE_DIR,
    LOCK,
    MARKER,
    SERVED,
    STATE,
    WINDOWS_DIR,
    RefreshBusy,
    RefreshConfig,
    RefreshError,
)
from aigc.refresh_report import report_dir, write_report
from aigc.serving.args import parse_args
from aigc.taskdata import read_rows

METRIC = "test_loss"  # what the gate compares: token-weighted loss on the held-out rows (completions, for task data)
SPLIT_NAMES = ("train", "validation", "test")
# the phases of a cycle in flight, in order; state.json holds the last one finished
WINDOW, TRAINED, EVALUATED, PROMOTING = "window", "trained", "evaluated", "promoting"
ROLLBACK = "rollback"


# ------------------------------------------------------------------------------------------ small pieces


def root_of(cfg: RefreshConfig) -> Path:
    return Path(expand(cfg.refresh.storage_path))


def write_json(path: Path, obj: Any) -> None:
    """Write JSON via a temporary file and a rename: a reader (or the next invocation) sees the old or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def refresh_lock(root: Path, timeout_s: float = 0.0) -> Iterator[None]:
    """Hold `<root>/refresh.lock` (flock, as `aigc.pretrain` guards its cache) for the block. Held elsewhere: poll
    for `timeout_s`, then raise RefreshBusy naming the holder. The kernel drops the lock when its holder dies, so
    a killed cycle never leaves the root locked."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    f = open(path, "a+")
    deadline = time.time() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() >= deadline:
                    holder = path.read_text().strip() or "unknown holder"
                    raise RefreshBusy(f"{path}: another refresh cycle or rollback is running ({holder}); this one "
                                      f"exits (waited {timeout_s:g} s; refresh.lock_timeout_s sets how long to "
                                      "wait)") from None
                time.sleep(min(1.0, max(0.05, deadline - time.time())))
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        f.close()


# ------------------------------------------------------------------------------------------- new files


def settled_files(incoming: Path, pattern: str, settle_s: float, now: float | None = None) -> list[Path]:
    """The data files of `incoming` (recursively) that are safe to read, sorted: names matching `pattern`, not
    starting with '.' or '_' (writers' temp files), and either unchanged (modification time) for `settle_s`
    seconds or in a folder that holds a `_SUCCESS` marker (written after the folder's last file)."""
    if not incoming.is_dir():
        return []
    now = time.time() if now is None else now
    out = []
    for p in sorted(incoming.rglob("*")):
        rel = p.relative_to(incoming)
        if not p.is_file() or not fnmatch(p.name, pattern) or any(part[0] in "._" for part in rel.parts):
            continue
        if (p.parent / MARKER).is_file() or now - p.stat().st_mtime >= settle_s:
            out.append(p)
    return out


def file_entry(path: Path, incoming: Path) -> dict[str, Any]:
    """A data file as the lineage names it: path relative to `incoming`, size, modification time, sha256."""
    st = path.stat()
    return {"path": str(path.relative_to(incoming)), "size": st.st_size, "mtime": st.st_mtime,
            "sha256": sha256_of(path)}


def window_id(entries: list[dict[str, Any]]) -> str:
    """The identity of a set of files: sha256 over their sorted (path, sha256) pairs. Names the candidate's run."""
    key = sorted((e["path"], e["sha256"]) for e in entries)
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def model_id_of(wid: str) -> str:
    """The candidate trained on window `wid`: its model id, lineage file and fine-tune run name."""
    return f"cand-{wid[:12]}"


def split_of(row: Any, validation_fraction: float, test_fraction: float) -> str:
    """Which held-out split a row falls in, by a hash of its content: the same row always lands in the same split,
    whichever file or window carries it."""
    h = int.from_bytes(hashlib.sha256(json.dumps(row, sort_keys=True).encode()).digest()[:8], "big") / 2.0 ** 64
    return "test" if h < test_fraction else "validation" if h < test_fraction + validation_fraction else "train"


def replay_count(n_new: int, fraction: float) -> int:
    """Old rows to add to `n_new` new training rows so that they are `fraction` of the total: n / (n + new) = f."""
    return round(n_new * fraction / (1.0 - fraction))


def _row_key(row: Any) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()


def _rows(path: str | Path) -> list[Any]:
    return [row for _, row in read_rows(str(path))]


def _write_rows(path: Path, rows: list[Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return str(path)


# --------------------------------------------------------------------------------------------- the gate


@dataclass
class Decision:
    """What the gate decided and why, with the numbers it compared (relative changes of `metric`)."""

    promote: bool
    reason: str
    gain: float | None = None  # (incumbent - candidate) / incumbent on the new data
    regression: float | None = None  # (candidate - incumbent) / incumbent on the original test set
    metric: str = METRIC


def decide(incumbent: dict[str, dict[str, Any]], candidate: dict[str, dict[str, Any]], min_gain: float,
           max_regression: float, metric: str = METRIC) -> Decision:
    """The promotion gate. `incumbent` and `candidate` are {"new": metrics, "old": metrics} on the same held-out
    sets; promote when the candidate is better on new by >= `min_gain` and worse on old by <= `max_regression`."""
    inc_new, cand_new = float(incumbent["new"][metric]), float(candidate["new"][metric])
    inc_old, cand_old = float(incumbent["old"][metric]), float(candidate["old"][metric])
    if not all(math.isfinite(v) for v in (cand_new, cand_old)):
        return Decision(False, f"rejected: the candidate's {metric} is not finite (new {cand_new}, old {cand_old}): "
                               "its training diverged")
    gain, regression = (inc_new - cand_new) / inc_new, (cand_old - inc_old) / inc_old
    new = f"{metric} on the new data {inc_new:.4f} -> {cand_new:.4f} ({gain:+.2%}, needs >= {min_gain:+.2%})"
    old = (f"on the original test set {inc_old:.4f} -> {cand_old:.4f} ({-regression:+.2%}, allowed down to "
           f"{-max_regression:+.2%})")
    failed = [why for ok, why in ((gain >= min_gain, "not better enough on the new data"),
                                  (regression <= max_regression, "forgets too much of the original test set"))
              if not ok]
    if failed:
        return Decision(False, f"rejected ({'; '.join(failed)}): {new}; {old}", gain, regression)
    return Decision(True, f"promoted: {new}; {old}", gain, regression)


# ---------------------------------------------------------------------------------------------- lineage


def lineage_path(root: Path, model: str) -> Path:
    return root / LINEAGE_DIR / f"{model}.json"


def read_lineage(root: Path) -> dict[str, dict[str, Any]]:
    """Every model's lineage record by model id."""
    d = root / LINEAGE_DIR
    return {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))} if d.is_dir() else {}


def ancestry(lineage: dict[str, dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """`model`'s record and its ancestors', newest first (parent by parent)."""
    out = []
    while model and model in lineage:
        out.append(lineage[model])
        model = lineage[model].get("parent")
    return out


def trained_files(lineage: dict[str, dict[str, Any]], model: str) -> set[tuple[str, str]]:
    """(path, sha256) of every incoming file that `model` or an ancestor was trained on."""
    return {(f["path"], f["sha256"]) for rec in ancestry(lineage, model) for f in (rec.get("window") or {}).get("files", [])}


def decided_window(lineage: dict[str, dict[str, Any]], wid: str) -> dict[str, Any] | None:
    """The record of the candidate already decided on window `wid`, if any (a window is trained once)."""
    return next((r for r in lineage.values() if (r.get("window") or {}).get("id") == wid and r.get("decision")), None)


def served_record(root: Path) -> dict[str, Any] | None:
    return read_json(root / SERVED)


def set_served(root: Path, rec: dict[str, Any], why: str) -> dict[str, Any]:
    """`served.json` now names `rec`'s model; the history keeps what ran before and why it changed."""
    old = served_record(root) or {"history": []}
    entry = {"model": rec["model"], "dir": rec["dir"], "fingerprint": rec["fingerprint"], "since": time.time(),
             "why": why}
    history = old["history"]
    if not history or history[-1]["model"] != rec["model"]:
        history = [*history, entry]
    out = {**entry, "history": history}
    write_json(root / SERVED, out)
    return out


# --------------------------------------------------------------------------------------------- the data


def original_data(cfg: RefreshConfig) -> dict[str, list[str]]:
    """The original data's files by split: finetune.data's files, the embedded task corpus, or with the embedded
    drift its week 0 (written once under the root)."""
    d = cfg.finetune.data
    if cfg.drift.weeks:
        e = d.embedded
        out = root_of(cfg) / DRIFT_DIR / f"week-00-seed{e.seed}-{e.n_train}-{e.n_validation}-{e.n_test}"
        paths = {s: str(out / f"{s}.jsonl") for s in SPLIT_NAMES}
        if not all(os.path.isfile(p) for p in paths.values()):
            paths = write_task_corpus(out, n_train=e.n_train, n_validation=e.n_validation, n_test=e.n_test,
                                      seed=e.seed, week=0)
        return {s: [p] for s, p in paths.items()}
    if d.source == "embedded":
        return {s: [p] for s, p in ensure_embedded_corpus(d).items()}
    return {"train": list(d.train_files), "validation": list(d.validation_files), "test": list(d.test_files)}


def files_config(cfg: RefreshConfig, files: dict[str, list[str]], run_name: str, model: dict[str, Any]) -> FinetuneConfig:
    """finetune.* with the data read from `files`, the run named `run_name` under the root, the model section
    updated by `model`, tracked as the refresh is; validated as any job config is."""
    f = cfg.finetune.model_dump(mode="json")
    f["data"].update(source="files", train_files=files["train"], validation_files=files["validation"],
                     test_files=files["test"], hub_name=None, hub_config=None, embedded=EmbeddedCorpus().model_dump())
    f["run"].update(name=run_name, storage_path=str(root_of(cfg)))
    f["model"].update(model)
    f["tracking"] = cfg.tracking.model_dump(mode="json")
    return build(FinetuneConfig, f, f"the fine-tune of {run_name}")


def start_from(incumbent_dir: str, cfg: RefreshConfig) -> dict[str, Any]:
    """The model section's changes that fine-tune a candidate from the incumbent: its directory as the model; or,
    for LoRA on an incumbent that holds an adapter, that adapter trained further on its own base."""
    meta = read_metadata(incumbent_dir)
    if cfg.finetune.model.peft.method != "none" and meta.get("adapter"):
        peft = {**cfg.finetune.model.peft.model_dump(mode="json"), "resume_adapter": incumbent_dir}
        return {"name_or_path": meta["adapter"]["base"]["name_or_path"], "peft": peft}
    return {"name_or_path": incumbent_dir}


def make_window(cfg: RefreshConfig, files: list[Path], incoming: Path, parent: str,
                lineage: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Copy the new files' rows into the window's folder: train (plus the replay share), validation, test. A file
    that changes while it is read stops the cycle (it was not finished after all)."""
    r = cfg.refresh
    entries = [file_entry(p, incoming) for p in files]
    wid = window_id(entries)
    new: dict[str, list[Any]] = {s: [] for s in SPLIT_NAMES}
    for p, e in zip(files, entries, strict=True):
        rows = _rows(p)
        if sha256_of(p) != e["sha256"]:
            raise RefreshError(f"{p}: changed while it was read; it is taken once it has settled")
        e["rows"] = len(rows)
        for row in rows:
            new[split_of(row, r.validation_fraction, r.test_fraction)].append(row)
    short = [s for s in SPLIT_NAMES if not new[s]]
    if short:
        raise RefreshError(f"{sum(e['rows'] for e in entries)} new rows in {len(files)} file(s) leave no "
                           f"{', '.join(short)} rows (refresh.validation_fraction={r.validation_fraction}, "
                           f"refresh.test_fraction={r.test_fraction}); wait for more data")
    # replay: earlier rows the served model's line was trained on, drawn the same way on every attempt
    pool_files = original_data(cfg)["train"] + [str(Path(rec["window"]["dir"]) / "train.jsonl")
                                                for rec in ancestry(lineage, parent) if rec["model"] != INITIAL]
    fresh = {_row_key(row) for row in new["train"]}
    pool = {}
    for path in pool_files:
        for row in _rows(path):
            pool.setdefault(_row_key(row), row)
    candidates = [pool[k] for k in sorted(pool) if k not in fresh]
    rng = random.Random(int(wid[:16], 16))
    replay = rng.sample(candidates, min(len(candidates), replay_count(len(new["train"]), r.replay_fraction)))
    train = new["train"] + replay
    rng.shuffle(train)
    wdir = root_of(cfg) / WINDOWS_DIR / wid
    paths = {"train": [_write_rows(wdir / "train.jsonl", train)],
             "validation": [_write_rows(wdir / "validation.jsonl", new["validation"])],
             "test": [_write_rows(wdir / "test.jsonl", new["test"])]}
    window = {"id": wid, "dir": str(wdir), "files": entries, "paths": paths,
              "rows": {"train": len(new["train"]), "replay": len(replay), "validation": len(new["validation"]),
                       "test": len(new["test"])}}
    write_json(wdir / "window.json", window)
    return window


# ------------------------------------------------------------------------------------------ the steps


@dataclass
class Steps:
    """The heavy steps of a cycle, replaceable in tests (the phases, state and lineage logic is what they test):
    `train(ft_cfg) -> best model dir`, `evaluate(ft_cfg, incumbent_dir, candidate_dir) -> {"base", "finetuned"}`
    on ft_cfg's test split, `deploy(model_dir)` returning once Serve answers with that model, `served()` the
    fingerprint Serve answers with now (None when the app does not answer)."""

    train: Callable[[FinetuneConfig], str]
    evaluate: Callable[[FinetuneConfig, str, str], dict[str, Any]]
    deploy: Callable[[str], None]
    served: Callable[[], str | None]


def train_once(ft: FinetuneConfig) -> str:
    """The best model of the fine-tune `ft`: read back when the run already finished (its summary written),
    else `run_finetune` (which continues the run's latest checkpoint when a killed attempt left one)."""
    run_dir = run_dir_of(ft)
    done = read_json(run_dir / SUMMARY)
    if done and done.get("best_dir"):
        try:
            verify_model_dir(done["best_dir"])
            print(f"[aigc] refresh: {ft.run.name} already trained: {done['best_dir']}", flush=True)
            return done["best_dir"]
        except Exception:  # a summary whose model is gone or broken: train (resume) again
            pass
    result = run_finetune(ft)
    return result.best_dir or str(run_dir / BEST_DIR)


def evaluate_pair(ft: FinetuneConfig, incumbent: str, candidate: str) -> dict[str, Any]:
    """Incumbent ("base") and candidate ("finetuned") on `ft`'s test split, one Ray task each
    (`aigc.finetune.evaluate_before_after`: loss, and the task metrics on task data)."""
    prepared = prepare(ft, run_dir_of(ft))
    return evaluate_before_after(ft, incumbent, candidate, prepared.packed, task_eval_inputs(ft, prepared.splits))


def serve_deploy(cfg: RefreshConfig) -> DeploySection:
    """The deploy section with a model name that stays the same across generations (clients keep sending it):
    deploy.args.model_name, else the app's name."""
    d = cfg.deploy
    return d.model_copy(update={"args": {**d.args, "model_name": d.args.get("model_name") or d.app_name}})


def _api_key(cfg: RefreshConfig) -> str | None:
    keys = parse_args({**cfg.deploy.args, "model_dir": "<champion>"}).api_keys
    return keys[0] if keys else None


def serve_url(d: DeploySection) -> str:
    host = "127.0.0.1" if d.host == "0.0.0.0" else d.host
    return f"http://{host}:{d.port}{d.route_prefix.rstrip('/')}"


def served_fingerprint(cfg: RefreshConfig, timeout: float = 10.0) -> str | None:
    """The `system_fingerprint` the app answers /v1/models with; None when it does not answer."""
    key = _api_key(cfg)
    try:
        r = requests.get(f"{serve_url(cfg.deploy)}/v1/models", timeout=timeout,
                         headers={"Authorization": f"Bearer {key}"} if key else {})
        if r.status_code != 200:
            return None
        models = r.json().get("data") or []
        name = serve_deploy(cfg).args["model_name"]
        entry = next((m for m in models if m.get("id") == name), models[0] if models else {})
        return entry.get("system_fingerprint")
    except (requests.RequestException, ValueError):
        return None


def deploy_and_wait(cfg: RefreshConfig, model_dir: str) -> None:
    """Serve's zero-downtime update to `model_dir` (the pipeline's `deploy`: new replicas start before the old ones
    stop), returning once the app is RUNNING again and answers with the model's fingerprint."""
    want = files_fingerprint(read_metadata(model_dir))
    d = serve_deploy(cfg)
    deploy(model_dir, d)
    deadline, seen = time.time() + d.ready_timeout_s, None
    while time.time() < deadline:
        app = serve.status().applications.get(d.app_name)
        seen = served_fingerprint(cfg)
        if app is not None and app.status == "RUNNING" and seen == want:  # every replica is the new model's
            return
        time.sleep(1.0)
    raise RefreshError(f"Serve app {d.app_name!r} did not answer with {model_dir} ({want}) within "
                       f"deploy.ready_timeout_s={d.ready_timeout_s:g} s (last answer: {seen})")


def real_steps(cfg: RefreshConfig) -> Steps:
    return Steps(train=train_once, evaluate=evaluate_pair, deploy=lambda d: deploy_and_wait(cfg, d),
                 served=lambda: served_fingerprint(cfg))


# -------------------------------------------------------------------------------------------- the cycle


@dataclass
class CycleResult:
    """What one invocation did: `outcome` is promoted, rejected, no-data or already-decided."""

    outcome: str
    model: str | None = None  # the candidate
    served: str | None = None  # the model Serve runs at the end
    reason: str = ""
    window: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def _track(cfg: RefreshConfig) -> tracking.Tracker | None:
    return tracking.open_tracker(cfg.tracking, root_of(cfg))


def _record(model: str, model_dir: str, parent: str | None, window: dict[str, Any], config: dict[str, Any],
            metrics: dict[str, Any], decision: Decision, generation: int, run_id: str | None) -> dict[str, Any]:
    return {"model": model, "dir": model_dir, "fingerprint": files_fingerprint(read_metadata(model_dir)),
            "parent": parent, "generation": generation, "window": window, "config": config, "metrics": metrics,
            "decision": asdict(decision), "decided_at": time.time(), "mlflow_run": run_id}


def ensure_served(cfg: RefreshConfig, steps: Steps) -> dict[str, Any]:
    """The served model's lineage record. Before the first cycle: the initial model (refresh.initial_model, or
    finetune.* fine-tuned on the original data in the run `initial`) is deployed, recorded and made champion.
    Later: if Serve does not answer with the recorded model (a fresh cluster, a killed rollback), it is redeployed."""
    root = root_of(cfg)
    served = served_record(root)
    if served is None:
        init = cfg.refresh.initial_model
        if init is None:
            data = original_data(cfg)
            ft = files_config(cfg, data, INITIAL, {"name_or_path": cfg.finetune.model.name_or_path})
            model_dir = steps.train(resolve_base(ft))
            window = {"id": "original", "files": [{"path": p, "sha256": sha256_of(Path(p))} for p in data["train"]]}
        else:
            if init == EMBEDDED_BASE:
                init = resolve_base(cfg.finetune.model_copy(update={"model": cfg.finetune.model.model_copy(
                    update={"name_or_path": EMBEDDED_BASE})})).model.name_or_path
            model_dir, window = str(Path(expand(init))), {"id": "given", "files": []}
            verify_model_dir(model_dir)
        rec = _record(INITIAL, model_dir, None, window, cfg.finetune.model_dump(mode="json"), {},
                      Decision(True, "the initial model"), 0, None)
        write_json(lineage_path(root, INITIAL), rec)
        print(f"[aigc] refresh: deploying the initial model {model_dir}", flush=True)
        steps.deploy(model_dir)
        set_served(root, rec, "the initial model")
        tracker = _track(cfg)
        if tracker:
            tracker.register_model(model_dir, alias=tracking.CHAMPION)
        return rec
    if steps.served() != served["fingerprint"]:
        print(f"[aigc] refresh: Serve does not answer with the recorded model {served['model']} "
              f"({served['fingerprint']}); deploying it", flush=True)
        steps.deploy(served["dir"])
    return read_lineage(root)[served["model"]]


def _finish_promotion(cfg: RefreshConfig, st: dict[str, Any], steps: Steps) -> dict[str, Any]:
    """Serve runs the candidate (again: idempotent), then lineage, served.json, champion. Safe to redo."""
    root = root_of(cfg)
    rec = st["record"]
    steps.deploy(rec["dir"])
    write_json(lineage_path(root, rec["model"]), rec)
    set_served(root, rec, rec["decision"]["reason"])
    tracker = _track(cfg)
    if tracker:
        tracker.register_model(rec["dir"], alias=tracking.CHAMPION)
    return rec


def redraw_report(cfg: RefreshConfig) -> str | None:
    """`write_refresh_report`, printed; a failure is reported, not raised: the report is a view, and failing to draw
    it must not undo a decided cycle or rollback."""
    try:
        report = write_refresh_report(cfg)
    except Exception as e:
        print(f"[aigc] refresh: could not write the report: {type(e).__name__}: {e}", flush=True)
        return None
    print(f"[aigc] refresh: report {report}", flush=True)
    return report


def _end_cycle(cfg: RefreshConfig, rec: dict[str, Any], run: tracking.TrackedRun | None) -> None:
    """After the decision is in the lineage: the report redrawn, the MLflow run's artifacts, the state cleared."""
    root = root_of(cfg)
    report = redraw_report(cfg)
    if run:
        run.log_artifacts([lineage_path(root, rec["model"]), Path(rec["window"]["dir"]) / "window.json",
                           *([Path(report)] if report else [])])
        run.tracker.client.set_tag(run.run_id, "aigc.decision", "promoted" if rec["decision"]["promote"] else "rejected")
        run.end()
    (root / STATE).unlink(missing_ok=True)


def run_cycle(cfg: RefreshConfig, steps: Steps | None = None) -> CycleResult:
    """One refresh cycle (see the module docstring), holding the storage root's lock."""
    root = root_of(cfg)
    with refresh_lock(root, cfg.refresh.lock_timeout_s):
        if steps is None:
            init_ray()
            steps = real_steps(cfg)
        return _cycle(cfg, steps, root)


def _cycle(cfg: RefreshConfig, steps: Steps, root: Path) -> CycleResult:
    st = read_json(root / STATE) or {}
    if st.get("phase") == ROLLBACK:
        _finish_rollback(cfg, st, steps)
        st = read_json(root / STATE) or {}
    incumbent = ensure_served(cfg, steps) if st.get("phase") != PROMOTING else None
    tracker = _track(cfg)
    if not st:
        if cfg.drift.weeks:
            deliver_week(cfg)
        lineage = read_lineage(root)
        incoming = Path(expand(cfg.refresh.incoming))
        seen = trained_files(lineage, incumbent["model"])
        files = [p for p in settled_files(incoming, cfg.refresh.pattern, cfg.refresh.settle_s)
                 if (str(p.relative_to(incoming)), sha256_of(p)) not in seen]
        if not files:
            print(f"[aigc] refresh: no new settled data in {incoming}; {incumbent['model']} keeps serving", flush=True)
            return CycleResult("no-data", served=incumbent["model"])
        wid = window_id([file_entry(p, incoming) for p in files])
        done = decided_window(lineage, wid)
        if done:
            print(f"[aigc] refresh: window {wid[:12]} was already decided ({done['decision']['reason']}); waiting for "
                  "new data", flush=True)
            return CycleResult("already-decided", done["model"], incumbent["model"], done["decision"]["reason"])
        window = make_window(cfg, files, incoming, incumbent["model"], lineage)
        st = {"phase": WINDOW, "model": model_id_of(window["id"]), "parent": incumbent["model"],
              "parent_dir": incumbent["dir"], "generation": incumbent["generation"] + 1, "window": window}
        write_json(root / STATE, st)
        print(f"[aigc] refresh: window {window['id'][:12]}: {len(files)} new file(s), rows {window['rows']}; "
              f"candidate {st['model']} from {st['parent']}", flush=True)
    model, window = st["model"], st["window"]
    run = tracker.start_run(model, params=cfg.model_dump(mode="json"), tags={tracking.KIND_TAG: "refresh"},
                            record=Path(window["dir"]) / TRACKING_RECORD) if tracker else None
    ft = files_config(cfg, window["paths"], model, start_from(st["parent_dir"], cfg))
    if st["phase"] == WINDOW:
        st = {**st, "phase": TRAINED, "candidate_dir": steps.train(ft)}
        write_json(root / STATE, st)
    if st["phase"] == TRAINED:
        old = original_data(cfg)
        old_ft = files_config(cfg, {**window["paths"], "test": old["test"]}, model, start_from(st["parent_dir"], cfg))
        ev_new = steps.evaluate(ft, st["parent_dir"], st["candidate_dir"])
        ev_old = steps.evaluate(old_ft, st["parent_dir"], st["candidate_dir"])
        metrics = {"incumbent": {"new": ev_new["base"], "old": ev_old["base"]},
                   "candidate": {"new": ev_new["finetuned"], "old": ev_old["finetuned"]}}
        decision = decide(metrics["incumbent"], metrics["candidate"], cfg.refresh.min_gain, cfg.refresh.max_regression)
        rec = _record(model, st["candidate_dir"], st["parent"], window, ft.model_dump(mode="json"), metrics, decision,
                      st["generation"], run.run_id if run else None)
        st = {**st, "phase": EVALUATED, "record": rec}
        write_json(root / STATE, st)
        print(f"[aigc] refresh: {model}: {decision.reason}", flush=True)
        if run:
            run.log_metrics({f"{who}.{which}.{k}": v for who, sets in metrics.items() for which, m in sets.items()
                             for k, v in m.items()}, step=0)
            run.log_metrics({"gain": decision.gain, "regression": decision.regression}, step=0)
            run.register_model(st["candidate_dir"], alias=tracking.CHALLENGER)
    rec = st["record"]
    if st["phase"] == EVALUATED and rec["decision"]["promote"]:
        st = {**st, "phase": PROMOTING}
        write_json(root / STATE, st)
    if st["phase"] == PROMOTING:
        print(f"[aigc] refresh: promoting {model}: Serve update to {rec['dir']}", flush=True)
        _finish_promotion(cfg, st, steps)
        print(f"[aigc] refresh: {model} is serving ({rec['fingerprint']}) and is the {tracking.CHAMPION}", flush=True)
    else:
        write_json(lineage_path(root, model), rec)
        print(f"[aigc] refresh: {st['parent']} keeps serving", flush=True)
    _end_cycle(cfg, rec, run)
    served = served_record(root)
    return CycleResult("promoted" if rec["decision"]["promote"] else "rejected", model, served["model"],
                       rec["decision"]["reason"], window, rec["metrics"])


def write_refresh_report(cfg: RefreshConfig) -> str:
    """The refresh report (`aigc.refresh_report`): every model of the lineage on the original test set and on each
    decided window's held-out test rows, in the order the windows arrived."""
    root = root_of(cfg)
    models = sorted(read_lineage(root).values(), key=lambda m: m["decided_at"])
    datasets = [("original test", original_data(cfg)["test"][0])]
    for m in models:
        files = m["window"].get("files") or []
        if m["model"] != INITIAL and files:
            name = files[0]["path"] + (f" +{len(files) - 1}" if len(files) > 1 else "")
            datasets.append((name, m["window"]["paths"]["test"][0]))
    return write_report(report_dir(root), models, served_record(root), datasets, cfg.finetune.data,
                        cfg.refresh.eval_rows, str(root))


def deliver_week(cfg: RefreshConfig) -> str | None:
    """The embedded drift: week k's batch (k = 1 + the weeks already there) written into `refresh.incoming` as
    week-0k/part-0.jsonl and then its `_SUCCESS` marker, until `drift.weeks` weeks are there; None after that."""
    incoming = Path(expand(cfg.refresh.incoming))
    for week in range(1, cfg.drift.weeks + 1):
        folder = incoming / f"week-{week:02d}"
        if not (folder / MARKER).is_file():
            path = write_drift_batch(folder / "part-0.jsonl", week, cfg.drift.rows_per_week, cfg.drift.seed)
            (folder / MARKER).touch()
            print(f"[aigc] refresh: drift week {week} arrived ({DRIFT_WEEKS[week].name}): {path}", flush=True)
            return path
    return None


def run_refresh(cfg: RefreshConfig, steps: Steps | None = None) -> list[CycleResult]:
    """One cycle, or with `refresh.every` a loop of them (at most `refresh.max_cycles`), each started `every`
    seconds after the previous one started."""
    results = []
    while True:
        t0 = time.time()
        results.append(run_cycle(cfg, steps))
        r = cfg.refresh
        if r.every is None or (r.max_cycles is not None and len(results) >= r.max_cycles):
            return results
        time.sleep(max(0.0, r.every - (time.time() - t0)))


# ------------------------------------------------------------------------------------------- rollback


def _finish_rollback(cfg: RefreshConfig, st: dict[str, Any], steps: Steps) -> dict[str, Any]:
    root = root_of(cfg)
    rec = read_lineage(root)[st["target"]]
    print(f"[aigc] refresh: rolling back to {rec['model']} ({rec['fingerprint']}): Serve update to {rec['dir']}",
          flush=True)
    steps.deploy(rec["dir"])
    set_served(root, rec, st["why"])
    tracker = _track(cfg)
    if tracker:
        tracker.register_model(rec["dir"], alias=tracking.CHAMPION)
    if st.get("cycle"):  # a cycle that was in flight (killed while training, say) continues on the next refresh
        write_json(root / STATE, st["cycle"])
    else:
        (root / STATE).unlink(missing_ok=True)
    redraw_report(cfg)
    return rec


def previous_model(served: dict[str, Any]) -> str | None:
    """The model Serve ran before the current one (the history's last entry of another model)."""
    return next((h["model"] for h in reversed(served["history"]) if h["model"] != served["model"]), None)


def run_rollback(cfg: RefreshConfig, to: str | None = None, steps: Steps | None = None) -> dict[str, Any]:
    """Redeploy the model served before the current one, or `to` (a model id of the lineage), with the same
    zero-downtime Serve update as a promotion, and move `champion` to it. Returns its lineage record."""
    root = root_of(cfg)
    with refresh_lock(root, cfg.refresh.lock_timeout_s):
        if steps is None:
            init_ray()
            steps = real_steps(cfg)
        pending = read_json(root / STATE) or {}
        if pending.get("phase") == ROLLBACK:  # a killed rollback: finish it first
            _finish_rollback(cfg, pending, steps)
            pending = read_json(root / STATE) or {}
        if pending.get("phase") == PROMOTING:  # a decided promotion in flight: finish it, then roll it back
            rec = _finish_promotion(cfg, pending, steps)
            _end_cycle(cfg, rec, None)
            pending = {}
        served = served_record(root)
        if served is None:
            raise RefreshError(f"{root / SERVED}: nothing has been served by this refresh yet; nothing to roll back")
        lineage = read_lineage(root)
        target = to or previous_model(served)
        if target is None:
            raise RefreshError(f"{served['model']} is the only model this refresh has served; nothing to roll back to")
        if target not in lineage:
            raise RefreshError(f"--to {target}: no such model in {root / LINEAGE_DIR} (models: {', '.join(lineage)})")
        verify_model_dir(lineage[target]["dir"])
        st = {"phase": ROLLBACK, "target": target, "why": f"rollback from {served['model']} to {target}",
              "cycle": pending or None}
        write_json(root / STATE, st)
        return _finish_rollback(cfg, st, steps)
