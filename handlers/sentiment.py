"""Chinese review sentiment: review text -> {"label": "positive"|"negative", "score": probability of that label}.

``score`` is the calibrated probability of the returned label, softmax(logits / T) with the temperature T fitted on
the training run's held-out split (manifest ``temperature``): of the reviews scored 0.8, about 80 % are labelled
right on data like the held-out split. It is always >= 0.5 (two labels); on other domains it is less reliable.
The model reads a text's first ``max_tokens`` tokens (manifest): a longer text is labelled on those, and its reply
says so with ``"truncated": true`` and ``"tokens_read"``; otherwise ``"truncated": false``.
"""

import json
import os

import torch

from handlers.common import BundleHandler, RequestError, bounded_list, decode_text, integrated_gradients, quote
from models.sentiment import PAD_ID, calibrated_probabilities, text_encoder, tokenizer

MAX_TEXTS = 256
"""Texts in one JSON list; longer lists are refused with 413."""


class SentimentHandler(BundleHandler):
    """Accepts raw UTF-8 text (Content-Type text/plain), JSON {"text": "..."}, or a JSON list of texts (-> a list)."""

    def initialize(self, context):
        super().initialize(context)
        with open(os.path.join(self.model_dir, self.artifact["vocab"]), encoding="utf-8") as f:
            vocab = json.load(f)
        self.max_tokens = self.artifact["max_tokens"]
        # one token more than the model reads: a text that has it is truncated, and its reply says so
        self.encode_text = text_encoder(self.artifact["tokenizer"], vocab, self.max_tokens + 1)
        self.tokenize = tokenizer(self.artifact["tokenizer"])  # the token strings, for explanations
        self.temperature = float(self.artifact.get("temperature", 1.0))

    def parse(self, payload, as_json):
        if not as_json:
            return [self._example(decode_text(payload), "body")], False
        if isinstance(payload, list):
            texts = bounded_list(payload, MAX_TEXTS, "texts")
            return [self._example(text, f"text {i}") for i, text in enumerate(texts)], True
        if isinstance(payload, dict):
            if set(payload) != {"text"}:
                raise RequestError('JSON body must be {"text": "..."} or a list of texts; got keys '
                                   f"{quote(sorted(payload))}", kind="InvalidField")
            return [self._example(payload["text"], "text")], False
        return [self._example(payload, "body")], False  # a JSON string

    def _example(self, text, field):
        """(text, ids of its first ``max_tokens`` tokens, whether it has more); ``field`` names it in errors."""
        if not isinstance(text, str):
            raise RequestError(f"{field} must be a string, got {type(text).__name__}", kind="InvalidField")
        ids = self.encode_text(text)
        if not len(ids):
            raise RequestError(f"{field} is empty: nothing to classify", kind="EmptyText")
        return text, ids[: self.max_tokens], len(ids) > self.max_tokens

    oip_input, oip_output_names = ("text", "BYTES"), ("label", "score")

    def oip_examples(self, tensor):
        return [self._example(decode_text(text), f"text {i}")
                for i, text in enumerate(bounded_list(tensor.data, MAX_TEXTS, "texts"))]

    def collate(self, examples):
        ids = torch.full((len(examples), max(len(ids) for _, ids, _ in examples)), PAD_ID, dtype=torch.long)
        for row, (_, example_ids, _) in enumerate(examples):
            ids[row, : len(example_ids)] = torch.from_numpy(example_ids)
        return ids

    def format(self, example, output):
        probabilities = calibrated_probabilities(output, self.temperature)
        best = int(probabilities.argmax())
        reply = {"label": self.labels[best], "score": round(float(probabilities[best]), 4), "truncated": example[2]}
        if example[2]:
            reply["tokens_read"] = self.max_tokens
        return reply

    def explain(self, examples):
        """Per-token Integrated Gradients (on the embedding layer) towards the predicted label; padding as baseline."""
        ids = self.collate(examples).to(self.device)
        with torch.inference_mode():
            logits = self.model(ids)
        predicted = logits.argmax(dim=1)
        scores = integrated_gradients(self.model, ids, predicted, torch.full_like(ids, PAD_ID),
                                      layer=self.model.embedding).sum(dim=-1)
        return [{**self.format(example, row_logits.cpu()), "method": "LayerIntegratedGradients",
                 "tokens": [{"token": token, "attribution": round(float(score), 5)}
                            for token, score in zip(self.tokenize(example[0], self.max_tokens), row_scores)]}
                for example, row_logits, row_scores in zip(examples, logits, scores)]
