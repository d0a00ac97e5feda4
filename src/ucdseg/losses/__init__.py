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
* SSUL: :func:`ssul_train_labels`, :func:`ssul_pseudo_labels`, :func:`ssul_bce`, :func:`ssul_predict` (ssul.py)
* DKD: :func:`dkd_mbce`, :func:`dkd_kd`, :func:`decomposed_logits` + :func:`dkd_decomposed_kd`,
  :func:`dkd_aux_loss`, :func:`dkd_pseudo_labels`, :func:`dkd_predict`, :data:`DKD_WEIGHTS` (dkd.py)
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
from .ssul import ssul_bce, ssul_predict, ssul_pseudo_labels, ssul_train_labels
from .dkd import (
    DKD_POS_WEIGHT,
    DKD_POS_WEIGHT_ADE,
    DKD_POS_WEIGHT_STEP0,
    DKD_WEIGHTS,
    decomposed_logits,
    dkd_aux_loss,
    dkd_decomposed_kd,
    dkd_kd,
    dkd_mbce,
    dkd_predict,
    dkd_pseudo_labels,
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
    "ssul_train_labels",
    "ssul_pseudo_labels",
    "ssul_bce",
    "ssul_predict",
    "dkd_mbce",
    "dkd_kd",
    "decomposed_logits",
    "dkd_decomposed_kd",
    "dkd_aux_loss",
    "dkd_pseudo_labels",
    "dkd_predict",
    "DKD_WEIGHTS",
    "DKD_POS_WEIGHT",
    "DKD_POS_WEIGHT_STEP0",
    "DKD_POS_WEIGHT_ADE",
]
