"""Locust load test of every model in registry.py that names a ``Load``, with real payloads and content checks.

    .venv/bin/locust -f tests/load/locustfile.py --headless -u 32 -r 8 -t 2m \
        --host http://127.0.0.1:8080 --csv logs/locust --html logs/locust.html

One user class per model (``MnistUser``, ...), weighted by its registry entry (mnist : sentiment : regression :
fashion : detector : translator : cyclegan = 3 : 2 : 1 : 2 : 1 : 1 : 1); every user sends its next request as soon
as the last reply arrived (closed loop; --think-time adds a pause). Payloads are held-out samples with known answers
(tests/load/payloads.py): digit PNGs at 28, 64, 128 and 300 px (both polarities), reviews as UTF-8 text, patient
rows as JSON, Fashion-MNIST test images re-encoded, composed detection images, English number names (translator),
Fashion-MNIST items and line drawings (cyclegan). A reply counts as a failure unless it has status 200 AND the right
content (tests/load/checks.py): the digit's label, top-3 probabilities sorted, in [0, 1], summing to <= 1; the
review's label; a finite regression prediction; the garment's label; objects found with boxes and masks in the
image's frame; the translation; the translated image.

Options (also as environment variables LOCUST_KEY_FILE, LOCUST_NO_TOKEN, ...):
  --key-file PATH     TorchServe's key_file.json to read the inference token from (default ./key_file.json, written
                      by `make serve` at the repo root); re-read when TorchServe refuses it (it rotates keys)
  --no-token          send no Authorization header (in the cluster, where token authorization is off)
  --payloads FILE     samples written by `python -m tests.load.payloads --out FILE` (default: build them here,
                      which needs artifacts/ and the training data, i.e. the repo root as working directory)
  --model-version MODEL=V  send MODEL's requests to /predictions/MODEL/V instead of the default version, repeatable
  --header "N: V"     an extra header on every request, repeatable (in the cluster: x-model-version: b pins the
                      candidate variant at the gateway; the gateway's own credentials go here too)
  --max-requests N    stop after N requests in all (the test suite's smoke test uses it)
  --think-time S      seconds each user waits between requests (default 0)
"""

import json
import os
import random
import sys
from pathlib import Path

import gevent
from locust import FastHttpUser, events, task

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `tests.load.*` under locust -f

import registry  # noqa: E402
from tests.load.checks import WrongAnswer  # noqa: E402

SAMPLES = {}  # model -> [payloads.Sample], loaded once per process at init


@events.init_command_line_parser.add_listener
def _options(parser):
    parser.add_argument("--key-file", default="key_file.json", env_var="LOCUST_KEY_FILE",
                        help="TorchServe key_file.json holding the inference token (default ./key_file.json)")
    parser.add_argument("--no-token", action="store_true", default=False, env_var="LOCUST_NO_TOKEN",
                        help="send no Authorization header (token authorization off, e.g. in the cluster)")
    parser.add_argument("--payloads", default="", env_var="LOCUST_PAYLOADS",
                        help="payload file from `python -m tests.load.payloads --out FILE` (default: build them)")
    parser.add_argument("--model-version", action="append", default=[], env_var="LOCUST_MODEL_VERSION",
                        help="MODEL=VERSION to address, e.g. mnist=2.0, repeatable (default: the default versions)")
    parser.add_argument("--header", action="append", default=[], env_var="LOCUST_HEADER",
                        help='extra request header "Name: value", repeatable (e.g. x-model-version: b behind the '
                             "cluster's gateway, or the gateway's own credentials)")
    parser.add_argument("--max-requests", type=int, default=0, env_var="LOCUST_MAX_REQUESTS",
                        help="stop after this many requests in all (0: no limit)")
    parser.add_argument("--think-time", type=float, default=0.0, env_var="LOCUST_THINK_TIME",
                        help="seconds a user waits between requests (default 0: closed loop)")


@events.init.add_listener
def _load_samples(environment, **_):
    from tests.load import payloads

    options = environment.parsed_options
    path = getattr(options, "payloads", "") if options else ""
    SAMPLES.update(payloads.load(path) if path else payloads.build_all())


_requests_seen = 0
_environment = None


@events.init.add_listener
def _remember_environment(environment, **_):
    global _environment
    _environment = environment


@events.request.add_listener
def _stop_after_max_requests(**_):
    """--max-requests: quit once that many requests were answered (a fixed amount of work, for the smoke test)."""
    global _requests_seen
    _requests_seen += 1
    options = _environment.parsed_options if _environment else None
    limit = getattr(options, "max_requests", 0) if options else 0
    if limit and _requests_seen == limit:
        gevent.spawn(_environment.runner.quit)


_token_cache = {}


def inference_token(options, refresh=False):
    """The inference key from --key-file (cached; ``refresh`` re-reads it after TorchServe rotated it)."""
    path = os.path.abspath(options.key_file)
    if refresh or path not in _token_cache:
        try:
            with open(path, encoding="utf-8") as f:
                _token_cache[path] = json.load(f)["inference"]["key"]
        except FileNotFoundError:
            raise SystemExit(f"{path} not found: start TorchServe with `make serve` (it writes key_file.json), "
                             "pass --key-file, or --no-token where token authorization is off") from None
    return _token_cache[path]


class ModelUser(FastHttpUser):
    """A client of one model: posts its samples, checks each reply with ``check``."""

    abstract = True
    model = ""  # its registry name
    check = None
    mix = {}  # sample name -> weight; empty: every sample alike

    def wait_time(self):
        return self.environment.parsed_options.think_time if self.environment.parsed_options else 0.0

    def on_start(self):
        self.options = self.environment.parsed_options
        self.samples = SAMPLES[self.model]
        self.by_name = {}
        for sample in self.samples:
            self.by_name.setdefault(sample.name, []).append(sample)
        versions = dict(item.split("=", 1) for item in (self.options.model_version if self.options else None) or [])
        self.path = f"/predictions/{self.model}" + (f"/{versions[self.model]}" if self.model in versions else "")

    def headers(self, sample, refresh=False):
        headers = {"Content-Type": sample.content_type}
        for header in (self.options.header if self.options else None) or []:
            name, _, value = header.partition(":")
            headers[name.strip()] = value.strip()
        if not (self.options and self.options.no_token):
            headers["Authorization"] = f"Bearer {inference_token(self.options, refresh)}"
        return headers

    def post(self, sample):
        name = f"{self.path} {sample.name}"
        with self.client.post(self.path, data=sample.body, headers=self.headers(sample), name=name,
                              catch_response=True) as response:
            if response.status_code in (400, 401) and b"Token Authorization" in (response.content or b""):
                self.headers(sample, refresh=True)  # TorchServe rotated the key: the next request reads it again
            if response.status_code != 200:
                body = (response.content or b"")[:200].decode("utf-8", errors="replace")
                response.failure(f"HTTP {response.status_code}: {body}")
                return
            try:
                type(self).check(response.content, sample.expected)
            except WrongAnswer as wrong:
                response.failure(f"wrong answer: {wrong}")
            else:
                response.success()

    @task
    def post_a_sample(self):
        if self.mix:
            name = random.choices(list(self.mix), weights=list(self.mix.values()))[0]
            self.post(random.choice(self.by_name[name]))
        else:
            self.post(random.choice(self.samples))


def _user_class(entry):
    """``<Model>User``: the locust user of one registry entry (None for a model without load-test payloads)."""
    if not entry.load_tested:
        return None
    return type(f"{entry.name.title().replace('_', '')}User", (ModelUser,), {
        "__doc__": f"A client of {entry.name}: its load-test payloads, each reply checked by {entry.load.check}.",
        "__module__": __name__, "model": entry.name, "weight": entry.load.weight, "mix": entry.load.mix,
        "check": staticmethod(registry.resolve(entry.load.check))})


globals().update({user.__name__: user for user in map(_user_class, registry.MODELS) if user})
