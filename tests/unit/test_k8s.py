"""k8s/: the RayJobs and the RayService are valid against the CRDs of the KubeRay release they target (carried in
tests/fixtures/kuberay/), run cluster.yaml's image and versions, run the shipped entry points, configs and Serve
config, and stay private: Ray token auth, secrets by reference, no public Service or Ingress."""

from __future__ import annotations

import copy
import hashlib
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.version import Version

from aigc.clustercheck import fits, images, read_pyproject, search_demand, serve_demand, version_problems
from aigc.config import ConfigError, FinetuneConfig, deep_merge, load_config, parse_overrides, read_yaml
from aigc.layout import WINNER_DIR
from aigc.placement import NodeType, load_cluster
from aigc.search_config import SearchConfig
from aigc.serving.args import DEPLOYMENT, parse_args

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CLUSTER = ROOT / "cluster.yaml"
PYPROJECT = ROOT / "pyproject.toml"
SERVE = ROOT / "serve" / "config.yaml"
DOCKERFILE = K8S / "Dockerfile"
DOCS = ROOT / "docs" / "cluster.md"
MANIFESTS = sorted(K8S.glob("*.yaml"))

KUBERAY = "1.7.0"  # the release whose CRDs the manifests are written for (docs/cluster.md installs it)
CRDS = ROOT / "tests" / "fixtures" / "kuberay" / KUBERAY
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}

APP_DIR = PurePosixPath("/home/ray/aigc")  # where k8s/Dockerfile puts the repository (cluster.yaml's ~/aigc)
ENTRY_POINTS = {"jobs/finetune.py": FinetuneConfig, "tune/search.py": SearchConfig}
TOKEN_SECRET = "aigc-ray-token"
AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL")
# serve/config.yaml -> the RayService's serveConfigV2: the GPU edits serve/config.yaml's comments prescribe, and
# the model directory in the bucket (checked against the search's storage below). Nothing else may differ.
SERVE_EDITS = {
    ("batching", "step_in_thread"): True,
    ("deployments", DEPLOYMENT, "ray_actor_options", "num_gpus"): 1,
}
# the operator's own checks that the CRD schema does not hold (ray-operator/controllers/ray/utils/validation.go)
MAX_NAME = 47  # MaxRayJobNameLength = MaxRayServiceNameLength = 53 - 6
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MIN_RAY_FOR_TOKEN_AUTH = Version("2.52.0")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2.4 MB: 0.6 s with libyaml, 3 s without


def read_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


# ------------------------------------------------------------------------------------------- helpers


def closed(schema: Any) -> Any:
    """The schema with every object that lists its `properties` closed to others: `kubectl apply` (strict field
    validation, its default) rejects an unknown field, where jsonschema would let it through and the API server
    would prune it silently (a misspelt key that does nothing)."""
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


def crd_schema(crd: dict[str, Any], version: str = "v1") -> dict[str, Any]:
    """The openAPIV3Schema of one served version of a CRD, closed (above)."""
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert ver["served"] and ver["storage"], f"{crd['metadata']['name']}: {version} is not the served storage version"
    return closed(ver["schema"]["openAPIV3Schema"])


def crd_problems(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Every violation of the schema, named by its path in the manifest."""
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<top level>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster a RayJob or RayService creates."""
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def pod_templates(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every pod template of the Ray cluster: 'head' and one per worker group."""
    spec = cluster_spec(doc)
    return {"head": spec["headGroupSpec"]["template"],
            **{g["groupName"]: g["template"] for g in spec.get("workerGroupSpecs", [])}}


def containers(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, container) for every container of every pod template, init containers included."""
    return [(f"{group}.{c['name']}", c) for group, t in pod_templates(doc).items()
            for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]]


def entrypoint(doc: dict[str, Any]) -> tuple[str, str, list[str]]:
    """A RayJob's entrypoint as (entry point, config file), both relative to the repository, and overrides."""
    python, script, flag, config, *overrides = shlex.split(doc["spec"]["entrypoint"])
    assert (python, flag) == ("python", "--config"), doc["spec"]["entrypoint"]
    return (str(PurePosixPath(script).relative_to(APP_DIR)), str(PurePosixPath(config).relative_to(APP_DIR)),
            overrides)


def job_config(doc: dict[str, Any]) -> tuple[FinetuneConfig | SearchConfig, list[str]]:
    """The config a RayJob runs, through aigc's own loader: its --config file and its overrides, and the keys
    whose object-store URI today's validation rejects. Those overrides are left out (s3:// support lands with
    the storage module), so that every other key is still checked; any other problem fails."""
    script, config, overrides = entrypoint(doc)
    model = ENTRY_POINTS[script]
    try:
        return load_config(model, ROOT / config, overrides), []
    except ConfigError as e:
        uris = {o.split("=", 1)[0] for o in overrides if "://" in o.split("=", 1)[1]}
        rejected = sorted({p.split(":", 1)[0] for p in e.problems})
        if not set(rejected) <= uris:
            raise
        kept = [o for o in overrides if o.split("=", 1)[0] not in rejected]
        return load_config(model, ROOT / config, kept), rejected


def cpus(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity ("16", 2, "500m") in CPUs."""
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def node_types_of(doc: dict[str, Any]) -> dict[str, NodeType]:
    """The Ray cluster's node types as aigc.placement reads cluster.yaml's: the resources Ray advertises (the
    container's limits, but num-cpus in rayStartParams) and each worker group's maxReplicas."""
    spec = cluster_spec(doc)
    groups = [("head", spec["headGroupSpec"], True), *((g["groupName"], g, False) for g in spec["workerGroupSpecs"])]
    out = {}
    for name, group, is_head in groups:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        res = {"CPU": cpus(group["rayStartParams"].get("num-cpus", limits["cpu"])),
               "GPU": float(limits.get("nvidia.com/gpu", 0))}
        out[name] = NodeType(name, res, group.get("minReplicas", 0), 0 if is_head else group["maxReplicas"], is_head)
    return out


def exposure_problems(doc: dict[str, Any]) -> list[str]:
    """Anything that would reach the Ray cluster from outside Kubernetes: a Service type other than ClusterIP,
    the operator's Ingress, a Service or Ingress of its own."""
    out = []
    if doc["kind"] in ("Service", "Ingress", "Route", "Gateway", "HTTPRoute"):
        out.append(f"{doc['kind']} {doc['metadata']['name']}: the manifests create no Service or Ingress of their own")
    if doc["kind"] not in CRD_FILES:
        return out
    head = cluster_spec(doc)["headGroupSpec"]
    if head.get("serviceType") != "ClusterIP":
        out.append(f"headGroupSpec.serviceType: must be ClusterIP (explicitly), got {head.get('serviceType')!r}")
    if head.get("enableIngress") is not False:
        out.append("headGroupSpec.enableIngress: must be false")
    if "ingressOptions" in head:
        out.append("headGroupSpec.ingressOptions: no Ingress")
    for key, svc in (("headGroupSpec.headService", head.get("headService")),
                     ("spec.serveService", doc["spec"].get("serveService"))):
        kind = ((svc or {}).get("spec") or {}).get("type", "ClusterIP")
        if kind != "ClusterIP":
            out.append(f"{key}.spec.type: {kind} exposes the cluster; use ClusterIP and kubectl port-forward")
    return out


def secret_problems(doc: dict[str, Any]) -> list[str]:
    """Credentials written into a manifest instead of read from a Secret: a Secret object, a credential-like
    env var with a literal value, or credentials in the entrypoint, runtime env or Serve config."""
    if doc["kind"] == "Secret":
        return [f"Secret {doc['metadata']['name']}: create it with kubectl, never commit it"]
    out = []
    for where, c in containers(doc):
        for env in c.get("env", []):
            if re.search(r"TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL|^AWS_", env["name"]):
                if "value" in env or "secretKeyRef" not in (env.get("valueFrom") or {}):
                    out.append(f"{where}.env.{env['name']}: a literal; read it from a Secret (valueFrom.secretKeyRef)")
    text = " ".join(str(doc["spec"].get(k, "")) for k in ("entrypoint", "runtimeEnvYAML", "serveConfigV2"))
    found = re.search(r"AKIA[0-9A-Z]{16}|(?i:access_key|secret_key|session_token|auth_token|AWS_[A-Z_]+)\s*[=:]", text)
    if found:
        out.append(f"spec: credentials in the entrypoint, runtime env or Serve config ({found.group(0)!r}...)")
    if doc["kind"] == "RayService" and yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"].get(
            "api_keys"):
        out.append("serveConfigV2 args.api_keys: keys in the config; use api_keys_env and a Secret")
    return out


def edited_serve_config(model_dir: str) -> dict[str, Any]:
    """serve/config.yaml with SERVE_EDITS and the given model directory: what serveConfigV2 must be."""
    raw = read_yaml(SERVE)
    (app,) = raw["applications"]
    app["args"]["model_dir"] = model_dir
    for path, value in SERVE_EDITS.items():
        if path[0] == "deployments":
            node = next(d for d in app["deployments"] if d["name"] == path[1])
            keys = path[2:]
        else:
            node, keys = app["args"], path
        for k in keys[:-1]:
            node = node[k]
        assert keys[-1] in node, f"serve/config.yaml no longer has {'.'.join(map(str, path))}"
        node[keys[-1]] = value
    return raw


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    """Every manifest under k8s/, by its metadata.name."""
    out = {}
    for path in MANIFESTS:
        for doc in read_docs(path):
            out[doc["metadata"]["name"]] = doc
    return out


@pytest.fixture(scope="module")
def crds() -> dict[str, dict[str, Any]]:
    """The carried CRDs, by the kind they define."""
    return {kind: read_docs(CRDS / name)[0] for kind, name in CRD_FILES.items()}


@pytest.fixture(scope="module")
def schemas(crds) -> dict[str, dict[str, Any]]:
    return {kind: crd_schema(crd) for kind, crd in crds.items()}


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return load_cluster(CLUSTER)


def rayjobs(docs) -> list[dict[str, Any]]:
    return [d for d in docs.values() if d["kind"] == "RayJob"]


def by_entry_point(docs, script: str) -> dict[str, Any]:
    (doc,) = [d for d in rayjobs(docs) if entrypoint(d)[0] == script]
    return doc


# --------------------------------------------------------------------------------------- the CRDs


def test_the_fixtures_are_the_named_releases_crds_unchanged(crds):
    readme = (CRDS / "README.md").read_text()
    assert f"KubeRay v{KUBERAY}" in readme
    for kind, name in CRD_FILES.items():
        assert f"https://github.com/ray-project/kuberay/blob/v{KUBERAY}/ray-operator/config/crd/bases/{name}" in readme
        digest = hashlib.sha256((CRDS / name).read_bytes()).hexdigest()
        assert f"`{name}` | " in readme and digest in readme, f"{name} differs from the sha256 in the README"
        assert crds[kind]["spec"]["names"]["kind"] == kind and crds[kind]["spec"]["group"] == "ray.io"


def test_the_manifests_are_one_finetune_one_search_and_one_service(docs):
    assert sorted(d["kind"] for d in docs.values()) == ["RayJob", "RayJob", "RayService"]
    assert sorted(entrypoint(d)[0] for d in rayjobs(docs)) == sorted(ENTRY_POINTS)


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_each_manifest_validates_against_its_crd(path, schemas):
    for doc in read_docs(path):
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in CRD_FILES, doc["kind"]
        assert crd_problems(doc, schemas[doc["kind"]]) == []


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda d: d["spec"].update(entrypoints=d["spec"].pop("entrypoint")),
         r"^spec: Additional properties are not allowed \('entrypoints' was unexpected\)"),
        (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplicas="2"),
         r"^spec\.rayClusterSpec\.workerGroupSpecs\.0\.maxReplicas: '2' is not of type 'integer'"),
        (lambda d: d["spec"]["rayClusterSpec"]["authOptions"].update(mode="Token"),
         r"^spec\.rayClusterSpec\.authOptions\.mode: 'Token' is not one of \['disabled', 'token'\]"),
        (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("name"),
         r"^spec\.rayClusterSpec\.workerGroupSpecs\.0\.template\.spec\.containers\.0: 'name' is a required property"),
        (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][0].update(
            valueFrom={"secretRef": {"name": "aigc-s3"}}),
         r"valueFrom: Additional properties are not allowed \('secretRef' was unexpected\)"),
    ],
    ids=["unknown-key", "replicas-type", "auth-mode-enum", "container-name", "env-from-shape"],
)
def test_a_broken_copy_is_rejected_with_the_field_named(docs, schemas, break_it, expected):
    edited = copy.deepcopy(by_entry_point(docs, "jobs/finetune.py"))
    break_it(edited)
    problems = crd_problems(edited, schemas["RayJob"])
    assert problems and any(re.search(expected, p) for p in problems), problems


def test_names_pass_the_operators_own_checks(docs):
    for name, doc in docs.items():
        assert DNS_1035.match(name) and len(name) <= MAX_NAME, name
        for group in cluster_spec(doc)["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], (name, group)


# --------------------------------------------------------------------------------- image, versions


def test_the_image_is_cluster_yamls_with_aigc_installed(cluster):
    """k8s/Dockerfile builds FROM cluster.yaml's image (the Ray and Python of pyproject.toml, CUDA)."""
    (base,) = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.M)
    assert base == cluster["docker"]["image"]
    assert version_problems({"docker": {"image": base}}, PYPROJECT) == []
    text = DOCKERFILE.read_text()
    assert re.search(rf"^WORKDIR {APP_DIR}$", text, re.M)
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)\s", text, re.M)
    assert {"lib/", "jobs/", "tune/", "serve/", "pyproject.toml"} <= set(copied)
    assert re.search(r"pip install .*--no-deps \.", text)  # aigc itself, over the layer of its dependencies


def test_every_pod_runs_that_image_at_the_same_ray_version(docs, cluster):
    (img,) = images(cluster)
    aigc_version = read_pyproject(PYPROJECT)["project"]["version"]
    tag = f"aigc:{aigc_version}-ray{img.ray}-py{img.python.replace('.', '')}-{img.platform}"
    for name, doc in docs.items():
        spec = cluster_spec(doc)
        assert spec["rayVersion"] == img.ray, name  # KubeRay picks its commands by this; the image must match
        for where, c in containers(doc):
            # a registry in front is the user's (docs/cluster.md); the rest pins aigc, Ray, Python and CUDA
            assert re.fullmatch(rf"(?:[\w.:-]+/)*{re.escape(tag)}", c["image"]), (name, where, c["image"])


def test_both_rayjobs_run_one_cluster_shape(docs):
    """The search's rayClusterSpec is the fine-tune's (the two files repeat it; this keeps them equal)."""
    finetune, search = by_entry_point(docs, "jobs/finetune.py"), by_entry_point(docs, "tune/search.py")
    assert cluster_spec(search) == cluster_spec(finetune)


# ------------------------------------------------------------------------------ entry points, configs


@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
def test_each_rayjob_runs_a_shipped_entry_point_and_config(docs, script):
    doc = by_entry_point(docs, script)
    _, config, overrides = entrypoint(doc)
    assert (ROOT / script).is_file() and (ROOT / config).is_file()
    assert config.startswith(f"{script.split('/')[0]}/configs/"), config
    cfg, rejected = job_config(doc)
    base = cfg.base if isinstance(cfg, SearchConfig) else cfg
    assert base.scaling.use_gpu  # the worker groups are GPU pods
    tree, problems = parse_overrides(overrides)
    assert problems == [] and all(isinstance(v, dict) for v in tree.values())
    applied = deep_merge(read_yaml(ROOT / config), tree)
    for key in rejected:  # what today's config rejected is still an override of a real key
        section, field = key.split(".", 1)
        assert field in type(cfg).model_fields[section].annotation.model_fields, key
        assert applied[section][field].startswith("s3://")


def test_runs_searches_and_the_served_model_live_in_one_bucket(docs):
    """Object storage for everything a cluster pod writes or reads; the RayService serves the search's winner."""
    finetune, search = by_entry_point(docs, "jobs/finetune.py"), by_entry_point(docs, "tune/search.py")
    run_root = parse_overrides(entrypoint(finetune)[2])[0]["run"]["storage_path"]
    search_root = parse_overrides(entrypoint(search)[2])[0]["search"]["storage_path"]
    assert run_root.startswith("s3://") and search_root.startswith("s3://")
    assert run_root.split("/")[2] == search_root.split("/")[2]  # one bucket
    name = job_config(search)[0].search.name
    (service,) = [d for d in docs.values() if d["kind"] == "RayService"]
    served = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["model_dir"]
    assert served == f"{search_root}/{name}/{WINNER_DIR}"
    for doc in docs.values():  # every Ray container has the standard AWS variables
        for where, c in containers(doc):
            assert set(AWS_ENV) <= {e["name"] for e in c.get("env", [])}, (doc["metadata"]["name"], where)


@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
def test_todays_config_takes_the_s3_storage(docs, script):
    cfg, rejected = job_config(by_entry_point(docs, script))
    assert rejected == []
    storage = cfg.search.storage_path if isinstance(cfg, SearchConfig) else cfg.run.storage_path
    assert storage.startswith("s3://")


def test_each_cluster_holds_its_jobs_peak_demand(docs):
    """The worker groups' maxReplicas hold the Train workers of the fine-tune, a search's trial (as many as
    the search plans at most) and every replica of the Serve app: with the same bin-packing as cluster.yaml's
    check (`aigc.clustercheck.fits`, which says which node types the autoscaler would add)."""
    finetune, search = by_entry_point(docs, "jobs/finetune.py"), by_entry_point(docs, "tune/search.py")
    cfg = job_config(finetune)[0]
    assert fits(cfg, node_types_of(finetune), source="rayjob-finetune") == []
    scfg = job_config(search)[0]
    raw = scfg.model_dump(mode="json")
    types = node_types_of(search)
    assert fits(search_demand(raw, "rayjob-search"), types) == []
    # all 4 concurrent trials the docs promise (2 a pod, 2 pods) fit at once
    raw["search"]["max_concurrent"] = 4
    assert fits(search_demand(raw, "rayjob-search x4"), types) == []
    (service,) = [d for d in docs.values() if d["kind"] == "RayService"]
    demand = serve_demand(yaml.safe_load(service["spec"]["serveConfigV2"]), "rayservice")
    assert demand.bundles and all(b["GPU"] == 1 for b in demand.bundles)
    assert fits(demand, node_types_of(service)) == []


# -------------------------------------------------------------------------------------------- Serve


def test_the_service_runs_serve_config_yaml_with_the_gpu_edits(docs):
    (service,) = [d for d in docs.values() if d["kind"] == "RayService"]
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    model_dir = serve["applications"][0]["args"]["model_dir"]
    assert serve == edited_serve_config(model_dir)  # app name, import path, args, deployment options
    args = parse_args(serve["applications"][0]["args"])  # the app builder's own validation
    assert args.device == "auto" and args.api_keys == [] and args.api_keys_env == "AIGC_API_KEYS"
    assert serve["http_options"]["host"] == "0.0.0.0"  # reachable by the operator's serve Service (ClusterIP)


def test_a_drifted_serve_config_is_caught(docs):
    (service,) = [d for d in docs.values() if d["kind"] == "RayService"]
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    serve["applications"][0]["deployments"][0]["autoscaling_config"]["max_replicas"] = 8
    assert serve != edited_serve_config(serve["applications"][0]["args"]["model_dir"])
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    serve["applications"][0]["import_path"] = "serve.app:app_builder"
    assert serve != edited_serve_config(serve["applications"][0]["args"]["model_dir"])


def test_upgrades_keep_serving(docs):
    """A new serveConfigV2 rolls replicas (max_surge_percent 100: new ones first); a new cluster config brings
    up a second cluster and switches to it when its app is healthy."""
    (service,) = [d for d in docs.values() if d["kind"] == "RayService"]
    assert service["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve["applications"][0]["deployments"][0]["max_surge_percent"] == 100


# ------------------------------------------------------------------------------- autoscaling, safety


def test_gpu_worker_groups_autoscale_like_cluster_yamls_types(docs, cluster):
    """Each worker group mirrors a cluster.yaml worker type (its GPUs a pod, at most its max_workers), from zero
    or from what Serve always keeps; the head holds no CPU for work; idle pods go after cluster.yaml's timeout."""
    types = cluster["available_node_types"]
    for name, doc in docs.items():
        spec = cluster_spec(doc)
        assert spec["enableInTreeAutoscaling"] is True, name
        assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == cluster["idle_timeout_minutes"] * 60, name
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert "nvidia.com/gpu" not in limits, name
        for group in spec["workerGroupSpecs"]:
            mirrored = types[group["groupName"].replace("-", "_")]
            res = group["template"]["spec"]["containers"][0]["resources"]
            assert int(res["limits"]["nvidia.com/gpu"]) == mirrored["resources"]["GPU"], (name, group["groupName"])
            assert res["requests"] == res["limits"], (name, group["groupName"])  # Guaranteed QoS: Ray sees what it gets
            assert 0 < group["maxReplicas"] <= mirrored["max_workers"], (name, group["groupName"])
    (service,) = [d for d in docs.values() if d["kind"] == "RayService"]
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["deployments"][0]
    (group,) = cluster_spec(service)["workerGroupSpecs"]
    auto = serve["autoscaling_config"]
    assert group["minReplicas"] == auto["min_replicas"] and group["maxReplicas"] == auto["max_replicas"]


def test_token_auth_on_every_cluster(docs):
    for name, doc in docs.items():
        spec = cluster_spec(doc)
        assert spec["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}, name
        assert Version(spec["rayVersion"]) >= MIN_RAY_FOR_TOKEN_AUTH  # the operator refuses token auth below
        for where, c in containers(doc):
            # the operator sets both from the Secret in every container; one set here would win over it
            assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & {e["name"] for e in c.get("env", [])}, (name, where)


def test_nothing_is_reachable_from_outside_the_cluster(docs):
    for name, doc in docs.items():
        assert exposure_problems(doc) == [], name


def test_an_exposed_cluster_is_reported(docs):
    (service,) = [copy.deepcopy(d) for d in docs.values() if d["kind"] == "RayService"]
    head = cluster_spec(service)["headGroupSpec"]
    head.update(serviceType="LoadBalancer", enableIngress=True)
    service["spec"]["serveService"] = {"spec": {"type": "NodePort"}}
    problems = exposure_problems(service)
    assert len(problems) == 3, problems
    assert "LoadBalancer" in problems[0] and "enableIngress" in problems[1] and "NodePort" in problems[2]
    ingress = {"kind": "Ingress", "metadata": {"name": "aigc"}}
    assert exposure_problems(ingress) == ["Ingress aigc: the manifests create no Service or Ingress of their own"]


def test_secrets_are_referenced_never_inlined(docs):
    for name, doc in docs.items():
        assert secret_problems(doc) == [], name
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for d in docs.values() for _, c in containers(d)
            for e in c.get("env", []) if "valueFrom" in e}
    assert refs == {"aigc-s3", "aigc-api-keys"}  # and aigc-ray-token through authOptions: what docs/cluster.md creates


def test_an_inlined_secret_is_reported(docs):
    doc = copy.deepcopy(by_entry_point(docs, "jobs/finetune.py"))
    container = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI"}]
    doc["spec"]["entrypoint"] += " RAY_AUTH_TOKEN=abc"
    problems = secret_problems(doc)
    assert len(problems) == 2, problems
    assert problems[0].startswith("head.ray-head.env.AWS_SECRET_ACCESS_KEY: a literal")
    assert "credentials in the entrypoint" in problems[1]
    assert secret_problems({"kind": "Secret", "metadata": {"name": "aigc-s3"}})


# ------------------------------------------------------------------------------------- the walk-through


def test_the_walk_through_names_what_the_manifests_create(docs):
    """docs/cluster.md's Kubernetes commands: the operator release the CRDs come from, the files, the names
    KubeRay derives (<RayJob> for the submitter Job, <name>-head-svc, <RayService>-serve-svc), and Secrets with
    every key the manifests read."""
    text = DOCS.read_text().split("## On Kubernetes", 1)[1]
    assert f"helm install kuberay-operator kuberay/kuberay-operator --version {KUBERAY}" in text
    for path in re.findall(r"\bk8s/[\w.*-]+", text):
        assert list(ROOT.glob(path)), path  # a file, or a glob that matches some
    jobs = {d["metadata"]["name"] for d in rayjobs(docs)}
    (service,) = [d["metadata"]["name"] for d in docs.values() if d["kind"] == "RayService"]
    assert set(re.findall(r"\bjob/([\w-]+)", text)) == jobs
    assert set(re.findall(r"svc/([\w-]+)-head-svc", text)) <= jobs | {service}
    assert set(re.findall(r"svc/([\w-]+)-serve-svc", text)) == {service}
    assert set(re.findall(r"rayservice[/ ]([a-z][\w-]*)", text)) == {service}
    created = {name: set(re.findall(r"--from-(?:literal|file)=(\w+)=", flags))
               for name, flags in re.findall(r"kubectl create secret generic ([\w-]+)((?:\s*\\?\s*--from-\S+)+)", text)}
    needed: dict[str, set[str]] = {TOKEN_SECRET: {"auth_token"}}  # KubeRay reads this key (authOptions.secretName)
    for doc in docs.values():
        for _, c in containers(doc):
            for env in c.get("env", []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    needed.setdefault(ref["name"], set()).add(ref["key"])
    assert set(created) == set(needed)
    for name, keys in needed.items():
        assert keys <= created[name], (name, keys - created[name])
