"""The RGB + thermal fusion detector (models/fusion.py) and its synthetic scenes (models/fusion_data.py): the
scenes are seeded and their boxes are where the drawn objects are; decode and map50 score exact and wrong
predictions as they should; the tiny model learns, exports and runs in ONNX Runtime as in torch."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch

from edgelr.io.model import ort_session
from edgelr.measure.detection import Detections
from edgelr.train.lowrank import export_onnx
from models.fusion import (
    STRIDE,
    TINY,
    FusionDetector,
    assign,
    decode,
    detection_loss,
    map50,
)
from models.fusion_data import (
    CLASSES,
    HELD_OUT_SEED,
    SIZE,
    Truth,
    batch,
    held_out,
    training_rng,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def scenes():
    return batch(training_rng(5), 300)


def test_scenes_are_seeded_and_held_out_is_fixed():
    first, again, other = batch(training_rng(3), 6), batch(training_rng(3), 6), batch(training_rng(4), 6)
    for a, b in zip(first[:2], again[:2]):
        assert a.dtype == np.float32 and np.array_equal(a, b)
    assert [t.boxes.tolist() for t in first[2]] == [t.boxes.tolist() for t in again[2]]
    assert not np.array_equal(first[0], other[0])
    small, large = held_out(4), held_out(8)
    assert np.array_equal(small[1], large[1][:4])
    assert not np.array_equal(large[0][:4], batch(training_rng(HELD_OUT_SEED), 4)[0])  # another stream


def test_scenes_hold_every_kind_of_object_inside_the_image(scenes):
    rgb, thermal, truths = scenes
    assert rgb.shape == (300, 3, SIZE, SIZE) and thermal.shape == (300, 1, SIZE, SIZE)
    assert 0 <= rgb.min() and rgb.max() <= 1 and 0 <= thermal.min() and thermal.max() <= 1
    boxes = np.concatenate([t.boxes for t in truths])
    classes = np.concatenate([t.classes for t in truths])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= SIZE).all() and (boxes[:, 2:] > boxes[:, :2] + 4).all()
    assert {len(t.classes) for t in truths} == {0, 1, 2, 3, 4}
    assert set(classes.tolist()) == set(range(len(CLASSES)))
    height_over_width = (boxes[:, 3] - boxes[:, 1]) / (boxes[:, 2] - boxes[:, 0])
    assert (height_over_width[classes == 0] > 1.4).all()  # people stand
    assert (height_over_width[classes > 0] < 0.9).all()  # vehicles and animals lie
    width = boxes[:, 2] - boxes[:, 0]
    assert np.median(width[classes == 1]) > 1.5 * np.median(width[classes == 2])  # vehicles are the larger
    assert 0.2 < np.mean([t.night for t in truths]) < 0.4


def _object_statistics(rgb, thermal, truths):
    """Per object: heat (thermal in its box minus in a 3-pixel ring outside every box), how far the heat's
    centroid is from the box centre (in box sizes), and RGB contrast (mean |pixel - ring colour|)."""
    rows = []
    for image, heat_image, truth in zip(rgb, thermal[:, 0], truths):
        free = np.ones((SIZE, SIZE), bool)
        for x1, y1, x2, y2 in truth.boxes.astype(int):
            free[y1:y2, x1:x2] = False
        for (x1, y1, x2, y2), clear_rgb, clear_thermal in zip(truth.boxes.astype(int), truth.rgb_visible,
                                                               truth.thermal_visible):
            ring = np.zeros((SIZE, SIZE), bool)
            ring[max(y1 - 3, 0):y2 + 3, max(x1 - 3, 0):x2 + 3] = True
            ring &= free
            excess = np.clip(heat_image[y1:y2, x1:x2] - heat_image[ring].mean(), 0, None)
            y, x = np.mgrid[y1:y2, x1:x2] + 0.5
            centroid = ((excess * x).sum(), (excess * y).sum()) / max(excess.sum(), 1e-9)
            off_centre = max(abs(centroid[0] - (x1 + x2) / 2) / (x2 - x1), abs(centroid[1] - (y1 + y2) / 2) / (y2 - y1))
            contrast = np.abs(image[:, y1:y2, x1:x2] - image[:, ring].mean(1)[:, None, None]).mean()
            rows.append((clear_rgb, clear_thermal, excess.mean(), off_centre, contrast))
    return np.array(rows, dtype=float).T


def test_boxes_are_on_the_drawn_objects(scenes):
    """An object clear in thermal is hotter inside its box than around it, its heat centred in the box; one
    faint in thermal is not. One clear in RGB stands out from its surroundings; a faint one (night,
    camouflage) hardly does."""
    clear_rgb, clear_thermal, heat, off_centre, contrast = _object_statistics(*scenes)
    hot, cold = clear_thermal == 1, clear_thermal == 0
    assert hot.sum() > 300 and cold.sum() > 50
    assert (heat[hot] > 0.05).mean() > 0.99 and np.median(heat[hot]) > 0.1
    assert np.median(heat[cold]) < 0.03
    assert (off_centre[hot] < 0.3).all()
    seen, unseen = clear_rgb == 1, clear_rgb == 0
    assert seen.sum() > 200 and unseen.sum() > 200
    assert np.median(contrast[seen]) > 0.15 and np.median(contrast[unseen]) < 0.06
    assert ((clear_rgb == 1) | (clear_thermal == 1)).all()  # every object is clear somewhere


def test_assign_marks_the_centre_cell_and_gives_a_shared_cell_to_the_smaller_object():
    model = FusionDetector(TINY)
    truths = [Truth(np.array([[2, 2, 30, 20], [12, 4, 18, 18]], np.float32), np.array([1, 0]),
                    np.ones(2, bool), np.ones(2, bool), False),
              Truth(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, bool), True)]
    boxes, classes = assign(model.anchors.numpy(), STRIDE, truths)
    grid = classes[0].reshape(TINY.cells, TINY.cells)  # cell (row, column) has its centre at 8 * index + 4
    assert grid[1, 1] == 0  # the person's centre cell, within the vehicle's reach too: the smaller one's
    assert grid[1, 2] == grid[0, 1] == grid[0, 2] == 1  # the vehicle's centre cell and its neighbours in its box
    assert np.array_equal(boxes[0, 1 * TINY.cells + 2], [2, 2, 30, 20])
    assert grid[1, 0] == -1  # inside the vehicle's box, but more than a stride from its centre
    assert (classes[0] >= 0).sum() == 4 and (classes[1] == -1).all()


def _outputs_from(truths, classes: int = len(CLASSES)) -> np.ndarray:
    """Raw detector outputs (N, 4 + classes, cells) that hold exactly these ground truths, score 0.9 each."""
    cells = (SIZE // STRIDE) ** 2
    outputs = np.zeros((len(truths), 4 + classes, cells), np.float32)
    for i, truth in enumerate(truths):
        for j, ((x1, y1, x2, y2), cls) in enumerate(zip(truth.boxes, truth.classes)):
            outputs[i, :4, j] = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
            outputs[i, 4 + cls, j] = 0.9
    return outputs


def test_decode_and_map50_score_exact_and_wrong_predictions(scenes):
    truths = scenes[2][:40]
    exact = decode(torch.from_numpy(_outputs_from(truths)))
    assert [len(d) for d in exact] == [len(t.classes) for t in truths]
    assert map50(exact, truths) == 1.0

    def changed(change) -> float:
        wrong = [Truth(t.boxes.copy(), t.classes.copy(), t.rgb_visible, t.thermal_visible, t.night) for t in truths]
        first = next(t for t in wrong if len(t.classes))
        change(first)
        return map50(decode(_outputs_from(wrong)), truths)

    def shift(t):
        t.boxes[0, [0, 2]] += 0.5 * (t.boxes[0, 2] - t.boxes[0, 0])

    def relabel(t):
        t.classes[0] = (t.classes[0] + 1) % len(CLASSES)

    assert changed(shift) < 1.0 and changed(relabel) < 1.0
    assert map50([Detections() for _ in truths], truths) == 0.0


def test_tiny_model_learns_a_fixed_batch():
    torch.manual_seed(0)
    model = FusionDetector(TINY)
    rgb, thermal, truths = batch(training_rng(0), 16)
    rgb, thermal = torch.from_numpy(rgb), torch.from_numpy(thermal)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, parts = detection_loss(model, rgb, thermal, truths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert set(parts) == {"class", "giou", "l1"}
    assert np.isfinite(losses).all() and losses[-1] < 0.6 * losses[0]


def test_tiny_model_exports_and_runs_in_onnx_runtime(tmp_path):
    """Eval mode scans in chunks (what exports), training mode sequentially: the same outputs; the ONNX file
    has the two named inputs and gives torch's outputs."""
    torch.manual_seed(0)
    model = FusionDetector(TINY).eval()
    rgb, thermal, _ = batch(training_rng(1), 2)
    rgb, thermal = torch.from_numpy(rgb), torch.from_numpy(thermal)
    with torch.no_grad():
        expected = model(rgb, thermal)
        for module in model.modules():
            if hasattr(module, "scan"):
                assert module.scan == "chunked"
                module.scan = "sequential"
        assert torch.allclose(model(rgb, thermal), expected, atol=1e-5)
    assert expected.shape == (2, 4 + len(CLASSES), TINY.cells ** 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        result = export_onnx(model, tmp_path / "fusion.onnx", (rgb, thermal), input_names=["rgb", "thermal"],
                             dynamic_batch=False)
    assert result["parity"] <= 1e-4
    with ort_session(tmp_path / "fusion.onnx", threads=1) as session:
        assert [i.name for i in session.get_inputs()] == ["rgb", "thermal"]
        got = session.run(None, {"rgb": rgb.numpy(), "thermal": thermal.numpy()})[0]
    expected = expected.numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_training_script_writes_the_model_and_its_numbers(tmp_path, monkeypatch):
    from tools import train_fusion

    monkeypatch.setattr(sys, "argv", ["train_fusion.py", "--config", "tiny", "--minutes", "0.05", "--batch", "8",
                                      "--threads", "1", "--eval-images", "16", "--out", str(tmp_path)])
    train_fusion.main()
    report = json.loads((tmp_path / "train.json").read_text())
    assert report["steps"] > 0 and np.isfinite(report["final_loss"]) and 0 <= report["map50"] <= 1
    assert report["eval_images"] == 16 and set(report["class_ap50"]) <= set(CLASSES)
    model = FusionDetector(TINY)
    model.load_state_dict(torch.load(tmp_path / "fusion.pt"))


@pytest.mark.slow
def test_detector_deploys_to_rpi5_under_emulation_and_builds_a_tensorrt_rtx_engine(tmp_path):
    """The SS2D detector at a fixed size: its Pi bundle passes parity on the emulated aarch64 Pi (onnxruntime
    1.19.2, ORT format, reduced operators), and TensorRT for RTX builds its engine (ahead of time, no GPU)."""
    import importlib.util
    import shutil

    from edgelr.deploy.export import export
    from tools.aarch64_env import QEMU, run_bundle

    torch.manual_seed(0)
    rgb, thermal = torch.rand(1, 3, SIZE, SIZE), torch.rand(1, 1, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(FusionDetector(TINY).eval(), tmp_path / "fusion.onnx", (rgb, thermal),
                    input_names=["rgb", "thermal"], dynamic_batch=False)
    np.savez(tmp_path / "calib.npz", rgb=np.random.default_rng(0).random((2, 3, SIZE, SIZE), np.float32),
             thermal=np.random.default_rng(1).random((2, 1, SIZE, SIZE), np.float32))
    export(tmp_path / "fusion.onnx", "rpi5", tmp_path / "pi", calib=tmp_path / "calib.npz", progress=False)
    if shutil.which(QEMU) is not None:
        done = run_bundle(tmp_path / "pi", ["--runs", "1", "--warmup", "0"], progress=False)
        assert done.returncode == 0 and done.report["machine"] == "aarch64", done.report
        assert done.report["parity"]["passed"], done.report
    if not any(importlib.util.find_spec(name) for name in ("tensorrt_rtx", "tensorrt_rtx_bindings")):
        return  # the [trt] extra is not installed here: the Pi half ran
    export(tmp_path / "fusion.onnx", "rtx", tmp_path / "rtx", calib=tmp_path / "calib.npz", progress=False)
    assert (tmp_path / "rtx" / "model.engine").stat().st_size > 0
