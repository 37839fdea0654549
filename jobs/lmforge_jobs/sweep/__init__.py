"""Hyperparameter sweeps: a PretrainRun or AlignmentRun template, a search space, an objective.

* :mod:`.config` is the Sweep spec and status (the CRD's schema) and applies a trial's parameters to the
  template;
* :mod:`.search` asks Optuna for trials and tells it their results (samplers, pruners, restart-safe storage).

A Sweep has no job of its own: ``lmforge run`` and the operator (``controller/sweeps.py``) run its
trials as child resources named ``<sweep>-t<NNN>``.
"""
