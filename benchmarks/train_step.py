"""Training-step time of the detector in fp32 and bf16 side by side, on a CPU or a GPU, in one run.

What `train.precision: auto` decides on: bf16 is worth it only where the hardware computes it (a GPU
that supports it; a CPU with AVX512-BF16, AMX or Arm BF16); elsewhere it is emulated and slower.
The step is the training loop's own (autocast forward, float32 losses, backward, fused AdamW) on
random crops with random boxes, so no dataset is needed; the variants take turns, round by round.

    python benchmarks/train_step.py                                   # this CPU, DeepPCB recipe's network
    python benchmarks/train_step.py --device cuda --batch 64          # a GPU
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/train_step.py   # as an AVX2-only CPU

Prints JSON: ms per step and images/s per precision, the bf16 / fp32 time ratio, the machine
(CPU model and instruction sets, or the GPU) and what `train.precision: auto` resolves to there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pcb_aoi.edge import machine  # noqa: E402
from pcb_aoi.model.loss import box_loss, build_targets, focal_loss  # noqa: E402
from pcb_aoi.model.network import Detector, DetectorConfig  # noqa: E402


def random_batch(batch: int, crop: int, classes: int, gen: torch.Generator):
    x = torch.rand(batch, 3, crop, crop, generator=gen)
    boxes, labels = [], []
    for _ in range(batch):
        n = int(torch.randint(1, 8, (1,), generator=gen))
        xy = torch.rand(n, 2, generator=gen) * (crop - 24)
        wh = 4 + torch.rand(n, 2, generator=gen) * 20
        boxes.append(torch.cat([xy, xy + wh], 1))
        labels.append(torch.randint(0, classes, (n,), generator=gen))
    return x, boxes, labels


def step(model, opt, x, boxes, labels, classes: int, stride: int, bf16: bool, device: torch.device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        heat_logits, pred_boxes = model(x)
    heat_logits, pred_boxes = heat_logits.float(), pred_boxes.float()
    h, w = heat_logits.shape[-2:]
    heat, target, weight = (t.to(device) for t in build_targets(boxes, labels, classes, h, w, stride))
    loss = focal_loss(heat_logits, heat) + 2.0 * box_loss(pred_boxes, target, weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=16, help="crops per step (%(default)s)")
    ap.add_argument("--crop", type=int, default=192, help="crop side in px (%(default)s)")
    ap.add_argument("--width", type=int, default=16, help="train.model.width (%(default)s)")
    ap.add_argument("--blocks", type=int, nargs=3, default=[1, 2, 3], help="train.model.blocks (%(default)s)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per precision and round (%(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, precisions taking turns (%(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per precision first (%(default)s)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    device = torch.device(args.device)
    classes = 6
    cfg = DetectorConfig(num_classes=classes, in_channels=3, width=args.width, stride=4, blocks=tuple(args.blocks))
    gen = torch.Generator().manual_seed(0)
    batches = [random_batch(args.batch, args.crop, classes, gen) for _ in range(4)]
    runs = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = Detector(cfg).to(device, memory_format=torch.channels_last).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        runs[precision] = (model, opt, [])

    def timed(precision: str, n: int) -> float:
        model, opt, _ = runs[precision]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(n):
            x, boxes, labels = batches[i % len(batches)]
            step(model, opt, x.to(device, memory_format=torch.channels_last), boxes, labels, classes,
                 cfg.stride, precision == "bf16", device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for precision in runs:
        timed(precision, args.warmup)
    for _ in range(args.rounds):
        for precision, (_, _, times) in runs.items():
            times.append(timed(precision, args.steps) / args.steps)
    ms = {p: 1e3 * min(t) for p, (_, _, t) in runs.items()}  # the best round: least disturbed by other work
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    native = torch.cuda.is_bf16_supported() if gpu else machine.cpu().bf16_native
    result = {
        "device": str(device), "machine": machine.describe(gpu), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "batch": args.batch, "crop": args.crop,
        "model": {"width": args.width, "blocks": args.blocks},
        "isa_caps": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ},
        "ms_per_step": {p: round(v, 2) for p, v in ms.items()},
        "images_per_s": {p: round(args.batch / v * 1e3, 1) for p, v in ms.items()},
        "bf16_vs_fp32_time": round(ms["bf16"] / ms["fp32"], 3),
        "bf16_native": bool(native),
        "auto_resolves_to": "bf16" if native else "fp32",
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
