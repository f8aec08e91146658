"""The recipe's schema: every key, its type, its range, its default, and the rules between keys.

A recipe is plain data: nothing in it can import or run code. Each domain owns its part: ``data:`` is
``ekdc.data.DataConfig``; the student objective's terms and their settings come from ``ekdc.losses``'
registry (``distill.weights.<term>``, ``distill.<term>: {...}``); the architectures a teacher may name
from the model registries. Reading YAML, ``--set`` and error messages are ``loading.py``'s.
"""
from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails

from ..data.config import MAX_SEED, DataConfig, rgb_triple
from ..losses import MODES, get_term, list_terms, term_settings, terms_of_mode
from ..models import get_student, list_students
from ..models._registry import unknown_student
from ..settings import StrictSettings
from ..teachers.torch_models import check_arch

# a file or folder name: no path separators, and not "." or ".." (which would point outside runs/)
SAFE_NAME = r"^[A-Za-z0-9_.-]*[A-Za-z0-9_-][A-Za-z0-9_.-]*$"
IMAGENET_STEM_FROM_PX = 64  # image sizes above this get the stride-4 stem by default


class Schedule(StrictSettings):
    """How one network is trained: used by each teacher and by the student."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1, description="images a step, over all processes: under torchrun each of N "
                                                  "processes takes batch_size / N (rounded up)")
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = True
    schedule: Literal["cosine", "linear", "step", "constant"] = Field(
        "cosine", description="the learning rate after the warm-up: cosine or linear decay to 0 (warm-up + linear is "
                              "the triangular one-cycle schedule of fast CIFAR training), steps of 0.1 at 1/2 and 3/4, "
                              "or constant")
    warmup_epochs: float = Field(0, ge=0, description="linear warm-up from 0; a fraction of an epoch is fine")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    ema_decay: float = Field(0.0, ge=0, lt=1, description="evaluate, save and export an exponential moving average of "
                                                          "the weights with this decay per step (0: the last step's)")
    val_every: int = Field(0, ge=0, description="score the weights the stage would hand on (the average's, with "
                                                "ema_decay) on the validation split every N epochs and after the "
                                                "last: val_acc in the epoch's log line (0: only once it ends)")


_ONNX_ONLY = ("channel_order", "layout", "outputs")
_PRETRAINED_SOURCES = ("torchvision:", "timm:")


class TeacherConfig(StrictSettings):
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
    tta: Literal["none", "flip"] = Field("none", description="test-time augmentation of the teacher as used (scored, "
                                     "cached, distilled from, exported): flip averages the logits of the image and "
                                     "its mirror image, at twice the MACs")
    train: Optional[Schedule] = Field(None, description="fine-tune or train here; default: registry models "
                                                        "without weights train, everything else is used as it is")
    freeze_backbone: bool = Field(False, description="train the head only (a linear probe)")
    backbone_lr_scale: float = Field(0.1, gt=0, description="backbone learning rate / head's, for a model with weights")

    _mean = field_validator("mean")(classmethod(lambda cls, v: rgb_triple(v)))
    _std = field_validator("std")(classmethod(lambda cls, v: rgb_triple(v, positive=True)))

    @field_validator("classes")
    @classmethod
    def _distinct(cls, v):
        if v is not None:
            dup = next((c for i, c in enumerate(v) if c in v[:i]), None)
            if dup is not None:
                raise ValueError(f"names '{dup}' twice: a model's outputs are distinct classes")
        return v

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v):
        if v is not None:
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
            if self.tta != "none":
                raise ValueError("tta: applies to PyTorch teachers (an onnx: teacher runs as its graph is)")
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
        return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(self.onnx).stem) or "onnx"


# what ``student.latency_ms`` leaves to the planner (``ekdc plan``): giving any of them beside it is an error
PLANNED_KEYS = ("trunk_width", "trunk_blocks", "branch_widths", "branch_blocks", "block", "expand_ratio")
EKD_STUDENT_KEYS = (*PLANNED_KEYS, "stem")  # StudentConfig's fields that are ekd_student's settings


class StudentConfig(StrictSettings):
    """The student: ``arch`` names a registered student family (``ekdc.models.list_students()``).
    ``ekd_student``'s keys are the fields below; another family's keys are its own settings model's
    (``@register_student(settings=...)``), and the fields of ``ekd_student`` do not apply to it."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)  # a family's own keys, checked below
    arch: str = Field("ekd_student", description="the student family (ekdc.models.list_students())")
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

    @classmethod
    def extensions(cls) -> dict[str, None]:
        """Keys beyond the fields: every registered family's own settings."""
        return {k: None for name in list_students() if get_student(name).settings is not None
                for k in get_student(name).settings.model_fields}

    @field_validator("arch")
    @classmethod
    def _known_student(cls, v):
        if v not in list_students():
            raise ValueError(unknown_student(v))
        return v

    @field_validator("branch_widths")
    @classmethod
    def _positive(cls, v):
        if any(w < 1 for w in v):
            raise ValueError("every width must be >= 1")
        return v

    @model_validator(mode="after")
    def _family_keys(self):
        family = get_student(self.arch)
        extra = self.__pydantic_extra__ or {}
        if family.settings is None:
            if extra:
                raise ValidationError.from_exception_data(
                    "StudentConfig", [InitErrorDetails(type="extra_forbidden", loc=(k,), input=v) for k, v in extra.items()])
            return self
        own = [k for k in EKD_STUDENT_KEYS if k in self.model_fields_set]
        if own:
            raise ValueError(f"{own[0]} is a key of ekd_student, not of {self.arch} (its keys: num_branches, "
                             f"{', '.join(family.settings.model_fields)})")
        if self.latency_ms is not None:
            raise ValueError(f"latency_ms plans ekd_student students; give {self.arch}'s own keys instead")
        settings = family.settings.model_validate(dict(extra))
        extra.clear()
        extra.update(settings.model_dump())
        return self

    @model_validator(mode="after")
    def _planned_or_given(self):
        if self.latency_ms is not None:
            given = [k for k in PLANNED_KEYS if k in self.model_fields_set]
            if given:
                raise ValueError(f"latency_ms plans the student's widths, depths and block kind: remove "
                                 f"{', '.join(given)} (or latency_ms)")
        return self

    @model_serializer(mode="wrap")
    def _own_keys_only(self, handler):
        # another family's dump leaves ekd_student's keys out: loaded again, they would be refused
        out = handler(self)
        if self.arch != "ekd_student" and isinstance(out, dict):
            out = {k: v for k, v in out.items() if k not in EKD_STUDENT_KEYS}
        return out

    def model_kwargs(self) -> dict:
        """The arguments of ``create_model(arch, num_classes=..., **kwargs)``."""
        if get_student(self.arch).settings is not None:
            return {"num_branches": self.num_branches, **(self.__pydantic_extra__ or {})}
        return self.model_dump(include=set(EKD_STUDENT_KEYS) | {"num_branches"})


class TeacherCacheConfig(StrictSettings):
    """FKD's cache: the teachers run once on ``views`` fixed augmented views of every training image,
    and the student stage reads their stored outputs instead of running them every step."""

    views: int = Field(0, ge=0, le=1000, description="fixed augmented views per image (0: no cache, live teachers)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="the views' own seed: runs with other recipe seeds share views")
    path: Optional[str] = Field(None, min_length=1, description="the folder caches are kept in (default: the run's "
                                                                "teacher_cache/); point it at another run's to reuse that cache")


class DistillConfig(Schedule):
    """The student's schedule; its objective: each term's weight (``weights.<term>``) and settings
    (``<term>: {...}``), both declared by the term in ``ekdc.losses``; and the teacher-output cache."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)  # the terms' settings, checked below
    temperature: float = Field(4.0, gt=0, description="softening temperature T of the KD term")
    weights: dict[str, float] = Field(default_factory=dict, validate_default=True, description="each loss term's weight "
                                      "(ekdc.losses.list_terms(); terms left out keep their default)")
    teacher_cache: TeacherCacheConfig = Field(default_factory=TeacherCacheConfig)
    teacher_runtime: Literal["auto", "torch"] = Field(
        "auto", description="auto: frozen PyTorch teachers on a CPU in fp32 run in ONNX Runtime (faster; checked "
                            "against PyTorch on the first batches and now and then after, PyTorch where they differ); "
                            "torch: always PyTorch")

    @classmethod
    def extensions(cls) -> dict[str, type[BaseModel]]:
        """Keys beyond the fields: each loss term's settings model, by the term's name."""
        return term_settings()

    @field_validator("weights")
    @classmethod
    def _known_terms(cls, v: dict[str, float]) -> dict[str, float]:
        known = list_terms()
        for name, w in v.items():
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ValueError(f"unknown loss term '{name}' ({hint}terms: {', '.join(known)})")
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"{name} is {w}: a weight must be a finite number >= 0")
        return {n: float(v.get(n, get_term(n).default_weight)) for n in known}

    @model_validator(mode="after")
    def _term_settings(self):
        extra = self.__pydantic_extra__
        schemas = self.extensions()
        for key in extra:
            if key not in schemas:
                raise ValidationError.from_exception_data(
                    "DistillConfig", [InitErrorDetails(type="extra_forbidden", loc=(key,), input=extra[key])])
        for name, model in schemas.items():
            raw = extra.get(name, {})
            if isinstance(raw, model):
                continue
            try:
                extra[name] = model.model_validate({} if raw is None else raw)
            except ValidationError as err:  # the same errors, located under distill.<term>
                raise ValidationError.from_exception_data("DistillConfig", [
                    InitErrorDetails(type=e["type"], loc=(name, *e["loc"]), input=e["input"], ctx=e.get("ctx", {}))
                    for e in err.errors()]) from None
        return self

    def term_settings(self) -> dict[str, BaseModel]:
        """Each term's settings (the terms that have them), as validated."""
        return {n: self.__pydantic_extra__[n] for n in self.extensions() if n in self.__pydantic_extra__}

    def active_terms(self, mode: str) -> list[str]:
        """The terms this mode trains on: those that apply in it, with a weight above 0."""
        return [n for n in terms_of_mode(mode) if self.weights.get(n, 0.0) > 0]


class TrackingConfig(StrictSettings):
    """Where a run can be watched (``ekdc.tracking``): off unless asked for."""

    tensorboard: bool = Field(False, description="event files in the run folder's tb/")
    mlflow: bool = Field(False, description="an MLflow run (MLFLOW_TRACKING_URI, else a local mlruns/)")
    experiment: Optional[str] = Field(None, min_length=1, description="MLflow's experiment (default: the recipe's name)")


class Recipe(StrictSettings):
    name: str = Field("run", pattern=SAFE_NAME, description="the run folder's name: letters, digits, _ . -")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    mode: Literal[MODES] = "ekd"
    data: DataConfig
    teachers: list[TeacherConfig] = Field(min_length=1)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.student.stem is None and self.student.arch == "ekd_student":  # 3x3 stride 1 suits small images; photos want stride 4
            self.student.stem = "cifar" if self.data.image_size <= IMAGENET_STEM_FROM_PX else "imagenet"
        self._check_branches()
        self._name_teachers()
        if self.distill.teacher_cache.views > 1 and self.data.augment_config is None:
            raise ValueError(f"distill.teacher_cache.views: {self.distill.teacher_cache.views} views of images that "
                             "are not augmented (data.augment: false) are all the same image; set views: 1")
        self._check_terms()
        return self

    def _check_branches(self) -> None:
        if self.student.num_branches is None:
            self.student.num_branches = len(self.teachers)
        elif self.student.num_branches != len(self.teachers) and self.mode == "ekd":
            raise ValueError(
                f"student.num_branches is {self.student.num_branches} but there are {len(self.teachers)} "
                "teachers: mode ekd trains branch i from teacher i (mode avg_kd or ce trains any number of branches)"
            )

    def _name_teachers(self) -> None:
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

    def _check_terms(self) -> None:
        """The mode trains on something; each weighted term can apply with these teachers and settings."""
        active = self.distill.active_terms(self.mode)
        if not active:
            terms = terms_of_mode(self.mode)
            raise ValueError(f"distill.weights: every term mode '{self.mode}' trains on is 0 "
                             f"({', '.join(f'weights.{t}' for t in terms)}): there is nothing to learn")
        settings = self.distill.term_settings()
        for name in active:
            term = get_term(name)
            no_features = [i for i, t in enumerate(self.teachers) if t.onnx is not None]
            if "teacher_features" in term.needs and no_features:
                raise ValueError(f"teachers.{no_features[0]}: an onnx: teacher has no features to match; set "
                                 f"distill.weights.{name}: 0")
            problem = term.check(settings.get(name), self.mode, len(self.teachers)) if term.check else None
            if problem:
                raise ValueError(f"distill.{problem}")
