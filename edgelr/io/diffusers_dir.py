"""Diffusers pipeline folders (what `pipeline.save_pretrained(DIR)` writes): recognise one, name its components,
load a component's torch module with every weight checked.

    pipe = read_pipeline_dir("runs/sd")        # model_index.json read, nothing imported: EdgelrError if not a pipeline
    pipe.class_name, pipe.kind                 # "StableDiffusionPipeline", "text-to-image"
    pipe.components["unet"]                    # Component(name, library, class_name, path, role="denoiser")
    unet = load_component(pipe.components["unet"])   # the torch module; EdgelrError naming any weight not loaded

A component whose checkpoint does not hold all of its module's weights (a checkpoint saved under another
transformers release with renamed keys, a truncated file) is an error here: loaded anyway, the missing
weights would be random, and an exporter would write that random model without complaint.

diffusers (and transformers, for text encoders) are needed only to load components: the `diffusion` extra.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from edgelr.errors import EdgelrError

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"

# a component's role, by its name in model_index.json (diffusers' own names for them)
ROLES = {"unet": "denoiser", "transformer": "denoiser", "prior": "denoiser", "vae": "vae",
         "text_encoder": "text_encoder", "text_encoder_2": "text_encoder", "text_encoder_3": "text_encoder",
         "tokenizer": "tokenizer", "tokenizer_2": "tokenizer", "tokenizer_3": "tokenizer", "scheduler": "scheduler",
         "safety_checker": "safety_checker", "feature_extractor": "feature_extractor",
         "image_encoder": "image_encoder"}


@dataclass(frozen=True)
class Component:
    name: str          # its key in model_index.json, and its subfolder
    library: str       # the module its class comes from: "diffusers", "transformers", or the user's own
    class_name: str
    path: Path
    role: str          # denoiser | vae | text_encoder | tokenizer | scheduler | ... | other

    @property
    def qualified_class(self) -> str:
        return f"{self.library}.{self.class_name}"


@dataclass(frozen=True)
class PipelineDir:
    path: Path
    class_name: str                          # model_index.json's _class_name, e.g. "DDPMPipeline"
    components: dict[str, Component] = field(default_factory=dict)
    index: dict = field(default_factory=dict)

    @property
    def denoiser(self) -> Component:
        return next(c for c in self.components.values() if c.role == "denoiser")

    @property
    def kind(self) -> str:
        """"text-to-image" (a denoiser conditioned on a text encoder's output), or "unconditional"."""
        return "text-to-image" if any(c.role == "text_encoder" for c in self.components.values()) else "unconditional"

    def scheduler_config(self) -> dict:
        path = self.components["scheduler"].path / SCHEDULER_CONFIG
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EdgelrError(f"{path}: not a readable scheduler config ({exc}); "
                              "save the pipeline again with save_pretrained") from None


def is_pipeline_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MODEL_INDEX).is_file()


def read_pipeline_dir(path: str | os.PathLike) -> PipelineDir:
    """The pipeline saved in folder `path` (its model_index.json and component folders); EdgelrError otherwise."""
    path = Path(path)
    if not path.exists():
        raise EdgelrError(f"{path}: no such folder; give a diffusers pipeline folder (one with {MODEL_INDEX})")
    if not path.is_dir():
        raise EdgelrError(f"{path}: is a file, not a diffusers pipeline folder")
    index_path = path / MODEL_INDEX
    if not index_path.is_file():
        raise EdgelrError(f"{path}: not a diffusers pipeline folder (no {MODEL_INDEX}); give the folder that "
                          "pipeline.save_pretrained() wrote, or an ONNX file")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgelrError(f"{index_path}: not readable JSON ({exc}); save the pipeline again with save_pretrained") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise EdgelrError(f"{index_path}: has no _class_name; not a diffusers pipeline's {MODEL_INDEX}")
    components = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue  # _class_name, _diffusers_version, and components saved as None (a safety checker left out)
        library, class_name = entry
        folder = path / name
        if not folder.is_dir():
            raise EdgelrError(f"{path}: {MODEL_INDEX} names component '{name}' ({class_name}) but there is no "
                              f"folder '{name}'; copy the whole pipeline folder")
        role = ROLES.get(name) or _role_by_class(class_name)
        components[name] = Component(name, library, class_name, folder, role)
    if not any(c.role == "denoiser" for c in components.values()):
        raise EdgelrError(f"{path}: the pipeline ({index['_class_name']}) has no denoiser (unet or transformer) "
                          f"among its components ({', '.join(components) or 'none'})")
    if "scheduler" not in components:
        raise EdgelrError(f"{path}: the pipeline ({index['_class_name']}) has no scheduler folder")
    return PipelineDir(path, index["_class_name"], components, index)


def _role_by_class(class_name: str) -> str:
    name = class_name.lower()
    for key, role in (("unet", "denoiser"), ("transformer2d", "denoiser"), ("autoencoder", "vae"),
                      ("textmodel", "text_encoder"), ("tokenizer", "tokenizer"), ("scheduler", "scheduler")):
        if key in name:
            return role
    return "other"


@contextlib.contextmanager
def quiet_libraries():
    """diffusers', transformers' and optimum's logs at error level, and their Python warnings off (progress bars,
    'accelerate is not installed', tracer warnings): edgelr says what matters in its own words."""
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # read once, when diffusers is first imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "optimum", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def import_diffusers():
    """diffusers, or one EdgelrError saying how to install it."""
    try:
        with quiet_libraries():
            import diffusers
            from diffusers.utils import logging as dlogging

            dlogging.disable_progress_bar()
    except ImportError as exc:
        raise EdgelrError(f"diffusers pipelines need the diffusion extra ({exc}); "
                          "pip install 'edgelr[diffusion]'") from None
    return diffusers


def component_class(component: Component) -> type:
    import_diffusers()
    try:
        module = importlib.import_module(component.library)
        return getattr(module, component.class_name)
    except (ImportError, AttributeError) as exc:
        raise EdgelrError(f"{component.path}: component '{component.name}' is a {component.qualified_class}, which "
                          f"cannot be imported here ({type(exc).__name__}: {exc}); install the package that "
                          "defines it") from None


def load_component(component: Component):
    """The torch module of a model component (eval mode), every weight loaded from its checkpoint."""
    cls = component_class(component)
    try:
        with quiet_libraries():
            model, info = cls.from_pretrained(component.path, output_loading_info=True)
    except EdgelrError:
        raise
    except Exception as exc:  # noqa: BLE001  (diffusers/transformers raise many types for a broken checkpoint)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise EdgelrError(f"{component.path}: component '{component.name}' ({component.class_name}) does not load "
                          f"({type(exc).__name__}: {first[:300]}); is its checkpoint complete?") from None
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        unexpected = list(info.get("unexpected_keys") or [])
        example = missing[0] if missing else mismatched[0][0] if isinstance(mismatched[0], tuple) else mismatched[0]
        found = f", while the checkpoint has e.g. '{unexpected[0]}'" if unexpected else ""
        raise EdgelrError(f"{component.path}: {len(missing) + len(mismatched)} of {component.class_name}'s weights are "
                          f"not in its checkpoint (e.g. '{example}'{found}); exported, they would be random. Was it "
                          f"saved by another {component.library} release? Load and save it again with this one")
    return model.eval()
