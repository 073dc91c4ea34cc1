"""Pre- and post-processing shared by training, evaluation, export and benchmarking.

The input contract (stored in the checkpoint and, later, in ONNX metadata) lives in ``edge.preprocess``
and the decoding constants in ``edge.contract`` (no torch: shared with the edge app); this module adds
loading, torch decoding and prediction.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from ..data.dataset import Dataset
from ..edge.contract import MIN_SCORE, NMS_IOU, TOP_K
from ..edge.preprocess import prepare_input, read_pair, stack_padded


def load_pair(ds: Dataset, row) -> tuple[np.ndarray, np.ndarray | None]:
    return read_pair(ds.root / row.path, ds.root / row.template_path if row.template_path else None)


@torch.no_grad()
def decode(heatmap: torch.Tensor, boxes: torch.Tensor, score_threshold: float = MIN_SCORE, top_k: int = TOP_K,
           nms_iou: float = NMS_IOU) -> list[dict[str, torch.Tensor]]:
    """Model outputs -> per image {boxes (N, 4) xyxy px, scores (N,), labels (N,)}.

    heatmap: (B, K, h, w) logits; boxes: (B, 4, h, w). A detection is a 3x3 local maximum of the
    class heat; ``batched_nms`` then removes duplicates of the same class from neighbouring peaks.
    """
    heat = heatmap.sigmoid()
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    b, k, h, w = heat.shape
    scores, idx = peaks.flatten(1).topk(min(top_k, k * h * w), dim=1)  # (B, top_k)
    labels, cell = idx // (h * w), idx % (h * w)
    flat_boxes = boxes.flatten(2).transpose(1, 2)  # (B, h*w, 4)
    out = []
    for i in range(b):
        keep = scores[i] > score_threshold
        bx = flat_boxes[i, cell[i][keep]]
        sc, lb = scores[i][keep], labels[i][keep]
        kept = batched_nms(bx, sc, lb, nms_iou)
        out.append({"boxes": bx[kept], "scores": sc[kept], "labels": lb[kept]})
    return out


Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # (B, C, H, W) -> (heatmap, boxes)


def torch_runner(model: torch.nn.Module, device: torch.device | str = "cpu") -> Runner:
    """A Runner over a PyTorch model; sets eval mode when called (training may switch it back)."""

    @torch.no_grad()
    def run(x: np.ndarray):
        model.eval()
        heat, boxes = model(torch.from_numpy(x).to(device))
        return heat.cpu().numpy(), boxes.cpu().numpy()

    return run


def predict(runner: Runner, ds: Dataset, image_ids: Iterable[str], use_template: bool, batch_size: int = 8,
            score_threshold: float = MIN_SCORE) -> dict[str, dict[str, np.ndarray]]:
    """Run ``runner`` over images of ``ds``; boxes are clipped to each image."""
    rows = ds.rows(image_ids)
    bare = [r.image_id for r in rows if not r.template_path] if use_template else []
    if bare:  # named here: prepare_input, deeper down, cannot say which image it is
        raise ValueError(f"{ds.root}/images.parquet: {len(bare)} image(s) without a template ({', '.join(bare[:5])}"
                         f"{', ...' if len(bare) > 5 else ''}), but the model takes (test, template) pairs; "
                         "re-run etl, which rejects them")
    results = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        x = stack_padded([prepare_input(*load_pair(ds, r), use_template) for r in chunk])
        heat, boxes = runner(x)
        for r, det in zip(chunk, decode(torch.from_numpy(heat), torch.from_numpy(boxes), score_threshold)):
            bx = det["boxes"].numpy().copy()
            bx[:, 0::2] = bx[:, 0::2].clip(0, r.width)
            bx[:, 1::2] = bx[:, 1::2].clip(0, r.height)
            results[r.image_id] = {"boxes": bx, "scores": det["scores"].numpy(), "labels": det["labels"].numpy()}
    return results
