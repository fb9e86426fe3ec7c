"""JSON {"x": [x1, x2]} -> {"y": y}."""

import torch

from handlers.common import BundleHandler, RequestError, decode_json, finite_number


class TinyHandler(BundleHandler):
    def parse(self, payload, as_json):
        document = payload if as_json else decode_json(payload)
        values = document.get("x") if isinstance(document, dict) else None
        if not isinstance(values, list) or len(values) != 2:
            raise RequestError('the body must be {"x": [x1, x2]}', kind="InvalidInput")
        return [torch.tensor([finite_number(v, "x") for v in values])], False

    def collate(self, examples):
        return torch.stack(examples)

    def format(self, example, output):
        return {"y": round(float(output[0]), 4)}

    def label_of(self, reply):
        return None
