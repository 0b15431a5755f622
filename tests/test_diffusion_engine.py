"""edgelr export PIPELINE --target rtx: the tiny diffusers pipelines (models/diffusion_tiny.py) exported to the ONNX
folder plus a TensorRT for RTX engine for the denoiser (built ahead of time: no GPU here), from a diffusers folder,
from an exported one and from a compressed (quantized) one; the ONNX folder still runs on ONNX Runtime. Bad input:
one line, exit 1, nothing written."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

pytest.importorskip("diffusers")
pytest.importorskip("optimum.exporters.onnx")
pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT for RTX is not installed (pip install edgelr[trt])")


from edgelr.cli import main
from edgelr.deploy.pipeline_run import OnnxDiffusionPipeline
from edgelr.deploy.tensorrt import gpu_available

PROMPTS = ["a photo of the red cat", "dog"]


@pytest.fixture(scope="session")
def pipelines(tiny_pipelines):
    return tiny_pipelines


def _export(*args: str) -> None:
    assert main(["-q", "export", *map(str, args)]) == 0


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest(folder: Path, leave_out=("manifest.json",)) -> dict[str, str]:
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and str(p.relative_to(folder)) not in leave_out and not p.is_relative_to(folder / "engines")}


def _profile(batch: tuple[int, int, int], **rest: tuple[int, ...]) -> dict:
    return {name: {key: [b, *dims] for key, b in zip(("min", "opt", "max"), batch)} for name, dims in rest.items()}


def _check_engine(folder: Path, precision: str, profile: dict) -> dict:
    """The engine is there, non-empty, built from the folder's own denoiser, and the manifest says so."""
    m = _manifest(folder)
    engine = m["engines"]["unet"]
    assert engine["file"] == "engines/unet/model.engine" == m["components"]["unet"]["engine"]
    assert (folder / engine["file"]).stat().st_size == engine["bytes"] == m["files"][engine["file"]]["bytes"] > 100_000
    assert engine["built_from"]["sha256"] == _sha(folder / "unet" / "model.onnx")
    assert engine["precision"] == precision and engine["profile"] == profile
    assert engine["tensorrt"]["module"] == "tensorrt_rtx_bindings" and engine["tensorrt"]["version"].startswith("1.7")
    assert engine["build_seconds"] > 0
    assert m["target"]["name"] == "rtx" and m["target"]["backend"] == "tensorrt-rtx"
    assert {name: c["runtime"] for name, c in m["components"].items()} == \
        {name: "tensorrt-rtx" if name == "unet" else "onnxruntime" for name in m["components"]}
    if not gpu_available():
        assert engine["parity"] == "skipped: no GPU"
    inner = json.loads((folder / "engines" / "unet" / "manifest.json").read_text())
    assert inner["profile"] == profile and inner["source_model"] == "unet/model.onnx"
    for name, entry in m["files"].items():  # every file, the engine's folder too, with its hash
        assert entry["sha256"] == _sha(folder / name), name
    return m


@pytest.mark.slow
def test_unconditional_pipeline_gets_an_engine_and_still_runs_on_onnxruntime(pipelines, tmp_path):
    out = tmp_path / "ddpm.rtx"
    _export(pipelines / "ddpm", "--target", "rtx", "-o", out)
    _check_engine(out, "fp16", _profile((1, 1, 8), sample=(3, 16, 16), timestep=()))
    assert (out / "engines" / "unet" / "model.fp16.onnx").is_file()  # the graph the fp16 engine was built from
    expected = OnnxDiffusionPipeline(pipelines / "ddpm.out")(steps=3, batch=2, seed=4)
    images = OnnxDiffusionPipeline(out)(steps=3, batch=2, seed=4)
    assert images.shape == (2, 16, 16, 3) and np.abs(images - expected).max() < 1e-5


@pytest.mark.slow
def test_text_to_image_pipeline_gets_an_engine_for_its_unet_only(pipelines, tmp_path):
    out = tmp_path / "sd.rtx"
    _export(pipelines / "sd", "--target", "rtx", "-o", out)
    m = _check_engine(out, "fp16", _profile((1, 2, 8), sample=(4, 8, 8), encoder_hidden_states=(16, 16)))
    assert "twice the prompts" in m["engines"]["unet"]["batch"]["why"]
    assert not (out / "engines" / "text_encoder").exists() and "ONNX Runtime" in m["runner"]
    expected = OnnxDiffusionPipeline(pipelines / "sd.out")(PROMPTS, steps=3, seed=2)
    images = OnnxDiffusionPipeline(out)(PROMPTS, steps=3, seed=2)
    assert images.shape == (2, 16, 16, 3) and np.abs(images - expected).max() < 1e-5


@pytest.mark.slow
def test_exported_and_compressed_folders_get_an_engine_for_their_own_denoiser(pipelines, tmp_path):
    source = pipelines / "ddpm.out"
    out = tmp_path / "ddpm.rtx"
    _export(source, "--target", "rtx", "-o", out, "--shapes", "batch=1:4:16")
    _check_engine(out, "fp16", _profile((1, 4, 16), sample=(3, 16, 16), timestep=()))
    assert _digest(out) == _digest(source)  # the rest copied as it was
    # export -> compress (int8 for TensorRT: symmetric Q/DQ) -> export --target rtx
    quantized = tmp_path / "ddpm.q"
    assert main(["-q", "compress", str(source), "-o", str(quantized), "--params", "0.5", "--quantize", "int8",
                 "--target", "rtx", "--steps", "3", "--seeds", "1", "--images", "1", "--max-output-error", "1"]) == 0
    engine = tmp_path / "ddpm.q.rtx"
    _export(quantized, "--target", "rtx", "-o", engine)
    m = _check_engine(engine, "int8", _profile((1, 1, 8), sample=(3, 16, 16), timestep=()))
    assert m["engines"]["unet"]["graph"] == "as is: the model's own Q/DQ nodes"
    assert m["compression"]["passes"] == _manifest(quantized)["compression"]["passes"]
    assert _digest(engine) == _digest(quantized)
    images = OnnxDiffusionPipeline(engine)(steps=3, seed=1)
    assert np.array_equal(images, OnnxDiffusionPipeline(quantized)(steps=3, seed=1))
    # an engine folder given again: its old engine is left behind, a new one built
    again = tmp_path / "again"
    _export(out, "--target", "rtx", "-o", again)
    _check_engine(again, "fp16", _profile((1, 1, 8), sample=(3, 16, 16), timestep=()))
    # an engine folder compressed: its engine was built from the old denoiser, so it is not carried along
    recompressed = tmp_path / "again.q"
    assert main(["-q", "compress", str(again), "-o", str(recompressed), "--params", "0.5", "--steps", "3",
                 "--seeds", "1", "--images", "1", "--max-output-error", "1"]) == 0
    m = _manifest(recompressed)
    assert not (recompressed / "engines").exists() and "engines" not in m
    assert {c["runtime"] for c in m["components"].values()} == {"onnxruntime"}
    assert f"edgelr export {recompressed} --target rtx" in m["runner"]


def _fails(capsys, args: list, out: Path, *words: str) -> None:
    """The CLI: exit 1, one line on stderr naming `words`, and nothing written beside OUT (an earlier OUT kept)."""
    before = {p: _sha(p) for p in out.parent.rglob("*") if p.is_file()}
    code = main(["-q", "export", *map(str, args), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and err.startswith("edgelr export: error: "), err
    for word in words:
        assert word in err, err
    assert {p: _sha(p) for p in out.parent.rglob("*") if p.is_file()} == before


def _uint8_quantized(source: Path, folder: Path) -> Path:
    """SOURCE's copy with its denoiser quantized as ONNX Runtime does for x86 (uint8 activations)."""
    from edgelr.io import model as model_io
    from edgelr.io.samples import samples_from_arrays
    from edgelr.passes.quantize import quantize

    shutil.copytree(source, folder)
    unet = folder / "unet" / "model.onnx"
    rng = np.random.default_rng(0)
    arrays = {"sample": rng.standard_normal((4, 3, 16, 16), dtype=np.float32),
              "timestep": np.array([999, 500, 100, 10], np.int64)}
    quantize(unet, folder / "q.onnx", "int8", samples_from_arrays(arrays, model_io.load(unet)), activations="uint8",
             progress=False, prepare=False)
    (folder / "q.onnx").replace(unet)
    return folder


def _with_an_op_tensorrt_lacks(source: Path, folder: Path) -> Path:
    """SOURCE's copy whose denoiser ends in com.microsoft's QuickGelu: ONNX Runtime runs it, TensorRT has no such op."""
    shutil.copytree(source, folder)
    unet = folder / "unet" / "model.onnx"
    model = onnx.load(str(unet))
    name = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{name}_pre" if o == name else o for o in node.output]
    model.graph.node.append(helper.make_node("QuickGelu", [f"{name}_pre"], [name], domain="com.microsoft"))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(unet))
    return folder


def test_bad_input_is_one_line_and_writes_nothing(pipelines, tmp_path, capsys):
    ddpm, exported = pipelines / "ddpm", pipelines / "ddpm.out"
    out = tmp_path / "out"
    _fails(capsys, [ddpm, "--target", "rpi5"], out, "target 'rpi5'", "--target rtx")
    _fails(capsys, [exported, "--target", "x86-cpu"], out, "already an exported pipeline", "--target rtx")
    _fails(capsys, [ddpm, "--target", "x86-cpu", "--shapes", "batch=1:2:4"], out, "--shapes", "TensorRT")
    _fails(capsys, [ddpm, "--target", "rtx", "--precision", "int8"], out, "quantized denoiser", "edgelr compress")
    _fails(capsys, [exported, "--target", "rtx", "--calib", "x.npz"], out, "--calib")
    _fails(capsys, [exported, "--target", "rtx", "--shapes", "sample=1x3x8x8"], out, "Nx3x16x16", "batch")
    _fails(capsys, [exported, "--target", "rtx", "--shapes", "noise=1:2:4"], out, "no such batched input")
    if importlib.util.find_spec("tensorrt") is None:  # full TensorRT (Jetson, data-centre GPUs) is not installed here
        _fails(capsys, [exported, "--target", "jetson-orin"], out, "needs TensorRT", "not installed")
    uint8 = _uint8_quantized(exported, tmp_path / "uint8")
    _fails(capsys, [uint8, "--target", "rtx"], out, f"{uint8}/unet/model.onnx", "uint8 activations",
           "--quantize int8 --target rtx")
    # TensorRT's own failure, and an earlier engine folder at OUT stays as it was
    unparsable = _with_an_op_tensorrt_lacks(exported, tmp_path / "custom-op")
    earlier = tmp_path / "earlier"
    _export(exported, "--target", "rtx", "-o", earlier)
    _fails(capsys, [unparsable, "--target", "rtx"], earlier, "TensorRT cannot parse", "QuickGelu")
