"""The translator's load-test payloads and reply check (registry.py's Load of "translator").

- ``payloads()``: held-out English number names (never seen in training: the split of artifacts/translator's training
  run, drawn again from its seed), kept when the served archive (loaded in-process) translates them exactly, so that
  a served reply that differs is a serving fault;
- ``check_translator(body, expected)``: {"translation": str, "tokens": [str], "unknown": [str], "model", "version"};
  translation == ``expected`` where the sample names one.
"""

from functools import cache

from registry import ROOT
from tests.load.checks import WrongAnswer, parse
from tests.load.payloads import TEXT, Sample

ARTIFACTS = "artifacts/translator"


@cache
def heldout_pairs(count=200):
    """(English, French) number names held out when artifacts/translator was trained (the default data only)."""
    import numpy as np

    from tests.samples import training_record
    from train.translator import number_pairs

    args = training_record(ARTIFACTS)["args"]
    if args.get("data_dir"):
        return []
    pairs = number_pairs(args["pairs"], np.random.default_rng(args["seed"]))
    if args.get("limit"):
        pairs = pairs[:args["limit"]]
    held_out = min(len(pairs) - 1, max(1, int(len(pairs) * args["test_fraction"])))
    return pairs[:min(held_out, count)]


@cache
def payloads(count=120):
    import tempfile

    from tests.worker import Request, Worker

    worker = Worker(ROOT / "model_store" / "translator.mar", tempfile.mkdtemp(prefix="payloads-translator-"))
    samples = []
    for english, french in heldout_pairs(count):
        reply = worker.run_one(Request(english.encode("utf-8"), TEXT))
        if reply.status == 200 and reply.body["translation"] == french:
            samples.append(Sample("number-name", english.encode("utf-8"), TEXT, french))
    return samples


def check_translator(body, expected=None):
    reply = parse(body)
    if not isinstance(reply, dict):
        raise WrongAnswer(f"expected a JSON object, got {type(reply).__name__}")
    translation, tokens = reply.get("translation"), reply.get("tokens")
    if not isinstance(translation, str):
        raise WrongAnswer(f"translation {translation!r} is not a string")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise WrongAnswer(f"tokens {str(tokens)[:120]} is not a list of strings")
    if not isinstance(reply.get("unknown"), list) or "model" not in reply or "version" not in reply:
        raise WrongAnswer(f"reply lacks unknown/model/version: {sorted(reply)}")
    if expected is not None and translation != expected:
        raise WrongAnswer(f"translation {translation!r}, expected {expected!r}")
    return translation
