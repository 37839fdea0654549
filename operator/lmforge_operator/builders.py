"""Pure builders: a validated lmforge resource in, the Kubernetes objects that run it out.

No API calls and no clock: the same resource always gives the same objects (names included), so the
handlers can create them if absent, tolerate 409 Conflict, and adopt what they find after a restart::

    owner = owner_reference(body)                                   # kopf's body of the custom resource
    for obj in children(resource, resolved_doc, owner, image=image, stage=stage):
        create_if_absent(obj)                                       # ConfigMap, (Service), Job

What a resource becomes:

* a **ConfigMap** ``<name>-<component>-spec`` with ``spec.yaml``: the resolved manifest (references
  replaced with URIs by :func:`lmforge_jobs.resolve.resolve`; ``pvc://`` URIs rewritten by
  :func:`localize`), mounted read-only at ``/etc/lmforge``. Spec strings only ever travel in this file,
  never through a shell or container args.
* a headless **Service** ``<name>-<component>`` (training kinds, and Evaluations over more than one
  process): stable DNS names ``<job>-<index>.<service>`` for the pods (``subdomain``), the torchrun
  rendezvous endpoint.
* a **NetworkPolicy** ``<name>-<component>`` (the same kinds as the Service): ingress to the resource's
  pods only from its own pods (any port: the rendezvous port 29400, whose c10d store unpickles what it
  reads, and the NCCL/Gloo connections torch opens between ranks on ports of its choosing) and from the
  operator's pods to the metrics port 9400 (:class:`Isolation` says which pods those are).
* one Indexed **Job** per step. PretrainRun / AlignmentRun / multi-process Evaluation: ``<name>-<component>``,
  completions = parallelism = nodes, each pod running torchrun through ``python -m lmforge_jobs.launch
  --nnodes=N --nproc-per-node=G --rdzv-backend=c10d --rdzv-endpoint=<job>-0.<service>:29400 ...
  --shutdown-timeout=<grace - 20 s> -m lmforge_jobs.<stage> --manifest /etc/lmforge/spec.yaml`` (the
  launcher keeps a worker's exit 64 as the pod's exit code, which torchrun alone turns into 1). Corpus: ``<name>-<stage>`` per stage of :func:`lmforge_jobs.data.stages.stages`,
  completions = the stage's tasks, parallelism = spec.parallelism.workers, a failed rank retried alone
  (backoffLimitPerIndex). Single-process Evaluation: ``python -m lmforge_jobs.evaluate``.

Every pod: restricted Pod Security (non-root uid 10001, no privilege escalation, all capabilities dropped,
RuntimeDefault seccomp), no service account token, /dev/shm as a memory-backed emptyDir, a writable /tmp
(HOME), Prometheus port ``metrics`` 9400, the job's JSON summary as termination message, and every Secret
the spec references as a ``secretKeyRef`` environment variable named by
:func:`lmforge_jobs.secrets.secret_env_name` (``LMFORGE_SECRET_<NAME>_<KEY>``), and the object-storage
settings of ``spec.storage`` (else the operator's defaults, the chart's ``storage`` values) as
:func:`storage_env` describes: the endpoint and region as variables, the credentials Secret as ``envFrom``,
a service-account key for gs:// as a read-only Secret volume, and the operator's experiment-tracking
defaults (the chart's ``tracking.mlflow``): ``MLFLOW_TRACKING_URI`` and a credentials Secret as ``envFrom``
(:func:`tracking_env`).

Jobs fail fast on exit code 64 (a configuration error, ``lmforge_jobs.spec.EXIT_CONFIG_ERROR``), ignore
disruptions (preemption, node drain) in their retry budget, replace a pod only once it has fully terminated
(so a rank never runs twice), give a training rank 10 minutes to write its final checkpoint, and keep no TTL
(the finished Job stays readable for status). With ``spec.queue`` the Job carries Kueue's
``kueue.x-k8s.io/queue-name`` label and is created suspended: Kueue admits it.

With ``spec.scheduling.gang`` (volcano, coscheduling) a **PodGroup** named as the Job, minMember = its pods
running at once, comes before the Job, whose pods join it (:func:`build_pod_group`). Last, the operator's
default pod template of the kind, ``spec.template`` and a Corpus stage's ``spec.stages.<stage>.template``
are merged into the pods (:func:`pod_template`, :mod:`lmforge_operator.podtemplate`: strategic merge,
refusals naming the field); a stage's ``resources`` replace the fields of ``spec.resources`` they set.
GPUs are asked for as ``nvidia.com/gpu``, or as ``resources.gpuResource`` (a MIG profile such as
``nvidia.com/mig-1g.10gb``) in its place, the count unchanged (:func:`gpu_resource`). :func:`refusals` lists
what the operator would refuse in a resource, without a cluster (``lmforge validate``).

A problem found while building (an unusable ``pvc://`` URI, two Secret references that would share an
environment variable) raises :class:`BuildError` with the spec field; the handlers report it as the
Invalid condition.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as _field
from typing import TYPE_CHECKING, Any

import yaml

from lmforge_jobs.kinds import KINDS, PARENT_LABELS, SWEEP_LABEL
from lmforge_jobs.manifest import Resource, load_yaml_documents
from lmforge_jobs.secrets import secret_env_name
from lmforge_jobs.spec import EXIT_CONFIG_ERROR, EXIT_STOPPED, GROUP_VERSION, FieldError, Storage
from lmforge_jobs.telemetry import DEFAULT_PORT, TERMINATION_LOG

if TYPE_CHECKING:
    from lmforge_jobs.data.stages import Stage

# ------------------------------------------------------------------------------------------------ constants
IMAGE_ENV = "LMFORGE_JOBS_IMAGE"
IMAGE_REPOSITORY = "ghcr.io/lmforge/lmforge-jobs"

SPEC_DIR = "/etc/lmforge"
SPEC_FILE = "spec.yaml"
MANIFEST_PATH = f"{SPEC_DIR}/{SPEC_FILE}"
PVC_ROOT = "/mnt/lmforge/pvc"
TMP_DIR = "/tmp"

CONTAINER = "main"
METRICS_PORT = DEFAULT_PORT  # 9400: the chart's PodMonitor scrapes the port named "metrics"
RDZV_PORT = 29400
RUN_AS = 10001

# The operator pod's labels (the chart's selector labels, less the release-specific instance label): the
# peer allowed to scrape a training resource's pods when its NetworkPolicy does not name another.
OPERATOR_LABELS = {"app.kubernetes.io/name": "lmforge", "app.kubernetes.io/component": "operator"}
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace by the API server (1.21+)

GPU_RESOURCE = "nvidia.com/gpu"
# A MIG device under the NVIDIA device plugin's mixed strategy: nvidia.com/mig-<compute slices>g.<memory>gb.
MIG_PREFIX = "nvidia.com/mig-"
MIG_PROFILE = re.compile(r"^nvidia\.com/mig-[1-7]g\.[1-9][0-9]*gb$")
# Object storage (lmforge_jobs.storage reads LMFORGE_S3_ENDPOINT first; botocore reads AWS_*; google-auth
# reads GOOGLE_APPLICATION_CREDENTIALS).
S3_ENDPOINT_ENV = "LMFORGE_S3_ENDPOINT"
REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")
GCS_CREDENTIALS_ENV = "GOOGLE_APPLICATION_CREDENTIALS"
GCS_VOLUME = "gcs-credentials"
GCS_DIR = "/var/run/secrets/lmforge-storage/gcs"
GCS_FILE = "credentials.json"
# Experiment tracking (lmforge_jobs.tracking): the chart's tracking.mlflow values reach the operator as the
# first two variables; the job pods get the server as MLFLOW_TRACKING_URI and the credentials Secret's keys
# (MLFLOW_TRACKING_USERNAME and _PASSWORD, or _TOKEN) through envFrom.
TRACKING_URI_SETTING = "LMFORGE_TRACKING_MLFLOW_URI"
TRACKING_SECRET_SETTING = "LMFORGE_TRACKING_MLFLOW_CREDENTIALS_SECRET"
MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

# Gang scheduling (spec.scheduling.gang): the PodGroup of each Job, and how its pods join it.
VOLCANO_API = "scheduling.volcano.sh/v1beta1"
VOLCANO_SCHEDULER = "volcano"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
COSCHEDULING_API = "scheduling.x-k8s.io/v1alpha1"
COSCHEDULING_SCHEDULER = "scheduler-plugins-scheduler"  # the scheduler-plugins chart's default name
COSCHEDULING_GROUP_LABEL = "scheduling.x-k8s.io/pod-group"
DEFAULT_SCHEDULER = "default-scheduler"

# Retry budgets. Training: pod failures across all nodes before the Job fails (disruptions do not count);
# torchrun re-forms the group around a replaced pod up to TORCHRUN_MAX_RESTARTS times. Corpus: retries of
# each datatrove rank, and ranks allowed to fail for good (0: a lost rank would silently drop data).
TRAINING_BACKOFF_LIMIT = 3
TORCHRUN_MAX_RESTARTS = 3
CORPUS_BACKOFF_LIMIT_PER_INDEX = 3
CORPUS_MAX_FAILED_INDEXES = 0

# What torchrun keeps of the pod's grace period (KINDS[kind].grace_seconds) for itself after its workers.
SHUTDOWN_MARGIN_SECONDS = 20

# Labels and annotations (lmforge.io/...).
LABEL_KIND = "lmforge.io/kind"
LABEL_NAME = "lmforge.io/name"
LABEL_STAGE = "lmforge.io/stage"
# metadata.generation of the resource the child was built from
ANNOTATION_GENERATION = "lmforge.io/generation"
ANNOTATION_RUN = "lmforge.io/run"  # the ``round`` argument of build_job: which run of the step
ANNOTATION_SPEC_HASH = "lmforge.io/spec-hash"

# spec.template is merged into the pods as it is: no pvc:// rewriting, no Secret variables made from it.
TEMPLATE_PATH: list[str | int] = ["spec", "template"]

DNS_LABEL_MAX = 63
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class BuildError(FieldError, ValueError):
    """The resource cannot be turned into Kubernetes objects; ``field`` is the path under spec (``output``)."""


# ----------------------------------------------------------------------------------------------- naming
def _digest(*parts: str, length: int = 8) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:length]


def child_name(name: str, suffix: str, max_length: int = DNS_LABEL_MAX) -> str:
    """``<name>-<suffix>``, made a valid DNS-1123 label of at most ``max_length`` characters.

    Deterministic: the same inputs give the same name, so a restarted operator finds its children. Too long
    a name is cut and keeps a hash of the full one, so two long names never collide.
    """

    def clean(text: str) -> str:
        return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")

    base, tail = clean(name), clean(suffix)
    full = f"{base}-{tail}" if tail else base
    if not full:
        raise ValueError(f"no DNS label can be made from {name!r} and {suffix!r}")
    if not full[0].isalpha():
        full = f"x{full}"
    if len(full) <= max_length:
        return full
    digest = _digest(name, suffix, length=8)
    keep = max_length - len(digest) - 1
    if keep < 1:
        raise ValueError(f"max_length {max_length} is too short for a child name")
    return f"{full[:keep].rstrip('-')}-{digest}"


def configmap_name(resource: Resource[Any, Any], round: int = 0) -> str:
    """Name of the resource's spec ConfigMap: ``<name>-<component>-spec`` (kinds may share names), with
    ``-<round>`` for a re-run (n > 0): each run of a step mounts the spec it was resolved with."""
    tail = f"{KINDS[resource.kind].component}-spec"
    return child_name(resource.name, f"{tail}-{round}" if round else tail)


def service_name(resource: Resource[Any, Any]) -> str:
    """Name of the resource's headless Service, the pods' DNS subdomain: ``<name>-<component>``."""
    return child_name(resource.name, KINDS[resource.kind].component)


def job_name(
    resource: Resource[Any, Any],
    stage: Stage | None = None,
    round: int = 0,
) -> str:
    """Name of a Job: ``<name>-<suffix>`` where suffix is the Corpus stage or the kind's component
    (``pretrain``, ``align``, ``evaluate``), and ``-<round>`` is appended when round > 0.

    Short enough that every pod hostname ``<job>-<index>`` is a DNS label, as Indexed Jobs need.
    """
    tail = stage.name if stage is not None else KINDS[resource.kind].component
    if round:
        tail = f"{tail}-{round}"
    index_digits = len(str(max(0, _completions(resource, stage) - 1)))
    return child_name(resource.name, tail, max_length=DNS_LABEL_MAX - 1 - index_digits)


# ----------------------------------------------------------------------------------------------- labels
def labels(resource: Resource[Any, Any], stage: Stage | None = None) -> dict[str, str]:
    """The labels every child of ``resource`` carries (the chart's PodMonitor selects on part-of); a trial
    of a Sweep or a point of a ScalingStudy passes its parent's label on (the PodMonitor turns it into the
    ``lmforge_sweep`` / ``lmforge_study`` label of its series)."""
    parents = {k: v for k, v in resource.metadata.labels.items() if k in PARENT_LABELS}
    out = {
        **parents,
        "app.kubernetes.io/name": "lmforge",
        "app.kubernetes.io/part-of": "lmforge",
        "app.kubernetes.io/managed-by": "lmforge-operator",
        "app.kubernetes.io/component": KINDS[resource.kind].component,
        LABEL_KIND: resource.kind,
        LABEL_NAME: resource.name,
    }
    if stage is not None:
        out[LABEL_STAGE] = stage.name
    return out


def selector(resource: Resource[Any, Any]) -> dict[str, str]:
    """Labels selecting every pod of ``resource`` (the Service's selector)."""
    return {"app.kubernetes.io/part-of": "lmforge", LABEL_KIND: resource.kind, LABEL_NAME: resource.name}


def _metadata(
    resource: Resource[Any, Any], name: str, owner: dict[str, Any] | None, stage: Stage | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if resource.metadata.namespace:
        meta["namespace"] = resource.metadata.namespace
    meta["labels"] = labels(resource, stage)
    meta["annotations"] = {ANNOTATION_GENERATION: str(resource.metadata.generation or 0)}
    if owner:
        meta["ownerReferences"] = [owner]
    return meta


def owner_reference(body: Mapping[str, Any]) -> dict[str, Any]:
    """The ownerReference that makes a child go away with ``body`` (kopf's body, or any object dict).

    ``controller: true`` marks the operator's object as the managing controller; ``blockOwnerDeletion``
    makes foreground deletion (``kubectl delete --cascade=foreground``) wait until the children, Jobs and
    their pods included, are gone, so a re-created resource of the same name never meets its predecessor's
    pods. Under the OwnerReferencesPermissionEnforcement admission plugin setting the flag needs ``update``
    on the owner's ``<plural>/finalizers``, which :mod:`lmforge_operator.rbac` grants (and nothing else).
    """
    meta = body.get("metadata") or {}
    missing = [k for k in ("name", "uid") if not meta.get(k)] + [
        k for k in ("apiVersion", "kind") if not body.get(k)
    ]
    if missing:
        raise ValueError(f"cannot reference an owner without {', '.join(missing)}")
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def default_image() -> str:
    """The jobs image: ``$LMFORGE_JOBS_IMAGE`` (the chart sets it), else
    ghcr.io/lmforge/lmforge-jobs:<package version>."""
    configured = os.environ.get(IMAGE_ENV)
    if configured:
        return configured
    try:
        from importlib.metadata import version

        tag = version("lmforge")
    except Exception:  # not installed as a distribution (source checkout)
        tag = "latest"
    return f"{IMAGE_REPOSITORY}:{tag}"


def image_for(resource: Resource[Any, Any], default: str | None = None) -> str:
    """``spec.image`` when set, else ``default`` (else :func:`default_image`)."""
    return getattr(resource.spec, "image", None) or default or default_image()


# ------------------------------------------------------------------------------------- storage and specs
def _path(parts: list[str | int]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _volume_name(claim: str) -> str:
    name = f"pvc-{claim}"
    if len(name) <= DNS_LABEL_MAX and "." not in claim:
        return name
    return child_name("pvc", _digest(claim, length=12))


def localize(
    resolved_doc: Mapping[str, Any],
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Rewrite every ``pvc://CLAIM/path`` URI in the spec to ``/mnt/lmforge/pvc/CLAIM/path``.

    Returns ``(doc, volumes, mounts)``: a rewritten copy of ``resolved_doc``, one PersistentVolumeClaim
    volume per claim and its mount (read-write for the claim holding ``spec.output``, read-only for claims
    that are only read). Other URIs (local paths, s3://, gs://, hf://) are left as they are. Raises
    BuildError naming the field of a pvc:// URI without a valid claim name.
    """
    doc = copy.deepcopy(dict(resolved_doc))
    claims: dict[str, bool] = {}  # claim -> written to

    def visit(node: Any, path: list[str | int]) -> Any:
        if isinstance(node, dict):
            # regular-expression patterns are not URIs, whatever they look like; the pod template is
            # Kubernetes' (its volumes are its own), not the job's
            return {
                k: v if k == "pattern" or [*path, k] == TEMPLATE_PATH else visit(v, [*path, k])
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [visit(v, [*path, i]) for i, v in enumerate(node)]
        if isinstance(node, str) and node.startswith("pvc://"):
            claim, _, rest = node[len("pvc://") :].partition("/")
            if len(claim) > 253 or not _DNS_SUBDOMAIN.match(claim):
                raise BuildError(
                    _path(path).removeprefix("spec."),
                    f"{node!r}: pvc:// needs a PersistentVolumeClaim name (lowercase letters, digits, '-', "
                    "'.'), as in pvc://CLAIM/path",
                )
            written = path == ["spec", "output"]
            claims[claim] = claims.get(claim, False) or written
            rest = rest.strip("/")
            return f"{PVC_ROOT}/{claim}" + (f"/{rest}" if rest else "")
        return node

    if "spec" in doc:  # only the spec holds URIs the job opens (status outputs are not mounted)
        doc["spec"] = visit(doc["spec"], ["spec"])
    else:
        doc = visit(doc, [])
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    for claim in sorted(claims):
        name = _volume_name(claim)
        read_only = not claims[claim]
        volume: dict[str, Any] = {"name": name, "persistentVolumeClaim": {"claimName": claim}}
        mount: dict[str, Any] = {"name": name, "mountPath": f"{PVC_ROOT}/{claim}"}
        if read_only:
            volume["persistentVolumeClaim"]["readOnly"] = True
            mount["readOnly"] = True
        volumes.append(volume)
        mounts.append(mount)
    return doc, volumes, mounts


def secret_refs(doc: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(field, secret name, key)`` of every ``{secretKeyRef: {name, key}}`` in a manifest dict, in order."""
    found: list[tuple[str, str, str]] = []

    def visit(node: Any, path: list[str | int]) -> None:
        if path == TEMPLATE_PATH:
            return  # the pod template's own env entries reach the pod as written
        if isinstance(node, dict):
            ref = node.get("secretKeyRef")
            if isinstance(ref, dict) and "name" in ref and "key" in ref:
                found.append((_path(path), str(ref["name"]), str(ref["key"])))
                return
            for k, v in node.items():
                visit(v, [*path, k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                visit(v, [*path, i])

    visit(doc, [])
    return found


def secret_env(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One ``secretKeyRef`` environment variable per Secret key the manifest references (see
    :func:`lmforge_jobs.secrets.secret_env_name`); the kubelet resolves them, the operator never reads
    Secrets. Raises BuildError if two different keys would share a variable name."""
    env: list[dict[str, Any]] = []
    owners: dict[str, tuple[str, str, str]] = {}
    for field, name, key in secret_refs(doc):
        if field == "spec.storage" or field.startswith("spec.storage."):
            continue  # mounted as a file by storage_env, not an environment variable
        var = secret_env_name(name, key)
        if var in owners:
            if owners[var][1:] != (name, key):
                raise BuildError(
                    field.removeprefix("spec."),
                    f"Secret {name!r} key {key!r} and Secret {owners[var][1]!r} key {owners[var][2]!r} (at "
                    f"{owners[var][0]}) would both be ${var}; rename one",
                )
            continue
        owners[var] = (field, name, key)
        env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}})
    return env


@dataclass(frozen=True)
class StorageEnv:
    """What a pod gets for object storage: ``env`` entries, ``envFrom`` sources, volumes and mounts."""

    env: list[dict[str, Any]] = _field(default_factory=list)
    env_from: list[dict[str, Any]] = _field(default_factory=list)
    volumes: list[dict[str, Any]] = _field(default_factory=list)
    mounts: list[dict[str, Any]] = _field(default_factory=list)


def effective_storage(resource: Resource[Any, Any], default: Storage | None = None) -> Storage | None:
    """``spec.storage`` when the resource has one, else ``default`` (the operator's): a spec's section
    replaces the defaults as a whole, so a resource can also leave an endpoint the defaults set (AWS S3)."""
    return getattr(resource.spec, "storage", None) or default


def storage_env(storage: Storage | None) -> StorageEnv:
    """The pod side of a storage section. ``endpoint``: ``LMFORGE_S3_ENDPOINT`` (read by the jobs' storage
    layer before ``AWS_ENDPOINT_URL*``); ``region``: ``AWS_REGION`` and ``AWS_DEFAULT_REGION``;
    ``credentials``: the Secret as ``envFrom`` (its keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY[,
    AWS_SESSION_TOKEN] become variables; the kubelet resolves it, the operator never reads Secrets);
    ``gcsCredentials``: the Secret key as a file in a read-only volume, ``GOOGLE_APPLICATION_CREDENTIALS``
    naming it. Nothing at all for no storage section (the pod's own identity: IRSA, workload identity)."""
    out = StorageEnv()
    if storage is None:
        return out
    if storage.endpoint:
        out.env.append({"name": S3_ENDPOINT_ENV, "value": literal(storage.endpoint)})
    if storage.region:
        out.env.extend({"name": name, "value": literal(storage.region)} for name in REGION_ENV)
    if storage.credentials is not None:
        out.env_from.append({"secretRef": {"name": storage.credentials.secret_name}})
    if storage.gcs_credentials is not None:
        ref = storage.gcs_credentials.secret_key_ref
        out.volumes.append(
            {
                "name": GCS_VOLUME,
                "secret": {
                    "secretName": ref.name,
                    "items": [{"key": ref.key, "path": GCS_FILE}],
                    "defaultMode": 0o440,  # the pod's fsGroup reads it, nobody writes it
                },
            }
        )
        out.mounts.append({"name": GCS_VOLUME, "mountPath": GCS_DIR, "readOnly": True})
        out.env.append({"name": GCS_CREDENTIALS_ENV, "value": f"{GCS_DIR}/{GCS_FILE}"})
    return out


@dataclass(frozen=True)
class Tracking:
    """The operator's experiment-tracking defaults for every job pod (the chart's ``tracking.mlflow``)."""

    mlflow_uri: str | None = None
    """MLflow server of the job pods (their MLFLOW_TRACKING_URI)."""
    credentials_secret: str | None = None
    """A Secret in the resource's namespace whose keys become the pods' environment (envFrom)."""

    @classmethod
    def from_env(cls) -> Tracking:
        """``$LMFORGE_TRACKING_MLFLOW_URI`` and ``$LMFORGE_TRACKING_MLFLOW_CREDENTIALS_SECRET`` (the chart
        sets them on the operator's container); unset or empty: none."""
        return cls(
            os.environ.get(TRACKING_URI_SETTING, "").strip() or None,
            os.environ.get(TRACKING_SECRET_SETTING, "").strip() or None,
        )


def tracking_env(tracking: Tracking) -> StorageEnv:
    """The pod side of the tracking defaults: ``MLFLOW_TRACKING_URI`` and the credentials Secret as
    ``envFrom`` (the kubelet resolves it; the operator never reads Secrets). Whether a job logs is its own
    decision (``spec.tracking.mlflow``), so every pod gets them."""
    out = StorageEnv()
    if tracking.mlflow_uri:
        out.env.append({"name": MLFLOW_URI_ENV, "value": literal(tracking.mlflow_uri)})
        if tracking.credentials_secret:
            out.env_from.append({"secretRef": {"name": tracking.credentials_secret}})
    return out


class _SpecDumper(yaml.SafeDumper):
    """Quotes every string the manifest loader (YAML 1.2 numbers) would not read back unchanged, so a spec
    string such as ``1e5`` or ``yes`` stays a string in the job."""


# Plain scalars YAML reads back as the same string without a parse: they start with a letter or digit, hold
# only these characters, include a "/" (no bool, null, number or timestamp does) and do not end in ":".
_PLAIN_PATH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:-]*")


@functools.lru_cache(maxsize=65536)
def _needs_quotes(value: str) -> bool:
    """Whether ``value`` (one line) would not read back as itself unquoted; a pure function, so cached (the
    same keys and values recur in every manifest)."""
    if "/" in value and not value.endswith(":") and _PLAIN_PATH.fullmatch(value):
        return False
    try:
        return load_yaml_documents(value) != [value]
    except yaml.YAMLError:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if "\n" not in value and _needs_quotes(value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_SpecDumper.add_representer(str, _represent_str)


def dump_spec(doc: Mapping[str, Any]) -> str:
    """YAML text of a manifest dict; :func:`lmforge_jobs.manifest.load_yaml_documents` reads it back equal."""
    return yaml.dump(dict(doc), Dumper=_SpecDumper, sort_keys=False, allow_unicode=True, width=1 << 16)


def job_manifest(resolved_doc: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest a job reads: apiVersion, kind, name (and namespace), spec; pvc:// URIs localised."""
    meta = resolved_doc.get("metadata") or {}
    doc: dict[str, Any] = {
        "apiVersion": resolved_doc.get("apiVersion", GROUP_VERSION),
        "kind": resolved_doc["kind"],
        "metadata": {k: meta[k] for k in ("name", "namespace") if meta.get(k)},
        "spec": resolved_doc.get("spec") or {},
    }
    sweep = (meta.get("labels") or {}).get(SWEEP_LABEL)
    if sweep:  # a trial's tracking groups it under its sweep
        doc["metadata"]["labels"] = {SWEEP_LABEL: sweep}
    return localize(doc)[0]


# ----------------------------------------------------------------------------------------------- objects
def build_configmap(
    resource: Resource[Any, Any],
    resolved_doc: Mapping[str, Any],
    owner: dict[str, Any] | None,
    round: int = 0,
) -> dict[str, Any]:
    """ConfigMap ``<name>-<component>-spec[-<round>]`` holding ``spec.yaml``: the resolved, localised
    manifest the job reads (``lmforge.io/spec-hash`` annotation: a digest of that text)."""
    text = dump_spec(job_manifest(resolved_doc))
    meta = _metadata(resource, configmap_name(resource, round), owner)
    if round:
        meta["annotations"][ANNOTATION_RUN] = str(round)
    meta["annotations"][ANNOTATION_SPEC_HASH] = _digest(text, length=16)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {SPEC_FILE: text}}


def build_service(resource: Resource[Any, Any], owner: dict[str, Any] | None) -> dict[str, Any]:
    """Headless Service ``<name>-<component>``: DNS records ``<job>-<index>.<service>`` for every pod of
    the resource, published before the pods are ready (the rendezvous happens before any readiness)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(resource, service_name(resource), owner),
        "spec": {
            "clusterIP": "None",
            "selector": selector(resource),
            "publishNotReadyAddresses": True,
            "ports": [
                {"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT, "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT, "protocol": "TCP"},
            ],
        },
    }


@dataclass(frozen=True)
class Isolation:
    """Who may reach a training resource's pods besides the pods themselves (:func:`build_network_policy`).

    ``operator_namespace``: the operator's namespace (None: the operator's pods in any namespace);
    ``operator_labels``: labels selecting the operator's pods; ``metrics_from``: further NetworkPolicyPeers
    allowed to scrape the metrics port (e.g. Prometheus, when the chart's PodMonitor scrapes job pods).
    """

    operator_namespace: str | None = None
    operator_labels: Mapping[str, str] = _field(default_factory=lambda: dict(OPERATOR_LABELS))
    metrics_from: Sequence[Mapping[str, Any]] = ()

    def operator_peer(self) -> dict[str, Any]:
        namespaces = (
            {"matchLabels": {NAMESPACE_NAME_LABEL: self.operator_namespace}}
            if self.operator_namespace
            else {}
        )
        return {"namespaceSelector": namespaces, "podSelector": {"matchLabels": dict(self.operator_labels)}}


DEFAULT_ISOLATION = Isolation()


def build_network_policy(
    resource: Resource[Any, Any], owner: dict[str, Any] | None, isolation: Isolation | None = None
) -> dict[str, Any]:
    """NetworkPolicy ``<name>-<component>`` isolating the pods of a torchrun resource: ingress only from
    the resource's own pods (every port: rendezvous on 29400, where torch's c10d store unpickles what it
    reads, and the ranks' NCCL/Gloo connections on ports torch picks) and from the operator's pods (and
    ``isolation.metrics_from``) to the metrics port. Egress is left alone (policyTypes is Ingress only):
    the pods reach the object store (``spec.storage.endpoint``, AWS S3, GCS), hubs and DNS as the
    namespace's other policies allow."""
    isolation = isolation or Isolation()
    own = {"podSelector": {"matchLabels": selector(resource)}}
    metrics_port = {"port": METRICS_PORT, "protocol": "TCP"}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(resource, service_name(resource), owner),
        "spec": {
            "podSelector": {"matchLabels": selector(resource)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [own]},
                {
                    "from": [isolation.operator_peer(), *(dict(p) for p in isolation.metrics_from)],
                    "ports": [metrics_port],
                },
            ],
        },
    }


def _parallelism(resource: Resource[Any, Any]) -> tuple[int, int]:
    """(nodes, GPUs per node) of a torchrun kind."""
    p = resource.spec.parallelism
    return p.nodes, p.gpus_per_node


def uses_torchrun(resource: Resource[Any, Any]) -> bool:
    """Distributed kinds (training) always; an Evaluation when it spans more than one process."""
    if KINDS[resource.kind].distributed:
        return True
    if resource.kind == "Evaluation":
        nodes, gpus = _parallelism(resource)
        return nodes > 1 or gpus > 1
    return False


def needs_service(resource: Resource[Any, Any]) -> bool:
    """Whether the resource's pods need the headless Service (torchrun rendezvous)."""
    return uses_torchrun(resource)


def _completions(resource: Resource[Any, Any], stage: Stage | None) -> int:
    if resource.kind == "Corpus":
        return stage.tasks if stage is not None else resource.spec.parallelism.tasks
    if KINDS[resource.kind].distributed or resource.kind == "Evaluation":
        return _parallelism(resource)[0]
    return 1


def shutdown_timeout(kind: str) -> int:
    """Seconds torchrun lets its workers finish after SIGTERM: the pod's grace period less a margin for
    torchrun itself to exit before the kubelet's SIGKILL."""
    grace = KINDS[kind].grace_seconds
    return max(grace // 2, grace - SHUTDOWN_MARGIN_SECONDS)


def stage_settings(resource: Resource[Any, Any], stage: Stage | None) -> Any:
    """``spec.stages.<stage>`` of a Corpus (None when unset, or for other kinds)."""
    if stage is None or resource.kind != "Corpus":
        return None
    return (resource.spec.stages or {}).get(stage.name)


def effective_resources(resource: Resource[Any, Any], stage: Stage | None = None) -> Any:
    """``spec.resources``, with the fields ``spec.stages.<stage>.resources`` sets replacing its own."""
    base = resource.spec.resources
    settings = stage_settings(resource, stage)
    if settings is None or settings.resources is None:
        return base
    return base.model_copy(update=settings.resources.model_dump(exclude_none=True))


def gpus_per_pod(resource: Resource[Any, Any], stage: Stage | None = None) -> int:
    """GPUs of each pod: spec.resources.gpu (a Corpus stage's own first), else parallelism.gpusPerNode (0
    for a Corpus)."""
    spec = effective_resources(resource, stage)
    if spec.gpu is not None:
        return int(spec.gpu)
    if resource.kind == "Corpus":
        return 0
    return _parallelism(resource)[1]


def gpu_resource(resource: Resource[Any, Any], stage: Stage | None = None) -> str:
    """The resource name the GPUs are asked for as: ``resources.gpuResource`` (e.g. a MIG profile), else
    nvidia.com/gpu. Raises BuildError for a name no device plugin serves that way: a malformed MIG profile,
    more than one MIG device per pod (a CUDA process uses one MIG device, and torchrun's workers would all
    land on the first), or a name given without any GPU asked for."""
    spec = effective_resources(resource, stage)
    name = spec.gpu_resource
    if name is None:
        return GPU_RESOURCE
    settings = stage_settings(resource, stage)
    own = settings is not None and settings.resources is not None and settings.resources.gpu_resource
    field = (
        f"stages.{stage.name}.resources.gpuResource" if own and stage is not None else "resources.gpuResource"
    )
    domain = name.split("/", 1)[0]
    if domain == "kubernetes.io" or domain.endswith(".kubernetes.io"):
        raise BuildError(field, f"{name!r} is not a device plugin's resource (kubernetes.io is reserved)")
    if name.startswith(MIG_PREFIX) and not MIG_PROFILE.match(name):
        raise BuildError(
            field,
            f"{name!r} is not a MIG profile: nvidia.com/mig-<slices>g.<memory>gb, e.g. nvidia.com/mig-1g.10gb",
        )
    gpus = gpus_per_pod(resource, stage)
    if gpus == 0:
        raise BuildError(field, f"names the GPUs' resource ({name}) but the pods ask for no GPU")
    if name.startswith(MIG_PREFIX) and gpus > 1:
        raise BuildError(
            field,
            f"{gpus} MIG devices per pod: a CUDA process uses one MIG device, so torchrun's {gpus} workers "
            "would share the first; ask for one per pod (parallelism.gpusPerNode: 1) and scale with nodes",
        )
    return name


def command(resource: Resource[Any, Any], job: str, stage: Stage | None = None) -> list[str]:
    """The container's argument list (never a shell string; no spec value appears in it)."""
    module = KINDS[resource.kind].module
    tail = ["-m", module, "--manifest", MANIFEST_PATH]
    if resource.kind == "Corpus":
        if stage is None:
            raise ValueError("a Corpus Job is built per stage: pass stage=")
        return ["python", *tail, "--stage", stage.name]
    if uses_torchrun(resource):
        nodes, gpus = _parallelism(resource)
        # lmforge_jobs.launch runs torchrun and keeps a worker's exit 64 as the pod's exit code (torchrun
        # would restart the worker and exit 1); torchrun waits the pod's grace period, not its own 30 s,
        # between forwarding SIGTERM to the workers and killing them.
        return [
            "python",
            "-m",
            "lmforge_jobs.launch",
            f"--nnodes={nodes}",
            f"--nproc-per-node={max(1, gpus)}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={job}-0.{service_name(resource)}:{RDZV_PORT}",
            f"--rdzv-id={job}",
            f"--max-restarts={TORCHRUN_MAX_RESTARTS}",
            f"--shutdown-timeout={shutdown_timeout(resource.kind)}",
            *tail,
        ]
    return ["python", *tail]


def _resources(resource: Resource[Any, Any], stage: Stage | None = None) -> dict[str, Any]:
    spec = effective_resources(resource, stage)
    amounts: dict[str, str] = {}
    if spec.cpu is not None:
        amounts["cpu"] = str(spec.cpu)
    if spec.memory is not None:
        amounts["memory"] = str(spec.memory)
    if spec.ephemeral_storage is not None:
        amounts["ephemeral-storage"] = str(spec.ephemeral_storage)
    gpus = gpus_per_pod(resource, stage)
    if gpus:
        # a MIG profile (resources.gpuResource) replaces nvidia.com/gpu: the pod asks for one or the other
        amounts[gpu_resource(resource, stage)] = str(gpus)
    elif spec.gpu_resource is not None and resource.kind != "Corpus":
        # a GPU resource named with no GPU asked for (a Corpus may name it for the stages that ask)
        gpu_resource(resource, stage)
    # requests = limits: Guaranteed QoS when cpu and memory are given, and GPUs must be equal anyway
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def literal(value: str) -> str:
    """``value`` as a Kubernetes env value or argument that stays verbatim: ``$`` doubled, so the kubelet's
    ``$(VAR)`` expansion leaves it alone."""
    return value.replace("$", "$$")


def _env(resource: Resource[Any, Any], doc: Mapping[str, Any], stage: Stage | None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "LMFORGE_KIND", "value": resource.kind},
        {"name": "LMFORGE_NAME", "value": resource.name},
        {"name": "LMFORGE_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "LMFORGE_METRICS_PORT", "value": str(METRICS_PORT)},
        {"name": "LMFORGE_TERMINATION_LOG", "value": TERMINATION_LOG},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HOME", "value": TMP_DIR},
    ]
    if stage is not None:
        env.append({"name": "LMFORGE_STAGE", "value": stage.name})
    if uses_torchrun(resource):
        # torchrun reads --node-rank from PET_NODE_RANK; the Job controller sets the completion index
        env.append(
            {
                "name": "PET_NODE_RANK",
                "valueFrom": {
                    "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
                },
            }
        )
    env.extend(secret_env(doc))
    return env


def _pod_failure_policy() -> dict[str, Any]:
    return {
        "rules": [
            # preemption, eviction, node drain: not the job's fault, not counted against backoffLimit
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            # a rank stopped by SIGTERM saved a checkpoint and exits 143 (not success): replace the pod, do
            # not count it, and the run resumes — also when no DisruptionTarget condition was set (a node
            # shut down, a pod deleted by hand)
            {
                "action": "Ignore",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_STOPPED]},
            },
            # a configuration error fails the same way on every retry: fail the Job at once
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_CONFIG_ERROR]},
            },
        ]
    }


def _security_context() -> tuple[dict[str, Any], dict[str, Any]]:
    pod = {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return pod, container


def gang(resource: Resource[Any, Any]) -> str:
    """``spec.scheduling.gang``: none, volcano or coscheduling."""
    scheduling = getattr(resource.spec, "scheduling", None)
    return scheduling.gang.value if scheduling is not None else "none"


def spec_template(resource: Resource[Any, Any]) -> dict[str, Any] | None:
    """``spec.template`` as a camelCase dict (None when unset)."""
    template = getattr(resource.spec, "template", None)
    return template.to_yaml_dict() if template is not None else None


def stage_template(resource: Resource[Any, Any], stage: Stage | None) -> dict[str, Any] | None:
    """``spec.stages.<stage>.template`` of a Corpus as a camelCase dict (None when unset)."""
    settings = stage_settings(resource, stage)
    template = settings.template if settings is not None else None
    return template.to_yaml_dict() if template is not None else None


def template_layers(
    resource: Resource[Any, Any],
    stage: Stage | None = None,
    template_defaults: Mapping[str, Any] | None = None,
) -> list[tuple[str, Mapping[str, Any] | None]]:
    """The pod templates merged into a Job's pods, in order (later wins), each with the field it is named
    by in refusals: the operator's defaults, ``spec.template``, a Corpus stage's own template."""
    layers: list[tuple[str, Mapping[str, Any] | None]] = [
        ("operator podTemplate.defaults", template_defaults),
        ("template", spec_template(resource)),
    ]
    if stage is not None and resource.kind == "Corpus":
        layers.append((f"stages.{stage.name}.template", stage_template(resource, stage)))
    return layers


def _check_gang_scheduler(resource: Resource[Any, Any], layers: Sequence[tuple[str, Any]]) -> None:
    """With gang scheduling, a template may run the pods under another name of the gang scheduler (one
    installed under its own name), never under the default scheduler: it ignores PodGroups, so the pods
    would start one by one and a multi-node run could hold half its GPUs waiting for the rest."""
    how = gang(resource)
    if how == "none":
        return
    for where, template in layers:
        name = ((template or {}).get("spec") or {}).get("schedulerName")
        if name == DEFAULT_SCHEDULER:
            raise BuildError(
                f"{where}.spec.schedulerName",
                f"scheduling.gang is {how}: the default scheduler ignores PodGroups; leave schedulerName unset "
                f"({VOLCANO_SCHEDULER if how == 'volcano' else COSCHEDULING_SCHEDULER}) or name the gang "
                "scheduler",
            )


def _gang_template(resource: Resource[Any, Any], group: str) -> dict[str, Any] | None:
    """How a Job's pods join their PodGroup ``group``: the scheduler, and its label or annotation."""
    how = gang(resource)
    if how == "volcano":
        return {
            "metadata": {"annotations": {VOLCANO_GROUP_ANNOTATION: group}},
            "spec": {"schedulerName": VOLCANO_SCHEDULER},
        }
    if how == "coscheduling":
        return {
            "metadata": {"labels": {COSCHEDULING_GROUP_LABEL: group}},
            "spec": {"schedulerName": COSCHEDULING_SCHEDULER},
        }
    return None


def pod_template(
    resource: Resource[Any, Any],
    pod: Mapping[str, Any],
    job: str,
    *,
    stage: Stage | None = None,
    template_defaults: Mapping[str, Any] | None = None,
    allow_privileged: bool = False,
) -> dict[str, Any]:
    """The Job ``job``'s pod template: lmforge's ``pod``, then the gang-scheduling settings, the operator's
    defaults for the kind, ``spec.template`` and (a Corpus) ``spec.stages.<stage>.template`` merged in that
    order (later wins). Raises BuildError naming the field of a template that would break the Job, weaken
    Pod Security or take the pods from their gang scheduler."""
    from lmforge_operator import podtemplate

    out = dict(pod)
    gang_settings = _gang_template(resource, job)
    if gang_settings:
        out = podtemplate.merge_one(out, gang_settings)
    layers = template_layers(resource, stage, template_defaults)
    _check_gang_scheduler(resource, layers)
    return podtemplate.merge(out, layers, allow_privileged=allow_privileged)


def build_pod_group(
    resource: Resource[Any, Any],
    owner: dict[str, Any] | None,
    stage: Stage | None = None,
    round: int = 0,
) -> dict[str, Any] | None:
    """The PodGroup of a Job when ``spec.scheduling.gang`` is volcano or coscheduling (else None): named as
    the Job, owned by the resource (the garbage collector removes it with the resource), minMember = the
    pods the Job runs at once, so the scheduler binds none of them before it can bind all."""
    how = gang(resource)
    if how == "none":
        return None
    name = job_name(resource, stage, round)
    completions = _completions(resource, stage)
    members = (
        min(resource.spec.parallelism.workers, completions) if resource.kind == "Corpus" else completions
    )
    spec: dict[str, Any] = {"minMember": members}
    priority = None
    for _, template in template_layers(resource, stage)[1:]:
        priority = ((template or {}).get("spec") or {}).get("priorityClassName") or priority
    if how == "volcano" and priority:
        spec["priorityClassName"] = priority
    return {
        "apiVersion": VOLCANO_API if how == "volcano" else COSCHEDULING_API,
        "kind": "PodGroup",
        "metadata": _metadata(resource, name, owner, stage),
        "spec": spec,
    }


def _check_stage_names(resource: Resource[Any, Any]) -> None:
    """Every key of a Corpus' ``spec.stages`` names a stage this Corpus runs (a stage its spec does not
    enable would silently never get its settings)."""
    from lmforge_jobs.data.stages import stage_names

    runs = stage_names(resource.spec)
    for name in resource.spec.stages or {}:
        if name not in runs:
            raise BuildError(
                f"stages.{name}", f"this Corpus runs no {name} stage; its stages: {', '.join(runs)}"
            )


def build_job(
    resource: Resource[Any, Any],
    owner: dict[str, Any] | None,
    *,
    image: str,
    stage: Stage | None = None,
    round: int = 0,
    resolved_doc: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    service_account: str | None = None,
    storage: Storage | None = None,
    template_defaults: Mapping[str, Any] | None = None,
    allow_privileged: bool = False,
    tracking: Tracking | None = None,
) -> dict[str, Any]:
    """The batch/v1 Job running ``resource`` (a Corpus: its ``stage``).

    ``round`` numbers the runs of one step (an Evaluation's rounds: 0 is the first, n > 0 appends ``-n`` to
    the name). ``resolved_doc`` (the dict that goes into the ConfigMap) supplies the ``pvc://`` volumes and
    Secret references of resolved references; the resource's own spec is used when it is not given.
    ``env`` adds literal environment variables (their ``$`` escaped, so Kubernetes never expands ``$(VAR)``
    in them); ``service_account`` runs the pods under that ServiceAccount (e.g. for workload identity to
    object storage; its token is still not mounted).
    ``storage`` is the operator's default storage section, used when the spec has none
    (:func:`effective_storage`, :func:`storage_env`).
    ``template_defaults`` is the operator's default pod template of the kind (a PodTemplate dict, the chart's
    ``podTemplate.defaults``): merged into the pods first, then ``spec.template``
    (:mod:`lmforge_operator.podtemplate`; ``allow_privileged`` lets either weaken Pod Security), after the
    gang-scheduling settings of ``spec.scheduling`` (:func:`build_pod_group`).
    ``tracking``: the operator's experiment-tracking defaults (:func:`tracking_env`); None reads them from
    the operator's environment (:meth:`Tracking.from_env`, as the chart sets it).
    """
    if resource.kind == "Corpus" and stage is None:
        raise ValueError("a Corpus Job is built per stage: pass stage=")
    if resource.kind == "Corpus":
        _check_stage_names(resource)
    doc = (
        dict(resolved_doc)
        if resolved_doc is not None
        else resource.model_dump(by_alias=True, exclude_none=True, mode="json")
    )
    _, pvc_volumes, pvc_mounts = localize(doc)
    object_storage = storage_env(effective_storage(resource, storage))
    tracked = tracking_env(tracking if tracking is not None else Tracking.from_env())
    name = job_name(resource, stage, round)
    torchrun = uses_torchrun(resource)
    completions = _completions(resource, stage)
    if resource.kind == "Corpus":
        parallelism = min(resource.spec.parallelism.workers, completions)
    else:
        parallelism = completions

    argv = command(resource, name, stage)
    pod_security, container_security = _security_context()
    ports = [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}]
    if torchrun:
        ports.append({"name": "rdzv", "containerPort": RDZV_PORT, "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": argv[:1],
        "args": argv[1:],
        "env": [
            *_env(resource, doc, stage),
            *object_storage.env,
            *tracked.env,
            *({"name": k, "value": literal(v)} for k, v in (env or {}).items()),
        ],
        "ports": ports,
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": TMP_DIR},
            *pvc_mounts,
            *object_storage.mounts,
        ],
        "securityContext": container_security,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if object_storage.env_from or tracked.env_from:
        container["envFrom"] = [*object_storage.env_from, *tracked.env_from]
    requirements = _resources(resource, stage)
    if requirements:
        container["resources"] = requirements

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the Job replaces failed pods; required by podFailurePolicy
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": KINDS[resource.kind].grace_seconds,
        "securityContext": pod_security,
        "containers": [container],
        "volumes": [
            {
                "name": "spec",
                "configMap": {"name": configmap_name(resource, round), "defaultMode": 0o444},
            },
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            {"name": "tmp", "emptyDir": {}},
            *pvc_volumes,
            *object_storage.volumes,
        ],
    }
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    if torchrun:
        pod_spec["subdomain"] = service_name(resource)
    if gpus_per_pod(resource, stage):
        pod_spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]

    meta = _metadata(resource, name, owner, stage)
    if round:
        meta["annotations"][ANNOTATION_RUN] = str(round)
    queue = getattr(resource.spec, "queue", None)
    if queue:
        meta["labels"][QUEUE_LABEL] = queue

    template_meta = {"labels": labels(resource, stage), "annotations": dict(meta["annotations"])}
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": completions,
        "parallelism": parallelism,
        "podFailurePolicy": _pod_failure_policy(),
        "podReplacementPolicy": "Failed",
        "template": pod_template(
            resource,
            {"metadata": template_meta, "spec": pod_spec},
            name,
            stage=stage,
            template_defaults=template_defaults,
            allow_privileged=allow_privileged,
        ),
    }
    if resource.kind == "Corpus":
        job_spec["backoffLimitPerIndex"] = CORPUS_BACKOFF_LIMIT_PER_INDEX
        job_spec["maxFailedIndexes"] = CORPUS_MAX_FAILED_INDEXES
    else:
        job_spec["backoffLimit"] = TRAINING_BACKOFF_LIMIT
    if queue:
        job_spec["suspend"] = True  # Kueue admits (unsuspends) it when the queue has quota
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def refusals(
    resource: Resource[Any, Any],
    *,
    template_defaults: Mapping[str, Any] | None = None,
    allow_privileged: bool = False,
) -> list[BuildError]:
    """What the operator would refuse when building ``resource``'s Jobs (every stage of a Corpus), found by
    building them as it does, without a cluster: templates that break the Job or weaken Pod Security, a
    template taking the pods from their gang scheduler, a GPU resource no device plugin serves that way,
    stage settings for a stage the Corpus does not run. Empty for kinds that run no Job of their own
    (a Sweep). ``lmforge validate`` reports these."""
    if not KINDS[resource.kind].job:
        return []
    if resource.kind == "Corpus":
        from lmforge_jobs.data.stages import stages

        steps: list[Stage | None] = list(stages(resource.spec))
    else:
        steps = [None]
    found: list[BuildError] = []
    for stage in steps:
        try:
            build_job(
                resource,
                None,
                image="validate",
                stage=stage,
                template_defaults=template_defaults,
                allow_privileged=allow_privileged,
            )
        except BuildError as exc:
            if all((e.field, e.message) != (exc.field, exc.message) for e in found):
                found.append(exc)
    return found


def children(
    resource: Resource[Any, Any],
    resolved_doc: Mapping[str, Any],
    owner: dict[str, Any] | None,
    *,
    image: str,
    stage: Stage | None = None,
    round: int = 0,
    env: Mapping[str, str] | None = None,
    service_account: str | None = None,
    isolation: Isolation | None = DEFAULT_ISOLATION,
    storage: Storage | None = None,
    template_defaults: Mapping[str, Any] | None = None,
    allow_privileged: bool = False,
    tracking: Tracking | None = None,
) -> list[dict[str, Any]]:
    """Everything to create for the current step, in creation order: ConfigMap, then for torchrun kinds
    the Service and the NetworkPolicy (``isolation=None``: no NetworkPolicy, for clusters without
    NetworkPolicy support), then the PodGroup (gang scheduling), then the Job, so its pods never run
    unprotected or outside their group. A Corpus needs ``stage`` (the stage to run now). Other keyword
    arguments as in :func:`build_job`."""
    objects = [build_configmap(resource, resolved_doc, owner, round)]
    if needs_service(resource):
        objects.append(build_service(resource, owner))
        if isolation is not None:
            objects.append(build_network_policy(resource, owner, isolation))
    group = build_pod_group(resource, owner, stage, round)
    if group is not None:
        objects.append(group)
    objects.append(
        build_job(
            resource,
            owner,
            image=image,
            stage=stage,
            round=round,
            resolved_doc=resolved_doc,
            env=env,
            service_account=service_account,
            storage=storage,
            template_defaults=template_defaults,
            allow_privileged=allow_privileged,
            tracking=tracking,
        )
    )
    return objects


__all__ = [
    "DEFAULT_ISOLATION",
    "OPERATOR_LABELS",
    "BuildError",
    "Isolation",
    "StorageEnv",
    "Tracking",
    "build_configmap",
    "build_job",
    "build_network_policy",
    "build_pod_group",
    "build_service",
    "child_name",
    "children",
    "command",
    "configmap_name",
    "default_image",
    "dump_spec",
    "effective_resources",
    "effective_storage",
    "gang",
    "gpu_resource",
    "gpus_per_pod",
    "image_for",
    "job_manifest",
    "job_name",
    "labels",
    "literal",
    "localize",
    "needs_service",
    "owner_reference",
    "pod_template",
    "refusals",
    "secret_env",
    "secret_refs",
    "selector",
    "service_name",
    "spec_template",
    "stage_settings",
    "stage_template",
    "storage_env",
    "template_layers",
    "tracking_env",
    "uses_torchrun",
]
