"""Dilated torchvision backbones that expose their stage outputs, and ImageNet weight loading.

Backbones (all built with ``weights=None``; weights come from :func:`load_backbone_weights`):

* ``resnet18``, ``resnet50``, ``resnet101``: the four stages are ``layer1`` .. ``layer4``
  (strides 4, 8, 16, 16 at output stride 16; 4, 8, 8, 8 at output stride 8). Output stride
  comes from dilation, in one of two layouts (``first_block_dilation``, the config's
  ``model.first_block_dilation``):

  - ``"release"`` (default): every block of a dilated stage runs at the stage's dilation, as in
    the In-Place-ABN ResNet of MiB, PLOP and UCD (``layer4`` at 2 at output stride 16; ``layer3``
    at 2 and ``layer4`` at 4 at output stride 8). Their ``models/resnet.py`` gives each stage one
    dilation (``[1, 1, 1, 2]`` / ``[1, 1, 2, 4]``, fcdl94/MiB ``models/resnet.py:48-51``) and hands
    it to every block (``_stride_dilation``, ``:100-104``), whose 3x3 convs all use it
    (``modules/residual.py:54-58``, ``:69-70``); arthurdouillard/CVPR2021_PLOP
    ``models/resnet.py:51-54, 112-116`` and ygjwd12345/UCD ``models/resnet.py:48-51, 100-104``
    are the same code.
  - ``"previous"``: torchvision's ``replace_stride_with_dilation``, where the first block of a
    dilated stage keeps the previous stage's dilation (1 in ``layer4`` at output stride 16).

  Both layouts have the same parameters (ImageNet weights load unchanged) and the same output
  sizes; only the first block's 3x3 dilation and padding differ. torchvision's ``BasicBlock``
  refuses dilation, so for ``resnet18`` :func:`dilate_resnet_stage` applies the change to the
  built network.
* ``embedded_resnet``: the embedded benchmark's backbone (:class:`EmbeddedResNet`), a narrow
  ResNet-10 (one ``BasicBlock`` per stage, widths 16, 32, 64, 128) without stem stride or
  max-pool, made for 64 px scenes: strides 1, 2, 4, 8 at output stride 8; ``layer4`` dilated at
  output stride 4, so a 64 px scene gives a 16 x 16 feature map (a ResNet-18 at output stride 16
  gives 4 x 4). Its ASPP rates (2, 4, 6) and width (128) suit that map; the pre-logits features
  keep 256 channels. Its single ``layer4`` block keeps dilation 1 (torchvision's layout) whatever
  ``first_block_dilation`` says, so the embedded benchmark and its pre-trained weights stay as
  they were; ``mobilenet_v3_large`` and registered backbones ignore it too.
* ``mobilenet_v3_large``: ``features`` of torchvision's MobileNetV3. At output stride 16 this
  is exactly ``mobilenet_v3_large(dilated=True)`` (the last strided block group runs at stride 1
  with dilation 2), as ``deeplabv3_mobilenet_v3_large`` uses it; at output stride 8 the stride-16
  group is dilated too (dilation 2, then 4). The four stages are the last block before each of
  the strided blocks C2, C3, C4 (``features.3``: 24 ch at stride 4, ``features.6``: 40 ch at
  stride 8, ``features.12``: 112 ch at stride 16) and the final 1x1 conv ``features.16``
  (960 ch), which feeds the segmentation head (as torchvision's DeepLab does).

Stage outputs are the modules' outputs, i.e. after the final ReLU/activation of each stage
(what MiB's ILT distils: its ``features["body"]`` is the activated last stage).
:meth:`Backbone.forward_with_preactivation` also returns, for PLOP's POD, each stage's
**pre-activation**: ``out + identity`` of the stage's last residual block before its final ReLU,
as PLOP's In-Place-ABN ``ResidualBlock(last=True)`` returns it. torchvision's blocks apply an
in-place ReLU to that sum, so :func:`stage_with_preactivation` runs the last block by hand
(:func:`block_preactivation`); it works for any ``nn.Sequential`` stage whose last module is a
torchvision ``BasicBlock`` or ``Bottleneck``. Other stages (MobileNetV3's) return their output as
the pre-activation: its inverted-residual blocks (``features.3/6/12``) end with a linear
projection and the residual sum, with no activation after it, so their output already is the
pre-activation sum; the last stage (``features.16``, 1x1 conv + BN + Hardswish) keeps its
Hardswish. PLOP's release has no MobileNet.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torchvision import models as tvm
from torch.nn import functional as F
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf
from torchvision.models.resnet import BasicBlock, Bottleneck

from ..registry import BACKBONES

__all__ = [
    "BACKBONES",
    "OUTPUT_STRIDES",
    "Backbone",
    "BackboneBuilder",
    "backbone_output_strides",
    "build_backbone",
    "FIRST_BLOCK_DILATIONS",
    "register_backbone",
    "dilate_resnet_stage",
    "has_preactivation",
    "block_preactivation",
    "stage_with_preactivation",
    "read_state_dict",
    "load_backbone_weights",
]

OUTPUT_STRIDES = (4, 8, 16)
#: ASPP rates at each output stride for 512 px crops (DeepLab-v3's values), see ``Backbone.aspp_rates``.
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}

#: Dilation layouts of the torchvision ResNets' dilated stages (module docstring).
FIRST_BLOCK_DILATIONS = ("release", "previous")
#: The dilated stages of a ResNet and their dilation, per output stride (MiB's ``models/resnet.py:48-51``).
_STAGE_DILATIONS = {16: {"layer4": 2}, 8: {"layer3": 2, "layer4": 4}}

#: Keys of torchvision's classification heads, dropped when loading ImageNet weights.
_HEAD_PREFIXES = ("fc.", "classifier.")


class Backbone(nn.Module):
    """A feature extractor returning the outputs of its four stages, shallowest first.

    Attributes:
        name: torchvision model name.
        output_stride: input size / size of the last stage output.
        body: the ``IntermediateLayerGetter`` that runs the network.
        stage_names: names of the modules whose outputs are returned (in ``body``).
        stage_channels: channels of each returned stage.
        out_channels: channels of the last stage (the head's input).
        key_prefix: prefix that torchvision's classification state dict puts before ``body``'s
            keys (``"features."`` for MobileNetV3, ``""`` for ResNets).
        preactivation_stages: per stage, whether :meth:`forward_with_preactivation` returns its
            last block's pre-activation (ResNet stages) or its output (other stages).
        aspp_rates: the atrous rates of the segmentation head's ASPP suited to this backbone
            (DeepLab-v3's for 512 px crops, unless the backbone is made for other sizes).
        aspp_channels: the width of the ASPP branches.
        head_channels: the width of the pre-logits features (256 for every built-in backbone).
    """

    def __init__(self, name: str, output_stride: int, body: IntermediateLayerGetter,
                 stage_names: list[str], stage_channels: list[int], key_prefix: str,
                 aspp_rates: tuple[int, ...] | None = None, aspp_channels: int = 256,
                 head_channels: int = 256) -> None:
        super().__init__()
        self.head_channels = head_channels
        self.aspp_rates = tuple(aspp_rates or ASPP_RATES[output_stride])
        self.aspp_channels = aspp_channels
        self.name = name
        self.output_stride = output_stride
        self.body = body
        self.stage_names = list(stage_names)
        self.stage_channels = list(stage_channels)
        self.out_channels = stage_channels[-1]
        self.key_prefix = key_prefix
        # which stages return a true pre-activation (the others return their output), see the module docstring
        self.preactivation_stages = [has_preactivation(body[name]) for name in self.stage_names]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return the four stage outputs of ``x`` (B, 3, H, W), shallowest first."""
        return self.forward_with_preactivation(x)[0]

    def forward_with_preactivation(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The four stage outputs and the four stage pre-activations (module docstring), shallowest first.

        Runs ``body``'s modules in order as ``IntermediateLayerGetter`` does; a stage for which
        :func:`has_preactivation` held at construction (``preactivation_stages``) goes through
        :func:`stage_with_preactivation`, whose output equals the stage's own forward.
        """
        stages: list[Tensor] = []
        preactivations: list[Tensor] = []
        exposes = dict(zip(self.stage_names, self.preactivation_stages))
        for name, module in self.body.items():
            if name not in exposes:
                x = module(x)
                continue
            if exposes[name]:
                x, pre = stage_with_preactivation(module, x)
            else:
                x = pre = module(x)
            stages.append(x)
            preactivations.append(pre)
        return stages, preactivations


def has_preactivation(stage: nn.Module) -> bool:
    """True for an ``nn.Sequential`` whose last module is a torchvision ``BasicBlock``/``Bottleneck``.

    A subclass counts only if it keeps torchvision's ``forward``, which :func:`block_preactivation`
    re-implements.
    """
    if not isinstance(stage, nn.Sequential) or len(stage) == 0:
        return False
    block = stage[-1]
    return any(isinstance(block, kind) and type(block).forward is kind.forward for kind in (BasicBlock, Bottleneck))


def block_preactivation(block: BasicBlock | Bottleneck, x: Tensor) -> Tensor:
    """``out + identity`` of a torchvision ``BasicBlock``/``Bottleneck``: its forward without the final ReLU."""
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    identity = x if block.downsample is None else block.downsample(x)
    return out + identity


def stage_with_preactivation(stage: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    """Run a ResNet stage; return its output and its last block's pre-activation ``out + identity``.

    The output is ``relu(pre-activation)``, the same values as ``stage(x)``.
    """
    if not has_preactivation(stage):
        raise ValueError(f"stage_with_preactivation needs an nn.Sequential ending with a torchvision "
                         f"BasicBlock or Bottleneck, got {type(stage).__name__}")
    for block in list(stage)[:-1]:
        x = block(x)
    pre = block_preactivation(stage[-1], x)
    return F.relu(pre), pre


def dilate_resnet_stage(stage: nn.Sequential, previous_dilation: int, dilation: int) -> None:
    """Turn a strided ResNet stage (``layerN``) into a dilated one, in place.

    Same result as torchvision's ``replace_stride_with_dilation``: every conv and the
    downsample projection get stride 1; the 3x3 convs of the first block use
    ``previous_dilation`` and those of the other blocks use ``dilation`` (padding = dilation,
    so spatial sizes are kept). Works for ``BasicBlock`` and ``Bottleneck`` stages.
    """
    for index, block in enumerate(stage):
        rate = previous_dilation if index == 0 else dilation
        for module in block.modules():
            if isinstance(module, nn.Conv2d):
                module.stride = (1, 1)
                if module.kernel_size == (3, 3):
                    module.dilation = (rate, rate)
                    module.padding = (rate, rate)


def _resnet(name: str, output_stride: int, first_block_dilation: str = "release") -> Backbone:
    dilate = [False, output_stride == 8, True]
    if name == "resnet18":
        net = tvm.resnet18(weights=None)
        rate = 1
        for stage_name, flag in zip(("layer2", "layer3", "layer4"), dilate):
            if flag:
                dilate_resnet_stage(getattr(net, stage_name), rate, rate * 2)
                rate *= 2
    else:
        net = getattr(tvm, name)(weights=None, replace_stride_with_dilation=dilate)
    if first_block_dilation == "release":  # the first block of each dilated stage at the stage's rate
        for stage_name, rate in _STAGE_DILATIONS[output_stride].items():
            dilate_resnet_stage(getattr(net, stage_name), rate, rate)
    stages = ["layer1", "layer2", "layer3", "layer4"]
    body = IntermediateLayerGetter(net, return_layers={s: s for s in stages})
    expansion = type(net.layer1[0]).expansion  # 1 for BasicBlock, 4 for Bottleneck
    channels = [64 * 2**i * expansion for i in range(4)]
    return Backbone(name, output_stride, body, stages, channels, key_prefix="")


class EmbeddedResNet(nn.Module):
    """The embedded benchmark's classification network: a narrow ResNet-10 for small images.

    torchvision's ``ResNet`` layout and state-dict names (``conv1``, ``bn1``, ``layer1`` ..
    ``layer4`` of torchvision ``BasicBlock``s, ``fc``) with a 3 x 3 stride-1 stem and no max-pool:
    strides 1, 2, 4, 8 after ``layer1`` .. ``layer4``. Its weights load into the segmentation
    backbone like a torchvision ImageNet file (:func:`load_backbone_weights`).
    """

    WIDTHS = (16, 32, 64, 128)

    def __init__(self, num_classes: int = 1000, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        previous = widths[0]
        for index, (width, stride) in enumerate(zip(widths, (1, 2, 2, 2)), start=1):
            downsample = None
            if stride != 1 or previous != width:
                downsample = nn.Sequential(nn.Conv2d(previous, width, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(width))
            setattr(self, f"layer{index}", nn.Sequential(BasicBlock(previous, width, stride, downsample)))
            previous = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, num_classes)
        for module in self.modules():  # torchvision's ResNet initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _embedded_resnet(output_stride: int) -> Backbone:
    net = EmbeddedResNet()
    if output_stride == 4:
        dilate_resnet_stage(net.layer4, 1, 2)
    stages = ["layer1", "layer2", "layer3", "layer4"]
    body = IntermediateLayerGetter(net, return_layers={s: s for s in stages})
    return Backbone("embedded_resnet", output_stride, body, stages, list(EmbeddedResNet.WIDTHS), key_prefix="",
                    aspp_rates=(2, 4, 6), aspp_channels=128)


def _mobilenet_v3_large(output_stride: int) -> Backbone:
    settings, last_channel = _mobilenet_v3_conf("mobilenet_v3_large")
    stride, rate = 2, 1  # the stem conv has stride 2
    for cnf in settings:
        if cnf.stride > 1:
            if stride >= output_stride:
                rate *= cnf.stride  # InvertedResidual runs at stride 1 when dilation > 1
            else:
                stride *= cnf.stride
        cnf.dilation = rate
    features = MobileNetV3(settings, last_channel).features
    strided = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)]
    stage_ids = [i - 1 for i in strided[1:]] + [len(features) - 1]
    body = IntermediateLayerGetter(features, return_layers={str(i): str(i) for i in stage_ids})
    channels = [features[i].out_channels for i in stage_ids]
    return Backbone("mobilenet_v3_large", output_stride, body, [str(i) for i in stage_ids],
                    channels, key_prefix="features.")


@dataclass(frozen=True)
class BackboneBuilder:
    """What :data:`BACKBONES` holds for a backbone: ``build(output_stride)`` at one of its
    ``output_strides``; ``first_block_dilation``: whether ``build`` takes the ResNets' layout
    argument (the built-in ResNets; every other backbone ignores the setting)."""

    build: Callable[..., Backbone]
    output_strides: tuple[int, ...]
    first_block_dilation: bool = False


def register_backbone(name: str, output_strides: tuple[int, ...]) -> Callable:
    """Decorator: make ``builder(output_stride) -> Backbone`` available as ``model.backbone=name``
    at the given output strides (your own backbones, or a tiny one in tests)."""

    def wrap(builder: Callable[[int], Backbone]) -> Callable[[int], Backbone]:
        BACKBONES.register(name, BackboneBuilder(builder, tuple(output_strides)), by=builder.__module__)
        return builder

    return wrap


for _name in ("resnet18", "resnet50", "resnet101"):
    BACKBONES.register(_name, BackboneBuilder(functools.partial(_resnet, _name), (8, 16), first_block_dilation=True))
BACKBONES.register("mobilenet_v3_large", BackboneBuilder(_mobilenet_v3_large, (8, 16)))
BACKBONES.register("embedded_resnet", BackboneBuilder(_embedded_resnet, (4, 8)))


def backbone_output_strides(name: str) -> tuple[int, ...]:
    """The output strides backbone ``name`` can be built at (a one-line error for an unknown name)."""
    return BACKBONES.get(name).output_strides


def build_backbone(name: str, output_stride: int = 16, first_block_dilation: str = "release") -> Backbone:
    """Build the named backbone (random init) at one of its output strides
    (:func:`backbone_output_strides`: 16 or 8; 8 or 4 for ``embedded_resnet``).

    ``first_block_dilation`` (:data:`FIRST_BLOCK_DILATIONS`) sets the dilation of the first block
    of the dilated stages of ``resnet18/50/101``: ``"release"`` (the stage's, as MiB, PLOP and UCD)
    or ``"previous"`` (torchvision's); see the module docstring. Other backbones ignore it.
    """
    if first_block_dilation not in FIRST_BLOCK_DILATIONS:
        raise ValueError(f"first_block_dilation must be one of {', '.join(FIRST_BLOCK_DILATIONS)}, "
                         f"got {first_block_dilation!r}")
    builder: BackboneBuilder = BACKBONES.get(name)
    if output_stride not in builder.output_strides:
        raise ValueError(f"backbone {name} takes output_stride "
                         f"{' or '.join(map(str, builder.output_strides))}, got {output_stride!r}")
    if builder.first_block_dilation:
        return builder.build(output_stride, first_block_dilation)
    return builder.build(output_stride)


# --------------------------------------------------------------------------------------------
# Checkpoint reading and ImageNet weights
# --------------------------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Tensor]:
    """Read a state dict from a ``torch.save`` file (``weights_only=True``).

    Accepts a plain state dict or a dict holding one under ``"state_dict"`` or ``"model"``;
    a DDP ``"module."`` prefix on every key is removed. Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` for a file that is not such a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors all mean "not a checkpoint"
        raise ValueError(f"{what} {path} is not a readable PyTorch checkpoint "
                         f"(torch.load(weights_only=True) failed: {_load_error_reason(exc)})") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise ValueError(f"{what} {path} holds no state dict (expected a dict of tensors, or one "
                         f"under a 'state_dict' or 'model' key; got {type(obj).__name__})")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_error_reason(exc: Exception) -> str:
    """A short, one-line reason for a failed ``torch.load``."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    if "Weights only load failed" in text:
        return "it pickles Python objects besides tensors and plain containers"
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def _describe_mismatch(expected: Mapping[str, Tensor], given: Mapping[str, Tensor],
                       optional_suffix: str = "num_batches_tracked") -> str:
    """One-line description of how ``given`` differs from ``expected`` ('' if it matches)."""
    missing = [k for k in expected if k not in given and not k.endswith(optional_suffix)]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
              for k in expected if k in given and given[k].shape != expected[k].shape]

    def show(items: list[str]) -> str:
        more = f", ... ({len(items) - 3} more)" if len(items) > 3 else ""
        return ", ".join(items[:3]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({show(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({show(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches, file vs model ({show(shapes)})")
    return "; ".join(parts)


_ENUM_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


def load_backbone_weights(backbone: Backbone, source: str | os.PathLike | Mapping[str, Tensor]) -> None:
    """Load ImageNet classification weights into ``backbone`` (in place).

    ``source`` is one of:

    * a path to a checkpoint of torchvision's classification model for the same architecture
      (e.g. ``resnet101-63fe2227.pth``), possibly wrapped under ``"state_dict"``/``"model"``;
    * a torchvision weight enum member name such as ``"IMAGENET1K_V1"`` or ``"DEFAULT"``
      (torchvision downloads it unless it is in the torch hub cache: needs internet);
    * a state dict already in memory.

    The classification head (``fc.*`` / ``classifier.*``) is dropped. Every other key must match
    the backbone exactly (``num_batches_tracked`` may be absent); otherwise ``ValueError`` names
    the source and the first mismatching keys.
    """
    if isinstance(source, Mapping):
        state, label = dict(source), "in-memory state dict"
    else:
        text = os.fspath(source)
        if not Path(text).exists() and _ENUM_NAME.match(text):
            state, label = _torchvision_weights(backbone.name, text), f"torchvision {backbone.name} {text}"
        else:
            state, label = read_state_dict(text, what="pretrained backbone"), str(text)
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    prefix = backbone.key_prefix
    if prefix:
        state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
    expected = backbone.body.state_dict()
    problem = _describe_mismatch(expected, state)
    if problem:
        raise ValueError(f"pretrained weights {label} do not fit backbone {backbone.name}: {problem}")
    for key, value in expected.items():  # old torchvision files lack num_batches_tracked
        state.setdefault(key, value)
    backbone.body.load_state_dict(state, strict=True)


def _torchvision_weights(arch: str, member: str) -> dict[str, Tensor]:
    """State dict of torchvision's ``arch`` weights enum member ``member`` (may download)."""
    enum: Any = tvm.get_model_weights(arch)
    names = list(enum.__members__)
    if member not in names:
        raise ValueError(f"unknown torchvision weights {member!r} for {arch}; "
                         f"expected a checkpoint path or one of {', '.join(names)}")
    return enum[member].get_state_dict(progress=True, check_hash=True)
