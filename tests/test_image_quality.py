"""Image-quality measures (edgelr.measure.image_quality) on real images: scikit-image's photos for PSNR and SSIM,
scikit-learn's digits and the digit classifier trained on them (models/weights/digit_classifier.pt) for the
classifier measure, and the committed DDPM digits pipeline (models/weights/ddpm_digits/)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edgelr.measure.image_quality import (
    accuracy,
    class_histogram,
    classifier_compare,
    classifier_summary,
    pixel_summary,
    psnr,
    ssim,
    total_variation,
)

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image gives the photos (the dev extra)")

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "models" / "weights"


def _photos() -> np.ndarray:
    """Four real grey photos, 128x128 crops, float64 in [0, 1], as a batch (4, 128, 128)."""
    from skimage.color import rgb2gray
    from skimage.util import img_as_float

    crops = [img_as_float(skimage_data.camera())[100:228, 200:328],
             img_as_float(skimage_data.moon())[200:328, 200:328],
             img_as_float(skimage_data.coins())[50:178, 50:178],
             rgb2gray(skimage_data.astronaut())[30:158, 170:298]]
    return np.stack(crops)


def test_identical_images_have_infinite_psnr_and_ssim_one():
    photos = _photos()
    assert np.isinf(psnr(photos, photos, value_range=(0, 1))).all()
    assert np.allclose(ssim(photos, photos, value_range=(0, 1)), 1.0)
    summary = pixel_summary(photos, photos, value_range=(0, 1))
    assert summary["psnr_mean"] == float("inf") and summary["ssim_min"] == pytest.approx(1.0)


def test_more_noise_lowers_psnr_and_ssim_and_psnr_follows_the_noise_power():
    photos = _photos()
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(photos.shape)
    sigmas = [0.005, 0.02, 0.05, 0.1, 0.2]
    p = np.array([psnr(photos, photos + s * noise, value_range=(0, 1)) for s in sigmas])  # (sigmas, images)
    s = np.array([ssim(photos, photos + sg * noise, value_range=(0, 1)) for sg in sigmas])
    assert (np.diff(p, axis=0) < 0).all() and (np.diff(s, axis=0) < 0).all()  # per image, strictly
    # unclipped Gaussian noise of std sigma on a [0, 1] range: PSNR = -20 log10(sigma), within sampling error
    assert np.allclose(p, -20 * np.log10(np.array(sigmas))[:, None], atol=0.2)
    assert s[0].min() > 0.95 and s[-1].max() < 0.5


def test_the_range_convention_does_not_change_the_numbers():
    """[-1, 1] images measure the same as the [0, 1] images they map to (SSIM's luminance term would differ if
    the [-1, 1] values went in as they are), and a batch far outside the declared range is refused."""
    photos = _photos()
    noisy = np.clip(photos + 0.05 * np.random.default_rng(1).standard_normal(photos.shape), 0, 1)
    assert np.allclose(psnr(2 * photos - 1, 2 * noisy - 1), psnr(photos, noisy, value_range=(0, 1)))
    assert np.allclose(ssim(2 * photos - 1, 2 * noisy - 1), ssim(photos, noisy, value_range=(0, 1)))
    with pytest.raises(ValueError, match="far outside value_range"):
        psnr(255 * photos, 255 * noisy)


def test_colour_and_channel_first_batches():
    from skimage.util import img_as_float

    rgb = np.moveaxis(img_as_float(skimage_data.astronaut())[::4, ::4], -1, 0)[None]  # (1, 3, 128, 128)
    noisy = rgb + 0.05 * np.random.default_rng(2).standard_normal(rgb.shape)
    grey_mean = np.mean([ssim(rgb[:, c], noisy[:, c], value_range=(0, 1))[0] for c in range(3)])
    assert ssim(rgb, noisy, value_range=(0, 1))[0] == pytest.approx(grey_mean, abs=1e-9)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(rgb, rgb[:, :1])


def test_histogram_distance():
    p = np.eye(4)[[0, 0, 1, 2]]  # classes 0, 0, 1, 2
    assert class_histogram(p).tolist() == [0.5, 0.25, 0.25, 0.0]
    assert total_variation([0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]) == 1.0
    assert total_variation(class_histogram(p), class_histogram(p)) == 0.0
    summary = classifier_summary(np.array([[0.95, 0.05], [0.4, 0.6]]))
    assert summary["mean_confidence"] == pytest.approx(0.775) and summary["confident_share"] == 0.5
    assert summary["histogram_counts"] == [1, 1]


@pytest.fixture(scope="module")
def classifier():
    pytest.importorskip("torch", reason="the digit classifier is a torch module")
    pytest.importorskip("sklearn", reason="scikit-learn gives the digits")
    path = WEIGHTS / "digit_classifier.pt"
    if not path.exists():
        pytest.skip(f"{path} is not there: python tools/train_ddpm_digits.py trains it")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from models import digits

    yield digits, digits.load_classifier(path)
    torch.set_num_threads(threads)


def test_the_classifier_knows_real_held_out_digits(classifier):
    digits, classify = classifier
    _, _, held_x, held_y = digits.split()
    assert held_x.shape == (360, 1, 32, 32) and held_x.min() >= -1 and held_x.max() <= 1
    assert accuracy(classify, held_x, held_y) >= 0.9
    assert classifier_summary(classify(held_x))["mean_confidence"] > 0.9
    # and gives no confident answer on what is no digit (a generator gone wrong)
    noise = np.clip(np.random.default_rng(0).standard_normal((64, 1, 32, 32)), -1, 1).astype(np.float32)
    assert classifier_summary(classify(noise))["mean_confidence"] < 0.5


def test_classifier_measure_on_real_digits(classifier):
    """Held-out digits against themselves, against a batch whose 3s became 5s, and against a batch drowned in
    noise: agreement, histogram distance and confidence move as the change says."""
    digits, classify = classifier
    _, _, held_x, held_y = digits.split()
    same = classifier_compare(classify, held_x, held_x)
    assert same["agreement"] == 1.0 and same["histogram_tv_points"] == 0.0 and same["confidence_drop_points"] == 0.0

    fives = held_x[held_y == 5]
    threes = np.flatnonzero(held_y == 3)
    swapped = held_x.copy()
    swapped[threes] = fives[np.arange(len(threes)) % len(fives)]
    share = len(threes) / len(held_y)
    moved = classifier_compare(classify, held_x, swapped)
    assert moved["agreement"] == pytest.approx(1 - share, abs=0.01)
    assert moved["histogram_tv_points"] == pytest.approx(100 * share, abs=1.0)

    rng = np.random.default_rng(3)
    drowned = np.clip(0.3 * held_x + 0.95 * rng.standard_normal(held_x.shape), -1, 1).astype(np.float32)
    worse = classifier_compare(classify, held_x, drowned)
    assert worse["confidence_drop_points"] > 20 and worse["agreement"] < moved["agreement"]


@pytest.mark.skipif(not (WEIGHTS / "ddpm_digits" / "model_index.json").exists(),
                    reason="models/weights/ddpm_digits/ is not committed yet: python tools/train_ddpm_digits.py")
def test_the_committed_pipeline_samples_digits(classifier):
    """The trained DDPMPipeline loads from disk and samples: deterministic for a seed (DDIM, eta 0), in
    [-1, 1], and after a short run its images are digits the classifier is sure of."""
    pytest.importorskip("diffusers", reason="the diffusion extra")
    digits, classify = classifier
    pipeline = digits.load_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    assert type(pipeline.scheduler).__name__ == "DDIMScheduler"
    a = digits.sample(pipeline, 2, seed=7, steps=4)
    b = digits.sample(pipeline, 2, seed=7, steps=4)
    assert a.shape == (2, 1, 32, 32) and a.dtype == np.float32 and -1 <= a.min() and a.max() <= 1
    assert np.isinf(psnr(a, b)).all()  # same seed, same images
    images = digits.sample(pipeline, 16, seed=0, steps=10)
    summary = classifier_summary(classify(images))
    assert summary["mean_confidence"] > 0.7 and sum(c > 0 for c in summary["histogram_counts"]) >= 5
