"""Export: one verb takes a model to a device's format, as a folder of files to copy there.

    done = export("small.onnx", "rpi5", "bundle/")                   # ORT-format bundle for a Raspberry Pi 5
    done = export("small.onnx", "rtx", "engine/", calib="data.npz")  # TensorRT for RTX engine
    done = export("small.onnx", "rpi5", "bundle/", to="pi@raspberrypi.local:yolo")   # and run it there

The target (a file under targets/, or the user's own .toml) picks the backend: `ort_bundle` writes the
ONNX Runtime bundle (model, reduced-operator build config, reference outputs, run.py), `tensorrt` builds
an engine. The folder appears complete or not at all: it is written beside OUT_DIR and renamed into place.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from edgelr.deploy.files import whole_folder
from edgelr.deploy.targets import Target, load_target
from edgelr.errors import EdgelrError
from edgelr.io import model as model_io
from edgelr.io.samples import load_samples
from edgelr.io.shapes import resolve_shapes

MANIFEST = "manifest.json"


@dataclass
class ExportResult:
    target: Target
    out_dir: Path
    manifest: dict
    seconds: float
    remote: dict | None = None  # run.py's JSON from the device (with `to`)
    destination: str | None = None  # USER@HOST:PATH it was copied to
    inputs: str | None = None  # the input sizes and where they came from (edgelr.io.shapes.InputSizes.describe)


@dataclass(frozen=True)
class SshOptions:
    port: int | None = None
    identity: Path | None = None
    known_hosts: Path | None = None
    timeout: float = 60
    python: str = "python3"


def export(
    model: str | os.PathLike,
    target: str | Target,
    out_dir: str | os.PathLike,
    *,
    calib: str | os.PathLike | None = None,
    precision: str | None = None,
    shapes: dict | None = None,
    threads: int | None = None,
    to: str | None = None,
    ssh: SshOptions = SshOptions(),
    sparsity: str | None = None,
    progress: bool = True,
) -> ExportResult:
    """Write the deployable folder for TARGET into OUT_DIR; with `to`, copy it to the device and run it.

    calib: sample inputs (.npz): reference outputs, INT8 calibration, sizes of dynamic dims.
    precision: the deployed model's numeric format (fp32, fp16, int8); default the target's.
    shapes: input name -> (min, opt, max) (edgelr.io.shapes.parse_shapes); default the target file's [shapes].
        Dynamic dims are sized by `calib`, else `shapes`, else the model's own metadata (Ultralytics' imgsz);
        without any of them, one EdgelrError line naming --shapes, before anything is written.
    threads: intra-op threads on the device (ONNX Runtime targets); default the target's.
    """
    start = time.perf_counter()
    target = target if isinstance(target, Target) else load_target(target)
    model_path = Path(model)
    if sparsity is not None and not target.is_tensorrt:
        raise EdgelrError(f"--sparsity {sparsity}: 2:4 sparse weights run on TensorRT targets (NVIDIA GPUs), not on "
                          f"'{target.name}' ({target.backend})")
    if threads is not None:
        if target.is_tensorrt:
            raise EdgelrError(f"--threads {threads}: target '{target.name}' runs TensorRT on a GPU, which takes no "
                              "thread count; threads are for ONNX Runtime targets")
        if threads < 1:
            raise EdgelrError(f"--threads {threads}: need threads >= 1")
        target = dataclasses.replace(target, threads=threads)
    if precision not in (None, target.precision) and not target.is_tensorrt:
        raise EdgelrError(f"--precision {precision}: target '{target.name}' runs the model's own precision with ONNX "
                          "Runtime; quantize it first (edgelr compress --quantize int8) and export that")
    if to is not None:  # a bad destination fails before any work
        from edgelr.measure.remote import split_destination

        host, dest = split_destination(to)
    loaded = model_io.load(model_path)  # a clear error for a missing or broken model, before any work
    out_dir = model_io.check_output_folder(out_dir, model_path, calib, manifest=MANIFEST)
    samples = load_samples(calib, loaded) if calib is not None else None
    shapes = shapes or target.shapes or None
    # every input's size, before any work: --calib, --shapes, the model's metadata, else one line naming --shapes
    sizes = resolve_shapes(loaded, samples=samples, shapes=shapes, where=model_path)
    del loaded
    device = None
    if to is not None:
        from edgelr.measure.remote import Device

        device = Device(host, port=ssh.port, identity=ssh.identity, known_hosts=ssh.known_hosts, timeout=ssh.timeout)
        device.run("true", "connecting")  # unreachable, wrong host key, no access: say so before building

    try:
        with whole_folder(out_dir) as stage:
            manifest = _write(model_path, target, stage, samples, precision, shapes, sparsity, progress)
    except OSError as exc:
        raise EdgelrError(f"{out_dir}: could not write the bundle ({exc.strerror or exc}); "
                          "check the free space and permissions there") from None
    done = ExportResult(target, out_dir, manifest, time.perf_counter() - start, inputs=sizes.describe())
    if device is not None:
        from edgelr.measure.remote import copy_bundle, run_bundle

        copy_bundle(device, out_dir, dest)
        done.destination = f"{device.host}:{dest}"
        if not target.is_tensorrt:  # an engine needs the GPU's own runtime; the ORT bundle runs anywhere
            done.remote = run_bundle(device, dest, ssh.python)
    return done



def _write(model_path: Path, target: Target, stage: Path, samples, precision, shapes, sparsity, progress) -> dict:
    if target.is_tensorrt:
        from edgelr.deploy.tensorrt import (
            build_engine,
            default_timing_cache,
            tensorrt_module,
        )

        return build_engine(model_path, target, stage, samples, precision=precision, shapes=shapes, progress=progress,
                            timing_cache=default_timing_cache(tensorrt_module(target)), sparsity=sparsity)
    from edgelr.deploy.ort_bundle import write_ort_bundle

    return write_ort_bundle(model_path, target, stage, samples.feed(0) if samples is not None else None, shapes=shapes,
                            progress=progress)
