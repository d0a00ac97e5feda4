"""Loss functions of ucdseg: plain functions of tensors (docs/protocol.md §3).

* MiB: :func:`unbiased_cross_entropy`, :func:`unbiased_kd`
* LwF / ILT / LwF-MC: :func:`knowledge_distillation`, :func:`feature_distillation`,
  :func:`label_bce` + :func:`old_sigmoid_bce` (MiB's LwF-MC), :func:`multiclass_bce_distillation`
  (MiB's single-target ``IcarlLoss``)
* PLOP: :func:`local_pod`, :func:`entropy_pseudo_labels`, :class:`EntropyThresholds` (plop.py)
* UCD: :func:`contrastive_distillation` (and its flat, gather-friendly core
  :func:`contrastive_distillation_flat` with :func:`prepare_contrastive_inputs`), and
  :func:`gathered_contrastive_distillation`, its global-batch version under DDP (gathered.py);
  :func:`contrastive_input_stats` counts what it sees (for the logs)
* EWC / PI / RW (MiB's parameter regularisers): :class:`EWC`, :class:`PathIntegral`,
  :class:`RiemannianWalk` (``REGULARIZERS`` by name), :func:`normalize_importance` (regularizers.py)
* SDR: :func:`update_prototypes`, :func:`prototype_matching`, :func:`feature_clustering`,
  :func:`feature_separation`, :func:`feature_sparsification`, on labels from
  :func:`downsample_labels` / :func:`old_prediction_down`; weights :data:`SDR_WEIGHTS` (sdr.py)
"""

from .contrastive import (
    ContrastiveInputs,
    contrastive_distillation,
    contrastive_distillation_flat,
    prepare_contrastive_inputs,
    resize_labels_nearest,
)
from .contrastive_stats import contrastive_input_stats
from .gathered import gathered_contrastive_distillation
from .distillation import (
    feature_distillation,
    knowledge_distillation,
    label_bce,
    multiclass_bce_distillation,
    old_sigmoid_bce,
)
from .mib import unbiased_cross_entropy, unbiased_kd
from .plop import EntropyThresholds, entropy_pseudo_labels, local_pod  # noqa: F401
from .regularizers import (
    EWC,
    REGULARIZERS,
    ParameterRegularizer,
    PathIntegral,
    RiemannianWalk,
    normalize_importance,
)
from .sdr import (
    SDR_WEIGHTS,
    check_prototypes,
    downsample_labels,
    feature_clustering,
    feature_separation,
    feature_sparsification,
    old_prediction_down,
    prototype_matching,
    update_prototypes,
)

__all__ = [
    "unbiased_cross_entropy",
    "unbiased_kd",
    "knowledge_distillation",
    "label_bce",
    "old_sigmoid_bce",
    "multiclass_bce_distillation",
    "feature_distillation",
    "contrastive_distillation",
    "contrastive_distillation_flat",
    "gathered_contrastive_distillation",
    "prepare_contrastive_inputs",
    "contrastive_input_stats",
    "ContrastiveInputs",
    "resize_labels_nearest",
    "local_pod",
    "entropy_pseudo_labels",
    "EntropyThresholds",
    "ParameterRegularizer",
    "EWC",
    "PathIntegral",
    "RiemannianWalk",
    "REGULARIZERS",
    "normalize_importance",
    "SDR_WEIGHTS",
    "check_prototypes",
    "downsample_labels",
    "old_prediction_down",
    "update_prototypes",
    "prototype_matching",
    "feature_clustering",
    "feature_separation",
    "feature_sparsification",
]
