"""Offline validation of the KServe manifests in k8s/kserve/ (issue 27): no cluster, no KServe, no Docker.

- every object under k8s/kserve/ (the canary/ step included) passes its schema: the InferenceService CRD's
  openAPIV3Schema (tests/data/k8s/, unknown fields rejected) or kubernetes-validate for core kinds;
- checkov: it knows no InferenceService, so the predictor pods are rendered as KServe builds them (the
  ClusterServingRuntime's container, tests/data/k8s/kserve-*.yaml, with the model spec merged over it) and scanned,
  and test_k8s.py's pod hardening check runs on them;
- consistency, as ``check_*`` functions that return problems: the canary step against the stable service and
  registry.py, each service against its runtime, the TorchServe config KServe gets against the repo's, GPUs, the
  protocol table of k8s/README.md; each also runs on a broken copy;
- `kubectl apply -f k8s` reads exactly what it read before (the new folder is below it);
- the folder that scripts/kserve.py writes loads in a real TorchServe 0.12 with that config (slow, trained).
"""

import base64
import copy
import json
import re
import shutil
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pytest
import yaml

import registry
from scripts import kserve
from scripts.server import TorchServe
from tests.k8s import test_k8s as k8s_checks
from tests.k8s.test_k8s import (  # noqa: F401 (broken_k8s is a fixture)
    CLUSTER_ONLY_SETTINGS,
    CRD_FILES,
    CRDS,
    K8S,
    MANIFEST_SUFFIXES,
    ROOT,
    _delete,
    _set,
    archive_table,
    broken_k8s,
    check_apply_set,
    check_base_lists_every_manifest,
    check_pod_hardening,
    checkov,
    containers,
    differences,
    gpu_request,
    load_bundle,
    load_docs,
    manifest_files,
    matches,
    named,
    namespace_of,
    of_kind,
    parse_properties,
    pod_labels,
    pod_spec,
    ref,
    schema_problems,
)

KSERVE = K8S / "kserve"
NAMESPACE = "torchserve-kserve"
STABLE, CANARY, TRITON = "10-torchserve.yaml", "canary/10-torchserve.yaml", "20-triton.yaml"
KSERVE_CRDS = {("serving.kserve.io", "InferenceService"): "serving.kserve.io_inferenceservices.yaml",
               ("serving.kserve.io", "ClusterServingRuntime"): "serving.kserve.io_clusterservingruntimes.yaml"}
RUNTIMES = {"kserve-torchserve": "kserve-torchserve.yaml", "kserve-tritonserver": "kserve-tritonserver.yaml"}
MOUNT = PurePosixPath("/mnt/models")  # where KServe's storage-initializer puts the storageUri
WRAPPER_PORT = 8085  # where KServe's TorchServe wrapper expects TorchServe (pytorch/serve kubernetes/kserve)
MODEL_ONLY_FIELDS = {"modelFormat", "runtime", "runtimeVersion", "protocolVersion", "storageUri", "storage"}
PREDICTOR_ONLY_FIELDS = {"model", "minReplicas", "maxReplicas", "canaryTrafficPercent", "scaleMetric", "scaleTarget",
                         "scaleMetricType", "containerConcurrency", "timeout", "annotations", "labels", "logger",
                         "batcher", "autoScaling", "deploymentStrategy", "storageUris", "workerSpec"}
CANARY_FIELDS = {".spec.predictor.canaryTrafficPercent", ".spec.predictor.model.storageUri"}
# Settings in which KServe's config.properties may differ from the repo's, beyond the cluster's (test_k8s.py).
KSERVE_ONLY_SETTINGS = CLUSTER_ONLY_SETTINGS | {
    "grpc_inference_port", "grpc_management_port",  # stated for the wrapper, which reads them
    "enable_metrics_api",  # TorchServe's default, stated as KServe's docs ask
}


# --------------------------------------------------------------------------------------------------
# Loading and rendering
# --------------------------------------------------------------------------------------------------

def kserve_files(folder=KSERVE):
    """Every manifest under k8s/kserve/, sub-folders included (the canary step is one level down)."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in MANIFEST_SUFFIXES)


def load_kserve(folder=KSERVE):
    """Every object under ``folder``, the canary step included."""
    return [doc for path in kserve_files(folder) for doc in load_docs(path)]


def service(folder, file):
    """The one InferenceService of ``folder/file``."""
    found = of_kind(load_docs(Path(folder) / file), "InferenceService")
    assert len(found) == 1, f"{file}: expected one InferenceService, found {len(found)}"
    return found[0]


def kserve_schema_problems(objs):
    """test_k8s.py's schema validation, with KServe's CRDs among the custom resources it knows."""
    with pytest.MonkeyPatch.context() as patch:
        for key, file in KSERVE_CRDS.items():
            patch.setitem(CRD_FILES, key, file)
        return schema_problems(objs)


def runtime(name):
    """The ClusterServingRuntime KServe installs under ``name`` (copy in tests/data/k8s/)."""
    if name not in RUNTIMES:
        raise KeyError(f"no ClusterServingRuntime {name!r} (known: {', '.join(RUNTIMES)})")
    return load_docs(CRDS / RUNTIMES[name])[0]


def merged(base, override):
    """Maps merged key by key, anything else replaced: a strategic merge patch on a container's fields."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{key: merged(base.get(key), value) for key, value in override.items()}}
    return copy.deepcopy(override)


def predictor_container(isvc):
    """The predictor container as KServe's MergeRuntimeContainers builds it: the model spec's container fields over
    the runtime's, env merged by name, args appended to the runtime's."""
    model = isvc["spec"]["predictor"]["model"]
    base = runtime(model.get("runtime"))["spec"]["containers"][0]
    fields = {key: value for key, value in model.items() if key not in MODEL_ONLY_FIELDS}
    container = merged(base, fields)
    container["args"] = base.get("args", []) + model.get("args", [])
    env = {e["name"]: e for e in base.get("env", []) + model.get("env", [])}
    container["env"] = list(env.values())
    return container


def predictor_deployment(isvc):
    """The predictor pod as a Deployment with KServe's pod labels, for checkov and test_k8s.py's pod checks (without
    what KServe, Knative and the mesh add: storage-initializer, queue-proxy, sidecars)."""
    pod = {key: value for key, value in isvc["spec"]["predictor"].items() if key not in PREDICTOR_ONLY_FIELDS}
    pod["containers"] = [predictor_container(isvc)]
    labels = {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"], "component": "predictor"}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": f"{isvc['metadata']['name']}-predictor", "namespace": namespace_of(isvc),
                         "labels": labels},
            "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": pod}}}


def storage_variant(isvc):
    """The A/B variant whose folder the storageUri names (its last path segment: .../kserve/a)."""
    return PurePosixPath(urlparse(isvc["spec"]["predictor"]["model"]["storageUri"]).path).name


def option(args, name):
    """The value of ``--name=value`` in a command line, or None."""
    return next((arg.split("=", 1)[1] for arg in args if arg.startswith(f"{name}=")), None)


def comment_above(text, key):
    """The comment lines directly above ``key=`` in a .properties text, joined."""
    lines = text.splitlines()
    index = next((i for i, line in enumerate(lines) if line.startswith(f"{key}=")), None)
    if index is None:
        return ""
    comment = []
    for line in reversed(lines[:index]):
        if not line.startswith("#"):
            break
        comment.insert(0, line.lstrip("# "))
    return " ".join(comment)


# --------------------------------------------------------------------------------------------------
# Consistency checks: each returns a list of problems, empty when everything agrees
# --------------------------------------------------------------------------------------------------

def check_runtime(isvc):
    """The named ClusterServingRuntime exists and supports the model format and protocol asked for."""
    model = isvc["spec"]["predictor"]["model"]
    try:
        spec = runtime(model.get("runtime"))["spec"]
    except KeyError as e:
        return [f"{ref(isvc)}: {e.args[0]}"]
    problems = []
    formats = {f["name"] for f in spec["supportedModelFormats"]}
    if model["modelFormat"]["name"] not in formats:
        problems.append(f"{ref(isvc)}: runtime {model['runtime']} serves {sorted(formats)}, "
                        f"not {model['modelFormat']['name']}")
    if model.get("protocolVersion") not in spec["protocolVersions"]:
        problems.append(f"{ref(isvc)}: runtime {model['runtime']} speaks {spec['protocolVersions']}, "
                        f"not {model.get('protocolVersion')}")
    return problems


def check_canary(stable, canary):
    """The canary step is the stable InferenceService (same object, so applying it makes a new revision of it) with
    another folder and a traffic share; the CRD leaves canaryTrafficPercent unbounded, so the range is checked here."""
    problems = []
    if (ref(stable), namespace_of(stable)) != (ref(canary), namespace_of(canary)):
        problems.append(f"{CANARY}: {ref(canary)} in {namespace_of(canary)} is not {ref(stable)} in "
                        f"{namespace_of(stable)}: applying it would add a service, not a revision")
    percent = canary["spec"]["predictor"].get("canaryTrafficPercent")
    if not isinstance(percent, int) or isinstance(percent, bool) or not 0 <= percent <= 100:
        problems.append(f"{CANARY}: canaryTrafficPercent {percent!r} is not a share of 0 to 100 %")
    if "canaryTrafficPercent" in stable["spec"]["predictor"]:
        problems.append(f"{STABLE}: the stable revision sets canaryTrafficPercent")
    extra = [path for path in differences(stable, canary) if path not in CANARY_FIELDS]
    if extra:
        problems.append(f"{CANARY} differs from {STABLE} beyond storageUri and canaryTrafficPercent at: "
                        f"{', '.join(extra)}")
    return problems


def check_variants(stable, canary, archives):
    """The stable service serves variant a's folder and the canary variant b's, under one storage prefix; the canary
    changes exactly the models with a registry.py candidate, to that version, and every version is registered."""
    problems = []
    uris = [s["spec"]["predictor"]["model"]["storageUri"] for s in (stable, canary)]
    variants = [storage_variant(s) for s in (stable, canary)]
    if variants != ["a", "b"]:
        problems.append(f"storageUris {uris} name variants {variants}; the stable revision serves a, the canary b "
                        f"(registry.py: {', '.join(registry.VARIANTS)})")
        return problems
    if len({uri.rsplit("/", 1)[0] for uri in uris}) != 1:
        problems.append(f"storageUris {uris} are not folders of one `python -m scripts.kserve` upload")
    served = {v: {name: archives.get(file) for name, file in kserve.variant_archives(v).items()} for v in variants}
    for variant, models in served.items():
        for name, pair in models.items():
            if pair is None or pair[0] != name:
                problems.append(f"variant {variant}: {name} is served from an archive registry.py does not register "
                                f"for it ({kserve.variant_archives(variant)[name]})")
    for name, pair in served["b"].items():
        entry = registry.model(name)
        expected = entry.candidate or entry.versions[0].version
        if pair and pair[1] != expected:
            problems.append(f"the canary serves {name} {pair[1]}, registry.py's candidate is {expected}")
    if not any(served["a"][name] != served["b"].get(name) for name in served["a"]):
        problems.append("the canary's folder serves the same versions as the stable one: nothing to roll out")
    return problems


def check_torchserve_service(isvc, props):
    """The TorchServe service, its runtime and the config.properties in its folder fit together."""
    where = ref(isvc)
    model = isvc["spec"]["predictor"]["model"]
    problems = check_runtime(isvc)
    if problems:
        return problems
    container = predictor_container(isvc)
    store, config = option(container["args"], "--model-store"), option(container["args"], "--ts-config")
    if (store, config) != (str(MOUNT / "model-store"), str(MOUNT / "config" / "config.properties")):
        problems.append(f"{where}: the runtime reads {store} and {config}, not the layout scripts/kserve.py writes")
    if props.get("model_store") != store:
        problems.append(f"{where}: model_store={props.get('model_store')}, but the runtime's --model-store is {store}")
    if PurePosixPath(props.get("metrics_config", "")) != MOUNT / "config" / "metrics.yaml":
        problems.append(f"{where}: metrics_config={props.get('metrics_config')}: scripts/kserve.py puts metrics.yaml "
                        f"at {MOUNT / 'config' / 'metrics.yaml'}")
    for key in ("inference_address", "management_address"):
        address = urlparse(props.get(key, ""))
        if (address.hostname, address.port) != ("127.0.0.1", WRAPPER_PORT):
            problems.append(f"{where}: {key}={props.get(key)}: the wrapper reaches TorchServe on loopback, port "
                            f"{WRAPPER_PORT}")
    metrics_port = runtime(model["runtime"])["spec"]["annotations"]["prometheus.kserve.io/port"]
    if urlparse(props.get("metrics_address", "")).port != int(metrics_port):
        problems.append(f"{where}: metrics_address={props.get('metrics_address')}, the runtime scrapes {metrics_port}")
    if model.get("protocolVersion") != "v2":
        problems.append(f"{where}: protocolVersion {model.get('protocolVersion')}: the handlers answer v2 only")
    env = {e["name"]: e.get("value") for e in container["env"]}
    if env.get("PROTOCOL_VERSION") != model.get("protocolVersion"):
        problems.append(f"{where}: the wrapper's PROTOCOL_VERSION is {env.get('PROTOCOL_VERSION')}, the service's "
                        f"protocolVersion {model.get('protocolVersion')}")
    if props.get("enable_envvars_config") != "false":
        problems.append(f"{where}: enable_envvars_config must be false: the runtime's TS_SERVICE_ENVELOPE would wrap "
                        "every handler in an envelope that reads only the first request of a batch")
    if "model_snapshot" in props:
        problems.append("k8s/kserve/config.properties: model_snapshot is appended by scripts/kserve.py")
    gpus = gpu_request(predictor_deployment(isvc))
    if int(props.get("number_of_gpu", 0)) != gpus:
        problems.append(f"{where}: requests {gpus} GPU(s) but config.properties says number_of_gpu="
                        f"{props.get('number_of_gpu')}")
    return problems


def check_triton_service(isvc):
    """The Triton service serves the uploaded repository as it is: the runtime's model store is the storageUri's
    root, and the model control mode stays none (no load or unload requests)."""
    problems = check_runtime(isvc)
    if problems:
        return problems
    args = predictor_container(isvc)["args"]
    if option(args, "--model-store") != str(MOUNT):
        problems.append(f"{ref(isvc)}: --model-store {option(args, '--model-store')}: the repository is at {MOUNT}")
    if option(args, "--model-control-mode") not in (None, "none") or any(a.startswith("--load-model") for a in args):
        problems.append(f"{ref(isvc)}: args {args} change the model control mode: any client could load or unload "
                        "models through KServe's ingress")
    if PurePosixPath(urlparse(isvc["spec"]["predictor"]["model"]["storageUri"]).path).name != "triton":
        problems.append(f"{ref(isvc)}: storageUri is not the uploaded Triton repository (.../triton)")
    return problems


def check_gpus(isvc, reference):
    """GPU request equals limit and the GPUs of k8s/'s Deployments (whose model profiles test_k8s.py checks); the pod
    selects GPU nodes and tolerates their taint."""
    deployment = predictor_deployment(isvc)
    resources = containers(deployment)[0].get("resources", {})
    requested, limit = gpu_request(deployment), int(resources.get("limits", {}).get(k8s_checks.GPU, 0))
    problems = []
    if (requested, limit) != (reference, reference):
        problems.append(f"{ref(isvc)}: {k8s_checks.GPU} request {requested}, limit {limit}; the bundle's pods have "
                        f"{reference}")
    spec = pod_spec(deployment)
    if not spec.get("nodeSelector"):
        problems.append(f"{ref(isvc)}: requests GPUs but has no nodeSelector for GPU nodes")
    if not any(t.get("key") == k8s_checks.GPU for t in spec.get("tolerations", [])):
        problems.append(f"{ref(isvc)}: requests GPUs but does not tolerate the {k8s_checks.GPU} taint")
    return problems


def check_token_auth(text):
    """KServe's config states its token authorization and model API decisions, each with the reason above it."""
    props = parse_properties(text)
    problems = []
    for key, value in (("disable_token_authorization", "true"), ("enable_model_api", "false")):
        if props.get(key) != value:
            problems.append(f"k8s/kserve/config.properties: {key}={props.get(key)}, expected {value} (stated, not "
                            "TorchServe's default)")
        elif len(comment_above(text, key)) < 40:
            problems.append(f"k8s/kserve/config.properties: {key} has no reason in the comment above it")
    if "wrapper" not in comment_above(text, "disable_token_authorization"):
        problems.append("k8s/kserve/config.properties: the reason for disable_token_authorization must name KServe's "
                        "wrapper, which calls TorchServe without a token")
    return problems


def check_network_policy(policies, deployments):
    """Some NetworkPolicy of the namespace restricts ingress to every predictor pod, and each of its rules names the
    namespaces it admits."""
    problems = []
    for deployment in deployments:
        covering = [p for p in policies if namespace_of(p) == namespace_of(deployment)
                    and matches(p["spec"]["podSelector"].get("matchLabels", {}), pod_labels(deployment))]
        if not covering:
            problems.append(f"{ref(deployment)}: no NetworkPolicy selects the predictor pods")
        for policy in covering:
            if any(not rule.get("from") for rule in policy["spec"].get("ingress", [])):
                problems.append(f"{ref(policy)}: an ingress rule admits every source")
    return problems


def kserve_problems(folder, archives):
    """Every consistency check over the manifests and the config template in ``folder``."""
    stable, canary, triton_service = (service(folder, file) for file in (STABLE, CANARY, TRITON))
    text = (Path(folder) / "config.properties").read_text()
    reference = gpu_request(named(load_bundle(K8S), "Deployment", "torchserve-a"))
    problems = check_canary(stable, canary) + check_variants(stable, canary, archives) + check_token_auth(text)
    for isvc in (stable, canary):
        problems += check_torchserve_service(isvc, parse_properties(text))
    problems += check_triton_service(triton_service)
    rendered = [isvc for isvc in (stable, canary, triton_service) if not check_runtime(isvc)]
    for isvc in rendered:
        problems += check_gpus(isvc, reference) + check_pod_hardening([predictor_deployment(isvc)])
    policies = of_kind(load_kserve(folder), "NetworkPolicy")
    return problems + check_network_policy(policies, [predictor_deployment(isvc) for isvc in rendered])


# --------------------------------------------------------------------------------------------------
# The manifests as shipped
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def archives():
    """{archive file: (model, version)} of registry.py."""
    return archive_table()


def test_every_file_of_the_test_data_has_its_provenance_and_licence():
    """tests/data/k8s/README.md records each copied file with its sha256, and each licence it names is there."""
    import hashlib

    readme = (CRDS / "README.md").read_text()
    for path in sorted(CRDS.glob("*.yaml")):
        row = next((line for line in readme.splitlines() if f"`{path.name}`" in line), "")
        assert hashlib.sha256(path.read_bytes()).hexdigest() in row, f"{path.name}: no row with its sha256"
        licence = re.search(r"`(LICENSE\.[\w-]+)`", row)
        assert licence and (CRDS / licence.group(1)).is_file(), f"{path.name}: no licence file"


def test_kubectl_apply_f_k8s_reads_what_it_read_before():
    """The new folder is below k8s/: `kubectl apply -f k8s` (no recursion) and the overlays' base see nothing new."""
    assert check_apply_set(K8S) == [] and check_base_lists_every_manifest(K8S) == []
    top = {p.name for p in manifest_files(K8S)}
    listed = {PurePosixPath(r).name for r in yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
              ["resources"]}
    assert top == listed and not set(manifest_files(K8S)) & set(kserve_files())
    bundle = load_bundle(K8S)
    assert not of_kind(bundle, "InferenceService") and NAMESPACE not in {namespace_of(o) for o in bundle}


def test_kubectl_apply_f_k8s_kserve_reads_namespace_first_and_not_the_canary():
    """`kubectl apply -f k8s/kserve` applies the namespace, then the stable and Triton services; the canary step
    (a sub-folder) only when asked for."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(k8s_checks, "NAMESPACE", NAMESPACE)
        assert check_apply_set(KSERVE) == []
    assert [p.name for p in manifest_files(KSERVE)] == ["00-namespace.yaml", STABLE, TRITON, "30-networkpolicy.yaml"]


def test_schemas():
    """Every object under k8s/kserve/ and the runtimes it names pass their CRD or kubernetes-validate."""
    objs = load_kserve() + [runtime(name) for name in RUNTIMES]
    assert len(of_kind(objs, "InferenceService")) == 3
    assert kserve_schema_problems(objs) == []


def test_rendered_predictor_pods_pass_kubernetes_validate():
    """The rendering is a valid Deployment, so checkov and the pod checks read real pod specs."""
    assert kserve_schema_problems([predictor_deployment(s) for s in of_kind(load_kserve(), "InferenceService")]) == []


def test_consistency(archives):
    """Every consistency check passes on the manifests as shipped."""
    assert kserve_problems(KSERVE, archives) == []


def test_defaults_mnist_1_stable_mnist_2_canary_at_10_percent(archives):
    """The shipped rollout: variant a (mnist 1.0) stable, variant b (mnist 2.0, mnist_v2.mar) gets 10 %."""
    stable, canary = service(KSERVE, STABLE), service(KSERVE, CANARY)
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert [storage_variant(s) for s in (stable, canary)] == ["a", "b"]
    assert kserve.variant_archives("a")["mnist"] == "mnist.mar" and archives["mnist.mar"] == ("mnist", "1.0")
    assert kserve.variant_archives("b")["mnist"] == "mnist_v2.mar" and archives["mnist_v2.mar"] == ("mnist", "2.0")
    assert registry.model("mnist").candidate == "2.0"
    annotations = stable["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "Knative"  # canary traffic needs Knative revisions
    assert annotations["serving.kserve.io/enable-tag-routing"] == "true"


def test_config_matches_the_repo_config_except_kserve_settings():
    """TorchServe under KServe behaves like the one the suite runs: same limits, metrics, protocol mode."""
    kserve_props = parse_properties((KSERVE / "config.properties").read_text())
    local = parse_properties((ROOT / "config.properties").read_text())
    shared = {k: v for k, v in local.items() if k not in KSERVE_ONLY_SETTINGS}
    assert {k: kserve_props.get(k) for k in shared} == shared
    assert set(kserve_props) - set(local) <= KSERVE_ONLY_SETTINGS, "settings only in KServe's config must be listed"


def test_readme_documents_the_token_decision_and_the_protocols():
    """k8s/README.md's KServe section states the auth decision and, per model, what each service answers: v2 on
    TorchServe for the handlers that speak the protocol, nothing for the others."""
    readme = (K8S / "README.md").read_text()
    section = readme.split("\n## KServe", 1)[1].split("\n## ", 1)[0]
    assert "disable_token_authorization" in section and "wrapper" in section
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", section, re.MULTILINE))
    # the course's models as the README lists them (a model a user adds with the scaffold needs no row)
    assert rows and set(rows) <= {entry.name for entry in registry.MODELS}
    for name, answer in rows.items():
        assert answer.strip().startswith("v2") == kserve.speaks_oip(registry.model(name)), name


@pytest.mark.trained  # reads the artifacts' export manifests
def test_triton_models_in_the_readme_are_the_ones_archive_sh_writes():
    """The Triton service serves what `./archive.sh --triton` writes (scripts/triton.py's exportable models); the
    README's table says which."""
    from scripts import triton

    section = (K8S / "README.md").read_text().split("\n## KServe", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|", section, re.MULTILINE)
    documented = {name for name, answer in rows if answer.strip().startswith("v2")}
    written = {entry.name for entry in triton.exportable("onnx") if any(not v.optional for v in entry.versions)}
    assert documented == written


@pytest.mark.slow  # checkov
def test_checkov_passes_the_manifests_and_the_rendered_predictor_pods(tmp_path):
    """checkov skips InferenceServices (it knows no such kind), so the pods KServe would create are scanned too."""
    for path in kserve_files():
        shutil.copy2(path, tmp_path / path.relative_to(KSERVE).as_posix().replace("/", "-"))
    for isvc in of_kind(load_kserve(), "InferenceService"):
        path = tmp_path / f"rendered-{isvc['metadata']['name']}-{storage_variant(isvc)}.yaml"
        path.write_text(yaml.safe_dump(predictor_deployment(isvc)))
    result = checkov(tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"Passed checks: [1-9]\d*, Failed checks: 0", result.stdout)


@pytest.mark.slow  # checkov
def test_checkov_catches_the_runtime_user_coming_back(tmp_path):
    """Without its own runAsUser the container runs as the runtime's 1000, which the rendering shows."""
    isvc = service(KSERVE, TRITON)
    del isvc["spec"]["predictor"]["model"]["securityContext"]["runAsUser"]
    assert predictor_container(isvc)["securityContext"]["runAsUser"] == 1000
    (tmp_path / "triton.yaml").write_text(yaml.safe_dump(predictor_deployment(isvc)))
    result = checkov(tmp_path)
    assert result.returncode != 0 and "CKV_K8S_40" in result.stdout


# --------------------------------------------------------------------------------------------------
# The checks catch broken copies
# --------------------------------------------------------------------------------------------------

PREDICTOR = ["spec", "predictor"]
MODEL = PREDICTOR + ["model"]
BREAKAGES = {
    "canary share above 100 %": (CANARY, _set(PREDICTOR + ["canaryTrafficPercent"], 150), "not a share of 0 to 100"),
    "canary renamed: a second service": (CANARY, _set(["metadata", "name"], "torchserve-canary"),
                                         "would add a service, not a revision"),
    "canary changes the image too": (CANARY, _set(MODEL + ["image"], "registry.example.com/other:1"),
                                     "beyond storageUri and canaryTrafficPercent at: .spec.predictor.model.image"),
    "canary points at a variant registry.py lacks": (
        CANARY, _set(MODEL + ["storageUri"], "s3://YOUR-BUCKET/torchserve-bundle/0.1.0/kserve/c"), "name variants"),
    "stable carries a canary share": (STABLE, _set(PREDICTOR + ["canaryTrafficPercent"], 50),
                                      "the stable revision sets canaryTrafficPercent"),
    "runtime name typo": (STABLE, _set(MODEL + ["runtime"], "kserve-torchserver"), "no ClusterServingRuntime"),
    "v1 protocol": (STABLE, _set(MODEL + ["protocolVersion"], "v1"), "the handlers answer v2 only"),
    "one GPU against number_of_gpu=2": (STABLE, _set(MODEL + ["resources", "limits", k8s_checks.GPU], 1), "limit 1"),
    "no GPU toleration": (TRITON, _delete(PREDICTOR + ["tolerations"]), "does not tolerate"),
    "writable root filesystem": (TRITON, _set(MODEL + ["securityContext", "readOnlyRootFilesystem"], False),
                                 "readOnlyRootFilesystem must be true"),
    "Triton in explicit model control mode": (
        TRITON, _set(MODEL + ["args"], ["--model-control-mode=explicit", "--load-model=mnist"]),
        "change the model control mode"),
    "predictor label changed in the policy": (
        "30-networkpolicy.yaml", _set(["spec", "podSelector", "matchLabels", "component"], "model"),
        "no NetworkPolicy selects the predictor pods"),
    "Triton serving the TorchServe folder": (TRITON, _set(MODEL + ["storageUri"], "s3://YOUR-BUCKET/x/kserve/a"),
                                             "not the uploaded Triton repository"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_consistency_checks_catch(breakage, broken_k8s, archives):  # noqa: F811 (the fixture)
    file, change, expected = BREAKAGES[breakage]
    folder = broken_k8s.dir / "kserve"
    assert not [p for p in kserve_problems(folder, archives) if expected in p], "clean before"
    obj = load_docs(KSERVE / file)[0]
    broken_k8s(f"kserve/{file}", obj["kind"], obj["metadata"]["name"], change)
    problems = kserve_problems(folder, archives)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("old, new, expected", [
    ("disable_token_authorization=true", "disable_token_authorization=false", "disable_token_authorization=false"),
    ("inference_address=http://127.0.0.1:8085", "inference_address=http://0.0.0.0:8080",
     "the wrapper reaches TorchServe on loopback, port 8085"),
    ("model_store=/mnt/models/model-store", "model_store=/opt/torchserve/model-store", "the runtime's --model-store"),
    ("enable_envvars_config=false", "enable_envvars_config=true", "enable_envvars_config must be false"),
    ("number_of_gpu=2", "number_of_gpu=1", "number_of_gpu=1"),
    ("metrics_address=http://0.0.0.0:8082", "metrics_address=http://0.0.0.0:9082", "the runtime scrapes 8082"),
])
def test_config_checks_catch(old, new, expected, broken_k8s, archives):  # noqa: F811 (the fixture)
    config = broken_k8s.dir / "kserve" / "config.properties"
    assert old in config.read_text()
    config.write_text(config.read_text().replace(old, new))
    assert any(expected in p for p in kserve_problems(broken_k8s.dir / "kserve", archives))


def test_token_check_catches_a_decision_without_its_reason():
    text = (KSERVE / "config.properties").read_text()
    comment = comment_above(text, "disable_token_authorization")
    assert comment and check_token_auth(text) == []
    lines = [line for line in text.splitlines() if not (line.startswith("#") and line.lstrip("# ") in comment)]
    assert any("no reason" in p for p in check_token_auth("\n".join(lines)))


def test_schema_validation_catches_broken_services():
    stable, triton_service = service(KSERVE, STABLE), service(KSERVE, TRITON)
    stable["spec"]["predictor"]["canaryTrafficPercnet"] = 10  # misspelled: unknown field
    stable["spec"]["predictor"]["model"]["modelFormat"] = {"version": "1"}  # name is required
    triton_service["spec"]["predictor"]["minReplicas"] = "one"  # integer
    problems = kserve_schema_problems([stable, triton_service])
    for expected in (("InferenceService/torchserve: spec.predictor: Additional properties are not allowed "
                      "('canaryTrafficPercnet'"),
                     "InferenceService/torchserve: spec.predictor.model.modelFormat: 'name' is a required property",
                     "InferenceService/triton: spec.predictor.minReplicas: 'one' is not of type 'integer'"):
        assert any(p.startswith(expected) for p in problems), (expected, problems)
    assert len(problems) == 3, problems


# --------------------------------------------------------------------------------------------------
# The folder scripts/kserve.py writes, in a real TorchServe
# --------------------------------------------------------------------------------------------------

class WrapperView(TorchServe):
    """TorchServe started as KServe's runtime starts it, seen as the wrapper sees it: no token on any request (the
    config disables token authorization, so there is no key file either), readiness from GET /models/<name>."""

    def request(self, api, method, path, token=True, **kwargs):
        return super().request(api, method, path, token=False, **kwargs)

    def ready_versions(self):
        """(model, version) of the default versions whose workers are all READY, asked as the wrapper asks (the
        versioned management routes answer 404 when management shares the inference port)."""
        ready = []
        for model in self.management("GET", "/models").json()["models"]:
            for version in self.management("GET", f"/models/{model['modelName']}?customized=false").json():
                workers = version.get("workers", [])
                if workers and all(w["status"] == "READY" for w in workers):
                    ready.append((version["modelName"], version["modelVersion"]))
        return ready


@pytest.mark.slow
@pytest.mark.trained
def test_the_canary_folder_loads_in_torchserve_as_kserve_starts_it(tmp_path, archives, monkeypatch):
    """`python -m scripts.kserve` (with the CPU archives of model_store/) writes both folders; variant b's loads
    exactly its snapshot (mnist 2.0 as the default version; not an archive merely lying in its store), and answers
    the wrapper's readiness call and POST /v2/models/mnist/infer on the one port it shares with management, with no
    token, and with the runtime's TS_SERVICE_ENVELOPE set (ignored: enable_envvars_config=false)."""
    monkeypatch.setenv("TS_SERVICE_ENVELOPE", "kservev2")  # what the runtime sets for protocolVersion v2
    assert kserve.main([str(tmp_path / "out"), "--store", str(ROOT / "model_store")]) == 0
    for variant in registry.VARIANTS:
        folder = tmp_path / "out" / variant
        assert sorted(p.name for p in (folder / "model-store").iterdir()) == sorted(
            kserve.variant_archives(variant).values())
        assert (folder / "config" / "metrics.yaml").read_text() == (ROOT / "metrics.yaml").read_text()
        snapshot = parse_properties((folder / "config" / "config.properties").read_text())["model_snapshot"]
        assert json.loads(snapshot) == kserve.model_snapshot(sorted((folder / "model-store").iterdir()))
        assert {name: next(iter(versions)) for name, versions in json.loads(snapshot)["models"].items()} == {
            name: archives[file][1] for name, file in kserve.variant_archives(variant).items()}
    folder = tmp_path / "out" / "b"
    expected = {(name, archives[file][1]) for name, file in kserve.variant_archives("b").items()}
    unlisted = "mnist.mar"  # mnist 1.0: in the store, not in b's snapshot (mnist 2.0), so TorchServe must not load it
    assert archives[unlisted] == ("mnist", "1.0") and ("mnist", "1.0") not in expected
    shutil.copy2(ROOT / "model_store" / unlisted, folder / "model-store")
    server = WrapperView(tmp_path / "ts", model_store=folder / "model-store",
                         config=folder / "config" / "config.properties",
                         overrides={"number_of_gpu": "0"})  # no GPU here; listeners, store and metrics: free ports
    server.ports["management"] = server.ports["inference"]  # one port for both, as in KServe's config
    server.properties["management_address"] = server.properties["inference_address"]
    with server:
        server.start(expect_ready=len(expected))
        assert set(server.ready_versions()) == expected and ("mnist", "2.0") in expected
        names = {m["modelName"] for m in server.management("GET", "/models").json()["models"]}
        assert names == dict(expected).keys()
        image = base64.b64encode((ROOT / "samples" / "digit_7.png").read_bytes()).decode()
        body = {"inputs": [{"name": "data", "shape": [1], "datatype": "BYTES", "data": [image]}]}
        reply = server.inference("POST", "/v2/models/mnist/infer", json=body)
        assert reply.status_code == 200, reply.text
        outputs = {o["name"]: o["data"] for o in reply.json()["outputs"]}
        assert (reply.json()["model_version"], outputs["label"]) == ("2.0", ["7"])
        assert not (server.workdir / "key_file.json").exists()
