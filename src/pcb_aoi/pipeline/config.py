"""Typed, closed configuration: one frozen pydantic model per ``params.yaml`` section.

The loader rejects unknown keys, wrong types (strict: ``"ten"`` or ``true`` is no int; an int is a
float) and values outside their allowed set, listing every problem with the full key
(``train.lr``, ``train.model.blocks[1]``), the value and what is allowed, so a typo stops a stage
before it does any work instead of being silently ignored. Ranges are ``Field`` constraints;
rules between keys are validators on the section that holds them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, field_validator,
                      model_validator)

CLASSES: tuple[str, ...] = ("open", "short", "mousebite", "spur", "copper", "pin-hole")
MAX_OVERLAYS = 100  # overlay PNGs live in git (reports/plots): keep their number bounded


class ConfigError(ValueError):
    """A params.yaml key is unknown, missing, mistyped or out of range."""


class Section(BaseModel):
    """A params.yaml section: immutable, closed (unknown keys refused), strictly typed."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


def _listed(item: Any) -> Any:
    """A field holding a tuple that params.yaml writes as a list: the list is accepted, items stay strict."""
    return Field(default=item, strict=False)


Probability = Annotated[float, Field(ge=0, le=1)]
Quality = Annotated[StrictInt, Field(ge=1, le=95)]  # JPEG quality
Blocks = Annotated[StrictInt, Field(ge=0, le=8)]  # residual blocks at one stride


class SynthConfig(Section):
    boards: int = Field(40, gt=0)  # distinct layouts; split groups by board
    images_per_board: int = Field(10, gt=0)  # crops of the same board, each with its own defects
    image_size: int = Field(256, multiple_of=32)  # square images, pixels
    defects_per_image: tuple[StrictInt, StrictInt] = _listed((2, 6))  # inclusive range
    class_mix: dict[str, float] = Field(default_factory=lambda: {c: 1.0 for c in CLASSES})
    max_shift_px: float = Field(1.0, ge=0)  # template misalignment, uniform in [-max, max] per axis
    noise_std: float = Field(6.0, ge=0)  # grey-level noise (0..255 scale)
    jpeg_quality: tuple[Quality, Quality] = _listed((75, 95))  # inclusive range

    @field_validator("defects_per_image")
    @classmethod
    def _defects_range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] <= v[1]:
            raise ValueError(f"need 0 <= min <= max, got {list(v)}")
        return v

    @field_validator("jpeg_quality")
    @classmethod
    def _quality_range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] > v[1]:
            raise ValueError(f"need min <= max, got {list(v)}")
        return v


RealSource = Literal["deeppcb", "voc", "yolo", "coco"]


class SourceConfig(Section):
    """One entry of ``ingest.sources``: a real dataset read beside the others into one dataset."""

    source: RealSource  # the reader
    uri: str = Field(min_length=1)  # a folder, an https:// zip/tar.gz, or azure://container/path
    name: str = Field("", pattern=r"^([a-z0-9][a-z0-9_.-]*)?$")  # namespace of its ids ("" = the reader's name)
    sha256: str = ""  # expected checksum of an https archive ("" = not checked)
    class_map: dict[str, str] = Field(default_factory=dict)  # source class name -> project class
    board_regex: str = ""  # regex on the image file stem whose group 1 is the board id ("" = per image)

    @property
    def namespace(self) -> str:
        """What prefixes its image and board ids: ``deeppcb`` -> ``deeppcb:00041``."""
        return self.name or self.source


class IngestConfig(Section):
    source: Literal["synthetic", "deeppcb", "voc", "yolo", "coco"] = "synthetic"
    uri: str = ""  # where real data lives: a folder, an https:// zip/tar.gz, or azure://container/path
    sha256: str = ""  # expected checksum of an https archive ("" = not checked)
    class_map: dict[str, str] = Field(default_factory=dict)  # source class name -> project class
    board_regex: str = ""  # regex on the image file stem whose group 1 is the board id ("" = per image)
    # several real sources in one dataset (ids become ``name:id``); () = the single source above
    sources: tuple[SourceConfig, ...] = _listed(())
    # the same picture from two sources with different boxes: error (stop, naming both) | first (keep the
    # labels of the source listed first) | last (those of the source listed last: corrections); reported
    label_conflict: Literal["error", "first", "last"] = "error"
    synthetic: SynthConfig = Field(default_factory=SynthConfig)

    @model_validator(mode="after")
    def _uri_for_real_data(self) -> IngestConfig:
        if self.sources:
            single = {"ingest.source": self.source != "synthetic", "ingest.uri": bool(self.uri),
                      "ingest.sha256": bool(self.sha256), "ingest.class_map": bool(self.class_map),
                      "ingest.board_regex": bool(self.board_regex)}
            set_ = [k for k, v in single.items() if v]
            if set_:
                raise ValueError(f"ingest.sources and {', '.join(set_)} are both set: with several sources each "
                                 f"entry of ingest.sources carries its own source, uri, sha256, class_map and "
                                 f"board_regex; move {set_[0]} into the entry and reset it ({set_[0]}: "
                                 f"{'synthetic' if set_[0] == 'ingest.source' else 'its default'})")
            names = [s.namespace for s in self.sources]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                where = [f"ingest.sources[{i}]" for i, n in enumerate(names) if n == twice[0]]
                raise ValueError(f"{' and '.join(where)} are both named {twice[0]!r} (the reader's name by "
                                 "default): give each a distinct `name`, it prefixes the source's image and board ids")
            return self
        if self.source != "synthetic" and not self.uri:
            raise ValueError(f"ingest.uri: required for ingest.source={self.source} "
                             "(a folder, https:// or azure:// URI)")
        return self


class EtlConfig(Section):
    min_box_px: float = Field(2.0, ge=0)  # boxes narrower or shorter than this are rejected as degenerate
    out_of_image: Literal["reject", "clip"] = "reject"  # a box crossing the image border
    # a VOC <size> other than the image's: reject the image, or scale its boxes by image / declared per axis
    voc_size_mismatch: Literal["reject", "rescale"] = "reject"
    tile_size: int = 0  # images larger than this (px) are cut into tiles of this size; 0 = never
    tile_overlap: int = 64  # px shared by neighbouring tiles
    tile_min_visibility: Probability = 0.5  # a cut box keeps its label if this fraction of it is in the tile
    # move each template onto its test image by up to this many px; 0 = as given
    register_max_px: int = Field(0, ge=0, le=64)

    @model_validator(mode="after")
    def _tiles(self) -> EtlConfig:
        if self.tile_size and (self.tile_size % 32 or self.tile_overlap >= self.tile_size):
            raise ValueError(f"etl.tile_size must be a multiple of 32 and larger than etl.tile_overlap, "
                             f"got {self.tile_size} and {self.tile_overlap}")
        return self


def board_key(board: str) -> str | int:
    """What identifies a board id in params: its number when it is all digits, so that ``41`` (YAML
    reads an unquoted ``41`` as an int) names DeepPCB's group ``00041``, else the id itself; with several
    sources (``ingest.sources``) ids are ``source:board`` and ``deeppcb:41`` names ``deeppcb:00041``."""
    source, sep, local = board.rpartition(":")
    if sep:
        return f"{source}:{int(local)}" if local.isdigit() else board
    return int(board) if board.isdigit() else board


class SplitConfig(Section):
    strategy: Literal["grouped", "official", "random"] = "grouped"
    val_fraction: Probability = 0.15
    test_fraction: Probability = 0.15
    val_groups: tuple[StrictStr, ...] = _listed(())  # board ids held out for val; () = carved by val_fraction
    test_groups: tuple[StrictStr, ...] = _listed(())  # board ids held out for test; () = carved by test_fraction
    allow_no_val: bool = False  # val_fraction 0 (no val split) is refused unless this is true

    @field_validator("val_groups", "test_groups", mode="before")
    @classmethod
    def _ids_as_strings(cls, v: Any) -> Any:
        """Board ids are strings in the data; YAML reads an unquoted ``20085`` as an int: accept it as "20085"."""
        if isinstance(v, (list, tuple)):
            return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        return v

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if (self.val_groups or self.test_groups) and self.strategy == "random":
            raise ValueError("split.val_groups / split.test_groups name boards, but split.strategy: random splits "
                             "images regardless of their board; use split.strategy: grouped")
        if self.test_groups and self.strategy == "official":
            raise ValueError("split.test_groups: not allowed with split.strategy: official (the test split is the "
                             "source's test list); use split.strategy: grouped to choose the test boards")
        both = [b for b in self.val_groups if board_key(b) in {board_key(t) for t in self.test_groups}]
        if both:
            raise ValueError(f"split.val_groups and split.test_groups both name board {both[0]!r}: validation "
                             "and test boards must be different boards")
        # only the fractions still in use: a list of boards replaces its fraction
        val = 0 if self.val_groups else self.val_fraction
        test = 0 if self.test_groups or self.strategy == "official" else self.test_fraction
        if val + test >= 1:
            raise ValueError("split.val_fraction + split.test_fraction must be between 0 and 1, "
                             f"got {self.val_fraction} + {self.test_fraction}")
        if self.test_fraction == 0 and not self.test_groups and self.strategy != "official":
            raise ValueError(f"split.test_fraction: 0 holds out no test boards (split.strategy: {self.strategy}), "
                             "but evaluate, the INT8 gate and the benchmark score on them; use a fraction above 0")
        if self.val_fraction == 0 and not self.val_groups and not self.allow_no_val:
            raise ValueError("split.val_fraction: 0 (and no split.val_groups) leaves no validation split, so the "
                             "training epoch kept and the INT8 accuracy gate would be chosen on the test boards, "
                             "whose scores would then no longer be held out; hold out validation boards "
                             "(split.val_fraction > 0 or split.val_groups) or set split.allow_no_val: true")
        return self


class AugmentConfig(Section):
    copies: int = Field(1, ge=0)  # augmented copies per training image, on top of the original
    hflip_p: Probability = 0.5
    vflip_p: Probability = 0.5
    rot90_p: Probability = 0.5
    brightness_contrast_p: Probability = 0.5
    noise_p: Probability = 0.3


class ModelConfig(Section):
    use_template: bool = True  # False: single-image mode for data without a template
    width: int = 32  # channels of the first stage; later stages scale from it
    stride: Literal[4, 8] = 4  # output stride of the detection heads
    # residual blocks at strides 4, 8, 16 (deeper = more context)
    blocks: tuple[Blocks, Blocks, Blocks] = _listed((1, 1, 2))
    # blocks at stride 16 dilated 1, 2, 4, ...: more context per block; false: all undilated, a smaller
    # receptive field, so a tile of the image (gate: tiles) computes closer to what the whole image does
    dilated: bool = True


class TrainConfig(Section):
    epochs: int = Field(20, gt=0)
    batch_size: int = Field(8, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = 1e-4
    # exponential moving average of the weights (validated, saved); 0 = off
    ema_decay: float = Field(0.0, ge=0, le=0.99999)
    crop_size: int = Field(160, multiple_of=32)  # random training crops (fully convolutional model); 0 = full image
    flip_rotate: bool = False  # random flips and 90-degree turns of each crop, every epoch
    scale_jitter: float = Field(0.0, ge=0, lt=1)  # random rescale by 1 +- this before cropping; 0 = off
    width_jitter: Probability = 0.0  # probability that a crop's copper grows or shrinks by 1 px (test and template)
    # half the crops: template moved by up to this many px per axis (misregistration)
    template_shift: int = Field(0, ge=0, le=32)
    background_crops: Probability = 0.0  # fraction of crops cut anywhere, not around a defect
    threads: int = 0  # torch intra-op threads; 0 = all cores
    workers: int = Field(1, ge=0, le=16)  # data-loading processes beside training; 0 = load in the training process
    # keep the decoded training images in RAM when they fit in this many MiB; 0 = never
    cache_mb: int = Field(4096, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = the GPU when torch sees one
    precision: Literal["auto", "fp32", "bf16"] = "fp32"  # bf16: autocast forward; auto: bf16 where native
    val_every: int = Field(1, gt=0)  # validate every N epochs (and after the last)
    resume: bool = True  # continue an interrupted run from models/checkpoints/last.pt when compatible
    # start from this pcb-aoi checkpoint's weights (fine-tuning); "" = from scratch. The train stage
    # requires it under models/init/, its DVC dep (pcb_aoi.model.finetune)
    init_from: str = ""
    model: ModelConfig = Field(default_factory=ModelConfig)

    @model_validator(mode="after")
    def _crops_for_jitter(self) -> TrainConfig:
        jitter = (self.flip_rotate or self.scale_jitter or self.width_jitter or self.template_shift
                  or self.background_crops)
        if jitter and not self.crop_size:
            raise ValueError("train.flip_rotate / train.scale_jitter / train.width_jitter / train.template_shift / "
                             "train.background_crops need train.crop_size > 0")
        return self


class EvaluateConfig(Section):
    # fixed: score_threshold is the operating point; auto: the threshold with the fewest false calls
    # on the validation split whose escape rate is at most max_escape_rate
    operating_point: Literal["fixed", "auto"] = "fixed"
    score_threshold: Probability = 0.3
    max_escape_rate: Probability = 0.01
    # test images drawn with true and predicted boxes, the same ones every run
    overlay_samples: int = Field(8, ge=0, le=MAX_OVERLAYS)
    # and the test images with the most misses, then false alarms
    overlay_worst: int = Field(8, ge=0, le=MAX_OVERLAYS)


class ExportConfig(Section):
    opset: int = Field(17, ge=17)
    parity_images: int = Field(8, ge=1)
    parity_atol: float = Field(1e-3, ge=0)  # max |torch - onnxruntime| on raw outputs


class QuantizeConfig(Section):
    # training images (original + augmented) the activation ranges come from
    calibration_images: int = Field(32, gt=0)
    calibration: Literal["minmax", "percentile"] = "minmax"  # how ranges are taken from them
    op_types: tuple[StrictStr, ...] = _listed(("Conv", "Add", "Relu", "Resize"))  # ONNX ops to quantize
    keep_float: tuple[StrictStr, ...] = _listed(())  # nodes whose name contains one of these stay float
    # accuracy gate: validation mAP@0.5 FP32 - INT8 at most this (mAP is 0..1); test split only without val
    max_map50_drop: Probability = 0.005
    # INT8 arithmetic (pcb_aoi.edge.int8): u8s7 is exact on every CPU
    format: Literal["u8s7", "u8s8", "u8u8"] = "u8s7"


class BenchmarkConfig(Section):
    warmup: int = Field(5, ge=0)
    runs: int = Field(50, gt=0)  # pairs timed one at a time (latency percentiles)
    stream_pairs: int = Field(100, ge=1)  # pairs in the read-ahead stream whose wall time gives fps
    threads: int = Field(0, ge=0)  # 0 = all cores
    # public detectors timed beside ours (deploy.peer; needs the optional, AGPL ultralytics: pcb-aoi[peer])
    peers: tuple[Literal["yolov8n", "yolo11n"], ...] = _listed(())


class GateConfig(Section):
    # none | tiles: run the network only around the places where a test image differs from its template
    # (pcb_aoi.edge.gate), when validation DeepPCB AP drops at most max_ap_drop; decided per model file by the
    # stage that writes it (export_onnx: FP32 files, quantize: INT8) and written into its contract
    mode: Literal["none", "tiles"] = "tiles"
    max_ap_drop: Probability = 0.003  # DeepPCB AP (0..1) gated may lose against dense on validation
    diff_threshold: int = Field(64, ge=0, le=254)  # grey levels a pixel must differ by
    tolerance_px: int = Field(1, ge=0, le=4)  # a change must exceed every template pixel within this many px
    min_size_px: int = Field(2, ge=1, le=16)  # a change counts where a square this wide differs entirely
    margin_px: int = Field(32, ge=0, le=256)  # context around a changed region (the network's receptive field)
    max_fraction: Probability = 0.5  # tiles covering more of the image than this: the pair runs dense


class Params(Section):
    seed: int = 0
    classes: tuple[StrictStr, ...] = _listed(CLASSES)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    etl: EtlConfig = Field(default_factory=EtlConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    gate: GateConfig = Field(default_factory=GateConfig)

    @model_validator(mode="after")
    def _known_classes(self) -> Params:
        unknown = sorted(set(self.ingest.synthetic.class_mix) - set(self.classes))
        if unknown:
            raise ValueError(f"ingest.synthetic.class_mix: unknown class(es) {unknown}; known: {list(self.classes)}")
        maps = {"ingest.class_map": self.ingest.class_map} | {
            f"ingest.sources[{i}].class_map": s.class_map for i, s in enumerate(self.ingest.sources)}
        for key, class_map in maps.items():
            bad = sorted(set(class_map.values()) - set(self.classes))
            if bad:
                raise ValueError(f"{key}: maps to unknown class(es) {bad}; known: {list(self.classes)}")
        return self


def _key(loc: tuple) -> str:
    """``("train", "model", "blocks", 1)`` -> ``train.model.blocks[1]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _annotation_at(loc: tuple) -> Any:
    """The type declared at ``loc`` (``("train", "model")`` -> ModelConfig), None below a plain field."""
    tp: Any = Params
    for part in loc:
        field = tp.model_fields.get(part) if isinstance(tp, type) and issubclass(tp, BaseModel) else None
        if field is None:
            return None
        tp = field.annotation
    return tp


_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
             "string_type": "a string", "tuple_type": "a list", "dict_type": "a mapping",
             "model_type": "a mapping of keys"}


def _describe(err: dict) -> str:
    """One pydantic error as ``key: problem, got value``."""
    loc, kind, got = tuple(err["loc"]), err["type"], repr(err.get("input"))
    key, parent = _key(loc), _key(loc[:-1])
    if kind == "value_error":  # our own rules; the cross-field ones name their keys themselves
        text = str(err["ctx"]["error"])
        return text if not loc or text.startswith(key) else f"{key}: {text}"
    if kind == "extra_forbidden":
        allowed = ", ".join(_annotation_at(loc[:-1]).model_fields)
        return f"{key}: unknown key; allowed under {parent or 'the top level'}: {allowed}"
    if loc and loc[-1] == "[key]":
        return f"{_key(loc[:-2])}: key {got} is not allowed; expected {_EXPECTED.get(kind, err['msg'])}"
    if kind == "literal_error":
        return f"{key}: {got} is not allowed; expected one of {err['ctx']['expected']}"
    if kind == "missing" and loc and isinstance(loc[-1], int):  # a fixed-length list one short
        return f"{parent}: expected a list of {len(get_args(_annotation_at(loc[:-1])))} values, got {got}"
    if kind == "too_long":
        return f"{key}: expected a list of {err['ctx']['max_length']} values, got {got}"
    what = _EXPECTED.get(kind)
    text = f"expected {what}" if what else err["msg"].replace("Input should be", "must be")
    return f"{key}: {text}, got {got} ({type(err.get('input')).__name__})"


def _config_error(e: ValidationError) -> ConfigError:
    problems = [_describe(err) for err in e.errors()]
    if len(problems) == 1:
        return ConfigError(problems[0])
    return ConfigError(f"{len(problems)} problems:\n  " + "\n  ".join(problems))


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; raise ConfigError naming every bad key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project root)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise _config_error(e) from e


def to_dict(obj: Any) -> Any:
    """Plain-python (yaml/json friendly) view of a config section: tuples become lists."""
    return obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
