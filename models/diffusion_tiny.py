"""Tiny diffusers pipelines built from configs (no hub download): the reference pipelines that tests and tools
export, run and compress.

    from models.diffusion_tiny import save_ddpm, save_text_to_image
    save_ddpm("runs/ddpm")                 # DDPMPipeline: a ~40 k-parameter UNet2DModel, 3x16x16 images
    save_text_to_image("runs/sd")          # StableDiffusionPipeline: tiny UNet2DConditionModel, AutoencoderKL,
                                           # CLIPTextModel and a CLIPTokenizer, DDIM; 3x16x16 images

The text-to-image pipeline's tokenizer is a small hand-made byte-level BPE (every byte, with and without the
end-of-word mark, plus a few merges of common English pairs) unless `vocab="clip"` asks for the real 49,408-token
CLIP BPE, read from the `open-clip-torch` wheel's `bpe_simple_vocab_16e6.txt.gz` when that package is installed
(it is not a dependency of edgelr: `pip install --no-deps open-clip-torch`).

Two deliberately broken denoisers, for the export's bad-input paths (they are real models, saved and loaded
through diffusers like any other, `model_index.json` naming this module as their library):
- `UnexportableUNet`: a UNet2DModel whose output goes through an operator ONNX has no mapping for.
- `FrozenTimestepUNet`: a UNet2DModel whose forward reads the timestep as a Python number, so a traced export
  keeps the example's timestep as a constant: the ONNX model runs, but answers every step as if it were that one.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.models.unets.unet_2d import UNet2DOutput
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from edgelr.deploy.pipeline_run import bytes_to_unicode

IMAGE = 16  # pixels, both pipelines
TOKENS = 16  # the tokenizer's (and text encoder's) sequence length; Stable Diffusion's is 77


def unet_config(sample_size: int = IMAGE, channels: int = 3) -> dict:
    return dict(sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8)


def ddpm(seed: int = 0, unet_class: type[UNet2DModel] = UNet2DModel, **config) -> DDPMPipeline:
    """An unconditional DDPMPipeline with random (seeded) weights; `config` overrides unet_config()."""
    torch.manual_seed(seed)
    unet = unet_class(**{**unet_config(), **config}).eval()
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))


def save_ddpm(path: str | os.PathLike, seed: int = 0, unet_class: type[UNet2DModel] = UNet2DModel) -> Path:
    path = Path(path)
    ddpm(seed, unet_class).save_pretrained(path)
    return path


def text_to_image(seed: int = 0, vocab: str = "tiny", tokenizer_dir: str | os.PathLike | None = None
                  ) -> StableDiffusionPipeline:
    """A Stable-Diffusion-style pipeline with random (seeded) weights. vocab: "tiny" (hand-made) or "clip"
    (the real CLIP BPE from the open-clip-torch wheel); its files are written to tokenizer_dir (default: a
    temporary folder) to load the CLIPTokenizer from."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tokenizer_dir or tmp)
        vocab_size = write_vocab(folder, vocab)
        tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=TOKENS)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=TOKENS, projection_dim=16, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1)).eval()
    unet = UNet2DConditionModel(
        sample_size=IMAGE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=IMAGE).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_text_to_image(path: str | os.PathLike, seed: int = 0, vocab: str = "tiny") -> Path:
    path = Path(path)
    text_to_image(seed, vocab).save_pretrained(path)
    return path


# ---- the tokenizer's vocabulary ----

# a handful of merges, enough that common words are a few tokens each, not one per letter
_TINY_MERGES = ["t h", "th e</w>", "a n", "i n", "e r", "o n", "r e", "a t", "e n", "o r", "s</w>", "e</w>",
                "an d</w>", "in g</w>", "o f</w>", "a</w>", "c at</w>", "d o", "do g</w>", "r ed</w>", "e d</w>",
                "p h", "ph o", "pho t", "phot o</w>"]


def clip_bpe_file() -> Path | None:
    """The real CLIP BPE (bpe_simple_vocab_16e6.txt.gz) inside an installed open-clip-torch, or None."""
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it (it needs torchvision)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None


def write_vocab(folder: Path, vocab: str = "tiny") -> int:
    """Write vocab.json and merges.txt for CLIPTokenizer into `folder`; returns the vocabulary's size."""
    folder.mkdir(parents=True, exist_ok=True)
    if vocab == "clip":
        bpe = clip_bpe_file()
        if bpe is None:
            raise FileNotFoundError("the real CLIP BPE ships in the open-clip-torch wheel: "
                                    "pip install --no-deps open-clip-torch")
        lines = gzip.open(bpe).read().decode("utf-8").split("\n")
        merges = lines[1:49152 - 256 - 2 + 1]  # as CLIP's own SimpleTokenizer reads it
    elif vocab == "tiny":
        merges = _TINY_MERGES
    else:
        raise ValueError(f"vocab: 'tiny' or 'clip', not {vocab!r}")
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    tokens = list(dict.fromkeys(tokens))  # a merge may spell a token that is already there
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return len(tokens)


# ---- denoisers that do not export, or export wrong ----

class UnexportableUNet(UNet2DModel):
    """A UNet2DModel whose output passes through an eigen-decomposition: ONNX has no operator for it."""

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        out = super().forward(sample, timestep, class_labels, return_dict=False)[0]
        gram = out.flatten(2) @ out.flatten(2).transpose(1, 2)
        scale = torch.linalg.eigvalsh(gram)[..., -1:].mean()  # the largest eigenvalue, a per-batch scale
        out = out * (1 + 0 * scale)
        return UNet2DOutput(sample=out) if return_dict else (out,)


class FrozenTimestepUNet(UNet2DModel):
    """A UNet2DModel that reads the timestep as a Python int (as code that indexes a table with it does):
    torch runs it right, a traced ONNX export freezes the example's timestep into the graph."""

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        t = int(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else int(timestep)
        return super().forward(sample, t, class_labels, return_dict=return_dict)
