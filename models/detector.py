"""Object detection with instance masks: torchvision's Mask R-CNN, on a small backbone built here or on ResNet-50.

Both take a list of float images [3, H, W] in 0..1 of any sizes and return, per image, ``boxes`` [N, 4] (x1, y1, x2,
y2), ``labels`` [N] (1-based; 0 is the background), ``scores`` [N] and ``masks`` [N, 1, H, W] (probabilities).
``working_size`` is the resize rule of torchvision's transform, which the handler applies itself so that masks are
pasted at a bounded size and scaled to the client's frame afterwards.
"""

import math
from collections import OrderedDict

import numpy as np
from pycocotools import mask as mask_utils
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign


def working_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(height, width) torchvision's ``GeneralizedRCNNTransform`` resizes an image to: the short side to
    ``min_size`` unless that makes the long side exceed ``max_size``, aspect kept."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


def encode_mask(mask: np.ndarray) -> dict:
    """A binary mask [H, W] as COCO RLE, its counts as text (JSON-able; ``pycocotools.mask.decode`` reads it back
    after ``counts.encode()``)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(n) for n in rle["size"]], "counts": rle["counts"].decode("ascii")}


def conv_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + ReLU layers, the first with stride 2."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def small_backbone(width: int, fpn_channels: int) -> BackboneWithFPN:
    """Four conv stages (strides 2, 4, 8, 16; width, 2x, 4x, 8x channels) under a feature pyramid on the last three,
    plus a max-pooled level: feature maps "0", "1", "2" (strides 4, 8, 16) and "pool" (stride 32)."""
    channels = [width, 2 * width, 4 * width, 8 * width]
    body = nn.Sequential(OrderedDict(
        (f"stage{i}", conv_stage(3 if i == 0 else channels[i - 1], channels[i])) for i in range(4)))
    return BackboneWithFPN(body, {"stage1": "0", "stage2": "1", "stage3": "2"}, channels[1:], fpn_channels)


def SmallMaskRCNN(num_classes: int, width: int = 16, fpn_channels: int = 64, mask_channels: int = 32,
                  min_size: int = 128, max_size: int = 256) -> MaskRCNN:
    """Mask R-CNN's heads, slimmed to the small backbone: two anchor sizes per pyramid level (12-160 px, three
    aspect ratios), a 128-wide box head, a two-layer mask head, fewer proposals and sampled regions than for COCO.
    Both heads pool every region from the stride-4 level: the objects here are 12-64 px at the working size, which
    FPN's rule (level 4 + log2(size / 224), clamped) sends to the finest level anyway, and stride 4 gives a 40 px
    object 10 feature pixels where stride 8 gave it 5 (box AP@0.5 0.78 -> 0.79, mask 0.74 -> 0.75 at equal steps).

    ``num_classes`` counts the background.
    """
    levels = ["0"]
    return MaskRCNN(
        small_backbone(width, fpn_channels), min_size=min_size, max_size=max_size,
        rpn_anchor_generator=AnchorGenerator(((12, 20), (28, 40), (56, 80), (112, 160)), ((0.5, 1.0, 2.0),) * 4),
        rpn_pre_nms_top_n_train=150, rpn_post_nms_top_n_train=150,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 1),  # one sample per bin (a bin is about a feature pixel here)
        box_head=TwoMLPHead(fpn_channels * 7 * 7, 128),
        box_predictor=FastRCNNPredictor(128, num_classes),
        box_batch_size_per_image=32, box_score_thresh=0.0,
        mask_roi_pool=MultiScaleRoIAlign(levels, 14, 1),
        mask_head=MaskRCNNHeads(fpn_channels, (mask_channels,) * 2, 1),
        mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes),
    )


def MaskRCNNResNet50FPN(num_classes: int, min_size: int = 800, max_size: int = 1333,
                        frozen_batchnorm: bool = True) -> MaskRCNN:
    """torchvision's ``maskrcnn_resnet50_fpn`` layout with ``num_classes`` classes and no downloaded weights.

    ``frozen_batchnorm``: the layout of torchvision's pretrained weights (set when fine-tuning them); train from
    scratch with plain BatchNorm.
    """
    norm_layer = FrozenBatchNorm2d if frozen_batchnorm else nn.BatchNorm2d
    trainable = 3 if frozen_batchnorm else 5
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=norm_layer), trainable)
    return MaskRCNN(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size, box_score_thresh=0.0)


ARCHITECTURES = {"SmallMaskRCNN": SmallMaskRCNN, "MaskRCNNResNet50FPN": MaskRCNNResNet50FPN}


EXPORT_BLOCKER = ("torch.export.export(model, ([image],)) (strict or not, one image [3, H, W]) fails: "
                  "GuardOnDataDependentSymNode: Could not guard on data-dependent expression 4*u1 > 4000 (unhinted: "
                  "4*u1 > 4000).  (Size-like symbols: u1), at torchvision/ops/boxes.py:86 in batched_nms, which picks "
                  "its NMS by how many RPN proposals survive the score filter, a count known only at run time "
                  "(forcing either branch fails next on Eq(4*u1, 0), boxes.py:103 in _batched_nms_coordinate_trick)")
"""Why torch.export cannot capture Mask R-CNN (torch 2.14, torchvision 0.29): what AOTInductor and the dynamo ONNX
exporter both start from."""


def export_example(manifest: dict, batch_size: int) -> dict:
    """What train/export.py may export: nothing, and the manifest says why for each format.

    Mask R-CNN takes a list of images of any size and returns a dict of boxes, labels, scores and masks per image;
    train/export.py exports positional tensors with a batch axis 0. torchvision's own routes (torch.jit.script, and
    the TorchScript-based ONNX exporter, one image per call) do give files that match the eager model, but neither
    fits that machinery nor the handler's runtime call (a list of images in, a list of dicts out): see
    docs/exports.md."""
    return {"unsupported": {
        "torchscript": "train/export.py traces (torch.jit.trace) positional tensors with a batch axis 0; Mask R-CNN "
                       "takes a list of images of any size and returns a dict per image. torch.jit.script(model) "
                       "works (outputs equal to eager's, as (losses, detections)) but is not wired in",
        "onnx": "torch.onnx.export(..., dynamo=True), which train/export.py uses, fails in torch.export "
                "(TorchExportError: Failed to export the model with torch.export): " + EXPORT_BLOCKER + ". The "
                "TorchScript-based exporter (dynamo=False, opset 18, one image per call, dynamic H and W) works and "
                "matches eager in ONNX Runtime on the registry's samples, but is not wired in",
        "aoti": EXPORT_BLOCKER + "; AOTInductor compiles that export",
    }}
