"""Handwritten digits for the diffusion recipe: the data, a digit classifier that judges generated images, and
the small DDPM UNet's config.

- Data: scikit-learn's `load_digits` (1,797 real 8x8 scans, 0..16), upsampled to 32x32 (bilinear, scikit-image
  `resize(order=1)`) and scaled to [-1, 1] (the range DDPM pipelines train and sample in). One fixed split,
  stratified by class: `split()` gives 1,437 training and 360 held-out images (`HELD_OUT` of each class's
  share, `SEED`). Images are float32 arrays of shape (N, 1, 32, 32).
- `DigitClassifier`: a small torch CNN (73 k parameters) trained on the training split only (`train_classifier`,
  shifted and noised digits, plus junk images taught to get a flat answer, so a low top probability flags a
  generated image that is no digit); `load_classifier(path)` gives a plain callable, images in [-1, 1] (N, 1, 32, 32) ->
  class probabilities (N, 10) as numpy, which is what `edgelr.measure.image_quality` takes.
- `unet_config()`: the `UNet2DModel` config of the trained pipeline (1.06 M parameters, 1 channel, 32x32;
  3x3 convs hold 85 % of them; one self-attention, in the 8x8 mid block).

torch and scikit-learn are imported here (models/ is not the library); `tools/train_ddpm_digits.py` trains both
models and writes them to models/weights/.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SIZE = 32
CLASSES = 10
SEED = 0
OUTLIER_WEIGHT = 0.5  # weight of the flat-answer loss on junk images
HELD_OUT = 0.2  # fraction of the 1,797 digits kept out of all training
WEIGHTS = Path(__file__).resolve().parent / "weights"
PIPELINE_DIR = WEIGHTS / "ddpm_digits"
CLASSIFIER_PATH = WEIGHTS / "digit_classifier.pt"
# How the committed pipeline is sampled: its scheduler is DDIM ("trailing" timesteps, eta 0: deterministic given
# the seed) with this many steps: pipeline(num_inference_steps=SAMPLE_STEPS). See tools/train_ddpm_digits.py.
SAMPLE_STEPS = 50


def images() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as (N, 1, 32, 32) float32 in [-1, 1] and their labels (N,) int64."""
    from skimage.transform import resize
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = digits.images.astype(np.float32) / 16.0  # [0, 1]
    big = np.stack([resize(im, (SIZE, SIZE), order=1, mode="edge", anti_aliasing=False) for im in small])
    x = (np.clip(big, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)[:, None]
    return x, digits.target.astype(np.int64)


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed split: (train_x, train_y, held_x, held_y), stratified by class, same on every call."""
    from sklearn.model_selection import train_test_split

    x, y = images()
    train_x, held_x, train_y, held_y = train_test_split(x, y, test_size=HELD_OUT, random_state=SEED, stratify=y)
    return train_x, train_y, held_x, held_y


def to_unit(x: np.ndarray) -> np.ndarray:
    """[-1, 1] -> [0, 1] (for saving pictures and for the [0, 1] image measures)."""
    return np.clip((np.asarray(x, dtype=np.float32) + 1.0) / 2.0, 0.0, 1.0)


def unet_config() -> dict:
    """The UNet2DModel config of the digits pipeline: 1.06 M parameters, 85 % of them in 3x3 convs."""
    return {"sample_size": SIZE, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
            "block_out_channels": (32, 64, 64), "norm_num_groups": 8,
            "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D")}


def _torch_classifier():
    import torch
    from torch import nn

    class DigitClassifier(nn.Module):
        """32x32x1 in [-1, 1] -> 10 logits: three conv stages (16, 32, 64 channels), global average pool, linear."""

        def __init__(self) -> None:
            super().__init__()

            def stage(cin: int, cout: int) -> nn.Sequential:
                return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                     nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                     nn.MaxPool2d(2))

            self.features = nn.Sequential(stage(1, 16), stage(16, 32), stage(32, 64))
            self.head = nn.Linear(64, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x).mean(dim=(2, 3)))

    return DigitClassifier


def new_classifier():
    """An untrained DigitClassifier (torch module)."""
    return _torch_classifier()()


def _augment(x, rng: np.random.Generator):
    """Random shifts of up to 2 pixels (edge-padded) and a little Gaussian noise: handwriting varies in place,
    and generated digits are a little noisier than the scans."""
    import torch

    n = x.shape[0]
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    dx, dy = rng.integers(0, 5, size=n), rng.integers(0, 5, size=n)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + SIZE, dx[i]:dx[i] + SIZE] for i in range(n)])
    return (out + 0.05 * torch.from_numpy(rng.standard_normal(out.shape).astype(np.float32))).clamp(-1, 1)


def _junk(x, rng: np.random.Generator):
    """Images that are no digit: each of x drowned in Gaussian noise (signal weight 0 to 0.15, the DDPM
    forward process past about t=600 of 1000), half of them blurred (smooth blobs), 15 % blank pages of one grey
    level; clipped to [-1, 1]."""
    import torch

    n = x.shape[0]
    signal = torch.from_numpy(rng.uniform(0.0, 0.15, size=(n, 1, 1, 1)).astype(np.float32))
    noise = torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
    out = signal * x + (1 - signal ** 2).sqrt() * noise
    blur = torch.from_numpy(rng.random(n) < 0.5)
    smooth = torch.nn.functional.avg_pool2d(out, 5, stride=1, padding=2, count_include_pad=False) * 2.0
    out = torch.where(blur[:, None, None, None], smooth, out)
    blank = torch.from_numpy(rng.random(n) < 0.15)  # and some blank pages (a constant grey level)
    level = torch.from_numpy(rng.uniform(-1.0, 1.0, size=(n, 1, 1, 1)).astype(np.float32))
    return torch.where(blank[:, None, None, None], level.expand_as(out), out).clamp(-1, 1)


def train_classifier(epochs: int = 30, batch: int = 64, seed: int = SEED, log=print) -> tuple[object, dict]:
    """Train the DigitClassifier on the training split (augmented); returns (module in eval mode, report) where
    the report has the held-out accuracy, loss and counts. A minute or so on one CPU thread."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_x, train_y, held_x, held_y = split()
    model = new_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * int(np.ceil(len(train_x) / batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    xs, ys = torch.from_numpy(train_x), torch.from_numpy(train_y)
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(xs))
        total = 0.0
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            # outlier exposure: unrecognisable images (digits drowned in noise, smooth noise) should get a
            # flat answer, so that a low top probability flags a generated image that is no digit. One
            # forward pass for both, so that BatchNorm's running statistics are those of the batches it saw.
            junk = _junk(xs[idx[: max(1, len(idx) // 4)]], rng)
            logits = model(torch.cat([_augment(xs[idx], rng), junk]))
            loss = torch.nn.functional.cross_entropy(logits[:len(idx)], ys[idx])
            flat = -torch.log_softmax(logits[len(idx):], dim=1).mean() - float(np.log(CLASSES))  # 0 when flat
            loss = loss + OUTLIER_WEIGHT * flat
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if log and (epoch + 1) % 5 == 0:
            acc = accuracy(classifier_callable(model.eval()), held_x, held_y)
            log(f"classifier epoch {epoch + 1}/{epochs}: train loss {total / len(xs):.4f}, held-out accuracy {acc:.4f}")
    model.eval()
    acc = accuracy(classifier_callable(model), held_x, held_y)
    report = {"held_out_accuracy": acc, "held_out_images": len(held_x), "train_images": len(train_x),
              "epochs": epochs, "batch": batch, "seed": seed,
              "parameters": int(sum(p.numel() for p in model.parameters())),
              "input": "(N, 1, 32, 32) float32 in [-1, 1]", "output": "10 logits (softmax for probabilities)",
              "split": f"sklearn load_digits, train_test_split(test_size={HELD_OUT}, random_state={SEED}, stratify=y)"}
    return model, report


def classifier_callable(model, batch: int = 256):
    """Wrap a DigitClassifier module as numpy (N, 1, 32, 32) in [-1, 1] -> probabilities (N, 10)."""
    import torch

    def classify(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[:, None]
        out = []
        with torch.no_grad():
            for i in range(0, len(x), batch):
                out.append(torch.softmax(model(torch.from_numpy(x[i:i + batch])), dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, CLASSES), np.float32)

    return classify


def accuracy(classify, x: np.ndarray, y: np.ndarray) -> float:
    return float((classify(x).argmax(axis=1) == y).mean())


def save_classifier(model, report: dict, path: Path = CLASSIFIER_PATH) -> None:
    """The state dict at PATH and the report beside it (PATH with .json)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")


def load_classifier(path: Path = CLASSIFIER_PATH):
    """The trained classifier as a callable: numpy (N, 1, 32, 32) in [-1, 1] -> probabilities (N, 10)."""
    import torch

    model = new_classifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return classifier_callable(model.eval())


def load_pipeline(path: Path = PIPELINE_DIR):
    """The trained DDPMPipeline (its scheduler is DDIM; sample with num_inference_steps=SAMPLE_STEPS)."""
    from diffusers import DDPMPipeline

    return DDPMPipeline.from_pretrained(str(path))


def sample(pipeline, count: int, seed: int = 0, steps: int = SAMPLE_STEPS, batch: int = 64) -> np.ndarray:
    """`count` images (N, 1, 32, 32) float32 in [-1, 1] from the pipeline. Image i starts from the noise of a
    torch generator seeded seed + i, whatever the batch, so the same seed gives the original and a compressed
    pipeline the same starting noise image by image (and with DDIM's eta 0 no other randomness enters)."""
    import torch

    out = []
    for start in range(0, count, batch):
        n = min(batch, count - start)
        generators = [torch.Generator().manual_seed(seed + start + j) for j in range(n)]
        images = pipeline(batch_size=n, generator=generators, num_inference_steps=steps, output_type="np").images
        # DDPMPipeline returns (N, H, W, C) in [0, 1]
        out.append(np.transpose(images, (0, 3, 1, 2)).astype(np.float32) * 2.0 - 1.0)
    return np.concatenate(out)


def grid(x: np.ndarray, columns: int = 16) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> one uint8 (rows*H + gaps, columns*W + gaps) picture, 2-pixel grey gaps."""
    x = to_unit(x)[:, 0]
    n, h, w = x.shape
    rows = int(np.ceil(n / columns))
    gap = 2
    out = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap), 0.5, np.float32)
    for i in range(n):
        r, c = divmod(i, columns)
        out[gap + r * (h + gap):gap + r * (h + gap) + h, gap + c * (w + gap):gap + c * (w + gap) + w] = x[i]
    return (out * 255).round().astype(np.uint8)
