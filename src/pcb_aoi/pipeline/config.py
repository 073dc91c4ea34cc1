"""Typed, closed configuration: one frozen dataclass per ``params.yaml`` section.

The loader rejects unknown keys, wrong types and values outside their allowed set with a
message that names the full key (``train.lr``), so a typo stops a stage before it does any work
instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CLASSES: tuple[str, ...] = ("open", "short", "mousebite", "spur", "copper", "pin-hole")
MAX_OVERLAYS = 100  # overlay PNGs live in git (reports/plots): keep their number bounded


class ConfigError(ValueError):
    """A params.yaml key is unknown, missing, mistyped or out of range."""


@dataclass(frozen=True)
class SynthConfig:
    boards: int = 40  # distinct layouts; split groups by board
    images_per_board: int = 10  # crops of the same board, each with its own defects
    image_size: int = 256  # square images, pixels
    defects_per_image: tuple[int, int] = (2, 6)  # inclusive range
    class_mix: dict[str, float] = field(default_factory=lambda: {c: 1.0 for c in CLASSES})
    max_shift_px: float = 1.0  # template misalignment, uniform in [-max, max] per axis
    noise_std: float = 6.0  # grey-level noise (0..255 scale)
    jpeg_quality: tuple[int, int] = (75, 95)  # inclusive range


@dataclass(frozen=True)
class IngestConfig:
    source: Literal["synthetic", "deeppcb", "voc", "yolo", "coco"] = "synthetic"
    uri: str = ""  # where real data lives: a folder, an https:// zip/tar.gz, or azure://container/path
    sha256: str = ""  # expected checksum of an https archive ("" = not checked)
    class_map: dict[str, str] = field(default_factory=dict)  # source class name -> project class
    board_regex: str = ""  # regex on the image file stem whose group 1 is the board id ("" = per image)
    synthetic: SynthConfig = field(default_factory=SynthConfig)


@dataclass(frozen=True)
class EtlConfig:
    min_box_px: float = 2.0  # boxes narrower or shorter than this are rejected as degenerate
    out_of_image: Literal["reject", "clip"] = "reject"  # a box crossing the image border
    tile_size: int = 0  # images larger than this (px) are cut into tiles of this size; 0 = never
    tile_overlap: int = 64  # px shared by neighbouring tiles
    tile_min_visibility: float = 0.5  # a cut box keeps its label if this fraction of it is in the tile
    register_max_px: int = 0  # move each template onto its test image by up to this many px; 0 = as given


@dataclass(frozen=True)
class SplitConfig:
    strategy: Literal["grouped", "official", "random"] = "grouped"
    val_fraction: float = 0.15
    test_fraction: float = 0.15


@dataclass(frozen=True)
class AugmentConfig:
    copies: int = 1  # augmented copies per training image, on top of the original
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    rot90_p: float = 0.5
    brightness_contrast_p: float = 0.5
    noise_p: float = 0.3


@dataclass(frozen=True)
class ModelConfig:
    use_template: bool = True  # False: single-image mode for data without a template
    width: int = 32  # channels of the first stage; later stages scale from it
    stride: int = 4  # output stride of the detection heads
    blocks: tuple[int, int, int] = (1, 1, 2)  # residual blocks at strides 4, 8, 16 (deeper = more context)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 1e-4
    ema_decay: float = 0.0  # exponential moving average of the weights (validated, saved); 0 = off
    crop_size: int = 160  # random training crops (fully convolutional model); 0 = full image
    flip_rotate: bool = False  # random flips and 90-degree turns of each crop, every epoch
    scale_jitter: float = 0.0  # random rescale by 1 +- this before cropping; 0 = off
    width_jitter: float = 0.0  # probability that a crop's copper grows or shrinks by 1 px (test and template)
    template_shift: int = 0  # half the crops: template moved by up to this many px per axis (misregistration)
    background_crops: float = 0.0  # fraction of crops cut anywhere, not around a defect
    threads: int = 0  # torch intra-op threads; 0 = all cores
    workers: int = 1  # data-loading processes beside training; 0 = load in the training process
    cache_mb: int = 4096  # keep the decoded training images in RAM when they fit in this many MiB; 0 = never
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = the GPU when torch sees one
    precision: Literal["auto", "fp32", "bf16"] = "fp32"  # bf16: autocast forward; auto: bf16 where native
    val_every: int = 1  # validate every N epochs (and after the last)
    resume: bool = True  # continue an interrupted run from models/checkpoints/last.pt when compatible
    model: ModelConfig = field(default_factory=ModelConfig)


@dataclass(frozen=True)
class EvaluateConfig:
    score_threshold: float = 0.3  # operating point for recall and the confusion matrix
    overlay_samples: int = 8  # test images drawn with true and predicted boxes, the same ones every run
    overlay_worst: int = 8  # and the test images with the most misses, then false alarms


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 17
    parity_images: int = 8
    parity_atol: float = 1e-3  # max |torch - onnxruntime| on raw outputs


@dataclass(frozen=True)
class QuantizeConfig:
    calibration_images: int = 32  # training images (original + augmented) the activation ranges come from
    calibration: Literal["minmax", "percentile"] = "minmax"  # how ranges are taken from them
    op_types: tuple[str, ...] = ("Conv", "Add", "Relu", "Resize")  # ONNX ops to quantize
    keep_float: tuple[str, ...] = ()  # nodes whose name contains one of these stay float
    max_map50_drop: float = 0.005  # accuracy gate: test mAP@0.5 FP32 - INT8 at most this
    format: Literal["u8s7", "u8s8", "u8u8"] = "u8s7"  # INT8 arithmetic (pcb_aoi.edge.int8): u8s7 is exact on every CPU


@dataclass(frozen=True)
class BenchmarkConfig:
    warmup: int = 5
    runs: int = 50
    batch_size: int = 8  # for the throughput measurement
    threads: int = 0  # 0 = all cores


@dataclass(frozen=True)
class Params:
    seed: int = 0
    classes: tuple[str, ...] = CLASSES
    ingest: IngestConfig = field(default_factory=IngestConfig)
    etl: EtlConfig = field(default_factory=EtlConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the dataclass' own types."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; expected {_type_name(tp)}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_convert(k, kt, key): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unions are not supported in config ({key})")
    # bool is a subclass of int: refuse True where a number is expected, and vice versa.
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, raw: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key(s) {', '.join(where + str(k) for k in unknown)}; "
            f"allowed under {prefix or 'the top level'}: {', '.join(names)}"
        )
    kwargs = {
        name: _convert(raw[name], hints[name], f"{prefix}.{name}" if prefix else name)
        for name in names
        if name in raw
    }
    return cls(**kwargs)


def _validate(p: Params) -> None:
    """Cross-field rules that types alone cannot express."""
    unknown = sorted(set(p.ingest.synthetic.class_mix) - set(p.classes))
    if unknown:
        raise ConfigError(f"ingest.synthetic.class_mix: unknown class(es) {unknown}; known: {list(p.classes)}")
    lo, hi = p.ingest.synthetic.defects_per_image
    if not 0 <= lo <= hi:
        raise ConfigError(f"ingest.synthetic.defects_per_image: need 0 <= min <= max, got {[lo, hi]}")
    if not 0 < p.split.val_fraction + p.split.test_fraction < 1:
        raise ConfigError("split.val_fraction + split.test_fraction must be between 0 and 1")
    if p.train.model.stride not in (4, 8):
        raise ConfigError(f"train.model.stride: {p.train.model.stride} is not allowed; expected 4 or 8")
    if not all(0 <= n <= 8 for n in p.train.model.blocks):
        raise ConfigError(f"train.model.blocks: {list(p.train.model.blocks)} must be three counts in 0..8")
    if not 0 <= p.train.scale_jitter < 1:
        raise ConfigError(f"train.scale_jitter: {p.train.scale_jitter} must be in [0, 1)")
    t = p.train
    if (t.flip_rotate or t.scale_jitter or t.width_jitter or t.template_shift or t.background_crops) and not t.crop_size:
        raise ConfigError("train.flip_rotate / train.scale_jitter / train.width_jitter / train.template_shift / "
                          "train.background_crops need train.crop_size > 0")
    inf = float("inf")
    s, a = p.ingest.synthetic, p.augment
    ranges = {  # key: (value, lowest, highest allowed), inclusive; the ranges params.yaml documents
        "ingest.synthetic.max_shift_px": (s.max_shift_px, 0, inf),
        "ingest.synthetic.noise_std": (s.noise_std, 0, inf),
        "ingest.synthetic.jpeg_quality[0]": (s.jpeg_quality[0], 1, s.jpeg_quality[1]),
        "ingest.synthetic.jpeg_quality[1]": (s.jpeg_quality[1], s.jpeg_quality[0], 95),
        "etl.min_box_px": (p.etl.min_box_px, 0, inf),
        "etl.tile_min_visibility": (p.etl.tile_min_visibility, 0, 1),
        "etl.register_max_px": (p.etl.register_max_px, 0, 64),
        "split.val_fraction": (p.split.val_fraction, 0, 1),
        "split.test_fraction": (p.split.test_fraction, 0, 1),
        "train.width_jitter": (p.train.width_jitter, 0, 1),
        "train.ema_decay": (p.train.ema_decay, 0, 0.99999),
        "train.workers": (p.train.workers, 0, 16),
        "train.template_shift": (p.train.template_shift, 0, 32),
        "train.background_crops": (p.train.background_crops, 0, 1),
        "train.cache_mb": (p.train.cache_mb, 0, inf),
        "augment.copies": (a.copies, 0, inf),
        **{f"augment.{k}": (getattr(a, k), 0, 1) for k in ("hflip_p", "vflip_p", "rot90_p", "brightness_contrast_p", "noise_p")},
        "evaluate.score_threshold": (p.evaluate.score_threshold, 0, 1),
        "evaluate.overlay_samples": (p.evaluate.overlay_samples, 0, MAX_OVERLAYS),
        "evaluate.overlay_worst": (p.evaluate.overlay_worst, 0, MAX_OVERLAYS),
        "export.opset": (p.export.opset, 17, inf),
        "export.parity_images": (p.export.parity_images, 1, inf),
        "export.parity_atol": (p.export.parity_atol, 0, inf),
        "benchmark.warmup": (p.benchmark.warmup, 0, inf),
        "benchmark.batch_size": (p.benchmark.batch_size, 1, inf),
        "benchmark.threads": (p.benchmark.threads, 0, inf),
    }
    for key, (v, lo, hi) in ranges.items():
        if not lo <= v <= hi:
            raise ConfigError(f"{key}: {v} is out of range; allowed {lo}..{hi if hi < inf else 'any'}")
    for key, v in {"train.crop_size": p.train.crop_size}.items():
        if v % 32:
            raise ConfigError(f"{key}: {v} must be a multiple of 32 (0 = full image)")
    positive = {
        "ingest.synthetic.boards": p.ingest.synthetic.boards,
        "ingest.synthetic.images_per_board": p.ingest.synthetic.images_per_board,
        "train.epochs": p.train.epochs,
        "train.batch_size": p.train.batch_size,
        "train.lr": p.train.lr,
        "train.val_every": p.train.val_every,
        "benchmark.runs": p.benchmark.runs,
        "quantize.calibration_images": p.quantize.calibration_images,
    }
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{key}: must be > 0, got {v}")
    if p.ingest.source != "synthetic" and not p.ingest.uri:
        raise ConfigError(f"ingest.uri: required for ingest.source={p.ingest.source} (a folder, https:// or azure:// URI)")
    bad = sorted(set(p.ingest.class_map.values()) - set(p.classes))
    if bad:
        raise ConfigError(f"ingest.class_map: maps to unknown class(es) {bad}; known: {list(p.classes)}")
    if p.etl.tile_size and (p.etl.tile_size % 32 or p.etl.tile_overlap >= p.etl.tile_size):
        raise ConfigError("etl.tile_size must be a multiple of 32 and larger than etl.tile_overlap")
    if not 0 <= p.quantize.max_map50_drop <= 1:
        raise ConfigError(f"quantize.max_map50_drop: {p.quantize.max_map50_drop} must be in [0, 1] (mAP is 0..1)")
    if p.ingest.synthetic.image_size % 32:
        raise ConfigError("ingest.synthetic.image_size must be a multiple of 32")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; raise ConfigError naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project root)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    params = _build(Params, raw, "")
    _validate(params)
    return params


def to_dict(obj: Any) -> Any:
    """Plain-python (yaml/json friendly) view of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
