"""Security defaults against a real TorchServe: one smoke test per TorchServe behaviour the bundle relies on.

Tokens, request size and the model API run on the session server (the shipped config.properties); the model API
turned on and TLS need servers of their own. Every URL points at 127.0.0.1; the "remote" archive URL points at a
local listener that counts connections. See docs/security.md for the model behind each default.
Hostile request bodies are tests/serving/test_hostile_http.py's.
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
def row():
    return json.dumps(heldout_patients()[0][0])


def keys(server):
    """Every secret in the server's key_file.json: {"inference": .., "management": .., "API": ..}."""
    return {api: entry["key"] for api, entry in json.loads((server.workdir / "key_file.json").read_text()).items()}


def rejected(reply):
    """TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException and nothing else."""
    return reply.status_code == 400 and reply.json()["type"] == "InvalidKeyException"


# --- tokens ----------------------------------------------------------------------------------------------------------

def test_each_api_opens_with_its_own_token_only(server, row):
    secrets = keys(server)
    for api, call in (("inference", lambda **kw: server.predict("regression", row, headers=JSON, **kw)),
                      ("management", lambda **kw: server.management("GET", "/models", **kw))):
        others = [key for name, key in secrets.items() if name != api]
        for token in (False, "wrong-token", secrets[api][:-1], *others):
            assert rejected(call(token=token)), (api, token)
        assert call(token=secrets[api]).status_code == 200


def test_tokens_rotate_with_the_api_key_only(server, row):
    """`POST /token?type=inference` with the API key mints a new inference token; the old one stops working."""
    before = keys(server)
    for token in ("wrong", before["management"], before["inference"]):
        assert rejected(server.management("POST", "/token?type=inference", token=token))
    assert keys(server) == before
    rotated = server.management("POST", "/token?type=inference", token=before["API"])
    assert rotated.status_code == 200, rotated.text
    after = keys(server)
    assert after["inference"] != before["inference"] and after["management"] == before["management"]
    assert rejected(server.predict("regression", row, headers=JSON, token=before["inference"]))
    assert server.predict("regression", row, headers=JSON, token=after["inference"]).status_code == 200


# --- metrics ---------------------------------------------------------------------------------------------------------

def test_tokens_stay_out_of_metrics_and_logs_and_the_key_file_is_private(server, row):
    """The metrics port answers without a token (scrapers have none), so it must carry no secret and no path; the
    logs (access log included) carry no token either."""
    sentinel = "Sentinel-Token-5f1c2d"
    server.predict("regression", row, headers=JSON)
    server.predict("regression", b'{"age": "x"}', headers=JSON)  # a 4xx from the handler
    server.predict("regression", row, headers=JSON, token=sentinel)  # a refused token
    server.management("GET", "/models", token=sentinel)
    metrics = server.request("metrics", "GET", "/metrics", token=False)
    assert metrics.status_code == 200
    text = metrics.text
    assert "ts_inference_requests_total" in text and 'model_name="regression"' in text
    for name, secret in {**keys(server), "sentinel": sentinel}.items():
        assert secret not in text, f"the {name} token is in /metrics"
    for path in {server.workdir, server.model_store, ROOT, Path.home(), Path("/tmp")}:
        assert str(path) not in text, f"{path} is in /metrics"
    paths = re.findall(r"(?:^|[\"'= ])(/[\w.-]+/[\w./-]*)", text, flags=re.M)
    assert not paths, paths[:5]
    for word in ("key_file", ".mar", ".py", "Bearer", "Authorization"):
        assert word not in text, word
    assert (server.workdir / "key_file.json").stat().st_mode & 0o777 == 0o600
    logs = sorted((server.workdir / "logs").glob("*.log"))
    assert any(log.name == "access_log.log" for log in logs), logs
    for log in logs:
        text = log.read_text(errors="replace")
        for name, secret in {**keys(server), "sentinel": sentinel}.items():
            assert secret not in text, f"the {name} token is in {log.name}"


# --- model registration ----------------------------------------------------------------------------------------------

def test_registration_is_refused_with_the_model_api_off(server, row):
    """The shipped config turns the model API off: no archive can be registered or removed over HTTP."""
    with LocalListener() as listener:
        for url in ("regression.mar", f"http://127.0.0.1:{listener.port}/model_store/evil.mar",
                    f"file://{server.model_store}/regression.mar"):
            reply = server.management("POST", "/models", params={"url": url, "initial_workers": 1})
            assert reply.status_code == 405 and reply.json()["type"] == "MethodNotAllowedException", (url, reply.text)
        assert listener.connections == 0
    assert server.management("DELETE", "/models/regression/1.0").status_code == 405
    assert server.management("DELETE", "/models/regression").status_code == 405
    assert ("regression", "1.0") in server.ready_versions()
    assert server.predict("regression", row, headers=JSON).status_code == 200


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
        for url in (f"http://127.0.0.1:{listener.port}/model_store/evil.mar", f"file://{server.slow}",
                    f"file://{server.model_store}/../built/slow.mar"):  # traversal
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

def test_oversized_requests_get_413_and_the_server_stays_healthy(server, row):
    """Bodies over max_request_size get 413 before any worker sees them; a body of exactly the limit is let through."""
    pid = server.worker_pids("regression")
    assert server.predict("regression", b" " * (MAX_REQUEST + 1), headers=JSON).status_code == 413
    at_limit = server.predict("regression", b" " * MAX_REQUEST, headers=JSON)
    assert at_limit.status_code == 400 and at_limit.json()["type"] == "InvalidJSON", at_limit.text
    assert server.inference("GET", "/ping").json() == {"status": "Healthy"}
    assert server.predict("regression", row, headers=JSON).status_code == 200
    assert server.worker_pids("regression") == pid


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


def test_https_serves_every_port_and_refuses_plain_http(https, row, certificate):
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
    plain = requests.Session()
    plain.trust_env = False
    reply = plain.post(f"http://127.0.0.1:{https.ports['inference']}/predictions/regression", data=row,
                       headers={**JSON, "Authorization": f"Bearer {https.token('inference')}"}, timeout=10)
    assert reply.status_code == 403 and "prediction" not in reply.text, (reply.status_code, reply.text)


