"""Recipes: YAML lists of pass configs. The flag form and the recipe form of a job write the same bytes,
a recipe round-trips through YAML, and a bad recipe is refused, before anything runs, with one line
naming the file and line."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgelr.api import compress, flag_passes
from edgelr.cli import main
from edgelr.errors import EdgelrError
from edgelr.passes.base import config_from_dict
from edgelr.passes.factorize import FactorizeConfig
from edgelr.passes.prune import PruneConfig
from edgelr.passes.quantize import QuantizeConfig
from edgelr.passes.refit import RefitConfig
from edgelr.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def edgelr(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelr", "-q", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def edgelr_here(capsys, *args) -> subprocess.CompletedProcess:
    """The command in this process (a crash would raise here: the CLI only catches EdgelrError)."""
    capsys.readouterr()
    code = main(["-q", *map(str, args)])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_shipped_recipes_load_validate_and_round_trip():
    shipped = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(shipped) >= 3
    for path in shipped:
        recipe = load_recipe(path)
        recipe.check(calibrated=True)
        again = Recipe.from_yaml(recipe.to_yaml())
        assert again == recipe and again.to_yaml() == recipe.to_yaml()


def test_flags_stand_for_the_shipped_recipes():
    assert load_recipe(ROOT / "recipes" / "yolov8n-params50.yaml").passes == tuple(
        flag_passes(FactorizeConfig(params=0.5)))
    assert load_recipe(ROOT / "recipes" / "yolov8n-latency50-int8.yaml").passes == tuple(
        flag_passes(FactorizeConfig(latency=0.5), quantize="int8"))
    assert load_recipe(ROOT / "recipes" / "yolov8n-prune25-params60.yaml").passes == tuple(
        flag_passes(FactorizeConfig(params=0.6), prune=0.25))


def test_flag_order_refits_static_int8_after_quantizing_and_others_before():
    kinds = [c.kind for c in flag_passes(FactorizeConfig(params=0.5), quantize="int8")]
    assert kinds == ["factorize", "quantize", "refit"]
    kinds = [c.kind for c in flag_passes(FactorizeConfig(params=0.5), quantize="int8-dynamic")]
    assert kinds == ["factorize", "refit", "quantize"]
    assert [c.kind for c in flag_passes(FactorizeConfig(params=0.5), calibrated=False)] == ["factorize"]
    assert [c.kind for c in flag_passes(None, quantize="int8")] == ["factorize", "quantize"]  # dense: nothing to refit


def test_a_recipe_names_its_task_metric_and_floor(demo):
    """metric/floor in a recipe round-trip, and gate the result as --metric/--floor do: a classify floor of 1.0
    (every decision the same) on a half-size model is refused and nothing is written."""
    recipe = Recipe.from_yaml("metric: classify\nfloor: 1.0\npasses:\n- {_type: factorize, params: 0.2}\n")
    assert (recipe.metric, recipe.floor) == ("classify", 1.0) and Recipe.from_yaml(recipe.to_yaml()) == recipe
    with pytest.raises(EdgelrError, match="top-1 agreement .* below the floor"):
        compress(demo / "m.onnx", demo / "t.onnx", recipe, calib=demo / "calib.npz", progress=False)
    assert not (demo / "t.onnx").exists()


def test_every_config_round_trips_through_its_dict():
    configs = [FactorizeConfig(params=0.5, ranks={"a": 8}, conv_form="channel"), PruneConfig(ratio=0.3, multiple=4),
               QuantizeConfig(scheme="int8-dynamic", keep_float=("n1", "n2")), RefitConfig()]
    for config in configs:
        assert config_from_dict(config.to_dict()) == config
    recipe = Recipe(tuple(configs), "rpi5")
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


@pytest.mark.slow
# pruning without fine-tuning moves the demo's logits by 0.71: over the default ceiling, so it is raised
@pytest.mark.parametrize("flags", [["--params", "0.5"], ["--prune", "0.25", "--params", "0.6", "--max-output-error", "0.8"],
                                   ["--params", "0.5", "--quantize", "int8"]])
def test_recipe_writes_the_same_bytes_as_the_flags(demo, flags):
    flag_run = edgelr("compress", demo / "m.onnx", "-o", demo / "flags.onnx", *flags, "--calib", demo / "calib.npz",
                      "--write-recipe", demo / "r.yaml")
    assert flag_run.returncode == 0, flag_run.stderr
    recipe_run = edgelr("compress", demo / "m.onnx", "-o", demo / "recipe.onnx", "--recipe", demo / "r.yaml",
                        "--calib", demo / "calib.npz")
    assert recipe_run.returncode == 0, recipe_run.stderr
    assert (demo / "flags.onnx").read_bytes() == (demo / "recipe.onnx").read_bytes()
    assert flag_run.stdout.splitlines()[:-1] == recipe_run.stdout.splitlines()[:-1]  # all but the timing line


def test_the_api_takes_a_recipe_or_a_list(demo):
    recipe = Recipe((FactorizeConfig(params=0.5), RefitConfig()))
    a = compress(demo / "m.onnx", demo / "a.onnx", recipe, calib=demo / "calib.npz", progress=False)
    b = compress(demo / "m.onnx", demo / "b.onnx", list(recipe.passes), calib=demo / "calib.npz", progress=False)
    c = compress(demo / "m.onnx", demo / "c.onnx", FactorizeConfig(params=0.5), calib=demo / "calib.npz", progress=False)
    assert (demo / "a.onnx").read_bytes() == (demo / "b.onnx").read_bytes() == (demo / "c.onnx").read_bytes()
    assert a.passes == b.passes == c.passes == [r.to_dict() for r in recipe.passes]
    with pytest.raises(EdgelrError, match="sugar"):
        compress(demo / "m.onnx", demo / "d.onnx", recipe, calib=demo / "calib.npz", quantize="int8", progress=False)


BAD = [
    ("unknown-pass", "passes:\n- {_type: factorise, params: 0.5}\n", ":2:", "unknown pass 'factorise'"),
    ("unknown-field", "passes:\n- _type: factorize\n  params: 0.5\n  budget: 3\n", ":4:", "no field 'budget'"),
    ("wrong-type", "passes:\n- _type: factorize\n  params: half\n", ":3:", "expected"),
    ("bad-value", "passes:\n- {_type: factorize, params: 1.5}\n", ":2:", "(0, 1]"),
    ("bool-for-number", "passes:\n- {_type: prune, ratio: true}\n", ":2:", "expected a number"),
    ("no-passes", "target: rpi5\n", ":1:", "'passes'"),
    ("top-level-key", "passes:\n- {_type: refit}\nstages: []\n", ":3:", "unknown key 'stages'"),
    ("not-yaml", "passes: [\n", ":", "not valid YAML"),
    ("wrong-version", "passes:\n- {_type: factorize, _version: 7, params: 0.5}\n", ":2:", "version 7"),
    ("refit-first", "passes:\n- {_type: refit}\n- {_type: factorize, params: 0.5}\n", ":2:", "factorize pass before it"),
    ("needs-calibration", "passes:\n- {_type: factorize, params: 0.5}\n- {_type: quantize, scheme: int8}\n", ":3:",
     "needs calibration data"),
    ("refit-after-dynamic", "passes:\n- {_type: factorize, params: 0.5}\n- {_type: quantize, scheme: int8-dynamic}\n"
     "- {_type: refit}\n", ":4:", "before the quantize pass"),
    ("unknown-metric", "metric: detection\npasses:\n- {_type: factorize, params: 0.5}\n", ":1:", "detect, classify"),
    ("floor-out-of-range", "metric: classify\nfloor: 1.5\npasses:\n- {_type: factorize, params: 0.5}\n", ":2:",
     "(0, 1]"),
    ("quantize-twice", "passes:\n- {_type: quantize, scheme: int8-dynamic}\n- {_type: quantize, scheme: int8-dynamic}\n",
     ":2:", "twice"),
]


@pytest.mark.parametrize("name,text,line,message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_recipe_is_one_line_naming_its_line(demo, capsys, name, text, line, message):
    (demo / "r.yaml").write_text(text)
    calib = [] if name == "needs-calibration" else ["--calib", demo / "calib.npz"]
    run = edgelr_here(capsys, "compress", demo / "m.onnx", "-o", demo / "o.onnx", "--recipe", demo / "r.yaml", *calib)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and f"r.yaml{line}" in lines[0] and message in lines[0], run.stderr
    assert not (demo / "o.onnx").exists()


def test_recipe_and_flags_together_are_refused(demo, capsys):
    (demo / "r.yaml").write_text("passes:\n- {_type: factorize, params: 0.5}\n")
    run = edgelr_here(capsys, "compress", demo / "m.onnx", "-o", demo / "o.onnx", "--recipe", demo / "r.yaml", "--params", "0.5")
    assert run.returncode == 1 and "--recipe gives the passes" in run.stderr
    run = edgelr_here(capsys, "compress", demo / "m.onnx", "-o", demo / "o.onnx", "--recipe", demo / "missing.yaml")
    assert run.returncode == 1 and "recipe not found" in run.stderr


def test_write_recipe_never_overwrites(demo, capsys):
    (demo / "r.yaml").write_text("mine\n")
    run = edgelr_here(capsys, "compress", demo / "m.onnx", "-o", demo / "o.onnx", "--params", "0.5", "--write-recipe", demo / "r.yaml")
    assert run.returncode == 1 and "exists" in run.stderr
    assert (demo / "r.yaml").read_text() == "mine\n" and not (demo / "o.onnx").exists()


@pytest.mark.parametrize("target,activations", [("rpi5", "int8"), ("x86-cpu", "uint8"), (None, "uint8")])
def test_the_target_sets_the_activation_type(demo, target, activations):
    """--target picks what the device's runtime runs fast (the same function TensorRT export asks)."""
    done = compress(demo / "m.onnx", demo / "q.onnx", FactorizeConfig(params=0.5), calib=demo / "calib.npz",
                    quantize="int8", target=target, progress=False)
    assert done.quantized["activations"] == activations and done.target == target
    recipe = Recipe((FactorizeConfig(params=0.5), QuantizeConfig("int8")), target)
    assert Recipe.from_yaml(recipe.to_yaml()).target == target


def test_an_unknown_target_is_refused_before_any_work(demo, capsys):
    run = edgelr_here(capsys, "compress", demo / "m.onnx", "-o", demo / "o.onnx", "--params", "0.5", "--target", "pi9")
    assert run.returncode == 1 and "unknown target 'pi9'" in run.stderr and not (demo / "o.onnx").exists()


def test_a_recipe_can_distill_between_passes(demo, capsys):
    """compress -> distill -> quantize as one recipe: the distill pass trains the factorized model towards
    the model as given, on the calibration samples, and the quantize pass gets the trained model."""
    pytest.importorskip("torch")
    if importlib.util.find_spec("onnx2torch") is None:
        pytest.skip("needs onnx2torch (pip install onnx2torch --no-deps)")
    (demo / "r.yaml").write_text("passes:\n- {_type: factorize, params: 0.5}\n- {_type: distill, steps: 2, batch: 4}\n"
                                 "- {_type: quantize, scheme: int8}\n")
    run = edgelr_here(capsys, "compress", demo / "m.onnx", "-o", demo / "o.onnx", "--recipe", demo / "r.yaml",
                      "--calib", demo / "calib.npz", "--float-output", demo / "f.onnx", "--report", demo / "r.json")
    assert run.returncode == 0, run.stderr
    assert "distilled 2 steps" in run.stdout and "quantized" in run.stdout
    report = json.loads((demo / "r.json").read_text())
    assert [p["_type"] for p in report["passes"]] == ["factorize", "distill", "quantize"]
    assert report["distilled"]["steps"] == 2 and report["output_error"]["worst"] < 0.5
    assert (demo / "f.onnx").is_file()
