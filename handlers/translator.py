"""translator: text -> {"translation", "tokens", "unknown", "beam", "complete", "log_probability", "model", "version"}.

The default model turns English number names into French ones (models/translator.py, docs/models/translator.md).

Input: a text/plain body (any charset of handlers/common.py's ``CHARSETS``), a JSON string, or JSON
``{"text": "...", "beam": 1..max_beam, "max_length": 1..max_target_tokens, "stream": bool}`` (only "text" is
required). ``beam`` 1 (the default) is greedy decoding; more is beam search of that width. ``max_length`` bounds the
output tokens (default and most: the manifest's ``max_target_tokens``); ``"complete": false`` says the translation
stopped there rather than on <eos>. A text of more than the manifest's ``max_source_tokens`` tokens (or
``MAX_TEXT_CHARS`` characters) is refused with 413 ``TooManyTokens`` (``TextTooLong``). A word the model never saw
becomes <unk>: the reply lists those words in ``"unknown"``.

Streaming: JSON ``"stream": true`` or an ``Accept: text/event-stream`` header sends each token as it is decoded,
through TorchServe's intermediate responses (HTTP chunked), then the full reply as the last chunk. The chunks are
``{"token": "...", "index": i}`` JSON lines (Content-Type application/x-ndjson), or with ``Accept:
text/event-stream`` server-sent events (``data: {...}`` and a blank line; the last event is the full reply).
Streaming decodes greedily: beam search's tokens are final only when the search ends, so ``stream`` with ``beam`` >
1 is a 400. In a batch, each streaming request streams and the others are answered as usual.

Explanations (``/explanations``): the reply plus ``"method": "attention"``, ``source_tokens`` and ``attention``, the
decoder's attention weights as a [source token][output token] matrix (each column sums to 1).
"""

import json
import os

import torch
from ts.handler_utils.utils import send_intermediate_predict_response

from handlers.common import BundleHandler, RequestError, compact_json, decode_text, quote
from models.translator import PAD_ID, UNK_ID, UNK_TOKEN, beam_search, detokenize, greedy, tokenize

MAX_TEXT_CHARS = 2000
"""Characters a text may have before it is tokenised (the token cap is far lower; this bounds the tokenising)."""
OPTIONS = {"text", "beam", "max_length", "stream"}
EVENT_STREAM = "text/event-stream"
NDJSON = "application/x-ndjson"


class TranslatorHandler(BundleHandler):
    """Greedy or beam-search decoding of one text per request; streaming per request."""

    def initialize(self, context):
        super().initialize(context)
        self.source_vocab = self._vocab("source_vocab")
        self.target_vocab = self._vocab("target_vocab")
        self.source_index = {token: i for i, token in enumerate(self.source_vocab)}
        self.max_source_tokens = int(self.artifact["max_source_tokens"])
        self.max_target_tokens = int(self.artifact["max_target_tokens"])
        self.max_beam = int(self.artifact.get("max_beam", 8))
        self.default_beam = int(self.artifact.get("default_beam", 1))
        self.streaming = {}  # idx -> "sse" | "ndjson", the requests of this batch that streamed

    def _vocab(self, key):
        with open(os.path.join(self.model_dir, self.artifact[key]), encoding="utf-8") as f:
            return json.load(f)

    # --- reading ---------------------------------------------------------------------------------------------------

    def parse(self, payload, as_json):
        return self.parse_request(None, {}, "body", payload, as_json)

    def parse_request(self, idx, row, name, payload, as_json):
        accept = (self.request_header(idx, "accept") or "") if idx is not None else ""
        options = {}
        if not as_json or isinstance(payload, str):
            text = decode_text(payload)
        elif isinstance(payload, dict):
            unknown = sorted(set(payload) - OPTIONS)
            if unknown or "text" not in payload:
                raise RequestError('JSON body must be {"text": "...", "beam": 1, "max_length": N, "stream": false} '
                                   f'with "text"; got keys {quote(sorted(payload))}', kind="InvalidField")
            text, options = payload["text"], payload
            if not isinstance(text, str):
                raise RequestError(f"text must be a string, got {type(text).__name__}", kind="InvalidField")
            text = decode_text(text)  # the shared NUL refusal
        else:
            raise RequestError(f'expected text or a JSON object {{"text": ...}}, got JSON {type(payload).__name__} '
                               "(one text per request)", kind="InvalidInput")
        beam = self._integer(options, "beam", self.default_beam, self.max_beam)
        max_length = self._integer(options, "max_length", self.max_target_tokens, self.max_target_tokens)
        stream = options.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(f"stream must be true or false, got {type(stream).__name__}", kind="InvalidField")
        sse = EVENT_STREAM in accept.lower()
        stream = stream or sse
        if stream and beam > 1:
            raise RequestError(f"stream needs beam 1 (greedy decoding): beam search's tokens are final only when the "
                               f"search ends; got beam {beam}", kind="InvalidField")
        if len(text) > MAX_TEXT_CHARS:
            raise RequestError(f"the text has {len(text)} characters; at most {MAX_TEXT_CHARS}", code=413,
                               kind="TextTooLong")
        tokens = tokenize(text)
        if not tokens:
            raise RequestError("the text has no words: nothing to translate", kind="EmptyText")
        if len(tokens) > self.max_source_tokens:
            raise RequestError(f"the text has {len(tokens)} tokens; this model reads at most {self.max_source_tokens} "
                               "(split it into sentences)", code=413, kind="TooManyTokens")
        ids = [self.source_index.get(token, UNK_ID) for token in tokens]
        return [{"idx": idx, "tokens": tokens, "ids": ids, "beam": beam, "max_length": max_length,
                 "stream": ("sse" if sse else "ndjson") if stream else None,
                 "unknown": [t for t, i in zip(tokens, ids) if i == UNK_ID]}], False

    @staticmethod
    def _integer(options, key, default, most):
        value = options.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise RequestError(f"{key} must be an integer from 1 to {most}, got {quote(json.dumps(value)[:40])}",
                               kind="InvalidField")
        return value

    # --- decoding --------------------------------------------------------------------------------------------------

    def collate(self, examples):
        return examples

    def predict(self, examples):
        """One decoding per example: first each streaming one (its tokens sent as they are decoded, so its first
        token waits for no other request), then the greedy ones in one batched loop, then each beam search."""
        outputs = [None] * len(examples)
        for i, example in enumerate(examples):
            if example["stream"]:
                source = torch.tensor([example["ids"]], device=self.device)
                outputs[i] = greedy(self.model, source, example["max_length"], on_token=self._streamer(example))[0]
        groups = {}  # max_length -> the greedy, non-streaming examples with it: one batched loop each
        for i, example in enumerate(examples):
            if example["beam"] == 1 and not example["stream"]:
                groups.setdefault(example["max_length"], []).append(i)
        for max_length, batched in groups.items():
            ids = torch.full((len(batched), max(len(examples[i]["ids"]) for i in batched)), PAD_ID, dtype=torch.long)
            for row, i in enumerate(batched):
                ids[row, :len(examples[i]["ids"])] = torch.tensor(examples[i]["ids"])
            for i, (tokens, attention, score, ended) in zip(batched, greedy(self.model, ids.to(self.device),
                                                                             max_length)):
                outputs[i] = (tokens, attention[:, :len(examples[i]["ids"])], score, ended)
        for i, example in enumerate(examples):
            if example["beam"] > 1:
                source = torch.tensor([example["ids"]], device=self.device)
                outputs[i] = beam_search(self.model, source, example["beam"], example["max_length"])
        return outputs

    def output_rows(self, outputs):
        return outputs

    def _streamer(self, example):
        """on_token for ``example``: sends each decoded token as an intermediate response of its request."""
        idx, kind = example["idx"], example["stream"]
        socket_there = hasattr(self.context, "cl_socket")  # in-process test workers have no frontend socket
        count = [0]

        def on_token(_row, token_id):
            body = compact_json({"token": self.target_vocab[token_id], "index": count[0]})
            count[0] += 1
            if idx is None or not socket_there:
                return
            if idx not in self.streaming:
                self.streaming[idx] = kind
                self.context.set_response_content_type(idx, EVENT_STREAM if kind == "sse" else NDJSON)
            send_intermediate_predict_response({idx: frame(body, kind)}, {idx: self.context.request_ids[idx]},
                                               "Intermediate Prediction success", 200, self.context)

        return on_token

    def handle(self, data, context):
        self.streaming = {}
        replies = super().handle(data, context)
        for idx, kind in self.streaming.items():  # the full reply is the stream's last chunk, framed like the others
            replies[idx] = frame(replies[idx], kind)
        return replies

    # --- replies ---------------------------------------------------------------------------------------------------

    def format(self, example, output):
        tokens, _, score, ended = output
        words = [self.target_vocab[i] for i in tokens]
        return {"translation": detokenize(words), "tokens": words, "unknown": example["unknown"],
                "beam": example["beam"], "complete": bool(ended), "log_probability": round(float(score), 4),
                "model": self.model_name, "version": self.version}

    def explain(self, examples):
        """The reply and the attention weights: ``attention[i][j]``, the weight of source token i when output token
        j was decoded (<eos> left out)."""
        replies = []
        for example, output in zip(examples, self.predict([{**e, "stream": None} for e in examples])):
            tokens, attention = output[0], output[1]
            matrix = attention[:len(tokens), :len(example["ids"])].T
            replies.append({**self.format(example, output), "method": "attention",
                            "source_tokens": [UNK_TOKEN if i == UNK_ID else t
                                              for t, i in zip(example["tokens"], example["ids"])],
                            "attention": [[round(float(w), 4) for w in row] for row in matrix]})
        return replies


def frame(body, kind):
    """One chunk of a stream: a JSON line, or a server-sent event."""
    return b"data: " + body + b"\n\n" if kind == "sse" else body + b"\n"

