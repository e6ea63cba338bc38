"""`aigc`: the one command line. Each verb calls a library function; `aigc VERB --help` shows its
arguments and every config field it takes (full dotted key, type, default, description).

    aigc finetune --config jobs/configs/tiny-cpu.yaml optim.lr=1e-3     fine-tune (Ray Train + DeepSpeed ZeRO)
    aigc search --config tune/configs/tiny-cpu.yaml space.lr.high=1e-2   search hyperparameters (Ray Tune)
    aigc pipeline --config jobs/configs/pipeline-tiny-cpu.yaml           search, report, winner, Serve
    aigc refresh --config jobs/configs/refresh-tiny-cpu.yaml             new data -> candidate -> promoted if better
    aigc rollback --config jobs/configs/refresh-tiny-cpu.yaml [--to M]   serve the previous (or a named) model again
    aigc serve --model DIR [a.b=value ...]                               serve a model directory over HTTP
    aigc report SEARCH_DIR                                               (re)generate a search report
    aigc corpus --out DIR                                                write the embedded corpus
    aigc check-cluster [--cluster cluster.yaml] [CONFIG ...]             check a cluster.yaml offline
    aigc build-ops [--dir DIR]                                           compile DeepSpeed's ops once, not in a run

`ray job submit` runs the scripts jobs/finetune.py, tune/search.py, jobs/pipeline.py and jobs/refresh.py, which
call the same functions as `aigc finetune`, `aigc search`, `aigc pipeline` and `aigc refresh`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from aigc import console
from aigc.config import ConfigError, EmbeddedCorpus, FinetuneConfig, build, load_config
from aigc.pipeline_config import PipelineConfig
from aigc.refresh_config import RefreshBusy, RefreshConfig, RefreshError
from aigc.search_config import SearchConfig

# The one allowed exception to "imports at the top": each verb imports its heavy modules (Ray, torch,
# transformers, DeepSpeed) inside its function, so `aigc --help` and a rejected config stay fast.

C = TypeVar("C", bound=BaseModel)
R = TypeVar("R")
RAW = argparse.RawDescriptionHelpFormatter


# ------------------------------------------------------------------------------------- config help


def _type_name(annotation: Any) -> str:
    """`int | None`, `Literal['cosine', 'linear']`, `ParamSpec`: module paths dropped."""
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", text)


def config_fields(model: type[BaseModel], values: BaseModel | None = None, prefix: str = "") -> list[str]:
    """One entry per field of `model`, nested sections recursively, each as `key: type = default` and its
    description on the next line; defaults are YAML/JSON literals, as they are typed after `key=`.
    `values` gives the defaults of a nested section (a parent may default it to other than its own)."""
    lines = []
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        if values is not None:
            value = getattr(values, name)
        elif f.default is PydanticUndefined and f.default_factory is None:
            value = PydanticUndefined
        else:
            value = f.get_default(call_default_factory=True)
        section = isinstance(value, BaseModel)
        if section:
            lines.append(f"  {key}: {_type_name(type(value))}")
        else:
            shown = "required" if value is PydanticUndefined else json.dumps(value, default=str)
            lines.append(f"  {key}: {_type_name(f.annotation)} = {shown}")
        if f.description:
            lines.append(f"      {f.description}")
        if section:  # its own fields, with this default's values
            lines += config_fields(type(value), value, f"{key}.")
    return lines


def config_help(model: type[BaseModel], how: str = "set with key=value after the options, or in the YAML file") -> str:
    """The `--help` epilog listing every field of `model` (see :func:`config_fields`)."""
    return "\n".join([f"{model.__name__} fields ({how}):", *config_fields(model)])


# ------------------------------------------------------------------------------------- config verbs


def config_job(argv: list[str] | None, model: type[C], run: Callable[[C], R], *, prog: str | None,
               description: str | None, config_help_text: str, example: str) -> tuple[C, R] | None:
    """What `aigc finetune|search|pipeline` (and the scripts `ray job submit` runs) share: parse
    `--config FILE [a.b=value ...]`, validate the whole config before Ray starts, then `run(config)`.

    Returns (config, result); on a user error (config, data, model directory) prints `error: ...` to stderr
    and returns None, for the caller to exit 2."""
    console.setup()  # AIGC_LOG_LEVEL and the noise filters, before anything imports Ray (Ray reads them at import)
    from aigc.data import DataError  # on use, like the verbs' imports (see the note at the top)
    from aigc.modeldir import ModelDirError

    p = argparse.ArgumentParser(prog=prog, description=description, epilog=config_help(model), formatter_class=RAW)
    p.add_argument("--config", help=config_help_text)
    p.add_argument("overrides", nargs="*", help=f"section.key=value overrides (fields below), e.g. {example}")
    args = p.parse_args(argv)
    try:
        cfg = load_config(model, args.config, args.overrides)
        return cfg, run(cfg)
    except (ConfigError, DataError, ModelDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def finetune(argv: list[str] | None = None, prog: str | None = None, doc: str | None = None) -> int:
    """Fine-tune a causal LM with Ray Train + DeepSpeed ZeRO, then compare test perplexity before and after.

        aigc finetune --config jobs/configs/tiny-cpu.yaml optim.lr=1e-3 zero.stage=3
        ray job submit --working-dir . -- python jobs/finetune.py --config ...    # on a cluster

    Re-running with the same run.name continues from that run's latest checkpoint.
    """

    def run(cfg: FinetuneConfig) -> Any:
        # Ray, torch, DeepSpeed: only once the config is known good; `embedded` resolves to the cached base
        from aigc.pretrain import finetune as run_finetune

        return run_finetune(cfg)

    done = config_job(argv, FinetuneConfig, run, prog=prog, description=doc or inspect.getdoc(finetune),
                      config_help_text="YAML config (defaults: the embedded tiny CPU run)", example="optim.lr=1e-3")
    if done is None:
        return 2
    _, result = done
    print(f"[aigc] best model: {result.best_dir}")
    return 0


def pretrain(argv: list[str] | None = None, prog: str | None = None, doc: str | None = None) -> int:
    """Pre-train the embedded base (`model.name_or_path: embedded`) once and cache it; a cached one is reused.

        aigc pretrain                                             # the default base (a few minutes on 2 cores)
        aigc pretrain --config jobs/configs/tiny-cpu.yaml model.pretrain.max_steps=1000

    The base is cached under run.base_cache by a hash of model.pretrain (worker counts aside); the first
    fine-tune, search or pipeline that needs it builds it the same way, so running this first is optional.
    """

    def run(cfg: FinetuneConfig) -> Any:
        from aigc.pretrain import pretrain as build

        return build(cfg)

    done = config_job(argv, FinetuneConfig, run, prog=prog, description=doc or inspect.getdoc(pretrain),
                      config_help_text="YAML config whose model.pretrain and run.base_cache say which base",
                      example="model.pretrain.max_steps=1000")
    return 2 if done is None else 0  # aigc.pretrain prints where the base is


def search(argv: list[str] | None = None, prog: str | None = None, doc: str | None = None) -> int:
    """Search fine-tuning hyperparameters with Ray Tune: ASHA on validation loss, a report, the winner exported.

        aigc search --config tune/configs/tiny-cpu.yaml search.num_samples=8 space.lr.high=1e-2
        ray job submit --working-dir . -- python tune/search.py --config ...      # on a cluster

    Results land in <search.storage_path>/<search.name>/ (report.html, trials.csv, winner/); the same
    command resumes an interrupted search without rerunning its finished trials.
    """
    def run_search(cfg: SearchConfig) -> Any:
        from aigc.search import run_search as run  # Ray Tune: only once the config is known good

        return run(cfg)

    done = config_job(argv, SearchConfig, run_search, prog=prog, description=doc or inspect.getdoc(search),
                      config_help_text="search YAML (defaults: the embedded tiny model, 8 random trials)",
                      example="space.lr.high=1e-2")
    if done is None:
        return 2
    _, result = done
    print(f"[aigc] report: {result.report['report.html']}")
    if result.interrupted:
        print("[aigc] the search was interrupted; run the same command again to resume it")
        return 1
    if result.errors:
        print(f"[aigc] {len(result.errors)} of {len(result.trials)} trials failed: "
              + "; ".join(f"{tid}: {err}" for tid, err in sorted(result.errors.items())), file=sys.stderr)
    if result.winner_dir is None:
        print("error: no trial reported a validation loss, so there is no winner; the report's Errors section "
              "has each failure in full", file=sys.stderr)
        return 1
    print(f"[aigc] winner: {result.winner_dir} (trial {result.best_trial}, val loss "
          f"{result.best_metrics.get('val_loss', float('nan')):.4f})")
    return 0


def pipeline(argv: list[str] | None = None, prog: str | None = None, doc: str | None = None) -> int:
    """The whole loop as one job: search, report, winner export, deploy (or update) on Serve, a smoke request.

        aigc pipeline --config jobs/configs/pipeline-tiny-cpu.yaml deploy.keep_serving=true
        ray job submit --working-dir . -- python jobs/pipeline.py --config ...    # on a cluster

    On a cluster the Serve app outlives the job; a local in-process run takes its Ray (and the app) down
    when it ends unless deploy.keep_serving=true.
    """
    def run_pipeline(cfg: PipelineConfig) -> Any:
        from aigc.pipeline import run_pipeline as run  # Ray, Serve, torch: only once the config is known good

        return run(cfg)

    done = config_job(argv, PipelineConfig, run_pipeline, prog=prog, description=doc or inspect.getdoc(pipeline),
                      config_help_text="pipeline YAML: a search config plus a deploy section",
                      example="search.num_samples=2")
    if done is None:
        return 2
    cfg, result = done
    print(f"[aigc] done: report {result.report} | winner {result.winner_dir} | endpoint {result.url}/v1")
    _serve_on(cfg)
    return 0


def _serve_on(cfg: PipelineConfig | RefreshConfig) -> None:
    """deploy.keep_serving: stay in the foreground until Ctrl-C (a local Ray, and its Serve app, ends with us)."""
    if cfg.deploy.keep_serving:
        print("[aigc] serving until Ctrl-C")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def refresh(argv: list[str] | None = None, prog: str | None = None, doc: str | None = None) -> int:
    """Keep the served model current: fine-tune a candidate on new data, promote it only if it is better.

        aigc refresh --config jobs/configs/refresh-tiny-cpu.yaml refresh.incoming=/data/incoming
        ray job submit --working-dir . -- python jobs/refresh.py --config ...     # on a cluster, from cron

    One invocation is one cycle (refresh.every loops): settled new files in refresh.incoming -> a candidate
    fine-tuned from the served model on them plus a replay share -> candidate and incumbent on the new data's
    held-out rows and the original test set -> promoted (zero-downtime Serve update, MLflow `champion`) only if
    better by refresh.min_gain and within refresh.max_regression. A killed cycle continues on the next run.
    Exit status: 0 done (promoted, rejected or nothing new), 2 bad config or data, 3 another cycle holds the lock.
    """
    def run(cfg: RefreshConfig) -> Any:
        from aigc.refresh import run_refresh  # Ray, Serve, torch: only once the config is known good

        return run_refresh(cfg)

    done = _refresh_job(argv, run, prog=prog, description=doc or inspect.getdoc(refresh),
                        config_help_text="refresh YAML: refresh, finetune, deploy, tracking, drift sections",
                        example="refresh.min_gain=0.02")
    if isinstance(done, int):
        return done
    cfg, results = done
    for r in results:
        print(f"[aigc] refresh: {r.outcome}" + (f" {r.model}" if r.model else "") + f"; serving {r.served}")
    _serve_on(cfg)
    return 0


def _refresh_job(argv: list[str] | None, run: Any, **kw: Any) -> tuple[Any, Any] | int:
    """`config_job` over a RefreshConfig, or the exit code: 3 when another cycle holds the storage root's lock
    (a scheduler may simply try again later), 2 for a bad config or a refresh error."""
    try:
        done = config_job(argv, RefreshConfig, run, **kw)
    except RefreshBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except RefreshError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2 if done is None else done


def rollback(argv: list[str] | None = None, prog: str | None = None, doc: str | None = None) -> int:
    """Serve the model served before the current one again (or --to MODEL, a model id of the refresh's lineage),
    with the same zero-downtime Serve update as a promotion, and move the registry's `champion` alias to it.

        aigc rollback --config jobs/configs/refresh-tiny-cpu.yaml
        aigc rollback --config jobs/configs/refresh-tiny-cpu.yaml --to cand-3f2a9c01b7de
        ray job submit --working-dir . -- python -m aigc.cli rollback --config ...   # on a cluster

    Model ids are the file names in <refresh.storage_path>/lineage/ (and the report's first column).
    """
    def run(cfg: RefreshConfig) -> Any:
        from aigc.refresh import run_rollback

        return run_rollback(cfg, known.to)

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--to", default=None)
    known, rest = pre.parse_known_args(argv)
    done = _refresh_job(rest, run, prog=prog, description=doc or inspect.getdoc(rollback),
                        config_help_text="the refresh's YAML (its storage root and deploy section); --to MODEL "
                                         "names the model to serve (default: the one served before)",
                        example="refresh.storage_path=/mnt/shared/refresh")
    if isinstance(done, int):
        return done
    cfg, rec = done
    print(f"[aigc] rollback: serving {rec['model']} ({rec['fingerprint']}) from {rec['dir']}")
    _serve_on(cfg)
    return 0


# -------------------------------------------------------------------------- verbs with their own main


def _own_main(main: Callable[[list[str]], int | None], argv: list[str], model: type[BaseModel] | None = None) -> int:
    """Run a module's own `main(argv)`; when asked for --help, its help is followed by `model`'s fields.
    (Those modules' parsers name themselves, so these verbs take `prog` only to share the verb signature.)"""
    if model is not None and {"-h", "--help"} & set(argv):
        try:
            main(["--help"])
        except SystemExit:  # argparse's help exits
            pass
        print("\n" + config_help(model, "set with a.b=value after the options"))
        return 0
    return int(main(argv) or 0)


def serve(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Serve a model directory on Ray Serve behind an OpenAI-compatible HTTP API."""
    from aigc.serving.app import main as serve_main
    from aigc.serving.args import ServeArgs

    return _own_main(serve_main, list(argv or []), ServeArgs)


def report(argv: list[str] | None = None, prog: str | None = None) -> int:
    """(Re)generate the report of a finished, running or interrupted search."""
    from aigc.report import main as report_main

    return _own_main(report_main, list(argv or []))


def check_cluster(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Check a Ray cluster launcher config (cluster.yaml) and the configs meant to run on it, offline."""
    from aigc.clustercheck import main as clustercheck_main

    return _own_main(clustercheck_main, list(argv or []))


def build_ops(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Compile DeepSpeed's ops (CPU Adam for offload, CPU collectives) into the ops cache, so no run compiles them."""
    p = argparse.ArgumentParser(prog=prog, description=inspect.getdoc(build_ops) + " Run it once per machine and "
                                "Python environment: `make setup` does; on a cluster, in the nodes' setup commands.")
    p.add_argument("--dir", help="the ops cache, which gets a folder per Python environment (default: "
                   "TORCH_EXTENSIONS_DIR as it is, else run.torch_extensions_dir's default, where the workers look)")
    args = p.parse_args(argv)
    console.setup()
    from aigc.train import build_ops as build
    from aigc.train import ops_cache

    if args.dir:
        try:
            os.makedirs(ops_cache(args.dir), exist_ok=True)  # the folder build_ops builds into
        except OSError as e:
            print(f"error: --dir {args.dir}: {e.strerror or e}", file=sys.stderr)
            return 2

    t0 = time.time()
    try:
        built = build(args.dir)
    except (RuntimeError, OSError) as e:  # no C++ toolchain, or a cache the build cannot write
        print(f"error: DeepSpeed could not build its ops ({type(e).__name__}: {e}); it needs a C++ compiler (g++) "
              "and a writable cache", file=sys.stderr)
        return 1
    for name, path in built.items():
        print(f"[aigc] op {name}: {path}")
    print(f"[aigc] {len(built)} DeepSpeed op(s) ready in {time.time() - t0:.0f} s")
    return 0


def corpus(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Write the embedded commerce corpus as train/validation/test jsonl files (and its grammar)."""
    from aigc.corpus import write_corpus

    p = argparse.ArgumentParser(prog=prog, description=inspect.getdoc(corpus))
    p.add_argument("--out", required=True, help="output folder")
    for name, f in EmbeddedCorpus.model_fields.items():  # the options are data.embedded's fields
        p.add_argument(f"--{name.replace('_', '-')}", type=f.annotation, default=f.default,
                       help=f"{f.description} (default: %(default)s)")
    values = vars(p.parse_args(argv))
    out = values.pop("out")
    try:
        spec = build(EmbeddedCorpus, values, "corpus options")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(write_corpus(out, **spec.model_dump()), indent=2))
    return 0


VERBS: dict[str, Callable[..., int]] = {
    "pretrain": pretrain,
    "finetune": finetune,
    "search": search,
    "pipeline": pipeline,
    "refresh": refresh,
    "rollback": rollback,
    "serve": serve,
    "report": report,
    "corpus": corpus,
    "check-cluster": check_cluster,
    "build-ops": build_ops,
}


def main(argv: list[str] | None = None) -> int:
    """`aigc [--verbose] VERB [ARGS ...]`: run one verb and return its exit code."""
    parser = argparse.ArgumentParser(prog="aigc", description=__doc__, formatter_class=RAW)
    parser.add_argument("--verbose", action="store_true", help="debug logging (AIGC_LOG_LEVEL=debug) for the verb")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, fn in VERBS.items():
        # the verb parses its own arguments, its --help included: here nothing after VERB is an option
        sub = verbs.add_parser(name, help=inspect.getdoc(fn).splitlines()[0], add_help=False, prefix_chars="\0")
        sub.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if ns.verbose:
        os.environ["AIGC_LOG_LEVEL"] = "debug"
    return VERBS[ns.verb](ns.args, prog=f"aigc {ns.verb}")


if __name__ == "__main__":
    sys.exit(main())
