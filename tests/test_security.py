"""Security defaults against a real TorchServe: tokens, metrics, model registration, request size and TLS.

Each test runs its own TorchServe from the bundle's config.properties (``PrivateTorchServe``: free ports, own
sockets, own key_file.json), so tokens can be rotated and registration attempted without touching the session
server. Every URL points at 127.0.0.1; the "remote" archive URLs point at a local listener that counts connections.
See README.md (Security model) for the model behind each default.
"""

import json
import re
import shutil
import ssl
import socket
import subprocess
from pathlib import Path

import pytest
import requests

from scripts.server import CONFIG, ROOT, read_properties
from tests.fixtures.servers import LocalListener, PrivateTorchServe, build_slow_archive, rezip, store_with
from tests.samples import heldout_patients

pytestmark = pytest.mark.slow  # starts a real TorchServe

JSON = {"Content-Type": "application/json"}
MAX_REQUEST = int(read_properties(CONFIG)["max_request_size"])


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """The bundle's config as shipped (token auth ON, model API off) serving the regression archive."""
    root = tmp_path_factory.mktemp("secured")
    server = PrivateTorchServe(root / "server", model_store=store_with(root / "store", "regression"))
    try:
        yield server.start(timeout=240)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def row():
    return json.dumps(heldout_patients()[0][0])


def keys(server):
    """Every secret in the server's key_file.json: {"inference": .., "management": .., "API": ..}."""
    return {api: entry["key"] for api, entry in json.loads((server.workdir / "key_file.json").read_text()).items()}


def rejected(reply):
    """TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException and nothing else."""
    return reply.status_code == 400 and reply.json()["type"] == "InvalidKeyException"


# --- tokens ----------------------------------------------------------------------------------------------------------

def wrong_tokens(server, api):
    """Authorization values that must not open ``api``: none, garbage, near misses, the other APIs' keys."""
    secrets = keys(server)
    own = secrets[api]
    others = [key for name, key in secrets.items() if name != api]
    headers = [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Bearer {own[:-1]}"},
               {"Authorization": f"Bearer {own}x"}, {"Authorization": own}, {"Authorization": f"Basic {own}"},
               {"Authorization": "Bearer "}, {"X-Token": own}]
    return headers + [{"Authorization": f"Bearer {key}"} for key in others]


def test_inference_api_requires_the_inference_token(secured, row):
    pid = secured.worker_pids("regression")
    calls = [("GET", "/ping", None), ("POST", "/predictions/regression", row),
             ("POST", "/predictions/regression/1.0", row), ("POST", "/explanations/regression", row)]
    for headers in wrong_tokens(secured, "inference"):
        for method, path, body in calls:
            reply = secured.inference(method, path, token=False, data=body, headers={**JSON, **headers})
            assert rejected(reply), (headers, path, reply.status_code, reply.text)
    for method, path, body in calls:
        reply = secured.inference(method, path, data=body, headers=JSON)
        assert reply.status_code == 200, (path, reply.text)
    assert isinstance(secured.predict("regression", row, headers=JSON).json()["prediction"], float)
    assert secured.worker_pids("regression") == pid


def test_management_api_requires_the_management_token(secured):
    config = secured.describe("regression", "1.0")
    workers = config["minWorkers"]
    calls = [("GET", "/models"), ("GET", "/models/regression"), ("GET", "/models/regression/all"),
             ("PUT", f"/models/regression?min_worker={workers}&synchronous=true"),
             ("PUT", "/models/regression/1.0/set-default")]
    for headers in wrong_tokens(secured, "management"):
        for method, path in calls:
            reply = secured.management(method, path, token=False, headers=headers)
            assert rejected(reply), (headers, path, reply.status_code, reply.text)
    for method, path in calls:
        reply = secured.management(method, path, timeout=120)
        assert reply.status_code == 200, (path, reply.text)
    assert [w["pid"] for w in secured.describe("regression", "1.0")["workers"]] == \
        [w["pid"] for w in config["workers"]]


def test_tokens_rotate_with_the_api_key_only(secured, row):
    """`POST /token?type=inference` with the API key mints a new inference token; the old one stops working."""
    before = keys(secured)
    for token in ("wrong", before["management"], before["inference"]):
        assert rejected(secured.management("POST", "/token?type=inference", token=token))
    assert keys(secured) == before
    rotated = secured.management("POST", "/token?type=inference", token=before["API"])
    assert rotated.status_code == 200, rotated.text
    after = keys(secured)
    assert after["inference"] != before["inference"] and after["management"] == before["management"]
    assert rejected(secured.predict("regression", row, headers=JSON, token=before["inference"]))
    assert secured.predict("regression", row, headers=JSON, token=after["inference"]).status_code == 200


# --- metrics ---------------------------------------------------------------------------------------------------------

def test_metrics_expose_no_tokens_or_paths(secured, row):
    """The metrics port answers without a token (scrapers have none), so it must carry no secret and no path."""
    sentinel = "Sentinel-Token-5f1c2d"
    secured.predict("regression", row, headers=JSON)
    secured.predict("regression", b'{"age": "x"}', headers=JSON)  # a 4xx from the handler
    secured.predict("regression", row, headers=JSON, token=sentinel)  # a refused token
    secured.management("GET", "/models", token=sentinel)
    metrics = secured.request("metrics", "GET", "/metrics", token=False)
    assert metrics.status_code == 200
    text = metrics.text
    assert "ts_inference_requests_total" in text and 'model_name="regression"' in text
    for name, secret in {**keys(secured), "sentinel": sentinel}.items():
        assert secret not in text, f"the {name} token is in /metrics"
    for path in {secured.workdir, secured.model_store, ROOT, Path.home(), Path("/tmp")}:
        assert str(path) not in text, f"{path} is in /metrics"
    paths = re.findall(r"(?:^|[\"'= ])(/[\w.-]+/[\w./-]*)", text, flags=re.M)
    assert not paths, paths[:5]
    for word in ("key_file", ".mar", ".py", "Bearer", "Authorization"):
        assert word not in text, word


def test_tokens_stay_out_of_logs_and_the_key_file_is_private(secured, row):
    """Tokens are only in key_file.json (mode 0600), never in TorchServe's logs, access log included."""
    sentinel = "Sentinel-Token-9a7e41"
    secured.predict("regression", row, headers=JSON)
    secured.predict("regression", row, headers=JSON, token=sentinel)
    secured.management("GET", "/models", token=sentinel)
    assert (secured.workdir / "key_file.json").stat().st_mode & 0o777 == 0o600
    logs = sorted((secured.workdir / "logs").glob("*.log"))
    assert any(log.name == "access_log.log" for log in logs), logs
    for log in logs:
        text = log.read_text(errors="replace")
        for name, secret in {**keys(secured), "sentinel": sentinel}.items():
            assert secret not in text, f"the {name} token is in {log.name}"


# --- model registration ----------------------------------------------------------------------------------------------

def test_registration_is_refused_with_the_model_api_off(secured, row):
    """The shipped config turns the model API off: no archive can be registered or removed over HTTP."""
    with LocalListener() as listener:
        for url in ("regression.mar", f"http://127.0.0.1:{listener.port}/model_store/evil.mar",
                    f"file://{secured.model_store}/regression.mar"):
            reply = secured.management("POST", "/models", params={"url": url, "initial_workers": 1})
            assert reply.status_code == 405 and reply.json()["type"] == "MethodNotAllowedException", (url, reply.text)
        assert listener.connections == 0
    assert secured.management("DELETE", "/models/regression/1.0").status_code == 405
    assert secured.management("DELETE", "/models/regression").status_code == 405
    assert secured.ready_versions() == [("regression", "1.0")]
    assert secured.predict("regression", row, headers=JSON).status_code == 200


@pytest.fixture(scope="module")
def model_api_on(tmp_path_factory):
    """The shipped config with the model API turned ON (allowed_urls unchanged), an empty model store at first."""
    root = tmp_path_factory.mktemp("model_api_on")
    slow = build_slow_archive(root / "built")
    server = PrivateTorchServe(root / "server", model_store=root / "model_store",
                               overrides={"enable_model_api": "true"})
    server.model_store.mkdir()
    server.slow = slow
    try:
        yield server.start(timeout=120, expect_ready=0)
    finally:
        server.stop()


def register(server, url):
    return server.management("POST", "/models", params={"url": url, "initial_workers": 0, "synchronous": "true"},
                             timeout=120)


def registered(server):
    return {m["modelName"] for m in server.management("GET", "/models").json()["models"]}


def test_remote_archive_urls_are_refused_by_allowed_urls(model_api_on):
    """Even with the model API on, allowed_urls refuses http(s) and file URLs: nothing is fetched, nothing loads.

    The "remote" host is a listener on 127.0.0.1 that counts connections: it must see none. A store file
    registered by name still works (the positive control: the refusals come from allowed_urls).
    """
    server = model_api_on
    with LocalListener() as listener:
        for url in (f"http://127.0.0.1:{listener.port}/model_store/evil.mar",
                    f"https://127.0.0.1:{listener.port}/evil.mar",
                    f"HTTP://127.0.0.1:{listener.port}/model_store/evil.mar",
                    f"http://127.0.0.1:{listener.port}/x?file:///a/model_store/evil.mar",
                    f"ftp://127.0.0.1:{listener.port}/model_store/evil.mar",
                    f"file://{server.slow}",
                    f"file://{server.model_store}/../built/slow.mar",
                    f"file://{server.model_store}/../{server.model_store.name}/slow.mar"):  # traversal
            reply = register(server, url)
            assert 400 <= reply.status_code < 500, (url, reply.status_code, reply.text)
            assert set(reply.json()) == {"code", "type", "message"}
        assert listener.connections == 0, "TorchServe connected to a refused URL"
    assert registered(server) == set()
    assert sorted(p.name for p in server.model_store.iterdir()) == []

    shutil.copy(server.slow, server.model_store / "slow.mar")
    reply = register(server, "slow.mar")
    assert reply.status_code == 200, reply.text
    assert registered(server) == {"slow"}


def test_archives_outside_the_model_store_are_refused(model_api_on, tmp_path):
    """allowed_urls must not let an archive in from elsewhere on the disk, e.g. another folder named model_store."""
    server = model_api_on
    elsewhere = tmp_path / "uploads" / "model_store"
    elsewhere.mkdir(parents=True)
    rezip(server.slow, elsewhere / "planted.mar", "planted")
    try:
        reply = register(server, f"file://{elsewhere}/planted.mar")
        assert "planted" not in registered(server) and not (server.model_store / "planted.mar").exists(), reply.text
        assert 400 <= reply.status_code < 500, reply.text
    finally:  # leave the module's server as it was
        if "planted" in registered(server):
            server.management("DELETE", "/models/planted/1.0", timeout=60)
        (server.model_store / "planted.mar").unlink(missing_ok=True)


# --- request size ----------------------------------------------------------------------------------------------------

def test_oversized_requests_get_413_and_the_server_stays_healthy(secured, row):
    """Bodies over max_request_size get 413 before any worker sees them - with a Content-Length or chunked, with
    or without a token, on the inference and the management port; a body of exactly the limit is let through."""
    pid = secured.worker_pids("regression")
    over = b" " * (MAX_REQUEST + 1)
    assert secured.predict("regression", over, headers=JSON).status_code == 413
    assert secured.predict("regression", over, headers=JSON, token=False).status_code == 413
    assert secured.management("PUT", "/models/regression?min_worker=1", data=over).status_code == 413

    def chunks(size=1 << 20):
        sent = 0
        while sent <= MAX_REQUEST:
            sent += size
            yield b" " * size

    assert secured.predict("regression", chunks(), headers=JSON).status_code == 413
    at_limit = secured.predict("regression", b" " * MAX_REQUEST, headers=JSON)
    assert at_limit.status_code == 400 and at_limit.json()["type"] == "InvalidJSON", at_limit.text
    assert secured.inference("GET", "/ping").json() == {"status": "Healthy"}
    assert secured.predict("regression", row, headers=JSON).status_code == 200
    assert secured.worker_pids("regression") == pid


# --- TLS -------------------------------------------------------------------------------------------------------------

def documented_https_block():
    """The commented HTTPS settings at the end of config.properties, as {key: value}."""
    text = CONFIG.read_text()
    assert "# --- HTTPS" in text, "config.properties lacks the documented HTTPS block"
    block = text[text.index("# --- HTTPS"):]
    return dict(re.findall(r"^#([a-z_]+)=(\S+)$", block, flags=re.M))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and its key (PEM), made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl CLI is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def https(tmp_path_factory, certificate):
    """TorchServe with the documented HTTPS settings (paths pointed at the test certificate) on every port."""
    documented = documented_https_block()
    assert {"inference_address", "management_address", "metrics_address", "certificate_file",
            "private_key_file"} <= set(documented), documented
    assert all(documented[f"{api}_address"].startswith("https://127.0.0.1:")
               for api in ("inference", "management", "metrics"))
    cert, key = certificate
    overrides = {k: v for k, v in documented.items() if not k.endswith("_address")}
    overrides.update(certificate_file=str(cert), private_key_file=str(key))
    root = tmp_path_factory.mktemp("https")
    server = PrivateTorchServe(root / "server", model_store=store_with(root / "store", "regression"), scheme="https",
                               overrides=overrides)
    server.session.verify = str(cert)  # verified against the test certificate, hostname 127.0.0.1 included
    try:
        yield server.start(timeout=240)
    finally:
        server.stop()


def test_https_serves_inference_management_and_metrics(https, row, certificate):
    assert https.inference("GET", "/ping").json() == {"status": "Healthy"}
    reply = https.predict("regression", row, headers=JSON)
    assert reply.status_code == 200 and isinstance(reply.json()["prediction"], float)
    assert https.management("GET", "/models").json()["models"] == [{"modelName": "regression",
                                                                     "modelUrl": "regression.mar"}]
    assert "ts_inference_requests_total" in https.metrics()
    assert rejected(https.predict("regression", row, headers=JSON, token="wrong"))  # TLS does not replace tokens

    cert, _ = certificate
    context = ssl.create_default_context(cafile=str(cert))
    for api in ("inference", "management", "metrics"):
        with socket.create_connection(("127.0.0.1", https.ports[api]), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3"), tls.version()
            assert ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True)).strip() == \
                cert.read_text().strip()


def test_plain_http_and_old_tls_are_refused_on_the_https_ports(https, row):
    for api in ("inference", "management", "metrics"):
        plain = requests.Session()
        plain.trust_env = False
        try:
            reply = plain.post(f"http://127.0.0.1:{https.ports[api]}/predictions/regression", data=row,
                               headers={**JSON, "Authorization": f"Bearer {https.token('inference')}"}, timeout=10)
        except requests.ConnectionError:
            continue  # no HTTP answer at all is a refusal too
        assert reply.status_code == 403 and "prediction" not in reply.text, (api, reply.status_code, reply.text)
    with pytest.raises(requests.exceptions.SSLError):  # not trusted without the test certificate
        requests.Session().get(https.url("inference", "/ping"), verify=True, timeout=10)
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        try:
            context.minimum_version = context.maximum_version = version
            context.set_ciphers("ALL:@SECLEVEL=0")
        except (ValueError, ssl.SSLError):
            continue  # this client's OpenSSL cannot even offer it
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with socket.create_connection(("127.0.0.1", https.ports["inference"]), timeout=10) as raw:
                context.wrap_socket(raw).close()


def test_grpc_ports_use_tls_too(https, certificate):
    """With enable_grpc_ssl (in the documented block), the gRPC ports speak TLS (HTTP/2) with the same certificate."""
    assert https.properties.get("enable_grpc_ssl") == "true"
    cert, _ = certificate
    context = ssl.create_default_context(cafile=str(cert))
    context.set_alpn_protocols(["h2"])
    for key in ("grpc_inference_port", "grpc_management_port"):
        with socket.create_connection(("127.0.0.1", int(https.properties[key])), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.selected_alpn_protocol() == "h2"


# --- hostile bodies over HTTP (last: a bug here restarts the secured server's worker) -----------------------------

def strict_json(text):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def hostile_row(value):
    row = dict(heldout_patients()[0][0])
    row[next(iter(row))] = value
    return json.dumps(row)


@pytest.mark.parametrize("body", [
    pytest.param(b'{"\\ud800": 1}', id="surrogate-key"),
    pytest.param(b"[" * 5000 + b"]" * 5000, id="nested-5000"),
    pytest.param(hostile_row(1e300), id="1e300"),
    pytest.param(hostile_row(10 ** 400), id="int-1e400"),
    pytest.param(b'{"age": NaN}', id="NaN"),
    pytest.param(b"\xff\xfe" + "{}".encode("utf-16-le"), id="utf-16"),
    pytest.param(b'{"age": 1, "age": "x"}', id="duplicate-key"),
])
def test_hostile_requests_never_kill_a_worker(secured, row, body):
    """A hostile body gets a clean 4xx JSON error over HTTP, the worker process survives and keeps serving."""
    pid = secured.worker_pids("regression")
    reply = secured.predict("regression", body, headers=JSON)
    try:
        assert 400 <= reply.status_code < 500, (reply.status_code, reply.text)
        assert set(strict_json(reply.text)) == {"code", "type", "message"}, reply.text
        assert secured.worker_pids("regression") == pid, "the worker process was replaced"
    finally:  # a crashed worker is back before the next test
        secured.wait_for(lambda: ("regression", "1.0") in secured.ready_versions(), timeout=60, what="regression READY")
    assert secured.predict("regression", row, headers=JSON).status_code == 200
