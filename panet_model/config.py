"""PANet configuration: one frozen dataclass per component, nested in `PANetConfig`.

Only the builders read these. Every paper ablation (Tables 3 to 5) is a field here, so one
code path yields both the Mask R-CNN baseline (`rbl`) and the full PANet (`panet`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")

BackboneName = Literal[
    "resnet18", "resnet34", "resnet50", "resnet101", "resnext101_32x8d", "resnext101_64x4d"
]
BackboneNorm = Literal["frozen_bn", "bn", "syncbn", "gn"]
NeckNorm = Literal["none", "bn", "syncbn", "gn"]


@dataclass(frozen=True)
class BackboneConfig:
    name: BackboneName = "resnet50"  # ResNet / ResNeXt trunk of the FPN
    weights: str | None = None  # local path or file:// URI of ImageNet weights; never downloaded
    trainable_layers: int = 3  # stages trained, counted from the top (0..5), as in torchvision
    norm: BackboneNorm = "frozen_bn"  # paper RBL: frozen BN; MBN: syncbn
    frozen_bn_eps: float = 1e-5  # torchvision's COCO Mask R-CNN checkpoint was trained with 0.0
    width: int = 64  # stem channels (stages: w, 2w, 4w, 8w); < 64 only for CPU presets, ResNets
    dcn_stages: tuple[int, ...] = ()  # stages (2..5 = conv2_x..conv5_x) with deformable 3x3 convs


@dataclass(frozen=True)
class FPNConfig:
    out_channels: int = 256  # channels of P2..P6 (and N2..N6)
    norm: NeckNorm = "none"  # norm after the lateral and output convs (paper MBN: all new layers)


@dataclass(frozen=True)
class BPAConfig:
    enabled: bool = False  # bottom-up path augmentation, paper Sec. 3.1 (Table 3 "BPA")
    norm: NeckNorm = "none"  # norm after each 3x3 conv (authors' code: GN)


@dataclass(frozen=True)
class RPNConfig:
    anchor_sizes: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))  # per level
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # the same ratios on every level
    pre_nms_top_n_train: int = 2000  # proposals kept per level before NMS, training
    pre_nms_top_n_test: int = 1000  # proposals kept per level before NMS, inference
    post_nms_top_n_train: int = 2000  # proposals kept per image after NMS, training
    post_nms_top_n_test: int = 1000  # proposals kept per image after NMS, inference
    nms_thresh: float = 0.7  # RPN NMS IoU
    fg_iou_thresh: float = 0.7  # anchor positive IoU
    bg_iou_thresh: float = 0.3  # anchor negative IoU
    batch_size_per_image: int = 256  # anchors sampled per image for the RPN loss
    positive_fraction: float = 0.5  # positive share of those anchors
    score_thresh: float = 0.0  # proposals below this objectness are dropped


@dataclass(frozen=True)
class RoIConfig:
    fg_iou_thresh: float = 0.5  # RoI foreground IoU (paper)
    bg_iou_thresh: float = 0.5  # RoI background IoU upper bound
    batch_size_per_image: int = 512  # RoIs sampled per image (paper: 512)
    positive_fraction: float = 0.25  # positive : negative = 1 : 3 (paper)
    score_thresh: float = 0.05  # detections below this score are dropped at inference
    nms_thresh: float = 0.5  # per-class NMS IoU at inference
    detections_per_img: int = 100  # detections kept per image at inference
    sampling_ratio: int = 2  # RoIAlign sampling points per bin side
    canonical_scale: int = 224  # FPN level assignment, Eq. 1 of the FPN paper
    canonical_level: int = 4  # level of a canonical_scale^2 RoI


@dataclass(frozen=True)
class AFPConfig:
    enabled: bool = False  # adaptive feature pooling, paper Sec. 3.2 (Table 3 "AFP")
    fusion: Literal["max", "sum"] = "max"  # element-wise fusion over levels (Table 4)
    position: Literal["fc1fu.fc2", "fu.fc1fc2"] = "fc1fu.fc2"  # fuse after / before the 1st layer
    impl: Literal["grouped", "loop"] = "grouped"  # per-level layer: one batched op or 4 calls


@dataclass(frozen=True)
class BoxHeadConfig:
    type: Literal["2fc", "4conv1fc"] = "2fc"  # 4conv1fc is the paper's heavier head (HHD)
    pool_size: int = 7  # RoIAlign output side
    representation_size: int = 1024  # fc width
    conv_channels: int = 256  # conv width of the 4conv1fc head
    num_convs: int = 4  # convs of the 4conv1fc head (the first one is per level under AFP)
    norm: NeckNorm = "none"  # norm after each fc/conv (MBN: all new layers)
    class_agnostic: bool = False  # one box regressor for all classes (Detectron option)
    smooth_l1_beta: float = 1 / 9  # box loss beta: torchvision's 1/9; Detectron, authors: 1.0


@dataclass(frozen=True)
class FFConfig:
    enabled: bool = False  # fully-connected fusion, paper Sec. 3.3 (Table 3 "FF")
    start: Literal["conv2", "conv3", "conv4"] = "conv3"  # FCN layer the fc branch starts from
    fusion: Literal["sum", "max", "product"] = "sum"  # how fc and FCN logits combine (Table 5)
    trailing_relu: bool = False  # ReLU after the fc: in the authors' code, not in the paper


@dataclass(frozen=True)
class MaskHeadConfig:
    enabled: bool = True  # False: a detector alone (no mask branch)
    pool_size: int = 14  # RoIAlign output side; masks are 2x this (28)
    channels: int = 256  # FCN conv width
    num_convs: int = 4  # FCN convs (the first one is per level under AFP)
    dilation: int = 1  # FCN conv dilation
    norm: NeckNorm = "none"  # norm after each conv
    ff: FFConfig = field(default_factory=FFConfig)


@dataclass(frozen=True)
class TransformConfig:
    min_size: tuple[int, ...] = (800,)  # short side; the last one is the test scale
    max_size: int = 1333  # long side cap
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet RGB mean
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # ImageNet RGB std
    skip_resize_in_training: bool = False  # True when the data pipeline does MST upstream


@dataclass(frozen=True)
class TestConfig:
    scales: tuple[int, ...] = ()  # multi-scale testing: short sides; () = transform.min_size[-1]
    max_size: int = 0  # long-edge cap of the test resizes, 0 = transform.max_size
    flip: bool = False  # also test the horizontally flipped image (at every scale)
    box_vote: bool = False  # box voting: a kept box becomes the score-weighted mean of its voters
    box_vote_iou: float = 0.8  # box IoU of a voter with the kept box (Detectron: 0.8)
    mask_vote: bool = False  # mask voting: a mask becomes the score-weighted mean of its voters
    mask_vote_iou: float = 0.5  # mask IoU of a voter with the kept mask (MNC: 0.5)


@dataclass(frozen=True)
class PANetConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    bpa: BPAConfig = field(default_factory=BPAConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi: RoIConfig = field(default_factory=RoIConfig)
    afp: AFPConfig = field(default_factory=AFPConfig)
    box_head: BoxHeadConfig = field(default_factory=BoxHeadConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    test: TestConfig = field(default_factory=TestConfig)  # test-time tricks (paper Sec. 4.2)
    weights: str | None = None  # local path or file:// URI of a whole-model checkpoint

    @classmethod
    def preset(cls, name: str) -> PANetConfig:
        """Return a named configuration: one of `PRESETS` (`rbl`, `panet`, `tiny`, ...)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls().override(PRESETS[name])

    def override(self, updates: dict[str, Any]) -> PANetConfig:
        """Return a copy with dotted keys replaced, e.g. `{"afp.fusion": "sum"}`.

        Raises:
            ValueError: naming the key, for an unknown key or a value of the wrong type or range.
        """
        cfg = apply_overrides(self, updates)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The nested configuration as plain Python values (tuples become lists)."""
        return to_plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """The configuration as `{"dotted.key": value}`, e.g. for experiment tracking."""
        out: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                key = f"{prefix}{f.name}"
                if dataclasses.is_dataclass(value):
                    walk(key + ".", value)
                else:
                    out[key] = to_plain(value)

        walk("", self)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PANetConfig:
        """Build from a nested dict (e.g. YAML): every key is validated like `override`."""
        return cls().override(flatten(data))

    def validate(self) -> None:
        """Cross-field checks; raises ValueError naming the key."""
        require(self.backbone.trainable_layers in range(6), "backbone.trainable_layers", "0..5")
        b = self.backbone
        require(b.width > 0, "backbone.width", "a positive integer")
        require(
            set(b.dcn_stages) <= {2, 3, 4, 5} and len(set(b.dcn_stages)) == len(b.dcn_stages),
            "backbone.dcn_stages",
            "distinct ResNet stages among 2, 3, 4, 5 (e.g. [4, 5])",
        )
        if b.width != 64:
            require(
                b.name in ("resnet18", "resnet34", "resnet50", "resnet101"),
                "backbone.width",
                f"64 for {b.name} (only ResNets are narrowed)",
            )
        sizes = self.rpn.anchor_sizes
        require(len(sizes) == 5, "rpn.anchor_sizes", "one tuple for each of the 5 RPN levels")
        counts = {len(s) for s in sizes}
        require(
            len(counts) == 1 and all(len(s) > 0 for s in sizes),
            "rpn.anchor_sizes",
            "the same number of sizes on every level (the RPN head is shared across levels)",
        )
        require(len(self.rpn.aspect_ratios) > 0, "rpn.aspect_ratios", "at least one ratio")
        require(all(r > 0 for r in self.rpn.aspect_ratios), "rpn.aspect_ratios", "positive")
        for key in ("rpn.positive_fraction", "roi.positive_fraction"):
            value = self._get(key)
            require(0.0 < value <= 1.0, key, "a fraction in (0, 1]")
        for key in ("rpn.nms_thresh", "roi.nms_thresh", "roi.fg_iou_thresh", "rpn.fg_iou_thresh"):
            require(0.0 < self._get(key) <= 1.0, key, "an IoU in (0, 1]")
        for key in (
            "fpn.out_channels",
            "box_head.representation_size",
            "box_head.conv_channels",
            "box_head.num_convs",
            "box_head.pool_size",
            "mask_head.channels",
            "mask_head.num_convs",
            "mask_head.pool_size",
            "roi.batch_size_per_image",
            "rpn.batch_size_per_image",
            "transform.max_size",
        ):
            require(self._get(key) > 0, key, "a positive integer")
        require(len(self.transform.min_size) > 0, "transform.min_size", "at least one size")
        require(self.box_head.smooth_l1_beta >= 0, "box_head.smooth_l1_beta", ">= 0 (0: L1)")
        t = self.test
        require(all(v > 0 for v in t.scales), "test.scales", "positive short sides")
        require(t.max_size >= 0, "test.max_size", ">= 0 (0: transform.max_size)")
        for key in ("test.box_vote_iou", "test.mask_vote_iou"):
            require(0.0 < self._get(key) <= 1.0, key, "an IoU in (0, 1]")
        ff = self.mask_head.ff
        start = int(ff.start[-1])
        require(
            start <= self.mask_head.num_convs,
            "mask_head.ff.start",
            f"a conv of the {self.mask_head.num_convs}-conv mask head",
        )
        require(
            self.mask_head.channels % 2 == 0 or not ff.enabled,
            "mask_head.channels",
            "even (the FF branch halves it)",
        )

    def _get(self, dotted: str) -> Any:
        obj: Any = self
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj


PRESETS: dict[str, dict[str, Any]] = {
    # Mask R-CNN with FPN exactly as torchvision's maskrcnn_resnet50_fpn (paper Table 3 RBL).
    "rbl": {},
    # Full PANet (Table 3 last row): MBN + BPA + AFP + FF + HHD; MST comes from the data pipeline.
    "panet": {
        "backbone.norm": "syncbn",
        "backbone.trainable_layers": 5,
        "fpn.norm": "syncbn",
        "bpa.enabled": True,
        "bpa.norm": "syncbn",
        "afp.enabled": True,
        "box_head.type": "4conv1fc",
        "box_head.norm": "syncbn",
        "mask_head.norm": "syncbn",
        "mask_head.ff.enabled": True,
        "mask_head.ff.trailing_relu": True,
        "transform.skip_resize_in_training": True,
    },
    # Every PANet component, narrow and small: the CPU default for the demo and tests. Half-width
    # ResNet-18 and 32-channel neck and heads: a train step ~2x cheaper than at width 64.
    "tiny": {
        "backbone.name": "resnet18",
        "backbone.width": 32,
        "backbone.norm": "syncbn",
        "backbone.trainable_layers": 5,
        "fpn.out_channels": 32,
        "fpn.norm": "syncbn",
        "bpa.enabled": True,
        "bpa.norm": "syncbn",
        "rpn.anchor_sizes": ((16,), (32,), (64,), (128,), (256,)),
        "rpn.pre_nms_top_n_train": 600,
        "rpn.pre_nms_top_n_test": 300,
        "rpn.post_nms_top_n_train": 300,
        "rpn.post_nms_top_n_test": 100,
        "roi.batch_size_per_image": 64,  # the heads dominate a tiny step: 128 -> 64 is 1.7x faster
        "afp.enabled": True,
        "box_head.type": "4conv1fc",
        "box_head.representation_size": 256,
        "box_head.conv_channels": 32,
        "box_head.norm": "syncbn",
        "mask_head.channels": 32,
        "mask_head.norm": "syncbn",
        "mask_head.ff.enabled": True,
        "mask_head.ff.trailing_relu": True,
        "transform.min_size": (256,),
        "transform.max_size": 400,
        "transform.skip_resize_in_training": True,
    },
}


def require(ok: bool, key: str, expected: str) -> None:
    """Raise `ValueError` naming the config key unless `ok`."""
    if not ok:
        raise ValueError(f"config key {key!r}: expected {expected}")


def apply_overrides(obj: T, updates: dict[str, Any]) -> T:
    """A copy of the frozen dataclass `obj` with dotted keys replaced and type-checked.

    Raises:
        ValueError: naming the key, for an unknown key or a value of the wrong type.
    """
    for key, value in updates.items():
        obj = _replace_dotted(obj, key.split("."), value, key)
    return obj


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; dicts are sections, everything else a value."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def to_plain(value: Any) -> Any:
    """Nested dicts, lists and tuples as dicts and lists (YAML/JSON friendly)."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def _replace_dotted(obj: Any, parts: list[str], value: Any, full_key: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    head = parts[0]
    if head not in names:
        raise ValueError(
            f"unknown config key {full_key!r}: {type(obj).__name__} has no field {head!r} "
            f"(fields: {', '.join(sorted(names))}){_did_you_mean(obj, parts, full_key)}"
        )
    hints = typing.get_type_hints(type(obj))
    current = getattr(obj, head)
    if len(parts) == 1:
        if dataclasses.is_dataclass(current):
            raise ValueError(f"config key {full_key!r} is a section; set one of its fields")
        new = _coerce(value, hints[head], full_key)
    else:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"unknown config key {full_key!r}: {head!r} is not a section")
        new = _replace_dotted(current, parts[1:], value, full_key)
    return dataclasses.replace(obj, **{head: new})


def _did_you_mean(obj: Any, parts: list[str], full_key: str) -> str:
    """`; did you mean solver.max_steps?` for the closest key under `obj`, or "".

    The mistyped part is matched against `obj`'s fields; the rest of the key is matched against
    the keys under the chosen field, so a typo anywhere in a nested key gets a whole key back.
    """
    prefix = full_key.split(".")[: len(full_key.split(".")) - len(parts)]
    fields = [f.name for f in dataclasses.fields(obj)]
    keys = [*flatten(dataclasses.asdict(obj)), *fields]  # and sections: a key may stop at one
    match = difflib.get_close_matches(".".join(parts), keys, n=1, cutoff=0.75)
    if not match:  # a key without its section: `max_steps` for `solver.max_steps`
        match = [k for k in keys if k.endswith("." + parts[-1])][:1] if len(parts) == 1 else []
    if not match:
        heads = difflib.get_close_matches(parts[0], fields, n=1)
        match = [".".join([heads[0], *parts[1:]])] if heads else []
    return f"; did you mean {'.'.join([*prefix, match[0]])}?" if match else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"config key {key!r}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"config key {key!r}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ValueError(f"config key {key!r}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    raise ValueError(f"config key {key!r}: unsupported type {tp!r}")
