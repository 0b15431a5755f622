"""Structure-aware distillation of SS2D models (edgelr.train.structured) on models/fusion.py's TINY detector: each
term is 0 for a copy of the teacher and positive once the student moves; a weight of 0 removes its term; the
projections start from the channels the student kept; L_SVD's gradient moves a pair's product towards the
teacher's truncated SVD; a reduced student's blocks get closer to the teacher's with feat and state alone."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from edgelr.errors import EdgelrError
from edgelr.train.lowrank import LowRankLinear
from edgelr.train.ss2d import keep_channels
from edgelr.train.structured import (
    TERMS,
    StructureAwareLoss,
    StructuredDistillConfig,
    distill_ss2d,
    recover_kept_channels,
    reduced_copy,
    truncated_svd,
)
from models.fusion import TINY, FusionDetector, detection_loss
from models.fusion_data import batch, training_rng

BLOCK = "stages.0.blocks.0.ss2d"
ONLY = {term: 0.0 for term in TERMS}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def batches():
    scenes = [batch(training_rng(seed), 8) for seed in range(5)]
    return [(torch.from_numpy(rgb), torch.from_numpy(thermal), truths) for rgb, thermal, truths in scenes]


@pytest.fixture()
def teacher():
    torch.manual_seed(0)
    return FusionDetector(TINY).eval()


def task(model, scenes):
    return detection_loss(model, *scenes)


def config(steps: int = 40, **weights) -> StructuredDistillConfig:
    """Every term off but those given."""
    return StructuredDistillConfig(steps=steps, lr=3e-3, **{**ONLY, **weights})


def test_a_copy_of_the_teacher_has_every_term_at_zero_until_it_moves(teacher, batches):
    student = copy.deepcopy(teacher)
    block = student.get_submodule(BLOCK)
    block.in_proj = LowRankLinear.from_dense(block.in_proj, 16)  # full rank: the same function, as a pair
    loss = StructureAwareLoss(teacher, student.eval(), config(svd=1.0, state=1.0, feat=1.0))
    _, terms = loss(batches[0])
    assert loss.initialised == ["identity", "identity"] and [p for p, _, _ in loss.pairs] == [f"{BLOCK}.in_proj"]
    assert terms["svd"] < 1e-10 and terms["state"] < 1e-9 and terms["feat"] < 1e-9
    with torch.no_grad():
        block.x_proj_weight.add_(0.1 * torch.randn_like(block.x_proj_weight))
        block.in_proj.up.weight.add_(0.1 * torch.randn_like(block.in_proj.up.weight))
    _, moved = loss(batches[0])
    loss.close()
    assert moved["svd"] > 1e-3 and moved["state"] > 1e-3 and moved["feat"] > 1e-3

    block.in_proj = LowRankLinear.from_dense(teacher.get_submodule(BLOCK).in_proj, 5)  # plain SVD: its product is W_5
    loss = StructureAwareLoss(teacher, student, config(svd=1.0))
    assert loss.svd_term().item() < 1e-10
    loss.close()

    # the loop itself: a plain copy in train mode (sequential scan, BatchNorm statistics frozen) starts at 0
    report = distill_ss2d(teacher, copy.deepcopy(teacher), iter(batches), config(svd=0.5, state=0.1, feat=1.5,
                                                                                   steps=1), progress=False)
    first = report["first"]
    assert report["steps"] == 1 and first["svd"] == 0 and first["state"] < 1e-9 and first["feat"] < 1e-9


def test_a_weight_of_zero_removes_its_term(teacher, batches):
    student, _ = reduced_copy(teacher, batches[0][:2], states=2, width=0.67, params=0.5)
    weights = {"task": 1.0, "svd": 0.5, "state": 0.1, "feat": 1.5}
    for off in TERMS:
        on = {**weights, off: 0.0}
        loss = StructureAwareLoss(teacher, student.eval(), config(**on), task_loss=task)
        total, terms = loss(batches[0])
        loss.close()
        assert set(terms) == set(TERMS) - {off} and all(value > 0 for value in terms.values())
        assert total.item() == pytest.approx(sum(on[t] * v for t, v in terms.items()), rel=1e-5)
        assert (len(loss.projections) == 0) == (off == "state") and (not loss.pairs) == (off == "svd")
    report = distill_ss2d(teacher, student, iter(batches), config(task=1.0, feat=1.5, steps=2), task_loss=task,
                          progress=False)
    assert report["first"]["svd"] is None and report["first"]["state"] is None and report["terms"] == ["task", "feat"]
    # without a task_loss the task term is not computed; with nothing left to lower, nothing runs
    with pytest.raises(EdgelrError, match="switched off"):
        StructureAwareLoss(teacher, student, config(task=1.0))
    with pytest.raises(EdgelrError, match="weight svd=-1"):
        config(svd=-1.0)


def test_projections_start_from_the_kept_channels(teacher, batches):
    student = copy.deepcopy(teacher)
    block, x = student.get_submodule(BLOCK), torch.randn(4, 8, 8, TINY.widths[0])
    kept = keep_channels(block, 20, x)
    assert torch.equal(recover_kept_channels(teacher.get_submodule(BLOCK), block), kept)
    loss = StructureAwareLoss(teacher, student.eval(), config(state=1.0))
    projection = loss.projections[0].detach()
    assert loss.initialised[0] == "kept channels" and torch.equal(projection.argmax(1), kept)
    assert torch.equal(projection.sum(1), torch.ones(20))
    loss.close()

    with torch.no_grad():  # trained since: the channels are still known by their origin
        block.conv2d.weight.add_(1e-3 * torch.randn_like(block.conv2d.weight))
    assert torch.equal(recover_kept_channels(teacher.get_submodule(BLOCK), block), kept)
    block.channel_origin = block.channel_origin + 1000  # built some other way: fitted by least squares
    assert recover_kept_channels(teacher.get_submodule(BLOCK), block) is None
    loss = StructureAwareLoss(teacher, student, config(state=1.0))
    _, fitted = loss(batches[0])
    loss.close()
    assert loss.initialised[0] == "least squares" and loss.projections[0].detach().abs().sum() > 0
    assert fitted["state"] < 0.5  # a zero projection scores about 1


def test_svd_gradient_moves_the_product_towards_the_truncated_svd(teacher, batches):
    student, report = reduced_copy(teacher, batches[0][:2], width=0.67, params=0.5)
    loss = StructureAwareLoss(teacher, student, config(svd=1.0))
    pairs = {path: (pair, target) for path, pair, target in loss.pairs}
    assert f"{BLOCK}.in_proj" in pairs and not loss.skipped_pairs
    # the reduced block's pair stands for the teacher rows of the channels it kept (x and gate)
    kept = recover_kept_channels(teacher.get_submodule(BLOCK), student.get_submodule(BLOCK))
    original = teacher.get_submodule(BLOCK)
    rows = torch.cat([kept, original.d_inner + kept])
    pair, target = pairs[f"{BLOCK}.in_proj"]
    rank = report[BLOCK]["ranks"]["in_proj"]
    assert pair.down.out_features == rank and target.shape == (2 * len(kept), original.d_model)
    assert torch.allclose(target, truncated_svd(original.in_proj.weight[rows], rank))

    def distances():
        with torch.no_grad():
            return [(p.up.weight @ p.down.weight - t).norm().item() for p, t in pairs.values()]

    before = distances()
    assert min(before) > 0  # factorize_module whitens: its product is not the plain truncated SVD
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        loss.svd_term().backward()
        optimizer.step()
    loss.close()
    assert all(after < b for after, b in zip(distances(), before))


def test_a_reduced_student_gets_closer_to_the_teacher_blocks(teacher, batches):
    student, _ = reduced_copy(teacher, batches[0][:2], states=2, width=0.67, params=0.5)
    held = batches[-1]

    def held_out_feat():
        probe = StructureAwareLoss(teacher, student.eval(), config(feat=1.0))
        with torch.no_grad():
            value = probe(held)[1]["feat"]
        probe.close()
        return value

    before = held_out_feat()
    report = distill_ss2d(teacher, student, itertools.cycle(batches[:-1]), config(state=0.1, feat=1.5),
                          progress=False)
    assert report["steps"] == 40 and set(report["projections"].values()) == {"kept channels"}
    assert report["last"]["feat"] < 0.8 * report["first"]["feat"]
    assert report["last"]["state"] < report["first"]["state"]
    assert held_out_feat() < before
    assert not student.training  # given back in the mode it came in (eval, from the probe)
