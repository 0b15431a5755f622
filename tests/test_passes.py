"""The pass interface: configs select their pass by type, passes run under onnx-ir's own pass manager,
and a pass refuses a model it cannot work on before it changes anything."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest

import edgelr.api  # noqa: F401  (registers the latency search)
from edgelr.demo import build_model
from edgelr.errors import EdgelrError
from edgelr.graph.lowrank_pair import find_pairs
from edgelr.io import model as model_io
from edgelr.passes.base import CONFIGS, Context, make_pass
from edgelr.passes.factorize import FactorizeConfig, FactorizePass
from edgelr.passes.prune import PruneConfig, PrunePass
from edgelr.passes.quantize import QuantizeConfig, QuantizePass
from edgelr.passes.refit import RefitConfig
from edgelr.search.latency import LatencySearchPass


@pytest.fixture()
def context(tmp_path):
    onnx.save(build_model(), tmp_path / "m.onnx")
    return Context(tmp_path / "m.onnx", None, None, tmp_path, path=tmp_path / "m.onnx", progress=False)


def test_configs_select_their_pass_by_type(context):
    assert isinstance(make_pass(FactorizeConfig(params=0.5), context), FactorizePass)
    assert type(make_pass(FactorizeConfig(latency=0.5), context)) is LatencySearchPass
    assert isinstance(make_pass(PruneConfig(ratio=0.25), context), PrunePass)
    assert isinstance(make_pass(QuantizeConfig("int8-dynamic"), context), QuantizePass)
    assert set(CONFIGS) >= {"factorize", "prune", "quantize", "refit"}


def test_passes_run_under_onnx_irs_pass_manager(context):
    model = model_io.load(context.source)
    params = sum(v.const_value.size for v in model.graph.initializers.values())
    passes = ir.passes.PassManager([make_pass(PruneConfig(ratio=0.25), context),
                                    make_pass(FactorizeConfig(params=0.5), context)])
    result = passes(model)
    assert result.modified and result.model is model
    assert sum(v.const_value.size for v in model.graph.initializers.values()) < params
    assert context.factorized.result.factorized and context.pruned["groups_pruned"] > 0
    pairs = find_pairs(model.graph)  # the low-rank pair is a named construct, found without knowing node names
    assert sorted(p.layer for p in pairs) == sorted(r.name for r in context.factorized.result.factorized)
    assert all(p.down.outputs[0] in p.up.inputs for p in pairs)


def test_a_refit_without_a_factorization_is_refused_before_it_runs(context):
    model = model_io.load(context.source)
    with pytest.raises(ir.passes.PreconditionError) as err:
        make_pass(RefitConfig(), context)(model)
    assert isinstance(err.value.__cause__, EdgelrError) and "factorize pass before it" in str(err.value.__cause__)


@pytest.mark.parametrize("bad,field", [(lambda: FactorizeConfig(params=2.0), "params"),
                                       (lambda: PruneConfig(ratio=1.0), "ratio"),
                                       (lambda: QuantizeConfig("int4"), "scheme"),
                                       (lambda: QuantizeConfig("int8", activations="fp8"), "activations")])
def test_python_errors_name_the_config_field(bad, field):
    with pytest.raises(EdgelrError, match=rf"^{field}\b"):
        bad()


def test_fp16_and_sparsity_run_as_passes(context):
    """The export-time transforms are passes too: a recipe can ask for them."""
    from edgelr.passes.fp16 import Fp16Config
    from edgelr.passes.sparsity import SparsityConfig

    model = model_io.load(context.source)
    done = make_pass(SparsityConfig(), context)(model)
    assert done.modified and done.result["layers"] > 0
    weights = [v.const_value.numpy() for v in model.graph.initializers.values() if v.const_value.numpy().ndim == 4]
    assert any((w == 0).mean() >= 0.5 for w in weights)  # two of every four
    half = make_pass(Fp16Config(), context)(model_io.load(context.source))
    assert half.modified and any(v.dtype == ir.DataType.FLOAT16 for v in half.model.graph.initializers.values())
    assert [v.dtype for v in half.model.graph.inputs] == [ir.DataType.FLOAT]  # the interface stays fp32
