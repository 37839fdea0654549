"""The reconciler: level-based, restart-safe, dependency-ordered.

- :mod:`.workqueue`: the cache of watched objects, the work queue, its workers and the periodic resync
  (a resource that is not finished is reconciled again, so nothing depends on an event arriving);
- :mod:`.reconcile`: :class:`Controller`, the reconcile of one resource: admission (spec, references,
  compute plan), dependencies, child creation, and the one place its outcome becomes conditions;
- :mod:`.outcomes`: the outcomes a reconcile step returns (Pending, Running, Succeeded) or raises
  (Waiting, Invalid, Failed);
- :mod:`.mirror`: Job → status (progress, metrics, termination summary, outputs);
- :mod:`.corpus_stages`: a Corpus, one Job per stage; :mod:`.eval_rounds`: an Evaluation with
  ``checkpoints: every``, one Job per round;
- :mod:`.human_arena`: an Evaluation's voting page (``arena.human``): its Deployment and Service, and
  its ratings into ``status.results.human``;
- :mod:`.events`: a Kubernetes Event per transition.

There is no finalizer: children carry ownerReferences and the garbage collector deletes them.
"""

from lmforge_jobs.spec import spec_hash
from lmforge_operator.controller.config import Config, default_image
from lmforge_operator.controller.outcomes import (
    Failed,
    Invalid,
    Outcome,
    Pending,
    Running,
    Succeeded,
    Waiting,
)
from lmforge_operator.controller.reconcile import Controller, changed_fields
from lmforge_operator.controller.workqueue import Key

__all__ = [
    "Config",
    "Controller",
    "Failed",
    "Invalid",
    "Key",
    "Outcome",
    "Pending",
    "Running",
    "Succeeded",
    "Waiting",
    "changed_fields",
    "default_image",
    "spec_hash",
]
