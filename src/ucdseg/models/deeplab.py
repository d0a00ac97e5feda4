"""DeepLab-v3 with one classifier per incremental step (docs/protocol.md §2).

Structure (MiB's ``modules/deeplab.py`` ``DeeplabV3`` head, with plain ``BatchNorm2d`` + ReLU in
place of In-Place ABN + leaky ReLU):

    backbone stages -> last stage x
    ASPP:  cat[1x1 conv, 3x3 conv rate r1, r2, r3](x) -> BN -> ReLU -> 1x1 conv (reduce to 256)
    image pooling: mean over HxW -> 1x1 conv -> BN -> ReLU -> 1x1 conv (256), broadcast-added
    sum -> BN -> ReLU = pre-logits ``features`` (B, 256, h, w)
    classifier: one 1x1 conv (with bias) per step, outputs concatenated in class order.

A method may ask for other classifiers (:data:`HEADS`, its ``ModelSpec``): SSUL's per-step
conv3x3-BN-ReLU-conv1x1 heads with an *unknown* channel before background, DKD's foreground-only
1x1 classifiers with an auxiliary channel (fed the detached features) where background would be.

Rates and branch width come from the backbone (``Backbone.aspp_rates``, ``aspp_channels``): 6/12/18 at
output stride 16 and 12/24/36 at output stride 8 (DeepLab-v3's values, 256 wide) for torchvision's
backbones; 2/4/6, 128 wide, for ``embedded_resnet``'s 16 x 16 maps of 64 px scenes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Backbone, build_backbone, load_backbone_weights
from .spec import HEADS, ModelSpec

__all__ = [
    "HEADS",
    "INIT_MODES",
    "ModelSpec",
    "SegOutput",
    "DeepLabV3Head",
    "IncrementalDeepLab",
    "build_model",
    "batchnorms",
    "load_previous_step",
]

#: Classifier init modes for a new step, see :meth:`IncrementalDeepLab.init_new_classifier`.
INIT_MODES = ("mib", "none", "ssul", "dkd")

class SegOutput(NamedTuple):
    """What :class:`IncrementalDeepLab` returns."""

    logits: Tensor  # (B, C, H, W), bilinearly upsampled to the input size
    low_logits: Tensor  # (B, C, h, w) at feature resolution
    features: Tensor  # (B, 256, h, w) pre-logits features (head output)
    stages: list[Tensor]  # the four backbone stage outputs (after their last activation), shallowest first
    # the four stages' pre-activations (``out + identity`` of each stage's last residual block,
    # before its final ReLU; what PLOP's POD distils), see ucdseg.models.backbones
    pod_stages: list[Tensor]
    # DKD's decomposed logits at feature resolution, foreground classifiers only and without bias:
    # ``features . max(W, 0)`` and ``features . min(W, 0)`` (``heads="dkd"``; None otherwise)
    pos_logits: Tensor | None = None
    neg_logits: Tensor | None = None


class DeepLabV3Head(nn.Module):
    """ASPP with image pooling, structured as MiB's ``DeeplabV3`` (see the module docstring).

    Note: in training mode the image-pooling BatchNorm sees one value per image and channel,
    so (as in MiB and torchvision) a training batch needs at least 2 images.
    """

    def __init__(self, in_channels: int, out_channels: int = 256, hidden_channels: int = 256,
                 rates: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__()
        self.map_convs = nn.ModuleList(
            [nn.Conv2d(in_channels, hidden_channels, 1, bias=False)]
            + [nn.Conv2d(in_channels, hidden_channels, 3, padding=r, dilation=r, bias=False) for r in rates])
        self.map_bn = nn.BatchNorm2d(hidden_channels * len(self.map_convs))
        self.red_conv = nn.Conv2d(hidden_channels * len(self.map_convs), out_channels, 1, bias=False)
        self.pool_conv = nn.Conv2d(in_channels, hidden_channels, 1, bias=False)
        self.pool_bn = nn.BatchNorm2d(hidden_channels)
        self.pool_red_conv = nn.Conv2d(hidden_channels, out_channels, 1, bias=False)
        self.red_bn = nn.BatchNorm2d(out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal convs (ReLU gain), BN weight 1 / bias 0, as MiB initialises its head."""
        gain = nn.init.calculate_gain("relu")
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight, gain)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.cat([conv(x) for conv in self.map_convs], dim=1)
        out = self.red_conv(F.relu(self.map_bn(out)))
        pool = x.mean(dim=(2, 3), keepdim=True)
        pool = self.pool_red_conv(F.relu(self.pool_bn(self.pool_conv(pool))))
        return F.relu(self.red_bn(out + pool))


def _ssul_head(channels: int, classes: int) -> nn.Sequential:
    """SSUL's classifier of one group of classes: conv3x3 (no bias) + BN + ReLU + conv1x1, its convs
    kaiming-normal and its BN 1 / 0 (network/_deeplab.py:84-111)."""
    head = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                         nn.ReLU(inplace=True), nn.Conv2d(channels, classes, 1))
    for module in head:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)
    return head


def _classifier_groups(heads: str, steps: list[int]) -> list[int]:
    """Output channels of each classifier module: one per step (``linear``); SSUL's unknown,
    background and step-0 foreground groups, then one per step; DKD's auxiliary channel and step-0
    foreground, then one per step."""
    if heads == "linear":
        return steps
    if steps[0] < 2:
        raise ValueError(f"the {heads} classifiers need background and at least one class at step 0, "
                         f"got classes_per_step={steps}")
    return ([1, 1] if heads == "ssul" else [1]) + [steps[0] - 1] + steps[1:]


class IncrementalDeepLab(nn.Module):
    """DeepLab-v3 whose classifier is an ``nn.ModuleList`` of one module per step.

    State-dict layout: ``backbone.body.*`` (torchvision names), ``head.*``,
    ``classifier.<i>.*`` (the last module is the last step's). With the default ``heads="linear"``
    module ``i`` is step ``i``'s 1x1 conv and channel ``k`` of the logits is model-space class
    ``k``; :data:`HEADS` gives the other layouts.
    """

    def __init__(self, backbone: Backbone, classes_per_step: Sequence[int], head_channels: int = 256,
                 heads: str = "linear") -> None:
        super().__init__()
        steps = list(classes_per_step)
        if not steps or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in steps):
            raise ValueError(f"classes_per_step must be a non-empty list of positive ints, got {classes_per_step!r}")
        ModelSpec(heads)  # checks the name
        self.backbone = backbone
        self.head = DeepLabV3Head(backbone.out_channels, head_channels, backbone.aspp_channels,
                                  rates=backbone.aspp_rates)
        groups = _classifier_groups(heads, steps)
        if heads == "ssul":
            self.classifier = nn.ModuleList([_ssul_head(head_channels, n) for n in groups])
        else:
            self.classifier = nn.ModuleList([nn.Conv2d(head_channels, n, 1, bias=True) for n in groups])
        if heads == "dkd":  # DKD's random init: kaiming-normal weights (models/model.py:_init_classifier)
            for conv in self.classifier:
                nn.init.kaiming_normal_(conv.weight)
        self.heads = heads
        self._classes_per_step = steps

    @property
    def classes_per_step(self) -> list[int]:
        """Number of classes added at each step (step 0 includes background)."""
        return list(self._classes_per_step)

    @property
    def num_classes(self) -> int:
        """Total number of output channels (all steps)."""
        return sum(self._classes_per_step)

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    def trunk(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """The backbone's stages (outputs and pre-activations) and the head's features of ``x``."""
        stages, pod_stages = self.backbone.forward_with_preactivation(x)
        return stages, pod_stages, self.head(stages[-1])

    def forward(self, x: Tensor, trunk: tuple[list[Tensor], list[Tensor], Tensor] | None = None) -> SegOutput:
        """``trunk``: :meth:`trunk` of ``x`` computed already (by an equal frozen model), reused."""
        stages, pod_stages, features = self.trunk(x) if trunk is None else trunk
        if self.heads == "dkd":  # the auxiliary classifier sees the features, not their gradient
            parts = [self.classifier[0](features.detach())] + [conv(features) for conv in self.classifier[1:]]
        else:
            parts = [module(features) for module in self.classifier]
        low_logits = torch.cat(parts, dim=1)
        logits = F.interpolate(low_logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        pos = neg = None
        if self.heads == "dkd":  # DKD models/model.py:77-99: over the foreground classifiers, no bias
            weight = torch.cat([conv.weight for conv in self.classifier[1:]]).flatten(1)
            pos = torch.einsum("bdhw,cd->bchw", features, weight.clamp(min=0))
            neg = torch.einsum("bdhw,cd->bchw", features, weight.clamp(max=0))
        return SegOutput(logits, low_logits, features, stages, pod_stages, pos, neg)

    @torch.no_grad()
    def init_new_classifier(self, mode: str = "mib") -> None:
        """Initialise the last step's classifier (call after loading the previous step).

        Modes:

        * ``"mib"`` (MiB, docs/protocol.md §2): every new class's weight is a copy of the background weight
          (row 0 of step 0's classifier); the new biases and the background bias all become
          ``b_bg - log(n_new + 1)``. The background probability of the previous model is then
          split evenly between background and the new classes, and every other class keeps its
          probability.
          PLOP's ``--init_balanced`` is the same computation (PLOP's methods use ``"mib"``; its
          multimodal-background inits need several background channels, which this model has not).
        * ``"ssul"`` (``heads="ssul"``, SSUL's ``--w_transfer``, main.py:304-325): the new head is a
          copy of the unknown head: its conv3x3, its BN (affine and running statistics) and, for
          every new class, its 1x1 weight and bias.
        * ``"dkd"`` (``heads="dkd"``, DKD models/model.py:110-115): every new class's 1x1 weight and
          bias are the auxiliary classifier's.
        * ``"none"``: keep the random initialisation of the new convolution.
        """
        if mode not in INIT_MODES:
            raise ValueError(f"unknown classifier init mode {mode!r}; expected one of {', '.join(INIT_MODES)}")
        if mode == "none":
            return
        if len(self._classes_per_step) < 2:
            raise ValueError(f"init_new_classifier(mode={mode!r}) needs a model with at least 2 steps, "
                             f"got classes_per_step={self._classes_per_step}")
        expected = {"mib": "linear"}.get(mode, mode)
        if self.heads != expected:
            raise ValueError(f"init_new_classifier(mode={mode!r}) needs the {expected} classifiers; this model "
                             f"has {self.heads}")
        if mode == "ssul":
            unknown, new = self.classifier[0], self.classifier[-1]
            new[0].weight.copy_(unknown[0].weight)
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(new[1], name).copy_(getattr(unknown[1], name))
            new[3].weight.copy_(unknown[3].weight.expand_as(new[3].weight))
            new[3].bias.copy_(unknown[3].bias.expand_as(new[3].bias))
            return
        if mode == "dkd":
            aux, new = self.classifier[0], self.classifier[-1]
            new.weight.copy_(aux.weight.expand_as(new.weight))
            new.bias.copy_(aux.bias.expand_as(new.bias))
            return
        background, new = self.classifier[0], self.classifier[-1]
        n_new = new.out_channels
        bias = background.bias[0] - math.log(n_new + 1)
        new.weight.copy_(background.weight[0:1].expand_as(new.weight))
        new.bias.copy_(bias.expand_as(new.bias))  # on the device, no host read
        background.bias[0] = bias


def build_model(backbone: str, classes_per_step: Sequence[int], output_stride: int = 16,
                pretrained: str | os.PathLike | None = None, head_channels: int | None = None,
                spec: ModelSpec = ModelSpec(), first_block_dilation: str = "release") -> IncrementalDeepLab:
    """Build an :class:`IncrementalDeepLab`.

    Args:
        backbone: ``resnet18``, ``resnet50``, ``resnet101`` or ``mobilenet_v3_large``.
        classes_per_step: classes added at each step so far, e.g. ``[16, 1]``.
        output_stride: 16 or 8 (8 or 4 for ``embedded_resnet``).
        pretrained: ``None`` (random init), a path to a torchvision-format ImageNet checkpoint of
            that backbone, or a torchvision weight name such as ``"IMAGENET1K_V1"`` (downloads;
            needs internet). See :func:`ucdseg.models.backbones.load_backbone_weights`.
        head_channels: width of the ASPP head and of the pre-logits features (default: the
            backbone's ``head_channels``, 256 for every built-in backbone).
        spec: the method's classifier layout and backbone BN momentum (:class:`ModelSpec`).
        first_block_dilation: ``"release"`` (default: every block of a dilated ResNet stage at
            the stage's dilation, as MiB, PLOP and UCD) or ``"previous"`` (torchvision's: the
            first block keeps the previous dilation); only ``resnet18/50/101`` use it. See
            :func:`ucdseg.models.backbones.build_backbone`.
    """
    net = build_backbone(backbone, output_stride, first_block_dilation=first_block_dilation)
    if pretrained is not None and pretrained != "":
        load_backbone_weights(net, pretrained)
    if spec.backbone_bn_momentum is not None:
        for module in batchnorms(net):
            module.momentum = spec.backbone_bn_momentum
    return IncrementalDeepLab(net, classes_per_step, head_channels=head_channels or net.head_channels,
                              heads=spec.heads)


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``module`` (any dimension, SyncBatchNorm included)."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def load_previous_step(model: IncrementalDeepLab, state_dict: Mapping[str, Tensor]) -> IncrementalDeepLab:
    """Load the state dict of the step ``t-1`` model into ``model`` (step ``t``), in place.

    Every parameter and buffer is loaded except the new (last) classifier, which is left for
    :meth:`IncrementalDeepLab.init_new_classifier`. A DDP ``"module."`` prefix is removed.
    Raises ``ValueError`` (one line) when the state dict is not that of a model with one step
    fewer and the same architecture.
    """
    if len(model.classes_per_step) < 2:
        raise ValueError("load_previous_step needs a model with at least 2 steps, "
                         f"got classes_per_step={model.classes_per_step}")
    state = dict(state_dict)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    new_prefix = f"classifier.{len(model.classifier) - 1}."
    own = model.state_dict()
    expected = {k: v for k, v in own.items() if not k.startswith(new_prefix)}
    problems = []
    steps_given = sorted({int(k.split(".")[1]) for k in state if k.startswith("classifier.")})
    if steps_given and len(steps_given) != len(model.classifier) - 1:
        problems.append(f"it has {len(steps_given)} classifier steps, expected {len(model.classifier) - 1}")
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches, given vs model", shapes)):
        if items:
            more = f", ... ({len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{len(items)} {label} ({', '.join(items[:3])}{more})")
    if problems:
        raise ValueError(f"previous-step state dict does not fit a {model.backbone.name} model with "
                         f"classes_per_step={model.classes_per_step} minus its last step: {'; '.join(problems)}")
    for key, value in own.items():  # the new classifier (and any absent num_batches_tracked)
        state.setdefault(key, value)
    model.load_state_dict(state, strict=True)
    return model
