"""Task metrics: does a compressed model still do its job, judged the way its user judges it?

Relative output error treats every number alike; a task does not. A detector's 10x lower class scores are a
small error over an output dominated by box coordinates, yet every object drops below the threshold; a
classifier can carry a large logit error and never change its answer. So a model that declares its task
(`--metric`, a recipe) or whose exporter wrote it (Ultralytics' `task` metadata) is also scored by a task
metric of the candidate's outputs against the original's, on the same inputs, and gated by a floor:

    detect    mAP@0.5 of the candidate's detections, the reference's detections being the ground truth
    classify  top-1 agreement
    embed     mean cosine similarity per sample
    mask      IoU of the masks (mean IoU over classes for a multi-class map)

All numpy; the callers run the models.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from edgelr.errors import EdgelrError
from edgelr.measure.detection import decode_yolo, map50, yolo_layout

TASKS = ("detect", "classify", "embed", "mask")

# The floors are agreement with the original model on the same inputs, not accuracy on labelled data, so
# they are stricter than "within a point of the paper's number" and leave room only for the inputs a
# model is unsure about anyway.
DEFAULT_FLOORS = {
    # Objects scored near `conf` flip in or out under any perturbation: 0.90 lets about one detection in
    # ten do so (or shift its box below IoU 0.5); below that the user sees missed or invented objects.
    "detect": 0.90,
    # A near-tie between the top two classes is what changes under compression; a model that changes its
    # answer on more than 1 input in 20 is a different classifier.
    "classify": 0.95,
    # Embeddings are compared by cosine: 0.98 is an angle of about 11 degrees (a relative error of 0.2 on
    # unit vectors), well inside the gap between one item's embeddings and another's, so neighbours and
    # verification thresholds hold.
    "embed": 0.98,
    # Compression moves mask boundaries by a pixel or so; 0.90 IoU confines the change to that band.
    "mask": 0.90,
}
# detect: Ultralytics' predict default; mask: a probability of one half (a logit of 0).
DEFAULT_CONF = {"detect": 0.25, "mask": 0.5}
# The anchors where the reference sees something, for the class-score diagnostics of `detect`.
SCORED_ANCHOR = 0.1
RANKED_CONF = 0.001  # the candidate's detections are ranked down to this score (mAP evaluation's)
# A detector is also held to these, beside mAP: the class it names for each scored anchor (the bar
# for a compressed YOLOv8n), and how many objects it still reports at the threshold (ranked right, scores
# that sink under it report nothing; ONNX Runtime's INT8 alone keeps 0.91 of YOLOv8n's on the photos).
DETECT_CHECKS = {"top_class_agreement": 0.95, "detections_kept": 0.8}
# Ultralytics' `task` metadata -> ours. segment, pose and obb are left out: their outputs carry mask
# coefficients, keypoints or an angle after the class scores, which the YOLOv8 decode would read as classes.
ULTRALYTICS_TASKS = {"detect": "detect", "classify": "classify"}
METRICS = {"detect": "mAP50 agreement", "classify": "top-1 agreement", "embed": "cosine", "mask": "mask IoU"}


@dataclass(frozen=True)
class Task:
    """What a model does, so it can be judged by it: the metric (`kind`), the output it reads (None: the
    first float output), the floor the metric must reach (None: DEFAULT_FLOORS[kind]) and, for detect and
    mask, the threshold `conf` (None: DEFAULT_CONF[kind]). `source` says where the task came from
    ("metadata" or "declared"), `names` the class names the metadata gives."""

    kind: str
    output: str | None = None
    floor: float | None = None
    conf: float | None = None
    source: str = "declared"
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in TASKS:
            raise EdgelrError(_unknown(self.kind))
        floor = DEFAULT_FLOORS[self.kind] if self.floor is None else float(self.floor)
        if not 0.0 <= floor <= 1.0:
            raise EdgelrError(f"task metric floor {floor} is outside [0, 1]; give a fraction such as 0.9")
        object.__setattr__(self, "floor", floor)
        if self.kind in DEFAULT_CONF:
            conf = DEFAULT_CONF[self.kind] if self.conf is None else float(self.conf)
            if not 0.0 < conf < 1.0:
                raise EdgelrError(f"{self.kind} threshold {conf} is outside (0, 1)")
            object.__setattr__(self, "conf", conf)
        object.__setattr__(self, "names", tuple(self.names))


def _unknown(kind: object) -> str:
    return f"unknown task metric '{kind}'; known: {', '.join(TASKS)}, or none"


def recognise(model: ir.Model, declared: str | None = None, floor: float | None = None,
              output: str | None = None) -> Task | None:
    """The task `model` is judged by, or None.

    `declared` ("detect", "classify", "embed", "mask", or "none" for no task metric) wins; else the
    Ultralytics `task` metadata: detect or classify (segment, pose and obb exports are not supported:
    None). No guessing from shapes. `output` names the output the metric reads (default: the first float
    output); `floor` overrides the default floor. Class names come from Ultralytics' `names` metadata.
    Raises EdgelrError for an unknown kind, a missing output, or a declared task whose output cannot be
    read that way (a metadata task whose output does not fit gives None: metadata is only a hint).
    """
    props = model.metadata_props
    if declared is not None:
        kind = declared.strip().lower()
        if kind == "none":
            return None
        if kind not in TASKS:
            raise EdgelrError(_unknown(declared))
        source = "declared"
    else:
        kind = ULTRALYTICS_TASKS.get(props.get("task", "").strip())
        if kind is None:
            return None
        source = "metadata"
    outputs = {v.name: v for v in model.graph.outputs}
    if output is not None and output not in outputs:
        raise EdgelrError(f"the model has no output '{output}'; it has {', '.join(outputs)}")
    floats = [name for name, v in outputs.items() if v.dtype is not None and v.dtype.is_floating_point()]
    name = output if output is not None else (floats[0] if floats else None)
    if name is None:
        problem = f"the model has no float output (outputs: {', '.join(outputs)})"
    elif name not in floats:
        problem = f"output '{name}' is {outputs[name].dtype}, not float"
    else:
        problem = _shape_problem(kind, outputs[name].shape)
        if problem:
            problem = f"output '{name}' of shape {_dims(outputs[name].shape)} {problem}"
    if problem:
        if source == "metadata":
            return None
        raise EdgelrError(f"the {kind} metric cannot read the model: {problem}; name another output or metric")
    return Task(kind, name, floor, source=source, names=_names(props.get("names")))


def _names(text: str | None) -> tuple[str, ...]:
    """Class names from Ultralytics' `names` ("{0: 'person', 1: 'bicycle'}"), () when absent or malformed."""
    if not text:
        return ()
    try:
        value = ast.literal_eval(text)  # literals only: nothing in the file gets to run
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return ()
    if isinstance(value, dict):
        if not all(isinstance(k, int) for k in value) or sorted(value) != list(range(len(value))):
            return ()
        value = [value[i] for i in range(len(value))]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return ()


def _dims(shape) -> str:
    if shape is None:
        return "unknown"
    return "[" + ", ".join(str(d) if isinstance(d, int) or len(str(d)) <= 12 else "?" for d in shape) + "]"


def _shape_problem(kind: str, shape) -> str:
    """Why an output of `shape` (ints, or symbolic dims left unchecked) cannot be read as `kind`; '' if it can."""
    if shape is None:
        return ""
    dims = list(shape)
    if kind == "detect":
        if len(dims) != 3:
            return "is not [N, 4+C, A] or [N, A, 4+C] (rank 3)"
        if all(isinstance(d, int) for d in dims):
            try:
                yolo_layout(tuple(dims))
            except ValueError as exc:
                return f"is not YOLOv8-style: {exc}"
    elif kind == "classify":
        if len(dims) != 2:
            return "is not [N, C] logits or probabilities (rank 2)"
        if isinstance(dims[1], int) and dims[1] < 2:
            return "has fewer than 2 classes"
    elif kind == "embed" and len(dims) < 2:
        return "is not [N, ...] with a feature axis (rank 2 or more)"
    elif kind == "mask" and len(dims) not in (3, 4):
        return "is not [N, H, W] or [N, C, H, W]"
    return ""


@dataclass
class TaskScore:
    """A task metric's result: `value` (higher is better) against `floor`, plus secondary numbers."""

    metric: str
    value: float
    floor: float
    details: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)  # detail -> the least it may be too (a detector's top class)

    @property
    def failed_checks(self) -> list[str]:
        return [key for key, least in self.checks.items() if key in self.details and not self.details[key] >= least]

    @property
    def passed(self) -> bool:
        return bool(self.value >= self.floor) and not self.failed_checks  # nan fails

    def line(self) -> str:
        """One human line: "mAP50 agreement 0.934 (floor 0.90; top-class agreement 0.981, ...)"."""
        failed = self.failed_checks
        said = [label.format(self.details[key]) for key, label in _LABELS.items()
                if key in self.details and key not in failed]
        verdict = "" if self.value >= self.floor else ", below the floor"
        verdict += "".join(f", {_LABELS[key].format(self.details[key])} under {self.checks[key]:g}"
                           for key in failed)
        said = "; " + ", ".join(said) if said else ""
        return f"{self.metric} {self.value:.3f} (floor {self.floor:.2f}{verdict}{said})"


_LABELS = {  # detail -> how TaskScore.line says it, in this order
    "candidate_nonfinite": "{} non-finite candidate values",
    "reference_empty": "the reference finds nothing",
    "top_class_agreement": "top-class agreement {:.3f}",
    "class_score_error": "class-score error {:.3g}",
    "reference_detections": "{} reference detections",
    "candidate_detections": "{} candidate detections",
    "detections_kept": "detections kept {:.3f}",
    "top5_agreement": "top-5 agreement {:.3f}",
    "kl": "KL {:.3g}",
    "min_cosine": "min cosine {:.3f}",
    "pixel_agreement": "pixel agreement {:.3f}",
    "classes_present": "{} classes",
    "reference_pixels": "{} reference pixels",
    "candidate_pixels": "{} candidate pixels",
    "pixels": "{} pixels",
    "samples": "{} samples",
}


def task_score(task: Task, reference: list[dict[str, np.ndarray]],
               candidate: list[dict[str, np.ndarray]]) -> TaskScore:
    """Score the candidate model's outputs against the reference model's by `task`'s metric.

    `reference`, `candidate`: one dict per model run (the same inputs, in the same order), output name ->
    array. The metric reads `task.output`, or when None the first float array of the first run. A
    candidate with any NaN or infinity in that output scores 0 (it is broken where it is deployed).
    Raises EdgelrError when the runs or shapes do not pair up or the output cannot be read as the task.
    """
    if len(reference) != len(candidate) or not reference:
        raise EdgelrError(f"{len(reference)} reference runs but {len(candidate)} candidate runs; "
                          "score both models on the same, non-empty set of inputs")
    name = task.output
    if name is None:
        name = next((k for k, v in reference[0].items() if np.asarray(v).dtype.kind == "f"), None)
        if name is None:
            raise EdgelrError(f"no float output to score by the {task.kind} metric "
                              f"(outputs: {', '.join(reference[0])})")
    pairs = []
    for i, runs in enumerate(zip(reference, candidate)):
        for role, run in zip(("reference", "candidate"), runs):
            if name not in run:
                raise EdgelrError(f"{role} run {i} has no output '{name}' (it has {', '.join(run)})")
        ref, cand = (np.asarray(run[name]) for run in runs)
        if ref.shape != cand.shape:
            raise EdgelrError(f"output '{name}' is {list(ref.shape)} from the reference but {list(cand.shape)} "
                              f"from the candidate (run {i}); compare models with the same outputs")
        problem = "is not float" if ref.dtype.kind != "f" else _shape_problem(task.kind, ref.shape)
        if problem:
            raise EdgelrError(f"the {task.kind} metric cannot read output '{name}' of shape "
                              f"{list(ref.shape)}: it {problem}")
        if not np.isfinite(ref).all():
            raise EdgelrError(f"the reference model's output '{name}' has NaN or infinite values (run {i}); "
                              "check the original model and its inputs")
        pairs.append((ref.astype(np.float64), cand.astype(np.float64)))
    nonfinite = sum(int((~np.isfinite(c)).sum()) for _, c in pairs)
    if nonfinite:
        return TaskScore(METRICS[task.kind], 0.0, task.floor, {"candidate_nonfinite": nonfinite})
    metric, value, details = _SCORERS[task.kind](task, pairs)
    return TaskScore(metric, float(value), task.floor, details, DETECT_CHECKS if task.kind == "detect" else {})


def _detect(task: Task, pairs: list) -> tuple[str, float, dict]:
    ref_dets, cand_dets, kept = [], [], 0
    scored = agree = 0
    error = norm = 0.0
    for ref, cand in pairs:
        # The candidate is ranked as mAP evaluation ranks it (decoded at 0.001, as ultralytics' val): cut
        # at the reference's threshold too, every object scored near it that drops a little below is a
        # lost one, and ONNX Runtime's INT8 alone measured 0.53 on the detector photos (0.905 ranked).
        # Uniformly lower scores keep their ranking yet lose every object: `kept` below catches that.
        ref_dets += decode_yolo(ref, task.conf)
        cand_dets += decode_yolo(cand, RANKED_CONF)
        kept += sum(int((d.scores > task.conf).sum()) for d in cand_dets[-len(ref):])
        if yolo_layout(ref.shape)[0]:
            ref, cand = ref.transpose(0, 2, 1), cand.transpose(0, 2, 1)
        seen = ref[..., 4:].max(axis=-1) > SCORED_ANCHOR
        s, t = ref[..., 4:][seen], cand[..., 4:][seen]
        scored += len(s)
        agree += int((s.argmax(axis=1) == t.argmax(axis=1)).sum())
        error += float(((s - t) ** 2).sum())
        norm += float((s**2).sum())
    details = {"reference_detections": sum(len(d) for d in ref_dets), "candidate_detections": kept,
               "scored_anchors": scored}
    if scored:
        details["top_class_agreement"] = agree / scored
        details["class_score_error"] = math.sqrt(error / norm)
    if details["reference_detections"] == 0:  # mAP is undefined: agreeing means finding nothing either
        details["reference_empty"] = 1
        return METRICS["detect"], float(kept == 0), details
    details["detections_kept"] = min(1.0, kept / details["reference_detections"])
    return METRICS["detect"], map50(ref_dets, cand_dets), details


def _classify(task: Task, pairs: list) -> tuple[str, float, dict]:
    ref = np.concatenate([r for r, _ in pairs])
    cand = np.concatenate([c for _, c in pairs])
    top = ref.argmax(axis=1)
    details = {"kl": _kl(ref, cand), "samples": len(ref)}
    if ref.shape[1] >= 5:  # the reference's answer among the candidate's five best, as top-5 accuracy
        five = np.argpartition(-cand, 4, axis=1)[:, :5]
        details["top5_agreement"] = float((five == top[:, None]).any(axis=1).mean())
    return METRICS["classify"], float((top == cand.argmax(axis=1)).mean()), details


def _kl(ref: np.ndarray, cand: np.ndarray) -> float:
    """Mean KL(p_ref || p_cand). Rows of the reference that are already distributions are taken as they
    are (the candidate's too: both models end in the same layer), anything else as logits (softmax)."""
    probabilities = bool((ref >= 0).all() and np.allclose(ref.sum(axis=1), 1.0, atol=1e-3))

    def log_p(x: np.ndarray) -> np.ndarray:
        if probabilities:
            x = np.clip(x, 1e-12, None)
            return np.log(x / x.sum(axis=1, keepdims=True))
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    lp, lq = log_p(ref), log_p(cand)
    return float(max((np.exp(lp) * (lp - lq)).sum(axis=1).mean(), 0.0))


def _embed(task: Task, pairs: list) -> tuple[str, float, dict]:
    cosines = []
    for ref, cand in pairs:
        a, b = ref.reshape(len(ref), -1), cand.reshape(len(cand), -1)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        # A zero vector has no direction: it agrees only with another zero vector.
        cos = np.where(na * nb > 0, (a * b).sum(axis=1) / np.where(na * nb > 0, na * nb, 1.0),
                       (na == nb).astype(np.float64))
        cosines.append(np.clip(cos, -1.0, 1.0))
    cos = np.concatenate(cosines)
    return METRICS["embed"], float(cos.mean()), {"min_cosine": float(cos.min()), "samples": len(cos)}


def _mask(task: Task, pairs: list) -> tuple[str, float, dict]:
    """One channel: masks at `conf` if the reference's values are probabilities in [0, 1], else they are
    logits, thresholded at logit(conf) (0 for the default 0.5); IoU pooled over all samples' pixels.
    Several channels: per-pixel argmax, IoU per class over the classes present in the reference, averaged."""
    if all(r.ndim == 3 or r.shape[1] == 1 for r, _ in pairs):
        logits = any(r.min() < 0 or r.max() > 1 for r, _ in pairs)
        cut = math.log(task.conf / (1 - task.conf)) if logits else task.conf
        inter = union = ref_pixels = cand_pixels = 0
        for ref, cand in pairs:
            a, b = ref > cut, cand > cut
            inter += int((a & b).sum())
            union += int((a | b).sum())
            ref_pixels += int(a.sum())
            cand_pixels += int(b.sum())
        details = {"reference_pixels": ref_pixels, "candidate_pixels": cand_pixels, "threshold": cut}
        if ref_pixels == 0:
            details["reference_empty"] = 1
        return METRICS["mask"], (inter / union if union else 1.0), details
    classes = max(r.shape[1] for r, _ in pairs)
    inter, ref_count, cand_count = (np.zeros(classes, np.int64) for _ in range(3))
    for ref, cand in pairs:
        a, b = ref.argmax(axis=1).ravel(), cand.argmax(axis=1).ravel()
        inter += np.bincount(a[a == b], minlength=classes)
        ref_count += np.bincount(a, minlength=classes)
        cand_count += np.bincount(b, minlength=classes)
    present = ref_count > 0
    iou = inter[present] / (ref_count + cand_count - inter)[present]
    details = {"classes_present": int(present.sum()), "pixel_agreement": float(inter.sum() / ref_count.sum()),
               "pixels": int(ref_count.sum())}
    return "mask mIoU", float(iou.mean()), details


_SCORERS = {"detect": _detect, "classify": _classify, "embed": _embed, "mask": _mask}
