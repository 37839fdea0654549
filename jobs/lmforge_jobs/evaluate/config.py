"""Evaluation spec: what ``python -m lmforge_jobs.evaluate --manifest eval.yaml`` measures.

Perplexity on held-out data, lm-evaluation-harness benchmarks, and pairwise LLM-as-judge win rates
(plus Bradley–Terry arena ratings across several models).
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import Field, StringConstraints, model_validator

from lmforge_jobs.pretrain.config import Queue
from lmforge_jobs.spec import (
    GPU_CONSISTENT,
    Cel,
    HubId,
    Image,
    ModelRef,
    Name,
    NodeParallelism,
    PodTemplate,
    Precision,
    ResourceRef,
    Resources,
    Scheduling,
    SecretKeyRef,
    SecretRef,
    ShortStr,
    Spec,
    SpecError,
    StatusBase,
    Storage,
    Tracking,
    Uri,
    check_gpus,
    exactly_one,
)


class Checkpoints(str, Enum):
    """Which checkpoints of the model to evaluate."""

    final = "final"
    every = "every"


class Perplexity(Spec):
    """Perplexity on held-out text: a Corpus's held-out split or a data URI; exactly one."""

    __cel__ = (Cel("has(self.corpus) != has(self.data)", "exactly one of corpus, data must be set"),)

    corpus: ResourceRef | None = None
    """Corpus whose held-out token shards are used."""
    data: Uri | None = None
    """Token shards, or text/JSONL files."""
    seq_len: Annotated[int, Field(ge=8, le=1048576)] | None = None
    """Window length; defaults to the model's context length (at most 8192)."""
    stride: Annotated[int, Field(ge=1)] | None = None
    """Sliding-window stride for long documents: tokens newly scored per window (at most seqLen - 1, the rest of
    the window is context); defaults to seqLen (windows overlap by one token)."""
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 8
    """Windows per forward pass."""
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    """Evaluate at most this many tokens."""

    @model_validator(mode="after")
    def _one(self) -> Perplexity:
        exactly_one(self, ("corpus", "data"))
        return self


class Benchmark(Spec):
    """An lm-evaluation-harness task by name or a task YAML file; exactly one."""

    __cel__ = (Cel("has(self.task) != has(self.taskPath)", "exactly one of task, taskPath must be set"),)

    task: (
        Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9_.\-]+$")] | None
    ) = None
    """Registered lm-eval task or group name (hellaswag, mmlu …)."""
    task_path: Uri | None = None
    """Task YAML file (its data files next to it or named by absolute URI)."""
    num_fewshot: Annotated[int, Field(ge=0, le=128)] | None = None
    """Few-shot examples; the task's default when unset."""
    limit: Annotated[int, Field(ge=1)] | None = None
    """Evaluate at most this many examples."""
    apply_chat_template: bool = False
    """Format prompts with the model's chat template (instruction-tuned models), few-shot examples as turns."""

    @model_validator(mode="after")
    def _one(self) -> Benchmark:
        exactly_one(self, ("task", "task_path"))
        return self


class Endpoint(Spec):
    """An OpenAI-compatible chat completions endpoint (vLLM, TGI, a hosted API)."""

    url: Annotated[str, StringConstraints(min_length=1, max_length=2048, pattern=r"^https?://\S+$")]
    """Base URL, e.g. http://vllm.judges:8000/v1."""
    model_name: ShortStr
    """Model name sent in requests."""
    api_key: SecretRef | None = None
    """API key, by Secret reference."""


class JudgeModel(Spec):
    """The judge: an endpoint, a hub model or a local model directory; exactly one."""

    __cel__ = (
        Cel(
            "(has(self.endpoint) ? 1 : 0) + (has(self.huggingface) ? 1 : 0) + (has(self.path) ? 1 : 0) == 1",
            "exactly one of endpoint, huggingface, path must be set",
        ),
    )

    endpoint: Endpoint | None = None
    """OpenAI-compatible endpoint."""
    huggingface: HubId | None = None
    """Hub model id, run locally."""
    path: Uri | None = None
    """Hugging Face format model directory, run locally."""

    @model_validator(mode="after")
    def _one(self) -> JudgeModel:
        exactly_one(self, ("endpoint", "huggingface", "path"))
        return self


class Judge(Spec):
    """Pairwise LLM-as-judge: the model and a reference answer the same prompts; the judge picks A, B or tie."""

    model: JudgeModel
    """The judge."""
    reference: ModelRef
    """Model compared against."""
    prompts: Uri
    """JSONL file with a prompt per line."""
    swap_positions: bool = True
    """Judge each pair twice with positions swapped, to cancel order bias."""
    max_new_tokens: Annotated[int, Field(ge=1, le=65536)] = 256
    """Tokens generated per answer."""
    temperature: Annotated[float, Field(ge=0, le=10)] = 0.0
    """Sampling temperature of the answers (0 = greedy)."""
    bootstrap_samples: Annotated[int, Field(ge=100, le=1000000)] = 1000
    """Bootstrap resamples for the 95 % interval."""
    limit: Annotated[int, Field(ge=1)] | None = None
    """Use at most this many prompts."""
    verdict_max_tokens: Annotated[int, Field(ge=1, le=65536)] = 32
    """Tokens the judge may generate for its verdict ([[A]], [[B]] or [[C]])."""


class ArenaStorage(Spec):
    """Where the voting page keeps its SQLite votes when no database is given."""

    claim_name: Name
    """PersistentVolumeClaim (ReadWriteOnce is enough: one replica) holding human-votes.sqlite."""


class HumanArena(Spec):
    """A voting page for people on the judged answer pairs (``lmforge arena serve``), run by the operator as a
    Deployment and Service once the Evaluation has succeeded; its ratings are mirrored into status.results.human.
    Expose it through an Ingress or Gateway with the cluster's own authentication: the page has no passwords."""

    enabled: bool = True
    """Run the page; false removes the Deployment and Service (the votes stay in the database)."""
    database: SecretKeyRef | None = None
    """Secret key holding the SQLAlchemy URL of the votes (postgresql+psycopg://user:password@host/db); unset:
    SQLite on storage.claimName, else on an emptyDir that loses the votes when the pod moves."""
    storage: ArenaStorage | None = None
    """PersistentVolumeClaim for the SQLite votes (when no database is given)."""
    rate_limit: Annotated[int, Field(ge=1, le=10000)] = 30
    """Votes per voter per minute (per replica)."""


class Arena(Spec):
    """Bradley–Terry ratings of the model and opponents from pairwise judgments (uses judge's judge and prompts)."""

    opponents: Annotated[list[ModelRef], Field(min_length=1, max_length=32)]
    """Further models rated with the evaluated model (and judge.reference)."""
    human: HumanArena | None = None
    """A voting page for people on the same answer pairs, run on the cluster by the operator."""


class EvaluationSpec(Spec):
    """Evaluate a model: perplexity, benchmarks, judge win rate, arena ratings."""

    __cel__ = (
        GPU_CONSISTENT,
        Cel(
            "has(self.perplexity) || (has(self.benchmarks) && size(self.benchmarks) > 0) || has(self.judge)",
            "at least one of perplexity, benchmarks, judge must be set",
            field="perplexity",
            reason="FieldValueRequired",
        ),
        Cel(
            "self.checkpoints != 'every' || has(self.model.pretrainRun) || has(self.checkpointDir)",
            "checkpoints: every needs model.pretrainRun (the run whose checkpoints are evaluated)",
            field="checkpoints",
        ),
        Cel("!has(self.arena) || has(self.judge)", "arena needs judge", field="arena"),
    )

    model: ModelRef
    """Model to evaluate: pretrainRun, alignmentRun, huggingface or path."""
    checkpoints: Checkpoints = Checkpoints.final
    """final, or every: re-evaluate each new checkpoint of a PretrainRun as it lands."""
    perplexity: Perplexity | None = None
    """Perplexity on held-out data."""
    benchmarks: Annotated[list[Benchmark], Field(max_length=256)] = []
    """lm-eval tasks."""
    judge: Judge | None = None
    """Pairwise LLM-as-judge against a reference model."""
    arena: Arena | None = None
    """Bradley–Terry ratings across several models."""
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 8
    """Batch size for benchmarks and generation."""
    precision: Precision = Precision.bf16
    """bf16 or fp32 inference."""
    parallelism: NodeParallelism = NodeParallelism()
    """Nodes and GPUs."""
    output: Uri | None = None
    """Where results.json goes; defaults to the local run directory or operator storage."""
    checkpoint_dir: Uri | None = None
    """Checkpoint directory of model.pretrainRun, watched when checkpoints is every; filled in by the operator or
    lmforge run from the PretrainRun's status.outputs.checkpoint (leave unset)."""
    checkpoint_poll_seconds: Annotated[int, Field(ge=1, le=3600)] = 30
    """checkpoints: every: seconds between looks for new checkpoints."""
    checkpoint_timeout_seconds: Annotated[int, Field(ge=1, le=2592000)] = 86400
    """checkpoints: every: fail when no new checkpoint appears for this long and the PretrainRun has not
    finished."""
    queue: Queue | None = None
    """Kueue LocalQueue to submit to."""
    image: Image | None = None
    """Container image of the jobs; defaults to the operator's configured jobs image."""
    storage: Storage | None = None
    """Object storage endpoint, region and credentials (Secrets by name); unset: the operator's defaults."""
    template: PodTemplate | None = None
    """Pod template merged into the pods (placement, priority, registries, volumes, devices, env)."""
    scheduling: Scheduling | None = None
    """Gang scheduling of the pods (Volcano or coscheduling PodGroup); unset: none."""
    tracking: Tracking | None = None
    """Experiment tracking: MLflow, TensorBoard; unset: MLflow whenever MLFLOW_TRACKING_URI is set."""
    resources: Resources = Resources()
    """Resources of each pod."""

    @model_validator(mode="after")
    def _rules(self) -> EvaluationSpec:
        if self.perplexity is None and not self.benchmarks and self.judge is None:
            raise SpecError("perplexity", "at least one of perplexity, benchmarks, judge must be set")
        if (
            self.checkpoints == Checkpoints.every
            and self.model.pretrain_run is None
            and self.checkpoint_dir is None
        ):
            raise SpecError(
                "checkpoints",
                "checkpoints: every needs model.pretrainRun (the run whose checkpoints are evaluated)",
            )
        if self.arena is not None and self.judge is None:
            raise SpecError("arena", "arena needs judge")
        check_gpus(self.resources, self.parallelism.gpus_per_node)
        return self


# ------------------------------------------------------------------------------------------------ status
Interval = Annotated[list[float], Field(min_length=2, max_length=2)]


class JudgeResult(Spec):
    """Win rate of the model against the reference."""

    win_rate: Annotated[float, Field(ge=0, le=1)] | None = None
    """(wins + ties/2) / judged pairs."""
    ci95: Interval | None = None
    """95 % bootstrap interval of winRate."""
    wins: Annotated[int, Field(ge=0)] = 0
    """Pairs the model won."""
    losses: Annotated[int, Field(ge=0)] = 0
    """Pairs the reference won."""
    ties: Annotated[int, Field(ge=0)] = 0
    """Ties."""
    unparseable: Annotated[int, Field(ge=0)] = 0
    """Judge answers that named no winner."""


class Rating(Spec):
    """A Bradley–Terry rating on the Elo scale."""

    rating: float
    """Rating (Elo scale, 1000 = mean)."""
    ci95: Interval | None = None
    """95 % bootstrap interval."""


class HumanResults(Spec):
    """Ratings from people's votes on the arena's voting page (mirrored from it by the operator)."""

    votes: Annotated[int, Field(ge=0)] = 0
    """Votes cast."""
    ratings: Annotated[dict[ShortStr, Rating], Field(max_length=64)] = {}
    """Bradley–Terry ratings per model from the votes."""
    agreement: Annotated[float, Field(ge=0, le=1)] | None = None
    """Share of the votes on judged pairs where the judge picked what the person picked."""


class Results(Spec):
    """Evaluation results (also written to results.json)."""

    perplexity: Annotated[float, Field(ge=0)] | None = None
    """exp(token-weighted mean negative log-likelihood)."""
    nll: Annotated[float, Field(ge=0)] | None = None
    """Mean negative log-likelihood per token (nats)."""
    bits_per_byte: Annotated[float, Field(ge=0)] | None = None
    """Total NLL in bits divided by UTF-8 bytes."""
    benchmarks: Annotated[
        dict[ShortStr, Annotated[dict[ShortStr, float], Field(max_length=64)]], Field(max_length=256)
    ] = {}
    """Metric values per task: {hellaswag: {acc: 0.31, acc_norm: 0.33}}."""
    judge: JudgeResult | None = None
    """Judge win rate."""
    arena: Annotated[dict[ShortStr, Rating], Field(max_length=64)] = {}
    """Ratings per model."""
    human: HumanResults | None = None
    """Ratings from people's votes (arena.human)."""
    checkpoint: ShortStr | None = None
    """Checkpoint these results are for (checkpoints: every)."""
    step: Annotated[int, Field(ge=0)] | None = None
    """Training step of that checkpoint (checkpoints: every)."""


class EvaluationOutputs(Spec):
    """Where the Evaluation's results are."""

    results: Uri | None = None
    """results.json."""


class HumanArenaStatus(Spec):
    """The voting page the operator runs for arena.human."""

    service: Name
    """Its Service (port 80), the backend for an Ingress or Gateway; or kubectl port-forward svc/SERVICE 8080:80."""


class EvaluationStatus(StatusBase):
    """Observed state of an Evaluation."""

    results: Results | None = None
    """Latest results."""
    history: Annotated[list[Results], Field(max_length=100)] = []  # the newest rounds (etcd's 1.5 MiB)
    """Results per evaluated checkpoint (checkpoints: every)."""
    outputs: EvaluationOutputs | None = None
    """Results files."""
    human_arena: HumanArenaStatus | None = None
    """The voting page of arena.human, while the operator runs it."""
