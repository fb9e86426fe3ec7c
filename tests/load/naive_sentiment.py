"""The sentiment model behind a naive TorchServe handler: one request at a time, no batching.

The same model code and weights as handlers/sentiment.py (the manifest's tokenizer, vocabulary and architecture),
written the way a first custom handler usually is: a BaseHandler subclass whose ``handle`` tokenizes each request
and runs its own forward pass. The archive has no model-config.yaml: TorchServe's defaults (batchSize 1, one worker per
CPU core, torch's default thread count).
"""

import json
import os

import torch
from ts.torch_handler.base_handler import BaseHandler

from models.sentiment import ARCHITECTURES, encode, tokenizer


class NaiveSentimentHandler(BaseHandler):
    def initialize(self, context):
        model_dir = context.system_properties["model_dir"]
        with open(os.path.join(model_dir, "manifest.json"), encoding="utf-8") as f:
            self.manifest_ = json.load(f)
        with open(os.path.join(model_dir, self.manifest_["vocab"]), encoding="utf-8") as f:
            self.vocab_index = {token: i for i, token in enumerate(json.load(f))}
        self.model = ARCHITECTURES[self.manifest_["architecture"]](**self.manifest_["arch_kwargs"])
        self.tokenize = tokenizer(self.manifest_["tokenizer"])
        self.model.load_state_dict(torch.load(os.path.join(model_dir, "model.pt"), weights_only=True))
        self.model.eval()
        self.labels = self.manifest_["labels"]
        self.initialized = True

    def handle(self, data, context):
        replies = []
        for row in data:
            text = row.get("data") or row.get("body")
            if isinstance(text, (bytes, bytearray)):
                text = text.decode("utf-8")
            ids = encode(self.tokenize(text), self.vocab_index, self.manifest_["max_tokens"])
            with torch.no_grad():
                probabilities = torch.softmax(self.model(torch.tensor([ids])), dim=1)[0]
            best = int(probabilities.argmax())
            replies.append({"label": self.labels[best], "score": round(float(probabilities[best]), 4)})
        return replies
