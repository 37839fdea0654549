"""The kinds of lmforge resource and what is fixed about each, in one table.

Everything keyed by kind reads :data:`KINDS`: the CRD generator (plural, singular, short names), the
operator's watches and RBAC rules, the Job builder (job module, component label, grace period, torchrun),
``lmforge run`` and ``lmforge status`` (job module, work folder, listing order), the jobs' own ``main``
and telemetry (metric prefix). :data:`STATUS_METRICS` is the other table keyed by kind: the numbers each reports
in status.metrics. The spec and status models of each kind are its Resource class in
:data:`lmforge_jobs.manifest.MODELS`, keyed by the same names.

This module imports nothing from lmforge: every layer may read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str
    """The kind as manifests spell it (CamelCase)."""
    plural: str
    """Resource name in API paths, RBAC rules and CRD names (``<plural>.lmforge.io``)."""
    short_names: tuple[str, ...]
    """``kubectl get`` abbreviations."""
    package: str
    """Package of the job under ``lmforge_jobs`` (``python -m lmforge_jobs.<package>``)."""
    component: str
    """``app.kubernetes.io/component`` label of its children, and the suffix of their names."""
    metric_prefix: str
    """Its Prometheus series are ``lmforge_<metric_prefix>_...``."""
    distributed: bool
    """Runs under torchrun (one process per GPU, several nodes)."""
    grace_seconds: int
    """Seconds between SIGTERM and SIGKILL: a training rank finishes its step and saves a checkpoint."""
    job: bool = True
    """Runs a job of its own; False: it runs other resources as its children (a Sweep's trials, a
    ScalingStudy's points)."""

    @property
    def singular(self) -> str:
        """The CRD's singular name, and the folder of its runs under a work directory."""
        return self.name.lower()

    @property
    def module(self) -> str:
        """The job's entry point: ``python -m <module> --manifest FILE``."""
        return f"lmforge_jobs.{self.package}"


# fmt: off
_TABLE = (
    #    name            plural            short_names  package          component   metric_prefix  distributed  grace_seconds
    Kind("Corpus",       "corpora",        ("crp",),    "data",          "corpus",   "data",        False,       120),
    Kind("PretrainRun",  "pretrainruns",   ("ptr",),    "pretrain",      "pretrain", "train",       True,        600),
    Kind("AlignmentRun", "alignmentruns",  ("alr",),    "align",         "align",    "align",       True,        600),
    Kind("Evaluation",   "evaluations",    ("lmev",),   "evaluate",      "evaluate", "eval",        False,       120),
    Kind("Sweep",        "sweeps",         ("swp",),    "sweep",         "sweep",    "sweep",       False,       120, job=False),
    Kind("ScalingStudy", "scalingstudies", ("scs",),    "scaling_study", "scaling",  "scaling",     False,       120, job=False),
)
# fmt: on
KINDS: dict[str, Kind] = {kind.name: kind for kind in _TABLE}
"""Every kind, in pipeline order (the order ``lmforge status`` lists them)."""

SWEEP_LABEL = "lmforge.io/sweep"
"""Label of a Sweep's trial run (and its Jobs and pods): the Sweep's name."""
STUDY_LABEL = "lmforge.io/scaling-study"
"""Label of a ScalingStudy's point run (and its Jobs and pods): the study's name."""
PARENT_LABELS = (SWEEP_LABEL, STUDY_LABEL)
"""The labels a child run of an experiment carries, passed on to its Jobs and pods (Prometheus series and
tracking group by them)."""

STATUS_METRICS: dict[str, tuple[str, ...]] = {
    "Corpus": ("documentsPerSecond",),
    "PretrainRun": ("loss", "evalLoss", "perplexity", "tokensPerSecond", "mfu", "gpuUtilization"),
    "AlignmentRun": (
        "loss",
        "evalLoss",
        "tokensPerSecond",
        "rewardAccuracy",
        "rewardMargin",
        "meanReward",
        "kl",
    ),
}
"""The numbers each kind reports in status.metrics (camelCase, in its status model's order): the operator
copies these from a job's telemetry into its status, and a Sweep's objective must be one its template kind
reports. Spelled out here because the status models cannot be read while they are being defined (the Sweep's
CRD rule needs the names); a test checks the table against the models."""

__all__ = ["KINDS", "PARENT_LABELS", "STATUS_METRICS", "STUDY_LABEL", "SWEEP_LABEL", "Kind"]
