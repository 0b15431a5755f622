"""A small VMamba-style RGB + thermal object detector, to compress and distil (issue 21).

    model = FusionDetector(DEFAULT)                  # TINY trains in seconds, for tests
    loss = detection_loss(model, rgb, thermal, truths)          # truths: models.fusion_data.Truth
    outputs = model(rgb, thermal)                    # (B, 4 + classes, cells): cx, cy, w, h pixels, class scores
    detections = decode(outputs)                     # per image: edgelr.measure.detection.Detections
    map50(detections, truths)

Each modality has its own stem (two stride-2 convs; thermal, one channel, gets half the width); the two are
concatenated, fused by a 1x1 conv and a residual conv block at stride 4. Then stages of VSS blocks
(VMamba's: x + SS2D(LN(x)), x + MLP(LN(x)), channels last, SS2D from edgelr.train.ss2d), each opened by a
stride-2 conv: at stride 8 and 16 by default (64 and 16 tokens on 64 x 64: a scan at stride 4 would cost
most of a training step). The head reads every stage on the stride-8 grid (coarser ones repeated up,
concatenated, 1x1 conv) and each of its cells (8 x 8 on 64 x 64) predicts one box, as distances to its
four sides, and sigmoid class scores: anchor-free, as YOLOv8 and FCOS. The output has YOLOv8's layout, so
edgelr.measure.detection decodes it and judges a compressed copy against the original
(detection_agreement) as it does any YOLOv8 export.

Training assigns each object to the cell holding its centre and to the cells within one stride of it whose
centres lie inside its box (FCOS's centre sampling; a cell claimed twice goes to the smaller object), and
lowers BCE on the class scores plus GIoU and L1 on the positive cells' boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgelr.measure.detection import Detections, average_precisions, decode_yolo
from edgelr.train.ss2d import SS2D
from models.fusion_data import CLASSES, SIZE, Truth

# The initial class score (RetinaNet's prior): most cells hold nothing, so start them near 0.
PRIOR = 0.01
# Loss weights: class BCE, 1 - GIoU, L1 of the box sides in strides.
CLASS_WEIGHT, GIOU_WEIGHT, L1_WEIGHT = 1.0, 2.0, 1.0


@dataclass(frozen=True)
class FusionConfig:
    """Widths and depths. The SS2D stages run at strides 8, 16, ...; the head at stride 8 (STRIDE)."""

    size: int = SIZE
    classes: int = len(CLASSES)
    stem: tuple[int, int] = (16, 32)           # the RGB stem's two convs; thermal's are half as wide
    fused: int = 48                            # channels after fusion, at stride 4
    widths: tuple[int, ...] = (64, 96)         # channels of each SS2D stage
    depths: tuple[int, ...] = (2, 1)           # VSS blocks in each stage
    d_state: int = 16
    mlp_ratio: float = 2.0
    head_width: int = 64

    @property
    def cells(self) -> int:
        """Cells per side of the head's grid."""
        return self.size // STRIDE


STRIDE = 8
DEFAULT = FusionConfig()
TINY = FusionConfig(stem=(8, 16), fused=16, widths=(16, 32), depths=(1, 1), d_state=4, mlp_ratio=1.0, head_width=16)


def conv(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv, BatchNorm, SiLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


class ResidualConv(nn.Module):
    """x + conv(conv(x)): local shape features at stride 4, where a scan over 256 tokens would cost the most."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv(channels, channels), conv(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class VSSBlock(nn.Module):
    """VMamba's block on (B, h, w, C): x + SS2D(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, d_state: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        self.ss2d = SS2D(dim, d_state=d_state)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ss2d(self.norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Stage(nn.Module):
    """A stride-2 conv, then VSS blocks; (B, C, h, w) in and out."""

    def __init__(self, c_in: int, c_out: int, depth: int, d_state: int, mlp_ratio: float):
        super().__init__()
        self.down = conv(c_in, c_out, 3, 2)
        self.blocks = nn.Sequential(*(VSSBlock(c_out, d_state, mlp_ratio) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.down(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FusionDetector(nn.Module):
    """rgb (B, 3, size, size) and thermal (B, 1, size, size) in 0..1 -> (B, 4 + classes, cells): per cell its
    box (cx, cy, w, h in pixels) and class scores (sigmoid), cells in row order.

    The SS2D blocks scan sequentially in training mode and in chunks in eval mode: the same function, but a
    DEFAULT training step through the sequential loop's small per-token tensors is ~5x faster on CPU, and
    the chunked scan exports ~4x fewer nodes (895, not 3691). Exporting puts the model in eval mode."""

    def __init__(self, config: FusionConfig = DEFAULT):
        super().__init__()
        self.config = config
        s0, s1 = config.stem
        self.rgb_stem = nn.Sequential(conv(3, s0, 3, 2), conv(s0, s1, 3, 2))
        self.thermal_stem = nn.Sequential(conv(1, s0 // 2, 3, 2), conv(s0 // 2, s1 // 2, 3, 2))
        self.fuse = nn.Sequential(conv(s1 + s1 // 2, config.fused, 1), ResidualConv(config.fused))
        widths = (config.fused, *config.widths)
        self.stages = nn.ModuleList(Stage(widths[i], widths[i + 1], depth, config.d_state, config.mlp_ratio)
                                    for i, depth in enumerate(config.depths))
        w = config.head_width
        self.neck = conv(sum(config.widths), w, 1)
        self.box_head = nn.Sequential(conv(w, w), nn.Conv2d(w, 4, 1))
        self.class_head = nn.Sequential(conv(w, w), nn.Conv2d(w, config.classes, 1))
        nn.init.constant_(self.class_head[-1].bias, float(np.log(PRIOR / (1 - PRIOR))))
        centre = (torch.arange(config.cells, dtype=torch.float32) + 0.5) * STRIDE
        y, x = torch.meshgrid(centre, centre, indexing="ij")
        self.register_buffer("anchors", torch.stack([x.flatten(), y.flatten()], -1), persistent=False)
        self.train()

    def train(self, mode: bool = True) -> FusionDetector:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, SS2D):
                module.scan = "sequential" if mode else "chunked"
        return self

    def predict(self, rgb: torch.Tensor, thermal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes (B, cells, 4) xyxy pixels and class logits (B, cells, classes): what the loss reads."""
        x = self.fuse(torch.cat([self.rgb_stem(rgb), self.thermal_stem(thermal)], 1))
        features = []
        for i, stage in enumerate(self.stages):  # each later stage's coarser cells repeated onto the head's grid
            x = stage(x)
            features.append(F.interpolate(x, scale_factor=2 ** i, mode="nearest") if i else x)
        x = self.neck(torch.cat(features, 1))
        sides = F.softplus(self.box_head(x)).flatten(2).transpose(1, 2) * STRIDE
        boxes = torch.cat([self.anchors - sides[..., :2], self.anchors + sides[..., 2:]], -1)
        return boxes, self.class_head(x).flatten(2).transpose(1, 2)

    def forward(self, rgb: torch.Tensor, thermal: torch.Tensor) -> torch.Tensor:
        boxes, logits = self.predict(rgb, thermal)
        xywh = torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], -1)
        return torch.cat([xywh, logits.sigmoid()], -1).transpose(1, 2)


# --- training ---------------------------------------------------------------------------------------
def assign(anchors: np.ndarray, stride: int, truths: Sequence[Truth]) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's object: target boxes (B, cells, 4) and classes (B, cells), -1 where the cell is
    negative. Positive: the cell holding an object's centre, and cells within one stride of the centre
    whose centres lie inside the box; a cell claimed by two objects goes to the smaller one."""
    boxes = np.zeros((len(truths), len(anchors), 4), np.float32)
    classes = np.full((len(truths), len(anchors)), -1, np.int64)
    for i, truth in enumerate(truths):
        if not len(truth.classes):
            continue
        gt = truth.boxes
        centre = (gt[:, :2] + gt[:, 2:]) / 2                                          # (K, 2)
        inside = ((anchors[None] > gt[:, None, :2]) & (anchors[None] < gt[:, None, 2:])).all(-1)
        near = (np.abs(anchors[None] - centre[:, None]) < stride).all(-1)
        home = (np.floor(anchors / stride)[None] == np.floor(centre / stride)[:, None]).all(-1)
        claims = (inside & near) | home                                               # (K, cells)
        area = np.prod(gt[:, 2:] - gt[:, :2], axis=1)
        owner = np.where(claims, area[:, None], np.inf).argmin(0)                     # (cells,)
        positive = claims.any(0)
        boxes[i, positive] = gt[owner[positive]]
        classes[i, positive] = truth.classes[owner[positive]]
    return boxes, classes


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of matching rows of xyxy boxes a and b (N, 4)."""
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    inter = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0).prod(1)
    union = area_a + area_b - inter
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).prod(1)
    return inter / union - (hull - union) / hull


def detection_loss(model: FusionDetector, rgb: torch.Tensor, thermal: torch.Tensor,
                   truths: Sequence[Truth]) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss and its parts: class BCE summed over all cells and classes, 1 - GIoU and L1 (box
    sides in strides) summed over positive cells, each divided by the number of positive cells."""
    boxes, logits = model.predict(rgb, thermal)
    target_boxes, target_classes = (torch.from_numpy(t).to(logits.device)
                                    for t in assign(model.anchors.cpu().numpy(), STRIDE, truths))
    positive = target_classes >= 0
    count = max(int(positive.sum()), 1)
    class_target = F.one_hot(target_classes.clamp(min=0), logits.shape[-1]).float() * positive[..., None]
    class_loss = F.binary_cross_entropy_with_logits(logits, class_target, reduction="sum") / count
    mine, wanted = boxes[positive], target_boxes[positive]
    giou_loss = (1 - generalized_iou(mine, wanted)).sum() / count
    l1_loss = (mine - wanted).abs().sum() / (count * STRIDE)
    loss = CLASS_WEIGHT * class_loss + GIOU_WEIGHT * giou_loss + L1_WEIGHT * l1_loss
    return loss, {"class": class_loss.item(), "giou": giou_loss.item(), "l1": l1_loss.item()}


# --- evaluation -------------------------------------------------------------------------------------
def decode(outputs: torch.Tensor | np.ndarray, conf: float = 0.25, iou: float = 0.45) -> list[Detections]:
    """Per image: the cells whose best class score is > conf, after class-aware NMS at `iou`."""
    if isinstance(outputs, torch.Tensor):
        outputs = outputs.detach().cpu().numpy()
    return decode_yolo(outputs, conf, iou)


def class_ap50(predictions: Sequence[Detections], truths: Sequence[Truth]) -> dict[int, float]:
    """Class id -> AP at IoU 0.5 against the ground truth (COCO's 101-point AP, edgelr.measure.detection),
    for each class present in it."""
    reference = [Detections(t.boxes, np.ones(len(t.classes), np.float32), t.classes) for t in truths]
    return average_precisions(reference, list(predictions))


def map50(predictions: Sequence[Detections], truths: Sequence[Truth]) -> float:
    """mAP at IoU 0.5: class_ap50 averaged over the classes present in the ground truth; nan when no image
    holds any object."""
    aps = class_ap50(predictions, truths)
    return float(np.mean(list(aps.values()))) if aps else float("nan")
