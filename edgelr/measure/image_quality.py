"""Image quality of a compressed generator against the original, offline (no hub weights).

Two families of measures, both on pairs of image batches generated from the same seeds:

- Pixel measures: PSNR and SSIM of each compressed image against the original's image from the same seed
  (scikit-image's `peak_signal_noise_ratio` and `structural_similarity`). Images are (N, H, W) or (N, C, H, W)
  float arrays with a declared `value_range`: (-1, 1), the default, is the range diffusers pipelines sample in
  (before their final `image / 2 + 0.5`); (0, 1) is what `DDPMPipeline(output_type="np")` returns. Both
  measures first map the range onto [0, 1]: PSNR does not care, but SSIM's luminance term does (the same pair
  scores up to ~0.02 lower if measured in [-1, 1] as is), and [0, 1] intensities are what SSIM is defined on.
  SSIM uses the settings of Wang et al. 2004 (11x11 Gaussian window, sigma 1.5, population covariances), as
  MATLAB's `ssim` and torchmetrics do. Identical images have PSNR inf and SSIM 1.
- Classifier measures: a classifier trained on real images of the same kind (for the digits model,
  models/digits.py's) labels both batches. `classify` is any callable from an image batch to class
  probabilities (N, K), so this module needs no torch: agreement of the compressed images' classes with the
  original's from the same seeds, each batch's mean top probability (confidence), and the distance between the
  two class histograms (total variation, in points: 0 equal, 100 disjoint). A compressed generator that still
  draws the same distribution keeps the histogram and the confidence, even where single images drift.

scikit-image is imported when a pixel measure runs (the dev extra has it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Classify = Callable[[np.ndarray], np.ndarray]
Range = tuple[float, float]
CONFIDENT = 0.9  # a top probability above this counts as a confident classification


def _pairs(reference: np.ndarray, test: np.ndarray, value_range: Range) -> tuple[np.ndarray, np.ndarray]:
    """Both batches as float64 mapped from value_range onto [0, 1] (values outside it are kept, not clipped)."""
    a, b = np.asarray(reference, dtype=np.float64), np.asarray(test, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {a.shape} and {b.shape}")
    if a.ndim not in (3, 4):
        raise ValueError(f"expected a batch (N, H, W) or (N, C, H, W), got shape {a.shape}")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    width = hi - lo
    for x in (a, b):
        if x.size and (x.min() < lo - width or x.max() > hi + width):
            raise ValueError(f"images run from {x.min():.3g} to {x.max():.3g}, far outside value_range "
                             f"{(lo, hi)}: pass the range they are in")
    return (a - lo) / width, (b - lo) / width


def psnr(reference: np.ndarray, test: np.ndarray, value_range: Range = (-1.0, 1.0)) -> np.ndarray:
    """PSNR in dB of each test image against its reference image (shape (N,)), the peak being the width of
    value_range; inf where the two are equal."""
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _pairs(reference, test, value_range)
    out = np.empty(len(a))
    for i in range(len(a)):
        if np.array_equal(a[i], b[i]):
            out[i] = np.inf  # skimage divides by zero here (and warns)
        else:
            out[i] = peak_signal_noise_ratio(a[i], b[i], data_range=1.0)
    return out


def ssim(reference: np.ndarray, test: np.ndarray, value_range: Range = (-1.0, 1.0)) -> np.ndarray:
    """SSIM of each test image against its reference image (shape (N,)), measured on [0, 1] intensities; 1.0
    where they are equal; the channels of (N, C, H, W) images with C > 1 are averaged."""
    from skimage.metrics import structural_similarity

    a, b = _pairs(reference, test, value_range)
    out = np.empty(len(a))
    for i in range(len(a)):
        x, y = a[i], b[i]
        channel_axis = None
        if x.ndim == 3:
            if x.shape[0] == 1:
                x, y = x[0], y[0]
            else:
                x, y, channel_axis = np.moveaxis(x, 0, -1), np.moveaxis(y, 0, -1), -1
        out[i] = structural_similarity(x, y, data_range=1.0, channel_axis=channel_axis,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    return out


def pixel_summary(reference: np.ndarray, test: np.ndarray, value_range: Range = (-1.0, 1.0)) -> dict:
    """PSNR and SSIM of the test batch against the reference batch: mean, median and worst over images.
    psnr_mean is inf only if every pair is identical; otherwise identical pairs count as 100 dB in it."""
    p, s = psnr(reference, test, value_range), ssim(reference, test, value_range)
    all_equal = bool(np.isinf(p).all())
    return {"images": len(p), "value_range": [float(v) for v in value_range],
            "psnr_mean": float("inf") if all_equal else float(np.minimum(p, 100.0).mean()),
            "psnr_median": float(np.median(p)), "psnr_min": float(p.min()),
            "ssim_mean": float(s.mean()), "ssim_median": float(np.median(s)), "ssim_min": float(s.min())}


def class_histogram(probs: np.ndarray, classes: int | None = None) -> np.ndarray:
    """The share of images whose top class is k, for each k (sums to 1)."""
    probs = np.asarray(probs)
    k = probs.shape[1] if classes is None else classes
    counts = np.bincount(probs.argmax(axis=1), minlength=k).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Total-variation distance between two distributions over the same classes: 0 equal, 1 disjoint."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return float(0.5 * np.abs(p - q).sum())


def classifier_summary(probs: np.ndarray) -> dict:
    """One batch as the classifier sees it: mean top probability, the share of images above CONFIDENT, the
    top-class histogram (counts and shares)."""
    probs = np.asarray(probs, dtype=np.float64)
    top = probs.max(axis=1)
    counts = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1])
    return {"images": len(probs), "mean_confidence": float(top.mean()),
            "confident_share": float((top > CONFIDENT).mean()),
            "histogram_counts": [int(c) for c in counts],
            "histogram": [float(c) / max(len(probs), 1) for c in counts]}


def classifier_compare(classify: Classify, reference: np.ndarray, test: np.ndarray) -> dict:
    """The classifier measure of a test batch (the compressed generator's) against a reference batch (the
    original's, same seeds): `agreement` (share of images whose class matches the reference image's),
    each batch's summary, and the differences in points: `confidence_drop_points` (reference mean top
    probability minus test's, x100) and `histogram_tv_points` (total variation between the class histograms,
    x100)."""
    ref, tst = np.asarray(classify(reference)), np.asarray(classify(test))
    if ref.shape != tst.shape or ref.ndim != 2:
        raise ValueError(f"classifier outputs differ or are not (N, classes): {ref.shape}, {tst.shape}")
    ref_s, tst_s = classifier_summary(ref), classifier_summary(tst)
    return {"agreement": float((ref.argmax(1) == tst.argmax(1)).mean()),
            "confidence_drop_points": 100 * (ref_s["mean_confidence"] - tst_s["mean_confidence"]),
            "histogram_tv_points": 100 * total_variation(class_histogram(ref), class_histogram(tst)),
            "reference": ref_s, "test": tst_s}


def accuracy(classify: Classify, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the classifier on labelled images (e.g. real held-out digits)."""
    return float((np.asarray(classify(images)).argmax(axis=1) == np.asarray(labels)).mean())
