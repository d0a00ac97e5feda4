"""Run configuration: typed defaults, YAML files and ``key=value`` overrides.

A run is described by :class:`RunConfig`. ``load_config`` merges, in order, the typed defaults,
an optional YAML file and command-line overrides (OmegaConf dot-list syntax, e.g.
``train.batch_size=8 method.name=mib``). Unknown keys and values of the wrong type are rejected
with a one-line :class:`ConfigError` naming the key; so are an unknown method, its weights and
options and an output stride the backbone does not take, checked against the registries (this
module sits above them, docs/architecture.md). :func:`resolve_config` turns what a user typed
(a file, or a packaged config's name) into a file.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .configs_index import SUFFIX, list_configs, packaged
from .threads import parse_threads


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


@dataclass
class MemoryConfig:
    """Exemplar memory (docs/methods.md "Exemplar memory"): ``size`` images of the previous steps
    replayed at every step ``t >= 1`` (0: none; unset: the method's default, 100 for ssul-m and dkd-m,
    0 for every other method; the releases use 100 on VOC and 300 on ADE20K)."""

    size: Optional[int] = None


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
    memory: MemoryConfig = field(default_factory=MemoryConfig)
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
    # resnet18/50/101: the first block of a dilated stage at the stage's dilation (release: MiB, PLOP,
    # UCD) or at the previous one (previous: torchvision's); other backbones ignore it. docs/methods.md
    first_block_dilation: str = "release"  # release | previous


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
    # train only these steps, then stop: N, A-B, A- or -B (ucdseg.step_range; `ucdseg run --steps`);
    # running again without it continues. None: every step
    steps: Optional[str] = None
    # torch's CPU threads: auto or N (docs/performance.md "Threads on a busy machine"); the
    # environment variable UCDSEG_THREADS counts when this is auto. auto: a resumed run keeps
    # its previous segment's count, else OMP_NUM_THREADS, else the cores other processes leave free
    threads: Optional[str] = "auto"


@dataclass
class MethodConfig:
    name: str = "mib+ucd"
    weights: Dict[str, float] = field(default_factory=dict)  # overrides of the method's loss weights
    # the method's own options, checked by the method (``ucdseg methods`` lists them), e.g.
    # UCD's temperature / formulation / gather, PLOP's pod_factor / pod_last_factor
    options: Dict[str, Any] = field(default_factory=dict)


#: Backbones whose layout ``model.first_block_dilation`` sets. Their saved configs written before the
#: key existed (issue 21) were trained with torchvision's layout: :func:`migrate` reads them as "previous".
FIRST_BLOCK_DILATION_BACKBONES = ("resnet18", "resnet50", "resnet101")


def migrate(data: dict) -> dict:
    """A saved config (``config.yaml``, ``results.json``, a checkpoint) in today's keys: a ResNet
    config without ``model.first_block_dilation`` gets ``"previous"``, the layout it was trained
    with (a missing key would otherwise take today's default, ``"release"``, and rebuild an old
    checkpoint with another network; docs/protocol.md §2.1). A config holding both ``task.order`` and ``task.order_seed``
    (saved before they were refused together) keeps ``task.order``, the order it was trained with.
    Only for saved configs: YAML files take the default."""
    task = data.get("task") if isinstance(data, dict) else None
    if isinstance(task, dict) and task.get("order") is not None and task.get("order_seed") is not None:
        # saved before both were refused together (issue 23): task.order was the order trained
        data = {**data, "task": {**task, "order_seed": None}}
    model = data.get("model") if isinstance(data, dict) else None
    if (isinstance(model, dict) and "first_block_dilation" not in model
            and model.get("backbone") in FIRST_BLOCK_DILATION_BACKBONES):
        data = {**data, "model": {**model, "first_block_dilation": "previous"}}
    return data


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
    "model.first_block_dilation": ("release", "previous"),
}


def _first_line(exc: OmegaConfBaseException) -> str:
    return _clip(str(getattr(exc, "msg", exc)).splitlines()[0], 200)


def _clip(text: str, most: int) -> str:
    return text if len(text) <= most else text[: most - 4] + " ..."


def _merge(*configs: Any) -> DictConfig:
    try:
        return OmegaConf.merge(*configs)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"invalid config{f' key {key!r}' if key else ''}: {_first_line(exc)}") from None


@dataclass(frozen=True)
class _Range:
    """Allowed values of a numeric key: ``low`` (< or <=) value (< or <=) ``high``; None: unbounded.
    Float keys must also be finite (NaN and infinities fail every check anyway but are named)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # value > low (else >= low)
    high_open: bool = True  # value < high (else <= high)

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, integer: bool) -> str:
        kind = "an integer" if integer else "a finite number"
        low, high = (f"{v:g}" if isinstance(v, float) else v for v in (self.low, self.high))
        if self.low is not None and self.high is not None:
            return f"{kind} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {low}"
        return f"{kind} {'<' if self.high_open else '<='} {high}"


# Numeric keys and their ranges, checked when the config is loaded so that a value that would train
# nothing, divide by zero or diverge is named before anything runs. Keys whose value is None (unset,
# e.g. train.iterations) are skipped. A method's own options (method.options.*) are checked by the
# method (Method.resolve_options), the loss weights (method.weights.*) below.
_RANGES: Dict[str, _Range] = {
    "seed": _Range(0, 2**32),  # the engine derives per-step and per-sample seeds from it (< 2**63)
    "task.order_seed": _Range(0),
    "train.batch_size": _Range(1),
    "train.accumulate": _Range(1),
    "train.iterations": _Range(1),
    "train.iterations_next": _Range(1),
    "train.epochs": _Range(0, low_open=True),
    "train.epochs_next": _Range(0, low_open=True),
    "train.log_every": _Range(1),
    "train.checkpoint_every": _Range(0),
    "train.lr": _Range(0, low_open=True),
    "train.lr_next": _Range(0, low_open=True),
    "train.momentum": _Range(0, 1),
    "train.weight_decay": _Range(0),
    "train.poly_power": _Range(0),
    "data.crop_size": _Range(1),
    "data.eval_crop_size": _Range(1),
    "data.scale_min": _Range(0, low_open=True),
    "data.scale_max": _Range(0, low_open=True),
    "data.workers": _Range(0),
    "data.memory.size": _Range(0),
    "data.embedded_train": _Range(1),
    "data.embedded_val": _Range(1),
    "data.embedded_size": _Range(1),
    "eval.batch_size": _Range(1),
    "eval.num_images": _Range(0),
}
_MISSING = object()


def _lookup(cfg: Any, dotted: str) -> Any:
    """The value at ``dotted`` in ``cfg`` (dataclass attributes and dict keys), or ``_MISSING``."""
    value = cfg
    for part in dotted.split("."):
        if isinstance(value, dict):
            value = value.get(part, _MISSING)
        else:
            value = getattr(value, part, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


def _check_range(cfg: RunConfig, dotted: str, expected: _Range) -> None:
    value = _lookup(cfg, dotted)
    if value is _MISSING or value is None:
        return
    integer = isinstance(value, int) and not isinstance(value, bool)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not expected.holds(float(value)):
        raise ConfigError(f"config key {dotted!r} is {value!r}; expected {expected.describe(integer)}")


def _validate(cfg: RunConfig) -> None:
    for dotted, choices in _CHOICES.items():
        section, _, attr = dotted.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, attr)
        if value not in choices:
            raise ConfigError(f"config key {dotted!r} is {value!r}; expected one of {list(choices)}")
    # numeric ranges (before the backbone table, which imports torch: a typo fails in a blink)
    for dotted, expected in _RANGES.items():
        _check_range(cfg, dotted, expected)
    for name in cfg.method.weights:
        _check_range(cfg, f"method.weights.{name}", _Range(0))
    try:
        parse_threads(cfg.train.threads, "config key 'train.threads'")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.data.scale_min > cfg.data.scale_max:
        raise ConfigError(f"config keys 'data.scale_min' and 'data.scale_max' are {cfg.data.scale_min} and "
                          f"{cfg.data.scale_max}; expected scale_min <= scale_max")
    from .models.backbones import BACKBONES  # the backbone registry, with the built-in backbones

    strides = BACKBONES.get(cfg.model.backbone).output_strides if cfg.model.backbone in BACKBONES else None
    if strides is not None and cfg.model.output_stride not in strides:
        raise ConfigError(f"config key 'model.output_stride' is {cfg.model.output_stride}; backbone "
                          f"{cfg.model.backbone} takes {' or '.join(map(str, strides))}")
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


def check_run_config(cfg: RunConfig | dict) -> None:
    """What the config of a new command must hold besides its values' ranges (a saved config, read
    by :func:`from_dict`, is not checked again): ``name`` names a folder inside ``output_dir``, and
    at most one of ``task.order`` and ``task.order_seed`` is set (``cfg``: a RunConfig or its dict)."""
    raw = _lookup(cfg, "name")
    name = Path(str(raw))
    if not str(raw).strip() or name.is_absolute() or ".." in name.parts or not name.parts:
        raise ConfigError(f"config key 'name' is {raw!r}; expected the name of the run folder inside output_dir "
                          "(e.g. name=mib-seed0, or name=ablation/mib), not an absolute path, '.', or a path with "
                          "'..'; output_dir= chooses where runs are written")
    order, seed = _lookup(cfg, "task.order"), _lookup(cfg, "task.order_seed")
    if order not in (None, _MISSING) and seed not in (None, _MISSING):
        raise ConfigError(f"config key 'task.order_seed' is {seed} but task.order is set too ({list(order)}); "
                          "expected one of them: task.order gives the class order, task.order_seed draws one")


def _yaml_error(path: Path, exc: Exception) -> ConfigError:
    """One line naming the file, and the line and column of a YAML syntax error (1-based)."""
    import yaml

    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = ""
        if exc.context and exc.context_mark is not None:
            context = f" ({exc.context} at line {exc.context_mark.line + 1} column {exc.context_mark.column + 1})"
        return ConfigError(f"config file {path} line {mark.line + 1} column {mark.column + 1}: "
                           f"{exc.problem}{context}")
    first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return ConfigError(f"config file {path} is not valid YAML: {first}")


def _yaml_named(path: Path) -> bool:
    """Whether ``path`` is named as a YAML file: only then may an error quote what it holds (a file
    of any other name given as a config may be anything, and its content is not printed)."""
    return path.suffix.lower() in (".yaml", ".yml")


def _not_a_config(path: Path, where: str = "") -> ConfigError:
    """The error for a file not named .yaml whose content is no config: nothing of it is quoted."""
    return ConfigError(f"config file {path}{where} is not a ucdseg config (it is not named .yaml and does not read "
                       "as a mapping of config keys; nothing of it is shown); expected a YAML file of keys such as "
                       "'train: {lr: 0.01}'")


def _parse_yaml(path: Path) -> DictConfig:
    """The mapping of a YAML config file; a syntax error, a file that is not UTF-8 text or a top level
    that is not a mapping is a one-line :class:`ConfigError` (quoting the file only when it is
    named .yaml or .yml)."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}): expected a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # the document's shape, with line and column
        if node is None:  # an empty file (or only comments): no key changed
            return OmegaConf.create({})
        if not isinstance(node, yaml.MappingNode):
            if not _yaml_named(path):
                raise _not_a_config(path)
            short = isinstance(node, yaml.ScalarNode) and len(text.strip().splitlines()) == 1 and len(node.value) <= 40
            kind = ("a list" if isinstance(node, yaml.SequenceNode) else f"the single value {node.value!r}" if short
                    else f"text of {len(text.strip().splitlines())} line(s)")
            raise ConfigError(f"config file {path} holds {kind} at its top level; expected a mapping of keys "
                              "such as 'train: {lr: 0.01}'")
        data = OmegaConf.create(text)
    except yaml.YAMLError as exc:
        if not _yaml_named(path):
            mark = getattr(exc, "problem_mark", None)
            raise _not_a_config(path, f" (line {mark.line + 1} column {mark.column + 1})" if mark else "") from None
        raise _yaml_error(path, exc) from None
    except OmegaConfBaseException as exc:
        if not _yaml_named(path):
            raise _not_a_config(path) from None
        raise ConfigError(f"config file {path}: {_first_line(exc)}") from None
    if not isinstance(data, DictConfig):  # OmegaConf read it otherwise than PyYAML's composer
        raise ConfigError(f"config file {path}: expected a mapping of keys at its top level")
    return data


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> list[DictConfig]:
    """The YAML layers of ``path``: its ``_base_`` files (relative to it) first, then itself."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in chain:
        raise ConfigError(f"config file {path} includes itself through _base_")
    data = _parse_yaml(path)
    bases = data.pop("_base_", None)
    if OmegaConf.is_config(bases):
        bases = OmegaConf.to_container(bases)
    bases = [] if bases is None else [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError(f"config file {path}: _base_ is {_clip(repr(bases), 60)}; expected a file name or a list of "
                          "file names")
    try:  # its keys, checked here so that an error names this file (of a _base_ chain)
        _merge(OmegaConf.structured(RunConfig), data)
    except ConfigError as exc:
        raise (ConfigError(f"config file {path}: {exc}") if _yaml_named(path) else _not_a_config(path)) from None
    layers: list[DictConfig] = []
    for base in bases:
        base_path = path.parent / base
        if not base_path.exists():  # a packaged config's name: _base_: voc/15-1-overlapped/mib
            base_path = packaged(base) or base_path
        layers += _read_yaml(base_path, chain + (path.resolve(),))
    return layers + [data]


def resolve_config(name: str | Path) -> Path:
    """The YAML file ``name`` stands for: an existing path, else the packaged config of that name.

    Neither is a one-line :class:`ConfigError` naming ``name`` and the closest packaged names
    (:mod:`ucdseg.configs_index`).
    """
    path = Path(name).expanduser()
    if path.exists():  # a path that exists wins (a folder is refused by the config loader)
        return path
    packaged_path = packaged(str(name))
    if packaged_path is not None:
        return packaged_path
    stem = str(name).replace("\\", "/").strip("/").removeprefix("configs/").removesuffix(SUFFIX)
    close = difflib.get_close_matches(stem, list_configs(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"config file {name} does not exist, and no packaged config is named {stem!r} "
                      f"(`ucdseg configs` lists them){hint}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Typed defaults < YAML file ``path`` < ``overrides`` (``key=value`` strings).

    A YAML file may name other files in ``_base_`` (a path or a list, relative to it, or a packaged
    config's name such as ``embedded/mib``); they are merged first, so a file only states what it
    changes.
    """
    layers: list[Any] = [OmegaConf.structured(RunConfig)]
    if path is not None:
        layers += _read_yaml(Path(path))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid override: {_first_line(exc)}") from None
    cfg: RunConfig = OmegaConf.to_object(_merge(*layers))  # type: ignore[assignment]
    try:
        _validate(cfg)
        check_run_config(cfg)
    except ConfigError as exc:  # a bad value that came from the file: name the file too
        key = re.match(r"config key '([^']+)'", str(exc))
        given = {item.split("=", 1)[0] for item in overrides}
        if path is not None and key and key.group(1) not in given:
            raise ConfigError(f"config file {path}: {exc}") from None
        raise
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_dict(data: dict) -> RunConfig:
    cfg: RunConfig = OmegaConf.to_object(_merge(OmegaConf.structured(RunConfig), migrate(data)))  # type: ignore
    _validate(cfg)
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
