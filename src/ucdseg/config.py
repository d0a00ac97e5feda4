"""Run configuration: typed defaults, YAML files and ``key=value`` overrides.

A run is described by :class:`RunConfig`. ``load_config`` merges, in order, the typed defaults,
an optional YAML file and command-line overrides (OmegaConf dot-list syntax, e.g.
``train.batch_size=8 method.name=mib``). Unknown keys and values of the wrong type are rejected
with a one-line :class:`ConfigError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


@dataclass
class DataConfig:
    dataset: str = "embedded"  # voc | ade | cityscapes | embedded
    root: Optional[str] = None  # None: the embedded benchmark's default location
    setting: str = "overlapped"  # overlapped | disjoint | partitioned
    crop_size: int = 64  # training crop (random resized crop, scale below)
    scale_min: float = 0.5
    scale_max: float = 2.0
    eval_crop_size: Optional[int] = None  # None: evaluate at the native size
    score_background: bool = False  # ADE20K/Cityscapes: score class 0 at evaluation
    workers: int = 0  # DataLoader worker processes
    cache_dir: Optional[str] = None  # image-index cache; None: $UCDSEG_CACHE or ~/.cache/ucdseg
    # embedded benchmark generation (used only when dataset == "embedded")
    embedded_train: int = 2000
    embedded_val: int = 400
    embedded_size: int = 64


@dataclass
class TaskConfig:
    name: str = "4-3-3"
    order: Optional[List[int]] = None  # explicit foreground class order
    order_seed: Optional[int] = None  # seeded random class order


@dataclass
class ModelConfig:
    backbone: str = "embedded_resnet"  # the embedded benchmark's (the default dataset); VOC/ADE/Cityscapes: resnet101
    output_stride: int = 4  # embedded_resnet: 4 or 8; torchvision backbones: 8 or 16
    pretrained: Optional[str] = None  # torchvision-format ImageNet checkpoint, weight-enum name, or "embedded"


@dataclass
class TrainConfig:
    batch_size: int = 16  # global batch (split across processes)
    epochs: float = 1.0  # per step, used when iterations is unset
    epochs_next: Optional[float] = None  # steps >= 1; None: same as epochs
    iterations: Optional[int] = None  # per step; overrides epochs
    iterations_next: Optional[int] = None  # steps >= 1; None: same as iterations
    lr: float = 0.01  # step 0
    lr_next: float = 0.001  # steps >= 1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    amp: str = "none"  # none | bf16 | fp16
    # speed options (measured by benchmarks/bench_options.py; off by default, see docs/performance.md):
    channels_last: bool = False  # train the model and feed the images in NHWC memory format
    compile: bool = False  # torch.compile the training forward (needs a C/C++ toolchain)
    step0_from: Optional[str] = None  # reuse step 0 of this run directory (same data, task, model)
    # BatchNorm under several processes (docs/distributed.md): sync = SyncBatchNorm on CUDA+DDP
    # (per-process statistics elsewhere), local = per-process statistics, frozen = every BatchNorm
    # in eval mode (running statistics used and never updated; its affine parameters still trained)
    bn: str = "sync"  # sync | local | frozen
    # gradient accumulation: each process's share of the global batch in N equal micro-batches
    # (same global batch and schedule, 1/N of the activation memory; see docs/distributed.md)
    accumulate: int = 1
    checkpoint_every: int = 0  # also checkpoint every N iterations inside a step (0: only at step end)
    log_every: int = 10


@dataclass
class MethodConfig:
    name: str = "mib+ucd"
    weights: Dict[str, float] = field(default_factory=dict)  # overrides of the method's loss weights
    # the method's own options, checked by the method (``ucdseg methods`` lists them), e.g.
    # UCD's temperature / formulation / gather, PLOP's pod_factor / pod_last_factor
    options: Dict[str, Any] = field(default_factory=dict)


#: Keys of configs written before the methods owned their options (issue 13), and where they went.
LEGACY_METHOD_KEYS = {"ucd_temperature": "temperature", "ucd_formulation": "formulation", "ucd_gather": "gather",
                      "pod_factor": "pod_factor", "pod_last_factor": "pod_last_factor"}
#: Their defaults: a saved config holding a default value means "not set".
_LEGACY_DEFAULTS = {"ucd_temperature": 0.07, "ucd_formulation": "reference", "ucd_gather": False,
                    "pod_factor": 0.01, "pod_last_factor": 0.0005}


def migrate(data: dict) -> dict:
    """A saved config (``config.yaml``, ``results.json``, a checkpoint) in today's keys: the
    method options of older configs move into ``method.options`` (defaults dropped)."""
    method = data.get("method") if isinstance(data, dict) else None
    if not isinstance(method, dict) or not any(k in method for k in LEGACY_METHOD_KEYS):
        return data
    method = dict(method)
    options = dict(method.get("options") or {})
    for old, new in LEGACY_METHOD_KEYS.items():
        if old in method:
            value = method.pop(old)
            if value != _LEGACY_DEFAULTS[old]:
                options[new] = value
    method["options"] = options
    return {**data, "method": method}


@dataclass
class EvalConfig:
    batch_size: int = 32
    num_images: int = 4  # prediction images written per step
    # conventions of the evaluation after an intermediate step (docs/benchmarks.md); the last step,
    # where every class is seen, is scored the same under all of them
    images: str = "all"  # all | seen (drop the images whose foreground classes are all unseen: MiB, PLOP, UCD)
    unseen: str = "ignore"  # ignore (unseen classes void: MiB) | background (labelled as background: PLOP, UCD)


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    imports: Optional[List[str]] = None  # modules of your own to import (methods, datasets): ucdseg.plugins
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


_CHOICES = {
    "data.setting": ("overlapped", "disjoint", "partitioned"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.bn": ("sync", "local", "frozen"),
    "eval.images": ("all", "seen"),
    "eval.unseen": ("ignore", "background"),
    "device": ("auto", "cpu", "cuda"),
    "model.output_stride": (4, 8, 16),
}


def _first_line(exc: OmegaConfBaseException) -> str:
    return str(getattr(exc, "msg", exc)).splitlines()[0]


def _merge(*configs: Any) -> DictConfig:
    try:
        return OmegaConf.merge(*configs)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"invalid config{f' key {key!r}' if key else ''}: {_first_line(exc)}") from None


def _validate(cfg: RunConfig) -> None:
    for dotted, choices in _CHOICES.items():
        section, _, attr = dotted.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, attr)
        if value not in choices:
            raise ConfigError(f"config key {dotted!r} is {value!r}; expected one of {list(choices)}")
    from .models.backbones import BACKBONE_OUTPUT_STRIDES

    strides = BACKBONE_OUTPUT_STRIDES.get(cfg.model.backbone)
    if strides is not None and cfg.model.output_stride not in strides:
        raise ConfigError(f"config key 'model.output_stride' is {cfg.model.output_stride}; backbone "
                          f"{cfg.model.backbone} takes {' or '.join(map(str, strides))}")
    for dotted in ("train.batch_size", "train.accumulate", "eval.batch_size", "data.crop_size"):
        section, attr = dotted.split(".")
        if getattr(getattr(cfg, section), attr) < 1:
            raise ConfigError(f"config key {dotted!r} must be >= 1")
    from .plugins import load_plugins  # user methods and datasets, before anything looks them up

    load_plugins(cfg.imports)
    from .methods import get_method

    try:
        method = get_method(cfg.method.name)
    except KeyError as exc:
        raise ConfigError(f"config key 'method.name': {exc.args[0]}") from None
    try:
        method.weights(cfg.method.weights)
        method.resolve_options(cfg.method.options)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> list[DictConfig]:
    """The YAML layers of ``path``: its ``_base_`` files (relative to it) first, then itself."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in chain:
        raise ConfigError(f"config file {path} includes itself through _base_")
    try:
        data = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors come in many types
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    bases = data.pop("_base_", None) if isinstance(data, DictConfig) else None
    layers: list[DictConfig] = []
    for base in [bases] if isinstance(bases, str) else list(bases or []):
        layers += _read_yaml(path.parent / base, chain + (path.resolve(),))
    return layers + [data]


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Typed defaults < YAML file ``path`` < ``overrides`` (``key=value`` strings).

    A YAML file may name other files in ``_base_`` (a path or a list, relative to it); they are
    merged first, so a file only states what it changes.
    """
    layers: list[Any] = [OmegaConf.structured(RunConfig)]
    if path is not None:
        layers += _read_yaml(Path(path))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    for item in overrides:
        key = item.split("=", 1)[0]
        if key.startswith("method.") and key[len("method."):] in LEGACY_METHOD_KEYS:
            raise ConfigError(f"config key {key!r} is now 'method.options.{LEGACY_METHOD_KEYS[key[7:]]}'")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid override: {_first_line(exc)}") from None
    cfg: RunConfig = OmegaConf.to_object(_merge(*layers))  # type: ignore[assignment]
    _validate(cfg)
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_dict(data: dict) -> RunConfig:
    cfg: RunConfig = OmegaConf.to_object(_merge(OmegaConf.structured(RunConfig), migrate(data)))  # type: ignore
    _validate(cfg)
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
