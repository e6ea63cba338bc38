"""The whole loop as one job: search -> report -> winner -> deploy (or update) on Serve -> smoke request."""

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
from aigc.config import DataSection
from aigc.corpus import ensure_embedded_corpus
from aigc.pipeline_config import DeploySection, PipelineConfig
from aigc.search import run_search
from aigc.search_config import SearchConfig
from aigc.serving.app import build_app
from aigc.serving.args import parse_args
from aigc.taskdata import read_rows
from aigc.taskmetrics import fidelity, is_embedded_task, parse_ad


@dataclass
class PipelineResult:
    report: str
    winner_dir: str
    url: str
    generations: list[dict[str, str]] = field(default_factory=list)


def deploy(winner_dir: str, d: DeploySection) -> str:
    """Deploy (or update in place) the Serve app on the winner; returns the base URL once it answers."""
    serve.start(http_options={"host": d.host, "port": d.port})
    serve.run(build_app({**d.args, "model_dir": winner_dir}), name=d.app_name, route_prefix=d.route_prefix,
              blocking=False)
    host = "127.0.0.1" if d.host == "0.0.0.0" else d.host
    return f"http://{host}:{d.port}{d.route_prefix.rstrip('/')}"


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
    # the trials see a plain search config: the deploy section is the pipeline's, not theirs
    result = run_search(SearchConfig.model_validate(cfg.model_dump(exclude={"deploy"})))
    if result.interrupted or not result.winner_dir:
        raise RuntimeError(f"{result.search_dir}: the search ended without a winner "
                           f"(interrupted={result.interrupted}, errors={result.errors}); see the report")
    print(f"[aigc] report: {result.report['report.html']}", flush=True)
    url = deploy(result.winner_dir, cfg.deploy)
    served = parse_args({**cfg.deploy.args, "model_dir": result.winner_dir})
    key = served.api_keys[0] if served.api_keys else None
    generations = smoke(url, cfg.deploy, served.served_name, smoke_requests(cfg.base.data, cfg.deploy), key)
    mark_champion(cfg, result.winner_dir)  # once it answers: the champion is what Serve runs
    print(f"[aigc] endpoint: {url}/v1  (OpenAI base_url; model {served.served_name!r})", flush=True)
    if cfg.base.data.format == "chat":
        body = {"model": served.served_name, "max_tokens": 96,
                "messages": [{"role": "user", "content": generations[0]["prompt"]}]}
        print(f"[aigc] try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{json.dumps(body)}'",
              flush=True)
    else:
        print(f"[aigc] try: curl {url}/v1/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{served.served_name}\", \"prompt\": \"Introducing the\", \"max_tokens\": 32}}'",
              flush=True)
    print_smoke(generations)
    return PipelineResult(result.report["report.html"], result.winner_dir, url, generations)
