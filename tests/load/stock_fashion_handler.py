"""What a user gets out of the box for the fashion weights: TorchServe's stock ``image_classifier`` handler.

As pytorch/serve's examples do, the subclass only replaces the image transform, here with the artifact's own input
spec (manifest.json in the archive: grey, resize, centre crop, mean/std); decoding, batching, inference and the
top-5 reply (class names from index_to_name.json) are ImageClassifier's. No model-config.yaml: TorchServe's
defaults apply (batchSize 1, one worker per CPU core, torch's default thread count).
"""

import json
from pathlib import Path

from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class StockFashionClassifier(ImageClassifier):
    def initialize(self, context):
        super().initialize(context)
        spec = json.loads((Path(context.system_properties["model_dir"]) / "manifest.json").read_text())["input"]
        self.image_processing = transforms.Compose([
            transforms.Grayscale(spec["channels"]),
            transforms.Resize(spec["resize"]),
            transforms.CenterCrop(spec["size"]),
            transforms.ToTensor(),
            transforms.Normalize(spec["mean"], spec["std"]),
        ])
