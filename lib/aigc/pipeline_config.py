"""The whole-loop job's config: a search config (`base`, `space`, `search`) plus how the winner is deployed.

Importable without Ray, torch or FastAPI: the job checks a config before anything heavy loads.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from aigc.config import ConfigError, Strict
from aigc.search_config import SearchConfig
from aigc.serving.args import ADAPTER_NAME, parse_args

WINNER_PLACEHOLDER = "<winner>"


class DeploySection(Strict):
    """How the winner is served once the search is done."""

    app_name: str = Field("aigc", description="Serve application name; deploying again updates it in place")
    route_prefix: str = Field("/", pattern=r"^/", description="HTTP route prefix of the app (its /v1 lives under it)")
    host: str = Field("127.0.0.1", description="HTTP host of Serve's ingress (HAProxy, or Serve's proxy; 0.0.0.0 to listen on all interfaces)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Serve's ingress")
    args: dict[str, Any] = Field(
        default_factory=dict, description="ServeArgs fields (see aigc.serving.args) except model_dir, e.g. num_cpus; "
        "with as_adapter only api_keys is read (the key the smoke requests send: the running app keeps its args)"
    )
    smoke_prompts: list[str] = Field(default_factory=lambda: ["Introducing the", "Save", "Limited time:"], min_length=1,
                                     description="prompts sent to /v1/completions after deploying (data.format text)")
    smoke_examples: int = Field(3, ge=1, le=50, description="test-split prompts (task formats) sent after deploying: "
                                "chat rows to /v1/chat/completions, prompt_completion rows to /v1/completions")
    smoke_max_tokens: int = Field(96, ge=1, description="max_tokens of each smoke request (an embedded ad is <= 90)")
    ready_timeout_s: float = Field(300.0, gt=0, description="how long the app may take to become healthy")
    keep_serving: bool = Field(False, description="stay in the foreground serving until Ctrl-C (local Ray dies with us)")
    as_adapter: bool = Field(
        False, description="deploy the winner (a LoRA run's) as an adapter onto the running app `app_name`: copied "
        "into that app's adapter_folder and served by its replicas as '<base>:<adapter_name>', no new replica; "
        "false: serve the merged winner as the app (deployed or updated in place)"
    )
    adapter_name: str | None = Field(
        None, pattern=f"^{ADAPTER_NAME.pattern}$",
        description="the adapter's name with as_adapter (its model id is '<base>:<adapter_name>'); None = search.name"
    )

    def problems(self, who: str = "pipeline (the search's winner)") -> list[str]:
        """`args` checked as ServeArgs, with the model directory that `who` deploys filled in."""
        if "model_dir" in self.args:
            return [f"deploy.args.model_dir: set by the {who}; remove it"]
        try:
            parse_args({**self.args, "model_dir": WINNER_PLACEHOLDER})
        except ConfigError as e:
            return [f"deploy.args.{p}" for p in e.problems]
        return []


class PipelineConfig(SearchConfig):
    """A search config (`base`, `space`, `search`) plus how to deploy the winner."""

    deploy: DeploySection = Field(default_factory=DeploySection, description="how the winner is served once the search is done")

    def problems(self) -> list[str]:
        out = super().problems()
        if self.deploy.as_adapter and self.base.model.peft.method != "lora":
            out.append(f"deploy.as_adapter: the winner must be a LoRA adapter, but base.model.peft.method is "
                       f"{self.base.model.peft.method!r}; set it to lora")
        return out + self.deploy.problems()
