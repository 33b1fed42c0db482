"""Ablation studies: a grid of arms (models) x tasks x widths x seeds x learning rates, each cell trained from
scratch and written as one JSON, resumably; tables, figures and verdicts that can fail computed from the cells.

=====================  ==================================================================================
module                 what
=====================  ==================================================================================
:mod:`.schema`         the study YAML, typed and checked key by key (:func:`load_study`)
:mod:`.cells`          the cells a study defines (learning-rate sweeps on tuning seeds first), their models
:mod:`.recall`         MQAR cells: graph-captured training, accuracy by query-to-key distance
:mod:`.multimodal`     synthetic-suite cells (Lightning) and the distillation track
:mod:`.kernels`        recording and pinning autotuned kernel configurations, for reruns that reproduce
:mod:`.runner`         running and resuming a study (:func:`run_study`), workers, time budgets
:mod:`.verdicts`       Reproduced / Refuted / Inconclusive / Saturated from bootstrap intervals
:mod:`.report`         ``RESULTS.md``: tables, figures, claims (``hybridvl ablate-report``)
=====================  ==================================================================================

.. code-block:: console

    hybridvl ablate --config experiments/ablations/recall.yaml --smoke      # a CPU check, seconds
    hybridvl ablate --config experiments/ablations/recall.yaml --workers 8  # on a GPU, resumable
    hybridvl ablate-report
"""

from hybridvl.lit.ablation.cells import Cell, expand, model_config
from hybridvl.lit.ablation.runner import run_cell, run_study, summarize
from hybridvl.lit.ablation.schema import Arm, Study, StudyError, Task, TrainSettings, load_study
from hybridvl.lit.ablation.verdicts import Estimate, Outcome, compare, estimate, reaches

__all__ = [
    "Arm",
    "Cell",
    "Estimate",
    "Outcome",
    "Study",
    "StudyError",
    "Task",
    "TrainSettings",
    "compare",
    "estimate",
    "expand",
    "load_study",
    "model_config",
    "reaches",
    "run_cell",
    "run_study",
    "summarize",
]
