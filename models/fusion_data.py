"""Synthetic RGB + thermal detection scenes (numpy only, seeded, as many as asked for), for the fusion detector
of models/fusion.py.

    rgb, thermal, truths = batch(training_rng(seed=0), 32)   # (32, 3, 64, 64), (32, 1, 64, 64) float32 in 0..1
    rgb, thermal, truths = held_out(256)                      # the fixed evaluation set

Each scene has 0-4 objects of three classes that differ in shape and in heat: a person (tall: head, torso,
arms, legs; warm all over, the head warmest), a vehicle (wide: body, cabin, wheels; a hot engine at its
front, warm wheels, cold glass) and an animal (a body on four legs with a head; warm). The background is
textured in both modalities, with clutter that is no object: coloured rectangles and blobs in RGB; hot
round spots, warm walls and cold puddles in thermal. Some objects are faint in one modality and clear
in the other, so that neither image alone finds everything:
- night (30% of scenes): the RGB image is dark and noisy, every object is faint in it, clear in thermal;
- by day, an object is clear in both (60%), camouflaged in RGB (20%: its colours are the background's)
  or at ambient temperature (20%: a parked car, an insulated person), so faint in thermal.
Ground truth (`Truth`): each object's box (x1, y1, x2, y2 in pixels, the tight box of its drawn pixels)
and class id (an index into CLASSES), and in which modality it is clear.

Training and the held-out set draw from different streams of one seed sequence (spawn keys 1 and 2),
so no training seed ever reproduces a held-out scene.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

CLASSES = ("person", "vehicle", "animal")
SIZE = 64
MAX_OBJECTS = 4
HELD_OUT_SEED = 2024
NIGHT = 0.3
# By day: clear in both, faint in RGB, faint in thermal.
DAY_MODES = (0.6, 0.2, 0.2)


@dataclass
class Truth:
    """One scene's objects: boxes (K, 4) xyxy pixels float32, classes (K,) int64, and per object whether it
    is clear in RGB and in thermal (K,) bool."""

    boxes: np.ndarray
    classes: np.ndarray
    rgb_visible: np.ndarray
    thermal_visible: np.ndarray
    night: bool


def training_rng(seed: int = 0) -> np.random.Generator:
    """The generator training draws from: seed `seed`, spawn key 1 (the held-out set uses key 2)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))


def held_out(count: int = 256, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, list[Truth]]:
    """The fixed evaluation scenes: the first `count` of the held-out stream (the same on every call)."""
    return batch(np.random.default_rng(np.random.SeedSequence(HELD_OUT_SEED, spawn_key=(2,))), count, size)


def batch(rng: np.random.Generator, count: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, list[Truth]]:
    """`count` scenes: rgb (count, 3, size, size), thermal (count, 1, size, size) float32 in 0..1, truths."""
    scenes = [scene(rng, size) for _ in range(count)]
    return (np.stack([s[0] for s in scenes]), np.stack([s[1] for s in scenes]), [s[2] for s in scenes])


def scene(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, Truth]:
    """One scene: rgb (3, size, size), thermal (1, size, size) float32 in 0..1 and its Truth."""
    canvas = _canvas(size)
    night = bool(rng.random() < NIGHT)
    rgb = _rgb_background(rng, canvas)
    ambient = _thermal_background(rng, canvas, night)
    thermal = ambient.copy()
    boxes, classes, rgb_visible, thermal_visible = [], [], [], []
    for _ in range(int(rng.integers(0, MAX_OBJECTS + 1))):
        placed = _place(rng, canvas, boxes)
        if placed is None:
            continue
        cls, parts, box = placed
        mode = 0 if night else int(rng.choice(3, p=DAY_MODES))
        clear_rgb, clear_thermal = not night and mode != 1, mode != 2
        _paint_rgb(rng, rgb, cls, parts, clear_rgb)
        _paint_thermal(rng, thermal, ambient, cls, parts, clear_thermal)
        boxes.append(box)
        classes.append(cls)
        rgb_visible.append(clear_rgb)
        thermal_visible.append(clear_thermal)
    if night:
        rgb = rgb * rng.uniform(0.08, 0.25) + rng.normal(0, 0.03, rgb.shape)
    else:
        rgb = rgb + rng.normal(0, 0.02, rgb.shape)
    thermal = _blur(thermal) + rng.normal(0, 0.015, thermal.shape)
    truth = Truth(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64),
                  np.asarray(rgb_visible, bool), np.asarray(thermal_visible, bool), night)
    return (np.clip(rgb, 0, 1).astype(np.float32), np.clip(thermal, 0, 1)[None].astype(np.float32), truth)


# --- drawing ----------------------------------------------------------------------------------------
class _Canvas:
    """Pixel-centre coordinates of a size x size image and soft-edged (anti-aliased) shapes on it."""

    def __init__(self, size: int):
        self.size = size
        self.y, self.x = np.mgrid[0:size, 0:size] + 0.5

    def rect(self, x0, y0, x1, y1) -> np.ndarray:
        cover_x = np.clip(np.minimum(self.x - x0, x1 - self.x) + 0.5, 0, 1)
        cover_y = np.clip(np.minimum(self.y - y0, y1 - self.y) + 0.5, 0, 1)
        return cover_x * cover_y

    def ellipse(self, cx, cy, rx, ry) -> np.ndarray:
        distance = np.sqrt(((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2)
        return np.clip((1 - distance) * min(rx, ry) + 0.5, 0, 1)


@lru_cache(maxsize=4)
def _canvas(size: int) -> _Canvas:
    return _Canvas(size)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Standard normal values on a (cells + 1)^2 grid, bilinearly interpolated to size x size."""
    grid = rng.standard_normal((cells + 1, cells + 1))
    pos = (np.arange(size) + 0.5) * cells / size
    i = pos.astype(int)
    f = pos - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f) + rows[:, i + 1] * f


def _blur(image: np.ndarray) -> np.ndarray:
    """3x3 box blur, edges repeated: a thermal camera's softer optics."""
    padded = np.pad(image, 1, mode="edge")
    n = image.shape[0]
    return sum(padded[dy:dy + n, dx:dx + n] for dy in range(3) for dx in range(3)) / 9


def _rgb_background(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    """Sky over ground, both textured, with rectangles (buildings, signs) and blobs (bushes) as clutter."""
    n = canvas.size
    horizon = rng.uniform(0.15, 0.55) * n
    sky, ground = rng.uniform(0.45, 0.95, 3), rng.uniform(0.1, 0.6, 3)
    below = np.clip(canvas.y - horizon + 0.5, 0, 1)[None]
    rgb = sky[:, None, None] * (1 - below) + ground[:, None, None] * below
    rgb = rgb + 0.08 * _smooth_noise(rng, n, 6)[None] + 0.04 * rng.standard_normal((3, 1, 1)) * _smooth_noise(rng, n, 12)
    for _ in range(int(rng.integers(0, 5))):
        w, h = rng.uniform(4, 0.5 * n, 2)
        x0, y0 = rng.uniform(-w / 2, n - w / 2), rng.uniform(0, n - h / 2)
        _over(rgb, canvas.rect(x0, y0, x0 + w, y0 + h), rng.uniform(0, 1, 3))
    for _ in range(int(rng.integers(0, 5))):
        rx, ry = rng.uniform(1.5, 7, 2)
        _over(rgb, canvas.ellipse(*rng.uniform(0, n, 2), rx, ry), rng.uniform(0, 1, 3))
    return rgb


def _thermal_background(rng: np.random.Generator, canvas: _Canvas, night: bool) -> np.ndarray:
    """Ambient temperature: a gradient and slow variation, hot round spots (lamps, sun-heated stones), warm
    walls and cold puddles: heat that is no object."""
    n = canvas.size
    base = rng.uniform(0.15, 0.3) if night else rng.uniform(0.25, 0.45)
    heat = base + rng.uniform(-0.08, 0.08) * (canvas.y / n - 0.5) + 0.04 * _smooth_noise(rng, n, 5)
    for _ in range(int(rng.integers(0, 4))):
        sigma = rng.uniform(1, 4)
        cx, cy = rng.uniform(0, n, 2)
        heat += rng.uniform(0.2, 0.55) * np.exp(-((canvas.x - cx) ** 2 + (canvas.y - cy) ** 2) / (2 * sigma ** 2))
    for _ in range(int(rng.integers(0, 3))):
        w, h = rng.uniform(8, 0.6 * n, 2)
        x0, y0 = rng.uniform(-w / 2, n - w / 2), rng.uniform(-h / 2, n - h / 2)
        heat += rng.uniform(0.06, 0.18) * canvas.rect(x0, y0, x0 + w, y0 + h)
    for _ in range(int(rng.integers(0, 3))):
        rx, ry = rng.uniform(3, 10), rng.uniform(1.5, 4)
        heat -= rng.uniform(0.08, 0.2) * canvas.ellipse(*rng.uniform(0, n, 2), rx, ry)
    return heat


def _over(image: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    """Paint `colour` (channels,) over image (channels, h, w) where mask (h, w) covers it, in place."""
    image += mask[None] * (np.asarray(colour).reshape(-1, 1, 1) - image)


# --- objects ----------------------------------------------------------------------------------------
def _person(canvas: _Canvas, rng: np.random.Generator, cx: float, bottom: float, height: float) -> dict:
    top = bottom - height
    head = 0.11 * height
    torso = rng.uniform(0.26, 0.34) * height
    arm, leg = 0.08 * height, 0.12 * height
    gap = rng.uniform(0.01, 0.06) * height
    shoulder, waist, hip = top + 2 * head, top + 0.55 * height, top + 0.58 * height
    return {
        "head": canvas.ellipse(cx, top + head, head, head),
        "torso": canvas.rect(cx - torso / 2, shoulder, cx + torso / 2, hip),
        "arms": np.maximum(canvas.rect(cx - torso / 2 - arm, shoulder + 0.3, cx - torso / 2, waist),
                           canvas.rect(cx + torso / 2, shoulder + 0.3, cx + torso / 2 + arm, waist)),
        "legs": np.maximum(canvas.rect(cx - gap / 2 - leg, hip, cx - gap / 2, bottom),
                           canvas.rect(cx + gap / 2, hip, cx + gap / 2 + leg, bottom)),
    }


def _vehicle(canvas: _Canvas, rng: np.random.Generator, cx: float, bottom: float, width: float) -> dict:
    facing = rng.choice((-1, 1))
    wheel = 0.11 * width
    body_h, cabin_h = rng.uniform(0.26, 0.34) * width, rng.uniform(0.18, 0.26) * width
    x0, x1, body_bottom = cx - width / 2, cx + width / 2, bottom - wheel
    body_top = body_bottom - body_h
    cabin_cx = cx - facing * 0.1 * width
    body = canvas.rect(x0, body_top, x1, body_bottom)
    front = canvas.rect(x1 - width / 3, body_top, x1, body_bottom) if facing > 0 else \
        canvas.rect(x0, body_top, x0 + width / 3, body_bottom)
    return {
        "body": body,
        "engine": front,
        "cabin": canvas.rect(cabin_cx - 0.27 * width, body_top - cabin_h, cabin_cx + 0.27 * width, body_top + 0.5),
        "wheels": np.maximum(canvas.ellipse(x0 + 0.22 * width, body_bottom, wheel, wheel),
                             canvas.ellipse(x1 - 0.22 * width, body_bottom, wheel, wheel)),
    }


def _animal(canvas: _Canvas, rng: np.random.Generator, cx: float, bottom: float, width: float) -> dict:
    facing = rng.choice((-1, 1))
    rx, ry = 0.33 * width, rng.uniform(0.14, 0.19) * width
    leg_len = rng.uniform(0.18, 0.26) * width
    body_y = bottom - leg_len - 0.5 * ry
    legs = [canvas.rect(x - 0.03 * width, body_y, x + 0.03 * width, bottom)
            for x in (cx - 0.24 * width, cx - 0.14 * width, cx + 0.14 * width, cx + 0.24 * width)]
    return {
        "body": canvas.ellipse(cx, body_y, rx, ry),
        "head": canvas.ellipse(cx + facing * (rx + 0.04 * width), body_y - 0.9 * ry, 0.12 * width, 0.09 * width),
        "legs": np.maximum.reduce(legs),
    }


# class id -> (drawing function, size range in fractions of the image: height for a person, width otherwise)
_SHAPES = {0: (_person, (0.19, 0.34)), 1: (_vehicle, (0.24, 0.42)), 2: (_animal, (0.17, 0.27))}


def _place(rng: np.random.Generator, canvas: _Canvas, boxes: list, tries: int = 20):
    """A random object wholly inside the image, overlapping no earlier box by IoU > 0.1: (class, parts, box),
    or None when `tries` draws found no room."""
    n = canvas.size
    for _ in range(tries):
        cls = int(rng.integers(len(CLASSES)))
        draw, (low, high) = _SHAPES[cls]
        extent = rng.uniform(low, high) * n
        parts = draw(canvas, rng, rng.uniform(0, n), rng.uniform(0.3 * n, n), extent)
        covered = np.maximum.reduce(list(parts.values())) >= 0.5
        rows, cols = np.flatnonzero(covered.any(1)), np.flatnonzero(covered.any(0))
        if not len(rows) or rows[0] == 0 or cols[0] == 0 or rows[-1] == n - 1 or cols[-1] == n - 1:
            continue  # cut by the image's edge
        box = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)
        if all(_iou(box, other) <= 0.1 for other in boxes):
            return cls, parts, box
    return None


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _paint_rgb(rng: np.random.Generator, rgb: np.ndarray, cls: int, parts: dict, clear: bool) -> None:
    """Each part in its colour; a faint (camouflaged) object takes the colours of the background under it."""
    covered = np.maximum.reduce(list(parts.values()))
    under = (rgb * covered).sum((1, 2)) / covered.sum()
    colours = _colours(rng, cls, under) if clear else \
        {name: np.clip(under + rng.normal(0, 0.03, 3), 0, 1) for name in parts}
    for name, mask in parts.items():
        if name in colours:
            _over(rgb, mask, colours[name])


def _colours(rng: np.random.Generator, cls: int, under: np.ndarray) -> dict:
    """Part colours of a clearly visible object: its main colour differs from the background `under` it."""
    main = rng.uniform(0, 1, 3)
    while np.abs(main - under).sum() < 0.6:
        main = rng.uniform(0, 1, 3)
    if cls == 0:
        skin = np.array([0.9, 0.7, 0.55]) * rng.uniform(0.35, 1.0)
        return {"head": skin, "torso": main, "arms": main, "legs": rng.uniform(0, 1, 3)}
    if cls == 1:
        return {"body": main, "cabin": rng.uniform(0.05, 0.25) * np.array([0.8, 0.9, 1.0]),
                "wheels": np.full(3, rng.uniform(0.02, 0.1))}
    return {"body": main, "head": main * 0.85, "legs": main * 0.7}


# Heat above ambient, per part: the range of a clearly warm object (a vehicle's glass is colder than its body).
_HEAT = {
    0: {"torso": (0.28, 0.4), "arms": (0.3, 0.42), "legs": (0.26, 0.38), "head": (0.4, 0.55)},
    1: {"body": (0.08, 0.16), "engine": (0.45, 0.6), "cabin": (-0.08, 0.0), "wheels": (0.25, 0.35)},
    2: {"body": (0.3, 0.45), "legs": (0.2, 0.3), "head": (0.32, 0.45)},
}


def _paint_thermal(rng: np.random.Generator, thermal: np.ndarray, ambient: np.ndarray, cls: int, parts: dict,
                   clear: bool) -> None:
    """Each part at ambient plus its heat; an object faint in thermal keeps under a tenth of that heat."""
    scale = 1.0 if clear else rng.uniform(0.0, 0.1)
    for name, (low, high) in _HEAT[cls].items():
        mask = parts[name]
        thermal += mask * (ambient + scale * rng.uniform(low, high) - thermal)
