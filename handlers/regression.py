"""Tabular regression: a JSON object of named features -> {"prediction": y}; a list of objects -> a list, in order."""

import numpy as np
import torch

from handlers.common import (BundleHandler, RequestError, bounded_list, decode_json, finite_number,
                             integrated_gradients, quote)

MAX_STANDARD_SCORE = 1e6
"""Features further than this many training standard deviations from the mean are refused: the linear model
would extrapolate to meaningless (or, past float32's range, infinite) predictions."""

MAX_ROWS = 1024
"""Rows in one JSON list; longer lists are refused with 413."""

MAX_UNKNOWN_SHOWN = 5
"""Unknown keys of a row quoted in its error message (every missing or invalid feature is named)."""


class RegressionHandler(BundleHandler):
    """Every feature of the manifest must be present, known and a finite number; otherwise 400 naming the field."""

    def initialize(self, context):
        super().initialize(context)
        self.features = self.artifact["features"]
        self.mean = np.asarray(self.artifact["feature_mean"], dtype=np.float32)
        self.std = np.asarray(self.artifact["feature_std"], dtype=np.float32)
        self.target_mean, self.target_std = self.artifact["target_mean"], self.artifact["target_std"]

    def parse(self, payload, as_json):
        document = payload if as_json else decode_json(payload)
        if isinstance(document, list):
            rows = bounded_list(document, MAX_ROWS, "rows")
            return [self._row(row, f"row {i}") for i, row in enumerate(rows)], True
        return [self._row(document, "")], False

    def _row(self, row, where):
        """Standardised features of one JSON object; ``where`` locates it in a list for error messages."""
        if not isinstance(row, dict):
            raise RequestError(f"{where or 'the body'} must be a JSON object of features {self.features}, "
                               f"got {type(row).__name__}", kind="InvalidInput")
        unknown = [name for name in row if name not in self.features]
        problems = [f"unknown feature {quote(name)}" for name in unknown[:MAX_UNKNOWN_SHOWN]]
        if len(unknown) > MAX_UNKNOWN_SHOWN:
            problems.append(f"{len(unknown) - MAX_UNKNOWN_SHOWN} more unknown features")
        problems += [f"missing feature {quote(name)}" for name in self.features if name not in row]
        values = []
        for name in self.features:
            if name in row:
                try:
                    values.append(finite_number(row[name], name))
                except RequestError as err:
                    problems.append(err.message)
        if not problems:
            standardised = (np.array(values) - self.mean) / self.std  # float64: huge values must not overflow here
            problems = [f"field {quote(name)} = {value} is far outside the range this model was trained on"
                        for name, value, z in zip(self.features, values, standardised) if abs(z) > MAX_STANDARD_SCORE]
        if problems:
            raise RequestError(f"{where + ': ' if where else ''}{'; '.join(problems)} (features: {self.features})",
                               kind="InvalidField")
        return standardised.astype(np.float32)

    oip_input = ("features", "FP32")
    oip_output_names = ("prediction",)

    def oip_examples(self, tensor):
        """Rows of features in the manifest's order, checked as the JSON rows are."""
        if len(tensor.shape) != 2 or tensor.shape[1] != len(self.features):
            raise RequestError(f"input 'features' must have shape [N, {len(self.features)}], got {tensor.shape} "
                               f"(features in this order: {self.features})", kind="InvalidShape")
        rows = bounded_list(tensor.data.tolist(), MAX_ROWS, "rows")
        return [self._row(dict(zip(self.features, row)), f"row {i}") for i, row in enumerate(rows)]

    def collate(self, examples):
        return torch.from_numpy(np.stack(examples))

    def format(self, example, output):
        return {"prediction": round(self._unscale(output), 4)}

    def label_of(self, reply):
        return None  # a number, not a label: PredictionsByLabel does not count regressions

    def _unscale(self, standardised):
        return float(standardised) * self.target_std + self.target_mean

    def explain(self, examples):
        """Per-feature Integrated Gradients in target units, from the training mean (all-zero input) as baseline."""
        rows = self.collate(examples).to(self.device)
        baseline = torch.zeros_like(rows)
        with torch.inference_mode():
            predictions, baseline_prediction = self.model(rows), self.model(baseline[:1])
        attributions = integrated_gradients(self.model, rows, None, baseline) * self.target_std
        return [{"prediction": round(self._unscale(prediction), 4),
                 "baseline_prediction": round(self._unscale(baseline_prediction[0]), 4),
                 "method": "IntegratedGradients",
                 "attributions": {name: round(float(value), 4) for name, value in zip(self.features, row)}}
                for prediction, row in zip(predictions.cpu(), attributions)]
