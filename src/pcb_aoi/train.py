"""train: fit the detector from scratch on the augmented training split, validate every epoch.

dvclive logs the losses and validation mAP per epoch; the best epoch (validation mAP@0.5) is saved
as a self-describing checkpoint (``checkpoint.py``).
"""
from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from dvclive import Live
from tqdm import tqdm

from . import augment, checkpoint
from .config import TrainConfig
from .dataset import Dataset, atomic_dir, split_ids
from .inference import load_pair, predict, prepare_input, stack_padded, torch_runner
from .loss import box_loss, build_targets, focal_loss
from .metrics import coco_metrics
from .model import Detector, DetectorConfig


class PairDataset(torch.utils.data.Dataset):
    """(input (C, H, W), boxes (N, 4), labels (N,)) per image, optionally random-cropped."""

    def __init__(self, ds: Dataset, classes: tuple[str, ...], use_template: bool, crop: int, seed: int):
        self.ds, self.rows = ds, list(ds.images.itertuples(index=False))
        self.gt = ds.annotations([r.image_id for r in self.rows], classes)
        self.use_template = use_template
        self.crop = None
        if crop:
            # Crops that hold at least one defect: most of the signal at a fraction of the compute.
            self.crop = A.Compose([A.PadIfNeeded(crop, crop, border_mode=cv2.BORDER_CONSTANT, fill=255),
                                   A.AtLeastOneBBoxRandomCrop(crop, crop)],
                                  bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"],
                                                           min_visibility=0.5),
                                  additional_targets={"template": "image"}, seed=seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        test, template = load_pair(self.ds, row)
        g = self.gt[row.image_id]
        boxes, labels = g["boxes"], g["labels"]
        if self.crop is not None:
            test, template, boxes, labels = augment.apply(self.crop, test, template, boxes, labels)
            labels = np.asarray(labels, np.int64)
        x = prepare_input(test, template, self.use_template)
        return torch.from_numpy(x), torch.from_numpy(boxes), torch.from_numpy(labels)


def collate(batch):
    xs, boxes, labels = zip(*batch)
    return torch.from_numpy(stack_padded([x.numpy() for x in xs])), list(boxes), list(labels)


def train_one_epoch(model: Detector, loader, opt, sched) -> dict[str, float]:
    model.train()
    totals = {"loss": 0.0, "heat": 0.0, "box": 0.0}
    for x, boxes, labels in loader:
        heat_logits, pred_boxes = model(x)
        h, w = heat_logits.shape[-2:]
        heat, target, weight = build_targets(boxes, labels, model.cfg.num_classes, h, w, model.cfg.stride)
        l_heat = focal_loss(heat_logits, heat)
        l_box = box_loss(pred_boxes, target, weight)
        loss = l_heat + 2.0 * l_box
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for k, v in (("loss", loss), ("heat", l_heat), ("box", l_box)):
            totals[k] += v.item() / len(loader)
    return totals


def run(cfg: TrainConfig, seed: int, classes: tuple[str, ...], train_dir: str | Path, clean_dir: str | Path,
        split_dir: str | Path, model_out: str | Path, live_dir: str | Path) -> dict:
    torch.manual_seed(seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_ds, clean = Dataset.load(train_dir), Dataset.load(clean_dir)
    val_ids = split_ids(split_dir, "val")
    use_template = cfg.model.use_template and bool(train_ds.images["template_path"].astype(bool).all())
    model = Detector(DetectorConfig(num_classes=len(classes), in_channels=3 if use_template else 1,
                                    width=cfg.model.width, stride=cfg.model.stride))
    data = PairDataset(train_ds, classes, use_template, cfg.crop_size, seed)
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, cfg.batch_size, shuffle=True, collate_fn=collate, generator=gen,
                                         drop_last=len(data) > cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * len(loader), pct_start=0.15)
    val_gt = clean.annotations(val_ids, classes)
    best, best_epoch, epoch_s = -1.0, -1, []
    with atomic_dir(live_dir) as live_tmp, Live(dir=str(live_tmp), dvcyaml=False, save_dvc_exp=False,
                                                 report=None) as live:
        for epoch in (bar := tqdm(range(cfg.epochs), desc="train", unit="epoch")):
            t0 = time.perf_counter()
            losses = train_one_epoch(model, loader, opt, sched)
            epoch_s.append(time.perf_counter() - t0)
            preds = predict(torch_runner(model), clean, val_ids, use_template)
            val = coco_metrics(val_gt, preds, classes)
            for k, v in losses.items():
                live.log_metric(f"train/{k}", v)
            for k in ("map50", "map"):
                live.log_metric(f"val/{k}", val[k])
            live.next_step()
            bar.set_postfix(loss=f"{losses['loss']:.3f}", val_map50=f"{val['map50']:.3f}")
            if not np.isfinite(losses["loss"]):
                raise FloatingPointError(f"train: loss is {losses['loss']} at epoch {epoch}; lower train.lr")
            if val["map50"] > best:
                best, best_epoch = val["map50"], epoch
                checkpoint.save(model_out, model, classes, use_template, epoch=epoch, val_map50=best, seed=seed,
                                torch=str(torch.__version__), train_images=len(data))
    return {
        "epochs": cfg.epochs,
        "best_epoch": best_epoch,
        "val_map50": best,
        "seconds_per_epoch": float(np.mean(epoch_s)),
        "train_images": len(data),
        "parameters": sum(p.numel() for p in model.parameters()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
