"""Run an exported diffusion pipeline on ONNX Runtime: numpy and onnxruntime only (no torch, no diffusers).

This file is self-contained: `edgelr export PIPELINE_DIR` copies it into the pipeline folder as run.py, and
it runs there, on the device:

    python run.py --steps 25 --seed 0 --out images.npy                      # an unconditional pipeline (DDPM)
    python run.py --prompt "a photo of a cat" --guidance 7.5 --steps 25     # text to image

It prints one JSON line (images written, their shape, seconds per step, onnxruntime's version). In Python:

    pipe = OnnxDiffusionPipeline("out/")
    images = pipe(steps=25, seed=0)                            # float32, (batch, height, width, 3), in [0, 1]
    images = pipe("a red cat", steps=25, guidance=7.5, latents=x0)

Schedulers: DDPM and DDIM, stepped here in numpy from the pipeline's scheduler_config.json, following
diffusers' DDPMScheduler/DDIMScheduler (beta schedules linear, scaled_linear, squaredcos_cap_v2 or trained
betas; timestep spacings leading, trailing, linspace; epsilon, sample or v prediction; clipping and dynamic
thresholding). The tokenizer is CLIP's byte-level BPE, read from tokenizer/vocab.json and merges.txt; it
matches transformers' CLIPTokenizer on text whose letters and digits Python's `re` classes as \\w (it does
not run ftfy's text repair).

Randomness: the initial noise and any per-step noise (DDPM, DDIM with eta > 0) come from `noise`, a function
of a shape; by default numpy's default_rng(seed). Give the same noise as another implementation (e.g. drawn
from a torch.Generator in the same order) to reproduce its images.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
Noise = Callable[[tuple], np.ndarray]


# ---- schedulers ----

def _betas(cfg: dict) -> np.ndarray:
    n = cfg.get("num_train_timesteps", 1000)
    start, end = cfg.get("beta_start", 0.0001), cfg.get("beta_end", 0.02)
    schedule = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], np.float32)
    elif schedule == "linear":
        betas = np.linspace(start, end, n, dtype=np.float32)
    elif schedule == "scaled_linear":
        betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        def bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.array([min(1 - bar((i + 1) / n) / bar(i / n), 0.999) for i in range(n)], np.float32)
    else:
        raise ValueError(f"beta_schedule {schedule!r}: this runner knows linear, scaled_linear, squaredcos_cap_v2")
    if cfg.get("rescale_betas_zero_snr"):
        root = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
        first, last = root[0].copy(), root[-1].copy()
        root = (root - last) * (first / (first - last))
        bar = root ** 2
        betas = 1 - np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return betas.astype(np.float32)


def check_scheduler(cfg: dict) -> str | None:
    """Why this runner cannot step the scheduler `cfg` (a scheduler_config.json), or None if it can."""
    name = cfg.get("_class_name")
    if name not in SCHEDULERS:
        return f"{name} (this runner steps {' and '.join(SCHEDULERS)})"
    if cfg.get("beta_schedule", "linear") not in ("linear", "scaled_linear", "squaredcos_cap_v2") \
            and cfg.get("trained_betas") is None:
        return f"{name} with beta_schedule {cfg.get('beta_schedule')!r}"
    if cfg.get("timestep_spacing", "leading") not in ("leading", "trailing", "linspace"):
        return f"{name} with timestep_spacing {cfg.get('timestep_spacing')!r}"
    if cfg.get("prediction_type", "epsilon") not in ("epsilon", "sample", "v_prediction"):
        return f"{name} with prediction_type {cfg.get('prediction_type')!r}"
    if name == "DDPMScheduler" and cfg.get("variance_type", "fixed_small") not in \
            ("fixed_small", "fixed_small_log", "fixed_large"):
        return f"DDPMScheduler with variance_type {cfg.get('variance_type')!r}"
    return None


class Scheduler:
    """diffusers' DDPMScheduler or DDIMScheduler (by the config's _class_name), in numpy."""

    def __init__(self, cfg: dict):
        why = check_scheduler(cfg)
        if why is not None:
            raise ValueError(f"scheduler {why}")
        self.cfg = cfg
        self.kind = cfg["_class_name"]
        self.train_steps = cfg.get("num_train_timesteps", 1000)
        self.alphas_cumprod = np.cumprod(1.0 - _betas(cfg), dtype=np.float32)
        self.final_alpha_cumprod = np.float32(1.0) if cfg.get("set_alpha_to_one", True) else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.timesteps = np.arange(self.train_steps)[::-1].copy()
        self.steps = None

    @classmethod
    def from_file(cls, path: str | Path) -> Scheduler:
        return cls(json.loads(Path(path).read_text()))

    def set_timesteps(self, steps: int) -> None:
        n, spacing = self.train_steps, self.cfg.get("timestep_spacing", "leading")
        if not 0 < steps <= n:
            raise ValueError(f"steps {steps}: need 1 to {n} (the scheduler's num_train_timesteps)")
        if spacing == "linspace":
            t = np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
        elif spacing == "leading":
            t = (np.arange(0, steps) * (n // steps)).round()[::-1].copy().astype(np.int64)
            t += self.cfg.get("steps_offset", 0)
        else:  # trailing
            t = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        self.timesteps, self.steps = t, steps

    def scale_model_input(self, sample: np.ndarray, t: int) -> np.ndarray:
        return sample

    def _prev(self, t: int) -> int:
        if self.kind == "DDIMScheduler":
            return t - self.train_steps // self.steps
        if self.steps is None:
            return t - 1
        i = int(np.nonzero(self.timesteps == t)[0][0])
        return -1 if i == len(self.timesteps) - 1 else int(self.timesteps[i + 1])

    def _x0(self, model_output, sample, a_t):
        b_t = 1 - a_t
        kind = self.cfg.get("prediction_type", "epsilon")
        if kind == "epsilon":
            x0, eps = (sample - b_t ** 0.5 * model_output) / a_t ** 0.5, model_output
        elif kind == "sample":
            x0 = model_output
            eps = (sample - a_t ** 0.5 * x0) / b_t ** 0.5
        else:  # v_prediction
            x0 = a_t ** 0.5 * sample - b_t ** 0.5 * model_output
            eps = a_t ** 0.5 * model_output + b_t ** 0.5 * sample
        if self.cfg.get("thresholding"):
            flat = np.abs(x0.reshape(len(x0), -1))
            s = np.quantile(flat, self.cfg.get("dynamic_thresholding_ratio", 0.995), axis=1)
            s = np.clip(s, 1, self.cfg.get("sample_max_value", 1.0)).astype(x0.dtype).reshape(-1, *[1] * (x0.ndim - 1))
            x0 = np.clip(x0, -s, s) / s
        elif self.cfg.get("clip_sample", True):
            r = self.cfg.get("clip_sample_range", 1.0)
            x0 = np.clip(x0, -r, r)
        return x0, eps

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray, noise: Noise, eta: float = 0.0) -> np.ndarray:
        t = int(t)
        prev = self._prev(t)
        a_t = self.alphas_cumprod[t]
        if self.kind == "DDIMScheduler":
            a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
            x0, eps = self._x0(model_output, sample, a_t)
            variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            std = np.float32(eta) * variance ** 0.5
            out = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
            if eta > 0:
                out = out + std * noise(model_output.shape).astype(np.float32)
            return out.astype(np.float32)
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else np.float32(1.0)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev
        x0, _ = self._x0(model_output, sample, a_t)
        out = (a_prev ** 0.5 * beta / b_t) * x0 + (alpha ** 0.5 * b_prev / b_t) * sample
        if t > 0:
            variance = max(b_prev / b_t * beta, np.float32(1e-20))
            if self.cfg.get("variance_type", "fixed_small") == "fixed_large":
                variance = beta
            out = out + variance ** 0.5 * noise(model_output.shape).astype(np.float32)
        return out.astype(np.float32)


# ---- CLIP's tokenizer ----

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ClipTokenizer:
    """CLIP's byte-level BPE from a tokenizer folder (vocab.json, merges.txt, tokenizer_config.json)."""

    _PATTERN = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+",
                          re.IGNORECASE)

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.encoder = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1:49152 - 256 - 2 + 1]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        config = folder / "tokenizer_config.json"
        cfg = json.loads(config.read_text()) if config.is_file() else {}

        def token(key, default):
            value = cfg.get(key, default)
            return value["content"] if isinstance(value, dict) else value

        self.bos = self.encoder[token("bos_token", "<|startoftext|>")]
        self.eos = self.encoder[token("eos_token", "<|endoftext|>")]
        self.pad = self.encoder[token("pad_token", "<|endoftext|>")]
        self.unk = self.encoder[token("unk_token", "<|endoftext|>")]
        self.max_length = int(cfg.get("model_max_length", 77))
        self.byte_encoder = bytes_to_unicode()
        self.cache: dict[str, list[str]] = {}

    def _bpe(self, token: str) -> list[str]:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            bigram = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if bigram not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == bigram:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self.cache[token] = list(word)
        return self.cache[token]

    def encode(self, text: str) -> list[int]:
        text = " ".join(text.split()).lower()
        ids = []
        for piece in self._PATTERN.findall(text):
            if piece in ("<|startoftext|>", "<|endoftext|>"):
                ids.append(self.encoder[piece])
                continue
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids += [self.encoder.get(t, self.unk) for t in self._bpe(piece)]
        return ids

    def __call__(self, texts: list[str], max_length: int | None = None) -> np.ndarray:
        """Token ids, (len(texts), max_length): start, the text's tokens (truncated), end, then padding."""
        n = max_length or self.max_length
        out = np.full((len(texts), n), self.pad, np.int64)
        for row, text in enumerate(texts):
            ids = [self.bos, *self.encode(text)[:n - 2], self.eos]
            out[row, :len(ids)] = ids
        return out


# ---- the pipeline ----

class OnnxDiffusionPipeline:
    """An exported pipeline folder (manifest.json, unet/, scheduler/, and for text to image text_encoder/,
    tokenizer/, vae_decoder/), run with ONNX Runtime."""

    def __init__(self, folder: str | Path, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        self.run_info = self.manifest["run"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads if threads is not None else self.manifest.get("threads", 1)
        options.inter_op_num_threads = 1
        providers = providers or self.manifest.get("providers") or ["CPUExecutionProvider"]

        def session(name):
            return ort.InferenceSession(str(self.folder / name / "model.onnx"), options, providers=providers)

        self.unet = session("unet")
        self.unet_inputs = {i.name: i for i in self.unet.get_inputs()}
        self.conditional = bool(self.run_info["conditional"])
        self.vae_decoder = session("vae_decoder") if self.run_info.get("vae") else None
        self.text_encoder = session("text_encoder") if self.conditional else None
        self.tokenizer = ClipTokenizer(self.folder / "tokenizer") if self.conditional else None
        self.scheduler = Scheduler.from_file(self.folder / "scheduler" / "scheduler_config.json")
        self.seconds_per_step: float | None = None

    def _timestep(self, t: int, batch: int) -> np.ndarray:
        spec = self.unet_inputs["timestep"]
        dtype = np.int64 if "int64" in spec.type else np.float32
        return np.array(t, dtype) if len(spec.shape) == 0 else np.full(batch, t, dtype)

    def encode_prompt(self, prompts: list[str]) -> np.ndarray:
        ids = self.tokenizer(prompts, self.run_info.get("tokens"))
        return self.text_encoder.run(["last_hidden_state"], {"input_ids": ids})[0]

    def __call__(self, prompt: str | list[str] | None = None, *, steps: int = 50, guidance: float = 7.5,
                 negative_prompt: str | list[str] = "", batch: int = 1, seed: int = 0,
                 latents: np.ndarray | None = None, noise: Noise | None = None, eta: float = 0.0) -> np.ndarray:
        """Images, float32 (batch, height, width, channels) in [0, 1]. latents: the initial noise (batch and the
        pipeline's latent shape); noise: the source of random numbers (default numpy, seeded)."""
        if noise is None:
            rng = np.random.default_rng(seed)

            def noise(shape):
                return rng.standard_normal(shape, dtype=np.float32)

        if self.conditional:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [""])
            batch = len(prompts)
        if latents is None:
            latents = noise((batch, *self.run_info["latent_shape"]))
        latents = np.asarray(latents, np.float32)
        batch = len(latents)
        sched = self.scheduler
        sched.set_timesteps(steps)
        latents = latents * np.float32(sched.init_noise_sigma)
        cfg = self.conditional and guidance > 1
        feed = {}
        if self.conditional:
            embeds = self.encode_prompt(prompts)
            if cfg:
                negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
                embeds = np.concatenate([self.encode_prompt(negatives), embeds])
            feed["encoder_hidden_states"] = embeds
        start = time.perf_counter()
        for t in sched.timesteps:
            x = np.concatenate([latents, latents]) if cfg else latents
            feed["sample"] = sched.scale_model_input(x, t)
            feed["timestep"] = self._timestep(int(t), len(x))
            out = self.unet.run(None, {k: v for k, v in feed.items() if k in self.unet_inputs})[0]
            if cfg:
                uncond, text = out[:batch], out[batch:]
                out = uncond + np.float32(guidance) * (text - uncond)
            latents = sched.step(out, t, latents, noise, eta=eta)
        self.seconds_per_step = (time.perf_counter() - start) / max(len(sched.timesteps), 1)
        image = latents
        if self.vae_decoder is not None:
            scaled = latents / np.float32(self.run_info["vae_scaling_factor"])
            image = self.vae_decoder.run(None, {"latent_sample": scaled.astype(np.float32)})[0]
        return np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Generate images with this exported diffusion pipeline (ONNX Runtime).")
    p.add_argument("--prompt", action="append", help="text to image: the prompt (repeat for a batch)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--batch", type=int, default=1, help="images to generate (unconditional pipelines)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: the target's)")
    p.add_argument("--out", default="images.npy", help="where to write the images (.npy; PNGs beside it with Pillow)")
    args = p.parse_args(argv)
    import onnxruntime as ort

    folder = Path(__file__).resolve().parent
    pipe = OnnxDiffusionPipeline(folder, threads=args.threads)
    if args.prompt and not pipe.conditional:
        print("run.py: error: this pipeline is unconditional; leave out --prompt", file=sys.stderr)
        return 2
    start = time.perf_counter()
    images = pipe(args.prompt, steps=args.steps, guidance=args.guidance, negative_prompt=args.negative_prompt,
                  batch=args.batch, seed=args.seed)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    np.save(out, images)
    pngs = []
    try:
        from PIL import Image

        for i, image in enumerate(images):
            png = out.with_name(f"{out.stem}_{i}.png")
            pixels = (image * 255).round().astype(np.uint8)
            Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(png)
            pngs.append(str(png))
    except ImportError:
        pass
    print(json.dumps({"images": str(out), "png": pngs, "shape": list(images.shape), "steps": args.steps,
                      "seconds": round(seconds, 4), "seconds_per_step": round(pipe.seconds_per_step, 5),
                      "onnxruntime": ort.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
