"""Real data for the reference models, from registry packages (no hub access needed): the YOLOv8n
detector that `nudenet` ships, and scikit-image's photographs as detector inputs, split into
calibration and held-out (no photo is in both sets; each gives its letterboxed full view plus seeded
random crops), and LFW face mosaics. `python tools/photos.py` writes them as .npz files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CALIBRATION = ["coffee", "rocket", "chelsea", "camera", "coins", "clock", "moon", "brick", "gravel", "page", "cell"]
HELD_OUT = ["astronaut", "hubble_deep_field", "immunohistochemistry", "retina", "text", "grass", "colorwheel"]


def yolo_path() -> Path:
    """nudenet's trained YOLOv8n (opset 17, input `images` [N, 3, 320, 320], output [N, 22, 2100])."""
    import nudenet

    return Path(nudenet.__file__).parent / "320n.onnx"


def photo(name: str) -> np.ndarray:
    """An RGB uint8 photo from skimage.data (grey ones are stacked to three channels)."""
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


def training_folder(folder: Path, extra: bool, nonfaces: bool = False) -> int:
    """Unlabeled training images for distilling the detector, written as PNGs into FOLDER (with a
    preprocess.json): the calibration photos, mosaics of LFW faces 0..49, optionally LFW's non-face crops
    and the EXTRA photos. Never a held-out photo or face. Returns the number of images."""
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
    (folder / "preprocess.json").write_text(json.dumps({"size": 320}))
    return len(list(folder.glob("*.png")))
