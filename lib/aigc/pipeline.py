"""The whole loop as one job: search -> report -> winner -> deploy (or update) on Serve -> smoke request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from aigc import console
from aigc.config import ConfigError, Strict
from aigc.search_config import SearchConfig
from aigc.serving.args import parse_args

WINNER_PLACEHOLDER = "<winner>"


class DeployConfig(Strict):
    """How the winner is served once the search is done."""

    app_name: str = Field("aigc", description="Serve application name; deploying again updates it in place")
    route_prefix: str = Field("/", pattern=r"^/")
    host: str = Field("127.0.0.1", description="HTTP host of Serve's proxy (0.0.0.0 to listen on all interfaces)")
    port: int = Field(8000, ge=1, le=65535)
    args: dict[str, Any] = Field(
        default_factory=dict, description="ServeArgs fields (see aigc.serving.args) except model_dir, e.g. num_cpus"
    )
    smoke_prompts: list[str] = Field(default_factory=lambda: ["Introducing the", "Save", "Limited time:"], min_length=1)
    smoke_max_tokens: int = Field(32, ge=1)
    ready_timeout_s: float = Field(300.0, gt=0, description="how long the app may take to become healthy")
    keep_serving: bool = Field(False, description="stay in the foreground serving until Ctrl-C (local Ray dies with us)")


class PipelineConfig(SearchConfig):
    """A search config (`base`, `space`, `search`) plus how to deploy the winner."""

    deploy: DeployConfig = Field(default_factory=DeployConfig)

    def problems(self) -> list[str]:
        out = super().problems()
        if "model_dir" in self.deploy.args:
            out.append("deploy.args.model_dir: set by the pipeline (the search's winner); remove it")
            return out
        try:
            parse_args({**self.deploy.args, "model_dir": WINNER_PLACEHOLDER})
        except ConfigError as e:
            out += [f"deploy.args.{p}" for p in e.problems]
        return out


@dataclass
class PipelineResult:
    report: str
    winner_dir: str
    url: str
    generations: list[dict[str, str]] = field(default_factory=list)


def deploy(winner_dir: str, d: DeployConfig) -> str:
    """Deploy (or update in place) the Serve app on the winner; returns the base URL once it answers."""
    from ray import serve

    from aigc.serving.app import build_app  # Ray, FastAPI and torch: not on the config's import path

    serve.start(http_options={"host": d.host, "port": d.port})
    serve.run(build_app({**d.args, "model_dir": winner_dir}), name=d.app_name, route_prefix=d.route_prefix,
              blocking=False)
    host = "127.0.0.1" if d.host == "0.0.0.0" else d.host
    return f"http://{host}:{d.port}{d.route_prefix.rstrip('/')}"


def smoke(url: str, d: DeployConfig, model: str, api_key: str | None = None) -> list[dict[str, str]]:
    """One real HTTP completion per prompt, retried until the app answers or `ready_timeout_s` passes."""
    import requests

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out, deadline = [], time.time() + d.ready_timeout_s
    for prompt in d.smoke_prompts:
        while True:
            try:
                r = requests.post(f"{url}/v1/completions", headers=headers, timeout=60,
                                  json={"model": model, "prompt": prompt, "max_tokens": d.smoke_max_tokens,
                                        "temperature": 0.7, "seed": 0})
                if r.status_code == 200:
                    out.append({"prompt": prompt, "completion": r.json()["choices"][0]["text"]})
                    break
                if r.status_code < 500 or time.time() > deadline:
                    raise RuntimeError(f"{url}/v1/completions answered {r.status_code}: {r.text[:300]}")
            except requests.ConnectionError:
                if time.time() > deadline:
                    raise
            time.sleep(1.0)
    return out


def run_pipeline(cfg: PipelineConfig) -> PipelineResult:
    console.setup()  # before Ray is imported
    from aigc.search import run_search

    # the trials see a plain search config: the deploy section is the pipeline's, not theirs
    result = run_search(SearchConfig.model_validate(cfg.model_dump(exclude={"deploy"})))
    if result.interrupted or not result.winner_dir:
        raise RuntimeError(f"{result.search_dir}: the search ended without a winner "
                           f"(interrupted={result.interrupted}, errors={result.errors}); see the report")
    print(f"[aigc] report: {result.report['report.html']}", flush=True)
    url = deploy(result.winner_dir, cfg.deploy)
    served = parse_args({**cfg.deploy.args, "model_dir": result.winner_dir})
    key = served.api_keys[0] if served.api_keys else None
    generations = smoke(url, cfg.deploy, served.served_name, key)
    print(f"[aigc] endpoint: {url}/v1  (OpenAI base_url; model {served.served_name!r})", flush=True)
    print(f"[aigc] try: curl {url}/v1/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{served.served_name}\", \"prompt\": \"Introducing the\", \"max_tokens\": 32}}'",
          flush=True)
    for g in generations:
        print(f"[aigc] {g['prompt']!r} -> {g['completion']!r}", flush=True)
    return PipelineResult(result.report["report.html"], result.winner_dir, url, generations)
