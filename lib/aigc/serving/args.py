"""The Serve app's arguments: what `aigc serve`, `serve run ... key=value`, serve/config.yaml's `args:` and
the pipeline's `deploy.args` set.

Pure pydantic on top of `aigc.config`, so the cluster check and the pipeline read these without
importing FastAPI, Ray or torch (tests/unit/test_serving_api.py holds it to that).
"""

import os
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from aigc.config import ConfigError, Strict, build, deep_merge, parse_overrides

DEPLOYMENT = "Model"  # the model's deployment (Serve configs' `deployments:` entries use it)
ROUTER = "Router"  # the ingress in front of it when adapters are served (see aigc.serving.app)
ADAPTER_SEP = ":"  # "<base>:<adapter>" is an adapter's model id (Ray Serve LLM's convention)
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a folder name that is safe in a model id and a path


class LimitsArgs(Strict):
    """What one request may ask for; anything beyond is a 4xx that names the field."""

    max_tokens: int = Field(256, ge=1, description="cap on a request's max_tokens")
    default_max_tokens: int = Field(16, ge=1, description="max_tokens when a request gives none (OpenAI: 16)")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="cap on a prompt's tokens; None = the model's positions - 1"
    )
    max_prompt_chars: int = Field(32_768, ge=1, description="cap on a prompt's characters (checked before tokenizing)")
    max_prompts: int = Field(8, ge=1, description="prompts in one request (`prompt` may be a list)")
    max_n: int = Field(8, ge=1, description="cap on a request's `n` and `best_of` (choices per prompt)")
    max_logprobs: int = Field(
        5, ge=0, le=20, description="cap on `logprobs` (completions) and `top_logprobs` (chat): alternatives per token"
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="cap on the request body; larger -> 413")
    # a real request nests 4 deep (messages[i].content); 100,000 levels once crashed the JSON decoder
    max_json_depth: int = Field(32, ge=4, le=500, description="cap on the request body's JSON nesting depth")


class BatchingArgs(Strict):
    """Continuous batching: each decode step runs every running request in one forward, and requests
    that arrived meanwhile join at the next step (prefilled together, then merged into the batch)."""

    max_batch_size: int = Field(32, ge=1, description="requests decoding at once; more wait for a free row")
    step_in_thread: bool = Field(
        False,
        description="run steps in a worker thread: the HTTP loop stays responsive during long steps (large "
        "models, GPUs) at the cost of a thread hop per step (~1 ms on a busy CPU, so off for small models)",
    )


class AutoscalingArgs(Strict):
    """Serve's request-based autoscaler (`autoscaling_config`); replicas follow ongoing requests."""

    min_replicas: int = Field(1, ge=0, description="replicas kept at the quietest (0 lets the app scale to zero)")
    max_replicas: int = Field(2, ge=1, description="replicas at the busiest; the cluster check sizes nodes for these")
    initial_replicas: int | None = Field(None, ge=0, description="replicas at deploy time; None = min_replicas")
    # a replica decodes up to max_batch_size rows per step at little more than the cost of one, so it
    # is "busy" only well above 2 ongoing requests (Serve's default)
    target_ongoing_requests: float = Field(8.0, gt=0.0, description="ongoing requests per replica Serve aims for")
    upscale_delay_s: float = Field(10.0, ge=0.0, description="how long demand must stay high before adding replicas")
    downscale_delay_s: float = Field(60.0, ge=0.0, description="how long demand must stay low before removing replicas")
    look_back_period_s: float | None = Field(None, gt=0.0, description="averaging window; None = Serve's (30 s)")
    metrics_interval_s: float | None = Field(None, gt=0.0, description="metric push period; None = Serve's (10 s)")


class ModerationArgs(Strict):
    """The moderation hook on prompts and outputs; a hit answers `finish_reason: "content_filter"`."""

    blocked_terms: list[str] = Field(default_factory=list, description="the default hook: a block list")
    case_sensitive: bool = Field(False, description="match blocked_terms case-sensitively")
    hook: str | None = Field(
        None, description="'module:factory' returning a Moderator; called with `options` as keyword arguments"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the hook's factory")


class ServeArgs(Strict):
    """Everything the app builder takes: `aigc serve`, `serve run ... key=value` and serve/config.yaml."""

    model_dir: str = Field(..., min_length=1, description="an exported aigc model directory (verified on load): a "
                           "path, or an object-store URI (s3://..., gs://...) each replica downloads to its cache")
    model_name: str | None = Field(None, description="the id clients send as `model`; None = the directory name")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the replica has a GPU")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the loaded weights; auto = as saved, for either engine"
    )
    torch_threads: int = Field(1, ge=1, description="intra-op threads per replica (1 CPU replica = 1 thread)")
    engine: Literal["auto", "aigc", "vllm"] = Field(
        "auto", description="what generates in a model replica: aigc's continuous batching, or vLLM's async engine "
        "(aigc.serving.vllm_engine); auto: vLLM where the replica has a GPU and vLLM is installed, else aigc"
    )
    vllm_python: str | None = Field(
        None, description="the Python of a vLLM serving environment (`make vllm-env`: .venv-vllm/bin/python) the "
        "model replicas run in (Ray runtime_env py_executable); None: the replicas' own environment"
    )
    vllm_args: dict[str, Any] = Field(
        default_factory=dict, description="extra vLLM engine arguments (AsyncEngineArgs), e.g. gpu_memory_utilization"
    )
    limits: LimitsArgs = Field(default_factory=LimitsArgs, description="caps on what one request may ask for")
    batching: BatchingArgs = Field(default_factory=BatchingArgs, description="continuous batching in a replica")
    autoscaling: AutoscalingArgs = Field(default_factory=AutoscalingArgs, description="Serve's autoscaling_config")
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs per replica")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per replica; > 0 makes the cluster autoscaler add GPU nodes")
    max_ongoing_requests: int = Field(64, ge=1, description="requests a replica holds at once (>= one full batch)")
    max_queued_requests: int = Field(256, ge=-1, description="requests queued at each proxy; beyond -> 503; -1 = no cap")
    max_surge_percent: int = Field(
        100, ge=0, le=100, description="extra replicas during a redeploy; > 0 keeps old ones serving until new are ready"
    )
    graceful_shutdown_timeout_s: float = Field(60.0, gt=0.0, description="time a stopping replica gets to finish")
    health_check_period_s: float = Field(10.0, gt=0.0, description="Serve calls check_health (one real token)")
    api_keys: list[str] = Field(default_factory=list, description="accepted Bearer keys; none and no env -> open")
    api_keys_env: str | None = Field("AIGC_API_KEYS", description="env var (on the replicas) with comma-separated keys")
    log_prompts: bool = Field(False, description="log prompt and output text (off: only counts and timings)")
    moderation: ModerationArgs = Field(default_factory=ModerationArgs, description="the prompt and output hook")
    adapters: list[str] = Field(
        default_factory=list, description="LoRA adapter model directories served on this base, each as model "
        "'<model_name>:<directory name>'; each must record this base's fingerprint (checked before serving)"
    )
    adapter_folder: str | None = Field(
        None, description="a folder of adapter model directories, each served as '<model_name>:<its name>'; looked up "
        "when requested, so an adapter copied in later is served without a redeploy"
    )
    max_adapters_per_replica: int = Field(
        8, ge=1, description="adapters a replica keeps loaded (Serve multiplexing, least recently used unloaded first)"
    )

    def problems(self) -> list[str]:
        """Problems between fields (one field's own range is checked by its type), each named by its key."""
        out = []
        a, lim = self.autoscaling, self.limits
        if lim.default_max_tokens > lim.max_tokens:
            out.append(f"limits.default_max_tokens: {lim.default_max_tokens} > limits.max_tokens={lim.max_tokens}")
        if a.min_replicas > a.max_replicas:
            out.append(f"autoscaling.min_replicas: {a.min_replicas} > autoscaling.max_replicas={a.max_replicas}")
        if a.initial_replicas is not None and not a.min_replicas <= a.initial_replicas <= a.max_replicas:
            out.append(f"autoscaling.initial_replicas: {a.initial_replicas} is outside [min_replicas, max_replicas]")
        if self.device == "cuda" and self.num_gpus == 0:
            out.append("num_gpus: device is 'cuda' but num_gpus=0 (the replica would get no GPU)")
        if self.engine == "vllm" and self.serves_adapters:
            out.append("engine: vllm serves one model per app (an adapter-only model_dir is served merged); "
                       "adapters and adapter_folder, many adapters on one base, need engine aigc")
        if self.vllm_python is not None and self.engine == "aigc":
            out.append("vllm_python: set, but engine is 'aigc'; use engine vllm (or auto) with it")
        if self.moderation.hook and ":" not in self.moderation.hook:
            out.append(f"moderation.hook: expected 'module:factory', got {self.moderation.hook!r}")
        if ADAPTER_SEP in self.served_name and self.serves_adapters:
            out.append(f"model_name: {self.served_name!r} holds {ADAPTER_SEP!r}, which separates base and adapter "
                       "in a model id")
        seen: dict[str, int] = {}
        for i, path in enumerate(self.adapters):
            name = adapter_name(path)
            if not ADAPTER_NAME.fullmatch(name):
                out.append(f"adapters[{i}]: directory name {name!r} is not a usable adapter name (letters, digits, "
                           "'.', '_', '-'; at most 128)")
            elif name in seen:
                out.append(f"adapters[{i}]: name {name!r} is also adapters[{seen[name]}]'s; adapters are named by "
                           "their directory names, which must differ")
            seen.setdefault(name, i)
        return out

    @property
    def serves_adapters(self) -> bool:
        """Whether the app serves adapters (a router in front of the model's replicas then reads `model`)."""
        return bool(self.adapters) or self.adapter_folder is not None

    @property
    def served_name(self) -> str:
        """The id clients send as `model`: model_name, else the model directory's name."""
        return self.model_name or os.path.basename(os.path.normpath(self.model_dir)) or "model"


def adapter_name(path: str) -> str:
    """An adapter's name: its directory's name."""
    return os.path.basename(os.path.normpath(path))


def adapter_model_id(base: str, adapter: str) -> str:
    """The id clients send for `adapter` served on `base`: "<base>:<adapter>"."""
    return f"{base}{ADAPTER_SEP}{adapter}"


def split_model_id(model: str, base: str) -> str | None:
    """The adapter a model id names on `base` (None for the base itself); a KeyError for an id of another base."""
    if model == base:
        return None
    prefix = f"{base}{ADAPTER_SEP}"
    if not model.startswith(prefix):
        raise KeyError(model)
    return model[len(prefix):]


PATH_KEYS = ("model_dir", "model_name", "adapter_folder", "vllm_python")  # strings taken as they are, not parsed as YAML


def parse_args(raw: Mapping[str, Any] | ServeArgs) -> ServeArgs:
    """App-builder arguments -> ServeArgs. Nested YAML (serve/config.yaml) and flat `a.b=value` strings
    (`serve run ... autoscaling.max_replicas=4`) both work; every problem is reported at once."""
    if isinstance(raw, ServeArgs):
        return raw
    tree: dict[str, Any] = {}
    overrides = []
    for key, value in raw.items():
        if isinstance(value, str) and key not in PATH_KEYS:
            overrides.append(f"{key}={value}")  # CLI strings parse as YAML scalars: "4" -> 4, "true" -> True
        else:
            tree = deep_merge(tree, _nest(key, value))
    parsed, problems = parse_overrides(overrides)
    if problems:
        raise ConfigError(problems, "serve args")
    return build(ServeArgs, deep_merge(tree, parsed), "serve args")


def _nest(key: str, value: Any) -> dict[str, Any]:
    """"a.b" -> {"a": {"b": value}}."""
    for part in reversed(key.split(".")[1:]):
        value = {part: value}
    return {key.split(".")[0]: value}


# Serve's own options: changing only these is a lightweight update (replicas keep running, no reload)
DEPLOYMENT_FIELDS = {
    "num_cpus", "num_gpus", "max_ongoing_requests", "max_queued_requests", "max_surge_percent",
    "graceful_shutdown_timeout_s", "health_check_period_s", "autoscaling",
}
# what the router reads; changing anything else leaves it running
ROUTER_FIELDS = {"model_dir", "model_name", "adapters", "adapter_folder", "limits", "api_keys", "api_keys_env"}


def deployment_options(args: ServeArgs) -> dict[str, Any]:
    """Serve deployment options from the args (a `deployments:` entry in a Serve config file overrides them)."""
    return {
        "name": DEPLOYMENT,
        "ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus,
                              # the model replicas run in the vLLM environment's Python (Serve's proxy and
                              # controller stay in the cluster's own)
                              **({"runtime_env": {"py_executable": args.vllm_python}} if args.vllm_python else {})},
        "autoscaling_config": args.autoscaling.model_dump(exclude_none=True),
        "max_ongoing_requests": args.max_ongoing_requests,
        "max_queued_requests": args.max_queued_requests,
        "max_surge_percent": args.max_surge_percent,
        "graceful_shutdown_timeout_s": args.graceful_shutdown_timeout_s,
        "health_check_period_s": args.health_check_period_s,
    }


def router_options(args: ServeArgs) -> dict[str, Any]:
    """Serve options of the router in front of the model's replicas: no CPU of its own (it parses a body and
    forwards it), scaled like the replicas, holding every request they hold (it streams each one back)."""
    opts = deployment_options(args)
    return {**opts, "name": ROUTER, "ray_actor_options": {"num_cpus": 0},
            "max_ongoing_requests": args.max_ongoing_requests * args.autoscaling.max_replicas}
