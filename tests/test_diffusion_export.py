"""edgelr export PIPELINE_DIR: tiny diffusers pipelines (models/diffusion_tiny.py, built from configs) exported to
ONNX, each component checked against torch, and the exported pipeline run end to end on ONNX Runtime against
diffusers' own pipeline from the same initial noise. Bad input: one line, exit 1, nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("optimum.exporters.onnx")

import torch  # noqa: E402

from edgelr.cli import main  # noqa: E402
from edgelr.deploy.pipeline_run import ClipTokenizer, OnnxDiffusionPipeline  # noqa: E402
from models import diffusion_tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, one_thread):
    """The two tiny pipelines, saved, and each exported once with the CLI."""
    root = tmp_path_factory.mktemp("diffusion")
    ddpm = diffusion_tiny.save_ddpm(root / "ddpm")
    sd = diffusion_tiny.save_text_to_image(root / "sd")
    for src in (ddpm, sd):
        assert main(["-q", "export", str(src), "--target", "x86-cpu", "-o", str(root / f"{src.name}.out")]) == 0
    return root


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_unconditional_pipeline_exports_with_parity_and_runs_like_torch(pipelines):
    from diffusers import DDPMPipeline

    out = pipelines / "ddpm.out"
    m = _manifest(out)
    assert m["kind"] == "unconditional" and set(m["components"]) == {"unet"}
    parity = m["components"]["unet"]["parity"]
    assert parity["passed"] and parity["relative_error"] < 1e-5 and parity["runs"] == 2
    for name in ("unet/model.onnx", "scheduler/scheduler_config.json", "model_index.json", "run.py"):
        assert (out / name).is_file() and name in m["files"]

    reference = DDPMPipeline.from_pretrained(pipelines / "ddpm")
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = reference(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=8,
                             output_type="np").images
    # the same random numbers, in the same order: the initial noise, then DDPM's noise at each step
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn((2, 3, 16, 16), generator=generator).numpy()
    images = OnnxDiffusionPipeline(out)(steps=8, latents=latents,
                                        noise=lambda shape: torch.randn(shape, generator=generator).numpy())
    assert images.shape == expected.shape == (2, 16, 16, 3)
    assert np.abs(images - expected).max() < 1e-4


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_text_to_image_pipeline_exports_with_parity_and_runs_like_torch(pipelines, guidance):
    from diffusers import StableDiffusionPipeline

    out = pipelines / "sd.out"
    m = _manifest(out)
    assert m["kind"] == "text-to-image"
    assert set(m["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for name, c in m["components"].items():
        assert c["parity"]["passed"] and c["parity"]["relative_error"] < 1e-5, name
        assert c["exporter"].startswith("optimum-onnx")
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "scheduler" / "scheduler_config.json").is_file()

    reference = StableDiffusionPipeline.from_pretrained(pipelines / "sd")
    reference.set_progress_bar_config(disable=True)
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    prompts = ["a photo of the red cat", "dog"]
    with torch.no_grad():
        expected = reference(prompts, latents=latents, num_inference_steps=6, guidance_scale=guidance,
                             output_type="np").images
    images = OnnxDiffusionPipeline(out)(prompts, steps=6, guidance=guidance, latents=latents.numpy())
    assert images.shape == expected.shape == (2, 16, 16, 3)
    assert np.abs(images - expected).max() < 1e-4


def test_run_script_generates_images_with_numpy_and_onnxruntime(pipelines, tmp_path):
    out = pipelines / "sd.out"
    done = subprocess.run([sys.executable, str(out / "run.py"), "--prompt", "a cat", "--steps", "3",
                           "--out", str(tmp_path / "img.npy")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["shape"] == [1, 16, 16, 3] and report["steps"] == 3
    images = np.load(tmp_path / "img.npy")
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    assert "torch" not in done.stderr


def test_tokenizer_matches_transformers_clip_tokenizer(pipelines):
    from transformers import CLIPTokenizer

    folder = pipelines / "sd" / "tokenizer"
    theirs, ours = CLIPTokenizer.from_pretrained(folder), ClipTokenizer(folder)
    texts = ["a photo of the red cat", "", "Hello, World!! it's 2024 and the dog_s ran   fast.", "the " * 30,
             "Café naïve"]
    expected = theirs(texts, padding="max_length", max_length=16, truncation=True).input_ids
    assert ours(texts).tolist() == expected


def _fails(capsys, source: Path, out: Path, *words: str) -> str:
    """The CLI on a bad pipeline: exit 1, one line on stderr naming `words`, and nothing written beside OUT."""
    before = set(out.parent.iterdir())
    code = main(["-q", "export", str(source), "--target", "x86-cpu", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and err.startswith("edgelr export: error: "), err
    for word in words:
        assert word in err, err
    assert set(out.parent.iterdir()) == before  # no OUT, no hidden staging folder left
    return err


def test_a_folder_that_is_not_a_pipeline(tmp_path, capsys, pipelines):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    _fails(capsys, tmp_path / "src", tmp_path / "out", "not a diffusers pipeline folder", "model_index.json")
    _fails(capsys, pipelines / "sd" / "unet", tmp_path / "out", "not a diffusers pipeline folder")


def test_a_component_that_cannot_be_exported_is_named(tmp_path, capsys, one_thread):
    source = diffusion_tiny.save_ddpm(tmp_path / "src", unet_class=diffusion_tiny.UnexportableUNet)
    _fails(capsys, source, tmp_path / "out", "component 'unet'", "UnexportableUNet", "cannot be exported",
           "linalg_eigvalsh")


def test_parity_failure_writes_nothing_and_keeps_an_earlier_export(tmp_path, capsys, one_thread, pipelines):
    """The UNet reads its timestep as a Python int: the traced export freezes it; parity at other timesteps fails."""
    source = diffusion_tiny.save_ddpm(tmp_path / "src", unet_class=diffusion_tiny.FrozenTimestepUNet)
    _fails(capsys, source, tmp_path / "out", "unet", "does not match torch", "no input 'timestep'")
    earlier = tmp_path / "earlier"
    shutil.copytree(pipelines / "ddpm.out", earlier)
    manifest = (earlier / "manifest.json").read_bytes()
    _fails(capsys, source, earlier, "does not match torch")
    assert (earlier / "manifest.json").read_bytes() == manifest


def test_a_text_encoder_saved_with_other_key_names_is_refused(tmp_path, capsys, pipelines):
    """As a checkpoint saved under another transformers release: loaded as is, CLIPTextModel would have random
    weights and the export would succeed with them."""
    from safetensors.torch import load_file, save_file

    source = tmp_path / "src"
    shutil.copytree(pipelines / "sd", source)
    weights = source / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    save_file({k.removeprefix("text_model."): v for k, v in state.items()}, weights, metadata={"format": "pt"})
    _fails(capsys, source, tmp_path / "out", "text_encoder", "CLIPTextModel", "not in its checkpoint", "random")


def test_the_tiny_pipeline_can_use_the_real_clip_vocabulary(tmp_path):
    if diffusion_tiny.clip_bpe_file() is None:
        pytest.skip("the real CLIP BPE ships in open-clip-torch (pip install --no-deps open-clip-torch)")
    size = diffusion_tiny.write_vocab(tmp_path, "clip")
    assert size == 49408
    ids = ClipTokenizer(tmp_path)(["a photo of a cat"])[0]
    from transformers import CLIPTokenizer

    assert ids.tolist() == CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))(
        ["a photo of a cat"], padding="max_length", max_length=77).input_ids[0]
