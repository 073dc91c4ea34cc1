"""train: fit the detector on the augmented training split, validate on held-out boards.

- From scratch, or from an earlier checkpoint's weights (``train.init_from``, fine-tuning): checked
  before any step, classes matched by name (``model.finetune``).

- dvclive logs the losses and validation mAP per epoch; the best epoch is saved as a self-describing
  checkpoint (``model.checkpoint``). Best = highest validation COCO mAP@[.5:.95]: mAP@0.5 saturates on
  easy validation boards, and among epochs that find every defect the tighter boxes are better.
  With ``train.ema_decay`` > 0 an exponential moving average of the weights is what is validated
  and saved.
- Every epoch also writes ``<model dir>/checkpoints/last.pt`` (weights, optimizer, schedule, curves so
  far). A run that finds a compatible one (same train params, seed, classes and data) resumes after
  its epoch instead of starting over; an incompatible one is ignored, saying which keys differ
  (``model.resume``).
- Deterministic: the shuffle order and the random crops (``model.crops``) are functions of (seed,
  epoch, index), so a resumed run ends with the same weights as an uninterrupted one.
- Under ``torchrun`` (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel: gloo on CPUs, NCCL on
  GPUs, the global batch ``train.batch_size`` split across processes; rank 0 validates and writes
  (``model.devices``).
"""
from __future__ import annotations

import os
import resource
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from dvclive import Live
from tqdm import tqdm

from ..data.dataset import Dataset, atomic_dir, registration_px, split_ids
from ..edge import machine
from ..evaluation.metrics import coco_metrics
from ..pipeline import provenance, tracking
from ..pipeline.config import Params, TrainConfig
from . import checkpoint, finetune
from .crops import PairDataset, collate
from .devices import Ddp, resolve_device, resolve_precision
from .inference import Runner, predict, torch_runner
from .loss import box_loss, build_targets, focal_loss
from .network import Detector, DetectorConfig
from .resume import fingerprint, load_resume, save_resume

NO_BEST = {"map": -1.0, "map50": None}  # the validation scores of "no epoch kept yet"


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN/inf."""


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


@dataclass
class Context:
    """What one training run works with, besides its parts: params, data, where it writes, how it runs."""

    cfg: TrainConfig
    seed: int
    classes: tuple[str, ...]
    clean: Dataset  # the validation images
    clean_dir: Path
    val_ids: list[str]
    use_template: bool
    model_out: Path
    ddp: Ddp
    device: torch.device
    precision: str  # as resolved on this machine: fp32 | bf16
    init: finetune.Init | None = None  # the checked source of train.init_from; None: from scratch
    provenance: dict = field(default_factory=dict)  # commit, params hash, data version (pipeline.provenance)

    @property
    def resume_path(self) -> Path:
        return self.model_out.parent / "checkpoints" / "last.pt"


@dataclass
class Parts:
    """The objects a run trains with (``build``)."""

    net: Detector
    model: torch.nn.Module  # what the steps run: ``net``, or DistributedDataParallel around it
    ema: torch.optim.swa_utils.AveragedModel | None
    data: PairDataset
    sampler: torch.utils.data.DistributedSampler
    loader: torch.utils.data.DataLoader
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler

    @property
    def kept(self) -> Detector:
        """The weights validated and saved: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.net


@dataclass
class Progress:
    """Where a run stands: its first epoch, the kept epoch and its validation scores, the curves so far."""

    start: int = 0
    best: dict = field(default_factory=lambda: dict(NO_BEST))
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)  # logged values per epoch
    epoch_s: list[float] = field(default_factory=list)  # seconds per epoch


def run(cfg: TrainConfig, seed: int, classes: tuple[str, ...], train_dir: str | Path, clean_dir: str | Path,
        split_dir: str | Path, model_out: str | Path, live_dir: str | Path, params: Params | None = None,
        init_within: str | Path | None = None) -> dict:
    """Train and save the best epoch to ``model_out``; returns the stage report.

    ``params``: the whole params.yaml the stage read, only to fingerprint the sections that shaped the
    model into the checkpoint's provenance (``pipeline.provenance``); None (a direct call with only
    ``cfg``): the checkpoint's ``params_hash`` is ``"unknown"``. It must agree with ``cfg``, ``seed``, ``classes``.
    ``init_within``: the folder ``train.init_from`` must lie in (the stage's DVC dep), None = anywhere.
    """
    if params is not None and (params.train, params.seed, tuple(params.classes)) != (cfg, seed, tuple(classes)):
        raise ValueError("training.run: params differ from the train section, seed or classes passed with them; "
                         "pass the params these came from (their hash goes into the checkpoint)")
    init = finetune.load_init(cfg, classes, registration_px(clean_dir), init_within)  # refused before any work
    ddp = Ddp()
    device = resolve_device(cfg.device, ddp.local_rank)
    ddp.start(device)
    try:
        return _run(cfg, seed, classes, Path(train_dir), Path(clean_dir), split_dir, Path(model_out), live_dir,
                    ddp, device, params, init)
    finally:
        ddp.stop()


def _run(cfg, seed, classes, train_dir, clean_dir, split_dir, model_out, live_dir, ddp: Ddp, device,
         params: Params | None, init) -> dict:
    torch.manual_seed(seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    precision, warning = resolve_precision(cfg.precision, device)
    if warning and ddp.main:
        print(f"train: warning: {warning}", flush=True)
    if ddp.world > 1 and cfg.batch_size % ddp.world:
        raise ValueError(f"train.batch_size: {cfg.batch_size} is not divisible by the {ddp.world} processes")
    train_ds = Dataset.load(train_dir)
    check_templates(cfg.model.use_template, train_ds)
    clean, use_template = Dataset.load(clean_dir), cfg.model.use_template
    val_ids = split_ids(split_dir, "val")
    ctx = Context(cfg, seed, classes, clean, clean_dir, val_ids, use_template, model_out, ddp, device, precision, init)
    if ddp.main:  # the writer; before training, so the data version is that of the data read
        ctx.provenance = provenance.collect(params, {"clean": clean_dir, "split": split_dir, "augmented": train_dir})
    if init and ddp.main:
        print("\n".join(init.log_lines()), flush=True)
    parts = build(ctx, train_ds)
    # As run: an `auto` run resumed on a machine that resolves it otherwise starts over.
    fp = fingerprint(cfg.model_copy(update={"precision": precision}), seed, classes, train_dir, val_ids, ddp.world,
                     init.sha256 if init else None)
    progress = restore(ctx, parts, load_resume(ctx.resume_path, fp) if cfg.resume else None)
    fit(ctx, parts, progress, fp, live_dir)
    if ddp.main:
        ctx.resume_path.unlink(missing_ok=True)  # finished: nothing to resume
    return summary(ctx, parts, progress)


def check_templates(use_template: bool, train_ds: Dataset, shown: int = 5) -> None:
    """ValueError when a reference-based model (``train.model.use_template: true``) would get training
    images without a template: the model's input is what params say, never switched silently."""
    if not use_template:
        return
    bare = train_ds.images.loc[~train_ds.images["template_path"].astype(bool), "image_id"].tolist()
    n = len(train_ds.images)
    if bare and len(bare) == n:
        raise ValueError(f"train.model.use_template: true, but none of the {n} training images in {train_ds.root} "
                         "has a template (a source without templates: VOC, YOLO, COCO); set "
                         "train.model.use_template: false for a single-image model")
    if bare:
        ids = ", ".join(bare[:shown]) + (", ..." if len(bare) > shown else "")
        raise ValueError(f"train.model.use_template: true, but {len(bare)} of the {n} training images in "
                         f"{train_ds.root} have no template ({ids}); fix the data (etl rejects a pair whose "
                         "template is missing: re-run etl) or set train.model.use_template: false to train a "
                         "single-image model on all of them")


def initial_network(ctx: Context) -> Detector:
    """The weights of step 0: a fresh network (the first draw after seeding), then ``train.init_from``'s
    weights where it has them."""
    cfg = ctx.cfg
    net = Detector(DetectorConfig(num_classes=len(ctx.classes), in_channels=3 if ctx.use_template else 1,
                                  width=cfg.model.width, stride=cfg.model.stride, blocks=cfg.model.blocks,
                                  dilated=cfg.model.dilated))
    if ctx.init is not None:
        finetune.apply(net, ctx.init, ctx.classes)
    return net


def build(ctx: Context, train_ds: Dataset) -> Parts:
    """The network, the training crops and their loader, the optimizer, the moving average and the schedule
    (the network first: its initial weights are the first draw after seeding)."""
    cfg, ddp = ctx.cfg, ctx.ddp
    net = initial_network(ctx).to(ctx.device, memory_format=torch.channels_last)  # NHWC convolutions: ~20% faster CPU training steps
    model = torch.nn.parallel.DistributedDataParallel(net) if ddp.world > 1 else net
    data = PairDataset(train_ds, ctx.classes, ctx.use_template, cfg.crop_size, ctx.seed, cfg.flip_rotate,
                       cfg.scale_jitter, cfg.width_jitter, cfg.cache_mb, cfg.template_shift, cfg.background_crops)
    drop_last = len(data) >= cfg.batch_size
    sampler = torch.utils.data.DistributedSampler(data, ddp.world, ddp.rank, shuffle=True, seed=ctx.seed,
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
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * len(loader), pct_start=0.15)
    return Parts(net, model, ema, data, sampler, loader, opt, sched)


def restore(ctx: Context, parts: Parts, state: dict | None) -> Progress:
    """A fresh run's progress, or the interrupted run's that ``state`` (a resume point) continues, its
    weights, optimizer and schedule loaded into ``parts``."""
    if state is None:
        return Progress()
    parts.net.load_state_dict(state["model_state"])
    parts.opt.load_state_dict(state["optimizer"])
    parts.sched.load_state_dict(state["scheduler"])
    if parts.ema is not None:
        parts.ema.load_state_dict(state["ema_state"])
    p = Progress(state["epoch"] + 1, state["best"], state["best_epoch"], state["history"], state["epoch_seconds"])
    if ctx.ddp.main:
        print(f"train: resuming from {ctx.resume_path} after epoch {state['epoch']} (best val map {p.best['map']:.4f} "
              f"at epoch {p.best_epoch})")
    if p.start > 0 and not ctx.model_out.is_file():
        p.best = dict(NO_BEST)  # the best model of the interrupted run is gone: keep the next validated epoch
    return p


def fit(ctx: Context, parts: Parts, progress: Progress, fp: dict, live_dir: str | Path) -> None:
    """Epochs ``progress.start`` to ``train.epochs``: train, validate, keep the best, log the curves with
    dvclive and write the resume point (rank 0 validates, logs and writes)."""
    val_gt = ctx.clean.annotations(ctx.val_ids, ctx.classes)
    runner = torch_runner(parts.kept, ctx.device)
    with ExitStack() as stack:
        live = None
        if ctx.ddp.main:  # one writer: rank 0
            live_tmp = stack.enter_context(atomic_dir(live_dir))
            live = stack.enter_context(Live(dir=str(live_tmp), dvcyaml=False, save_dvc_exp=False, report=None))
            for past in progress.history:  # the curves of the interrupted run, so the plots cover every epoch
                log_step(live, past)
        bar = tqdm(range(progress.start, ctx.cfg.epochs), desc="train", unit="epoch", initial=progress.start,
                   total=ctx.cfg.epochs, disable=not ctx.ddp.main)
        for epoch in bar:
            losses = train_epoch(ctx, parts, progress, epoch)
            logged = {f"train/{k}": v for k, v in losses.items()}
            last = epoch + 1 == ctx.cfg.epochs
            scores = None
            if ctx.ddp.main and ctx.val_ids and ((epoch + 1) % ctx.cfg.val_every == 0 or last):
                scores = validate(ctx, runner, val_gt)
                logged.update({"val/map50": scores["map50"], "val/map": scores["map"]})
                bar.set_postfix(loss=f"{losses['loss']:.3f}", val_map50=f"{scores['map50']:.3f}",
                                val_map=f"{scores['map']:.3f}")
            keep_if_best(ctx, parts, progress, epoch, scores, last)
            if live:
                log_step(live, logged)
                progress.history.append(logged)
                save_resume(ctx.resume_path, fp, parts.net, parts.ema, parts.opt, parts.sched, epoch, progress.best,
                            progress.best_epoch, progress.history, progress.epoch_s)
            ctx.ddp.barrier()


def train_epoch(ctx: Context, parts: Parts, progress: Progress, epoch: int) -> dict[str, float]:
    """One epoch of ``train_one_epoch`` on this epoch's shuffle and crops, timed into ``progress``."""
    t0 = time.perf_counter()
    parts.sampler.set_epoch(epoch)
    parts.data.set_epoch(epoch)
    try:
        losses = train_one_epoch(parts.model, parts.loader, parts.opt, parts.sched, epoch, ctx.device, len(ctx.classes),
                                 parts.net.cfg.stride, parts.ema, ctx.precision == "bf16")
    except TrainingDiverged as e:
        kept = [f"{p} (epoch {ep})" for p, ep in ((ctx.resume_path, epoch - 1), (ctx.model_out, progress.best_epoch))
                if ep >= 0 and p.is_file()]
        raise TrainingDiverged(f"{e}. Stopped; kept the last good checkpoints: "
                               f"{', '.join(kept) or 'none yet'}") from None
    progress.epoch_s.append(time.perf_counter() - t0)
    return losses


def validate(ctx: Context, runner: Runner, val_gt: dict) -> dict:
    """Validation COCO mAP and mAP@0.5 of the kept weights."""
    val = coco_metrics(val_gt, predict(runner, ctx.clean, ctx.val_ids, ctx.use_template), ctx.classes)
    return {"map": val["map"], "map50": val["map50"]}


def keep_if_best(ctx: Context, parts: Parts, progress: Progress, epoch: int, scores: dict | None, last: bool) -> None:
    """Save the kept weights as the checkpoint when this epoch validated best so far; without a val split
    (split.val_fraction: 0 with split.allow_no_val), the last epoch."""
    improved = scores is not None and scores["map"] > progress.best["map"]
    if ctx.ddp.main and (improved or (not ctx.val_ids and last)):
        progress.best, progress.best_epoch = (scores if improved else progress.best), epoch
        checkpoint.save(ctx.model_out, parts.kept, ctx.classes, ctx.use_template, registration_px(ctx.clean_dir),
                        epoch=epoch, val_map=progress.best["map"] if scores else None,
                        val_map50=progress.best["map50"], seed=ctx.seed, torch=str(torch.__version__),
                        train_images=len(parts.data), **ctx.provenance, **init_report(ctx))


def log_step(live: Live, logged: dict[str, float]) -> None:
    for k, v in logged.items():
        live.log_metric(k, v)
    tracking.log_epoch(live.step, logged)  # the same curves in MLflow, when a tracking URI is set
    live.next_step()


def summary(ctx: Context, parts: Parts, progress: Progress) -> dict:
    """The stage's report (``reports/train.json``)."""
    start, best, device = progress.start, progress.best, ctx.device
    return {
        "epochs": ctx.cfg.epochs,
        "resumed_from_epoch": start - 1 if start else None,
        "best_epoch": progress.best_epoch,
        "val_map": best["map"] if ctx.val_ids else None,  # the kept epoch's; None: no val split (split.allow_no_val)
        "val_map50": best["map50"] if ctx.val_ids else None,
        "seconds_per_epoch": float(np.mean(progress.epoch_s)) if progress.epoch_s else None,
        "train_seconds": float(np.sum(progress.epoch_s)),
        "train_images": len(parts.data),
        "parameters": sum(p.numel() for p in parts.net.parameters()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": str(device),
        "processes": ctx.ddp.world,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": machine.cpu_model(),
        "precision": ctx.precision,  # as run: train.precision=auto resolves per machine
        "precision_requested": ctx.cfg.precision,
        "machine": machine.describe(torch.cuda.get_device_name(device) if device.type == "cuda" else None),
        **init_report(ctx),
    }


def init_report(ctx: Context) -> dict:
    """Where the weights of step 0 came from: ``train.init_from``, its sha256 and the class mapping (None: scratch)."""
    return ctx.init.report() if ctx.init else {"init_from": None, "init_sha256": None, "init_version": None, "init_classes": None}
