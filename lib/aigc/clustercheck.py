"""Check a Ray cluster launcher config (`cluster.yaml`) offline, before `ray up` spends money.

    python -m aigc.clustercheck                                  # cluster.yaml + every shipped config
    python -m aigc.clustercheck --cluster cluster.yaml jobs/configs/gpt2-zero2.yaml serve/config.yaml

Four kinds of problem, each listed (never just the first):
- schema: the config against the JSON schema Ray ships (`ray/autoscaler/ray-schema.json`), then Ray's own
  `prepare_config` + `validate_config` (what `ray up` runs before it calls the cloud);
- versions: the Docker image's Ray and Python against `pyproject.toml`;
- safety: the head holds no CPU/GPU for work, and nothing but SSH is open to the internet (the dashboard,
  the job server and Serve are reached by port-forwarding);
- capacity: `fits(config, node types)`: the Train workers of a job, the concurrent trials of a search or
  the replicas of a Serve app can be placed on the worker types within their `max_workers`, and `place`
  says which nodes the autoscaler would launch, using its own bin-packing and utilisation scorer.

Ray's validator and bin-packing are private to Ray: `aigc.raycompat` holds them (and names the Ray version
they were checked against); the node types and the packing are `aigc.placement`'s.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import ray
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from aigc import raycompat
from aigc.config import ConfigError, FinetuneConfig, build, load_config, read_yaml
from aigc.placement import (
    CLUSTER_YAML,
    NodeType,
    Resources,
    load_cluster,
    node_types,
    place,
    trial_bundles,
    worker_bundle,
)
from aigc.refresh_config import RefreshConfig
from aigc.search_config import SearchConfig, total_trials
from aigc.serving.args import deployment_options, parse_args

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

# ports a client may reach only through an SSH tunnel: GCS, Ray client, dashboard + job server, Serve
PRIVATE_PORTS = {6379: "GCS", 10001: "Ray client", 8265: "dashboard/job server", 8000: "Serve HTTP"}


def ray_schema_path() -> Path:
    """The JSON schema of cluster.yaml that the installed Ray ships."""
    return Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


# ------------------------------------------------------------------------------------------- schema


def schema_problems(cluster: Mapping[str, Any]) -> list[str]:
    """Every violation of Ray's cluster schema, named by its path, then what `ray up` checks offline."""
    schema = json.loads(ray_schema_path().read_text())
    validator = jsonschema.Draft7Validator(schema)
    out = []
    for err in sorted(validator.iter_errors(dict(cluster)), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in err.absolute_path) or "<top level>"
        out.append(f"{where}: {err.message}")
    if out:
        return out  # Ray's own checks assume a schema-valid config
    try:
        raycompat.validate_cluster_config(cluster)
    except Exception as e:  # ValueError / RuntimeError / AssertionError from Ray's checks
        out.append(f"ray validate_config: {type(e).__name__}: {e}")
    return out


# ----------------------------------------------------------------------------------------- versions

IMAGE_TAG = re.compile(
    r"^(?:[\w.-]+/)*ray(?:-ml)?:(?P<ray>\d+\.\d+\.\d+)(?:\.\w+)?-py(?P<py_major>\d)(?P<py_minor>\d+)(?:-(?P<platform>[\w]+))?$"
)


@dataclass(frozen=True)
class Image:
    where: str  # the key that names it, e.g. docker.image
    name: str
    ray: str | None = None
    python: str | None = None  # "3.11"
    platform: str | None = None  # cpu / gpu / cu128 / None


def images(cluster: Mapping[str, Any]) -> list[Image]:
    """Every Docker image the config names (global, head, worker and per-node-type)."""
    found = []
    docker = cluster.get("docker") or {}
    for key in ("image", "head_image", "worker_image"):
        if docker.get(key):
            found.append((f"docker.{key}", docker[key]))
    for name, nt in (cluster.get("available_node_types") or {}).items():
        img = (nt.get("docker") or {}).get("worker_image")
        if img:
            found.append((f"available_node_types.{name}.docker.worker_image", img))
    out = []
    for where, name in found:
        m = IMAGE_TAG.match(name)
        if m:
            out.append(Image(where, name, m["ray"], f"{m['py_major']}.{m['py_minor']}", m["platform"]))
        else:
            out.append(Image(where, name))
    return out


def read_pyproject(path: str | Path) -> dict[str, Any]:
    """pyproject.toml as a dict."""
    return tomllib.loads(Path(path).read_text())


def version_problems(cluster: Mapping[str, Any], pyproject: str | Path = "pyproject.toml") -> list[str]:
    """The images' Ray version must satisfy pyproject's `ray` requirement and their Python `requires-python`."""
    project = read_pyproject(pyproject)["project"]
    ray_req = next((Requirement(d) for d in project.get("dependencies", []) if Requirement(d).name == "ray"), None)
    py_spec = SpecifierSet(project.get("requires-python", ""))
    imgs = images(cluster)
    out = [] if imgs else ["docker.image: no Docker image, so nothing pins Ray and Python on the nodes"]
    for img in imgs:
        if img.ray is None:
            out.append(f"{img.where}: {img.name!r} does not pin a Ray version and a Python version "
                       "(expected rayproject/ray:X.Y.Z-pyXY[-gpu])")
            continue
        if ray_req is not None and not ray_req.specifier.contains(img.ray, prereleases=True):
            out.append(f"{img.where}: Ray {img.ray} in {img.name!r} is outside pyproject's {ray_req}")
        if not py_spec.contains(f"{img.python}.0", prereleases=True):
            out.append(f"{img.where}: Python {img.python} in {img.name!r} is outside requires-python {py_spec}")
    # GPU worker types need a CUDA image: the global image unless a worker_image overrides it
    by_where = {i.where: i for i in imgs}
    default = by_where.get("docker.worker_image") or by_where.get("docker.image")
    head_type = cluster.get("head_node_type")
    for name, nt in (cluster.get("available_node_types") or {}).items():
        if name == head_type or not (nt.get("resources") or {}).get("GPU"):
            continue
        img = by_where.get(f"available_node_types.{name}.docker.worker_image", default)
        if img is not None and img.platform is not None and not re.fullmatch(r"gpu|cu\d+", img.platform):
            out.append(f"available_node_types.{name}: has GPUs but runs {img.name!r}, an image without CUDA")
    return out


# ------------------------------------------------------------------------------------------- safety


def head_problems(cluster: Mapping[str, Any]) -> list[str]:
    """The head runs the control plane only: it must declare CPU 0 and no GPU, or Ray would auto-detect the
    instance's CPUs and schedule Train workers, trials and replicas there."""
    head = cluster.get("head_node_type")
    types = cluster.get("available_node_types") or {}
    if head not in types:
        return [f"head_node_type: {head!r} is not one of available_node_types"]
    res = types[head].get("resources")
    out = []
    if not isinstance(res, Mapping) or "CPU" not in res:
        out.append(f"available_node_types.{head}.resources: set CPU: 0 (unset, Ray advertises every core)")
    elif res["CPU"] != 0:
        out.append(f"available_node_types.{head}.resources.CPU: {res['CPU']} lets work land on the head; use 0")
    if isinstance(res, Mapping) and res.get("GPU", 0):
        out.append(f"available_node_types.{head}.resources.GPU: the head should hold no GPU, got {res['GPU']}")
    if types[head].get("max_workers", 0):
        out.append(f"available_node_types.{head}.max_workers: must be 0 for the head type")
    return out


def _ports(rule: Mapping[str, Any]) -> range:
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
    return range(0, 65536) if rule.get("IpProtocol") == "-1" or lo == -1 else range(lo, hi + 1)


def security_problems(cluster: Mapping[str, Any]) -> list[str]:
    """Only SSH may be reachable from outside the cluster's security group: the dashboard binds to the
    head's loopback and clients use `ray dashboard cluster.yaml` (an SSH tunnel)."""
    out = []
    provider = cluster.get("provider") or {}
    for i, rule in enumerate((provider.get("security_group") or {}).get("IpPermissions") or []):
        if rule.get("IpRanges") or rule.get("Ipv6Ranges") or rule.get("PrefixListIds"):
            ports = _ports(rule)
            if ports != range(22, 23):
                opened = [f"{p} ({what})" for p, what in PRIVATE_PORTS.items() if p in ports]
                out.append(f"provider.security_group.IpPermissions[{i}]: opens ports {ports.start}-{ports.stop - 1} "
                           f"to addresses outside the cluster{': ' + ', '.join(opened) if opened else ''}; "
                           "only SSH (22) should be")
    head_cmds = " ".join(cluster.get("head_start_ray_commands") or [])
    if "ray start" not in head_cmds:
        out.append("head_start_ray_commands: no `ray start --head` with an explicit --dashboard-host")
    else:
        host = re.search(r"--dashboard-host[= ](\S+)", head_cmds)
        if host is None or host.group(1).strip("'\"") not in ("127.0.0.1", "localhost"):
            out.append("head_start_ray_commands: the dashboard (and job server) must bind to 127.0.0.1, got "
                       f"{host.group(1) if host else 'no --dashboard-host'}")
    docker = cluster.get("docker") or {}
    for key in ("run_options", "head_run_options", "worker_run_options"):
        for opt in docker.get(key) or []:
            if re.match(r"^(-p|--publish)\b", str(opt).strip()):
                out.append(f"docker.{key}: {opt!r} publishes a port; containers use the host network already")
    return out


def storage_path(cluster: Mapping[str, Any]) -> str | None:
    """The shared storage root the cluster's runs should use (`metadata.aigc.storage_path`; Ray ignores it)."""
    return ((cluster.get("metadata") or {}).get("aigc") or {}).get("storage_path")


# ----------------------------------------------------------------------------------------- capacity


@dataclass
class Demand:
    """What a config asks of the cluster at its peak: one resource bundle per Train worker or replica."""

    source: str
    what: str  # e.g. "4 Train workers"
    bundles: list[Resources]


def _fmt(res: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in res.items() if v) + "}"


def job_demand(cfg: FinetuneConfig, source: str = "job") -> Demand:
    """A fine-tune's Train workers: `num_workers` x {CPU, GPU} (exactly what `run_finetune` asks Ray for)."""
    sc = cfg.scaling
    return Demand(source, f"{sc.num_workers} Train workers", [worker_bundle(sc) for _ in range(sc.num_workers)])


def search_demand(raw: Mapping[str, Any], source: str = "search") -> Demand:
    """A search's peak: `search.max_concurrent` trials (at least one; unset means "as many as fit", so one
    must), each its Tune actor plus its fine-tune's Train workers (`aigc.placement.trial_bundles`)."""
    cfg = build(SearchConfig, {k: v for k, v in raw.items() if k != "deploy"}, source)  # a pipeline = search + deploy
    n = min(cfg.search.max_concurrent or 1, total_trials(cfg))
    actor, workers = trial_bundles(cfg.base.scaling)
    what = (f"{n} concurrent trial(s) x ({len(workers)} Train workers + the trial's actor)"
            + ("" if cfg.search.max_concurrent else " (search.max_concurrent unset: at least one)"))
    return Demand(source, what, [dict(b) for _ in range(n) for b in (actor, *workers)])


def serve_demand(raw: Mapping[str, Any], source: str = "serve") -> Demand:
    """A Serve config's peak: every app's `max_replicas` x its `ray_actor_options`, with `deployments:`
    entries overriding what the app builder derives from `args:` (Serve's own precedence)."""
    bundles: list[Resources] = []
    parts = []
    for app in raw.get("applications") or []:
        defaults: dict[str, dict[str, Any]] = {}
        if str(app.get("import_path", "")).startswith(("aigc.serving.app:", "serve.app:")):

            opts = deployment_options(parse_args(app.get("args") or {}))
            defaults[opts["name"]] = opts
        names = set(defaults) | {d["name"] for d in app.get("deployments") or []}
        for name in sorted(names):
            d = dict(defaults.get(name, {}))
            over = next((x for x in app.get("deployments") or [] if x["name"] == name), {})
            for key in ("ray_actor_options", "autoscaling_config"):
                if key in over:
                    d[key] = {**(d.get(key) or {}), **over[key]}
            if "num_replicas" in over:
                d["num_replicas"] = over["num_replicas"]
            auto = d.get("autoscaling_config") or {}
            n = int(auto.get("max_replicas") or d.get("num_replicas") or 1)
            ao = d.get("ray_actor_options") or {}
            bundle = {"CPU": float(ao.get("num_cpus", 1)), "GPU": float(ao.get("num_gpus", 0) or 0),
                      **{k: float(v) for k, v in (ao.get("resources") or {}).items()}}
            bundles += [dict(bundle) for _ in range(n)]
            parts.append(f"{n} x {app.get('name', '?')}/{name} replicas {_fmt(bundle)}")
    return Demand(source, "; ".join(parts) or "no deployments", bundles)


def demand_of(path: str | Path) -> Demand:
    """The peak demand of a shipped config file: a Serve config, a fine-tune job, a refresh cycle or a search."""
    raw = read_yaml(path)
    source = str(path)
    if "applications" in raw:
        return serve_demand(raw, source)
    if "refresh" in raw:  # a refresh cycle's peak is its candidate's fine-tune (Serve's replicas are the serve config's)
        return job_demand(load_config(RefreshConfig, path).finetune, source)
    if set(raw) <= set(FinetuneConfig.model_fields):
        return job_demand(load_config(FinetuneConfig, path), source)
    return search_demand(raw, source)


def fits(config: Demand | FinetuneConfig | Mapping[str, Any], types: Mapping[str, NodeType],
         max_workers: int | None = None, source: str = "config") -> list[str]:
    """Problems placing a config's peak demand on the node types ([] = it fits). `config` is a Demand, a
    FinetuneConfig, a Serve config mapping (`applications:`) or a search config mapping."""
    if isinstance(config, FinetuneConfig):
        demand = job_demand(config, source)
    elif isinstance(config, Demand):
        demand = config
    elif "applications" in config:
        demand = serve_demand(config, source)
    else:
        demand = search_demand(config, source)
    plan = place(demand.bundles, types, max_workers)
    if not plan.unplaced:
        return []
    offer = ", ".join(f"{t.name} {_fmt(t.resources)} x{t.max_workers}" for t in types.values() if not t.is_head)
    kinds: dict[str, int] = {}
    for b in plan.unplaced:
        kinds[_fmt(b)] = kinds.get(_fmt(b), 0) + 1
    missing = ", ".join(f"{n} x {k}" for k, n in kinds.items())
    cap = f" (cluster max_workers={max_workers})" if max_workers is not None else ""
    return [f"{demand.source}: {demand.what}: {missing} cannot be placed on the worker types{cap}: {offer}"]


# ------------------------------------------------------------------------------------------ all of it


def shipped_configs(root: str | Path = ".") -> list[Path]:
    """Every job, search and Serve config the repository ships."""
    root = Path(root)
    found = sorted((root / "jobs" / "configs").glob("*.yaml")) + sorted((root / "tune" / "configs").glob("*.yaml"))
    return found + [p for p in [root / "serve" / "config.yaml"] if p.is_file()]


def check(cluster_path: str | Path = CLUSTER_YAML, configs: list[str | Path] | None = None,
          pyproject: str | Path | None = None) -> list[str]:
    """Every problem with a cluster.yaml and the configs meant to run on it."""
    cluster_path = Path(cluster_path)
    try:
        cluster = load_cluster(cluster_path)
    except ConfigError as e:
        return e.problems
    out = [f"{cluster_path}: {p}" for p in schema_problems(cluster)]
    root = cluster_path.resolve().parent
    out += [f"{cluster_path}: {p}" for p in version_problems(cluster, pyproject or root / "pyproject.toml")]
    out += [f"{cluster_path}: {p}" for p in head_problems(cluster) + security_problems(cluster)]
    types = node_types(cluster)
    for path in configs if configs is not None else shipped_configs(root):
        try:
            out += fits(demand_of(path), types, cluster.get("max_workers"))
        except ConfigError as e:
            out += [f"{path}: {p}" for p in e.problems]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster", default=str(CLUSTER_YAML), help="the cluster launcher config")
    p.add_argument("configs", nargs="*", help="job / search / Serve configs (default: every shipped one)")
    args = p.parse_args(argv)
    root = Path(args.cluster).parent
    configs = args.configs or shipped_configs(root)
    problems = check(args.cluster, configs)
    cluster = load_cluster(args.cluster) if Path(args.cluster).is_file() else {}
    types = node_types(cluster)
    for path in configs:
        try:
            d = demand_of(path)
        except ConfigError:
            continue
        plan = place(d.bundles, types, cluster.get("max_workers"))
        nodes = ", ".join(f"{n} x {t}" for t, n in plan.nodes.items()) or "the head"
        print(f"{path}: {d.what} -> {nodes}{'' if not plan.unplaced else ' (does NOT fit)'}")
    for line in problems:
        print(f"problem: {line}", file=sys.stderr)
    print(f"{len(problems)} problem(s)" if problems else f"{args.cluster}: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
