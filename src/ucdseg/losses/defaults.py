"""The releases' settings of the losses that a method exposes as its options and weights.

Plain numbers, torch-free: the method declarations (:mod:`ucdseg.methods`) read them as option
defaults and term weights without importing the losses; each loss module uses them as its own
defaults and re-exports them.
"""

from __future__ import annotations

__all__ = ["PLOP_POD_FACTOR", "PLOP_LAST_POD_FACTOR", "SSUL_PSEUDO_THRESHOLD", "DKD_WEIGHTS", "DKD_POS_WEIGHT_STEP0",
           "DKD_POS_WEIGHT", "DKD_POS_WEIGHT_ADE", "DKD_PSEUDO_THRESHOLD", "SDR_WEIGHTS", "SDR_README_WEIGHTS"]

# ------------------------------------------------------------------------------------- PLOP
#: ``--pod_factor 0.01`` (PLOP method preset): weight of every level but the last.
PLOP_POD_FACTOR = 0.01
#: ``pod_options["switch"]["after"]["factor"] = 0.0005``: weight of the last level (the logits).
PLOP_LAST_POD_FACTOR = 0.0005

# ------------------------------------------------------------------------------------- SSUL
SSUL_PSEUDO_THRESHOLD = 0.7  #: ``--pseudo_thresh`` default (main.py:89)

# -------------------------------------------------------------------------------------- DKD
#: loss weights of configs/config_voc.json (and config_ade.json) ``hyperparameter``
DKD_WEIGHTS = {"mbce": 1.0, "kd": 5.0, "dkd_pos": 5.0, "dkd_neg": 5.0, "ac": 1.0}
#: VOC step 0: ``--pos_weight ${INIT_POSWEIGHT}``, INIT_POSWEIGHT=2 (scripts/voc/overlapped/*.sh)
DKD_POS_WEIGHT_STEP0 = 2.0
#: VOC steps > 0: configs/config_voc.json ``pos_weight: 1`` (used at trainer_voc.py:84-85)
DKD_POS_WEIGHT = 1.0
#: ADE, every step: configs/config_ade.json ``pos_weight: 35`` (scripts/ade pass no --pos_weight)
DKD_POS_WEIGHT_ADE = 35.0
#: pseudo-label threshold of DKD-M's memory sampler (utils/memory.py:105)
DKD_PSEUDO_THRESHOLD = 0.9

# -------------------------------------------------------------------------------------- SDR
#: Weights of the release's ``--method SDR`` preset (argparser.py:44-63), used by its step-t script
#: ``script_19_1_step1.slurm`` (which passes ``--method SDR``; its own ``loss_*`` shell variables hold
#: the same values and are not passed). ``unce`` is the unweighted UNCE.
SDR_WEIGHTS = {"unce": 1.0, "unkd": 100.0, "pm": 0.01, "fc": 1e-3, "sep": 1e-3, "fs": 1e-3}
#: The README's "kick-start" (README.md:143, and argparser.py:51): KD 10, PM 1e-2, CL 1e-3 (the same
#: value for attraction and repulsion, argparser.py:49), FS 1e-4. Not used: the scripts win.
SDR_README_WEIGHTS = {"unce": 1.0, "unkd": 10.0, "pm": 0.01, "fc": 1e-3, "sep": 1e-3, "fs": 1e-4}
