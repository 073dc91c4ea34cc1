"""A compact, fully-convolutional, anchor-free defect detector (CenterNet-style), trained from scratch.

Input: (B, C, H, W) float, C = 3 for reference-based AOI (test, template, test - template) or 1 for
single-image mode; H and W multiples of 32. Output at stride s (4 or 8):

- ``heatmap``: (B, K, H/s, W/s) class logits; a defect is a local maximum of sigmoid(heatmap).
- ``boxes``: (B, 4, H/s, W/s) the box each cell predicts, x1 y1 x2 y2 in input pixels.

Decoding boxes inside the network keeps the post-processing (peaks, top-k, NMS) trivial and
identical for PyTorch and ONNX Runtime.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DetectorConfig:
    num_classes: int
    in_channels: int = 3
    width: int = 32
    stride: int = 4
    blocks: tuple[int, int, int] = (1, 1, 2)  # residual blocks at strides 4, 8 and 16
    dilated: bool = True  # blocks at 16 dilated 1, 2, 4, ...; False: all 1 (a smaller receptive field)

    def __post_init__(self):  # a checkpoint stores blocks as a list
        object.__setattr__(self, "blocks", tuple(self.blocks))

    def to_dict(self) -> dict:
        return asdict(self)


def conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, c: int, dilation: int = 1):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c, dilation=dilation), conv_bn(c, c, dilation=dilation, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


# The deepest feature map is at /16: a window of the input whose corner and size are multiples of this
# computes, away from its border, what the whole image computes (edge.gate's tiles rely on it).
DOWNSAMPLING = 16


class Detector(nn.Module):
    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.cfg = cfg
        w, (n4, n8, n16) = cfg.width, cfg.blocks
        self.c2 = conv_bn(cfg.in_channels, w, 2)  # /2
        self.c4 = nn.Sequential(conv_bn(w, 2 * w, 2), *(Residual(2 * w) for _ in range(n4)))  # /4
        self.c8 = nn.Sequential(conv_bn(2 * w, 3 * w, 2), *(Residual(3 * w) for _ in range(n8)))  # /8
        # /16 with dilated blocks (1, 2, 4, ...): defect classes differ by context (is the other side copper?).
        # Blocks here are cheap: a 640 px image is 40x40 cells at /16, against 160x160 at /4.
        self.c16 = nn.Sequential(conv_bn(3 * w, 4 * w, 2), *(Residual(4 * w, dilation=2**i if cfg.dilated else 1) for i in range(n16)))
        f = 2 * w  # feature width of the small FPN
        self.lat16, self.lat8, self.lat4 = nn.Conv2d(4 * w, f, 1), nn.Conv2d(3 * w, f, 1), nn.Conv2d(2 * w, f, 1)
        self.smooth = conv_bn(f, f)
        self.cls_head = nn.Sequential(conv_bn(f, f), nn.Conv2d(f, cfg.num_classes, 1))
        self.box_head = nn.Sequential(conv_bn(f, f), nn.Conv2d(f, 4, 1))
        nn.init.constant_(self.cls_head[-1].bias, -math.log((1 - 0.01) / 0.01))  # prior p = 0.01
        nn.init.zeros_(self.box_head[-1].weight)
        nn.init.zeros_(self.box_head[-1].bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c4 = self.c4(self.c2(x))
        c8 = self.c8(c4)
        c16 = self.c16(c8)
        p = self.lat8(c8) + F.interpolate(self.lat16(c16), scale_factor=2.0, mode="nearest")
        if self.cfg.stride == 4:
            p = self.lat4(c4) + F.interpolate(p, scale_factor=2.0, mode="nearest")
        p = self.smooth(p)
        return self.cls_head(p), self.decode_boxes(self.box_head(p))

    def decode_boxes(self, raw: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) raw = (dx, dy, log w, log h) in stride units -> (B, 4, h, w) x1 y1 x2 y2 pixels."""
        s = float(self.cfg.stride)
        if raw.dtype != torch.float32:  # bf16 autocast: pixel coordinates need float32 (bf16 is 1 px coarse at 256)
            raw = raw.float()
        h, w = raw.shape[-2:]
        ys = (torch.arange(h, dtype=raw.dtype, device=raw.device) + 0.5) * s
        xs = (torch.arange(w, dtype=raw.dtype, device=raw.device) + 0.5) * s
        cx = xs.view(1, 1, w) + raw[:, 0] * s  # (B, h, w)
        cy = ys.view(1, h, 1) + raw[:, 1] * s
        bw = torch.exp(raw[:, 2].clamp(-4.0, 5.0)) * s  # clamp: exp must not overflow early in training
        bh = torch.exp(raw[:, 3].clamp(-4.0, 5.0)) * s
        return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)


def build(cfg: DetectorConfig) -> Detector:
    return Detector(cfg)
