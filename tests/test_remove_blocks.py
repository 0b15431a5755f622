"""Block removal: residual blocks found from their Add in exported graphs, removed exactly (the ONNX model
with a block removed computes what the torch model with that branch switched off does), chosen by measured
sensitivity, and bad requests refused in one line."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from torch import nn

from edgelr.api import compress
from edgelr.errors import EdgelrError
from edgelr.graph.residual import remove_branches, residual_branches
from edgelr.io.model import load, ort_session
from edgelr.passes.remove_blocks import RemoveBlocksConfig, remove_blocks
from models.data import yolo_path


class Block(nn.Module):
    """y = shortcut(x) + f(x); `off` switches the branch off (what removing it in ONNX must compute)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.shortcut = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)
        self.off = False

    def forward(self, x):
        return self.shortcut(x) if self.off else self.shortcut(x) + self.f(x)


class Attention(nn.Module):
    """A token mixer with a residual: x + softmax(q kᵀ) v, on the flattened map."""

    def __init__(self, c: int):
        super().__init__()
        self.qkv, self.out = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.off = False

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        if not self.off:
            q, k, v = self.qkv(t).chunk(3, dim=-1)
            t = t + self.out(torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1) @ v)
        return t.transpose(1, 2).reshape(b, c, h, w)


class Net(nn.Module):
    """Three residual blocks (identity skip, conv shortcut, attention) and a feature-pyramid merge (two paths from
    different stages added: not a block)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([Block(8, 8), Block(8, 16), Attention(16)])
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.lateral = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        x = stem = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.lateral(x) + nn.functional.interpolate(self.down(stem), scale_factor=2.0)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    torch.manual_seed(0)
    model = Net().eval()
    path = tmp_path_factory.mktemp("blocks") / "net.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), str(path), input_names=["x"], output_names=["y"], dynamo=False)
    return model, path


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    with ort_session(model) as session:
        return session.run(None, {"x": x})[0]


def test_blocks_are_found_and_removed_exactly(net):
    torch_model, path = net
    found = residual_branches(load(path))
    assert len(found) == 3, [b.name for b in found]  # the pyramid merge is not a block
    assert [b.params for b in found] == [2 * (8 * 8 * 9 + 8), 8 * 16 * 9 + 16 + 16 * 16 * 9 + 16, 16 * 48 + 48 + 16 * 16 + 16]
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    for i, block in enumerate(found):
        model = load(path)
        remove_branches(model, [block])
        torch_model.blocks[i].off = True
        with torch.no_grad():
            want = torch_model(torch.from_numpy(x)).numpy()
        torch_model.blocks[i].off = False
        np.testing.assert_allclose(_run(model, x), want, rtol=1e-5, atol=1e-5)
        assert len(list(model.graph)) < len(list(load(path).graph))


def test_the_least_sensitive_block_goes_first(net, tmp_path):
    _, path = net
    x = np.random.default_rng(2).standard_normal((6, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    reference = {}
    for block in residual_branches(load(path)):
        model = load(path)
        remove_branches(model, [block])
        got, want = _run(model, x[:1]), _run(load(path), x[:1])
        reference[block.name] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    done = compress(path, tmp_path / "out.onnx", [RemoveBlocksConfig(count=1, keep_first=0)], calib=tmp_path / "calib.npz",
                    max_output_error=float("inf"), progress=False)
    result = done.blocks_removed
    assert result["removed"] == [min(result["sensitivity"], key=result["sensitivity"].get)]
    assert min(reference, key=reference.get) == result["removed"][0]  # the same ranking as measured by hand
    assert len(residual_branches(load(tmp_path / "out.onnx"))) == 2


def test_max_error_removes_while_the_error_stays_within(net):
    _, path = net
    model = load(path)
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    want = _run(load(path), x)

    def judge(candidate: ir.Model) -> float:
        got = _run(candidate, x)
        return float(np.linalg.norm(got - want) / np.linalg.norm(want))

    errors = remove_blocks(load(path), RemoveBlocksConfig(count=3, keep_first=0), judge, progress=False).sensitivity
    limit = sorted(errors.values())[1] * 1.01  # room for the least sensitive one or two, not all three
    result = remove_blocks(model, RemoveBlocksConfig(max_error=limit, keep_first=0), judge, progress=False)
    assert result.removed and result.error <= limit and judge(model) == pytest.approx(result.error)
    assert len(result.removed) < 3


def test_yolo_bottlenecks_are_the_blocks():
    model = load(yolo_path())
    found = residual_branches(model)
    # YOLOv8n's backbone C2f bottlenecks add their input back (shortcut=True); the neck's do not
    assert [b.name for b in found] == ["/model.2/m.0", "/model.4/m.0", "/model.4/m.1", "/model.6/m.0", "/model.6/m.1",
                                       "/model.8/m.0"]
    remove_branches(model, [found[-1]])
    x = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    with ort_session(model) as session:
        assert session.run(None, {"images": x})[0].shape == (1, 22, 2100)


@pytest.mark.parametrize("config, message", [
    ({"count": 1, "blocks": ("a",)}, "give exactly one of blocks"),
    ({}, "give exactly one of blocks"),
    ({"count": 0}, "at least 1"),
    ({"max_error": 0}, "must be above 0"),
    ({"count": 1, "keep_first": 1.0}, "keep_first"),
])
def test_bad_configs_are_one_line(config, message):
    with pytest.raises(EdgelrError, match=message):
        RemoveBlocksConfig(**config)


def test_unknown_names_and_models_without_blocks_are_refused(net, tmp_path):
    _, path = net
    with pytest.raises(EdgelrError, match=r"no residual block named /nope; the blocks are: /blocks\.0"):
        remove_blocks(load(path), RemoveBlocksConfig(blocks=("/nope",)))
    with pytest.raises(EdgelrError, match=r"count 3: only 2 blocks may be removed \(3 found, the first 1 kept by keep_first\)"):
        remove_blocks(load(path), RemoveBlocksConfig(count=3, keep_first=0.3), lambda m: 0.0, progress=False)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    torch.onnx.export(plain, (torch.randn(1, 3, 8, 8),), str(tmp_path / "plain.onnx"), dynamo=False)
    with pytest.raises(EdgelrError, match=r"no residual block \(y = x \+ f\(x\)\) found"):
        remove_blocks(load(tmp_path / "plain.onnx"), RemoveBlocksConfig(count=1))


def test_a_diffusion_unets_blocks_are_its_resnets_and_attentions(tmp_path):
    """The exported UNet's GroupNorms end in x * gamma + beta, beta through an Identity of a weight: an Add of a
    constant, not a block."""
    pytest.importorskip("diffusers")
    from edgelr.deploy.pipeline import export_pipeline
    from models import diffusion_tiny

    exported = export_pipeline(diffusion_tiny.save_ddpm(tmp_path / "ddpm"), "x86-cpu", tmp_path / "out", progress=False)
    unet = load(exported.out_dir / "unet" / "model.onnx")
    found = residual_branches(unet)
    assert found and all("/resnets." in b.name or "/attentions." in b.name for b in found), [b.name for b in found]
    feed = {"sample": np.zeros((1, 3, 16, 16), np.float32), "timestep": np.array([10], np.int64)}
    for block in found:
        model = load(exported.out_dir / "unet" / "model.onnx")
        remove_branches(model, [block])
        with ort_session(model) as session:
            assert session.run(None, feed)[0].shape == (1, 3, 16, 16)
