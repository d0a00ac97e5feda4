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

import importlib

#: The exported names, by the module that defines them. The modules (torch) are imported when a
#: name is first used: method declarations, and ``ucdseg methods``, load without torch.
_EXPORTS = {
    "contrastive": ("ContrastiveInputs", "contrastive_distillation", "contrastive_distillation_flat",
                    "prepare_contrastive_inputs", "resize_labels_nearest"),
    "contrastive_stats": ("contrastive_input_stats",),
    "gathered": ("gathered_contrastive_distillation",),
    "distillation": ("feature_distillation", "knowledge_distillation", "label_bce", "multiclass_bce_distillation",
                     "old_sigmoid_bce"),
    "mib": ("unbiased_cross_entropy", "unbiased_kd"),
    "plop": ("EntropyThresholds", "entropy_pseudo_labels", "local_pod"),
    "regularizers": ("EWC", "REGULARIZERS", "ParameterRegularizer", "PathIntegral", "RiemannianWalk",
                     "normalize_importance"),
    "sdr": ("check_prototypes", "downsample_labels", "feature_clustering", "feature_separation",
            "feature_sparsification", "old_prediction_down", "prototype_matching", "update_prototypes"),
    "ssul": ("ssul_bce", "ssul_predict", "ssul_pseudo_labels", "ssul_train_labels"),
    "dkd": ("decomposed_logits", "dkd_aux_loss", "dkd_decomposed_kd", "dkd_kd", "dkd_mbce", "dkd_predict",
            "dkd_pseudo_labels"),
    "defaults": ("SDR_WEIGHTS", "DKD_WEIGHTS", "DKD_POS_WEIGHT", "DKD_POS_WEIGHT_STEP0", "DKD_POS_WEIGHT_ADE"),
}
_MODULES = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULES)


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
    if name in _EXPORTS:  # a submodule: ucdseg.losses.plop
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
