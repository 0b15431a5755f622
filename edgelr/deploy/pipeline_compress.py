"""An exported diffusion pipeline with its denoiser compressed: judged by the images it makes, written as a new
pipeline folder. The verb is edgelr.api.compress_pipeline; this module holds its pipeline-side pieces:

- `read_exported(folder)`: an `edgelr export PIPELINE_DIR` folder (manifest.json with its components), or
  one EdgelrError line saying what the folder is instead (a diffusers folder not yet exported, anything else).
- `ImageJudge`: generates images with fixed seeds (the same initial and per-step noise for every model it
  judges) with the pipeline's own denoiser once, as the reference, then with any other denoiser in its place;
  `compare(model)` gives PSNR and SSIM of those images against the reference's (edgelr.measure.image_quality,
  images in [0, 1]); `judge(model)` is the error a block-removal pass ranks blocks by (Context.block_judge):
  1 - mean SSIM over the images of whole sampling runs, so a block's error is counted as it compounds over
  the steps, not as one step's output.
- `capture_distill_data(pipe, folder, ...)`: the training set of a distillation, the teacher's own trajectories
  (many runs, no images needed), and a held-out set from other seeds, as .npz files a distill pass reads.
- `write_compressed(export_dir, out_dir, unet_file, record)`: the exported folder copied whole with the
  compressed denoiser in place and the manifest saying what was done (the files' hashes redone); staged beside
  OUT_DIR and renamed into place once the staged folder has generated the judged images again.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgelr.deploy.files import file_entry, whole_folder
from edgelr.deploy.pipeline_engine import copy_without_engines, without_engines
from edgelr.deploy.pipeline_run import MANIFEST, OnnxDiffusionPipeline
from edgelr.errors import EdgelrError
from edgelr.io import model as model_io
from edgelr.measure.image_quality import pixel_summary

DENOISER = "unet"
BLOCK_JUDGE = "1 - mean SSIM of the images of whole sampling runs (ImageJudge's seeds and steps)"
JUDGE_SEED = 10_000  # the images are judged from seeds JUDGE_SEED, JUDGE_SEED + 1, ...: none a calibration seed
# a distillation trains on the runs of seeds DISTILL_SEED, DISTILL_SEED + 1, ... and is evaluated on those from
# HELDOUT_SEED on: neither a calibration nor a judged seed
DISTILL_SEED, HELDOUT_SEED = 50_000, 60_000
DISTILL_SEEDS = 32  # runs; at 50 steps, 1,600 denoiser inputs
DISTILL_SAMPLES = 2048  # denoiser inputs kept for training, at most
HELDOUT_SAMPLES = 256


@dataclass(frozen=True)
class ExportedPipeline:
    path: Path
    manifest: dict

    @property
    def denoiser(self) -> Path:
        return self.path / self.manifest["components"][DENOISER]["file"]

    @property
    def conditional(self) -> bool:
        return bool(self.manifest["run"]["conditional"])


def read_exported(folder: str | os.PathLike) -> ExportedPipeline:
    """The exported pipeline in FOLDER; EdgelrError (one line) if FOLDER is not one."""
    path = Path(folder)
    if not path.is_dir():
        raise EdgelrError(f"{path}: no such folder; give a folder that `edgelr export PIPELINE_DIR` wrote")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        if (path / "model_index.json").is_file():
            raise EdgelrError(f"{path}: a diffusers pipeline folder, not an exported one; export it first "
                              f"(edgelr export {path} --target x86-cpu -o OUT), then compress OUT")
        raise EdgelrError(f"{path}: not an exported diffusion pipeline (no {MANIFEST}); give a folder that "
                          "`edgelr export PIPELINE_DIR` wrote, or an ONNX file")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgelrError(f"{manifest_path}: not readable JSON ({exc}); export the pipeline again") from None
    if not isinstance(manifest, dict) or "pipeline" not in manifest or not isinstance(manifest.get("run"), dict):
        raise EdgelrError(f"{path}: its {MANIFEST} is not a diffusion pipeline's (an ONNX Runtime bundle?); give a "
                          "folder that `edgelr export PIPELINE_DIR` wrote")
    component = manifest.get("components", {}).get(DENOISER)
    if not isinstance(component, dict) or not (path / component.get("file", "")).is_file():
        raise EdgelrError(f"{path}: the manifest names no denoiser file that is there ({DENOISER}/model.onnx); "
                          "export the pipeline again")
    return ExportedPipeline(path, manifest)


class ImageJudge:
    """Images from fixed seeds with the pipeline's own denoiser (the reference), and with others in its place."""

    def __init__(self, pipe: OnnxDiffusionPipeline, *, seeds: Sequence[int], steps: int,
                 prompts: Sequence[str] | None = None, guidance: float = 7.5, threads: int | None = None):
        if not seeds:
            raise EdgelrError("images: judge on at least one image")
        self.pipe, self.seeds, self.steps, self.guidance = pipe, tuple(seeds), steps, guidance
        self.prompts = list(prompts) if pipe.conditional else None
        self.threads = threads if threads is not None else pipe.manifest.get("threads") or 1
        self.reference = self.generate()
        self.judged: list[dict] = []  # every judge() call's image measures, in order

    def generate(self, pipe: OnnxDiffusionPipeline | None = None, seeds: Sequence[int] | None = None) -> np.ndarray:
        """Images (N, C, H, W) in [0, 1] from the judge's seeds (or SEEDS): for each seed, every prompt (or one
        image)."""
        pipe = pipe or self.pipe
        out = [pipe(self.prompts, steps=self.steps, guidance=self.guidance, seed=seed) if self.prompts is not None
               else pipe(None, steps=self.steps, batch=1, seed=seed) for seed in (seeds or self.seeds)]
        return np.concatenate(out).transpose(0, 3, 1, 2)

    def images(self, model: ir.Model | str | os.PathLike) -> np.ndarray:
        """The judge's images with MODEL as the denoiser."""
        original = self.pipe.unet
        with model_io.ort_session(model, threads=self.threads) as session:
            self.pipe.unet = session
            try:
                return self.generate()
            finally:
                self.pipe.unet = original

    def compare(self, model: ir.Model | str | os.PathLike) -> dict:
        """PSNR and SSIM of MODEL's images against the reference's (edgelr.measure.image_quality.pixel_summary)."""
        return image_measures(self.reference, self.images(model))

    def judge(self, model: ir.Model) -> float:
        """1 - mean SSIM of MODEL's images against the reference's: lower is better, 0 the same images; inf for
        a model ONNX Runtime cannot load or run (such a candidate is never chosen)."""
        try:
            found = self.compare(model)
        except Exception as exc:  # noqa: BLE001  (ORT raises its own types)
            self.judged.append({"error": f"ONNX Runtime cannot run it ({model_io.first_line(exc)})"})
            return float("inf")
        self.judged.append(found)
        return 1.0 - found["ssim_mean"]

    def describe(self) -> dict:
        return {"seeds": list(self.seeds), "steps": self.steps, "images": len(self.reference),
                "prompts": self.prompts, "guidance": self.guidance if self.prompts is not None else None}


@dataclass(frozen=True)
class DistillData:
    train: Path  # .npz of denoiser inputs, as a distill pass's data
    heldout: Path
    summary: dict  # "train" and "heldout": each one's Trajectories.summary()


def capture_distill_data(pipe: OnnxDiffusionPipeline, folder: Path, *, seeds: int, steps: int,
                         prompts: Sequence[str] | None, guidance: float, samples: int) -> DistillData:
    """The teacher's own trajectories in FOLDER: SEEDS runs (at most SAMPLES inputs) to train on, and
    max(2, SEEDS // 8) runs of other seeds (at most HELDOUT_SAMPLES) held out. The targets are what the
    teacher makes of these inputs, so no images are needed and any number of runs can be drawn."""
    from edgelr.calibration.trajectories import capture_trajectories

    sets = {name: capture_trajectories(pipe, seeds=range(first, first + runs), steps=steps, prompts=prompts,
                                       guidance=guidance, samples=kept)
            for name, first, runs, kept in (("train", DISTILL_SEED, seeds, samples),
                                            ("heldout", HELDOUT_SEED, max(2, seeds // 8), min(HELDOUT_SAMPLES, samples)))}
    return DistillData(sets["train"].save(folder / "distill-train.npz"), sets["heldout"].save(folder / "distill-heldout.npz"),
                       {name: traj.summary() for name, traj in sets.items()})


def image_measures(reference: np.ndarray, test: np.ndarray) -> dict:
    """PSNR and SSIM (mean, median, worst) of TEST's images against REFERENCE's, both (N, C, H, W) in [0, 1]."""
    return pixel_summary(reference, test, value_range=(0.0, 1.0))


def float_params(model: ir.Model | str | os.PathLike) -> int:
    """Weights of a model: elements of its float initializers (quantized weights count as their integers)."""
    model = model if isinstance(model, ir.Model) else ir.load(str(model))
    return int(sum(np.prod(v.const_value.shape.numpy(), dtype=np.int64)
                   for v in model.graph.initializers.values() if v.const_value is not None))


def file_bytes(model_file: Path) -> int:
    """Bytes of a model file and its external data beside it (NAME.data, or optimum's NAME_data)."""
    return sum(p.stat().st_size for p in (model_file, Path(f"{model_file}.data"), Path(f"{model_file}_data"))
               if p.is_file())


def write_compressed(source: ExportedPipeline, out_dir: Path, unet_file: Path, record: dict,
                     judge: ImageJudge | None = None, expected: np.ndarray | None = None) -> dict:
    """OUT_DIR: SOURCE's folder with UNET_FILE (and its .data) as the denoiser and RECORD as the manifest's
    "compression"; with JUDGE and EXPECTED, the staged folder must generate EXPECTED's first seed's images
    again before it moves into place. Returns the manifest written."""
    try:
        with whole_folder(out_dir) as stage:
            copy_without_engines(source.path, stage)  # an engine of the replaced denoiser would ship stale
            target = stage / source.manifest["components"][DENOISER]["file"]
            for old in target.parent.glob(target.name + "*"):  # the model and its external data (.data, _data)
                old.unlink()
            shutil.copyfile(unet_file, target)
            data = Path(str(unet_file) + ".data")
            if data.exists():
                shutil.copyfile(data, Path(str(target) + ".data"))
            manifest = without_engines(json.loads(json.dumps(source.manifest)), out_dir)
            unet = manifest["components"][DENOISER]
            unet["parity"]["of"] = "the exported original, against torch (before edgelr compress)"
            unet["compressed"] = {k: record[k] for k in ("passes", "params_before", "params_after", "bytes_before",
                                                         "bytes_after")}
            if "compression" in manifest:  # compressed before: that record goes along
                record = {**record, "previous": manifest["compression"]}
            manifest["compression"] = record
            manifest["files"] = {str(p.relative_to(stage)): file_entry(p) for p in sorted(stage.rglob("*"))
                                 if p.is_file() and p.name != MANIFEST}
            (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            if judge is not None and expected is not None:
                _check_staged(stage, judge, expected)
    except OSError as exc:
        raise EdgelrError(f"{out_dir}: could not write the pipeline folder ({exc.strerror or exc}); "
                          "check the free space and permissions there") from None
    return manifest


def _check_staged(stage: Path, judge: ImageJudge, expected: np.ndarray) -> None:
    """The staged folder, loaded as a device would, makes the judged images of the first seed."""
    try:
        pipe = OnnxDiffusionPipeline(stage, threads=judge.threads)
        first = judge.generate(pipe, judge.seeds[:1])
    except Exception as exc:  # noqa: BLE001  (ORT's errors for a model it cannot load or run)
        raise EdgelrError(f"{stage.name}: not written: the compressed pipeline does not run in ONNX Runtime "
                          f"({type(exc).__name__}: {model_io.first_line(exc)})") from None
    if not np.allclose(first, expected[:len(first)], atol=1e-5):
        raise EdgelrError(f"{stage.name}: not written: the folder's pipeline does not make the images judged "
                          f"(max difference {np.abs(first - expected[:len(first)]).max():.2e})")

