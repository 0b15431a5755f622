"""Distillation: train a compressed ONNX student towards its ONNX teacher, in PyTorch, without labels.

    config = DistillConfig(steps=500, augment="strong", features="factorized")
    report = distill("model.onnx", "model.small.onnx", "photos/", "model.tuned.onnx", config)

The verb and its options. The pieces: edgelr.train.convert (the student as a trainable torch module,
its weights written back into the graph), .data (the inputs and their augmentation), .losses (what
is lowered), .qat (quantization-aware training), .loop (the steps, the schedule, checkpoints) and
.parallel (the same run over several processes: launch it with torchrun, or `edgelr distill --nproc N`).

Every step feeds one (augmented) batch to the teacher in ONNX Runtime and to the student in torch and
lowers the distance between their outputs. At the end the trained values are written into a copy of
the student graph (same nodes, same names: only weight values change), written beside OUT, checked
against the torch student in ONNX Runtime, and only then moved into place.

Threads: torch keeps its default unless EDGELR_TORCH_THREADS is set; the teacher's session uses
EDGELR_ORT_THREADS if set (edgelr.train.loop).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_ir as ir

from edgelr.core.objective import SCALE_SAMPLES, Group
from edgelr.core.objective import Objective as CoreObjective
from edgelr.errors import EdgelrError
from edgelr.io import model as model_io
from edgelr.io.samples import model_inputs
from edgelr.passes.base import (
    FunctionalEdgelrPass,
    PassConfig,
    PassDetails,
    config_from_dict,
    register_pass,
)
from edgelr.train.convert import (
    check_conversion,
    check_ops,
    import_onnx2torch,
    need_torch,
    onnx_info,
    parity,
    set_outputs,
    to_torch,
    trained_copy,
)
from edgelr.train.data import (
    Augment,
    ImageData,
    augment_spec,
    chunks,
    evaluation_samples,
    load_data,
)
from edgelr.train.loop import Job, teacher_session, teacher_threads, train
from edgelr.train.losses import (
    FACTORIZED_FEATURE_WEIGHT,
    Objective,
    factorized_features,
    weights_outside_pairs,
)
from edgelr.train.parallel import join, launched_world_size
from edgelr.train.qat import fake_quantize_inputs

try:
    import torch
except ImportError:  # torch is only needed for training
    torch = None  # type: ignore[assignment]

__all__ = ["CHECKPOINT_EVERY", "Augment", "ConfigFieldError", "DistillConfig", "distill", "weights_outside_pairs"]

CHECKPOINT_EVERY = 50  # steps
AUGMENTS = ("light", "strong", "none")
FEATURE_KINDS = ("factorized", "blocks", "factorized+blocks")  # features named by kind; "blocks" only in a recipe
# features="blocks": each removed block's join. Its normalised error starts near the share of the join's variance
# the block added, far above the outputs'. On the digits DDPM with 2 blocks removed (260 steps) 0.01 left the
# images worse than no features (PSNR 26.8 dB against 27.6; 0.1 was worse still); beside "factorized" (at its
# 0.01) it did no harm (one block and flops 0.5: 28.5 against 28.3 dB)
BLOCK_FEATURE_WEIGHT = 0.01
PRECISIONS = ("fp32", "bf16")


class ConfigFieldError(EdgelrError):
    """A DistillConfig field with a value it cannot take: `field` names it, `problem` says why.
    (The command line says the same of the flag that set the field.)"""

    def __init__(self, field: str, problem: str):
        super().__init__(f"DistillConfig.{field} {problem}")
        self.field, self.problem = field, problem


@dataclass(frozen=True)
class DistillConfig(PassConfig):
    """How to distil: the training options of `distill` (the models, data and output are its arguments).

    steps / epochs: how long (exactly one of them). batch: samples per step (the global batch: a
        distributed run splits each batch over its processes, so batch must be a multiple of their number).
    lr: AdamW's peak learning rate, after a linear warm-up (5% of the steps, at most 100) and before a
        cosine decay to 0. Adam moves every weight by about lr per step whatever its gradient, and a
        compressed student starts close to its target: on YOLOv8n (conv weights ~1e-2) lr 1e-4 at
        batch 8 wrecked the class scores within 40 steps (their error 0.48 -> 1.0), 2e-5 did not; a
        few hundred steps at 2e-5 can still move a weight by ~1e-3..1e-2. Small models with larger
        weights take 1e-3 and more.
    weight_decay: 0 by default (AdamW's decoupled decay, on matrices and kernels only, never on biases
        or norm scales): the target is the teacher, not a prior towards small weights.
    seed: the data order, the augmentation and torch's RNG.
    checkpoint / resume / checkpoint_every: save progress to this file every checkpoint_every steps and
        at the end (atomically); resume=True continues from it (none there: from the beginning), to
        bit-identical weights (edgelr.train.loop). 0: only at the end.
    features: pairs (teacher tensor, student tensor) of intermediate ONNX values aligned with an MSE
        normalised by the teacher tensor's variance, each weighted by feature_weight; or "factorized":
        the output of every factorized pair of an `edgelr compress` student, aligned with the layer it
        replaced (the pair keeps that layer's output name), as DLRMamba's structure-aware distillation
        aligns each low-rank block. In a recipe also "blocks": the residual join of every block an
        earlier remove_blocks pass removed (the Add's output in the teacher, the Identity's that took its
        place, under the same name, in the student), so the layers before the gap learn what the block
        added; or "factorized+blocks": both. feature_weight: 1 by default; FACTORIZED_FEATURE_WEIGHT with
        "factorized" (and with "factorized+blocks"), BLOCK_FEATURE_WEIGHT with "blocks".
    task_weight: the weight of distill's task_loss, if one is given.
    by_group: divide each output's channel groups (a detector's boxes and class scores) by their own
        scale, so every group weighs alike (edgelr.train.losses); False: each output whole.
    augment: "light" (or True): random crop of 60-100% of each side, flip, +-15% colour, letterbox zoom;
        "strong" or an Augment: crops from 5% to all of a photo, letterboxed views, 2x2 mosaics, colour
        and hue jitter, greyscale, mixup (see Augment), for image folders (an .npz is only flipped);
        "none" (or False).
    preprocess: an image folder's preprocessing (a dict or JSON file; default: the folder's
        preprocess.json, else YOLO's convention: letterbox to the input's static size with grey 114,
        /255, RGB, NCHW).
    freeze: fnmatch patterns of ONNX weight or node names to keep fixed.
    lr_scale: (fnmatch pattern of ONNX weight names, or of the Constant node holding one; factor on lr)
        pairs (a mapping is taken in its order): the first matching pattern wins, other weights train
        at lr. E.g. the factorized pairs at lr and everything else at a tenth.
    clip: max gradient norm (0: none). device: "auto" (CUDA if torch sees one), "cpu", "cuda", ...
    time_limit: seconds (counted from the call); training stops cleanly when the next step would start
        past it, and the output is still written (and the checkpoint, if any).
    anneal_by_time: with time_limit, the cosine decay runs on whichever is further along, the steps or
        the clock, so a run that the time limit ends has its learning rate decayed to 0 by then (give
        more steps than fit). Such a run depends on the machine's speed: not reproducible bit for bit.
    train_precision: the training compute. "bf16" runs the student's forward pass under torch.autocast
        in bfloat16 (weights, gradients, the optimizer and the loss stay float32): about 1.6x faster on
        CPUs with AMX or AVX512-BF16, outputs within ~0.2% of float32 on YOLOv8n. The saved model is
        float32 either way (its deployed precision is `edgelr export`'s business).
    quantization_aware: train for static INT8 (edgelr.passes.quantize) after (edgelr.train.qat). The
        saved model is float.
    scores: (first, end) channels of axis 1 of [N, C, ...] outputs that are probabilities (sigmoid
        scores; end None: to the last), e.g. (4, None) for YOLOv8's class scores: compared by the
        binary KL divergence (teacher || student) instead, times score_weight, and left out of the
        output's scale. On YOLOv8n the mean KL is ~1/25 of the boxes' relative squared error:
        score_weight 25 weighs them alike.

    keep_worse: with eval samples, write the trained student even when its held-out error is above the
        untrained one's (default: then OUT is the student unchanged, and the result says kept="student").
    pairs_only: train only the weights of the factorized pairs (everything else frozen, as freeze would):
        on YOLOv8n that generalised better to held-out photos than training every weight.
    data: in a recipe (the distill pass), what to train on: a folder of images or an .npz of model inputs;
        None: the calibration samples. teacher: in a recipe, the teacher model; None: the model the
        pipeline was given. heldout: in a recipe, held-out inputs (as data): the error before and after
        training, and the student kept unchanged if training raised it (unless keep_worse). (The verb
        `distill` takes all three as arguments instead: teacher, data, eval_samples.)

    Serialised as {"_type": "distill", "_version": 1, field: value, ...} (the fields that differ from
    their defaults) by `to_dict`, and read back by `from_dict`, as the pass configs are.
    """

    kind: ClassVar[str] = "distill"
    version: ClassVar[int] = 1

    steps: int | None = None
    epochs: float | None = None
    batch: int = 8
    lr: float = 2e-5
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint: str | None = None
    resume: bool = False
    checkpoint_every: int = CHECKPOINT_EVERY
    features: tuple[tuple[str, str], ...] | str | None = None
    feature_weight: float | None = None
    task_weight: float = 1.0
    by_group: bool = True
    augment: str | Augment = "light"
    preprocess: Mapping[str, Any] | str | None = None
    freeze: tuple[str, ...] = ()
    lr_scale: tuple[tuple[str, float], ...] = ()
    clip: float = 1.0
    device: str = "auto"
    time_limit: float | None = None
    anneal_by_time: bool = False
    train_precision: str = "fp32"
    quantization_aware: bool = False
    scores: tuple[int, int | None] | None = None
    score_weight: float = 1.0
    pairs_only: bool = False
    keep_worse: bool = False
    data: str | None = None
    teacher: str | None = None
    heldout: str | None = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        def bad(name, problem):
            raise ConfigFieldError(name, problem)

        def number(name, low=None, above=None, optional=False):
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                bad(name, f"must be a number, got {value!r}")
            if low is not None and value < low:
                bad(name, f"must be >= {low}, got {value!r}")
            if above is not None and not value > above:
                bad(name, f"must be positive, got {value!r}")
            put(name, float(value))

        def whole(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                bad(name, f"must be a whole number, got {value!r}")
            if value < low:
                bad(name, f"must be >= {low}, got {value!r}")
            put(name, int(value))

        def flag(name):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                bad(name, f"must be True or False, got {getattr(self, name)!r}")
            put(name, bool(getattr(self, name)))

        if self.steps is not None and self.epochs is not None:
            bad("steps", "and epochs: give one of them, not both")
        if self.steps is None and self.epochs is None:
            bad("steps", "or epochs must be given: say how long to train (steps=N or epochs=E)")
        if self.steps is not None:
            if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral):
                bad("steps", f"must be a whole number, got {self.steps!r}")
            if self.steps < 1:
                bad("steps", f"must be positive, got {self.steps!r}")
            put("steps", int(self.steps))
        number("epochs", above=0, optional=True)
        whole("batch", 1)
        number("lr", above=0)
        number("weight_decay", low=0)
        whole("seed", 0)
        if self.checkpoint is not None:
            if not isinstance(self.checkpoint, (str, os.PathLike)) or not os.fspath(self.checkpoint):
                bad("checkpoint", f"must be a file path, got {self.checkpoint!r}")
            put("checkpoint", os.fspath(self.checkpoint))
        flag("resume")
        whole("checkpoint_every", 0)
        self._check_features()
        number("feature_weight", low=0, optional=True)
        number("task_weight", low=0)
        flag("by_group")
        self._check_augment()
        if self.preprocess is not None:
            if isinstance(self.preprocess, os.PathLike):
                put("preprocess", os.fspath(self.preprocess))
            elif not isinstance(self.preprocess, (str, Mapping)):
                bad("preprocess", f"must be a JSON file or a mapping, got {self.preprocess!r}")
        freeze = (self.freeze,) if isinstance(self.freeze, str) else self.freeze
        if not isinstance(freeze, Sequence) or not all(isinstance(p, str) for p in freeze):
            bad("freeze", f"must be fnmatch patterns (strings), got {self.freeze!r}")
        put("freeze", tuple(freeze))
        self._check_lr_scale()
        number("clip", low=0)
        if not isinstance(self.device, str) or not self.device:
            bad("device", f"must be 'auto', 'cpu', 'cuda' or a torch device, got {self.device!r}")
        number("time_limit", low=0, optional=True)
        flag("anneal_by_time")
        if self.train_precision not in PRECISIONS:
            bad("train_precision", f"must be 'fp32' or 'bf16' (the training compute; the saved model is float32), "
                                   f"not {self.train_precision!r}")
        flag("quantization_aware")
        flag("pairs_only")
        flag("keep_worse")
        for name in ("data", "teacher", "heldout"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
                    bad(name, f"must be a path, got {value!r}")
                put(name, os.fspath(value))
        scores = self.scores
        if scores is not None:
            if not (isinstance(scores, Sequence) and not isinstance(scores, str) and len(scores) == 2
                    and isinstance(scores[0], numbers.Integral) and not isinstance(scores[0], bool)
                    and (scores[1] is None or (isinstance(scores[1], numbers.Integral)
                                               and not isinstance(scores[1], bool)))):
                bad("scores", f"must be (first, end) channels, end None for the last, not {scores!r}")
            put("scores", (int(scores[0]), None if scores[1] is None else int(scores[1])))
        number("score_weight", low=0)

    def _check_features(self) -> None:
        features = self.features
        if isinstance(features, str):
            if features not in FEATURE_KINDS:
                raise ConfigFieldError("features", f"must be pairs of tensor names or one of {', '.join(map(repr, FEATURE_KINDS))}, "
                                                   f"not {features!r}")
            return
        if features is None or (isinstance(features, Sequence) and len(features) == 0):
            object.__setattr__(self, "features", None)
            return
        if not (isinstance(features, Sequence) and all(
                isinstance(f, Sequence) and not isinstance(f, str) and len(f) == 2
                and all(isinstance(n, str) for n in f) for f in features)):
            raise ConfigFieldError("features", f"must be pairs of tensor names or 'factorized', not {features!r}")
        object.__setattr__(self, "features", tuple((str(t), str(s)) for t, s in features))

    def _check_augment(self) -> None:
        augment = self.augment
        if isinstance(augment, (bool, np.bool_)) or augment is None:
            augment = "light" if augment else "none"
        if isinstance(augment, Mapping):  # as to_dict writes an Augment
            augment = _augment_from_dict(augment)
        if not (isinstance(augment, Augment) or augment in AUGMENTS):
            raise ConfigFieldError("augment", f"must be 'light', 'strong', 'none' (or True / False) or an "
                                              f"edgelr.train.data.Augment, not {self.augment!r}")
        object.__setattr__(self, "augment", augment)

    def _check_lr_scale(self) -> None:
        scale = self.lr_scale
        pairs = list(scale.items()) if isinstance(scale, Mapping) else scale
        if not (isinstance(pairs, Sequence) and not isinstance(pairs, str) and all(
                isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 and isinstance(p[0], str)
                for p in pairs)):
            raise ConfigFieldError("lr_scale", f"must map fnmatch patterns to factors on lr, got {scale!r}")
        wrong = {k: v for k, v in pairs if isinstance(v, bool) or not (isinstance(v, numbers.Real) and v >= 0)}
        if wrong:
            raise ConfigFieldError("lr_scale", f"factors must be numbers >= 0 (0 freezes), got {wrong}")
        object.__setattr__(self, "lr_scale", tuple((k, float(v)) for k, v in pairs))

    # --- serialisation ---------------------------------------------------------------------------
    def needs_calibration(self) -> str | None:
        return "it trains on the calibration samples unless its data names a folder or an .npz" if self.data is None else None

    @classmethod
    def from_dict(cls, data: Mapping) -> DistillConfig:
        """The config `to_dict` wrote (or a recipe's mapping): an unknown or misspelt field is an error naming it."""
        if not isinstance(data, Mapping):
            raise EdgelrError(f"DistillConfig.from_dict takes a mapping of fields, got {type(data).__name__}")
        config = config_from_dict({"_type": cls.kind, **data})
        if not isinstance(config, cls):
            raise EdgelrError(f"DistillConfig.from_dict: _type is {data.get('_type')!r}, not {cls.kind!r}")
        return config


def _augment_from_dict(data: Mapping) -> Augment:
    names = [f.name for f in dataclasses.fields(Augment)]
    unknown = [k for k in data if k not in names and k != "_type"]
    if unknown:
        raise ConfigFieldError("augment", f"has no setting {unknown[0]!r}; an Augment's settings: {', '.join(names)}")
    return Augment(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k != "_type"})


# ---------------------------------------------------------------------------------------------------
# the verb


def distill(teacher: str | os.PathLike, student: str | os.PathLike, data, out: str | os.PathLike,
            config: DistillConfig, *, eval_samples=None, progress: bool = True,
            task_loss: Callable | None = None) -> dict:
    """Train STUDENT (an ONNX model with the teacher's inputs and outputs, e.g. `edgelr compress`'s
    result) to reproduce TEACHER's outputs on DATA, and write it to OUT (a copy of the student graph
    with new weight values), as CONFIG says. No labels needed: the teacher, run in ONNX Runtime, gives
    the targets.

    data: an .npz of model inputs (as --calib), a Samples, or a folder of images (config.preprocess).
    eval_samples: an .npz, Samples or image folder: the student's relative output error against the
        teacher (edgelr.measure.verify.output_error) before and after.
    task_loss: optional hook task_loss(student_outputs: dict[name, Tensor], indices: np.ndarray) ->
        scalar Tensor, called per forward with the data indices of its samples (to look up labels);
        added with config.task_weight; a mean over the samples keeps a distributed run equal to one
        process. Augmentation moves and mirrors images: use augment "none" when the labels depend on
        geometry.

    Under torchrun (WORLD_SIZE > 1) the processes train together (edgelr.train.parallel): each takes
    config.batch / WORLD_SIZE samples of every batch; rank 0 alone writes the checkpoint and OUT, and
    the others return once OUT is written.

    Returns a dict: steps (taken in all), planned_steps, stopped_early, seconds, final_loss, losses
    [(step, mean loss of the last LOG_EVERY steps)], parity (per output: relative max error of the
    saved ONNX in ORT vs the torch student; rank 0), error_before / error_after (with eval_samples;
    rank 0), timings, world_size and rank.
    """
    need_torch()
    if not isinstance(config, DistillConfig):
        raise EdgelrError(f"distill takes a DistillConfig, e.g. DistillConfig(steps=500), not {type(config).__name__}")
    if config.features in ("blocks", "factorized+blocks"):  # the pass spells them out from what remove_blocks did
        raise ConfigFieldError("features", f"{config.features!r} aligns the joins of blocks a remove_blocks pass "
                                           "removed: use it in a recipe after remove_blocks, or name the tensor pairs")
    start = time.perf_counter()
    teacher, student = Path(teacher), Path(student)
    checkpoint = Path(config.checkpoint) if config.checkpoint is not None else None
    out = model_io.check_output_path(out, teacher, student)
    if checkpoint is not None:
        if checkpoint.resolve() in (teacher.resolve(), student.resolve(), out.resolve()):
            raise EdgelrError(f"{checkpoint}: the checkpoint cannot be the teacher, the student or the output")
        if not checkpoint.parent.is_dir():
            raise EdgelrError(f"{checkpoint}: folder '{checkpoint.parent}' does not exist")
    processes = launched_world_size()
    if config.batch % processes:
        raise ConfigFieldError("batch", f"({config.batch}) must be a multiple of the {processes} processes "
                                        "(WORLD_SIZE): each takes an equal slice of every batch")
    device = _resolve_device(config.device)

    t_model = model_io.load(teacher)
    s_model = model_io.load(student)
    _check_pair(t_model, s_model, teacher, student)
    strong = augment_spec(config.augment)
    dataset = load_data(data, t_model, config.preprocess)
    if strong is not None and isinstance(dataset, ImageData):
        dataset.strong = strong
    evaluation = evaluation_samples(eval_samples, t_model, config.preprocess)
    if config.steps is not None:
        total = config.steps
    else:
        total = max(1, math.ceil(config.epochs * len(dataset) / config.batch))
    features, feature_weight = config.features, config.feature_weight
    if features == "factorized":
        features = factorized_features(s_model, student)
        feature_weight = FACTORIZED_FEATURE_WEIGHT if feature_weight is None else feature_weight
    feature_weight = 1.0 if feature_weight is None else feature_weight
    features = [tuple(f) for f in features or []]
    t_values = {v.name for n in t_model.graph for v in n.outputs} | {v.name for v in t_model.graph.inputs}
    for t_name, _ in features:
        if t_name not in t_values:
            raise EdgelrError(f"{teacher}: no tensor named '{t_name}' (features)")

    threads = os.environ.get("EDGELR_TORCH_THREADS")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    quiet = warnings.catch_warnings()
    quiet.__enter__()
    # onnx2torch's Slice indexes with a list of slices, which torch warns about (the results are right)
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
    world, device = join(device)
    try:
        freeze = config.freeze + tuple(weights_outside_pairs(student) if config.pairs_only else ())
        module = to_torch(student, freeze=freeze)
        info = onnx_info(module)
        out_names = list(info.outputs)
        set_outputs(module, out_names + [s for _, s in features])
        input_names = list(info.inputs)
        probe = chunks(dataset.batch(np.arange(min(len(dataset), 2)), None), dataset.batched)[0]
        check_conversion(module, student, probe, input_names, out_names)
        module.to(device)
        rounding = (fake_quantize_inputs(module, world.max_ if world.size > 1 else None)
                    if config.quantization_aware else [])
        del s_model
        with teacher_session(t_model, [t for t, _ in features], teacher_threads(world)) as session:
            del t_model
            groups = output_groups(session, dataset, out_names) if config.by_group else None
            objective = Objective(tuple(out_names), len(features), groups, config.scores, config.score_weight,
                                  feature_weight, task_loss, config.task_weight)
            job = Job(module, info, session, dataset, input_names, out_names + [t for t, _ in features], objective,
                      total, device, start, _meta(teacher, student, config, total, info, strong), world,
                      progress=progress)
            result = train(job, config)
        for hook in rounding:  # the saved model and the parity check are float
            hook.remove()
        module.to("cpu")
        written = False
        try:
            if world.main:
                # judged where it is written, beside OUT, and moved into place only once it ran and passed
                with model_io.Delivery(probe) as delivery:
                    trained = delivery.write(trained_copy(module, student), out)
                    result["parity"] = parity(module, trained, probe, input_names, out_names, where=out)
                    delivery.ran(trained)
                    if evaluation is not None:
                        from edgelr.measure.verify import output_error

                        result["error_before"] = output_error(teacher, student, evaluation)
                        result["error_after"] = output_error(teacher, trained, evaluation)
                        worse = result["error_after"]["worst"] > result["error_before"]["worst"]
                        result["kept"] = "trained" if config.keep_worse or not worse else "student"
                        if result["kept"] == "student":  # training made it worse on held-out data: no gain to ship
                            delivery.write(model_io.load(student), out)
            written = True
        finally:  # the other processes wait for the output, and fail with rank 0
            if world.size > 1 and not world.from_main(float(written)) and not world.main:
                raise EdgelrError(f"{out}: rank 0 could not write the output (its error says why)")
    finally:
        world.close()
        quiet.__exit__(None, None, None)
        if threads:
            torch.set_num_threads(old_threads)
    result["seconds"] = time.perf_counter() - start
    result["output"] = str(out)
    result["rank"] = world.rank
    return result


def check_distillable(model: str | os.PathLike) -> None:
    """One EdgelrError line now, before anything slow, where MODEL cannot be distilled here: no torch or onnx2torch,
    or an op onnx2torch does not convert (distill itself finds the same, once its data is ready)."""
    need_torch()
    import_onnx2torch()
    path = Path(model)
    check_ops(onnx.load(str(path), load_external_data=False), path)


def output_groups(session, dataset, out_names: list[str]) -> tuple[tuple[Group, ...], ...]:
    """Each output's channel groups (edgelr.core.objective), read once from the teacher's outputs on the
    first samples, unaugmented: every step, process and resumed run splits alike."""
    feeds = chunks(dataset.batch(np.arange(min(len(dataset), SCALE_SAMPLES)), None), dataset.batched)
    found = CoreObjective.of([dict(zip(out_names, session.run(out_names, feed))) for feed in feeds])
    return tuple(tuple(g for g in found.groups if g.output == name) for name in out_names)


def _meta(teacher: Path, student: Path, config: DistillConfig, total: int, info, strong: Augment | None) -> dict:
    """What a checkpoint must match to be resumed (the keys and values checkpoints have always had)."""
    augment = strong if strong is not None else {"light": True, "none": False}[config.augment]
    scores = config.scores
    return {"version": 1, "teacher": str(teacher.resolve()), "student": str(student.resolve()),
            "seed": config.seed, "batch": config.batch, "steps": int(total), "lr": config.lr,
            "weight_decay": config.weight_decay, "weights": sorted(info.params), "augment": repr(augment),
            "precision": config.train_precision, "scores": list(scores) if scores else None,
            "score_weight": config.score_weight if scores else None,
            "lr_scale": {k: float(v) for k, v in config.lr_scale},
            "quantization_aware": config.quantization_aware}


def _check_pair(teacher: ir.Model, student: ir.Model, tpath: Path, spath: Path) -> None:
    t_in = {v.name: v for v in model_inputs(teacher)}
    s_in = {v.name: v for v in model_inputs(student)}
    if set(t_in) != set(s_in):
        raise EdgelrError(f"{spath}: its inputs {sorted(s_in)} are not the teacher's {sorted(t_in)} "
                          f"({tpath}); the student must take the same inputs")
    for name, tv in t_in.items():
        sv = s_in[name]
        td = list(tv.shape.dims) if tv.shape is not None else None
        sd = list(sv.shape.dims) if sv.shape is not None else None
        if tv.dtype != sv.dtype:
            raise EdgelrError(f"{spath}: input '{name}' is {sv.dtype}, the teacher's is {tv.dtype}")
        if td is not None and sd is not None and (
            len(td) != len(sd) or any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(td, sd))
        ):
            raise EdgelrError(f"{spath}: input '{name}' has shape {sd}, the teacher's has {td}; "
                              "the student must take the same inputs")
    t_out = [v.name for v in teacher.graph.outputs]
    s_out = [v.name for v in student.graph.outputs]
    if len(t_out) != len(s_out) or set(t_out) != set(s_out):
        raise EdgelrError(f"{spath}: its outputs {s_out} are not the teacher's {t_out} ({tpath}); "
                          "the student must give the same outputs")


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError as exc:
        raise EdgelrError(f"device '{device}': {model_io.first_line(exc)}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EdgelrError(f"device '{device}': no CUDA GPU is available to torch here; use 'cpu' or 'auto'")
    return device


@register_pass(DistillConfig)
class DistillPass(FunctionalEdgelrPass):
    """The pipeline's model (the student) trained towards the model as given (the teacher) on the config's
    data or the calibration samples; the next pass gets the trained model."""

    def call(self, model: ir.Model) -> PassDetails:
        ctx = self.context
        teacher = self.config.teacher if self.config.teacher is not None else ctx.source
        config = _resolved_features(self.config, ctx.blocks_removed, ctx.path, teacher)
        data = config.data if config.data is not None else ctx.calib
        out = ctx.scratch("distilled")
        done = distill(teacher, ctx.path, data, out, config, eval_samples=config.heldout, progress=ctx.progress)
        ctx.distilled = {k: done[k] for k in ("steps", "seconds", "stopped_early", "final_loss", "kept") if k in done}
        ctx.distilled.update({f"heldout_{k}": done[k]["worst"] for k in ("error_before", "error_after") if k in done})
        ctx.distilled["features"] = [list(f) for f in config.features or ()]
        return PassDetails(model_io.load(out), True, done)


def _resolved_features(config: DistillConfig, blocks_removed: dict | None, student: Path,
                       teacher: str | os.PathLike) -> DistillConfig:
    """CONFIG with features named by kind ("factorized", "blocks", both) spelled out as tensor pairs, and the
    kind's weight unless one is given (the pipeline's record then names the tensors aligned)."""
    if not isinstance(config.features, str):
        return config
    kinds = config.features.split("+")
    student_model = model_io.load(student)
    pairs = factorized_features(student_model, student) if "factorized" in kinds else []
    if "blocks" in kinds:
        pairs += _block_joins(blocks_removed, {teacher: model_io.load(teacher), student: student_model})
    weight = FACTORIZED_FEATURE_WEIGHT if "factorized" in kinds else BLOCK_FEATURE_WEIGHT
    return dataclasses.replace(config, features=tuple(pairs),
                               feature_weight=weight if config.feature_weight is None else config.feature_weight)


def _block_joins(blocks_removed: dict | None, models: dict) -> list[tuple[str, str]]:
    """(join, join) for each block remove_blocks removed, by the name it recorded, checked to be computed in the
    teacher and the student (MODELS: path -> model)."""
    joins = list((blocks_removed or {}).get("joins", {}).values())
    if not joins:
        raise ConfigFieldError("features", "'blocks' aligns the joins of removed blocks, and no remove_blocks pass "
                                           "before distill removed any")
    for path, model in models.items():
        computed = {v.name for n in model.graph for v in n.outputs}
        missing = [name for name in joins if name not in computed]
        if missing:
            raise EdgelrError(f"{path}: no tensor named '{missing[0]}' (the join of a removed block)")
    return [(name, name) for name in joins]
