"""The spec sections that describe what is trained, and on what: the model, the data, the
training schedule; and the frozen base every section shares. Pruning and the experiment as a
whole: specs.py, which re-exports these.

Bounds: seeds 0 <= seed < 2**63 (torch generators; the reinit control's +7919 still fits
manual_seed's 64 bits); floats finite everywhere (inf/NaN would reach JSON keys, `pai show` and
the optimizer); lr <= 1000 (Zhou's supermask SGD uses 100); epochs <= 10,000, iterations <=
10**8; names 1-200 printable characters.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pai_core.data import DatasetInfo, dataset_info, dataset_names, image_folder
from pai_core.form_schema import form_schema, model_params_schema, registry_enum
from pai_core.models import model_info, model_names
from pai_core.models.registry import INIT_FIELDS
from pai_core.yaml_io import clip, dotted

SEED_LIMIT = 2**63
LR_MAX = 1e3
MAX_EPOCHS, MAX_ITERATIONS = 10_000, 10**8
MAX_NAME = 200


def registered(value: str, names: list[str], what: str) -> str:
    if value not in names:
        raise ValueError(f"unknown {what} {clip(value)}; allowed: {', '.join(names)}")
    return value


def _text(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must be printable characters on one line (no tabs, line breaks or control characters)")
    if "[/" in value:
        raise ValueError("must not contain '[/' (terminal markup: the CLI's tables cannot print it)")
    return value


Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME), AfterValidator(_text)]


class Frozen(BaseModel):
    """A spec section. Fields added after a section's keys were first stored are listed in
    `KEYED_WHEN_SET`: they enter a stage key only when they differ from their default, so
    adding an option never invalidates the artifacts of specs that do not use it."""
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, json_schema_extra=form_schema)
    KEYED_WHEN_SET: ClassVar[frozenset[str]] = frozenset()

    def key_fields(self) -> dict[str, Any]:
        """The section as a stage key reads it (see `KEYED_WHEN_SET`)."""
        dumped = self.model_dump(mode="json")
        for name in self.KEYED_WHEN_SET:
            if getattr(self, name) == type(self).model_fields[name].get_default(call_default_factory=True):
                dumped.pop(name, None)
        return dumped


class ModelSpec(Frozen):
    """A registered model and its own parameters (`width`, `batch_norm`, ... where it has them).
    Parameters left at their defaults are dropped, so `width: 1` and no width share a key."""
    model_config = ConfigDict(frozen=True, extra="allow", allow_inf_nan=False, json_schema_extra=model_params_schema)
    name: str = Field(description="a registered model (pai list)", json_schema_extra=registry_enum(model_names))

    @model_validator(mode="before")
    @classmethod
    def _params(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return data
        if data["name"] not in model_names():
            raise ValueError(f"model.name: unknown model {clip(data['name'])}; allowed: {', '.join(model_names())}")
        info = model_info(data["name"])
        given = {k: v for k, v in data.items() if k != "name" and v is not None}  # None: a form's empty field
        try:
            params = info.Params.model_validate(given)
        except ValidationError as err:
            e = err.errors()[0]
            own = [f for f in info.Params.model_fields if f not in INIT_FIELDS]  # the model's own first
            allowed = ", ".join(["name", *own, *INIT_FIELDS])
            what = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
            raise ValueError(f"model.{dotted(e['loc'])}: {what} for {info.name}; allowed: {allowed}") from None
        kept = params.model_dump(mode="json", exclude_defaults=True)
        if kept.get("bn_init", "model") != "model" and not info.has_batch_norm(kept):
            raise ValueError(f"model.bn_init: {info.name} has no BatchNorm here; allowed: model")
        return {"name": data["name"], **kept}

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.__pydantic_extra__ or {})


class DataSpec(Frozen):
    dataset: str = Field(description="a registered dataset (pai list)", json_schema_extra=registry_enum(dataset_names))
    batch_size: int = Field(60, gt=0, le=2**20, description="examples per training step (iteration)")
    val_size: int | None = Field(None, description="examples held out of train for validation; None = dataset default")
    split_seed: Seed = Field(0, description="seed of the train/val split")
    order_seed: Seed | None = Field(None, description="data-order seed; None = experiment seed")
    augment: tuple[Literal["crop", "flip"], ...] | None = Field(
        None, description="training augmentation on the device: crop (4-pixel padding, random 32×32 crop), flip "
                          "(horizontal, p = 0.5); None = the dataset's default (crop, flip for CIFAR; none for "
                          "MNIST-likes); [] = none. Evaluation never augments")
    root: Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_text)] | None = Field(
        None, description="image_folder: the folder holding train/<class>/... and val/<class>/... (a relative path "
                          "is under PAI_DATA); keys name it by its folder name and file list, never its path")
    image_size: int | None = Field(None, gt=0, le=2048, description="image_folder: side of the square crops "
                                                                    "(None = 224; 64 for Tiny-ImageNet)")
    crop_scale: tuple[float, float] | None = Field(
        None, description="image_folder: RandomResizedCrop's range of the image area a training crop covers "
                          "(None = torchvision's 0.08-1; open_lth's ImageNet: 0.1-1)")
    crop_ratio: tuple[float, float] | None = Field(
        None, description="image_folder: its range of crop aspect ratios w/h, drawn log-uniformly (None = "
                          "torchvision's 3/4-4/3; open_lth's ImageNet: 0.8-1.25)")

    @field_validator("dataset")
    @classmethod
    def _known(cls, v: str) -> str:
        return registered(v, dataset_names(), "dataset")

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _range(cls, v: tuple[float, float] | None, info: Any) -> tuple[float, float] | None:
        top = 1.0 if info.field_name == "crop_scale" else 100.0
        if v is not None and not 0 < v[0] <= v[1] <= top:
            raise ValueError(f"a range lo, hi with 0 < lo <= hi <= {top:g} (got {list(v)})")
        return v

    @field_validator("augment")
    @classmethod
    def _augment(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"each kind at most once (got {', '.join(v)}); allowed: crop, flip")
        return v

    @property
    def augment_kinds(self) -> tuple[str, ...]:
        """The augmentation training applies, in its fixed order (crop, then flip)."""
        kinds = dataset_info(self.dataset).default_augment if self.augment is None else self.augment
        return tuple(k for k in ("crop", "flip") if k in kinds)

    @field_validator("val_size")
    @classmethod
    def _some_val(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("at least 1 example: val_acc and best-val selection need a validation split "
                             "(leave it unset for the dataset's default)")
        return v

    @model_validator(mode="after")
    def _folder(self) -> DataSpec:
        """An image folder is checked (and listed) now, before any compute; its fields are
        refused for the in-memory datasets, which have no such choices."""
        if self.dataset != image_folder.NAME:
            for name in ("root", "image_size", "crop_scale", "crop_ratio"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: only dataset image_folder reads it (this one is {self.dataset}); "
                                     "allowed: unset")
            return self
        if self.root is None:
            raise ValueError("root: image_folder needs the folder holding train/ and val/ (an absolute path, or "
                             "one under PAI_DATA)")
        if self.augment:
            raise ValueError("augment: image_folder crops and flips on its loader workers (RandomResizedCrop + "
                             "flip); the on-device kinds do not apply; allowed: [] or unset")
        try:
            image_folder.remember(self.folder.root)
        except image_folder.FolderError as e:
            raise ValueError(str(e)) from None
        except OSError as e:  # unreadable, too long a name, ...
            raise ValueError(f"root: cannot read {clip(self.root)}: {e.strerror or e}") from None
        return self

    @property
    def folder(self) -> image_folder.FolderIndex:
        """image_folder: the listed folder (cached per process while its entries are unchanged)."""
        return image_folder.scan(image_folder.resolve_root(self.root))

    @property
    def info(self) -> DatasetInfo:
        """Shape, classes and sizes; an image folder's come from the folder itself."""
        if self.dataset == image_folder.NAME:
            return image_folder.folder_info(self.folder, self.image_size or image_folder.DEFAULT_IMAGE_SIZE)
        return dataset_info(self.dataset)

    @model_validator(mode="after")
    def _val_fits(self) -> DataSpec:
        info = self.info
        if self.val_size is not None and self.val_size >= info.train_size:
            raise ValueError(f"val_size: must be < {info.train_size} (the {self.dataset} train split)")
        return self

    @property
    def train_examples(self) -> int:
        info = self.info
        val = info.default_val_size if self.val_size is None else self.val_size
        return info.train_size - val

    @property
    def iterations_per_epoch(self) -> int:
        return math.ceil(self.train_examples / self.batch_size)


class TrainSpec(Frozen):
    optimizer: Literal["sgd", "adam", "adamw"] = Field(
        "sgd", description="torch.optim.SGD, Adam, or AdamW (Adam with decoupled weight decay)")
    lr: float = Field(gt=0, le=LR_MAX, description="peak learning rate (per step, before warmup and decay)")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(False, description="Nesterov momentum (SGD with momentum > 0)")
    weight_decay: float = Field(0.0, ge=0, le=1, description="L2 coefficient, coupled (SGD, Adam) or decoupled "
                                                             "(AdamW: w -= lr·wd·w each step)")
    epochs: int | None = Field(None, gt=0, le=MAX_EPOCHS, description="training length in passes over the train split")
    iterations: int | None = Field(None, gt=0, le=MAX_ITERATIONS,
                                   description="training length in steps (instead of epochs)")
    lr_schedule: Literal["constant", "step", "cosine"] = Field(
        "constant", description="constant; step: × gamma at each milestone; cosine: to 0 over the training")
    milestones: tuple[int, ...] = Field((), description="step schedule; in epochs if `epochs` is set, else iterations")
    gamma: float = Field(0.1, gt=0, le=1, description="step schedule: factor at each milestone")
    warmup_iterations: int = Field(0, ge=0, le=MAX_ITERATIONS, description="linear warmup (iterations)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: forward and loss under bfloat16 autocast (weights, gradients and optimizer "
                            "state stay fp32); evaluation stays fp32")
    channels_last: bool = Field(False, description="conv weights and batches in channels-last memory layout "
                                                   "(faster conv kernels on GPUs; same math)")
    compile: bool = Field(False, description="torch.compile the model for training (needs a C++ compiler; the "
                                             "first steps pay the compilation)")
    deterministic: bool = Field(True, description="CUDA: deterministic kernels, so a resumed or rewound run is "
                                                  "bit-exact; false lets cuDNN pick the fastest (not bit-exact)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="the training loss's targets: 1 − ε on the label "
                                                                  "and ε/C spread over all C classes (Szegedy et "
                                                                  "al.; RigL's ImageNet runs use 0.1); evaluation "
                                                                  "and criteria keep plain cross-entropy")
    bn_l1: float = Field(0.0, ge=0, le=1, description="network slimming (Liu et al. 2017): L1 penalty on BatchNorm "
                                                      "scales, λ·sign(γ) added to their gradients (paper: 1e-4 VGG, "
                                                      "1e-5 ResNet); models with BatchNorm only")
    # Added after keys were first stored: at their defaults they leave every key as it was.
    KEYED_WHEN_SET: ClassVar[frozenset[str]] = frozenset({"precision", "channels_last", "compile", "deterministic",
                                                          "bn_l1", "label_smoothing"})

    @model_validator(mode="after")
    def _length(self) -> TrainSpec:
        if (self.epochs is None) == (self.iterations is None):
            raise ValueError("set exactly one of epochs or iterations")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov: needs optimizer sgd with momentum > 0")
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError("milestones: must be strictly increasing")
        if self.milestones and self.lr_schedule != "step":
            raise ValueError(f"milestones: only lr_schedule step uses them (this one is {self.lr_schedule})")
        length, unit = (self.epochs, "epochs") if self.epochs is not None else (self.iterations, "iterations")
        if self.milestones and not (1 <= self.milestones[0] and self.milestones[-1] < length):
            bad = self.milestones[0] if self.milestones[0] < 1 else self.milestones[-1]
            raise ValueError(f"milestones: each must be within the training length, 1..{length - 1} {unit} "
                             f"(got {clip(bad)})")
        return self

    def total_iterations(self, iterations_per_epoch: int) -> int:
        return self.iterations if self.iterations is not None else self.epochs * iterations_per_epoch

    def milestone_iterations(self, iterations_per_epoch: int) -> tuple[int, ...]:
        unit = iterations_per_epoch if self.epochs is not None else 1
        return tuple(m * unit for m in self.milestones)
