"""``data:`` in a recipe: which images, how they are split, decoded, augmented and loaded."""
from __future__ import annotations

import math
from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from ..settings import StrictSettings
from .registry import check_dataset_name

MAX_SEED = 2**32 - 1
PAD_CROP_UP_TO_PX = 64  # images up to this size get pad-crop augmentation by default; larger, resized crops


def rgb_triple(v, positive: bool = False):
    """A mean or std: three finite numbers (positive for a std), or None."""
    if v is not None and len(v) != 3:
        raise ValueError("must list 3 values (R, G, B)")
    if v is not None and not all(math.isfinite(x) for x in v):
        raise ValueError("must be finite numbers")
    if positive and v is not None and any(x <= 0 for x in v):
        raise ValueError("must be > 0")
    return v


class Augment(StrictSettings):
    kind: Optional[Literal["pad_crop", "resized_crop"]] = Field(
        None, description="pad_crop (small images) or resized_crop (RandomResizedCrop, photos); default by image size")
    crop_padding: int = Field(4, ge=0, description="pad_crop: random crop after zero padding by this many pixels")
    scale: list[float] = Field(default_factory=lambda: [0.08, 1.0], min_length=2, max_length=2,
                               description="resized_crop: the crop's share of the image's area, min and max")
    ratio: list[float] = Field(default_factory=lambda: [0.75, 4 / 3], min_length=2, max_length=2,
                               description="resized_crop: the crop's aspect ratio, min and max")
    hflip: bool = True
    cutout: int = Field(0, ge=0, description="blank a square of this side (pixels of the training view) at a random "
                                             "centre of each view, clipped at the edges (DeVries and Taylor 2017); 0: none")

    @model_validator(mode="after")
    def _ranges(self):
        if not 0 < self.scale[0] <= self.scale[1] <= 1 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError("scale must be 0 < min <= max <= 1 and ratio 0 < min <= max")
        return self


class DataConfig(StrictSettings):
    dataset: str = Field(description="a registered data set (ekdc.data.list_datasets()): cifar10, cifar100, "
                                     "imagefolder, digits, synthetic, ...")
    root: Optional[str] = Field(None, description="cifar: torchvision root; imagefolder: the training root")
    urls: Optional[Union[str, list[str]]] = Field(None, description="webdataset: the training shards (brace notation, "
                                                                    "local paths or pipe: commands, or a list)")
    val_urls: Optional[Union[str, list[str]]] = Field(None, description="webdataset: the validation shards")
    classes: Optional[list[str]] = Field(None, min_length=2, description="webdataset: the class names, in label order "
                                                                         "(default: classes.txt beside the shards)")
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

    _mean = field_validator("mean")(classmethod(lambda cls, v: rgb_triple(v)))
    _std = field_validator("std")(classmethod(lambda cls, v: rgb_triple(v, positive=True)))

    @field_validator("dataset")
    @classmethod
    def _registered(cls, v: str) -> str:
        check_dataset_name(v)
        return v

    @model_validator(mode="after")
    def _limited_one_way(self):
        aug = self.augment_config
        if aug is not None and aug.crop_padding > self.image_size:
            raise ValueError(f"augment.crop_padding {aug.crop_padding} is larger than the image ({self.image_size} px)")
        if aug is not None and aug.cutout > self.image_size:
            raise ValueError(f"augment.cutout {aug.cutout} is larger than the image ({self.image_size} px)")
        if self.train_fraction is not None and self.per_class is not None:
            raise ValueError("set either train_fraction or per_class, not both")
        if self.dataset == "imagefolder" and not self.root:
            raise ValueError("imagefolder needs data.root (the training folder)")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("classes: a class is named twice")
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
