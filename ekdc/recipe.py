"""Recipes: YAML read with ``yaml.safe_load``, validated by a typed pydantic schema.

Nothing in a recipe can import or run code: it is plain data, and every field has a type. Errors name
the key path (``distill.temperature: must be > 0``) and, for unknown keys, suggest the closest one.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError


# a file or folder name: no path separators, and not "." or ".." (which would point outside runs/)
SAFE_NAME = r"^[A-Za-z0-9_.-]*[A-Za-z0-9_-][A-Za-z0-9_.-]*$"
MAX_SEED = 2**32 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _rgb_triple(v, positive: bool = False):
    import math

    if v is not None and len(v) != 3:
        raise ValueError("must list 3 values (R, G, B)")
    if v is not None and not all(math.isfinite(x) for x in v):
        raise ValueError("must be finite numbers")
    if positive and v is not None and any(x <= 0 for x in v):
        raise ValueError("must be > 0")
    return v


PAD_CROP_UP_TO_PX = 64  # images up to this size get pad-crop augmentation by default; larger, resized crops
CENTER_CROP = 0.875  # photos: decoded with the shorter side at size / 0.875, evaluated on the centre crop


class Augment(_Strict):
    kind: Optional[Literal["pad_crop", "resized_crop"]] = Field(
        None, description="pad_crop (small images) or resized_crop (RandomResizedCrop, photos); default by image size")
    crop_padding: int = Field(4, ge=0, description="pad_crop: random crop after zero padding by this many pixels")
    scale: list[float] = Field(default_factory=lambda: [0.08, 1.0], min_length=2, max_length=2,
                               description="resized_crop: the crop's share of the image's area, min and max")
    ratio: list[float] = Field(default_factory=lambda: [0.75, 4 / 3], min_length=2, max_length=2,
                               description="resized_crop: the crop's aspect ratio, min and max")
    hflip: bool = True

    @model_validator(mode="after")
    def _ranges(self):
        if not 0 < self.scale[0] <= self.scale[1] <= 1 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError("scale must be 0 < min <= max <= 1 and ratio 0 < min <= max")
        return self


class DataConfig(_Strict):
    dataset: Literal["cifar10", "cifar100", "imagefolder", "digits", "synthetic"]
    root: Optional[str] = Field(None, description="cifar: torchvision root; imagefolder: the training root")
    download: bool = Field(False, description="cifar: let torchvision download the data set")
    val_root: Optional[str] = Field(None, description="imagefolder: a separate validation root")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="validation share carved from training data")
    val_per_class: Optional[int] = Field(None, gt=0, description="validation images per class (overrides val_fraction)")
    train_fraction: Optional[float] = Field(None, gt=0, le=1, description="limited data: keep this share")
    per_class: Optional[int] = Field(None, gt=0, description="limited data: keep this many images a class")
    image_size: int = Field(32, ge=8, le=512)
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    augment: Union[Augment, bool] = True
    loader: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: decode every image once; stream: decode per batch in worker processes; "
                            "auto: stream an image folder whose decoded splits exceed memory_budget_gb")
    memory_budget_gb: float = Field(2.0, gt=0, description="auto: the most decoded images held in memory")
    skip_bad_files: bool = Field(False, description="imagefolder: leave files that cannot be read out of the split "
                                                    "(counted) instead of stopping at the first")
    workers: Optional[int] = Field(None, ge=0, description="stream: decoding processes (default: the cores, at most 4)")
    split_seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the train/validation split (kept apart from the run seed)")
    # synthetic data (tests only)
    num_classes: int = Field(10, ge=2, description="synthetic only")
    num_samples: int = Field(256, ge=4, description="synthetic only")

    _mean = field_validator("mean")(classmethod(lambda cls, v: _rgb_triple(v)))
    _std = field_validator("std")(classmethod(lambda cls, v: _rgb_triple(v, positive=True)))

    @model_validator(mode="after")
    def _limited_one_way(self):
        aug = self.augment_config
        if aug is not None and aug.crop_padding > self.image_size:
            raise ValueError(f"augment.crop_padding {aug.crop_padding} is larger than the image ({self.image_size} px)")
        if self.train_fraction is not None and self.per_class is not None:
            raise ValueError("set either train_fraction or per_class, not both")
        if self.dataset == "imagefolder" and not self.root:
            raise ValueError("imagefolder needs data.root (the training folder)")
        return self

    @property
    def view(self) -> str:
        """How images are decoded and evaluated: ``pad_crop`` resizes them to the image size;
        ``resized_crop`` resizes the shorter side to size / 0.875 and keeps the centre (photos)."""
        aug = self.augment if isinstance(self.augment, Augment) else None
        if aug is not None and aug.kind is not None:
            return aug.kind
        return "pad_crop" if self.image_size <= PAD_CROP_UP_TO_PX else "resized_crop"

    @property
    def augment_config(self) -> Augment | None:
        if self.augment is False:
            return None
        aug = Augment() if self.augment is True else self.augment
        return aug if aug.kind is not None else aug.model_copy(update={"kind": self.view})


class Schedule(_Strict):
    """How one network is trained: used by each teacher and by the student."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = True
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


_ONNX_ONLY = ("channel_order", "layout", "outputs")
_PRETRAINED_SOURCES = ("torchvision:", "timm:")


class TeacherConfig(_Strict):
    """One teacher, from exactly one source: ``arch`` (ekdc's registry, ``torchvision:NAME``, ``timm:NAME``)
    or ``onnx`` (a frozen model from any framework)."""

    name: Optional[str] = Field(None, pattern=SAFE_NAME,
                                description="defaults to the architecture (or the ONNX file's stem), numbered if repeated")
    arch: Optional[str] = Field(None, description="NAME (registry), torchvision:NAME or timm:NAME")
    onnx: Optional[str] = Field(None, description="an ONNX classifier from any framework, used as it is")
    weights: Optional[str] = Field(None, description="a weight file: a state dict or a checkpoint holding one")
    checkpoint: Optional[str] = Field(None, description="old name of weights: (the file is used as it is, not trained)")
    pretrained: Union[bool, str] = Field(False, description="torchvision:/timm: the library's weights (true, or a weights name)")
    classes: Optional[list[str]] = Field(None, min_length=1, description="the model's output classes, in order")
    input_size: Optional[int] = Field(None, ge=8, le=1024, description="default: the model's own, else the data's")
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    channel_order: Literal["rgb", "bgr"] = "rgb"
    layout: Literal["nchw", "nhwc"] = "nchw"
    outputs: Literal["logits", "probabilities"] = "logits"
    train: Optional[Schedule] = Field(None, description="fine-tune or train here; default: registry models "
                                                        "without weights train, everything else is used as it is")
    freeze_backbone: bool = Field(False, description="train the head only (a linear probe)")
    backbone_lr_scale: float = Field(0.1, gt=0, description="backbone learning rate / head's, for a model with weights")

    _mean = field_validator("mean")(classmethod(lambda cls, v: _rgb_triple(v)))
    _std = field_validator("std")(classmethod(lambda cls, v: _rgb_triple(v, positive=True)))

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v):
        if v is not None:
            from .teachers.torch_models import check_arch

            check_arch(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _checkpoint_alias(cls, data):
        # `checkpoint:` always meant "load this file instead of training": weights, used as they are
        if isinstance(data, dict) and data.get("checkpoint"):
            if data.get("weights"):
                raise ValueError("give weights: or its old name checkpoint:, not both")
            data = {**data, "weights": data["checkpoint"], "checkpoint": None, "train": None}
        return data

    @model_validator(mode="after")
    def _one_source(self):
        if (self.arch is None) == (self.onnx is None):
            raise ValueError("give exactly one of arch: (registry, torchvision:NAME, timm:NAME) and onnx: (a file)")
        given = self.model_fields_set
        if self.onnx is not None:
            for key in ("weights", "pretrained", "train", "freeze_backbone"):
                if key in given and getattr(self, key) not in (None, False):
                    raise ValueError(f"{key}: does not apply to an onnx: teacher (it is used as it is: no weights to "
                                     "load, no fine-tuning)")
        else:
            wrong = [k for k in _ONNX_ONLY if getattr(self, k) != TeacherConfig.model_fields[k].default]
            if wrong:
                raise ValueError(f"{wrong[0]}: applies to onnx: teachers only (a PyTorch teacher takes RGB NCHW logits)")
            if self.pretrained not in (False, None) and not self.arch.startswith(_PRETRAINED_SOURCES):
                raise ValueError("pretrained: applies to torchvision: and timm: models (for a registry model, give weights:)")
            if self.pretrained not in (False, None) and self.weights:
                raise ValueError("give pretrained: or weights:, not both")
        if "train" not in given:
            from_scratch = self.arch is not None and ":" not in self.arch and not self.weights
            self.train = Schedule() if from_scratch else None
        if self.arch is not None and not self.weights and not self.pretrained:
            if ":" in self.arch and self.train is None:
                raise ValueError(f"{self.arch} has no weights: give pretrained:, weights:, or train: to train it here "
                                 "(used as it is, it would be a random network)")
            if self.freeze_backbone:
                raise ValueError("freeze_backbone: needs a teacher that starts from weights (weights: or pretrained:); "
                                 "a backbone trained from scratch cannot stay frozen")
        return self

    @property
    def default_name(self) -> str:
        if self.arch is not None:
            return self.arch.split(":", 1)[-1].split(".", 1)[0]
        import re

        return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(self.onnx).stem) or "onnx"


# what ``student.latency_ms`` leaves to the planner (``ekdc plan``): giving any of them beside it is an error
PLANNED_KEYS = ("trunk_width", "trunk_blocks", "branch_widths", "branch_blocks", "block", "expand_ratio")


class StudentConfig(_Strict):
    arch: Literal["ekd_student"] = "ekd_student"
    latency_ms: Optional[float] = Field(
        None, gt=0, allow_inf_nan=False, description="plan the student for this p50 latency (ms, batch 1, fp32, ONNX Runtime CPU, all usable "
                                "cores) on this machine before training, instead of giving its widths and depths")
    num_branches: Optional[int] = Field(None, ge=1, description="defaults to the number of teachers")
    trunk_width: int = Field(16, ge=1)
    trunk_blocks: int = Field(1, ge=0)
    branch_widths: list[int] = Field(default_factory=lambda: [32, 64], min_length=1)
    branch_blocks: int = Field(1, ge=1, description="residual blocks per branch stage")
    stem: Optional[Literal["cifar", "imagenet"]] = Field(
        None, description="cifar: 3x3 stride 1; imagenet: two 3x3 stride-2 convolutions; default by image size")
    block: Literal["basic", "inverted_residual"] = Field("basic", description="basic residual, or MobileNetV2's")
    expand_ratio: int = Field(6, ge=1, description="inverted_residual: the expansion of its 1x1 convolution")

    @field_validator("branch_widths")
    @classmethod
    def _positive(cls, v):
        if any(w < 1 for w in v):
            raise ValueError("every width must be >= 1")
        return v

    @model_validator(mode="after")
    def _planned_or_given(self):
        if self.latency_ms is not None:
            given = [k for k in PLANNED_KEYS if k in self.model_fields_set]
            if given:
                raise ValueError(f"latency_ms plans the student's widths, depths and block kind: remove "
                                 f"{', '.join(given)} (or latency_ms)")
        return self

    def model_kwargs(self) -> dict:
        """The arguments of ``create_model("ekd_student", num_classes=..., **kwargs)``."""
        return self.model_dump(exclude={"arch", "latency_ms"})


class LossWeights(_Strict):
    ce: float = Field(1.0, ge=0, description="per-branch cross-entropy")
    ens: float = Field(1.0, ge=0, description="cross-entropy of the averaged logits")
    kd: float = Field(1.0, ge=0, description="per-branch KL to its teacher at temperature T, times T^2")
    feat: float = Field(0.0, ge=0, description="per-branch feature matching through a linear adapter")


IMAGENET_STEM_FROM_PX = 64  # image sizes above this get the stride-4 stem by default

# the loss terms each mode trains on (feature matching pairs branch i with teacher i: ekd only)
MODE_TERMS = {"ce": ("ce", "ens"), "avg_kd": ("ce", "ens", "kd"), "ekd": ("ce", "ens", "kd", "feat")}


class TeacherCacheConfig(_Strict):
    """FKD's cache: the teachers run once on ``views`` fixed augmented views of every training image,
    and the student stage reads their stored outputs instead of running them every step."""

    views: int = Field(0, ge=0, le=1000, description="fixed augmented views per image (0: no cache, live teachers)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="the views' own seed: runs with other recipe seeds share views")
    path: Optional[str] = Field(None, min_length=1, description="the folder caches are kept in (default: the run's "
                                                                "teacher_cache/); point it at another run's to reuse that cache")


class DistillConfig(Schedule):
    temperature: float = Field(4.0, gt=0, description="softening temperature T of the KD term")
    weights: LossWeights = Field(default_factory=LossWeights)
    teacher_cache: TeacherCacheConfig = Field(default_factory=TeacherCacheConfig)


class Recipe(_Strict):
    name: str = Field("run", pattern=SAFE_NAME, description="the run folder's name: letters, digits, _ . -")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    mode: Literal["ekd", "avg_kd", "ce"] = "ekd"
    data: DataConfig
    teachers: list[TeacherConfig] = Field(min_length=1)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.student.stem is None:  # a 3x3 stride-1 stem suits small images; photos want stride 4
            self.student.stem = "cifar" if self.data.image_size <= IMAGENET_STEM_FROM_PX else "imagenet"
        if self.student.num_branches is None:
            self.student.num_branches = len(self.teachers)
        elif self.student.num_branches != len(self.teachers):
            raise ValueError(
                f"student.num_branches is {self.student.num_branches} but there are {len(self.teachers)} "
                "teachers: EKD trains one branch per teacher"
            )
        seen: dict[str, int] = {}
        for t in self.teachers:
            base = t.default_name
            if t.name is None:
                n = seen.get(base, 0)
                t.name = base if n == 0 else f"{base}_{n}"
            seen[base] = seen.get(base, 0) + 1
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique, got {names}")
        if self.mode == "ekd" and self.distill.weights.feat > 0:
            no_features = [i for i, t in enumerate(self.teachers) if t.onnx is not None]
            if no_features:
                raise ValueError(f"teachers.{no_features[0]}: an onnx: teacher has no features to match; set "
                                 "distill.weights.feat: 0")
        if self.distill.teacher_cache.views > 1 and self.data.augment_config is None:
            raise ValueError(f"distill.teacher_cache.views: {self.distill.teacher_cache.views} views of images that "
                             "are not augmented (data.augment: false) are all the same image; set views: 1")
        terms = MODE_TERMS[self.mode]
        w = self.distill.weights
        if not any(getattr(w, t) > 0 for t in terms):
            raise ValueError(f"distill.weights: every term mode '{self.mode}' trains on is 0 "
                             f"({', '.join(f'weights.{t}' for t in terms)}): there is nothing to learn")
        return self


# --------------------------------------------------------------------------------------------------
# loading, overrides, error messages


def _format_loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in ("function-after", "function-before"))


def _schema_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (for 'did you mean')."""
    import typing

    cls: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return cls
        ann = field.annotation
        candidates = [ann, *typing.get_args(ann)]
        nxt = None
        for c in candidates:
            for cc in [c, *typing.get_args(c)]:
                if isinstance(cc, type) and issubclass(cc, BaseModel):
                    nxt = cc
        cls = nxt if nxt is not None else cls
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _first_error(err: ValidationError, where: str, schema: type[BaseModel] | None = None) -> str:
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # pydantic names the union member it tried as an extra loc part ("Augment", "bool"); drop those,
    # not the user's own keys (which may be capitalised)
    union_tags = {"bool", "int", "float", "str"} | {
        c.__name__ for c in globals().values() if isinstance(c, type) and issubclass(c, BaseModel)}
    unknown_key = len(loc) - 1 if e["type"] == "extra_forbidden" else None  # the user's key, whatever its name
    loc = tuple(p for i, p in enumerate(loc) if not (i > 0 and i != unknown_key and p in union_tags))
    path = _format_loc(loc)
    if e["type"] == "extra_forbidden":
        owner = _schema_at(schema or Recipe, loc[:-1])
        hint = ""
        if owner is not None:
            close = difflib.get_close_matches(str(loc[-1]), list(owner.model_fields), n=1)
            if close:
                hint = f" (did you mean '{close[0]}'?)"
        return f"{where}: unknown key '{path}'{hint}"
    if e["type"] == "missing":
        return f"{where}: {path}: required key is missing"
    if e["type"] == "string_pattern_mismatch":
        return f"{where}: {path}: must be a file name of letters, digits, '_', '.' and '-' (not '.' or '..')"
    msg = e["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    msg = msg.replace("Input should be", "must be").replace("greater than or equal to", ">=")
    msg = msg.replace("greater than", ">").replace("less than or equal to", "<=").replace("less than", "<")
    return f"{where}: {path}: {msg}" if path else f"{where}: {msg}"


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise UserError(f"--set {item!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to the raw recipe mapping."""
    for item in overrides or []:
        parts, value = _parse_override(item)
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UserError(f"--set {item}: '{where}' is not an index of a list of {len(node)}")
                node = node[int(part)]
            elif isinstance(node, dict):
                if node.get(part) is None:
                    _check_known_path(parts[: i + 1], item)
                    node[part] = {}
                node = node[part]
            else:
                raise UserError(f"--set {item}: '{where}' is not a mapping")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise UserError(f"--set {item}: '{'.'.join(parts)}' is not an index of a list of {len(node)}")
            node[int(last)] = value
        else:
            _check_known_path(parts, item)
            node[last] = value
    return raw


def _check_known_path(parts: list[str], item: str) -> None:
    owner = _schema_at(Recipe, tuple(int(p) if p.isdigit() else p for p in parts[:-1]))
    if owner is None:
        return
    if parts[-1] not in owner.model_fields:
        close = difflib.get_close_matches(parts[-1], list(owner.model_fields), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(owner.model_fields)})"
        raise UserError(f"--set {item}: unknown key '{'.'.join(parts)}'{hint}")


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"recipe not found: {path}")
    if path.is_dir():
        raise UserError(f"recipe {path} is a folder, not a YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise UserError(f"{path}: not valid YAML{at}: {problem}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a recipe") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of keys to values, got {type(raw).__name__}")
    return raw


def _resolve_paths(recipe: Recipe, base: Path) -> None:
    """Relative data roots and checkpoints are read relative to the working directory, which is how
    people usually type them, else relative to the recipe file's folder. A path found either way is made
    absolute, so the run folder's recipe.yaml works from any directory (``ekdc export``, ``--resume``)."""

    def fix(p: str | None) -> str | None:
        if p is None or os.path.isabs(p):
            return p
        for cand in (Path(p), base / p):
            if cand.exists():
                return str(cand.resolve())
        # not there (yet: a torchvision root with download; or gone): absolute all the same, so that the
        # run's recipe.yaml says where it was looked for, and is read alike from any folder
        return str(Path(p).resolve())

    recipe.data.root = fix(recipe.data.root)
    recipe.data.val_root = fix(recipe.data.val_root)
    for t in recipe.teachers:
        t.weights = fix(t.weights)
        t.onnx = fix(t.onnx)
    recipe.distill.teacher_cache.path = fix(recipe.distill.teacher_cache.path)


def recipe_from_dict(raw: dict, where: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(_first_error(err, where)) from None


def student_from_dict(raw: Any, where: str) -> StudentConfig:
    """One ``student:`` mapping on its own (a candidate of ``ekdc plan --candidates``)."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping of student keys (trunk_width, branch_widths, ...), "
                        f"got {type(raw).__name__}")
    try:
        return StudentConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(_first_error(err, where, StudentConfig)) from None


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read, override (``--set key.path=value``) and validate a recipe."""
    path = Path(path)
    raw = apply_overrides(_read_yaml(path), overrides)
    recipe = recipe_from_dict(raw, where=str(path))
    _resolve_paths(recipe, path.resolve().parent)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    raw = recipe.model_dump(mode="json")
    if recipe.student.latency_ms is not None:  # the planner's keys hold defaults: written out, they would clash
        raw["student"] = {k: v for k, v in raw["student"].items() if k not in PLANNED_KEYS}
    return yaml.safe_dump(raw, sort_keys=False)
