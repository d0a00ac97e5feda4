"""Training engine, split by job:

* :mod:`.build`: every object a run is made of, built from its config (the only reader of it);
* :mod:`.loop`: one iteration (:func:`train_one_iteration`) and the iterations of a step;
* :mod:`.evaluation`: the evaluation after a step and of a checkpoint (``ucdseg eval``);
* :mod:`.runner`: the run folder, resume, a shared step 0 and ``results.json`` (:func:`run`);
* :mod:`.process_group`, :mod:`.sampling`, :mod:`.metrics`: processes, batches, confusion matrix.
"""

from .runner import Run, run

__all__ = ["Run", "run"]
