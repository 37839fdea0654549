"""Building blocks shared by the four resource specs (Corpus, PretrainRun, AlignmentRun, Evaluation).

Every spec model is a pydantic v2 model whose field docstrings become the descriptions in the generated
CRDs. Cross-field rules are written twice on purpose, next to each other: once in Python (a model
validator raising :class:`SpecError`, so ``lmforge validate`` and the jobs reject bad input) and once as a
CEL expression (:class:`Cel`, so the Kubernetes API server refuses the resource at admission). The test
suite checks that both refuse the same manifests.

This module imports nothing heavy: the operator composes its CRDs from these models.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

API_GROUP = "lmforge.io"
API_VERSION = "v1alpha1"
GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"

# Exit code of every job for a configuration error (bad spec, missing input): distinct from crashes, so a
# Job's podFailurePolicy can fail fast instead of retrying.
EXIT_CONFIG_ERROR = 64
# Exit code for a service the job needs being unavailable (an endpoint down, overloaded, unreachable) after
# the job's own retries: not the spec's fault, so the Job retries the pod (backoffLimit) instead of failing.
EXIT_UNAVAILABLE = 69
# Exit code of a job stopped by SIGTERM/SIGINT after saving a checkpoint (128 + SIGTERM, the shell's code
# for it): the work is not finished, so it must never read as success (exit 0 made a preempted rank's
# index "complete"). Kubernetes' podFailurePolicy ignores it: the pod is replaced, not counted against
# backoffLimit, and the run resumes from that checkpoint.
EXIT_STOPPED = 143


class FieldError(Exception):
    """A problem a person fixes in one field of a spec: ``field`` is its camelCase path under ``spec``
    (``"batch.globalTokens"``, ``"sources[0].jsonl"``), ``message`` says what is wrong. It reads
    ``spec.<field>: <message>``. The jobs' ConfigError and ServiceUnavailable, the operator's BuildError
    and an UnresolvedReference are FieldErrors."""

    def __init__(self, field: str, message: str):
        super().__init__(f"spec.{field}: {message}")
        self.field = field
        self.message = message


class SpecError(FieldError, ValueError):
    """A cross-field rule failed; ``field`` is the camelCase path of the offending field, relative to the
    object the rule is attached to (``"kvHeads"``, ``"peft.lora"``): the manifest loader prefixes the
    object's own path. A ValueError, so that pydantic reports it as a validation error."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message)
        self.args = (message,)  # pydantic's text is the message alone; the loader puts the path before it


@dataclass(frozen=True)
class Cel:
    """A CEL rule for ``x-kubernetes-validations`` on the object schema of the model that declares it.

    ``field`` (camelCase, relative) is reported as the rule's fieldPath, so kubectl names the field.
    """

    rule: str
    message: str
    field: str | None = None
    reason: str | None = (
        None  # FieldValueRequired | FieldValueInvalid | FieldValueForbidden | FieldValueDuplicate
    )


def spec_hash(value: Any) -> str:
    """A short digest of a spec (or of anything JSON-like that identifies a run): equal values, equal
    digests, whatever the order of their keys."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- base model
class Spec(BaseModel):
    """Base of every spec object: camelCase in YAML, unknown fields refused, field docstrings kept."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
    )

    # CEL rules placed on this object's schema in the CRD (see Cel).
    __cel__: ClassVar[tuple[Cel, ...]] = ()
    # Maximum number of properties for free-form maps (CRD maxProperties), keyed by field name.
    __max_properties__: ClassVar[dict[str, int]] = {}

    def to_yaml_dict(self) -> dict[str, Any]:
        """The object as it would appear in a manifest (camelCase, unset optionals left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def exactly_one(obj: BaseModel, fields: tuple[str, ...], where: str = "") -> None:
    """Raise SpecError unless exactly one of ``fields`` (python names) is set."""
    set_ = [f for f in fields if getattr(obj, f) is not None]
    if len(set_) != 1:
        names = ", ".join(to_camel(f) for f in fields)
        found = ", ".join(to_camel(f) for f in set_) or "none"
        target = to_camel(set_[1]) if len(set_) > 1 else to_camel(fields[0])
        raise SpecError(target, f"{where}exactly one of {names} must be set (found: {found})")


def cel_exactly_one(fields: tuple[str, ...]) -> str:
    """CEL: exactly one of the camelCase ``fields`` is present."""
    return " + ".join(f"(has(self.{f}) ? 1 : 0)" for f in fields) + " == 1"


# ---------------------------------------------------------------------------------------------- scalars
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
URI_PATTERN = r"^(\S+)$"

Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=63, pattern=DNS_LABEL),
    Field(description="Name of a resource in the same namespace (a DNS-1123 label)."),
]
"""Name of another lmforge resource in the same namespace."""


# The CRD refuses the same URIs as check_uri with one OpenAPI `pattern`, not a CEL rule: a rule on every URI
# (up to 64 sources × 1,000 paths each) would exceed the API server's CEL cost budget, while a pattern has
# none. Kubernetes matches patterns with Go's RE2, so no look-ahead: "any scheme but pvc" and "a path
# segment other than .." are spelled out. tests/jobs/test_specs.py checks RE2 and Python agree with check_uri.
_SCHEME_CHAR = r"[a-zA-Z0-9+.-]"
_SCHEME_NOT_PVC = (
    rf"([a-zA-Z]{_SCHEME_CHAR}?"  # one or two characters
    rf"|[a-oq-zA-Z]{_SCHEME_CHAR}{{2,}}"  # three or more, not starting with p
    rf"|p[a-uw-zA-Z0-9+.-]{_SCHEME_CHAR}+"  # p, then not v
    rf"|pv[abd-zA-Z0-9+.-]{_SCHEME_CHAR}*"  # pv, then not c
    rf"|pvc{_SCHEME_CHAR}+)"  # longer than pvc
)
_SEGMENT_NOT_DOTDOT = r"([^/.\s][^/\s]*|\.([^/.\s][^/\s]*)?|\.\.[^/\s]+)?"
_CLAIM = r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?"
URI_STRICT_PATTERN = (
    r"^("
    rf"pvc://{_CLAIM}(/{_SEGMENT_NOT_DOTDOT})*"  # a claim name, no .. segment
    rf"|{_SCHEME_NOT_PVC}://[^/@\s]*(/\S*)?"  # no user:password@ before the host
    r"|[^a-zA-Z\s]\S*"  # local: /abs, ./rel, ~/x
    rf"|[a-zA-Z]{_SCHEME_CHAR}*([^a-zA-Z0-9+.:\s-]\S*)?"  # local: rel/path, file.txt
    rf"|[a-zA-Z]{_SCHEME_CHAR}*:([^/\s]\S*|/([^/\s]\S*)?)?"  # a colon, but not ://
    r")$"
)
_PVC_CLAIM = re.compile(rf"^{_CLAIM}$")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://([^/]*)")


def check_uri(value: str) -> str:
    """Refuse URIs that can only be mistakes: credentials in the URI (they belong in a Secret), a
    ``pvc://`` URI without a valid claim name or with a ``..`` segment (it would leave the claim)."""
    if any(c.isspace() for c in value):
        raise ValueError("must not contain white space")
    if value.startswith("pvc://"):
        claim, _, rest = value[len("pvc://") :].partition("/")
        if len(claim) > 253 or not _PVC_CLAIM.match(claim):
            raise ValueError(
                f"{value!r}: pvc:// needs a PersistentVolumeClaim name (lowercase letters, digits, '-', '.'), "
                "as in pvc://CLAIM/path"
            )
        if ".." in rest.split("/"):
            raise ValueError(f"{value!r}: a pvc:// path must not contain '..' (it would leave the claim)")
        return value
    scheme = _SCHEME.match(value)
    if scheme and "@" in scheme.group(2):
        raise ValueError(
            f"{scheme.group(1)}:// URI with credentials before the host: give credentials by Secret "
            "reference or the environment, never in a spec"
        )
    return value


Uri = Annotated[
    str,
    StringConstraints(min_length=1, max_length=2048),
    AfterValidator(check_uri),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 2048, "pattern": URI_STRICT_PATTERN}),
]
"""Storage location: a local path, file://, pvc://CLAIM/path, s3://, gs://, hf:// (fsspec underneath)."""

ShortStr = Annotated[str, StringConstraints(min_length=1, max_length=253)]
Queue = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=DNS_LABEL)]
"""Name of a Kueue LocalQueue (a DNS-1123 label)."""
HubId = Annotated[
    str, StringConstraints(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
]

QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"


class Quantity(str):
    """A Kubernetes resource quantity (``"4"``, ``500m``, ``16Gi``); integers are accepted too."""

    PATTERN: ClassVar[str] = QUANTITY_PATTERN
    WHAT: ClassVar[str] = "a Kubernetes quantity"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        def check(value: Any) -> str:
            if isinstance(value, bool):
                raise ValueError("must be a quantity such as 4, 500m or 16Gi")
            text = str(value)
            if not re.match(cls.PATTERN, text):
                raise ValueError(f"{text!r} is not {cls.WHAT} (such as 4, 500m or 16Gi)")
            return text

        return core_schema.no_info_plain_validator_function(
            check, serialization=core_schema.plain_serializer_function_ser_schema(str)
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        return {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": cls.PATTERN,
        }


# A quantity a pod asks for: no sign, not zero. RE2-compatible (no look-ahead): a non-zero digit somewhere
# in the number. Integers (int-or-string) are checked by a CEL rule on Resources.
POSITIVE_QUANTITY_PATTERN = r"^(([0-9]*[1-9][0-9]*(\.[0-9]*)?)|([0-9]*\.[0-9]*[1-9][0-9]*))(([KMGTPE]i)|[numkMGTPE]|([eE]\+?[0-9]+))?$"


class PositiveQuantity(Quantity):
    """A Kubernetes resource quantity greater than zero (``"4"``, ``500m``, ``16Gi``)."""

    PATTERN = POSITIVE_QUANTITY_PATTERN
    WHAT = "a positive Kubernetes quantity"


# An image reference (Docker's grammar, simplified): [registry[:port]/]path[:tag][@digest]; no spaces,
# quotes or upper-case path components, which the kubelet would only refuse when the pod starts.
IMAGE_PATTERN = (
    r"^([a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?(\.[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?)*(:[0-9]+)?/)?"
    r"[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@[a-z0-9]+([+._-][a-z0-9]+)*:[a-fA-F0-9]{32,})?$"
)
Image = Annotated[str, StringConstraints(min_length=1, max_length=512, pattern=IMAGE_PATTERN)]
"""A container image reference, e.g. ghcr.io/lmforge/lmforge-jobs:0.1.0."""

MAX_STEPS = 100_000_000
"""More optimizer steps than any run trains for (the largest public runs take a few million): a typo."""
MAX_TOKENS = 10**15
"""A thousand trillion training tokens: thirty times the largest public runs."""


# ------------------------------------------------------------------------------------------- references
class SecretKeyRef(Spec):
    """A key of a Kubernetes Secret in the resource's namespace."""

    name: Name
    """Name of the Secret."""
    key: Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
    """Key inside the Secret."""


class SecretRef(Spec):
    """A secret value, given by reference only: never inline in a spec."""

    secret_key_ref: SecretKeyRef
    """The Secret key holding the value (mounted as an environment variable or file, never logged)."""


# -------------------------------------------------------------------------------------------- storage
# An S3 endpoint: http(s), a host (name, IPv4 or [IPv6]), an optional port and path; no user:password@ (a
# credential belongs in a Secret), no query or fragment. RE2-compatible, matched in the CRD as a pattern;
# check_endpoint is its Python twin with messages that say what is wrong.
ENDPOINT_PATTERN = (
    r"^https?://([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/[^\s?#@]*)?$"
)


def check_endpoint(value: str) -> str:
    """Refuse an endpoint that is not an http(s) URL of a host, or that carries credentials."""
    scheme = _SCHEME.match(value)
    if scheme and "@" in scheme.group(2):
        raise ValueError(
            "endpoint with credentials before the host: give them by Secret (storage.credentials), never "
            "in a spec"
        )
    if not re.match(ENDPOINT_PATTERN, value):
        raise ValueError(
            f"{value!r} is not an http(s) URL of an S3-compatible store, such as "
            "http://minio.storage.svc:9000 (no query, fragment or credentials)"
        )
    return value


Endpoint = Annotated[
    str,
    StringConstraints(min_length=1, max_length=2048),
    AfterValidator(check_endpoint),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 2048, "pattern": ENDPOINT_PATTERN}),
]
"""The URL of an S3-compatible object store (MinIO, Ceph, R2)."""

REGION_PATTERN = r"^[A-Za-z0-9]([-_A-Za-z0-9]*[A-Za-z0-9])?$"


class SecretName(Spec):
    """A whole Kubernetes Secret in the resource's namespace, by name."""

    secret_name: Name
    """Name of the Secret."""


class Storage(Spec):
    """Object storage settings of the job's pods (s3:// and gs:// URIs). Unset: the operator's defaults (the
    chart's storage values); ``lmforge run`` takes the endpoint and region from here, the credentials from
    the environment it runs in."""

    endpoint: Endpoint | None = None
    """URL of an S3-compatible store (MinIO, Ceph, R2), e.g. http://minio.storage.svc:9000; unset for AWS S3.
    The pods get it as LMFORGE_S3_ENDPOINT."""
    region: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=REGION_PATTERN)] | None = (
        None
    )
    """Region of the store (AWS_REGION and AWS_DEFAULT_REGION of the pods), e.g. us-east-1."""
    credentials: SecretName | None = None
    """A Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally AWS_SESSION_TOKEN), all of
    whose keys become the pods' environment variables. Unset: the pod's own identity (an IAM role for
    service accounts, workload identity) or the operator's default Secret."""
    gcs_credentials: SecretRef | None = None
    """A Secret key holding a Google service-account key file for gs:// URIs, mounted read-only and named
    by GOOGLE_APPLICATION_CREDENTIALS. Unset: workload identity."""


EXPERIMENT_PATTERN = r"^[A-Za-z0-9]([-_./A-Za-z0-9]*[A-Za-z0-9])?$"


class Tracking(Spec):
    """Experiment tracking of the run (:mod:`lmforge_jobs.tracking`): parameters, metrics over steps and
    artifacts to MLflow, event files to TensorBoard. The MLflow server's address and credentials never
    appear here: they come from the environment (MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME/PASSWORD or
    _TOKEN), which the chart's tracking values or the person running ``lmforge run`` set. A tracking
    server that is down never fails the run."""

    mlflow: bool | None = None
    """Log to MLflow. Unset: whenever MLFLOW_TRACKING_URI is set; false: never; true: always (a warning
    when no server is configured)."""
    tensorboard: bool = False
    """Write TensorBoard event files to <output>/tensorboard/ (on object storage: written locally, uploaded
    at each save and at the end)."""
    experiment: (
        Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=EXPERIMENT_PATTERN)] | None
    ) = None
    """MLflow experiment (letters, digits, - _ . /). Unset: <namespace>/<name> of the resource, or of its
    Sweep for a trial, whose runs are then children of one parent run per sweep."""


class ResourceRef(Spec):
    """Reference to another lmforge resource by name; resolved to its status.outputs."""

    name: Name
    """Name of the referenced resource (same namespace)."""


class ModelRef(Spec):
    """A model: the output of another run or of a sweep's best trial, a Hugging Face hub id, or a storage URI.
    Exactly one."""

    __cel__ = (
        Cel(
            cel_exactly_one(("pretrainRun", "alignmentRun", "sweep", "huggingface", "path")),
            "exactly one of pretrainRun, alignmentRun, sweep, huggingface, path must be set",
        ),
        Cel(
            "!has(self.revision) || has(self.huggingface)",
            "revision applies only to huggingface",
            field="revision",
        ),
    )

    pretrain_run: Name | None = None
    """Name of a PretrainRun whose exported model is used."""
    alignment_run: Name | None = None
    """Name of an AlignmentRun whose output model is used."""
    sweep: Name | None = None
    """Name of a Sweep whose best trial's output model is used (once the sweep has succeeded)."""
    huggingface: HubId | None = None
    """Hugging Face hub model id, e.g. meta-llama/Llama-3.2-1B."""
    path: Uri | None = None
    """URI of a Hugging Face format model directory."""
    revision: ShortStr | None = None
    """Hub revision (branch, tag or commit) when huggingface is used."""
    token: SecretRef | None = None
    """Hub token for gated or private models, by Secret reference."""

    @model_validator(mode="after")
    def _rules(self) -> ModelRef:
        exactly_one(self, ("pretrain_run", "alignment_run", "sweep", "huggingface", "path"))
        if self.revision is not None and self.huggingface is None:
            raise SpecError("revision", "revision applies only to huggingface")
        return self

    def reference(self) -> tuple[str, str] | None:
        """(kind, name) of the referenced lmforge resource, or None for hub ids and paths."""
        if self.pretrain_run:
            return ("PretrainRun", self.pretrain_run)
        if self.alignment_run:
            return ("AlignmentRun", self.alignment_run)
        if self.sweep:
            return ("Sweep", self.sweep)
        return None


# An extended resource name as the API server accepts it: a DNS subdomain prefix, then a qualified name.
ExtendedResourceName = Annotated[
    str,
    StringConstraints(
        min_length=3,
        max_length=317,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/"
        r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
    ),
]
"""A device plugin's resource, e.g. nvidia.com/gpu, nvidia.com/mig-1g.10gb, amd.com/gpu."""


class Resources(Spec):
    """Compute resources of each pod (requests = limits)."""

    __cel__ = tuple(
        Cel(
            f"!has(self.{name}) || type(self.{name}) == string || self.{name} > 0",
            f"{name} must be greater than zero",
            field=name,
        )
        for name in ("cpu", "memory", "ephemeralStorage")
    )

    cpu: PositiveQuantity | None = None
    """CPU cores per pod, e.g. "4" or 500m."""
    memory: PositiveQuantity | None = None
    """Memory per pod, e.g. 16Gi."""
    gpu: Annotated[int, Field(ge=0, le=64)] | None = None
    """GPUs per pod (nvidia.com/gpu); must equal parallelism.gpusPerNode where that exists (its default)."""
    gpu_resource: ExtendedResourceName | None = None
    """Device plugin resource the GPUs are asked for as, in place of nvidia.com/gpu (same count): a MIG
    profile under the NVIDIA device plugin's mixed strategy, e.g. nvidia.com/mig-1g.10gb (one per pod: a
    CUDA process uses a single MIG device), or another vendor's, e.g. amd.com/gpu."""
    ephemeral_storage: PositiveQuantity | None = None
    """Local scratch disk per pod, e.g. 100Gi."""


GPU_CONSISTENT = Cel(
    "!has(self.resources) || !has(self.resources.gpu) || "
    "self.resources.gpu == (has(self.parallelism) ? self.parallelism.gpusPerNode : 1)",
    "resources.gpu must equal parallelism.gpusPerNode (torchrun starts one process per GPU)",
    field="resources.gpu",
)
"""Rule for kinds with both ``resources`` and ``parallelism.gpusPerNode``; Python twin: check_gpus."""


def check_gpus(resources: Resources, gpus_per_node: int) -> None:
    if resources.gpu is not None and resources.gpu != gpus_per_node:
        raise SpecError(
            "resources.gpu",
            f"resources.gpu ({resources.gpu}) must equal parallelism.gpusPerNode ({gpus_per_node}): torchrun "
            "starts one process per GPU",
        )


# ------------------------------------------------------------------------------------------ pod template
# Kubernetes' own types (tolerations, affinity, volumes, env entries…) are kept as objects whose fields the
# API server preserves instead of re-declaring the PodSpec: the operator merges them into the pods it builds
# (lmforge_operator.podtemplate), refuses what would weaken Pod Security or break the Job naming the field,
# and the API server validates the resulting Job as it validates any other.
KubeObject = Annotated[
    dict[str, Any], WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True})
]
"""A Kubernetes object of the type the field names (an Affinity, a SecurityContext), kept as written."""


def _kube_list(max_items: int) -> Any:
    return Annotated[
        list[dict[str, Any]],
        Field(max_length=max_items),
        WithJsonSchema(
            {
                "type": "array",
                "maxItems": max_items,
                "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            }
        ),
    ]


# Keys are checked by the API server on the built pods (a CRD schema has no patternProperties).
StringMap = Annotated[dict[str, Annotated[str, StringConstraints(max_length=4096)]], Field(max_length=64)]
"""Labels, annotations, a nodeSelector: qualified names to strings."""
ResourceMap = Annotated[dict[str, Quantity], Field(max_length=16)]
"""Resource name → quantity, e.g. {rdma/ib: "1", vpc.amazonaws.com/efa: "32"}."""


class PodTemplateMetadata(Spec):
    """Labels and annotations added to every pod (lmforge's own labels cannot be changed)."""

    labels: StringMap | None = None
    """Pod labels, e.g. {team: llm}."""
    annotations: StringMap | None = None
    """Pod annotations, e.g. a network attachment (k8s.v1.cni.cncf.io/networks) or a Kueue topology."""


class ContainerResourcesTemplate(Spec):
    """Extra resources of a container: devices such as rdma/ib or vpc.amazonaws.com/efa. cpu, memory and
    nvidia.com/gpu of the job's container come from spec.resources and spec.parallelism."""

    requests: ResourceMap | None = None
    """Requested amounts (extended resources: equal to the limits, which they default to)."""
    limits: ResourceMap | None = None
    """Limits, e.g. {rdma/ib: "1"}."""


class ContainerTemplate(Spec):
    """A container, merged by name: "main" is the job's container (env, envFrom, volumeMounts, resources
    only); any other name adds a sidecar, given in full as a Kubernetes Container, run as a native sidecar
    (an init container with restartPolicy Always: stopped when the job's container exits)."""

    model_config = ConfigDict(
        **{k: v for k, v in Spec.model_config.items() if k != "extra"},
        extra="allow",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )

    name: Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=DNS_LABEL)]
    """Container name: main (the job's) or a sidecar's."""
    env: _kube_list(128) | None = None  # type: ignore[valid-type]
    """Environment variables (Kubernetes EnvVar), merged by name, e.g. {name: NCCL_DEBUG, value: INFO}."""
    env_from: _kube_list(16) | None = None  # type: ignore[valid-type]
    """Whole ConfigMaps or Secrets as environment variables (Kubernetes EnvFromSource), appended."""
    volume_mounts: _kube_list(64) | None = None  # type: ignore[valid-type]
    """Mounts of spec.template.spec.volumes (Kubernetes VolumeMount), merged by mountPath."""
    resources: ContainerResourcesTemplate | None = None
    """Extra resource requests and limits (devices)."""
    security_context: KubeObject | None = None
    """Container SecurityContext, merged into lmforge's restricted one: it cannot weaken it unless the
    operator allows privileged pods (the chart's podTemplate.allowPrivileged)."""


class PodSpecTemplate(Spec):
    """The parts of a PodSpec a resource may set; the operator merges them into its pods."""

    node_selector: StringMap | None = None
    """Node labels the pods require, e.g. {node.kubernetes.io/instance-type: p5.48xlarge}; merged."""
    tolerations: _kube_list(32) | None = None  # type: ignore[valid-type]
    """Tolerations (Kubernetes Toleration), appended to lmforge's own (the nvidia.com/gpu taint)."""
    affinity: KubeObject | None = None
    """Node and pod (anti-)affinity (Kubernetes Affinity)."""
    topology_spread_constraints: _kube_list(16) | None = None  # type: ignore[valid-type]
    """Topology spread constraints (Kubernetes TopologySpreadConstraint), appended."""
    priority_class_name: ShortStr | None = None
    """PriorityClass of the pods: higher-priority runs preempt lower ones, which resume from their last
    checkpoint."""
    scheduler_name: ShortStr | None = None
    """Scheduler of the pods (e.g. volcano); spec.scheduling.gang sets it for gang scheduling."""
    image_pull_secrets: _kube_list(16) | None = None  # type: ignore[valid-type]
    """Secrets for private registries ({name: regcred}), merged by name."""
    service_account_name: Name | None = None
    """ServiceAccount the pods run as (its token is still not mounted)."""
    runtime_class_name: ShortStr | None = None
    """RuntimeClass of the pods (e.g. nvidia, kata)."""
    volumes: _kube_list(64) | None = None  # type: ignore[valid-type]
    """Extra volumes (Kubernetes Volume), merged by name; "spec" is the job's own."""
    containers: Annotated[list[ContainerTemplate], Field(max_length=8)] | None = None
    """Containers merged by name: main is the job's container; other names add (native) sidecars."""
    security_context: KubeObject | None = None
    """Pod SecurityContext (e.g. supplementalGroups), merged into lmforge's restricted one."""
    host_network: bool | None = None
    """Run in the node's network namespace: refused unless the operator allows privileged pods."""
    host_pid: bool | None = Field(default=None, alias="hostPID")
    """Share the node's process namespace: refused unless the operator allows privileged pods."""
    host_ipc: bool | None = Field(default=None, alias="hostIPC")
    """Share the node's IPC namespace: always refused (/dev/shm is a memory-backed volume already)."""


class PodTemplate(Spec):
    """A partial pod template merged into every pod the resource runs, with Kubernetes' strategic-merge
    semantics: maps merged, containers, volumes, env and imagePullSecrets by name, tolerations and topology
    spread constraints appended. The operator's defaults for the kind (the chart's podTemplate.defaults)
    come first; this template wins."""

    metadata: PodTemplateMetadata | None = None
    """Pod labels and annotations."""
    spec: PodSpecTemplate | None = None
    """Pod spec fields: placement, priority, scheduler, registries, volumes, devices."""


class GangScheduler(str, Enum):
    """Who schedules a run's pods all at once (none: the default scheduler, pod by pod)."""

    none = "none"
    volcano = "volcano"
    coscheduling = "coscheduling"


class Scheduling(Spec):
    """How the pods are scheduled together."""

    gang: GangScheduler = GangScheduler.none
    """volcano (a scheduling.volcano.sh PodGroup, schedulerName volcano) or coscheduling (a
    scheduling.x-k8s.io PodGroup of the scheduler-plugins): the operator creates a PodGroup whose
    minMember is the run's pod count, so no pod starts before all of them can."""


class Precision(str, Enum):
    """Numeric precision for training."""

    bf16 = "bf16"
    fp32 = "fp32"


class NodeParallelism(Spec):
    """How many machines and accelerators a distributed job uses (torchrun)."""

    nodes: Annotated[int, Field(ge=1, le=1024)] = 1
    """Number of nodes (pods), each running torchrun."""
    gpus_per_node: Annotated[int, Field(ge=0, le=64)] = 1
    """GPUs per node; 0 runs one CPU process per node."""

    @property
    def world_size(self) -> int:
        return self.nodes * max(1, self.gpus_per_node)


# ------------------------------------------------------------------------------------------------ status
class ConditionStatus(str, Enum):
    true = "True"
    false = "False"
    unknown = "Unknown"


class Phase(str, Enum):
    """A one-word summary of the conditions, for printer columns."""

    pending = "Pending"
    waiting = "Waiting"
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"
    invalid = "Invalid"


class Condition(Spec):
    """A condition as in the Kubernetes API conventions (metav1.Condition)."""

    type: Annotated[str, StringConstraints(min_length=1, max_length=316)]
    """Type of condition in CamelCase: Ready, Running, Succeeded, Failed, Invalid or Waiting."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: Annotated[
        str,
        StringConstraints(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"),
    ]
    """Machine-readable CamelCase reason for the last transition."""
    message: Annotated[str, StringConstraints(max_length=32768)] = ""
    """Human-readable details; names the field for Invalid."""
    last_transition_time: datetime
    """When the status last changed."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The metadata.generation this condition was computed from."""


def derive_phase(conditions: list[Condition]) -> Phase:
    """The phase shown in printer columns, derived from conditions (highest precedence first)."""
    true_types = {c.type for c in conditions if c.status == ConditionStatus.true}
    for ctype, phase in (
        ("Invalid", Phase.invalid),
        ("Failed", Phase.failed),
        ("Succeeded", Phase.succeeded),
        ("Running", Phase.running),
        ("Waiting", Phase.waiting),
    ):
        if ctype in true_types:
            return phase
    return Phase.pending


class Progress(Spec):
    """How far the job is; plain numbers so dashboards and printer columns can use them."""

    step: Annotated[int, Field(ge=0)] | None = None
    """Optimizer steps completed."""
    total_steps: Annotated[int, Field(ge=0)] | None = None
    """Optimizer steps planned."""
    tokens: Annotated[int, Field(ge=0)] | None = None
    """Tokens processed so far."""
    percent: Annotated[float, Field(ge=0, le=100)] | None = None
    """Completion in percent (0-100)."""
    eta_seconds: Annotated[int, Field(ge=0)] | None = None
    """Estimated seconds until completion."""
    updated_at: datetime | None = None
    """When these numbers were last read from the job."""


class StatusBase(Spec):
    """Fields every kind's status shares."""

    model_config = ConfigDict(extra="forbid")  # status is written by us; unknown fields are a bug

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The metadata.generation the operator last acted on."""
    phase: Phase | None = None
    """Summary of the conditions: Pending, Waiting, Running, Succeeded, Failed or Invalid."""
    conditions: Annotated[list[Condition], Field(max_length=16)] = []
    """Latest observations of the resource's state (Ready, Running, Succeeded, Failed, Invalid, Waiting)."""
    progress: Progress | None = None
    """Progress of the running job."""
    start_time: datetime | None = None
    """When the first job of this resource started."""
    completion_time: datetime | None = None
    """When the resource reached Succeeded or Failed."""
