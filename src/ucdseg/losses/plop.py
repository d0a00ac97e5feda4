"""PLOP's loss terms (Douillard et al., "PLOP: Learning without Forgetting for Continual Semantic
Segmentation", CVPR 2021) as plain functions of tensors.

Three pieces, used together by the ``plop`` method at every step ``t >= 1``:

* :func:`local_pod` -- Local POD feature distillation over a list of feature maps
  (:func:`pod_levels` builds that list from a model output).
* :class:`EntropyThresholds` -- the per-class entropy thresholds, from one pass of the old model
  over the step's training set (PLOP's ``Trainer.find_median``).
* :func:`entropy_pseudo_labels` -- pseudo-labels for background pixels plus the per-image fraction
  of confident background pixels that scales the classification loss
  (:func:`adaptive_cross_entropy`).

Every default names the place in the public PLOP release (``arthurdouillard/CVPR2021_PLOP``:
``argparser.py`` -> ``modify_command_options`` for ``--method PLOP``, and ``train.py``) it comes
from. Where the release and the paper's wording differ, the docstring says which one we follow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .defaults import PLOP_LAST_POD_FACTOR, PLOP_POD_FACTOR
from .device_generic import full_precision

__all__ = [
    "PLOP_POD_FACTOR",
    "PLOP_LAST_POD_FACTOR",
    "PLOP_POD_SCALES",
    "PLOP_ENTROPY_BINS",
    "PLOP_MIN_THRESHOLD",
    "pod_levels",
    "pod_embedding",
    "pod_schedule",
    "collapse_new_channels",
    "local_pod",
    "normalized_entropy",
    "EntropyThresholds",
    "PseudoLabelStats",
    "entropy_pseudo_labels",
    "adaptive_cross_entropy",
]

#: ``--spp_scales 1 2 4`` (argparser default): 1x1, 2x2 and 4x4 grids of regions.
PLOP_POD_SCALES = (1, 2, 4)
#: ``nb_bins = 100`` in ``find_median(mode="entropy")`` (``--pseudo_nb_bins`` unset).
PLOP_ENTROPY_BINS = 100
#: ``--threshold 0.001`` (PLOP method preset): the floor of every class threshold.
PLOP_MIN_THRESHOLD = 0.001


# --------------------------------------------------------------------------------------------
# Local POD
# --------------------------------------------------------------------------------------------


def pod_levels(output: Any, logits: bool = True) -> list[Tensor]:
    """The feature maps PLOP distils, from a model output (``SegOutput``-like).

    PLOP's list (``train.py``, ``features_distillation`` call) is ``features["attentions"]`` --
    the four ResNet stages taken before the stage's last activation (the release's
    ``ResidualBlock(last=True)`` returns ``out + identity``) and the head's 256-channel
    pre-logits output (after the head's last BN + activation, ``red_bn`` being an ABN) --
    followed, with ``--pod_logits`` (on in the PLOP preset), by the logits at feature resolution
    (``sem_logits_small``). Here: ``[*output.pod_stages, output.features]`` plus
    ``output.low_logits`` when ``logits`` is true, i.e. 6 levels for a ResNet.
    """
    levels = [*output.pod_stages, output.features]
    if logits:
        levels.append(output.low_logits)
    return levels


def pod_embedding(x: Tensor, scales: Sequence[int] = PLOP_POD_SCALES) -> Tensor:
    """Width- and height-pooled statistics of ``x`` (B, C, H, W) on grids of regions.

    For each scale ``s`` the map is cut into ``s x s`` regions (``s`` row bands times ``s``
    column bands, row-major). For each region, in this order: the width-pooled vector (mean over
    the region's columns, one value per channel and row) and the height-pooled vector (mean over
    its rows, one value per channel and column), each flattened channel-major. Everything is
    concatenated into one (B, D) embedding, as PLOP's ``_local_pod``.

    PLOP cuts both axes into bands of ``W // s`` pixels; we cut each axis into ``s`` nearly equal
    bands (sizes differing by at most one, larger bands first). Both agree on square maps whose
    side is divisible by ``s`` (every level of a 512 crop); ours also covers non-square maps and
    remainders (PLOP drops remainder pixels and yields NaN on maps wider than tall).
    """
    if x.dim() != 4:
        raise ValueError(f"pod_embedding expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    height, width = x.shape[-2:]
    parts = []
    for scale in scales:
        if not isinstance(scale, int) or scale < 1:
            raise ValueError(f"POD scales must be positive integers, got {scale!r}")
        if scale > height or scale > width:
            raise ValueError(
                f"POD scale {scale} needs a map of at least {scale}x{scale}, got {height}x{width}"
            )
        row_bands, col_bands = _bands(height, scale), _bands(width, scale)
        # Pool inside every band at once with an averaging matrix (a matmul: cheap to
        # differentiate, unlike many slices of the full map), then cut the small results.
        width_pooled = x @ _band_average(col_bands, width, x)  # (B, C, H, s): per row, col band
        height_pooled = x.transpose(2, 3) @ _band_average(row_bands, height, x)  # (B, C, W, s)
        for i, rows in enumerate(row_bands):
            for j, cols in enumerate(col_bands):
                parts.append(width_pooled[:, :, rows, j].flatten(1))  # (B, C * rows)
                parts.append(height_pooled[:, :, cols, i].flatten(1))  # (B, C * cols)
    return torch.cat(parts, dim=1)


def _bands(size: int, scale: int) -> list[slice]:
    """``scale`` contiguous, nearly equal bands covering ``range(size)`` (as ``tensor_split``)."""
    base, extra = divmod(size, scale)
    bounds = [k * base + min(k, extra) for k in range(scale + 1)]
    return [slice(bounds[k], bounds[k + 1]) for k in range(scale)]


def _band_average(bands: list[slice], size: int, like: Tensor) -> Tensor:
    """(size, len(bands)) matrix whose column j averages the entries of band j."""
    matrix = torch.zeros(size, len(bands), dtype=like.dtype, device=like.device)
    for j, band in enumerate(bands):
        matrix[band, j] = 1.0 / (band.stop - band.start)
    return matrix


def pod_schedule(num_old_classes: int, num_new_classes: int) -> float:
    """PLOP's adaptive POD factor ``sqrt(n_seen / n_new)``.

    ``train.py``: ``math.sqrt(nb_current_classes / nb_new_classes)`` where ``nb_current_classes``
    counts every class seen so far, background and the new ones included.
    """
    if num_new_classes < 1 or num_old_classes < 1:
        raise ValueError(
            f"pod_schedule needs num_old_classes >= 1 and num_new_classes >= 1, "
            f"got {num_old_classes} and {num_new_classes}"
        )
    return math.sqrt((num_old_classes + num_new_classes) / num_new_classes)


def collapse_new_channels(
    logits: Tensor, num_old_classes: int, mode: Literal["sum", "trim"] = "sum"
) -> Tensor:
    """Bring new-model logits (B, C_old + C_new, h, w) to the old model's C_old channels.

    ``"sum"`` (PLOP preset, ``pod_options["switch"]["after"]["extra_channels"]``): channel 0
    becomes background + every new-class logit, channels ``1..C_old-1`` are kept. ``"trim"``:
    keep the first ``C_old`` channels. Requires model-space channel order (old classes first).
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, C, h, w), got shape {tuple(logits.shape)}")
    if not 1 <= num_old_classes <= logits.shape[1]:
        raise ValueError(
            f"num_old_classes={num_old_classes} does not fit logits with {logits.shape[1]} channels"
        )
    if mode == "trim":
        return logits[:, :num_old_classes]
    if mode == "sum":
        background = logits[:, :1] + logits[:, num_old_classes:].sum(dim=1, keepdim=True)
        return torch.cat([background, logits[:, 1:num_old_classes]], dim=1)
    raise ValueError(f"extra_channels must be 'sum' or 'trim', got {mode!r}")


def local_pod(
    features: Sequence[Tensor],
    old_features: Sequence[Tensor],
    num_old_classes: int,
    num_new_classes: int,
    *,
    scales: Sequence[int] = PLOP_POD_SCALES,
    factor: float = PLOP_POD_FACTOR,
    last_factor: float = PLOP_LAST_POD_FACTOR,
    extra_channels: Literal["sum", "trim"] = "sum",
    schedule: bool = True,
) -> Tensor:
    """PLOP's Local POD distillation loss (a scalar, computed in float32).

    Call it as ``local_pod(pod_levels(out), pod_levels(old), num_old, num_new)``.

    For each level ``l`` (new map ``x``, old map ``y``, same shape):

    * both maps are squared element-wise (``--pod_prepro pow``, the default);
    * ``d_l = || E(x^2) - E(y^2) ||_2`` per image, with ``E`` = :func:`pod_embedding` at
      ``scales`` (``torch.frobenius_norm(a - b, dim=-1)`` on the concatenated embeddings; no
      L2 normalisation: the release forces ``normalize = False``), then the batch mean;
    * multiplied by ``factor`` (0.01), or ``last_factor`` (0.0005) for the last level,
      and by :func:`pod_schedule` ``sqrt((C_old + C_new) / C_new)`` when ``schedule``
      (``--no_pod_schedule`` unset, applied to every level).

    The result is the **mean** over levels (``loss / len(list_attentions_a)`` in the release).
    Only the last level may have more channels in ``features`` than in ``old_features`` (the new
    model's logits): it is brought to ``C_old`` channels with :func:`collapse_new_channels`
    (``extra_channels``, "sum" in PLOP). ``num_old_classes`` counts background. Old maps are
    detached; gradients flow into ``features`` only.
    """
    if len(features) != len(old_features) or not features:
        raise ValueError(
            f"local_pod needs two equally long, non-empty lists of feature maps, "
            f"got {len(features)} new and {len(old_features)} old"
        )
    weight = pod_schedule(num_old_classes, num_new_classes) if schedule else 1.0
    last = len(features) - 1
    total = features[0].new_zeros((), dtype=torch.float32)
    for i, (new, old) in enumerate(zip(features, old_features)):
        if new.dim() != 4 or old.dim() != 4:
            raise ValueError(
                f"POD level {i}: expected (B, C, H, W) maps, got {tuple(new.shape)} "
                f"and {tuple(old.shape)}"
            )
        if new.shape[1] != old.shape[1]:
            if i != last:
                raise ValueError(
                    f"POD level {i}: new and old maps have {new.shape[1]} and {old.shape[1]} "
                    "channels; only the last level (the logits) may differ"
                )
            if old.shape[1] != num_old_classes or new.shape[1] < num_old_classes:
                raise ValueError(
                    f"POD last level: old logits have {old.shape[1]} channels and new ones "
                    f"{new.shape[1]}, expected {num_old_classes} old and more new"
                )
            new = collapse_new_channels(new, num_old_classes, extra_channels)
        if new.shape != old.shape:
            raise ValueError(
                f"POD level {i}: new map {tuple(new.shape)} and old map {tuple(old.shape)} "
                "must have the same shape"
            )
        # float32 even under autocast: squared activations overflow float16.
        with full_precision(new):
            diff = new.float().pow(2) - old.detach().float().pow(2)
            # E is linear, so E(x^2) - E(y^2) = E(x^2 - y^2).
            distance = torch.linalg.vector_norm(pod_embedding(diff, scales), dim=1).mean()
        total = total + (last_factor if i == last else factor) * weight * distance
    return total / len(features)


# --------------------------------------------------------------------------------------------
# Entropy pseudo-labelling
# --------------------------------------------------------------------------------------------


def normalized_entropy(logits: Tensor) -> Tensor:
    """Per-pixel entropy of softmax(logits) over ln C: (B, C, H, W) -> (B, H, W), in [0, 1]."""
    if logits.dim() != 4 or logits.shape[1] < 2:
        raise ValueError(
            f"normalized_entropy expects (B, C, H, W) logits with C >= 2, got {tuple(logits.shape)}"
        )
    p = torch.softmax(logits.float(), dim=1)
    return -torch.special.xlogy(p, p).sum(dim=1) / math.log(logits.shape[1])


class EntropyThresholds:
    """Per-old-class entropy thresholds from one pass of the old model (PLOP's ``find_median``).

    Usage at the start of step ``t``::

        acc = EntropyThresholds(num_old, num_old + num_new)
        for images, labels in train_loader:          # the step's training loader
            acc.update(old_model(images).logits, labels)  # full-resolution old logits
        acc.all_reduce()                              # sum histograms over processes (if any)
        thresholds = acc.thresholds()                 # (C_old,), normalised-entropy units

    Only pixels **labelled 0** enter the histograms (``mask_bg = labels == 0`` in the release; in
    step-t labels old classes are 0 too), each in the row of its old argmax class, binned by its
    entropy. The per-class median is read from the histogram by linear interpolation inside the
    bin where the cumulative count reaches half the total (the release's formula). The threshold
    is ``max(median, min_threshold)``: PLOP's ``--threshold 0.001`` is a **floor** for entropy
    pseudo-labels (``thresholds[c] = max(thresholds[c], base_threshold)``), not a cap. A class
    the old model never predicts on such a pixel gets ``min_threshold`` (the release leaves 0,
    then applies the same floor).

    Units. :meth:`thresholds` always returns values comparable with :func:`normalized_entropy`
    ``u = H / ln C_old``. ``convention`` says in which units the histogram and the floor live:

    * ``"release"`` (default, reproduces the published numbers): the release's ``entropy()``
      *averages* ``p log p`` over the ``C_old`` classes and ``find_median`` divides again by
      ``ln C_seen``, so its value is ``v = u / (C_old * ln C_seen)``, binned in 100 bins on
      [0, 1] and floored at 0.001 in those units. We bin ``v`` exactly so. Consequences: on
      VOC 15-1 (step 1) the first bin already covers ``u`` up to ~0.45; a median read inside
      the first bin is at least half a bin (0.005 in ``v``), so the floor only acts on
      never-predicted classes; on ADE20K the whole range falls in the first bin and every
      threshold exceeds 1 (every background pixel is kept). ``num_seen_classes`` is required.
    * ``"normalized"`` (the paper's wording): bin ``u`` itself on [0, 1]; the floor is in ``u``.

    Not reproduced: the release's median loop adds the bin *index* instead of the bin *count*
    to its running sum, which only matters when fewer than half of a class's pixels fall in the
    first bin (it can then return a wrong or infinite threshold); we use the correct cumulative
    count. The release also never sums histograms across GPUs (each process got its own
    thresholds); :meth:`all_reduce` does.

    ``device``: where the histogram is kept, the old logits' device (by default it moves there at the
    first :meth:`update`; give it when a process may see no batch before :meth:`all_reduce`, which
    NCCL needs on the GPU).
    """

    def __init__(
        self,
        num_old_classes: int,
        num_seen_classes: int | None = None,
        *,
        bins: int = PLOP_ENTROPY_BINS,
        min_threshold: float = PLOP_MIN_THRESHOLD,
        convention: Literal["release", "normalized"] = "release",
        device: torch.device | str | None = None,
    ) -> None:
        if num_old_classes < 2:
            raise ValueError(
                "EntropyThresholds needs num_old_classes >= 2 (background + 1), "
                f"got {num_old_classes}"
            )
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if convention == "release":
            if num_seen_classes is None or num_seen_classes <= num_old_classes:
                raise ValueError(
                    f"convention='release' needs num_seen_classes > num_old_classes="
                    f"{num_old_classes}, got {num_seen_classes}"
                )
            self.scale = num_old_classes * math.log(num_seen_classes)
        elif convention == "normalized":
            self.scale = 1.0
        else:
            raise ValueError(f"convention must be 'release' or 'normalized', got {convention!r}")
        self.num_old_classes = num_old_classes
        self.bins = bins
        self.min_threshold = float(min_threshold)
        self.convention = convention
        # on the logits' device (``device``; else moved there by the first update): under NCCL the
        # all-reduce needs it on the GPU even on a process that saw no batch
        self.histogram = torch.zeros(num_old_classes, bins, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, old_logits: Tensor, labels: Tensor) -> None:
        """Add a batch: old-model logits (B, C_old, H, W) and step-t training labels (B, H, W)."""
        if old_logits.dim() != 4 or old_logits.shape[1] != self.num_old_classes:
            raise ValueError(
                f"old_logits must be (B, {self.num_old_classes}, H, W), "
                f"got {tuple(old_logits.shape)}"
            )
        if labels.shape != old_logits.shape[:1] + old_logits.shape[2:]:
            raise ValueError(
                f"labels {tuple(labels.shape)} must be (B, H, W) matching old_logits "
                f"{tuple(old_logits.shape)}; pass full-resolution logits, as PLOP does"
            )
        # every pixel gets its (class, bin) cell and adds 1 if it is labelled 0: no selection of the
        # masked pixels, so no host synchronisation and no shape that depends on the values
        values = normalized_entropy(old_logits) / self.scale
        bin_index = (values * self.bins).long().clamp(0, self.bins - 1)
        cells = old_logits.argmax(dim=1) * self.bins + bin_index
        self.histogram = self.histogram.to(old_logits.device)
        self.histogram.view(-1).scatter_add_(0, cells.flatten(), (labels == 0).flatten().long())

    def all_reduce(self) -> None:
        """Sum the histograms over processes when ``torch.distributed`` is initialised."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.histogram)

    def medians(self) -> Tensor:
        """Histogram medians (C_old,) in normalised-entropy units; NaN for unpredicted classes."""
        hist = self.histogram.double()
        total = hist.sum(dim=1)
        half = total / 2
        cumulative = hist.cumsum(dim=1)
        index = (cumulative < half[:, None]).sum(dim=1).clamp(max=self.bins - 1)
        count = hist.gather(1, index[:, None])[:, 0]
        before = cumulative.gather(1, index[:, None])[:, 0] - count
        median = (index + (half - before) / count) / self.bins
        median = torch.where(total > 0, median, torch.full_like(median, float("nan")))
        return (median * self.scale).float()

    def thresholds(self) -> Tensor:
        """Per-class thresholds (C_old,) in normalised-entropy units (see the class docstring)."""
        median = self.medians()
        floor = self.min_threshold * self.scale
        median = torch.where(torch.isnan(median), torch.full_like(median, floor), median)
        return median.clamp(min=floor)


@dataclass
class PseudoLabelStats:
    """What :func:`entropy_pseudo_labels` measured on a batch.

    ``confident_fraction`` (B,) is PLOP's ``classif_adaptive_factor``, computed **per image**:
    confident background pixels / background pixels. Multiply the per-pixel classification loss
    of image ``b`` by it (:func:`adaptive_cross_entropy`). An image without background pixels
    gets 1; the release computes ``num / (den + 1e-6)``, i.e. 0 there, and so drops that image's
    whole classification loss (docs/methods.md).
    """

    confident_fraction: Tensor  # (B,) float
    num_background: Tensor  # (B,) long: pixels labelled 0
    num_confident: Tensor  # (B,) long: of those, pixels that received a pseudo-label
    confident: Tensor  # (B, H, W) bool: the pixels that received a pseudo-label


@torch.no_grad()
def entropy_pseudo_labels(
    labels: Tensor, old_logits: Tensor, thresholds: Tensor
) -> tuple[Tensor, PseudoLabelStats]:
    """PLOP's entropy pseudo-labels (``--pseudo entropy``).

    On pixels labelled 0, the old model's argmax class ``c`` (background included) is taken when
    the pixel's :func:`normalized_entropy` is strictly below ``thresholds[c]``, else the pixel
    becomes 255. Other pixels (new classes, 255) are unchanged. ``old_logits`` (B, C_old, H, W)
    must be at the labels' resolution (PLOP uses the upsampled logits); ``thresholds`` (C_old,)
    comes from :meth:`EntropyThresholds.thresholds`. Returns a new label tensor (same dtype) and
    :class:`PseudoLabelStats`.
    """
    if old_logits.dim() != 4 or labels.shape != old_logits.shape[:1] + old_logits.shape[2:]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must be (B, H, W) matching old_logits (B, C_old, H, W) "
            f"{tuple(old_logits.shape)}"
        )
    if thresholds.shape != (old_logits.shape[1],):
        raise ValueError(
            f"thresholds must have shape ({old_logits.shape[1]},) (one per old class), "
            f"got {tuple(thresholds.shape)}"
        )
    predicted = old_logits.argmax(dim=1)
    uncertainty = normalized_entropy(old_logits)
    background = labels == 0
    confident = background & (uncertainty < thresholds.to(uncertainty.device)[predicted])
    pseudo = torch.where(confident, predicted.to(labels.dtype), torch.where(background, 255, labels))
    num_background = background.sum(dim=(1, 2))
    num_confident = confident.sum(dim=(1, 2))
    fraction = torch.where(
        num_background > 0,
        num_confident.float() / num_background.clamp(min=1).float(),
        torch.ones_like(num_background, dtype=torch.float32),
    )
    return pseudo, PseudoLabelStats(fraction, num_background, num_confident, confident)


def adaptive_cross_entropy(
    logits: Tensor, labels: Tensor, confident_fraction: Tensor | None = None
) -> Tensor:
    """PLOP's classification loss: cross-entropy on the pseudo-labelled targets, scaled per image.

    ``mean over all B*H*W pixels of confident_fraction[b] * CE(pixel)``, with 255 ignored (its
    CE counts as 0 but the pixel stays in the mean): the release computes
    ``CrossEntropyLoss(ignore_index=255, reduction="none")``, multiplies by the factor, then
    ``.mean()``. ``confident_fraction=None`` means factor 1.
    """
    if logits.dim() != 4 or labels.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must be (B, H, W) matching logits {tuple(logits.shape)}"
        )
    loss = F.cross_entropy(logits.float(), labels.long(), ignore_index=255, reduction="none")
    if confident_fraction is not None:
        if confident_fraction.shape != (logits.shape[0],):
            raise ValueError(
                f"confident_fraction must have shape ({logits.shape[0]},), "
                f"got {tuple(confident_fraction.shape)}"
            )
        loss = loss * confident_fraction.to(loss)[:, None, None]
    return loss.mean()
