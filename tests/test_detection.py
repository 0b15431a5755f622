"""Detection agreement: YOLOv8 decoding with class-aware NMS, mAP@0.5 against a reference model's detections,
and the whole comparison on the YOLOv8n detector `nudenet` ships, fed real photos."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgelr.errors import EdgelrError
from edgelr.io.model import load
from edgelr.io.samples import samples_from_arrays
from edgelr.measure.detection import (
    Detections,
    decode_yolo,
    detection_agreement,
    map50,
    nms,
)

HALF = 51 / 101  # COCO 101-point AP when exactly half of the objects are found, nothing ranked above them


def scene(count: int = 6, classes: int = 3, seed: int = 0) -> Detections:
    """`count` well-separated boxes (a grid), classes round-robin, distinct scores."""
    rng = np.random.default_rng(seed)
    boxes = []
    for i in range(count):
        x, y = (i % 4) * 100 + 10, (i // 4) * 100 + 10
        w, h = rng.uniform(40, 80, 2)
        boxes.append([x, y, x + w, y + h])
    return Detections(np.array(boxes), np.linspace(0.9, 0.5, count), np.arange(count) % classes)


def subset(det: Detections, keep) -> Detections:
    return Detections(det.boxes[keep], det.scores[keep], det.classes[keep])


def test_identical_detections_score_one():
    ref = [scene(seed=0), scene(seed=1), Detections()]
    assert map50(ref, ref) == 1.0


def test_missing_half_of_the_objects():
    ref = [scene(8, classes=2, seed=s) for s in range(2)]  # per class: 4 objects in each image
    cand = [subset(d, np.arange(len(d)) < 4) for d in ref]  # the first 4 (two of each class) per image
    assert map50(ref, cand) == pytest.approx(HALF)


def test_boxes_shifted_below_the_iou_threshold_score_zero():
    ref = [scene(seed=0)]
    shifted = Detections(ref[0].boxes + np.array([45, 0, 45, 0]), ref[0].scores, ref[0].classes)  # w <= 80: IoU < 0.5
    assert map50(ref, [shifted]) == 0.0
    slight = Detections(ref[0].boxes + 2, ref[0].scores, ref[0].classes)
    assert map50(ref, [slight]) == 1.0


def test_wrong_classes_score_zero():
    ref = [scene(classes=3)]
    wrong = Detections(ref[0].boxes, ref[0].scores, (ref[0].classes + 1) % 3)
    assert map50(ref, [wrong]) == 0.0


def test_false_positives_ranked_below_the_true_ones_do_not_count():
    ref = [scene(classes=2)]
    extra = Detections(np.array([[500, 500, 560, 560], [600, 10, 640, 50], [10, 10, 30, 30]]), [0.1, 0.05, 0.01], [0, 1, 0])
    cand = Detections(np.concatenate([ref[0].boxes, extra.boxes]), np.concatenate([ref[0].scores, extra.scores]),
                      np.concatenate([ref[0].classes, extra.classes]))
    assert map50(ref, [cand]) == 1.0
    # ranked above them, they do
    above = Detections(cand.boxes, np.concatenate([ref[0].scores * 0.1, [0.95, 0.96, 0.97]]), cand.classes)
    assert map50(ref, [above]) < 1.0


def test_each_reference_box_is_matched_once():
    ref = [Detections([[0, 0, 100, 100]], [0.9], [0])]
    dup = [Detections([[0, 0, 100, 100], [1, 1, 101, 101]], [0.9, 0.8], [0, 0])]
    assert map50(ref, dup) == 1.0  # the duplicate is a false positive, ranked after the hit
    two = [Detections([[0, 0, 100, 100], [300, 0, 400, 100]], [0.9, 0.8], [0, 0])]
    cand = [Detections([[0, 0, 100, 100], [1, 1, 101, 101], [300, 0, 400, 100]], [0.9, 0.8, 0.7], [0, 0, 0])]
    # hit, false positive, hit: precision 1 up to recall 0.5, then 2/3
    assert map50(two, cand) == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_no_reference_detections_is_nan():
    empty = [Detections(), Detections()]
    assert math.isnan(map50(empty, empty))
    assert math.isnan(map50(empty, [scene(), Detections()]))


def test_classes_the_reference_never_detects_are_not_counted():
    ref = [scene(classes=2)]
    other = Detections([[300, 300, 400, 400]], [0.99], [7])
    cand = Detections(np.concatenate([ref[0].boxes, other.boxes]), np.concatenate([ref[0].scores, other.scores]),
                      np.concatenate([ref[0].classes, other.classes]))
    assert map50(ref, [cand]) == 1.0


def test_nms_suppresses_overlaps_within_a_class_only():
    boxes = np.array([[0, 0, 100, 100], [5, 5, 105, 105], [0, 0, 100, 100], [200, 200, 300, 300]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    assert nms(boxes, scores, np.array([0, 0, 1, 0])).tolist() == [0, 2, 3]
    assert nms(boxes, scores, np.array([0, 0, 0, 0])).tolist() == [0, 3]
    assert nms(boxes, scores, np.array([0, 1, 2, 3])).tolist() == [0, 1, 2, 3]
    assert nms(boxes, scores, np.array([0, 0, 1, 0]), max_det=2).tolist() == [0, 2]


def synthetic_output(classes: int = 3) -> np.ndarray:
    """[2, 4 + C, 10]: image 0 has two overlapping class-0 boxes, one class-1 box on the same spot and one
    far-off class-2 box; image 1 one class-2 box; everything else scores below 0.1."""
    out = np.zeros((2, 4 + classes, 10), np.float32)
    out[:, :4] = np.array([50, 50, 20, 20], np.float32)[None, :, None]
    out[:, 4:] = 0.01
    for a, (cx, cy, w, h, cls, score) in enumerate(
        [(50, 50, 40, 40, 0, 0.9), (52, 52, 40, 40, 0, 0.8), (50, 50, 40, 40, 1, 0.7), (200, 150, 60, 30, 2, 0.6)]
    ):
        out[0, :4, a] = cx, cy, w, h
        out[0, 4 + cls, a] = score
    out[1, :4, 5] = 100, 100, 10, 20
    out[1, 4 + 2, 5] = 0.5
    return out


@pytest.mark.parametrize("transposed", [False, True])
def test_decode_both_layouts(transposed):
    out = synthetic_output()
    dets = decode_yolo(out.transpose(0, 2, 1) if transposed else out, conf=0.25)
    assert len(dets) == 2
    first, second = dets
    assert first.classes.tolist() == [0, 1, 2]
    np.testing.assert_allclose(first.scores, [0.9, 0.7, 0.6])
    np.testing.assert_allclose(first.boxes, [[30, 30, 70, 70], [30, 30, 70, 70], [170, 135, 230, 165]])
    assert first.boxes.dtype == np.float32 and first.classes.dtype == np.int64
    np.testing.assert_allclose(second.boxes, [[95, 90, 105, 110]])
    assert decode_yolo(out, conf=0.75)[0].classes.tolist() == [0]  # 0.7 and below dropped
    assert len(decode_yolo(out, conf=0.005)[0]) > 3  # the background anchors come in at a low threshold
    assert len(decode_yolo(out, conf=0.005, max_det=2)[0]) == 2


def test_decode_rejects_other_shapes():
    for shape in [(1, 84), (1, 4, 100), (1, 100, 3)]:
        with pytest.raises(ValueError, match=r"\[N, 4\+C, A\]"):
            decode_yolo(np.zeros(shape, np.float32))


# The real detector on real photos.


@pytest.fixture(scope="module")
def yolo():
    nudenet = pytest.importorskip("nudenet")
    pytest.importorskip("skimage")
    from models.data import HELD_OUT, samples

    path = Path(nudenet.__file__).parent / "320n.onnx"
    return path, samples_from_arrays({"images": samples(HELD_OUT, 320, crops=1, seed=1)}, load(path))


def noised(path: Path, out: Path, scale: float = 0.5, seed: int = 0) -> Path:
    """A copy with gaussian noise (`scale` x each weight's std) on the last conv of the head's class branch,
    at each of the three strides (its box branch and the neck shrug off such noise on these photos)."""
    model = onnx.load(path)
    rng = np.random.default_rng(seed)
    hit = 0
    for init in model.graph.initializer:
        if init.name.startswith("model.22.cv3.") and init.name.endswith(".2.weight"):
            w = numpy_helper.to_array(init)
            w = w + rng.normal(0, scale * w.std(), w.shape).astype(w.dtype)
            init.CopyFrom(numpy_helper.from_array(w, init.name))
            hit += 1
    assert hit == 3
    onnx.save(model, out)
    return out


@pytest.mark.slow
def test_yolo_against_itself_and_a_noised_copy(yolo, tmp_path):
    path, samples = yolo
    same = detection_agreement(path, path, samples)
    assert same["map50"] == 1.0
    assert same["reference_detections"] > 0
    assert same["candidate_detections"] == same["reference_detections"]
    assert same["images"] == len(samples)
    assert set(same["per_class"].values()) == {1.0}

    worse = detection_agreement(path, noised(path, tmp_path / "noised.onnx"), samples)
    assert 0.0 < worse["map50"] < 1.0
    assert worse["reference_detections"] == same["reference_detections"]


def test_errors_for_non_detectors(yolo, tmp_path):
    path, samples = yolo
    from edgelr.demo import build_model

    classifier = tmp_path / "classifier.onnx"
    onnx.save(build_model(), classifier)
    with pytest.raises(EdgelrError, match="not YOLOv8-style"):
        detection_agreement(classifier, classifier, _images_for(classifier))
    with pytest.raises(EdgelrError, match="no output 3"):
        detection_agreement(path, path, samples.split(1)[0], output_index=3)
    with pytest.raises(EdgelrError, match="detects nothing"):
        detection_agreement(path, path, samples.split(1)[0], conf=0.999)
    with pytest.raises(EdgelrError, match="candidate_conf"):
        detection_agreement(path, path, samples, conf=0.1, candidate_conf=0.2)


def _images_for(model_path: Path):
    from edgelr.demo import synthetic_images

    model = load(model_path)
    name = next(v.name for v in model.graph.inputs if not v.is_initializer())
    return samples_from_arrays({name: synthetic_images(2, seed=0)}, model)
