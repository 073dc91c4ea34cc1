"""Training crops: the (input, boxes, labels) items the training loop learns from, and the per-crop
augmentations that happen every epoch (the augment stage's copies are fixed on disk).

Random crops that hold a defect (or, a fraction of them, anywhere), optional scale jitter, flips and
turns, copper-width jitter and template shifts. Every draw is a function of (seed, epoch, index), so the
crops do not depend on the number of loader processes, and a resumed run sees the crops an uninterrupted
one would have.
"""
from __future__ import annotations

import math

import albumentations as A
import cv2
import numpy as np
import torch
from tqdm import tqdm

from ..data import augment
from ..data.dataset import Dataset
from ..edge.preprocess import move_image
from .inference import load_pair, prepare_input, stack_padded


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
