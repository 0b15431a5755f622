"""edgelr compress EXPORTED_PIPELINE: the denoiser of a tiny exported pipeline (models/diffusion_tiny.py, random
weights) calibrated on its own sampling trajectories, compressed, judged by the images the pipeline makes, and
written as a new pipeline folder that runs in ONNX Runtime. Bad input: one line, exit 1, nothing written."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("optimum.exporters.onnx")
pytest.importorskip("skimage")

import onnx_ir as ir
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from edgelr.api import compress_pipeline, pipeline_passes
from edgelr.calibration.trajectories import capture_trajectories
from edgelr.cli import main
from edgelr.deploy.pipeline_compress import JUDGE_SEED, capture_distill_data
from edgelr.deploy.pipeline_run import OnnxDiffusionPipeline
from edgelr.errors import EdgelrError
from edgelr.graph.residual import remove_branches, residual_branches
from edgelr.io.model import ort_session
from edgelr.io.samples import load_samples
from edgelr.measure.verify import output_error
from edgelr.passes.factorize import FactorizeConfig
from edgelr.passes.quantize import QuantizeConfig
from edgelr.passes.remove_blocks import RemoveBlocksConfig
from edgelr.train.distill import ConfigFieldError, DistillConfig, distill

PROMPTS = ["a photo of the red cat", "dog"]


@pytest.fixture(scope="session")
def exported(tiny_pipelines):
    return tiny_pipelines


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _pixels(reference: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    """Mean PSNR and SSIM over images (N, H, W, C) in [0, 1], straight from scikit-image."""
    p = [peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(reference, test)]
    s = [structural_similarity(a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                               use_sample_covariance=False) for a, b in zip(reference, test)]
    return float(np.mean(p)), float(np.mean(s))


# ---- trajectories ----

def test_unconditional_trajectories_cover_every_timestep(exported, tmp_path):
    pipe = OnnxDiffusionPipeline(exported / "ddpm.out")
    traj = capture_trajectories(pipe, seeds=[3, 4], steps=6, samples=64)
    schedule = pipe.scheduler.timesteps.tolist()
    assert traj.schedule.tolist() == schedule and len(set(schedule)) == 6
    # 2 runs x 6 steps x batch 1 = 12 rows, all kept; one array per denoiser input, at batch 1 per sample
    assert set(traj.arrays) == {"sample", "timestep"} == set(pipe.unet_inputs)
    assert traj.arrays["sample"].shape == (12, 3, 16, 16) and traj.arrays["timestep"].shape == (12,)
    assert traj.arrays["timestep"].dtype == np.int64 and traj.arrays["timestep"].tolist() == traj.timesteps.tolist()
    assert traj.per_step == {t: 2 for t in schedule}
    # any prefix spreads over the schedule: the first six samples hold the six timesteps
    assert sorted(traj.timesteps[:6].tolist()) == sorted(schedule)
    # the samples are what the runs fed the denoiser: the first step's input is the seed's initial noise
    first = [i for i, t in enumerate(traj.timesteps) if t == schedule[0]]
    noise = {seed: np.random.default_rng(seed).standard_normal((1, 3, 16, 16), dtype=np.float32)[0] for seed in (3, 4)}
    assert all(any(np.array_equal(traj.arrays["sample"][i], n) for i in first) for n in noise.values())
    # what compress reads: names and shapes checked against the exported denoiser
    path = traj.save(tmp_path / "calib.npz")
    samples = load_samples(path, ir.load(str(exported / "ddpm.out" / "unet" / "model.onnx")))
    assert len(samples) == 12 and samples.feed(0)["sample"].shape == (1, 3, 16, 16)
    assert samples.feed(0)["timestep"].shape == (1,)

    few = capture_trajectories(pipe, seeds=2, steps=6, samples=3)  # fewer samples than steps: one per range
    assert len(few) == 3 and len(set(few.timesteps.tolist())) == 3
    order = {t: i for i, t in enumerate(schedule)}
    assert sorted(order[int(t)] // 2 for t in few.timesteps) == [0, 1, 2]


def test_text_to_image_trajectories_keep_both_halves_of_guidance(exported, tmp_path):
    pipe = OnnxDiffusionPipeline(exported / "sd.out")
    traj = capture_trajectories(pipe, seeds=2, steps=5, prompts=PROMPTS, guidance=7.5, samples=30)
    # CFG: per run the denoiser sees batch 4 (2 negative, 2 prompts); 2 runs x 5 steps x 4 rows = 40, 30 kept
    assert traj.rows_per_step == 8 and len(traj) == 30
    assert set(traj.arrays) == {"sample", "timestep", "encoder_hidden_states"}
    assert traj.arrays["sample"].shape == (30, 4, 8, 8)
    assert traj.arrays["encoder_hidden_states"].shape == (30, 16, 16)
    assert traj.arrays["timestep"].shape == (30,) and traj.arrays["timestep"].dtype == np.float32
    assert sorted(traj.per_step.values()) == [6] * 5 and set(traj.per_step) == set(pipe.scheduler.timesteps.tolist())
    embeds = pipe.encode_prompt(["", *PROMPTS])  # the negative prompt's embedding, then each prompt's
    kept = traj.arrays["encoder_hidden_states"]
    found = [any(np.allclose(k, e, atol=1e-6) for k in kept) for e in embeds]
    assert found == [True, True, True]  # unconditional and conditional halves both calibrate
    samples = load_samples(traj.save(tmp_path / "sd.npz"), ir.load(str(exported / "sd.out" / "unet" / "model.onnx")))
    assert samples.feed(0)["timestep"].shape == ()  # the exported UNet takes a scalar timestep
    assert traj.summary()["guidance"] == 7.5 and traj.summary()["timesteps_covered"] == 5


# ---- compress ----

def test_compress_params_writes_a_pipeline_judged_by_its_images(exported, tmp_path, capsys):
    source = exported / "ddpm.out"
    before = _digest(source)
    out = tmp_path / "small"
    code = main(["compress", str(source), "-o", str(out), "--params", "0.5", "--steps", "6", "--seeds", "1",
                 "--images", "2", "--max-output-error", "1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "PSNR" in printed and "SSIM" in printed and f"wrote {out}" in printed
    assert _digest(source) == before  # the exported folder is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing staged is left
    m = json.loads((out / "manifest.json").read_text())
    c = m["compression"]
    assert [p["_type"] for p in c["passes"]] == ["factorize", "refit"]
    assert c["params_after"] < 0.6 * c["params_before"]
    assert c["calibration"]["timesteps_covered"] == 6 and c["calibration"]["samples"] == 6
    assert m["components"]["unet"]["compressed"]["params_after"] == c["params_after"]
    assert set(m["files"]) == {k for k in _digest(out) if k != "manifest.json"}
    assert m["files"]["unet/model.onnx"]["sha256"] == _digest(out)["unet/model.onnx"]
    # the images: the reported PSNR/SSIM are what scikit-image measures on the two folders' images
    seeds = range(JUDGE_SEED, JUDGE_SEED + 2)
    original, small = OnnxDiffusionPipeline(source), OnnxDiffusionPipeline(out)
    a = np.concatenate([original(steps=6, seed=s) for s in seeds])
    b = np.concatenate([small(steps=6, seed=s) for s in seeds])
    psnr, ssim = _pixels(a, b)
    assert c["images"]["psnr_mean"] == pytest.approx(psnr, rel=1e-4)
    assert c["images"]["ssim_mean"] == pytest.approx(ssim, rel=1e-4)
    assert 15 < psnr < 60 and 0.5 < ssim < 1  # changed, and not wrecked


def test_text_to_image_pipeline_compresses_with_guidance(exported, tmp_path):
    out = tmp_path / "sd-small"
    done = compress_pipeline(exported / "sd.out", out, [FactorizeConfig(params=0.5)], seeds=2, steps=4, prompts=PROMPTS,
                             samples=8, images=1, max_output_error=1.0, progress=False)
    assert done.calibration["guidance"] == 7.5 and done.calibration["timesteps_covered"] == 4
    assert done.images["prompts"] == PROMPTS and done.images["images"] == 2
    assert np.isfinite(done.images["psnr_mean"]) and 0 < done.images["ssim_mean"] < 1
    images = OnnxDiffusionPipeline(out)(PROMPTS, steps=4, seed=JUDGE_SEED)
    reference = OnnxDiffusionPipeline(exported / "sd.out")(PROMPTS, steps=4, seed=JUDGE_SEED)
    assert images.shape == (2, 16, 16, 3) and _pixels(reference, images)[0] == pytest.approx(done.images["psnr_mean"], rel=1e-4)
    for name in ("text_encoder", "vae_decoder", "tokenizer"):  # the rest of the pipeline comes along unchanged
        assert _digest(out / name) == _digest(exported / "sd.out" / name)


def test_remove_blocks_removes_the_block_whose_images_change_least(exported, tmp_path):
    source = exported / "ddpm.out"
    done = compress_pipeline(source, tmp_path / "fewer", [RemoveBlocksConfig(count=1)], seeds=2, steps=5, images=2,
                             max_output_error=5.0, progress=False)
    b = done.manifest["compression"]["blocks_removed"]
    scores = {k: float(v) for k, v in b["sensitivity"].items()}
    finite = {k: v for k, v in scores.items() if np.isfinite(v)}
    assert len(finite) >= 5
    assert b["removed"] == [min(finite, key=finite.get)]
    assert "SSIM" in b["judged_by"]
    # judged over whole sampling runs: the removed block's score is 1 - SSIM of the images it makes, as
    # measured here without edgelr's judge
    model = ir.load(str(source / "unet" / "model.onnx"))
    remove_branches(model, [next(x for x in residual_branches(model) if x.name == b["removed"][0])])
    pipe = OnnxDiffusionPipeline(source)
    seeds = range(JUDGE_SEED, JUDGE_SEED + 2)
    reference = np.concatenate([pipe(steps=5, seed=s) for s in seeds])
    with ort_session(model) as session:
        pipe.unet = session
        images = np.concatenate([pipe(steps=5, seed=s) for s in seeds])
    assert 1 - _pixels(reference, images)[1] == pytest.approx(finite[b["removed"][0]], rel=1e-4)
    assert done.images["ssim_mean"] == pytest.approx(1 - finite[b["removed"][0]], rel=1e-6)
    assert done.manifest["compression"]["params_after"] < done.manifest["compression"]["params_before"]
    assert OnnxDiffusionPipeline(tmp_path / "fewer")(steps=2).shape == (1, 16, 16, 3)


# ---- distillation on the teacher's own trajectories ----

# a fixed number of steps (not a time limit): the same training on any machine
QUICK_DISTILL = DistillConfig(steps=60, batch=16, lr=1e-4, augment="none", by_group=False)
COMMON = {"seeds": 2, "steps": 6, "images": 2, "max_output_error": 10.0, "progress": False}


@pytest.fixture(scope="module")
def heldout(exported, tmp_path_factory):
    """Trajectories of seeds no calibration, judge or distillation run uses: the error is measured on them."""
    pipe = OnnxDiffusionPipeline(exported / "ddpm.out")
    path = capture_trajectories(pipe, seeds=range(90_000, 90_003), steps=6, samples=18).save(
        tmp_path_factory.mktemp("heldout") / "heldout.npz")
    return load_samples(path, ir.load(str(exported / "ddpm.out" / "unet" / "model.onnx")))


@pytest.fixture(scope="module")
def fewer(exported, tmp_path_factory):
    """The tiny DDPM with one block removed, not distilled."""
    return compress_pipeline(exported / "ddpm.out", tmp_path_factory.mktemp("fewer") / "out", [RemoveBlocksConfig(count=1)],
                             **COMMON)


def _heldout_error(exported: Path, folder: Path, samples) -> float:
    return output_error(exported / "ddpm.out" / "unet" / "model.onnx", folder / "unet" / "model.onnx", samples)["worst"]


def test_distillation_lowers_the_denoisers_error_on_heldout_trajectories(exported, heldout, fewer, tmp_path):
    taught = compress_pipeline(exported / "ddpm.out", tmp_path / "taught", [RemoveBlocksConfig(count=1), QUICK_DISTILL],
                               distill_seeds=4, **COMMON)
    assert taught.manifest["compression"]["blocks_removed"]["removed"] == fewer.manifest["compression"]["blocks_removed"]["removed"]
    before, after = _heldout_error(exported, fewer.output, heldout), _heldout_error(exported, tmp_path / "taught", heldout)
    assert after < 0.5 * before, (before, after)  # measured: 0.128 -> 0.046
    assert taught.images["psnr_mean"] > fewer.images["psnr_mean"] + 3  # measured: 29.9 -> 38.1 dB
    d = taught.manifest["compression"]["distillation"]
    assert d["steps"] == 60 and d["kept"] == "trained" and d["heldout_error_after"] < d["heldout_error_before"]
    # trained on the teacher's runs from seeds of their own (4 runs x 6 steps), evaluated on others
    assert d["data"]["train"]["seeds"] == [50_000, 50_001, 50_002, 50_003] and d["data"]["train"]["samples"] == 24
    assert d["data"]["heldout"]["seeds"] == [60_000, 60_001] and d["data"]["train"]["timesteps_covered"] == 6
    # the manifest records the passes as given, not the scratch files the distillation read
    assert [p["_type"] for p in taught.manifest["compression"]["passes"]] == ["remove_blocks", "distill"]
    assert "data" not in taught.manifest["compression"]["passes"][1]


def test_block_features_are_the_joins_of_the_removed_blocks(exported, tmp_path):
    source = exported / "ddpm.out"
    out = tmp_path / "fewer"
    done = compress_pipeline(source, out, [RemoveBlocksConfig(count=1), dataclasses.replace(QUICK_DISTILL, steps=5,
                             features="blocks")], seeds=2, steps=5, images=1, distill_seeds=2, max_output_error=10.0,
                             progress=False)
    removed = done.manifest["compression"]["blocks_removed"]
    original = ir.load(str(source / "unet" / "model.onnx"))
    block = next(b for b in residual_branches(original) if b.name == removed["removed"][0])
    add = list(original.graph)[block.add]
    join, skip = add.outputs[0].name, add.inputs[block.skip].name
    assert removed["joins"] == {block.name: join}
    assert done.distillation["features"] == [[join, join]]
    # the same name in both models: the teacher's Add of skip and branch, the student's Identity of the skip alone
    student = ir.load(str(out / "unet" / "model.onnx"))
    producer = next(n for n in student.graph if any(v.name == join for v in n.outputs))
    assert add.op_type == "Add" and producer.op_type == "Identity" and producer.inputs[0].name == skip
    # in a recipe without a remove_blocks pass there are no joins to align: one line, nothing written
    with pytest.raises(EdgelrError, match="features 'blocks' aligns the joins of removed blocks"):
        compress_pipeline(source, tmp_path / "none", [FactorizeConfig(params=0.5), dataclasses.replace(
            QUICK_DISTILL, features="blocks")], seeds=1, steps=3, images=1, distill_seeds=1, progress=False)
    assert not (tmp_path / "none").exists()
    with pytest.raises(ConfigFieldError, match="in a recipe after remove_blocks"):  # the verb has no recipe
        distill(source / "unet" / "model.onnx", out / "unet" / "model.onnx", "x.npz", tmp_path / "x.onnx",
                dataclasses.replace(QUICK_DISTILL, features="blocks"))


def test_text_to_image_distillation_data_keeps_both_halves_of_guidance(exported, tmp_path):
    source = exported / "sd.out"
    data = capture_distill_data(OnnxDiffusionPipeline(source), tmp_path, seeds=2, steps=3, prompts=PROMPTS,
                                guidance=7.5, samples=2048)
    # 2 runs x 3 steps x (2 prompts, each with its negative half) = 24 denoiser inputs, text embeddings with them
    train = data.summary["train"]
    assert train["samples"] == 24 and train["guidance"] == 7.5 and train["prompts"] == PROMPTS
    assert train["inputs"]["encoder_hidden_states"] == [24, 16, 16] and train["seeds"] == [50_000, 50_001]
    assert data.summary["heldout"]["seeds"] == [60_000, 60_001]
    assert sorted(np.load(data.train)) == ["encoder_hidden_states", "sample", "timestep"]
    # this exporter's UNet has a Resize at opset 18, which onnx2torch does not convert: said at once, nothing written
    with pytest.raises(EdgelrError, match=r"unet/model.onnx: onnx2torch cannot convert op Resize"):
        compress_pipeline(source, tmp_path / "sd", [FactorizeConfig(params=0.5), QUICK_DISTILL], prompts=PROMPTS,
                          progress=False)
    assert not (tmp_path / "sd").exists()


def test_int8_after_distillation_quantizes_the_distilled_denoiser(exported, fewer, tmp_path):
    passes = pipeline_passes(remove_blocks=1, distill=1.0, quantize="int8")
    assert [c.kind for c in passes] == ["remove_blocks", "distill", "quantize"] and passes[1].features is None
    # by default a factorized budget's pairs and the removed blocks' joins are aligned (the refit comes before: after INT8 it would undo the training)
    chain = pipeline_passes(FactorizeConfig(flops=0.5), remove_blocks=1, distill=1.0, quantize="int8")
    assert [c.kind for c in chain] == ["remove_blocks", "factorize", "refit", "distill", "quantize"]
    assert chain[3].features == "factorized+blocks"
    passes[1] = dataclasses.replace(passes[1], steps=60, time_limit=None, anneal_by_time=False)
    done = compress_pipeline(exported / "ddpm.out", tmp_path / "int8", passes, distill_seeds=4, **COMMON)
    c = done.manifest["compression"]
    assert [p["_type"] for p in c["passes"]] == ["remove_blocks", "distill", "quantize"]
    assert c["distillation"]["steps"] == 60 and c["denoiser"]["quantized"]["nodes_quantized"] > 0
    unet = ir.load(str(tmp_path / "int8" / "unet" / "model.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in unet.graph)
    # the distilled INT8 denoiser's images beat the float one's that was not distilled
    assert done.images["psnr_mean"] > fewer.images["psnr_mean"], (done.images, fewer.images)
    assert OnnxDiffusionPipeline(tmp_path / "int8")(steps=2).shape == (1, 16, 16, 3)


# ---- bad input ----

def _fails(capsys, argv: list[str], out: Path, *words: str) -> None:
    before = set(out.parent.iterdir())
    code = main(["-q", "compress", *argv, "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and err.startswith("edgelr compress: error: "), err
    for word in words:
        assert word in err, err
    assert set(out.parent.iterdir()) == before  # no OUT, no hidden staging folder left


def test_bad_inputs_one_line_nothing_written(exported, tmp_path, capsys):
    out = tmp_path / "out"
    _fails(capsys, [str(exported / "ddpm"), "--params", "0.5"], out, "not an exported one", "edgelr export")
    (tmp_path / "empty").mkdir()
    _fails(capsys, [str(tmp_path / "empty"), "--params", "0.5"], out, "not an exported diffusion pipeline")
    _fails(capsys, [str(exported / "ddpm.out"), "--params", "0.5", "--calib", "x.npz"], out, "--calib")
    _fails(capsys, [str(exported / "ddpm.out")], out, "say how far to compress")
    _fails(capsys, [str(exported / "ddpm.out" / "unet" / "model.onnx"), "--params", "0.5", "--steps", "4"],
           tmp_path / "out.onnx", "--steps is for a pipeline folder")
    _fails(capsys, [str(exported / "ddpm.out"), "--params", "0.5", "--prompt", "a cat"], out, "unconditional")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    _fails(capsys, [str(exported / "ddpm.out"), "--params", "0.5"], tmp_path / "busy", "not empty")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    copy = tmp_path / "copy"
    shutil.copytree(exported / "ddpm.out", copy)
    before = _digest(copy)
    _fails(capsys, [str(copy), "--params", "0.5"], copy / "inner", "never overwrites its input")
    assert _digest(copy) == before
    # a result over the denoiser's error ceiling, or under an image floor, is not written
    _fails(capsys, [str(copy), "--params", "0.2", "--no-refit", "--steps", "3", "--seeds", "1", "--images", "1",
                    "--max-output-error", "0.01"], out, "not written", f"{out}/unet/model.onnx")
    with pytest.raises(EdgelrError, match="not written.*SSIM"):
        compress_pipeline(copy, out, [FactorizeConfig(params=0.5)], seeds=1, steps=3, images=1, max_output_error=1.0,
                          min_ssim=0.999999, progress=False)
    _fails(capsys, [str(copy), "--params", "0.5", "--steps", "3", "--seeds", "1", "--images", "1", "--max-output-error",
                    "1", "--min-psnr", "200"], out, "not written", "PSNR")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_distillation_flags_one_line_nothing_written(exported, tmp_path, capsys):
    source, out = str(exported / "ddpm.out"), tmp_path / "out"
    _fails(capsys, [source, "--params", "0.5", "--distill-seeds", "8"], out, "--distill-seeds", "--distill MINUTES")
    _fails(capsys, [source, "--params", "0.5", "--distill-features", "blocks"], out, "--distill MINUTES")
    _fails(capsys, [source, "--quantize", "int8", "--distill", "1"], out, "compressed float denoiser", "--remove-blocks")
    _fails(capsys, [source, "--params", "0.5", "--distill", "1", "--distill-features", "blocks"], out,
           "--remove-blocks N")
    _fails(capsys, [source, "--remove-blocks", "1", "--distill", "1", "--distill-features", "factorized"], out,
           "--params, --flops or --latency")
    (tmp_path / "r.yaml").write_text("passes:\n- {_type: factorize, params: 0.5}\n")
    _fails(capsys, [source, "--recipe", str(tmp_path / "r.yaml"), "--distill", "1"], out, "--recipe gives the passes")
    _fails(capsys, [str(exported / "ddpm.out" / "unet" / "model.onnx"), "--params", "0.5", "--distill", "1"],
           tmp_path / "out.onnx", "--distill is for a pipeline folder")
    with pytest.raises(EdgelrError, match="put it before quantize"):  # it trains the float denoiser
        compress_pipeline(source, out, [FactorizeConfig(params=0.5), QuantizeConfig(), QUICK_DISTILL], progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
