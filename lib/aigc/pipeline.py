"""The whole loop as one job: search -> report -> winner -> deploy (or update) on Serve -> smoke request.

The winner goes to Serve one of two ways: merged, as the app itself (`deploy`: deployed, or updated in place),
or with `deploy.as_adapter` as one more adapter of an app already serving its base (`deploy_adapter`: copied
into that app's adapter folder, where its replicas find it by name: a second customer's model on the replicas
that serve the first).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from openai import APIConnectionError, APIStatusError, InternalServerError, OpenAI
from ray import serve

from aigc import tracking
from aigc.config import ConfigError, DataSection, expand
from aigc.corpus import ensure_embedded_corpus
from aigc.finetune import init_ray
from aigc.modeldir import copy_model_dir
from aigc.pipeline_config import DeploySection, PipelineConfig
from aigc.raycompat import serve_running
from aigc.search import run_search
from aigc.search_config import SearchConfig
from aigc.serving.adapters import adapter_meta
from aigc.serving.app import build_app, port_taken
from aigc.serving.args import adapter_model_id, parse_args
from aigc.taskdata import read_rows
from aigc.taskmetrics import fidelity, is_embedded_task, parse_ad


@dataclass
class PipelineResult:
    report: str
    winner_dir: str
    url: str
    generations: list[dict[str, str]] = field(default_factory=list)


def check_port(d: DeploySection, when: str = "") -> None:
    """Where this Ray runs no Serve yet, a `deploy.port` something already listens on is refused (`port_taken`):
    Serve's proxy binds with SO_REUSEPORT and would share it silently. Where Serve runs, the port is its own."""
    if (taken := port_taken(d.host, d.port)) and not serve_running():
        raise ConfigError([f"deploy.port: {taken}; set another deploy.port, or stop what holds it{when}"],
                          "deploy section")


def deploy(winner_dir: str, d: DeploySection) -> str:
    """Deploy (or update in place) the Serve app on the winner; returns the base URL once it answers. The port is
    checked again here (`check_port`): it may have been taken while the search ran."""
    check_port(d)
    serve.start(http_options={"host": d.host, "port": d.port})
    serve.run(build_app({**d.args, "model_dir": winner_dir}), name=d.app_name, route_prefix=d.route_prefix,
              blocking=False)
    return app_url(d)


def app_url(d: DeploySection) -> str:
    """The base URL of the app `d` names (its /v1 lives under it)."""
    host = "127.0.0.1" if d.host == "0.0.0.0" else d.host
    return f"http://{host}:{d.port}{d.route_prefix.rstrip('/')}"


def deploy_adapter(model_dir: str, d: DeploySection, name: str, timeout_s: float = 60.0) -> tuple[str, str]:
    """Serve the LoRA adapter of `model_dir` on the running app `d.app_name` (one that serves adapters on its
    base, `adapter_folder` set) as adapter `name`: checked against the base the app serves (both fingerprints
    named otherwise), copied into the app's adapter folder (verified, atomically; an adapter of that name is
    replaced), where its replicas find it on the next request. Returns (the app's base URL, the model id).
    Replicas that still hold an adapter of that name keep it until Serve's LRU unloads it."""
    try:
        info = serve.get_app_handle(d.app_name).info.remote().result(timeout_s=timeout_s)
    except Exception as e:
        raise RuntimeError(f"deploy.app_name: no running Serve app {d.app_name!r} to deploy the adapter onto "
                           f"({type(e).__name__}: {e})") from None
    if not info.get("adapter_folder"):
        raise RuntimeError(f"deploy.as_adapter: the running app {d.app_name!r} serves no adapter_folder; deploy its "
                           "base with adapter_folder set first (docs/serving.md)")
    adapter_meta(model_dir, info["base_fingerprint"], info["model_dir"])
    copy_model_dir(model_dir, os.path.join(expand(info["adapter_folder"]), name))
    return app_url(d), adapter_model_id(info["model"], name)


def smoke_requests(data: DataSection, d: DeploySection) -> list[dict[str, Any]]:
    """What the smoke step sends: test-split conversations (chat) or prompts (prompt_completion), else the
    configured text prompts. Each is {"route", "prompt" (what a person reads), and "messages" or "text"}."""
    if data.format == "text":
        return [{"route": "completions", "prompt": p, "text": p} for p in d.smoke_prompts]
    path = ensure_embedded_corpus(data)["test"] if data.source == "embedded" else (data.test_files or data.train_files)[0]
    out = []
    for _, row in islice(read_rows(os.path.expanduser(path)), d.smoke_examples):
        if data.format == "chat":
            turns = row[data.messages_column]
            messages = turns[:-1] if turns and turns[-1]["role"] == "assistant" else turns
            out.append({"route": "chat", "prompt": messages[-1]["content"], "messages": messages})
        else:
            prompt = row[data.prompt_column] + data.prompt_suffix
            out.append({"route": "completions", "prompt": prompt, "text": prompt})
    return out


def smoke(url: str, d: DeploySection, model: str, requests: list[dict[str, Any]],
          api_key: str | None = None) -> list[dict[str, Any]]:
    """One real request per item through the official OpenAI client (greedy), retried until the app answers
    or `ready_timeout_s` passes. On embedded briefs each answer is scored: valid ad, faithful to its brief."""
    client = OpenAI(base_url=f"{url}/v1", api_key=api_key or "none", max_retries=0, timeout=60)
    scored = is_embedded_task([r["prompt"] for r in requests])
    out, deadline = [], time.time() + d.ready_timeout_s
    for r in requests:
        while True:
            try:
                if r["route"] == "chat":
                    res = client.chat.completions.create(model=model, messages=r["messages"], temperature=0,
                                                         max_tokens=d.smoke_max_tokens, seed=0)
                    text = res.choices[0].message.content or ""
                else:
                    text = client.completions.create(model=model, prompt=r["text"], temperature=0,
                                                     max_tokens=d.smoke_max_tokens, seed=0).choices[0].text
                break
            except (APIConnectionError, InternalServerError):  # not up yet, or the proxy has no replica yet
                if time.time() > deadline:
                    raise
            except APIStatusError as e:
                if e.status_code < 500 or time.time() > deadline:
                    raise RuntimeError(f"{url}/v1 answered {e.status_code}: {str(e)[:300]}") from None
            time.sleep(1.0)
        g = {"prompt": r["prompt"], "completion": text}
        if scored:
            g.update(valid=parse_ad(text) is not None, faithful=fidelity(r["prompt"], text))
        out.append(g)
    return out


def print_smoke(generations: list[dict[str, Any]]) -> None:
    for g in generations:
        if "valid" in g:
            verdict = ("valid" if g["valid"] else "INVALID") + (", faithful" if g["faithful"] else ", NOT faithful")
            print(f"[aigc] brief: {' | '.join(g['prompt'].strip().splitlines())}", flush=True)
            print(f"[aigc]    ad: {g['completion'].strip()!r}  ({verdict})", flush=True)
        else:
            print(f"[aigc] {g['prompt']!r} -> {g['completion']!r}", flush=True)


def mark_champion(cfg: PipelineConfig, model_dir: str) -> tracking.ModelVersionInfo | None:
    """Move the registry's `champion` alias to the model Serve now runs (the search registered it as a version;
    found by its fingerprint, registered here should it not be); None when `tracking.enabled` is false."""
    tracker = tracking.open_tracker(cfg.tracking, cfg.search.storage_path)
    if tracker is None:
        return None
    version = tracker.register_model(model_dir, alias=tracking.CHAMPION)
    print(f"[aigc] registry: {tracker.registered_model} version {version.version} ({version.fingerprint}) is the "
          f"{tracking.CHAMPION}", flush=True)
    return version


def run_pipeline(cfg: PipelineConfig) -> PipelineResult:
    # a port the deploy would refuse fails now, not after the search; Ray starts early only when the port is taken
    # (by this Ray's own Serve, an update in place, or by something else)
    if not cfg.deploy.as_adapter and port_taken(cfg.deploy.host, cfg.deploy.port):
        init_ray()
        check_port(cfg.deploy, " (checked before the search, so that it does not run for nothing)")
    # the trials see a plain search config: the deploy section is the pipeline's, not theirs
    result = run_search(SearchConfig.model_validate(cfg.model_dump(exclude={"deploy"})))
    if result.interrupted or not result.winner_dir:
        raise RuntimeError(f"{result.search_dir}: the search ended without a winner "
                           f"(interrupted={result.interrupted}, errors={result.errors}); see the report")
    print(f"[aigc] report: {result.report['report.html']}", flush=True)
    served = parse_args({**cfg.deploy.args, "model_dir": result.winner_dir})
    if cfg.deploy.as_adapter:
        url, model = deploy_adapter(result.winner_dir, cfg.deploy, cfg.deploy.adapter_name or cfg.search.name)
    else:
        url, model = deploy(result.winner_dir, cfg.deploy), served.served_name
    key = served.api_keys[0] if served.api_keys else None
    generations = smoke(url, cfg.deploy, model, smoke_requests(cfg.base.data, cfg.deploy), key)
    mark_champion(cfg, result.winner_dir)  # once it answers: the champion is what Serve runs
    print(f"[aigc] endpoint: {url}/v1  (OpenAI base_url; model {model!r})", flush=True)
    if cfg.base.data.format == "chat":
        body = {"model": model, "max_tokens": 96, "messages": [{"role": "user", "content": generations[0]["prompt"]}]}
        print(f"[aigc] try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{json.dumps(body)}'",
              flush=True)
    else:
        print(f"[aigc] try: curl {url}/v1/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{model}\", \"prompt\": \"Introducing the\", \"max_tokens\": 32}}'",
              flush=True)
    print_smoke(generations)
    return PipelineResult(result.report["report.html"], result.winner_dir, url, generations)
