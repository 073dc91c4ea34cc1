"""train: fit the detector from scratch on the augmented training split, validate on held-out boards.

- dvclive logs the losses and validation mAP per epoch; the best epoch is saved as a self-describing
  checkpoint (``checkpoint.py``). Best = highest validation COCO mAP@[.5:.95]: mAP@0.5 saturates on
  easy validation boards, and among epochs that find every defect the tighter boxes are better.
  With ``train.ema_decay`` > 0 an exponential moving average of the weights is what is validated
  and saved.
- Every epoch also writes ``<model dir>/checkpoints/last.pt`` (weights, optimizer, schedule, curves so
  far). A run that finds a compatible one (same train params, seed, classes and data) resumes after
  its epoch instead of starting over; an incompatible one is ignored, saying which keys differ.
- Deterministic: the shuffle order and the random crops are functions of (seed, epoch, index), so a
  resumed run ends with the same weights as an uninterrupted one.
- Under ``torchrun`` (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel: gloo on CPUs, NCCL on
  GPUs, the global batch ``train.batch_size`` split across processes; rank 0 validates and writes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import resource
import time
from contextlib import ExitStack
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
import torch.distributed as dist
from dvclive import Live
from tqdm import tqdm

from ..data import augment
from ..data.dataset import Dataset, atomic_dir, atomic_file, registration_px, split_ids
from ..edge import machine
from ..edge.preprocess import move_image
from ..evaluation.metrics import coco_metrics
from ..pipeline.config import TrainConfig, to_dict
from . import checkpoint
from .inference import load_pair, predict, prepare_input, stack_padded, torch_runner
from .loss import box_loss, build_targets, focal_loss
from .network import Detector, DetectorConfig

RESUME_FORMAT = "pcb-aoi-resume/1"
NOT_IN_FINGERPRINT = ("device", "threads", "workers", "cache_mb", "resume")  # how to run, not what is trained


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN/inf."""


class PairDataset(torch.utils.data.Dataset):
    """(input (C, H, W), boxes (N, 4), labels (N,)) per image, optionally random-cropped.

    The crop of item ``i`` in epoch ``e`` depends only on (seed, e, i): call ``set_epoch`` first.
    """

    def __init__(self, ds: Dataset, classes: tuple[str, ...], use_template: bool, crop: int, seed: int,
                 flip_rotate: bool = False, scale_jitter: float = 0.0, width_jitter: float = 0.0,
                 cache_mb: int = 0, template_shift: int = 0, background_crops: float = 0.0):
        self.ds, self.rows = ds, list(ds.images.itertuples(index=False))
        self.cache = self._decode_all() if 0 < self._decoded_mb() <= cache_mb else None
        self.gt = ds.annotations([r.image_id for r in self.rows], classes)
        self.use_template, self.seed, self.epoch = use_template, seed, 0
        self.width_jitter, self.template_shift = width_jitter, template_shift
        self.crop = None
        if crop:
            # Crops that hold at least one defect: most of the signal at a fraction of the compute.
            # With scale jitter (boards differ in trace width and defect size), a crop large enough for
            # the smallest scale is cut first and rescaled, then its centre kept: the rescale works on
            # a crop, not on the whole 640 px image (8x less work for 192 px crops).
            big = math.ceil(crop / (1 - scale_jitter)) if scale_jitter else crop
            crop_step = A.AtLeastOneBBoxRandomCrop(big, big)
            if background_crops:  # some crops anywhere: board far from any defect, where false alarms hide
                crop_step = A.OneOf([A.AtLeastOneBBoxRandomCrop(big, big, p=1 - background_crops),
                                     A.RandomCrop(big, big, p=background_crops)], p=1.0)
            steps = [A.PadIfNeeded(big, big, border_mode=cv2.BORDER_CONSTANT, fill=255), crop_step]
            if scale_jitter:
                steps += [A.Affine(scale=(1 - scale_jitter, 1 + scale_jitter), fill=255, p=1.0),
                          A.CenterCrop(crop, crop)]
            if flip_rotate:  # a new orientation every epoch (the augment stage's copies are fixed)
                steps += [A.HorizontalFlip(), A.VerticalFlip(), A.RandomRotate90()]
            self.crop = A.Compose(steps,
                                  bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"],
                                                           min_visibility=0.5),
                                  additional_targets={"template": "image"}, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _decoded_mb(self) -> float:
        pixels = self.ds.images["width"] * self.ds.images["height"]
        return float((pixels * (1 + self.ds.images["template_path"].astype(bool))).sum()) / 2**20

    def _decode_all(self) -> list:
        """Every (test, template) pair decoded once. Built before the loader forks its worker, which then
        shares these arrays instead of decoding two images per crop every epoch."""
        pairs = [load_pair(self.ds, row) for row in tqdm(self.rows, desc="decode training images", unit="image",
                                                          leave=False, mininterval=2)]
        for image in (a for pair in pairs for a in pair if a is not None):
            image.flags.writeable = False  # augmentations must copy, never edit the cache
        return pairs

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        test, template = self.cache[i] if self.cache is not None else load_pair(self.ds, row)
        g = self.gt[row.image_id]
        boxes, labels = g["boxes"], g["labels"]
        if self.crop is not None:
            item_seed = (self.seed * 1_000_003 + self.epoch) * 1_000_003 + i
            self.crop.set_random_seed(item_seed)
            test, template, boxes, labels = augment.apply(self.crop, test, template, boxes, labels)
            labels = np.asarray(labels, np.int64)
            if self.width_jitter:
                test, template = jitter_copper_width(test, template, self.width_jitter, item_seed)
            if self.template_shift and template is not None:
                template = shift_template(template, self.template_shift, item_seed)
        x = prepare_input(test, template, self.use_template)
        return torch.from_numpy(x), torch.from_numpy(boxes), torch.from_numpy(labels)


def jitter_copper_width(test: np.ndarray, template: np.ndarray, p: float, seed: int):
    """With probability ``p``, grow or shrink the dark copper of both images by 1 px (3x3 min/max filter).

    Boards differ in trace width: a thin-trace board's open looks unlike a wide trace's crack. The
    same filter on test and template keeps the defect (their difference) in place.
    """
    rng = np.random.default_rng(seed)
    if rng.random() >= p:
        return test, template
    grow = rng.random() < 0.5
    op = cv2.erode if grow else cv2.dilate  # copper is dark: a min filter grows it
    kernel = np.ones((3, 3), np.uint8)
    return op(test, kernel), op(template, kernel)


def shift_template(template: np.ndarray, max_px: int, seed: int) -> np.ndarray:
    """For half the seeds, the template moved by a random (dx, dy) in [-max_px, max_px]^2, borders repeated.

    Real pairs are not always registered: 57 of DeepPCB group 20085's 291 pairs are off by 1.5 to 7 px,
    and every misaligned pair paints the outline of the whole layout into the difference channel. Seeing
    such pairs in training teaches the model that this outline is not a defect.
    """
    rng = np.random.default_rng((seed, 7))
    if rng.random() >= 0.5:
        return template
    dx, dy = (int(v) for v in rng.integers(-max_px, max_px + 1, size=2))
    return move_image(template, dx, dy)


def collate(batch):
    xs, boxes, labels = zip(*batch)
    return torch.from_numpy(stack_padded([x.numpy() for x in xs])), list(boxes), list(labels)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``train.device``: auto = the GPU when torch sees one, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda requested but torch sees no GPU "
                         "(torch.cuda.is_available() is False); use auto or cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class Ddp:
    """Process-group facts from the torchrun environment (world size 1 without torchrun)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0

    def start(self, device: torch.device) -> None:
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def stop(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# bf16 emulated in fp32 arithmetic, measured side by side on a 2-core AVX2-only EPYC (batch 16, 192 px crops).
BF16_EMULATED_SLOWDOWN = 2.6


def resolve_precision(requested: str, device: torch.device, cpu: machine.Cpu | None = None) -> tuple[str, str | None]:
    """``train.precision`` -> (fp32 | bf16, a warning or None).

    auto: bf16 where the hardware computes it (a GPU that supports it; a CPU with AVX512-BF16, AMX-BF16
    or Arm BF16), else fp32. An explicit bf16 on a CPU that emulates it is kept, with a warning.
    """
    if device.type == "cuda":
        native, where = torch.cuda.is_bf16_supported(), torch.cuda.get_device_name(device)
    else:
        cpu = cpu or machine.cpu()
        native, where = cpu.bf16_native, str(cpu)
    if requested == "auto":
        return ("bf16" if native else "fp32"), None
    if requested == "bf16" and not native:
        return "bf16", (f"train.precision=bf16 on {where}: no native bfloat16 (AVX512-BF16, AMX or Arm BF16), so it "
                        f"is emulated, about {BF16_EMULATED_SLOWDOWN}x slower than fp32; use train.precision=auto or fp32")
    return requested, None


def train_one_epoch(model: torch.nn.Module, loader, opt, sched, epoch: int, device: torch.device,
                    num_classes: int, stride: int, ema=None, bf16: bool = False) -> dict[str, float]:
    model.train()
    totals = {"loss": 0.0, "heat": 0.0, "box": 0.0}
    for step, (x, boxes, labels) in enumerate(loader):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            heat_logits, pred_boxes = model(x.to(device, memory_format=torch.channels_last))
        heat_logits, pred_boxes = heat_logits.float(), pred_boxes.float()  # losses in float32
        h, w = heat_logits.shape[-2:]
        heat, target, weight = (t.to(device) for t in build_targets(boxes, labels, num_classes, h, w, stride))
        l_heat = focal_loss(heat_logits, heat)
        l_box = box_loss(pred_boxes, target, weight)
        loss = l_heat + 2.0 * l_box
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # The gradient norm is the same on every DDP rank (after all-reduce): all ranks stop together.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            raise TrainingDiverged(f"loss {loss.item():.4g}, gradient norm {grad_norm.item():.4g} at epoch {epoch}, "
                                   f"step {step} (of {len(loader)}); try a lower train.lr")
        opt.step()
        sched.step()
        if ema is not None:
            ema.update_parameters(model.module if hasattr(model, "module") else model)
        for k, v in (("loss", loss), ("heat", l_heat), ("box", l_box)):
            totals[k] += v.item() / len(loader)
    return totals


def ema_update(decay: float):
    """AveragedModel's update: an exponential moving average with a warm-up, so the first steps'
    random weights fade out quickly (decay (1 + n) / (10 + n) until it reaches ``decay``); the
    BatchNorm statistics are averaged too, its step counters copied."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        d = min(decay, (1 + int(n)) / (10 + int(n)))
        torch._foreach_lerp_(averaged, current, 1 - d)

    return update


def fingerprint(cfg: TrainConfig, seed: int, classes: tuple[str, ...], train_dir: Path, val_ids: list[str],
                world: int) -> dict:
    """What a resumed run must share with the interrupted one to continue it."""
    data = hashlib.sha256()
    for name in ("images.parquet", "boxes.parquet"):
        data.update((train_dir / name).read_bytes())
    data.update("\n".join(val_ids).encode())
    train = {k: v for k, v in to_dict(cfg).items() if k not in NOT_IN_FINGERPRINT}
    return {"train": train, "seed": seed, "classes": list(classes), "data_sha256": data.hexdigest(),
            "processes": world}


def differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts, with both values."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb, key = a.get(k), b.get(k), f"{prefix}{k}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differing_keys(va, vb, key + ".")
        elif va != vb:
            out.append(f"{key} ({json.dumps(va)} -> {json.dumps(vb)})")
    return out


def load_resume(path: Path, fp: dict) -> dict | None:
    """The resume state at ``path`` if it continues this run; None (saying why) otherwise."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file from a kill during the write cannot happen (atomic), but be safe
        print(f"train: ignoring {path}: unreadable ({e}); starting over")
        return None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        print(f"train: ignoring {path}: not a {RESUME_FORMAT} file; starting over")
        return None
    diff = differing_keys(state["fingerprint"], fp)
    if diff:
        print(f"train: not resuming from {path} (epoch {state['epoch']}): incompatible, keys differ: "
              f"{'; '.join(diff)}. Starting over.")
        return None
    return state


def run(cfg: TrainConfig, seed: int, classes: tuple[str, ...], train_dir: str | Path, clean_dir: str | Path,
        split_dir: str | Path, model_out: str | Path, live_dir: str | Path) -> dict:
    ddp = Ddp()
    device = resolve_device(cfg.device, ddp.local_rank)
    ddp.start(device)
    try:
        return _run(cfg, seed, classes, Path(train_dir), Path(clean_dir), split_dir, Path(model_out), live_dir,
                    ddp, device)
    finally:
        ddp.stop()


def _run(cfg, seed, classes, train_dir, clean_dir, split_dir, model_out, live_dir, ddp: Ddp, device) -> dict:
    torch.manual_seed(seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    precision, warning = resolve_precision(cfg.precision, device)
    if warning and ddp.main:
        print(f"train: warning: {warning}", flush=True)
    if ddp.world > 1 and cfg.batch_size % ddp.world:
        raise ValueError(f"train.batch_size: {cfg.batch_size} is not divisible by the {ddp.world} processes")
    train_ds, clean = Dataset.load(train_dir), Dataset.load(clean_dir)
    val_ids = split_ids(split_dir, "val")
    use_template = cfg.model.use_template and bool(train_ds.images["template_path"].astype(bool).all())
    net = Detector(DetectorConfig(num_classes=len(classes), in_channels=3 if use_template else 1,
                                  width=cfg.model.width, stride=cfg.model.stride, blocks=cfg.model.blocks))
    net = net.to(device, memory_format=torch.channels_last)  # NHWC convolutions: ~20% faster CPU training steps
    model = torch.nn.parallel.DistributedDataParallel(net) if ddp.world > 1 else net
    data = PairDataset(train_ds, classes, use_template, cfg.crop_size, seed, cfg.flip_rotate, cfg.scale_jitter,
                       cfg.width_jitter, cfg.cache_mb, cfg.template_shift, cfg.background_crops)
    drop_last = len(data) >= cfg.batch_size
    sampler = torch.utils.data.DistributedSampler(data, ddp.world, ddp.rank, shuffle=True, seed=seed,
                                                  drop_last=drop_last)
    # A loader process keeps image decoding and augmentation off the training threads: in the same
    # process they contend with torch's busy-waiting OpenMP threads and a CPU epoch takes ~2x longer.
    # The crops do not depend on it (seeded per item), so neither do the weights.
    loader = torch.utils.data.DataLoader(data, cfg.batch_size // ddp.world, sampler=sampler, collate_fn=collate,
                                         drop_last=drop_last, num_workers=cfg.workers)
    # fused: one kernel over all tensors instead of a Python loop per tensor (w16 model: 2.1 -> 0.6 ms per step)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    ema = (torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=ema_update(cfg.ema_decay), use_buffers=True)
           if cfg.ema_decay else None)
    kept_net = ema.module if ema else net  # the weights validated and saved
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * len(loader), pct_start=0.15)

    resume_path = model_out.parent / "checkpoints" / "last.pt"
    # As run: an `auto` run resumed on a machine that resolves it otherwise starts over.
    fp = fingerprint(dataclasses.replace(cfg, precision=precision), seed, classes, train_dir, val_ids, ddp.world)
    state = load_resume(resume_path, fp) if cfg.resume else None
    no_best = {"map": -1.0, "map50": None}  # validation scores of the kept epoch
    start, best, best_epoch, history, epoch_s = 0, no_best, -1, [], []
    if state is not None:
        net.load_state_dict(state["model_state"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema:
            ema.load_state_dict(state["ema_state"])
        start, best, best_epoch = state["epoch"] + 1, state["best"], state["best_epoch"]
        history, epoch_s = state["history"], state["epoch_seconds"]
        if ddp.main:
            print(f"train: resuming from {resume_path} after epoch {state['epoch']} (best val map {best['map']:.4f} "
                  f"at epoch {best_epoch})")
        if start > 0 and not model_out.is_file():
            best = no_best  # the best model of the interrupted run is gone: keep the next validated epoch
    val_gt = clean.annotations(val_ids, classes)
    runner = torch_runner(kept_net, device)
    with ExitStack() as stack:
        live = None
        if ddp.main:  # one writer: rank 0
            live_tmp = stack.enter_context(atomic_dir(live_dir))
            live = stack.enter_context(Live(dir=str(live_tmp), dvcyaml=False, save_dvc_exp=False, report=None))
        for past in history if live else ():  # the curves of the interrupted run, so the plots cover every epoch
            for k, v in past.items():
                live.log_metric(k, v)
            live.next_step()
        bar = tqdm(range(start, cfg.epochs), desc="train", unit="epoch", initial=start, total=cfg.epochs,
                   disable=not ddp.main)
        for epoch in bar:
            t0 = time.perf_counter()
            sampler.set_epoch(epoch)
            data.set_epoch(epoch)
            try:
                losses = train_one_epoch(model, loader, opt, sched, epoch, device, len(classes), net.cfg.stride, ema,
                                         precision == "bf16")
            except TrainingDiverged as e:
                kept = [f"{p} (epoch {ep})" for p, ep in ((resume_path, epoch - 1), (model_out, best_epoch))
                        if ep >= 0 and p.is_file()]
                raise TrainingDiverged(f"{e}. Stopped; kept the last good checkpoints: "
                                       f"{', '.join(kept) or 'none yet'}") from None
            epoch_s.append(time.perf_counter() - t0)
            logged = {f"train/{k}": v for k, v in losses.items()}
            last = epoch + 1 == cfg.epochs
            scores = None
            if ddp.main and val_ids and ((epoch + 1) % cfg.val_every == 0 or last):
                val = coco_metrics(val_gt, predict(runner, clean, val_ids, use_template), classes)
                logged.update({"val/map50": val["map50"], "val/map": val["map"]})
                bar.set_postfix(loss=f"{losses['loss']:.3f}", val_map50=f"{val['map50']:.3f}", val_map=f"{val['map']:.3f}")
                scores = {"map": val["map"], "map50": val["map50"]}
            # Keep the best validated epoch; without a val split (split.val_fraction: 0), the last one.
            improved = scores is not None and scores["map"] > best["map"]
            if ddp.main and (improved or (not val_ids and last)):
                best, best_epoch = (scores if improved else best), epoch
                checkpoint.save(model_out, kept_net, classes, use_template, registration_px(clean_dir), epoch=epoch, val_map=best["map"] if scores
                                else None, val_map50=best["map50"], seed=seed, torch=str(torch.__version__),
                                train_images=len(data))
            if live:
                for k, v in logged.items():
                    live.log_metric(k, v)
                live.next_step()
                history.append(logged)
                save_resume(resume_path, fp, net, ema, opt, sched, epoch, best, best_epoch, history, epoch_s)
            ddp.barrier()
    if ddp.main:
        resume_path.unlink(missing_ok=True)  # finished: nothing to resume
    return {
        "epochs": cfg.epochs,
        "resumed_from_epoch": start - 1 if start else None,
        "best_epoch": best_epoch,
        "val_map": best["map"] if val_ids else None,  # the kept epoch's; None: no val split (val_fraction: 0)
        "val_map50": best["map50"] if val_ids else None,
        "seconds_per_epoch": float(np.mean(epoch_s)) if epoch_s else None,
        "train_seconds": float(np.sum(epoch_s)),
        "train_images": len(data),
        "parameters": sum(p.numel() for p in net.parameters()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": str(device),
        "processes": ddp.world,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": machine.cpu_model(),
        "precision": precision,  # as run: train.precision=auto resolves per machine
        "precision_requested": cfg.precision,
        "machine": machine.describe(torch.cuda.get_device_name(device) if device.type == "cuda" else None),
    }


def save_resume(path: Path, fp: dict, net: Detector, ema, opt, sched, epoch: int, best: dict, best_epoch: int,
                history: list[dict], epoch_s: list[float]) -> None:
    state = {"format": RESUME_FORMAT, "fingerprint": fp, "epoch": epoch, "model_state": net.state_dict(),
             "ema_state": ema.state_dict() if ema else None,
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "best": best,
             "best_epoch": best_epoch, "history": history, "epoch_seconds": epoch_s}
    with atomic_file(path) as tmp:
        torch.save(state, tmp)
