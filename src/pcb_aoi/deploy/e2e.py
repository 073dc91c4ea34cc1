"""The detector plus its decoding (peaks, top-k, per-class NMS) as one exportable module.

``EndToEnd(model)`` returns final detections instead of raw maps, so an ONNX export of it gives the
edge app boxes, scores and labels directly. It follows ``model.inference.decode`` step by step (the
constants of ``edge.contract``: TOP_K, NMS_IOU; detections above MIN_SCORE); NMS is
the ONNX ``NonMaxSuppression`` operator (batched, per class), which torchvision's ``batched_nms``
does not export to with a dynamic batch.

Outputs (``edge.contract.E2E_OUTPUTS``), for a batch of B images with M detections in all (sorted by
image, then score descending): ``det_boxes`` (M, 4) x1 y1 x2 y2 input px, ``det_scores`` (M,),
``det_labels`` (M,) int64 class ids, ``det_batch`` (M,) int64 image index, ``det_count`` (B,) int64
detections per image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from ..edge.contract import MIN_SCORE, NMS_IOU, TOP_K


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX NonMaxSuppression in the graph; the same selection with torchvision when run eagerly."""

    @staticmethod
    def forward(ctx, boxes, scores, max_per_class, iou, min_score):
        # boxes (B, N, 4), scores (B, K, N) one non-zero class per box -> (M, 3) [image, class, box]
        out = [torch.zeros(0, 3, dtype=torch.int64)]
        for b in range(boxes.shape[0]):
            sc, lb = scores[b].max(0)
            idx = torch.nonzero(sc > min_score).flatten()
            kept = idx[batched_nms(boxes[b][idx], sc[idx], lb[idx], float(iou))]
            out.append(torch.stack([torch.full_like(kept, b), lb[kept], kept], 1))
        return torch.cat(out)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class, iou, min_score):
        return g.op("NonMaxSuppression", boxes, scores, max_per_class, iou, min_score)


class EndToEnd(nn.Module):
    def __init__(self, model: nn.Module, top_k: int = TOP_K, nms_iou: float = NMS_IOU, min_score: float = MIN_SCORE):
        super().__init__()
        self.model, self.top_k, self.nms_iou, self.min_score = model, top_k, nms_iou, min_score

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, boxes = self.model(x)  # (B, K, h, w), (B, 4, h, w)
        heat = logits.sigmoid()
        peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
        b, k, h, w = heat.shape
        flat = peaks.flatten(1)
        # Zero padding guarantees top_k entries on tiny inputs without a data-dependent k;
        # a zero score never passes min_score, so the padding never becomes a detection.
        flat = torch.cat([flat, flat.new_zeros(flat.shape[0], self.top_k)], 1)
        scores, idx = flat.topk(self.top_k, dim=1)  # (B, top_k)
        labels = torch.div(idx, h * w, rounding_mode="floor").clamp(max=k - 1)
        cell = torch.where(idx < k * h * w, torch.remainder(idx, h * w), torch.zeros_like(idx))
        cand = torch.gather(boxes.flatten(2).transpose(1, 2), 1, cell.unsqueeze(-1).expand(-1, -1, 4))  # (B, top_k, 4)
        per_class = (F.one_hot(labels, k).to(scores.dtype) * scores.unsqueeze(-1)).transpose(1, 2).contiguous()
        sel = _NonMaxSuppression.apply(cand, per_class, torch.tensor([self.top_k]), torch.tensor([self.nms_iou]),
                                       torch.tensor([self.min_score]))
        bi, ci = sel[:, 0], sel[:, 2]
        order = torch.argsort(bi.to(scores.dtype) * 2 - scores[bi, ci])  # by image, then score descending
        bi, ci = bi[order], ci[order]
        count = (bi.unsqueeze(0) == torch.arange(b).unsqueeze(1)).sum(1)
        return cand[bi, ci], scores[bi, ci], labels[bi, ci], bi, count
