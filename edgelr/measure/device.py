"""Timing on a device over SSH, for the latency search: who the device is, and batches of models timed there.

    device = DeviceTimer(Device("pi@raspberrypi.local")).connect()   # asks the device what it is (one ssh call)
    device.identity      # {"machine": "aarch64", "cpu": "Raspberry Pi 5 Model B Rev 1.0", "onnxruntime": "1.19.2", ...}
    device.layers({key: (model_bytes, feed)}, threads=4)       # -> {key: Timing}, each model timed alone
    device.interleaved_timing({name: path}, feed, threads=4)   # -> Timing, as edgelr.measure.latency's, there

Each batch is one `ssh` call: a tar stream (runner.py, a manifest, the models and their inputs) unpacked into a
temp folder on the device, `runner.py --batch` run there (JSON lines, a keep-alive per model timed), the folder
removed. Timings are judged here as local ones are (spread, LAYER_LEEWAY, retries): the device only times.
The identity names no unit (no host name, no serial), so devices alike share one latency table.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import onnx

from edgelr.errors import EdgelrError
from edgelr.measure import runner
from edgelr.measure.latency import LAYER_LEEWAY, RETRIES, Timing, spread, steadiest
from edgelr.measure.remote import Device, command_line, run_runner

RUNNER = Path(runner.__file__)
# Unpacks the batch into a temp folder, times it, and removes the folder however the runner ends.
_BATCH = r"""
set -e
d=$(mktemp -d /tmp/edgelr.XXXXXXXX)
trap 'rm -rf -- "$d"' EXIT
trap 'exit 129' HUP INT TERM
tar -x -f - -C "$d"
cd "$d"
"$1" -u runner.py --batch manifest.json
"""


class DeviceTimer:
    """A device the latency search times on: ONNX Runtime CPU there, with the threads asked for."""

    def __init__(self, device: Device, python: str = "python3"):
        self.device, self.python = device, python
        self.identity: dict | None = None  # what the device said it is (connect)
        self.batches = 0  # ssh round trips that timed something

    def connect(self) -> DeviceTimer:
        """Ask the device what it is (one ssh call, once): an unreachable one, or one without onnxruntime, fails here."""
        if self.identity is None:
            self.identity = run_runner(self.device, command_line([self.python, "-", "--identity"]),
                                       "asking the device what it is", self.python, stdin_path=RUNNER)["identity"]
        return self

    @property
    def runtime(self) -> str:
        """The latency tables' name for this kind of device: a digest of its identity."""
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()
        return f"device-{digest[:12]}"

    def describe(self, threads: int) -> str:
        i = self.identity
        return (f"{self.device.host} ({i['machine']}, {i['cpu']}, onnxruntime {i['onnxruntime']}, "
                f"{threads} thread{'s' if threads != 1 else ''})")

    def record(self, threads: int) -> dict:
        """What a report says of where the search timed: the host, the identity, the round trips it took."""
        return {"host": self.device.host} | self.identity | {"threads": threads, "batches": self.batches}

    def settings(self, target) -> tuple[int, str | None]:
        """The threads to time with (the target's, else 1), and a warning where the device is not the target's kind."""
        if target is None:
            return 1, None
        if target.is_tensorrt or target.arch != self.identity["machine"]:
            return target.threads, (f"latency timed on {self.describe(target.threads)}, not on {target.name} "
                                    f"({target.arch}, {target.backend}): its ranks suit that device's kernels")
        return target.threads, None

    def layers(self, models: dict[str, tuple[bytes, dict]], threads: int) -> dict[str, Timing]:
        """Each (serialized model, feed) timed alone, as edgelr.search.tables times a layer here: the ones that
        spread too widely go again in another batch, up to RETRIES times; each keeps its steadiest timing."""
        best: dict[str, Timing] = {}
        todo = list(models)
        for _ in range(RETRIES + 1):
            ids = {str(i): key for i, key in enumerate(todo)}
            found = self._batch({"layers": {i: models[key] for i, key in ids.items()}}, threads)["layers"]
            for i, key in ids.items():
                timing = Timing({"layer": float(np.median(found[i]))}, spread(found[i]), LAYER_LEEWAY)
                best[key] = min(best.get(key, timing), timing, key=lambda t: t.spread)
            todo = [key for key in todo if not best[key].stable]
            if not todo:
                break
        return best

    def interleaved_timing(self, models: dict, feed: dict, threads: int = 1, rounds: int = 30, per_round: int = 3,
                           warmup: int = 5, retries: int = RETRIES) -> Timing:
        """edgelr.measure.latency.interleaved_timing on the device: each model (a path) timed A B C A B C ...,
        the whole measurement again (another batch) while the spread is over SPREAD_LIMIT."""
        job = {"models": {name: _readable(Path(path)) for name, path in models.items()},
               "feed": feed, "runs": rounds * per_round, "warmup": warmup}

        def once() -> Timing:
            times = self._batch({"interleaved": job}, threads)["interleaved"]
            return Timing({name: float(np.median(t)) for name, t in times.items()}, max(spread(t) for t in times.values()))

        return steadiest(once, retries)

    def _batch(self, jobs: dict, threads: int) -> dict:
        """One ssh call: `jobs` ("layers": {id: (bytes, feed)}, "interleaved": {"models", "feed", "runs",
        "warmup"}) shipped as one tar stream and timed by runner.run_batch; its seconds per run."""
        manifest: dict = {"threads": int(threads)}
        files: dict[str, bytes] = {"runner.py": RUNNER.read_bytes()}
        if jobs.get("layers"):
            arrays = {}
            manifest["layers"], manifest["layer_inputs"] = [], "layers.npz"
            for i, (model, feed) in jobs["layers"].items():
                (name, array), = feed.items()  # a layer alone has one input
                files[f"layers/{i}.onnx"], arrays[i] = _readable(model), array
                manifest["layers"].append({"id": i, "model": f"layers/{i}.onnx", "input": name})
            files["layers.npz"] = _npz(arrays)
        if jobs.get("interleaved"):
            job = jobs["interleaved"]
            paths = {name: f"models/{n}.onnx" for n, name in enumerate(job["models"])}
            files.update({paths[name]: data for name, data in job["models"].items()})
            files["inputs.npz"] = _npz(job["feed"])
            manifest["interleaved"] = {"models": paths, "inputs": "inputs.npz", "runs": job["runs"],
                                       "warmup": job["warmup"]}
        files["manifest.json"] = json.dumps(manifest).encode()
        with tempfile.TemporaryDirectory(prefix="edgelr-batch-") as tmp:
            archive = Path(tmp) / "batch.tar"
            with tarfile.open(archive, "w") as tar:
                for name, data in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            said = run_runner(self.device, command_line(["sh", "-c", _BATCH, "edgelr", self.python]),
                              "timing models on the device", self.python, stdin_path=archive)
        self.batches += 1
        return said["batch"]


def _readable(model: bytes | Path) -> bytes:
    """The model (serialized, or a file with its external data) in one piece, with the lowest IR version its
    opsets allow: a device's older onnxruntime refuses an IR version newer than it knows (1.19 reads up to
    10) even where nothing in the model needs it."""
    proto = onnx.load(model) if isinstance(model, Path) else onnx.load_from_string(model)
    lowest = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    if isinstance(model, bytes) and proto.ir_version <= lowest:
        return model
    proto.ir_version = min(proto.ir_version, lowest)
    try:
        return proto.SerializeToString()
    except ValueError as exc:  # protobuf's 2 GB limit
        raise EdgelrError(f"a model too large to time on a device in one piece ({exc})") from None


def _npz(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(a) for name, a in arrays.items()})
    return buffer.getvalue()
