"""Task metrics: recognising a model's task (declared, or from Ultralytics' metadata on nudenet's YOLOv8n) and
scoring a candidate's outputs against the original's by detection, classification, embedding and mask metrics."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto
from onnx import helper as h

from edgelr.errors import EdgelrError
from edgelr.measure.task import DEFAULT_FLOORS, Task, TaskScore, recognise, task_score


@pytest.fixture(scope="module")
def yolo_path() -> str:
    import nudenet

    return os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx")


@pytest.fixture()
def yolo(yolo_path) -> ir.Model:
    return ir.load(yolo_path)


@pytest.fixture(scope="module")
def yolo_runs(yolo_path) -> list[dict[str, np.ndarray]]:
    """nudenet's YOLOv8n on two real photos (a face, a man with a camera), whole and cropped: one run each."""
    import onnxruntime as ort

    from models.data import samples

    session = ort.InferenceSession(yolo_path, providers=["CPUExecutionProvider"])
    images = samples(["astronaut", "camera"], 320, crops=2)
    return [{"output0": session.run(None, {"images": image[None]})[0]} for image in images]


def tiny(metadata: dict[str, str] | None = None) -> ir.Model:
    """A classifier head: input x [N, 10] -> ids (int64 argmax), logits [N, 10] (the first float output)."""
    graph = h.make_graph(
        [h.make_node("ArgMax", ["x"], ["ids"], axis=1, keepdims=0), h.make_node("Identity", ["x"], ["logits"])],
        "tiny",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
        [h.make_tensor_value_info("ids", TensorProto.INT64, ["N"]),
         h.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
    )
    model = ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))
    model.metadata_props.update(metadata or {})
    return model


# recognise


def test_nudenet_is_a_detector_by_its_metadata(yolo):
    task = recognise(yolo)
    assert (task.kind, task.source, task.output) == ("detect", "metadata", "output0")
    assert (task.floor, task.conf) == (DEFAULT_FLOORS["detect"], 0.25)
    assert len(task.names) == 18
    assert task.names[0] == "FEMALE_GENITALIA_COVERED" and task.names[17] == "BUTTOCKS_COVERED"
    assert recognise(yolo, floor=0.5).floor == 0.5


def test_declared_task_wins_over_metadata(yolo):
    task = recognise(yolo, "embed")
    assert (task.kind, task.source, task.output, task.floor) == ("embed", "declared", "output0", 0.98)
    assert len(task.names) == 18  # the names still come from the metadata
    assert recognise(yolo, " Detect ").source == "declared"
    assert recognise(yolo, "none") is None


def test_bad_declared_kind_names_the_known_ones(yolo):
    with pytest.raises(EdgelrError, match="unknown task metric 'segment'; known: detect, classify, embed, mask"):
        recognise(yolo, "segment")
    with pytest.raises(EdgelrError, match="unknown task metric"):
        Task("classification")


def test_declared_task_must_fit_the_output(yolo):
    with pytest.raises(EdgelrError, match=r"output 'output0' of shape \[batch, 22, \?\] is not \[N, C\]"):
        recognise(yolo, "classify")
    with pytest.raises(EdgelrError, match=r"output 'logits' of shape \[N, 10\] is not \[N, 4\+C, A\]"):
        recognise(tiny(), "detect")
    with pytest.raises(EdgelrError, match="output 'ids' is INT64, not float"):
        recognise(tiny(), "classify", output="ids")
    with pytest.raises(EdgelrError, match="no output 'probs'; it has ids, logits"):
        recognise(tiny(), "classify", output="probs")


def test_metadata_recognition_without_guessing():
    assert recognise(tiny()) is None  # a [N, 10] output is not taken for a classifier from its shape alone
    task = recognise(tiny({"task": "classify", "names": "{0: 'cat', 1: 'dog'}"}))
    assert (task.kind, task.source, task.output, task.names) == ("classify", "metadata", "logits", ("cat", "dog"))
    assert recognise(tiny({"task": "classify", "names": "{0: 'cat', 1: __import__('os')}"})).names == ()
    assert recognise(tiny({"task": "classify", "names": "{1: 'cat'}"})).names == ()
    assert recognise(tiny({"task": "segment"})) is None  # mask coefficients after the classes: not supported
    assert recognise(tiny({"task": "detect"})) is None  # metadata that does not fit the output is only a hint
    assert recognise(tiny({"task": "segment"}), "embed").kind == "embed"


def test_task_defaults_and_checks():
    assert Task("mask").conf == 0.5 and Task("detect", conf=0.4).conf == 0.4
    assert Task("classify").floor == 0.95 and Task("classify", floor=0.8).floor == 0.8
    with pytest.raises(EdgelrError, match="outside"):
        Task("embed", floor=1.5)
    with pytest.raises(EdgelrError, match="outside"):
        Task("mask", conf=1.0)


# detect, on the real model's outputs


def scaled_classes(runs, factor: float) -> list[dict[str, np.ndarray]]:
    out = []
    for run in runs:
        y = run["output0"].copy()
        y[:, 4:] *= factor
        out.append({"output0": y})
    return out


def test_identical_detector_outputs_agree(yolo, yolo_runs):
    task = recognise(yolo)
    score = task_score(task, yolo_runs, yolo_runs)
    assert score.value == 1.0 and score.passed
    assert score.details["reference_detections"] == score.details["candidate_detections"] >= 5
    assert score.details["top_class_agreement"] == 1.0 and score.details["class_score_error"] == 0.0
    assert score.details["scored_anchors"] > score.details["reference_detections"]
    assert json.loads(json.dumps(score.details, allow_nan=False)) == score.details
    transposed = [{"output0": r["output0"].transpose(0, 2, 1)} for r in yolo_runs]  # [N, A, 4+C]
    assert task_score(task, transposed, transposed).details == score.details


def test_lower_class_scores_lose_every_object_while_the_output_error_is_tiny(yolo, yolo_runs):
    task = recognise(yolo)
    candidate = scaled_classes(yolo_runs, 0.1)
    score = task_score(task, yolo_runs, candidate)
    assert not score.passed and score.failed_checks == ["detections_kept"]
    assert score.details["candidate_detections"] == 0 and score.details["detections_kept"] == 0
    assert score.details["top_class_agreement"] == 1.0  # the ranking is intact; the threshold is what matters
    assert score.details["class_score_error"] == pytest.approx(0.9)
    ref = np.concatenate([r["output0"] for r in yolo_runs])
    cand = np.concatenate([c["output0"] for c in candidate])
    assert np.linalg.norm(ref - cand) / np.linalg.norm(ref) < 0.01  # what an output-error gate would see
    assert "detections kept 0.000 under 0.8" in score.line() and "0 candidate detections" in score.line()
    # the objects scored under 0.36 drop under the threshold, but ranked as mAP evaluation ranks them
    # (down to 0.001) they all agree, and most are still reported: not a collapse
    weaker = task_score(task, yolo_runs, scaled_classes(yolo_runs, 0.7))
    assert weaker.value == 1.0 and weaker.passed == (weaker.details["detections_kept"] >= 0.8)
    assert 0 < weaker.details["candidate_detections"] < weaker.details["reference_detections"]


def test_a_reference_without_detections(yolo, yolo_runs):
    strict = Task("detect", conf=0.99)
    score = task_score(strict, yolo_runs, yolo_runs)
    assert score.value == 1.0 and score.details["reference_empty"] == 1
    boosted = scaled_classes(yolo_runs, 1.2)  # the best anchors now pass 0.99
    assert task_score(strict, yolo_runs, boosted).value == 0.0


def test_runs_must_pair_up(yolo, yolo_runs):
    task = recognise(yolo)
    with pytest.raises(EdgelrError, match="6 reference runs but 5 candidate runs"):
        task_score(task, yolo_runs, yolo_runs[:5])
    with pytest.raises(EdgelrError, match=r"\[1, 22, 2100\] from the reference but \[1, 22, 2000\]"):
        task_score(task, yolo_runs[:1], [{"output0": yolo_runs[0]["output0"][..., :2000]}])
    with pytest.raises(EdgelrError, match="candidate run 0 has no output 'output0'"):
        task_score(task, yolo_runs[:1], [{"other": yolo_runs[0]["output0"]}])
    with pytest.raises(EdgelrError, match=r"shape \[1, 22\]: it is not \[N, 4\+C, A\]"):
        task_score(task, [{"output0": np.zeros((1, 22))}], [{"output0": np.zeros((1, 22))}])
    broken = [{"output0": np.where(np.arange(2100) == 7, np.nan, r["output0"])} for r in yolo_runs]
    score = task_score(task, yolo_runs, broken)
    assert score.value == 0.0 and score.details == {"candidate_nonfinite": 6 * 22}


# classify, embed, mask on arrays with known answers


def logits(rows: int = 10, classes: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, classes)).astype(np.float32)


def test_classify_top1_agreement_and_kl():
    ref = logits()
    cand = ref.copy()
    top2 = np.argsort(-ref[3])[:2]
    cand[3, top2] = cand[3, top2[::-1]]  # the top two swapped in 1 row of 10
    task = Task("classify")
    score = task_score(task, [{"y": ref[:4]}, {"y": ref[4:]}], [{"y": cand[:4]}, {"y": cand[4:]}])
    assert score.metric == "top-1 agreement" and score.value == pytest.approx(0.9) and not score.passed
    assert score.details["top5_agreement"] == 1.0 and score.details["samples"] == 10
    assert score.details["kl"] > 0
    assert task_score(task, [{"y": ref}], [{"y": ref}]).details["kl"] == 0.0
    # Probabilities are taken as they are: the KL of the softmaxes equals the KL of the logits.
    def softmax(x):
        return np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)

    assert task_score(task, [{"y": softmax(ref)}], [{"y": softmax(cand)}]).details["kl"] == pytest.approx(
        score.details["kl"], rel=1e-4)
    flipped = ref.copy()
    flipped[np.arange(10), ref.argmin(axis=1)] = 10.0  # every row's least likely class becomes its answer
    second = task_score(task, [{"y": ref}], [{"y": flipped}])
    assert second.value == 0.0 and second.details["top5_agreement"] == 1.0  # the old answer is now second
    flipped[np.arange(10), ref.argmax(axis=1)] = -10.0  # and now last
    assert task_score(task, [{"y": ref}], [{"y": flipped}]).details["top5_agreement"] == 0.0
    assert "top5_agreement" not in task_score(task, [{"y": ref[:, :4]}], [{"y": ref[:, :4]}]).details


def test_embed_cosine():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(4, 2, 8))  # flattened per sample
    task = Task("embed")
    same = task_score(task, [{"e": ref}], [{"e": 3 * ref}])
    assert same.value == pytest.approx(1.0) and same.passed
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    a, b = q[:, :4].T, q[:, 4:8].T  # 4 rows, each orthogonal to its partner
    ortho = task_score(task, [{"e": a}], [{"e": b}])
    assert ortho.value == pytest.approx(0.0, abs=1e-12) and not ortho.passed
    mixed = task_score(task, [{"e": a}], [{"e": np.concatenate([a[:3], -a[3:]])}])
    assert mixed.value == pytest.approx(0.5) and mixed.details["min_cosine"] == pytest.approx(-1.0)
    zero = np.zeros((2, 16))
    assert task_score(task, [{"e": zero}], [{"e": zero}]).value == 1.0
    assert task_score(task, [{"e": zero}], [{"e": a[:2]}]).value == 0.0


def test_binary_mask_iou():
    ref = np.zeros((2, 1, 4, 4), np.float32)
    ref[:, :, :, :2] = 0.9  # 16 pixels in all
    cand = np.zeros_like(ref)
    cand[:, :, :, :3] = 0.6  # 24 pixels, covering the reference's
    task = Task("mask")
    score = task_score(task, [{"m": ref}], [{"m": cand}])
    assert score.value == pytest.approx(16 / 24) and not score.passed
    assert (score.details["reference_pixels"], score.details["candidate_pixels"]) == (16, 24)
    # Logits (values outside [0, 1]) are cut at 0; [N, H, W] reads as one channel.
    as_logits = task_score(task, [{"m": ref[:, 0] * 10 - 5}], [{"m": cand[:, 0] * 10 - 5.5}])
    assert as_logits.value == pytest.approx(16 / 24) and as_logits.details["threshold"] == 0.0
    stricter = task_score(Task("mask", conf=0.7), [{"m": ref}], [{"m": cand}])
    assert stricter.value == 0.0 and stricter.details["candidate_pixels"] == 0  # 0.6 is below 0.7
    empty = np.zeros_like(ref)
    assert task_score(task, [{"m": empty}], [{"m": empty}]).value == 1.0
    assert task_score(task, [{"m": empty}], [{"m": cand}]).value == 0.0


def test_multiclass_mask_mean_iou():
    ref_labels = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    cand_labels = np.array([[0, 0, 0, 1], [0, 0, 2, 1]])
    ref = np.eye(4)[ref_labels].transpose(2, 0, 1)[None]  # [1, 4, 2, 4]: classes 2 and 3 absent
    cand = np.eye(4)[cand_labels].transpose(2, 0, 1)[None]
    score = task_score(Task("mask"), [{"m": ref}], [{"m": cand}])
    # class 0: 4 of 5 pixels (IoU 0.8); class 1: 2 of 4 (0.5); class 2 is not in the reference
    assert score.metric == "mask mIoU" and score.value == pytest.approx((0.8 + 0.5) / 2)
    assert score.details == {"classes_present": 2, "pixel_agreement": 0.75, "pixels": 8}


def test_score_line():
    score = TaskScore("mAP50 agreement", 0.934, 0.9, {"top_class_agreement": 0.981, "reference_detections": 212})
    assert score.passed
    assert score.line() == "mAP50 agreement 0.934 (floor 0.90; top-class agreement 0.981, 212 reference detections)"
    assert not TaskScore("cosine", float("nan"), 0.98).passed
