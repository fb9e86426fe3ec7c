"""The detector's data and training: the composed set is exact and deterministic, the VOC and COCO loaders read
tiny data sets written here in their own formats, and a short training run on each writes a servable artifact."""

import json
import subprocess
import sys
from unittest import mock
from xml.etree import ElementTree

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from models import available_cpus, read_manifest
from tests.cli import CPU_ONLY
from scripts.server import ROOT
from train import detector
from train.common import DataError

TINY_RUN = ["--epochs", "1", "--batch-size", "2", "--min-size", "64", "--max-size", "96", "--width", "8"]


@pytest.fixture(scope="module")
def composed():
    return detector.composed_data(detector.Path("data"), seed=3, n_train=6, n_heldout=3)


def test_composed_images_are_deterministic_and_exact(composed):
    again = detector.composed_data(detector.Path("data"), seed=3, n_train=6, n_heldout=3)
    for index in range(6):
        first, second = composed.train[index], again.train[index]
        assert np.array_equal(first.image, second.image) and np.array_equal(first.masks, second.masks)
        assert first.image.shape == (128, 128, 3) and first.masks.shape[1:] == (128, 128)
        assert np.array_equal(first.boxes, detector.boxes_of(first.masks)), "boxes are the masks' tight boxes"
        assert first.masks.sum(axis=0).max() == 1, "an occluded object's mask loses what covers it"
        assert set(first.labels) <= set(range(1, len(detector.FASHION_GROUPS) + 1))
    assert not np.array_equal(composed.train[0].image, composed.train[1].image)
    assert sum(len(composed.train[i].labels) for i in range(6)) >= 12, "several objects per image"


def test_heldout_backgrounds_are_photos_training_never_sees():
    assert not set(detector.HELDOUT_PHOTOS) & set(detector.TRAIN_PHOTOS)
    assert all(path.is_file() for path in detector.HELDOUT_PHOTOS + detector.TRAIN_PHOTOS)


# --- Pascal VOC --------------------------------------------------------------------------------------------------

def write_voc(root, objects_per_image):
    """A VOC2012 tree: JPEGs, XML annotations and the train/val lists; objects are (name, box, difficult)."""
    base = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / folder).mkdir(parents=True)
    for stem, objects in objects_per_image.items():
        image = Image.new("RGB", (96, 72), (90, 120, 150))
        for _, (x1, y1, x2, y2), _ in objects:
            ImageDraw.Draw(image).rectangle((x1 - 1, y1 - 1, x2 - 1, y2 - 1), fill=(240, 200, 40))
        image.save(base / "JPEGImages" / f"{stem}.jpg")
        annotation = ElementTree.Element("annotation")
        ElementTree.SubElement(annotation, "filename").text = f"{stem}.jpg"
        for name, box, difficult in objects:
            element = ElementTree.SubElement(annotation, "object")
            ElementTree.SubElement(element, "name").text = name
            ElementTree.SubElement(element, "difficult").text = str(difficult)
            bndbox = ElementTree.SubElement(element, "bndbox")
            for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
                ElementTree.SubElement(bndbox, key).text = str(value)
        ElementTree.ElementTree(annotation).write(base / "Annotations" / f"{stem}.xml")
    stems = list(objects_per_image)
    (base / "ImageSets/Main/train.txt").write_text("\n".join(stems[:-1]) + "\n")
    (base / "ImageSets/Main/val.txt").write_text(stems[-1] + "\n")


VOC_OBJECTS = {"a": [("dog", (11, 21, 40, 60), 0), ("car", (50, 5, 90, 30), 1)],
               "b": [("person", (30, 10, 70, 70), 0)],
               "c": [("dog", (5, 5, 45, 35), 0), ("bird", (60, 40, 80, 60), 0)]}


def test_voc_loader_reads_boxes_labels_and_skips_difficult(tmp_path):
    write_voc(tmp_path, VOC_OBJECTS)
    example = detector.VocImages(tmp_path, "2012", "train")[0]
    assert example.image.shape == (72, 96, 3)
    assert example.boxes.tolist() == [[10.0, 20.0, 40.0, 60.0]]  # 1-based inclusive -> 0-based edges
    assert [detector.VOC_LABELS[label - 1] for label in example.labels] == ["dog"]
    assert example.masks[0].sum() == 30 * 40, "VOC has no masks: the box is the mask"


def test_voc_training_writes_an_artifact_without_mask_ap(tmp_path):
    write_voc(tmp_path / "voc", VOC_OBJECTS)
    metrics = detector.main(["--dataset", "voc", "--data-dir", str(tmp_path / "voc"), "--out", str(tmp_path / "out"),
                             *TINY_RUN])
    manifest = read_manifest(tmp_path / "out")
    assert manifest["labels"] == list(detector.VOC_LABELS) and manifest["real_masks"] is False
    assert metrics["dataset"]["n_train"] == 2 and metrics["dataset"]["n_test"] == 1
    assert "box_map_50" in metrics["test"] and "mask_map_50" not in metrics["test"]


def layout(folder):
    """The manifest, each export's measured difference to eager left out: the export check runs in the process's
    torch threads, whose float order moves near-tied detections of a tiny model by a few 1e-5."""
    manifest = read_manifest(folder)
    exports = {fmt: {key: value for key, value in entry.items() if key != "max_abs_diff"}
               for fmt, entry in manifest.get("exports", {}).items()}
    return {**manifest, "exports": exports}


@pytest.mark.slow  # trains, twice
def test_torchrun_with_two_cpu_processes_writes_the_single_process_layout(tmp_path):
    common = ["--train-images", "4", "--heldout-images", "2", *TINY_RUN[:2], *TINY_RUN[4:], "--batch-size", "1"]
    detector.main([*common, "--out", str(tmp_path / "single")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*torchrun, "-m", "train.detector", *common, "--out", str(tmp_path / "ddp")], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=CPU_ONLY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
    assert layout(tmp_path / "ddp") == layout(tmp_path / "single")
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and "mask_map_50" in metrics["test"]
    assert metrics["torch_threads"] == max(1, available_cpus() // 2)  # each process its share of the CPUs
    # rank 0 alone says where the data came from, evaluates and reports
    assert [result.stdout.count(text) for text in ("Fashion-MNIST from", "4 training, 2 held-out", "held-out box_map")] \
        == [1, 1, 1], result.stdout


def test_missing_voc_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="no Pascal VOC 2012 'train' set under"):
        detector.main(["--dataset", "voc", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])


# --- COCO --------------------------------------------------------------------------------------------------------

def write_coco(root):
    """Three images and a COCO JSON: a polygon, an uncompressed RLE, a compressed RLE and a crowd region."""
    root.mkdir()
    square = np.zeros((64, 80), np.uint8)
    square[10:30, 20:50] = 1
    compressed = mask_utils.encode(np.asfortranarray(square))
    uncompressed = {"size": [64, 80], "counts": [int(run) for run in rle_runs(square)]}
    annotations = [
        {"image_id": 1, "category_id": 7, "segmentation": [[5, 5, 35, 5, 35, 25, 5, 25]], "bbox": [5, 5, 30, 20]},
        {"image_id": 1, "category_id": 7, "segmentation": {**compressed, "counts": compressed["counts"].decode()},
         "bbox": [20, 10, 30, 20], "iscrowd": 1},
        {"image_id": 2, "category_id": 3, "segmentation": uncompressed, "bbox": [20, 10, 30, 20]},
        {"image_id": 3, "category_id": 3, "segmentation": {**compressed, "counts": compressed["counts"].decode()},
         "bbox": [20, 10, 30, 20]},
    ]
    for i, annotation in enumerate(annotations, start=1):
        annotation.update(id=i, area=600, iscrowd=annotation.get("iscrowd", 0))
    images = []
    for image_id in (1, 2, 3):
        Image.new("RGB", (80, 64), (30 * image_id, 90, 160)).save(root / f"{image_id}.jpg")
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 80, "height": 64})
    document = {"images": images, "annotations": annotations,
                "categories": [{"id": 3, "name": "kite"}, {"id": 7, "name": "umbrella"}]}
    (root / "instances.json").write_text(json.dumps(document))
    return root / "instances.json", square


def rle_runs(mask):
    """Column-major run lengths of a binary mask, starting with zeros (COCO's uncompressed RLE)."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], changes, [len(flat)]])
    runs = np.diff(edges).tolist()
    return runs if flat[0] == 0 else [0, *runs]


def test_coco_loader_reads_polygons_and_rle_and_skips_crowds(tmp_path):
    annotations, square = write_coco(tmp_path / "coco")
    data = detector.coco_data(tmp_path / "coco", annotations, seed=0, test_fraction=0.34)
    assert data.labels == ["kite", "umbrella"]
    examples = {int(image_id): split[i] for split in (data.train, data.heldout)
                for i, image_id in enumerate(split.image_ids)}
    polygon = examples[1]
    assert len(polygon.labels) == 1 and polygon.labels[0] == 2, "the crowd region is left out"
    assert polygon.boxes.tolist() == [[5, 5, 35, 25]] and 550 <= polygon.masks[0].sum() <= 700
    for image_id in (2, 3):  # uncompressed and compressed RLE
        assert np.array_equal(examples[image_id].masks[0], square) and examples[image_id].labels.tolist() == [1]


def test_coco_training_writes_an_artifact_with_mask_ap(tmp_path):
    annotations, _ = write_coco(tmp_path / "coco")
    metrics = detector.main(["--dataset", "coco", "--data-dir", str(tmp_path / "coco"), "--ann", str(annotations),
                             "--out", str(tmp_path / "out"), "--test-fraction", "0.34", *TINY_RUN])
    assert read_manifest(tmp_path / "out")["labels"] == ["kite", "umbrella"]
    assert {"box_map", "box_map_50", "mask_map", "mask_map_50"} <= set(metrics["test"])


def test_coco_needs_annotations(tmp_path):
    with pytest.raises(DataError, match="--ann"):
        detector.main(["--dataset", "coco", "--data-dir", str(tmp_path)])


def test_coco_weights_without_internet_is_one_clear_line(tmp_path):
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    offline = OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    with mock.patch.object(type(MaskRCNN_ResNet50_FPN_Weights.COCO_V1), "get_state_dict", side_effect=offline):
        with pytest.raises(DataError, match="--weights coco: cannot download") as error:
            detector.main(["--weights", "coco", "--train-images", "2", "--heldout-images", "1",
                           "--out", str(tmp_path / "out")])
    assert "\n" not in str(error.value) and "train from scratch" in str(error.value)
