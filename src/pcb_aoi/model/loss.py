"""Training targets and losses for the CenterNet-style detector in ``network.py``."""
from __future__ import annotations

import torch
from torchvision.ops import generalized_box_iou_loss


def build_targets(boxes: list[torch.Tensor], labels: list[torch.Tensor], num_classes: int, h: int, w: int,
                  stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image boxes (N, 4) xyxy px and labels (N,) -> heat (B, K, h, w), box targets (B, 4, h, w),
    box weights (B, h, w).

    Heat is a Gaussian per box, 1 at the box's centre cell. The 3x3 cells around the centre regress
    the box, weighted by the Gaussian so that the centre dominates; smaller boxes win overlaps.
    """
    B = len(boxes)
    heat = torch.zeros(B, num_classes, h, w)
    target = torch.zeros(B, 4, h, w)
    weight = torch.zeros(B, h, w)
    gy = (torch.arange(h, dtype=torch.float32) + 0.5).view(h, 1)
    gx = (torch.arange(w, dtype=torch.float32) + 0.5).view(1, w)
    for b in range(B):
        if len(boxes[b]) == 0:
            continue
        area = (boxes[b][:, 2] - boxes[b][:, 0]) * (boxes[b][:, 3] - boxes[b][:, 1])
        for j in area.argsort(descending=True).tolist():
            x1, y1, x2, y2 = (boxes[b][j] / stride).tolist()
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            sx, sy = max((x2 - x1) / 6, 0.5), max((y2 - y1) / 6, 0.5)  # box = +-3 sigma
            g = torch.exp(-((gx - cx) ** 2) / (2 * sx * sx) - ((gy - cy) ** 2) / (2 * sy * sy))
            k = int(labels[b][j])
            ix, iy = min(int(cx), w - 1), min(int(cy), h - 1)
            heat[b, k] = torch.maximum(heat[b, k], g)
            heat[b, k, iy, ix] = 1.0
            ys, xs = slice(max(iy - 1, 0), iy + 2), slice(max(ix - 1, 0), ix + 2)
            weight[b, ys, xs] = g[ys, xs]
            weight[b, iy, ix] = 1.0
            target[b, :, ys, xs] = boxes[b][j].view(4, 1, 1)
    return heat, target, weight


def focal_loss(logits: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (Law & Deng 2018), normalised by the number of objects.

    Hand-written because torchvision's ``sigmoid_focal_loss`` has no Gaussian penalty reduction,
    which is what lets neighbours of a centre cell not be punished as hard negatives.
    """
    p = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    pos_loss = torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = torch.log(1 - p) * p**2 * (1 - heat) ** 4 * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


def box_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """GIoU loss over cells with weight > 0; pred/target (B, 4, h, w) xyxy px, weight (B, h, w)."""
    m = weight > 0
    if not m.any():
        return pred.sum() * 0.0
    p = pred.permute(0, 2, 3, 1)[m]
    t = target.permute(0, 2, 3, 1)[m]
    return (generalized_box_iou_loss(p, t, reduction="none") * weight[m]).sum() / weight[m].sum()
