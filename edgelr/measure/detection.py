"""Detection agreement: does a compressed detector find the same objects as the original?

Relative output error says little about a detector: a small error on a score near the threshold can
drop an object, a large error on background anchors changes nothing. Here both models' raw outputs are
decoded (YOLOv8-style, with class-aware NMS) and the candidate is scored by mAP@0.5 against the
reference model's detections taken as ground truth. All numpy.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from edgelr.errors import EdgelrError
from edgelr.io.model import ort_session
from edgelr.io.samples import Samples

# Boxes kept for NMS per image, best first (ultralytics' max_nms): bounds the greedy loop at low conf.
MAX_NMS = 30000
# COCO's recall thresholds for the 101-point interpolated AP.
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass
class Detections:
    """One image's detections, best score first: boxes (K, 4) xyxy pixels float32, scores (K,) float32,
    classes (K,) int64."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, np.float32).reshape(-1)
        self.classes = np.asarray(self.classes, np.int64).reshape(-1)
        if not len(self.boxes) == len(self.scores) == len(self.classes):
            raise ValueError(
                f"Detections: {len(self.boxes)} boxes, {len(self.scores)} scores, {len(self.classes)} classes"
            )

    def __len__(self) -> int:
        return len(self.scores)


def yolo_layout(shape: tuple[int, ...]) -> tuple[bool, int]:
    """(channels_first, num_classes) for a YOLOv8-style output shape.

    [N, 4 + C, A] or [N, A, 4 + C]: the box-and-class axis is the smaller of the last two (a detector has
    more anchors than classes; on a tie, [N, 4 + C, A] as ultralytics exports it). Raises ValueError when
    the shape cannot be one (not rank 3, or fewer than 5 channels: 4 box values and at least one class).
    """
    if len(shape) != 3:
        raise ValueError(f"expected [N, 4+C, A] (rank 3), got shape {list(shape)}")
    channels_first = shape[1] <= shape[2]
    channels = shape[1] if channels_first else shape[2]
    if channels < 5:
        raise ValueError(
            f"expected [N, 4+C, A] with at least one class, got shape {list(shape)} ({channels} box+class values)"
        )
    return channels_first, channels - 4


def decode_yolo(output: np.ndarray, conf: float = 0.25, iou: float = 0.45, max_det: int = 300) -> list[Detections]:
    """Decode YOLOv8-style raw outputs into per-image detections after class-aware NMS.

    `output`: [N, 4 + C, A] (cx, cy, w, h in pixels, then C class scores already through a sigmoid; no
    objectness), or the transposed [N, A, 4 + C] (the layout is told by which of the last two axes is the
    smaller, see `yolo_layout`). Each anchor gives one detection, its best class (single-label, as
    ultralytics' predict), kept when that score is > conf; NMS per class drops a box whose IoU with a
    better-scored box of the same class is > iou; at most `max_det` per image remain, best first.
    """
    output = np.asarray(output)
    channels_first, _ = yolo_layout(output.shape)
    if channels_first:
        output = output.transpose(0, 2, 1)  # -> [N, A, 4 + C]
    result = []
    for pred in output:
        scores_all = pred[:, 4:]
        classes = scores_all.argmax(axis=1)
        scores = np.take_along_axis(scores_all, classes[:, None], axis=1)[:, 0]
        keep = scores > conf
        if not keep.any():
            result.append(Detections())
            continue
        xywh = pred[keep, :4].astype(np.float64)
        scores, classes = scores[keep], classes[keep]
        order = np.argsort(-scores, kind="stable")[:MAX_NMS]
        xywh, scores, classes = xywh[order], scores[order], classes[order]
        half = xywh[:, 2:] / 2
        boxes = np.concatenate([xywh[:, :2] - half, xywh[:, :2] + half], axis=1)
        kept = nms(boxes, scores, classes, iou, max_det)
        result.append(Detections(boxes[kept], scores[kept], classes[kept]))
    return result


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float = 0.45,
        max_det: int = 300) -> np.ndarray:
    """Indices of the boxes (xyxy) that greedy class-aware NMS keeps, best score first.

    Classes are kept apart by shifting each class's boxes to its own region of the plane (the offset
    trick), so one greedy pass over all boxes never compares two classes.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    span = float(np.abs(boxes).max()) * 2 + 1
    shifted = boxes + (np.asarray(classes, np.float64) * span)[:, None]
    areas = np.clip(shifted[:, 2] - shifted[:, 0], 0, None) * np.clip(shifted[:, 3] - shifted[:, 1], 0, None)
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = []
    while order.size and len(keep) < max_det:
        best, rest = order[0], order[1:]
        keep.append(best)
        overlap = _iou_one(shifted[best], areas[best], shifted[rest], areas[rest])
        order = rest[overlap <= iou]
    return np.asarray(keep, np.int64)


def _iou_one(box: np.ndarray, area: float, others: np.ndarray, other_areas: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], others[:, :2])
    rb = np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    union = area + other_areas - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of xyxy boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def average_precisions(reference: list[Detections], candidate: list[Detections],
                       iou_threshold: float = 0.5) -> dict[int, float]:
    """Class -> AP of the candidate's detections against the reference's (taken as ground truth), for each
    class the reference detects; see `map50`."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference images but {len(candidate)} candidate images")
    classes = sorted({int(c) for det in reference for c in det.classes})
    aps = {}
    for cls in classes:
        hits, scores, truths = [], [], 0
        for ref, cand in zip(reference, candidate):
            gt = ref.boxes[ref.classes == cls]
            mine = cand.classes == cls
            truths += len(gt)
            if not mine.any():
                continue
            det_scores = cand.scores[mine]
            order = np.argsort(-det_scores, kind="stable")
            dets = cand.boxes[mine][order]
            scores.append(det_scores[order])
            hits.append(_match(box_iou(dets, gt), iou_threshold))
        aps[cls] = _coco_ap(np.concatenate(hits) if hits else np.zeros(0, bool),
                            np.concatenate(scores) if scores else np.zeros(0), truths)
    return aps


def _match(ious: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy matching of detections (rows, best score first) to ground truths (columns): each detection
    takes the unmatched ground truth it overlaps most, if by at least `threshold`; True where matched."""
    hit = np.zeros(ious.shape[0], bool)
    free = np.ones(ious.shape[1], bool)
    for d in range(ious.shape[0]):
        if not free.any():
            break
        row = np.where(free, ious[d], -1.0)
        g = int(row.argmax())
        if row[g] >= threshold:
            hit[d] = True
            free[g] = False
    return hit


def _coco_ap(hits: np.ndarray, scores: np.ndarray, truths: int) -> float:
    """COCO's 101-point interpolated AP: the precision envelope (best precision at any recall >= r)
    averaged over recall r = 0, 0.01, ..., 1 (0 where that recall is never reached)."""
    if truths == 0:
        return float("nan")
    if hits.size == 0:
        return 0.0
    hits = hits[np.argsort(-scores, kind="mergesort")]
    tp = np.cumsum(hits)
    fp = np.cumsum(~hits)
    recall = tp / truths
    precision = tp / (tp + fp)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    q = np.zeros(len(RECALL_POINTS))
    valid = idx < len(recall)
    q[valid] = envelope[idx[valid]]
    return float(q.mean())


def map50(reference: list[Detections], candidate: list[Detections], iou_threshold: float = 0.5) -> float:
    """COCO-style mAP at IoU 0.5 of the candidate's detections, the reference model's detections being the
    ground truth (one list entry per image, both lists over the same images).

    Per class, the candidate's detections are matched greedily by descending score to the reference
    boxes of the same image and class (IoU >= iou_threshold, each reference box matched once); AP is
    COCO's 101-point interpolated AP (precision envelope averaged at recall 0, 0.01, ..., 1; e.g. a
    candidate that finds exactly half of the objects, with nothing ranked above them, scores 51/101).
    mAP is the mean over the classes the reference detects: like COCO, candidate detections of a class the
    reference never detects are not counted. When the reference detects nothing on any image, there is
    nothing to recall and the AP is undefined: returns nan (as COCO reports -1), whatever the candidate.
    """
    aps = average_precisions(reference, candidate, iou_threshold)
    return float(np.mean(list(aps.values()))) if aps else float("nan")


def detection_agreement(reference_model: ir.Model | str | os.PathLike, candidate_model: ir.Model | str | os.PathLike,
                        samples: Samples, conf: float = 0.25, candidate_conf: float = 0.001,
                        output_index: int = 0, iou: float = 0.45, max_det: int = 300) -> dict:
    """Run both models (ONNX Runtime CPU) on every sample and score the candidate by `map50` against the
    reference's detections.

    The reference is decoded at `conf` (its detections are the ground truth); the candidate at the low
    `candidate_conf`, as mAP evaluation does, so its whole ranking counts. `output_index` picks the
    model output holding the raw [N, 4 + C, A] predictions. Returns {"map50", "reference_detections",
    "candidate_detections" (those scoring > conf), "images", "per_class": {class: AP}}.
    Raises EdgelrError when an output does not look like YOLOv8's, the two models' outputs differ in
    layout, or the reference detects nothing at all (lower `conf`, or give samples with objects in them).
    """
    if candidate_conf > conf:
        raise EdgelrError(f"candidate_conf {candidate_conf} is above conf {conf}; "
                          "decode the candidate at the same or a lower threshold")
    reference: list[Detections] = []
    candidate: list[Detections] = []
    layouts = {}
    with contextlib.ExitStack() as stack:
        sessions = {"reference": stack.enter_context(ort_session(reference_model)),
                    "candidate": stack.enter_context(ort_session(candidate_model))}
        names = {}
        for role, sess in sessions.items():
            outputs = sess.get_outputs()
            if not -len(outputs) <= output_index < len(outputs):
                raise EdgelrError(f"{role} model: no output {output_index}, it has {len(outputs)} "
                                  f"({', '.join(o.name for o in outputs)}); pick one with output_index")
            names[role] = outputs[output_index].name
        for i in range(len(samples)):
            feed = samples.feed(i)
            for role, sess in sessions.items():
                out = np.asarray(sess.run([names[role]], feed)[0])
                layouts[role] = _check_output(role, names[role], out, layouts.get(role))
                if role == "reference":
                    reference += decode_yolo(out, conf, iou, max_det)
                else:
                    candidate += decode_yolo(out, candidate_conf, iou, max_det)
            if layouts["reference"] != layouts["candidate"]:
                raise EdgelrError(
                    f"output '{names['candidate']}' of the candidate model has {layouts['candidate'][1]} classes "
                    f"(channels first: {layouts['candidate'][0]}), the reference's '{names['reference']}' has "
                    f"{layouts['reference'][1]} (channels first: {layouts['reference'][0]}); compare models of the same detector"
                )
    reference_count = sum(len(d) for d in reference)
    if reference_count == 0:
        raise EdgelrError(
            f"the reference model detects nothing at conf {conf} on these {len(samples)} samples, so there is "
            "nothing to agree on; lower conf or give samples with objects in them"
        )
    aps = average_precisions(reference, candidate)
    return {
        "map50": float(np.mean(list(aps.values()))),
        "reference_detections": reference_count,
        "candidate_detections": int(sum(int((d.scores > conf).sum()) for d in candidate)),
        "images": len(reference),
        "per_class": aps,
    }


def _check_output(role: str, name: str, out: np.ndarray, previous: tuple[bool, int] | None) -> tuple[bool, int]:
    if out.dtype.kind != "f":
        raise EdgelrError(f"{role} model: output '{name}' is {out.dtype}, not the float [N, 4+C, A] "
                          "predictions of a YOLOv8-style detector; pick the right one with output_index")
    try:
        layout = yolo_layout(out.shape)
    except ValueError as exc:
        raise EdgelrError(f"{role} model: output '{name}' is not YOLOv8-style: {exc}; "
                          "pick the raw predictions with output_index") from None
    if previous is not None and layout != previous:
        raise EdgelrError(f"{role} model: output '{name}' changes layout between samples "
                          f"(shape {list(out.shape)}); use samples of one size")
    return layout
