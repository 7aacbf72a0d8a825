"""Typed, validated experiment configuration (frozen dataclasses).

Every field names the SPEC section it comes from. Validation errors name the dotted path of the
field and the allowed values, e.g. ``prior.kind: 'mogg' is not one of ['standard', 'mog']``.
``from_dict`` rejects unknown keys; ``apply_overrides`` parses ``dotted.key=value`` strings with
``ast.literal_eval`` and checks them against the field type (booleans strictly).
"""

from __future__ import annotations

import ast
import dataclasses
import numbers
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range (message names the field)."""


TOY_DATASETS = ("8gaussians", "2spirals", "checkerboard", "rings")
IMAGE_DATASETS = ("mnist", "fmnist", "cifar10", "parquet_images")  # SPEC §7.1
Dataset = Literal["8gaussians", "2spirals", "checkerboard", "rings", "parquet", "mnist", "fmnist", "cifar10",
                  "parquet_images"]
PriorKind = Literal["standard", "mog"]
MogInit = Literal["vamp", "random"]
ExPost = Literal["none", "em"]
KlEstimator = Literal["closed", "mc"]
NetworkKind = Literal["mlp", "resnet"]
ScheduleUnit = Literal["iterations", "epochs"]
FidProtocol = Literal["none", "clean", "paper", "cnn"]  # SPEC §7.4 feature extractors (service.feature_extractor)


def _choices(tp: Any) -> tuple:
    return typing.get_args(tp)


def _check_choice(path: str, value: Any, tp: Any) -> None:
    allowed = _choices(tp)
    if value not in allowed:
        raise ConfigError(f"{path}: {value!r} is not one of {list(allowed)}")


def _check_range(path: str, value: float, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False) -> None:
    if not isinstance(value, numbers.Real):  # e.g. a string given to the constructor directly
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
    if bad:
        lo_s = "-inf" if lo is None else f"{lo}"
        hi_s = "inf" if hi is None else f"{hi}"
        bracket = "(" if lo_open else "["
        raise ConfigError(f"{path}: {value!r} is out of range; allowed {bracket}{lo_s}, {hi_s}]")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class DataConfig:
    dataset: Dataset = "8gaussians"  # SPEC §6.1, §7.1; "parquet" = your 2D points, "parquet_images" = your images
    path: str | None = None  # Parquet file: float columns x, y (points) or column image (images); optional int label
    batch_size: int = 512  # SPEC §5 (global: split over the workers)
    eval_range: float | None = None  # half-width L of the evaluation square; None = SPEC default / data extent
    root: str | None = None  # image files folder; None = $INTROPRIOR_DATA or ~/.cache/introprior/data (+ Debian FMNIST)
    download: bool = False  # let torchvision download missing (F)MNIST / CIFAR-10 files into data.root
    subset: int | None = None  # train on the first N training images only (smoke / CPU budgets)
    test_path: str | None = None  # parquet_images: test split for the probes; None = data.path

    def __post_init__(self) -> None:
        _check_choice("data.dataset", self.dataset, Dataset)
        _check_range("data.batch_size", self.batch_size, lo=1)
        if self.path and self.dataset not in ("parquet", "parquet_images"):
            # `--set data.path=my.parquet` on any preset means "train on my points" (2D presets) or
            # "on my images" (image presets)
            object.__setattr__(self, "dataset", "parquet_images" if self.dataset in IMAGE_DATASETS else "parquet")
        if self.dataset == "parquet" and not self.path:
            raise ConfigError("data.path: required when data.dataset is 'parquet' (a Parquet file with columns x, y)")
        if self.dataset == "parquet_images" and not self.path:
            raise ConfigError("data.path: required when data.dataset is 'parquet_images' (a Parquet file with a "
                              "column image)")
        if self.eval_range is not None:
            _check_range("data.eval_range", self.eval_range, lo=0, lo_open=True)
        if self.subset is not None:
            _check_range("data.subset", self.subset, lo=1)
        for name in ("path", "root", "test_path"):  # absolute: Ray workers run in another folder
            value = getattr(self, name)
            if value:
                object.__setattr__(self, name, os.path.abspath(os.path.expanduser(value)))

    @property
    def is_image(self) -> bool:
        return self.dataset in IMAGE_DATASETS


@dataclass(frozen=True, kw_only=True)
class NetworkConfig:
    kind: NetworkKind = "mlp"  # SPEC §6.2 MLP (2D points) or §7.2 residual conv nets (images)
    latent_dim: int = 2  # d_z
    hidden: int = 256  # mlp: width of every hidden layer
    depth: int = 4  # mlp: number of hidden layers
    channels: tuple[int, ...] = ()  # resnet: channel counts per scale; () = from the image size (SPEC §7.2)
    sync_bn: bool = False  # resnet: SyncBatchNorm across workers (GPUs); False = per-worker BN (reference)

    def __post_init__(self) -> None:
        _check_choice("network.kind", self.kind, NetworkKind)
        _check_range("network.latent_dim", self.latent_dim, lo=1)
        _check_range("network.hidden", self.hidden, lo=1)
        _check_range("network.depth", self.depth, lo=1)
        for i, c in enumerate(self.channels):
            _check_range(f"network.channels[{i}]", c, lo=1)


@dataclass(frozen=True, kw_only=True)
class PriorConfig:
    kind: PriorKind = "standard"  # SPEC §3: standard Gaussian or mixture of Gaussians
    num_components: int = 64  # M
    learnable_weights: bool = False  # "LC": mixture logits are trained
    trainable: bool = False  # "IP": means/log-variances (and LC logits) trained with the decoder
    init: MogInit = "vamp"  # SPEC §3.4: VampPrior during warm-up, converted to a MoG
    mog_warmup: int = 100  # SPEC §3.4: conversion this many iterations before warm-up ends
    carry_logits: bool = False  # SPEC §3.4: False = reference (old probabilities become logits)
    soft_clip: bool | None = None  # SPEC §4; None = on for trainable priors
    softclip_k: float = 10.0  # K, soft-clip steepness
    # SPEC §4 clips both ways (the paper); False = an option beside it: only the upper bound (the
    # paper's motivation, exploding variances, appendix C.4), so components may sharpen below the
    # range frozen at the end of the warm-up (sharper modes; measured in docs/modes.md)
    softclip_lower: bool = True
    lr: float = 2e-4  # SPEC §5, prior learning rate
    # An option beside the paper (service/ex_post.py, docs/modes.md): after training, refit the
    # mixture by EM to encoded training points mu(x) + ex_post_noise * sigma(x) * eps
    ex_post: ExPost = "none"
    ex_post_noise: float = 0.5  # t: 0 = posterior means, 1 = posterior samples
    ex_post_points: int = 50_000
    ex_post_iterations: int = 100

    def __post_init__(self) -> None:
        _check_choice("prior.kind", self.kind, PriorKind)
        _check_choice("prior.ex_post", self.ex_post, ExPost)
        _check_range("prior.ex_post_noise", self.ex_post_noise, lo=0, hi=1)
        _check_range("prior.ex_post_points", self.ex_post_points, lo=1)
        _check_range("prior.ex_post_iterations", self.ex_post_iterations, lo=1)
        _check_range("prior.num_components", self.num_components, lo=1)
        _check_choice("prior.init", self.init, MogInit)
        _check_range("prior.mog_warmup", self.mog_warmup, lo=0)
        _check_range("prior.softclip_k", self.softclip_k, lo=0, lo_open=True)
        _check_range("prior.lr", self.lr, lo=0, lo_open=True)
        if self.kind == "standard" and (self.trainable or self.learnable_weights):
            raise ConfigError("prior.trainable / prior.learnable_weights: only allowed with prior.kind='mog'")
        if self.kind == "standard" and self.ex_post != "none":
            raise ConfigError("prior.ex_post: only allowed with prior.kind='mog'; allowed for a standard prior: 'none'")
        if self.ex_post != "none" and self.ex_post_points < self.num_components:
            raise ConfigError(f"prior.ex_post_points: {self.ex_post_points} is out of range; allowed "
                              f"[prior.num_components = {self.num_components}, inf]")

    @property
    def use_soft_clip(self) -> bool:
        return self.kind == "mog" and (self.trainable if self.soft_clip is None else self.soft_clip)


@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    beta_rec: float = 0.2  # SPEC §1
    beta_kl: float = 0.3
    beta_neg: float = 0.9  # KL weight inside the negatives' energy
    alpha: float = 2.0
    gamma: float = 1.0
    gamma_r: float = 1e-8
    r_entropy: float = 0.0  # SPEC §4, responsibility-entropy weight (mixtures only)
    mc_samples: int = 100  # T, Monte-Carlo KL samples
    kl_estimator: KlEstimator = "closed"  # SG prior only; mixtures always use MC

    def __post_init__(self) -> None:
        for name in ("beta_rec", "beta_kl", "beta_neg", "gamma", "gamma_r", "r_entropy"):
            _check_range(f"objective.{name}", getattr(self, name), lo=0)
        _check_range("objective.alpha", self.alpha, lo=0, lo_open=True)
        _check_range("objective.mc_samples", self.mc_samples, lo=1)
        _check_choice("objective.kl_estimator", self.kl_estimator, KlEstimator)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr_encoder: float = 2e-4  # SPEC §5
    lr_decoder: float = 2e-4
    milestones: tuple[int, ...] = (10_000, 15_000)  # MultiStepLR, stepped every iteration
    lr_decay: float = 0.1

    def __post_init__(self) -> None:
        _check_range("optim.lr_encoder", self.lr_encoder, lo=0, lo_open=True)
        _check_range("optim.lr_decoder", self.lr_decoder, lo=0, lo_open=True)
        _check_range("optim.lr_decay", self.lr_decay, lo=0, lo_open=True, hi=1)
        if list(self.milestones) != sorted(self.milestones) or any(m < 1 for m in self.milestones):
            raise ConfigError(f"optim.milestones: {list(self.milestones)} must be increasing positive integers")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    iterations: int = 30_000  # SPEC §5 (run length, in `unit`s)
    warmup: int = 2_000  # VAE warm-up; == iterations gives the VAE baseline
    log_every: int = 100  # always in iterations
    eval_every: int = 0  # 0 = evaluate only at the end
    checkpoint_every: int = 1_000
    # "epochs" (images, SPEC §5): iterations, warmup, eval_every, checkpoint_every, prior.mog_warmup and
    # optim.milestones count epochs; the loop converts them once the dataset size is known.
    unit: ScheduleUnit = "iterations"

    def __post_init__(self) -> None:
        _check_choice("schedule.unit", self.unit, ScheduleUnit)
        _check_range("schedule.iterations", self.iterations, lo=1)
        _check_range("schedule.warmup", self.warmup, lo=0)
        if self.warmup > self.iterations:
            raise ConfigError(f"schedule.warmup: {self.warmup} is longer than the run; allowed "
                              f"[0, schedule.iterations={self.iterations}]")
        for name in ("log_every", "eval_every", "checkpoint_every"):
            _check_range(f"schedule.{name}", getattr(self, name), lo=0)


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    grid_size: int = 1024  # SPEC §6.5 gnELBO grid per side
    data_points: int = 12_800  # gnELBO data points
    hist_samples: int = 5_000  # histogram KL / JSD samples per side
    bins: int = 100
    mc_samples: int = 100  # gnELBO MC samples (mixture priors)
    plots: bool = True
    # the evaluations every schedule.eval_every iterations (not the final one) include the gnELBO: its
    # 1024^2-point grid is ~85 % of a 2D evaluation's time; a selection stage that ranks by histogram KL
    # turns it off (Tune's schedulers read the selection's metrics only)
    intermediate_gnelbo: bool = True
    # images, after training: FID / precision-recall / probes (service.image_eval) with this protocol; "none" = off
    fid_protocol: FidProtocol = "none"
    fid_samples: int = 10_000  # images per FID set, and training latents of the probes
    # mode purity (labelled data, mixtures; service.metrics.modes): decoded samples per component,
    # and the k of the nearest-neighbour labelling of 2D samples by labelled real points
    purity_samples: int = 400
    purity_k: int = 15

    def __post_init__(self) -> None:
        for name in ("grid_size", "data_points", "hist_samples", "bins", "mc_samples", "fid_samples"):
            _check_range(f"eval.{name}", getattr(self, name), lo=2)
        _check_choice("eval.fid_protocol", self.fid_protocol, FidProtocol)
        _check_range("eval.purity_samples", self.purity_samples, lo=1)
        _check_range("eval.purity_k", self.purity_k, lo=1)


@dataclass(frozen=True, kw_only=True)
class ScalingConfig:
    workers: int = 1  # Ray Train workers (data parallel)
    use_gpu: bool = False  # NCCL on GPUs instead of gloo on CPUs
    threads_per_worker: int = 0  # torch threads per worker; 0 = CPUs given to the worker
    channels_last: bool = False  # resnet: NHWC memory format for convolutions (GPU speed switch)
    amp_bf16: bool = False  # resnet: encoder/decoder under bfloat16 autocast; losses stay float32
    compile: bool = False  # torch.compile the encoder and decoder forwards

    def __post_init__(self) -> None:
        _check_range("scaling.workers", self.workers, lo=1)
        _check_range("scaling.threads_per_worker", self.threads_per_worker, lo=0)


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    tracking_uri: str | None = None  # None = $MLFLOW_TRACKING_URI or sqlite in the output dir's parent
    experiment: str = "introprior"
    run_name: str | None = None  # also the Ray Train run name: a re-run with the same name resumes
    model_name: str | None = None  # registered MLflow model (jobs.train); None = introprior-<preset, '/' as '-'>

    def __post_init__(self) -> None:
        if self.model_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", self.model_name):
            raise ConfigError(f"tracking.model_name: {self.model_name!r} is invalid; allowed 1-100 letters, digits, "
                              "'_', '.', '-' (no '/': it would split a models:/ URI), starting with a letter or digit")


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    name: str = "custom"  # preset name this config came from
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        image, resnet = self.data.is_image, self.network.kind == "resnet"
        if image != resnet:
            raise ConfigError(f"network.kind: {self.network.kind!r} does not fit data.dataset={self.data.dataset!r}; "
                              f"allowed {'resnet' if image else 'mlp'} ('resnet' for image datasets "
                              f"{list(IMAGE_DATASETS)}, 'mlp' for 2D points)")
        if self.schedule.unit == "epochs" and not image:
            raise ConfigError(f"schedule.unit: 'epochs' needs an image dataset (2D data is a fresh-sample stream); "
                              f"allowed ['iterations'] for data.dataset={self.data.dataset!r}")
        if not resnet and (self.scaling.channels_last or self.scaling.amp_bf16 or self.network.sync_bn):
            raise ConfigError("scaling.channels_last / scaling.amp_bf16 / network.sync_bn: only for "
                              "network.kind='resnet' (image data); allowed [false] with 'mlp'")
        if self.network.sync_bn and self.scaling.workers > 1 and not self.scaling.use_gpu:
            raise ConfigError("network.sync_bn: torch's SyncBatchNorm runs on GPUs only; allowed [false] unless "
                              "scaling.use_gpu=true (CPU workers use per-worker BatchNorm)")
        if self.prior.kind == "mog" and self.prior.init == "vamp" and self.schedule.warmup > 0:
            if self.prior.mog_warmup > self.schedule.warmup:
                raise ConfigError(f"prior.mog_warmup: {self.prior.mog_warmup} exceeds schedule.warmup="
                                  f"{self.schedule.warmup}; allowed [0, {self.schedule.warmup}]")

    @property
    def conversion_iteration(self) -> int | None:
        """Iteration at which the VampPrior becomes a MoG (SPEC §3.4), or None."""
        if self.prior.kind != "mog" or self.prior.init != "vamp":
            return None
        return self.schedule.warmup - self.prior.mog_warmup

    @property
    def is_vae(self) -> bool:
        return self.schedule.warmup >= self.schedule.iterations


def in_iterations(cfg: ExperimentConfig, steps_per_epoch: int) -> ExperimentConfig:
    """``cfg`` with an epoch-based schedule (SPEC §5) expressed in iterations; unchanged otherwise.

    Scales ``schedule.iterations / warmup / eval_every / checkpoint_every``, ``prior.mog_warmup``
    and ``optim.milestones`` by ``steps_per_epoch``; ``log_every`` already counts iterations.
    """
    if cfg.schedule.unit == "iterations":
        return cfg
    k, s = steps_per_epoch, cfg.schedule
    schedule = dataclasses.replace(s, unit="iterations", iterations=s.iterations * k, warmup=s.warmup * k,
                                   eval_every=s.eval_every * k, checkpoint_every=s.checkpoint_every * k)
    return dataclasses.replace(cfg, schedule=schedule,
                               prior=dataclasses.replace(cfg.prior, mog_warmup=cfg.prior.mog_warmup * k),
                               optim=dataclasses.replace(cfg.optim, milestones=tuple(m * k for m in cfg.optim.milestones)))


# --------------------------------------------------------------------------------------------
# dict / YAML round trip and overrides
# --------------------------------------------------------------------------------------------

def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists) suitable for YAML and MLflow params."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (tuples from lists)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        _check_choice(path, value, tp)
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(path, value, a)
            except ConfigError as e:
                errors.append(str(e))
        names = [getattr(a, "__name__", str(a)) for a in args]
        raise ConfigError(f"{path}: {value!r} does not match any of {names}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (elem, _) = typing.get_args(tp)
        return tuple(_coerce(f"{path}[{i}]", v, elem) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, path)
    raise ConfigError(f"{path}: unsupported type {tp}")


def _from_dict(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = _field_types(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else key
        if key not in known:
            raise ConfigError(f"{dotted}: unknown key; known keys are {known}")
        kwargs[key] = _coerce(dotted, value, hints[key])
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - kw_only dataclasses with defaults everywhere
        raise ConfigError(f"{path or 'config'}: {e}") from None


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build and validate an ``ExperimentConfig``; unknown keys raise ``ConfigError``."""
    return _from_dict(ExperimentConfig, data, "")


def load_yaml(path: str) -> ExperimentConfig:
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {path!r} is not valid YAML ({' '.join(str(e).split())})") from None
    return from_dict(data)


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def parse_value(text: str) -> Any:
    """Parse an override value: Python/YAML literals; bare words stay strings."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(cfg: ExperimentConfig, overrides: dict[str, Any] | list[str]) -> ExperimentConfig:
    """Return ``cfg`` with dotted-key overrides applied and the result re-validated.

    ``overrides`` is ``{"objective.beta_kl": 0.5}`` or ``["objective.beta_kl=0.5", ...]``.
    """
    if isinstance(overrides, list):
        parsed: dict[str, Any] = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected dotted.key=value")
            key, raw = item.split("=", 1)
            parsed[key.strip()] = parse_value(raw)
        overrides = parsed
    data = to_dict(cfg)
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                prefix = ".".join(parts[: i + 1])
                known = [k for k, v in node.items() if isinstance(v, dict)]
                raise ConfigError(f"{prefix}: unknown section; known sections are {known}")
            node = node[part]
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            known = [k for k, v in node.items() if not isinstance(v, dict)]
            raise ConfigError(f"{dotted}: unknown key; known keys are {known}")
        node[parts[-1]] = value
    return from_dict(data)
