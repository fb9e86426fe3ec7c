"""--model-file of the stock fashion archive: TorchServe's BaseHandler builds ``FashionResNet()`` from the one class
defined here and loads artifacts/fashion/model.pt into it. The architecture is the one the archive's manifest.json
names (models/vision/resnet.py's ResNetSmall, with its arch_kwargs), so the state_dict loads as is."""

import json
from pathlib import Path

from models.vision.resnet import ResNet as _ResNet

_SPEC = json.loads((Path(__file__).resolve().parent / "manifest.json").read_text())


class FashionResNet(_ResNet):
    """models.vision.resnet.ResNetSmall(**arch_kwargs) as a class that takes no arguments."""

    def __init__(self):
        assert _SPEC["architecture"] == "ResNetSmall", "the stock benchmark path expects the default architecture"
        kwargs = {"in_channels": 1, "num_classes": 10, "width": 16, "blocks": 1, **_SPEC["arch_kwargs"]}
        super().__init__([kwargs.pop("blocks")] * 3, **kwargs)
