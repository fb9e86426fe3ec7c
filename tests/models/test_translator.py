"""The translator: tokens, training on anki-format pairs, the handler in-process, and streaming over real HTTP."""

import json

import pytest

import registry
from models.translator import detokenize, tokenize
from tests.worker import Request, valid_reason

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"


def sample():
    entry = registry.model("translator")
    return (registry.ROOT / entry.samples[0].file).read_text(encoding="utf-8"), entry.samples[0].label


def test_tokens_split_hyphens_and_punctuation_and_join_back():
    assert tokenize("Seventy-one, please!") == ["seventy", "-", "one", ",", "please", "!"]
    assert detokenize(tokenize("quatre-vingt-dix-sept mille, c'est ça.")) == "quatre-vingt-dix-sept mille, c'est ça."


def test_trains_on_a_tab_separated_pair_file(tmp_path):
    from train import translator

    data = tmp_path / "data"
    data.mkdir()
    lines = ["Go.\tVa !\tCC-BY 2.0 (France) Attribution: tatoeba.org #2877272 (CM) & #1158250 (Wittydev)",
             "Hi.\tSalut !\tCC-BY 2.0", "Run!\tCours !", "Who?\tQui ?", "I see.\tJe comprends.", "",
             "Thanks.\tMerci.", "I won.\tJ'ai gagné.", "Help!\tÀ l'aide !"]
    (data / "fra.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    metrics = translator.main(["--data-dir", str(data), "--epochs", "2", "--hidden", "16", "--dim", "8",
                               "--test-fraction", "0.25", "--out", str(tmp_path / "out"), "--threads", "1"])
    assert metrics["dataset"]["n_train"] == 6 and metrics["dataset"]["n_test"] == 2
    assert {"bleu_greedy", "bleu_beam", "em_greedy", "em_beam"} <= set(metrics["test"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(manifest["exports"]) == {"torchscript", "onnx"}
    assert all("Python loop" in export["unsupported"] for export in manifest["exports"].values())
    vocab = json.loads((tmp_path / "out" / "target_vocab.json").read_text())
    assert "gagné" in vocab and "!" in vocab
    (data / "bad.txt").write_text("no tab here\n", encoding="utf-8")
    with pytest.raises(translator.DataError, match="bad.txt, line 1"):
        translator.main(["--data-dir", str(data), "--out", str(tmp_path / "bad")])


@pytest.fixture(scope="module")
def translator_worker(worker):
    return worker("translator")


def test_the_sample_is_translated_greedily_and_by_beam_search(translator_worker):
    text, label = sample()
    greedy, beam = translator_worker.run(Request(text, TEXT), Request(json.dumps({"text": text, "beam": 5}), JSON))
    assert (greedy.status, beam.status) == (200, 200)
    assert greedy.body["translation"] == label == beam.body["translation"]
    assert greedy.body["tokens"] == tokenize(label) and greedy.body["complete"] is True
    assert (greedy.body["beam"], beam.body["beam"], greedy.body["model"]) == (1, 5, "translator")
    assert greedy.body["unknown"] == []


def test_unknown_words_become_unk_and_the_reply_says_so(translator_worker):
    reply = translator_worker.run_one(Request(json.dumps({"text": "seventy-one zebras"}), JSON))
    assert reply.status == 200 and reply.body["unknown"] == ["zebras"]


def test_max_length_stops_the_output_and_says_so(translator_worker):
    text, label = sample()
    reply = translator_worker.run_one(Request(json.dumps({"text": text, "max_length": 2}), JSON))
    assert reply.status == 200 and reply.body["tokens"] == tokenize(label)[:2] and reply.body["complete"] is False


@pytest.mark.parametrize("body, code, kind", [
    ({"text": "one", "beam": 9}, 400, "InvalidField"),
    ({"text": "one", "beam": True}, 400, "InvalidField"),
    ({"text": "one", "max_length": 0}, 400, "InvalidField"),
    ({"text": "one", "stream": "yes"}, 400, "InvalidField"),
    ({"text": "one", "stream": True, "beam": 2}, 400, "InvalidField"),
    ({"txt": "one"}, 400, "InvalidField"),
    ({"text": 7}, 400, "InvalidField"),
    ({"text": " ,"}, 200, None),
    ({"text": "   "}, 400, "EmptyText"),
    ({"text": "one " * 100}, 413, "TooManyTokens"),
    ({"text": "x" * 5000}, 413, "TextTooLong"),
    (["one", "two"], 400, "InvalidInput"),
])
def test_bad_requests_are_typed_4xx(translator_worker, body, code, kind):
    reply = translator_worker.run_one(Request(json.dumps(body), JSON))
    assert reply.status == code, reply.body
    if kind:
        assert reply.body["type"] == kind and valid_reason(reply)


def test_in_a_batch_only_the_streaming_request_streams(translator_worker, monkeypatch):
    """A streaming request and a plain one share a batch: the first gets an intermediate response per token (sent
    on the worker's socket to the frontend), the second only its reply; both replies are full."""

    class Socket:
        def __init__(self):
            self.frames = []

        def sendall(self, frame):
            self.frames.append(bytes(frame))

    socket = Socket()
    monkeypatch.setattr(translator_worker.context, "cl_socket", socket, raising=False)
    text, label = sample()
    streamed, plain = translator_worker.run(Request(json.dumps({"text": text, "stream": True}), JSON),
                                            Request(text, TEXT))
    assert streamed.status == plain.status == 200
    assert streamed.body["translation"] == plain.body["translation"] == label
    assert len(socket.frames) == len(tokenize(label))
    assert all(b"req-0" in frame and b"req-1" not in frame for frame in socket.frames)
    assert b'"token":"' + tokenize(label)[0].encode() + b'"' in socket.frames[0]


def test_explanation_is_the_attention_matrix(translator_worker):
    text, label = sample()
    reply = translator_worker.run_one(Request(text, TEXT, headers={"explain": "True"}))
    assert reply.status == 200 and reply.body["translation"] == label
    attention = reply.body["attention"]
    assert len(attention) == len(tokenize(text)) == len(reply.body["source_tokens"])
    assert all(len(row) == len(reply.body["tokens"]) for row in attention)
    for column in zip(*attention):
        assert sum(column) == pytest.approx(1.0, abs=2e-3)


@pytest.mark.slow
@pytest.mark.trained
def test_streams_tokens_over_http_before_the_final_reply(tmp_path):
    """A private TorchServe with the translator alone: "stream": true (JSON lines) and Accept: text/event-stream
    (server-sent events) each get an HTTP chunk per token, then the full reply in a chunk of its own; a plain request
    after them is answered normally. That each token leaves the worker as it is decoded, before the reply exists, is
    asserted in-process (test_in_a_batch_only_the_streaming_request_streams): over HTTP the arrival times of chunks
    a few milliseconds apart would say nothing on a busy machine."""
    from tests.fixtures.servers import running, store_with

    text, label = sample()
    with running(tmp_path / "ts", model_store=store_with(tmp_path / "store", "translator"),
                 expect_ready=1) as server:
        for headers, body, sse in (({"Content-Type": JSON}, json.dumps({"text": text, "stream": True}), False),
                                   ({"Content-Type": TEXT, "Accept": "text/event-stream"}, text, True)):
            reply = server.predict("translator", body.encode(), headers=headers, stream=True)
            assert reply.status_code == 200
            arrivals = list(reply.iter_content(None))  # one item per HTTP chunk
            data = b"".join(arrivals).decode()
            events = ([event.removeprefix("data: ") for event in data.split("\n\n") if event] if sse
                      else [line for line in data.split("\n") if line])
            messages = [json.loads(event) for event in events]
            assert len(arrivals) > 1, f"one chunk only: {data[:300]}"
            assert [m["token"] for m in messages[:-1]] == tokenize(label)
            assert messages[-1]["translation"] == label and messages[-1]["tokens"] == tokenize(label)
            assert b'"token"' in arrivals[0] and b"translation" not in arrivals[0]
            assert reply.headers.get("Content-Type", "").startswith("text/event-stream" if sse else
                                                                    "application/x-ndjson")
        plain = server.predict("translator", text.encode(), headers={"Content-Type": TEXT})
        assert plain.status_code == 200 and plain.json()["translation"] == label



def test_a_greedy_output_cut_by_max_length_scores_only_the_tokens_it_emits():
    import torch

    from models.translator import EOS_ID, SOS_ID, Seq2Seq, greedy

    torch.manual_seed(0)
    model = Seq2Seq(12, 12, dim=8, hidden=16).eval()
    with torch.no_grad():  # never <eos>: max_length cuts every output
        model.out.bias[EOS_ID] = -100.0
    source = torch.tensor([[5, 6, 7], [8, 9, 0]])
    for row, (tokens, attention, score, ended) in enumerate(greedy(model, source, max_length=3)):
        assert len(tokens) == 3 and not ended and attention.shape[0] == 3  # a row per emitted token, no more
        states, keys, mask, hidden = model.encode(source[row : row + 1])
        previous, expected = torch.tensor([SOS_ID]), 0.0
        with torch.inference_mode():
            for token in tokens:
                log_probs, hidden, _ = model.step(previous, hidden, states, keys, mask)
                expected += float(log_probs[0, token])
                previous = torch.tensor([token])
        assert score == pytest.approx(expected, abs=1e-5)
