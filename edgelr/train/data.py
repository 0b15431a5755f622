"""Training data: model inputs drawn by index from an .npz or an image folder, and augmented.

    data = load_data("photos/", teacher_model)          # or an .npz of model inputs, or Samples
    stream = Stream(len(data), batch=8, seed=0)
    inputs = data.batch(stream.indices(step), stream.augmentation(step))

An image folder is decoded once and kept in memory (up to IMAGE_CACHE_BYTES). With a few dozen photos,
`augment="strong"` (Augment: crops from 5% to all of a photo, letterboxed views, 2x2 mosaics of several
photos, colour, hue, greyscale, mixup) gives every step new inputs; the light default (crop, flip,
small colour changes) lets a student fit the photos and drift elsewhere.

Determinism: the data order (a permutation per epoch) and each step's augmentation are pure functions of
(seed, step) (Stream). A step's augmentation is drawn for its whole (global) batch from one generator,
sample after sample, so every process of a distributed run prepares the same batch and takes its slice.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgelr.errors import EdgelrError
from edgelr.io import model as model_io
from edgelr.io.samples import Samples, load_samples, model_inputs

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
PREPROCESS_KEYS = ("size", "letterbox", "mean", "std", "scale", "layout", "channel_order")
IMAGE_CACHE_BYTES = 1 << 30  # decoded images of a folder kept in memory, up to this many bytes
EVAL_IMAGES = 32  # an image folder given as eval_samples: its first this many images, unaugmented


@dataclass
class Preprocess:
    """How an image becomes a model input (YOLO's convention by default)."""

    size: tuple[int, int]  # H, W
    letterbox: bool = True
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: float = 1 / 255
    layout: str = "NCHW"
    channel_order: str = "RGB"


class Data:
    """A dataset: per-sample model inputs, drawn by index, optionally augmented."""

    names: list[str]
    batched: dict[str, bool]

    def __len__(self) -> int:
        raise NotImplementedError

    def batch(self, indices: np.ndarray, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        """Inputs stacked on a new first (sample) axis; augmented with RNG unless it is None."""
        raise NotImplementedError


class NpzData(Data):
    def __init__(self, samples: Samples, model: ir.Model):
        self.samples = samples
        self.names = list(samples.arrays)
        self.batched = dict(samples.batched)
        self.flip_axis: dict[str, int] = {}
        for value in model_inputs(model):
            dims = list(value.shape.dims) if value.shape is not None else None
            kind = value.dtype.numpy().kind if value.dtype is not None else "f"
            if dims is None or len(dims) != 4 or kind != "f":
                continue
            if dims[1] in (1, 3, 4):
                self.flip_axis[value.name] = -1  # NCHW: width is last
            elif dims[3] in (1, 3, 4):
                self.flip_axis[value.name] = -2  # NHWC

    def __len__(self) -> int:
        return len(self.samples)

    def batch(self, indices, rng):
        out = {name: np.array(self.samples.arrays[name][indices]) for name in self.names}
        if rng is not None and self.flip_axis:
            flips = rng.random(len(indices)) < 0.5  # one coin per sample, shared by its image inputs
            for name, axis in self.flip_axis.items():
                out[name][flips] = np.flip(out[name][flips], axis=axis)
        return out


class ImageData(Data):
    def __init__(self, files: list[Path], spec: Preprocess, name: str, batched: bool):
        self.files, self.spec = files, spec
        self.names, self.batched = [name], {name: batched}
        self.strong: Augment | None = None  # set by distill(augment=...): the strong pipeline instead of _prepare's
        self._cache: dict[int, np.ndarray] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, indices, rng):
        if rng is not None and self.strong is not None:
            arrays = [_strong_sample(self, int(i), rng, self.strong) for i in indices]
        else:
            arrays = [_prepare(self.image(int(i)), self.spec, rng) for i in indices]
        stacked = np.stack(arrays)
        if not self.batched[self.names[0]]:
            stacked = stacked[:, None]
        return {self.names[0]: stacked}

    def image(self, index: int) -> np.ndarray:
        """The decoded uint8 HxWx3 RGB image (kept in memory while the decoded images stay under IMAGE_CACHE_BYTES)."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        image = self._load(self.files[index])
        if self._cached_bytes + image.nbytes <= IMAGE_CACHE_BYTES:
            self._cache[index] = image
            self._cached_bytes += image.nbytes
        return image

    def _load(self, file: Path) -> np.ndarray:
        from PIL import Image

        h, w = self.spec.size
        try:
            with Image.open(file) as img:
                if self.strong is None:
                    img.draft("RGB", (2 * w, 2 * h))  # JPEG: decode at a reduced size, much faster
                return np.asarray(img.convert("RGB"))
        except Exception as exc:  # noqa: BLE001
            raise EdgelrError(f"{file}: cannot decode this image ({model_io.first_line(exc)})") from None


@dataclass(frozen=True)
class Augment:
    """The strong augmentation for an image folder (`distill(augment="strong")` or an instance): every
    step draws new views of the photos, so a few dozen photos give thousands of distinct inputs.

    Each sample is, with probability `mosaic`, a 2x2 mosaic (YOLO-style: a random centre, each quarter
    filled with a crop of a random photo), else one view of its photo: with probability `letterbox` (when
    the preprocessing letterboxes) a crop of free aspect resized into the canvas at a random zoom and
    place, grey around it, as the model sees a whole photo; else a crop filling the canvas. A crop covers
    `scale` (a fraction of the photo's area, drawn log-uniform) with an aspect ratio within `ratio` of the
    target's. Then: a horizontal flip (p `flip`); brightness, contrast and saturation each x(1 +- `jitter`);
    a hue rotation of up to +-`hue` turns; a colour cast (each channel's gain x e^(+-`tint`): the only
    change here that gives a grey photo colour, and photo sets are often mostly grey); greyscale with
    probability `grey`; and with probability `mixup` a blend (weight 0.3..0.7) with a second such sample.
    Only image folders take it; an .npz is flipped."""

    scale: tuple[float, float] = (0.05, 1.0)
    ratio: tuple[float, float] = (0.75, 1.333)
    letterbox: float = 0.5
    zoom: tuple[float, float] = (0.4, 1.0)
    mosaic: float = 0.4
    flip: float = 0.5
    jitter: float = 0.4
    hue: float = 0.5
    tint: float = 0.3
    grey: float = 0.1
    mixup: float = 0.1


def augment_spec(augment) -> Augment | None:
    """The strong pipeline AUGMENT asks for ("strong" or an Augment), or None (the light one, or none)."""
    if isinstance(augment, Augment):
        return augment
    if augment == "strong":
        return Augment()
    if isinstance(augment, bool) or augment in (None, "light", "none"):
        return None
    raise EdgelrError(f"augment must be 'light', 'strong', 'none' (or True / False) or an "
                      f"edgelr.train.data.Augment, not {augment!r}")


def _crop(image: np.ndarray, rng: np.random.Generator, aug: Augment, aspect: float | None) -> np.ndarray:
    """A random crop of IMAGE covering aug.scale of its area; with ASPECT (w/h), of about that aspect
    (within aug.ratio), else of the photo's own aspect times a factor within aug.ratio squared."""
    ih, iw = image.shape[:2]
    lo, hi = aug.scale
    area = ih * iw * math.exp(rng.uniform(math.log(lo), math.log(hi)))
    base = aspect if aspect is not None else iw / ih
    spread = math.log(aug.ratio[1] / aug.ratio[0]) if aspect is not None else 2 * math.log(aug.ratio[1] / aug.ratio[0])
    r = base * math.exp(rng.uniform(-spread / 2, spread / 2))
    cw = round(math.sqrt(area * r))
    ch = round(math.sqrt(area / r))
    cw, ch = max(1, min(iw, cw)), max(1, min(ih, ch))
    y, x = int(rng.integers(0, ih - ch + 1)), int(rng.integers(0, iw - cw + 1))
    crop = image[y : y + ch, x : x + cw]
    if rng.random() < aug.flip:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR), dtype=np.float32)


def colour(x: np.ndarray, rng: np.random.Generator, aug: Augment) -> np.ndarray:
    """float HxWx3 in 0..255 -> float 3xHxW in 0..255: brightness, contrast, saturation, hue and tint, or
    greyscale, clipped. All of them are one affine map of the colour, applied in one pass."""
    b, c, s = rng.uniform(1 - aug.jitter, 1 + aug.jitter, size=3)
    luma = np.array([0.299, 0.587, 0.114])
    if rng.random() < aug.grey:
        colour = np.outer(np.ones(3), luma)
    else:
        colour = (1 - s) * np.outer(np.ones(3), luma) + s * np.eye(3)
        if aug.hue:
            colour = hue_matrix(rng.uniform(-aug.hue, aug.hue) * 2 * math.pi) @ colour
        if aug.tint:
            colour = np.exp(rng.uniform(-aug.tint, aug.tint, size=(3, 1))) * colour
    matrix = (c * b * colour).astype(np.float32)  # contrast about the (brightened) mean, which grey maps keep
    offset = np.float32((1 - c) * b * float(x.mean()))
    planes = np.ascontiguousarray(x.transpose(2, 0, 1))  # 3xHxW
    out = np.empty_like(planes)
    for i in range(3):  # elementwise, not BLAS: no threads of its own beside torch's
        np.multiply(planes[0], matrix[i, 0], out=out[i])
        out[i] += matrix[i, 1] * planes[1]
        out[i] += matrix[i, 2] * planes[2] + offset
    return np.clip(out, 0, 255, out=out)


def hue_matrix(angle: float) -> np.ndarray:
    """Rotates colours about the grey axis by ANGLE (radians) in YIQ space, keeping luma."""
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    cos, sin = math.cos(angle), math.sin(angle)
    rotate = np.array([[1, 0, 0], [0, cos, -sin], [0, sin, cos]])
    return (np.linalg.inv(to_yiq) @ rotate @ to_yiq).astype(np.float32)


def _strong_view(data: ImageData, index: int, rng: np.random.Generator, aug: Augment) -> np.ndarray:
    """One augmented HxWx3 float image (0..255) of the canvas size, before normalisation."""
    th, tw = data.spec.size
    if rng.random() < aug.mosaic:
        canvas = np.empty((th, tw, 3), np.float32)
        cy, cx = int(rng.uniform(0.25, 0.75) * th), int(rng.uniform(0.25, 0.75) * tw)
        n = len(data)
        for k, (y0, y1, x0, x1) in enumerate(((0, cy, 0, cx), (0, cy, cx, tw), (cy, th, 0, cx), (cy, th, cx, tw))):
            source = index if k == 0 else int(rng.integers(0, n))
            h, w = y1 - y0, x1 - x0
            canvas[y0:y1, x0:x1] = _resize(_crop(data.image(source), rng, aug, w / h), h, w)
    elif data.spec.letterbox and rng.random() < aug.letterbox:
        crop = _crop(data.image(index), rng, aug, None)
        ch, cw = crop.shape[:2]
        s = min(th / ch, tw / cw) * rng.uniform(*aug.zoom)
        nh, nw = max(1, min(th, round(ch * s))), max(1, min(tw, round(cw * s)))
        canvas = np.full((th, tw, 3), 114, dtype=np.float32)
        top, left = int(rng.integers(0, th - nh + 1)), int(rng.integers(0, tw - nw + 1))
        canvas[top : top + nh, left : left + nw] = _resize(crop, nh, nw)
    else:
        canvas = _resize(_crop(data.image(index), rng, aug, tw / th), th, tw)
    return canvas


def _strong_sample(data: ImageData, index: int, rng: np.random.Generator, aug: Augment) -> np.ndarray:
    x = colour(_strong_view(data, index, rng, aug), rng, aug)
    if rng.random() < aug.mixup:
        lam = np.float32(rng.uniform(0.3, 0.7))
        x *= lam
        x += (1 - lam) * colour(_strong_view(data, int(rng.integers(0, len(data))), rng, aug), rng, aug)
    return _normalise(x, data.spec, chw=True)


def _normalise(canvas: np.ndarray, spec: Preprocess, chw: bool = False) -> np.ndarray:
    """float HxWx3 (3xHxW with CHW) RGB 0..255 -> the model input (CHW or HWC float32) by SPEC's scale,
    mean, std, channel order and layout."""
    if not chw:
        canvas = canvas.transpose(2, 0, 1)
    gain = np.float32(spec.scale) / np.asarray(spec.std, np.float32)
    shift = np.asarray(spec.mean, np.float32) / np.asarray(spec.std, np.float32)
    x = canvas * gain[:, None, None] - shift[:, None, None]
    if spec.channel_order == "BGR":
        x = x[::-1]
    if spec.layout == "NHWC":
        x = x.transpose(1, 2, 0)
    return np.ascontiguousarray(x, dtype=np.float32)


def _prepare(image: np.ndarray, spec: Preprocess, rng: np.random.Generator | None) -> np.ndarray:
    """uint8 HxWx3 RGB -> one model input (CHW or HWC float32), augmented with RNG unless None:
    a random crop (60-100% of each side), a horizontal flip (p 0.5), a small colour jitter
    (brightness, contrast, saturation +-15%), and with letterbox a random zoom-out (70-100%)."""
    from PIL import Image

    th, tw = spec.size
    if rng is not None:
        ih, iw = image.shape[:2]
        fh, fw = rng.uniform(0.6, 1.0, size=2)
        ch, cw = max(1, round(ih * fh)), max(1, round(iw * fw))
        y, x = int(rng.integers(0, ih - ch + 1)), int(rng.integers(0, iw - cw + 1))
        image = image[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            image = image[:, ::-1]
        image = np.ascontiguousarray(image)
    ih, iw = image.shape[:2]
    if spec.letterbox:
        zoom = rng.uniform(0.7, 1.0) if rng is not None else 1.0
        s = min(th / ih, tw / iw) * zoom
        nh, nw = max(1, min(th, round(ih * s))), max(1, min(tw, round(iw * s)))
    else:
        nh, nw = th, tw
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR), dtype=np.float32)
    if rng is not None:
        b, c, s = rng.uniform(0.85, 1.15, size=3)
        resized = resized * b
        resized = (resized - resized.mean()) * c + resized.mean()
        grey = resized.mean(axis=2, keepdims=True)
        resized = np.clip(grey + (resized - grey) * s, 0, 255)
    if spec.letterbox:
        canvas = np.full((th, tw, 3), 114, dtype=np.float32)
        if rng is not None:
            top, left = int(rng.integers(0, th - nh + 1)), int(rng.integers(0, tw - nw + 1))
        else:
            top, left = (th - nh) // 2, (tw - nw) // 2
        canvas[top : top + nh, left : left + nw] = resized
    else:
        canvas = resized
    return _normalise(canvas, spec)


def _read_preprocess(spec, folder: Path, value: ir.Value) -> Preprocess:
    where = "preprocess"
    if spec is None and (folder / "preprocess.json").is_file():
        spec = folder / "preprocess.json"
    if isinstance(spec, (str, os.PathLike)):
        where = str(spec)
        try:
            spec = json.loads(Path(spec).read_text())
        except (OSError, ValueError) as exc:
            raise EdgelrError(f"{where}: not a readable JSON preprocessing spec ({model_io.first_line(exc)})") from None
    spec = dict(spec or {})
    if not isinstance(spec, dict):
        raise EdgelrError(f"{where}: must be a JSON object with keys {', '.join(PREPROCESS_KEYS)}")
    unknown = sorted(set(spec) - set(PREPROCESS_KEYS))
    if unknown:
        raise EdgelrError(f"{where}: unknown keys {unknown}; known: {', '.join(PREPROCESS_KEYS)}")
    layout = str(spec.get("layout", "NCHW")).upper()
    if layout not in ("NCHW", "NHWC"):
        raise EdgelrError(f"{where}: layout must be NCHW or NHWC, not {layout}")
    order = str(spec.get("channel_order", "RGB")).upper()
    if order not in ("RGB", "BGR"):
        raise EdgelrError(f"{where}: channel_order must be RGB or BGR, not {order}")
    dims = list(value.shape.dims) if value.shape is not None else None
    if dims is None or len(dims) != 4:
        raise EdgelrError(f"an image folder feeds a model whose input is an image batch [N,3,H,W]; input "
                          f"'{value.name}' has shape {dims}: give the data as an .npz instead")
    channels, hw = (dims[1], dims[2:4]) if layout == "NCHW" else (dims[3], dims[1:3])
    if isinstance(channels, int) and channels != 3:
        raise EdgelrError(f"input '{value.name}' has {channels} channels ({layout}); images give 3: use an .npz")
    if "size" in spec:
        size = spec["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise EdgelrError(f"{where}: size must be a positive int or [H, W], not {spec['size']}")
    elif all(isinstance(d, int) and d > 0 for d in hw):
        size = tuple(hw)
    else:
        raise EdgelrError(f"input '{value.name}' has a dynamic image size {dims}: say which in a preprocessing "
                          'spec, e.g. preprocess.json {"size": 320} in the image folder')
    if all(isinstance(d, int) and d > 0 for d in hw) and tuple(hw) != tuple(size):
        raise EdgelrError(f"{where}: size {list(size)} differs from the model's input size {list(hw)}")

    def triple(key, default):
        v = spec.get(key, default)
        v = [v] * 3 if isinstance(v, (int, float)) else list(v)
        if len(v) != 3:
            raise EdgelrError(f"{where}: {key} must be a number or 3 numbers, not {spec[key]}")
        return tuple(float(x) for x in v)

    std = triple("std", 1.0)
    if any(s == 0 for s in std):
        raise EdgelrError(f"{where}: std must not be 0")
    return Preprocess(size=(int(size[0]), int(size[1])), letterbox=bool(spec.get("letterbox", True)),
                      mean=triple("mean", 0.0), std=std, scale=float(spec.get("scale", 1 / 255)),
                      layout=layout, channel_order=order)


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        other = f" (it holds {len(files)} other files, e.g. {files[0].name})" if files else " (it is empty)"
        raise EdgelrError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}){other}")
    from PIL import Image

    for p in images:
        try:
            with Image.open(p) as img:
                img.verify()
        except Exception as exc:  # noqa: BLE001
            raise EdgelrError(f"{p}: cannot decode this image ({model_io.first_line(exc)}); remove or fix it") from None
    return images


def load_data(data, model: ir.Model, preprocess=None) -> Data:
    """DATA (an .npz of model inputs, Samples, or an image folder) checked against MODEL's inputs."""
    if isinstance(data, Samples):
        return NpzData(data, model)
    path = Path(data)
    if path.is_dir():
        inputs = model_inputs(model)
        if len(inputs) != 1:
            raise EdgelrError(f"{path}: an image folder feeds a model with one input; this one has "
                              f"{[v.name for v in inputs]}: give the data as an .npz")
        value = inputs[0]
        spec = _read_preprocess(preprocess, path, value)
        if value.dtype is not None and value.dtype.numpy().kind != "f":
            raise EdgelrError(f"input '{value.name}' is {value.dtype}; images give float inputs: use an .npz")
        dims = list(value.shape.dims)
        if isinstance(dims[0], int) and dims[0] > 1:
            raise EdgelrError(f"input '{value.name}' has a fixed batch of {dims[0]}; use an .npz")
        return ImageData(_image_files(path), spec, value.name, batched=dims[0] != 1)
    if not path.exists():
        raise EdgelrError(f"{path}: no such file or folder; give an .npz of model inputs or a folder of images")
    return NpzData(load_samples(path, model), model)


def evaluation_samples(given, model: ir.Model, preprocess) -> Samples | None:
    """GIVEN (an .npz, Samples or image folder; None) as Samples: an image folder's first EVAL_IMAGES
    images, unaugmented."""
    if given is None or isinstance(given, Samples):
        return given
    data = load_data(given, model, preprocess)
    if isinstance(data, NpzData):
        return data.samples
    indices = np.arange(min(len(data), EVAL_IMAGES))
    arrays = data.batch(indices, None)
    return Samples(arrays, dict(data.batched))


# ---------------------------------------------------------------------------------------------------
# batches


def chunks(batch: dict[str, np.ndarray], batched: dict[str, bool]) -> list[dict[str, np.ndarray]]:
    """The model feeds for a batch: one, when every input takes the samples on its batch axis; else one per sample."""
    if all(batched.values()):
        return [batch]
    n = len(next(iter(batch.values())))
    return [{k: (v[i : i + 1] if batched[k] else v[i]) for k, v in batch.items()} for i in range(n)]


class Stream:
    """Which samples step S uses: a permutation of the data per epoch, a pure function of (seed, epoch)."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n, batch, seed
        self._perms: dict[int, np.ndarray] = {}

    def indices(self, step: int) -> np.ndarray:
        out = []
        for p in range(step * self.batch, (step + 1) * self.batch):
            epoch, i = divmod(p, self.n)
            if epoch not in self._perms:
                self._perms = {epoch: np.random.default_rng([self.seed, epoch, 0]).permutation(self.n)}
            out.append(self._perms[epoch][i])
        return np.asarray(out, dtype=np.int64)

    def augmentation(self, step: int) -> np.random.Generator:
        """The generator that draws step STEP's augmentation, for its whole (global) batch."""
        return np.random.default_rng([self.seed, step, 1])


def shard(batch: dict[str, np.ndarray], rank: int, world: int) -> dict[str, np.ndarray]:
    """Process RANK's slice of a global BATCH (inputs stacked on the sample axis): an equal, contiguous
    share of the samples, in order, so the ranks' slices put together are the batch."""
    if world == 1:
        return batch
    n = len(next(iter(batch.values())))
    size = n // world
    return {k: v[rank * size : (rank + 1) * size] for k, v in batch.items()}
