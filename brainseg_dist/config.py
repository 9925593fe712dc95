"""One typed config shared by ``brainseg train`` and ``accelerate launch -m brainseg_dist.train``.

A YAML file fills any subset of the sections below; unknown keys and wrong types are errors
that name the file and the key. Command-line overrides are applied on top.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from brainseg_dist.errors import ConfigError

# The allowed values of every choice: the config's fields are typed with these, and the CLI
# builds its click.Choice options from them (via :func:`choices`).
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
Normalization = Literal["slice", "volume"]
NormLayer = Literal["batch", "instance", "group"]
Schedule = Literal["cosine", "constant"]
DiceMode = Literal["sample", "batch"]
Select = Literal["best", "last"]
EvalSplit = Literal["test", "val", "train", "all"]  # brainseg evaluate --split
AutoSwitch = Literal["auto", "true", "false"]  # auto: on where it was measured to pay
ScaleLr = Literal["none", "linear", "sqrt"]
AdamImpl = Literal["auto", "fused", "torch"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def choices(literal: Any) -> tuple[str, ...]:
    """The values of a ``Literal`` type, e.g. ``choices(Normalization)``."""
    return typing.get_args(literal)


@dataclass
class DataConfig:
    data_dir: str | None = None  # None: generate a synthetic dataset in the run directory
    synthetic_patients: int = 16
    image_size: int = 128
    cache_dir: str | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    folds: int = 0  # >1: k-fold cross-validation of the non-test patients
    fold: int = 0
    skip_invalid: bool = False
    num_workers: int = 0  # data is in memory; workers only add IPC cost
    # Training slices uploaded once as uint8 and batched on the device, with no DataLoader.
    # auto: on for CUDA when they fit in device_memory_budget, off on CPU.
    on_device: AutoSwitch = "auto"
    device_memory_budget: float = 0.25  # share of the GPU's memory the slices may take (auto)


@dataclass
class AugmentConfig:
    enabled: bool = True
    rotation_degrees: float = 15.0
    rotation_p: float = 0.5
    hflip_p: float = 0.5
    vflip_p: float = 0.0
    elastic_p: float = 0.2
    elastic_alpha: float = 3.0  # kornia's scale; with sigma 16 ≈ 2 px mean shift at 128x128
    elastic_sigma: float = 16.0
    intensity_p: float = 0.0  # brightness/contrast jitter on the image channels
    intensity_strength: float = 0.1
    # Per-channel gamma before normalization: the one intensity change a z-score keeps.
    gamma_p: float = 0.0
    gamma_range: float = 0.3  # gamma uniform in [1/(1+r), 1+r], one per slice
    # Chance, per slice and separately for pre- and post-contrast, that the channel is replaced
    # by FLAIR: how kaggle_3m (and FLAIR-only input) fills a sequence the scan did not have.
    missing_sequence_p: float = 0.0
    fused: bool = False  # flips, rotation and elastic as one sampling grid (augment.py)


@dataclass
class ModelConfig:
    base_width: int = 32
    depth: int = 4
    channels_last: bool = True
    sync_batchnorm: bool = True  # across GPUs under DDP (torch supports it on CUDA only)
    # Share of tumour pixels the untrained head predicts (its bias starts at the logit of it);
    # 0: torch's default init (p = 0.5 everywhere).
    foreground_prior: float = 0.0
    # batch: BatchNorm (running statistics in eval); instance: per-image statistics, the
    # same in training and eval, as nnU-Net uses; group: instance's function as GroupNorm,
    # one group per channel: channels-last kept, fewer host calls, the same weights' keys.
    norm: NormLayer = "batch"


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: Schedule = "cosine"
    warmup_epochs: int = 1
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    # "sample": soft Dice per slice (smoothing 1), which charges an empty slice for any
    # probability mass; "batch": one soft Dice over the whole batch (nnU-Net's batch Dice).
    dice: DiceMode = "sample"
    grad_clip: float = 0.0  # 0: off
    # lr × (global batch / 32) (linear) or × its square root (sqrt); none: optim.lr as given.
    scale_lr: ScaleLr = "none"
    implementation: AdamImpl = "auto"  # Adam's kernels; auto: fused on CUDA, else torch's


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 32  # per process: the global batch is batch_size × processes × accumulation
    grad_accumulation: int = 1
    mixed_precision: MixedPrecision = "auto"  # accelerate config, else bf16 on CUDA / AMX CPUs
    normalization: Normalization = "slice"
    threshold: float = 0.5
    seed: int = 0
    output_dir: str = "runs/latest"
    patience: int = 0  # early stopping on val per-patient Dice; 0: off
    # Exponential moving average of the weights (per step, with a warm-up); 0: off. When on,
    # validation, best.pt/last.pt "model" and export use the averaged weights.
    ema_decay: float = 0.0
    select: Select = "best"  # best: epoch with the best val per-patient Dice | last: final
    stop_after_epoch: int = 0  # end this invocation after this epoch (then --resume); 0: off
    num_overlays: int = 4  # validation overlays logged to TensorBoard each epoch
    cpu: bool = False  # force CPU even when a GPU is present
    export: bool = True  # write model.ts (+ model.pt2) of best.pt when training ends (no onnx)
    log_every: int = 25  # steps between loss reads: one host sync each, none in between
    compile: AutoSwitch = "false"  # torch.compile; auto: where it repays (train/setup.py)
    compile_mode: CompileMode = "default"  # reduce-overhead: CUDA graphs (measured on GPUs)


# Keys added after runs were saved, with the value that keeps the behaviour before them.
ADDED_KEYS = {("optim", "scale_lr"): "none", ("model", "norm"): "batch",
               ("augment", "fused"): False, ("optim", "implementation"): "torch"}
# Speed and bookkeeping: the same training to rounding (compare --pool-seeds pools over them).
SPEED_KEYS = {"data": ("num_workers", "on_device", "device_memory_budget"),
              "train": ("stop_after_epoch", "num_overlays", "cpu", "export", "log_every",
                        "compile", "compile_mode"), "optim": ("implementation",)}
# Paths and run length. These and the speed keys may change on --resume: not in the hash.
RUN_KEYS = {"data": ("data_dir", "cache_dir"), "train": ("output_dir", "epochs", "patience")}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hash(self) -> str:
        """Short hash of the settings that change the model (not paths or run length)."""
        d = self.to_dict()
        # Keys added later count only when set away from the old behaviour, so runs saved
        # before they existed still resume.
        for (section, key), old_behaviour in ADDED_KEYS.items():
            if d[section][key] == old_behaviour:
                d[section].pop(key)
        for section, keys in [*SPEED_KEYS.items(), *RUN_KEYS.items()]:
            d[section] = {k: v for k, v in d[section].items() if k not in keys}
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field annotation (int, float, bool, str, optional)."""
    if isinstance(value, datetime.date):  # YAML reads 2024-01-01 as a date
        if annotation in (str, str | None):
            return value.isoformat()
        raise ConfigError(f"{where}: got {value} (YAML read it as a date); quote it or give "
                          "a number")
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, bool):  # YAML's true/false (also an unquoted yes/no/on/off)
        words = ("true",) if value else ("false", "no")  # on_device: false; precision: no
        if (word := next((w for w in words if w in typing.get_args(annotation)), None)):
            return word
    if annotation is str or typing.get_origin(annotation) is Literal:  # choices: validate()
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(raw: dict[str, Any] | None, source: str = "config",
              key_sources: dict[str, str] | None = None) -> Config:
    """Build and validate a :class:`Config` from nested dicts (e.g. parsed YAML).

    Args:
        raw: ``{section: {key: value}}``.
        source: where the values come from (a file name, or ``defaults``).
        key_sources: ``{"section.key": origin}`` for values that came from elsewhere (a
            command-line flag or ``--set``), so an error blames the right place.

    Raises:
        ConfigError: unknown section or key, wrong type, or a value out of range;
            the message names where the value came from and the key.
    """
    key_sources = key_sources or {}
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    config = Config()
    sections = {f.name: f for f in fields(Config)}
    for name, values in raw.items():
        if name not in sections:
            origin = next((v for k, v in key_sources.items() if k.startswith(f"{name}.")),
                          source)
            raise ConfigError(f"{origin}: unknown section '{name}' (known: "
                              f"{', '.join(sections)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping")
        section = getattr(config, name)
        types_ = typing.get_type_hints(type(section))
        for key, value in values.items():
            origin = key_sources.get(f"{name}.{key}", source)
            if key not in types_:
                raise ConfigError(f"{origin}: unknown key '{name}.{key}' (known: "
                                  f"{', '.join(types_)})")
            setattr(section, key, _coerce(value, types_[key], f"{origin}: {name}.{key}"))
    validate(config, _blame(source, key_sources))
    return config


_KEY_RE = re.compile(r"\b(?:data|augment|model|optim|train)\.\w+")


def _blame(source: str, key_sources: dict[str, str]) -> str | Callable[[str], str]:
    """Who a failed range check is reported against: the override(s) that set a key the
    message names, else the file."""
    if not key_sources:
        return source

    def origin(message: str) -> str:
        named = [key_sources[k] for k in dict.fromkeys(_KEY_RE.findall(message))
                 if k in key_sources]
        return ", ".join(named) if named else source

    return origin


def validate(config: Config, source: str | Callable[[str], str] = "config") -> None:
    """Range and choice checks that types alone cannot express.

    Args:
        config: the config to check.
        source: where the values came from, or a function of the error message that says
            which file or flag set the offending key.
    """
    def where(message: str) -> str:
        return source(message) if callable(source) else source

    for section in fields(Config):
        for key, hint in typing.get_type_hints(type(getattr(config, section.name))).items():
            allowed = choices(hint) if typing.get_origin(hint) is Literal else None
            value = getattr(getattr(config, section.name), key)
            if allowed is not None and value not in allowed:
                message = f"{section.name}.{key} must be one of {allowed}, got {value!r}"
                raise ConfigError(f"{where(message)}: {message}")
    for ok, message in _range_checks(config):
        if not ok:
            raise ConfigError(f"{where(message)}: {message}")


def _range_checks(config: Config) -> list[tuple[bool, str]]:
    """``(holds, message)`` for every range rule of :func:`validate`."""
    checks = [
        (config.data.image_size >= 16 and config.data.image_size % 2 ** config.model.depth == 0,
         f"data.image_size must be >=16 and divisible by {2 ** config.model.depth}"),
        (config.data.synthetic_patients >= 3, "data.synthetic_patients must be >= 3"),
        (0 <= config.data.val_fraction < 1 and 0 <= config.data.test_fraction < 1
         and config.data.val_fraction + config.data.test_fraction < 1,
         "data.val_fraction + data.test_fraction must be < 1"),
        (config.data.folds == 0 or 0 <= config.data.fold < config.data.folds,
         "data.fold must be in [0, data.folds)"),
        (config.model.base_width >= 1 and 1 <= config.model.depth <= 6,
         "model.base_width >= 1 and 1 <= model.depth <= 6"),
        (0 <= config.model.foreground_prior < 1, "model.foreground_prior must be in [0, 1)"),
        (config.optim.lr > 0, "optim.lr must be > 0"),
        (config.optim.bce_weight >= 0 and config.optim.dice_weight >= 0
         and config.optim.bce_weight + config.optim.dice_weight > 0,
         "optim.bce_weight and optim.dice_weight must be >= 0, not both 0"),
        (config.train.epochs >= 1, "train.epochs must be >= 1"),
        (config.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (config.train.grad_accumulation >= 1, "train.grad_accumulation must be >= 1"),
        (0 < config.train.threshold < 1, "train.threshold must be in (0, 1)"),
        (config.train.patience >= 0, "train.patience must be >= 0"),
        (0 <= config.train.ema_decay < 1, "train.ema_decay must be in [0, 1)"),
        (config.augment.gamma_range >= 0, "augment.gamma_range must be >= 0"),
        (0 <= config.augment.rotation_degrees <= 180, "augment.rotation_degrees in [0, 180]"),
        (config.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (config.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0"),
        (config.optim.grad_clip >= 0, "optim.grad_clip must be >= 0 (0: off)"),
        (config.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (config.data.folds >= 0 and config.data.fold >= 0, "data.folds and data.fold >= 0"),
        (0 <= config.train.seed < 2**32, "train.seed must be in [0, 2**32)"),
        (config.train.stop_after_epoch >= 0, "train.stop_after_epoch must be >= 0 (0: off)"),
        (config.train.num_overlays >= 0, "train.num_overlays must be >= 0"),
        (config.train.log_every >= 1, "train.log_every must be >= 1"),
        (0 < config.data.device_memory_budget <= 1, "data.device_memory_budget in (0, 1]"),
        (config.train.output_dir.strip() != "", "train.output_dir must not be empty"),
        (config.augment.elastic_alpha >= 0 and config.augment.elastic_sigma > 0,
         "augment.elastic_alpha >= 0 and augment.elastic_sigma > 0"),
        (config.augment.intensity_strength >= 0, "augment.intensity_strength must be >= 0"),
    ]
    for name in ("rotation_p", "hflip_p", "vflip_p", "elastic_p", "intensity_p", "gamma_p",
                 "missing_sequence_p"):
        checks.append((0 <= getattr(config.augment, name) <= 1, f"augment.{name} in [0, 1]"))
    return checks


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                override_sources: dict[str, str] | None = None) -> Config:
    """Read a YAML config (or the defaults) and apply ``{"section.key": value}`` overrides.

    Args:
        path: YAML file, or None for the defaults.
        overrides: values that replace the file's (None values are ignored).
        override_sources: ``{"section.key": "--epochs"}``: where each override came from, for
            error messages (default ``override section.key``).

    Raises:
        ConfigError: missing or unparsable file, or any invalid key or value; the message
            names the file, flag or ``--set`` the value came from.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a folder, not a config file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: unreadable config file ({exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    raw = copy.deepcopy(raw)  # YAML may hold dates, which a JSON round trip cannot copy
    key_sources = {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        key_sources[dotted] = (override_sources or {}).get(dotted, f"override {dotted}")
        section, _, key = dotted.partition(".")
        if raw.setdefault(section, {}) is None:
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping")
        raw[section][key] = value
    return from_dict(raw, source, key_sources)


def dump_config(config: Config) -> str:
    """YAML text of the fully resolved config (written to ``RUN_DIR/config.yaml``)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def replace(config: Config, **sections: dict[str, Any]) -> Config:
    """A copy of ``config`` with some section fields changed, e.g. ``train={"epochs": 2}``."""
    new = {name: dataclasses.replace(getattr(config, name), **sections.get(name, {}))
           for name in ("data", "augment", "model", "optim", "train")}
    out = Config(**new)
    validate(out)
    return out
