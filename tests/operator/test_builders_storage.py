"""Object storage settings: the ``storage`` section every kind shares (pydantic, the CRD's schema, RE2),
what the builders give a job pod for it (endpoint and region variables, the credentials Secret as envFrom,
a gs:// key file as a read-only Secret volume), the operator's defaults from the chart's ``storage`` values,
and the pods and chart objects checked offline with kubernetes-validate (tests/k8s_validate.py)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from crdcheck import admission_errors
from helm import render_without_crds, schema_refusals
from k8s_validate import assert_valid, restricted_problems

from lmforge_jobs.manifest import parse_resource
from lmforge_jobs.spec import ENDPOINT_PATTERN, Storage, check_endpoint
from lmforge_operator import builders
from lmforge_operator.controller import Config

IMAGE = "registry.example/lmforge-jobs:1.2.3"
UID = "6f1c1d6e-0000-4000-8000-000000000002"

STORAGE = {
    "endpoint": "http://minio.storage.svc:9000",
    "region": "us-east-1",
    "credentials": {"secretName": "s3-credentials"},
    "gcsCredentials": {"secretKeyRef": {"name": "gcs", "key": "key.json"}},
}


def spec_of(kind: str) -> dict[str, Any]:
    """A small valid spec of each kind (outputs on object storage)."""
    return {
        "Corpus": {
            "sources": [{"jsonl": {"paths": ["s3://bucket/docs/*.jsonl.gz"]}}],
            "output": "s3://bucket/corpora/web",
            "parallelism": {"tasks": 2, "workers": 2},
        },
        "PretrainRun": {
            "data": {"tokens": "s3://bucket/tokens/train", "tokenizer": "s3://bucket/tokenizer"},
            "model": {"layers": 2, "hidden": 64, "heads": 4, "seqLen": 64, "vocabSize": 512},
            "budget": {"steps": 1000},
            "batch": {"globalTokens": 1024, "microBatchSize": 4},
            "parallelism": {"nodes": 2, "gpusPerNode": 2},
            "output": "s3://bucket/runs/gpt",
        },
        "AlignmentRun": {
            "base": {"path": "s3://bucket/runs/gpt/model"},
            "method": "sft",
            "dataset": {"path": "gs://bucket/sft.jsonl", "format": "messages"},
            "output": "gs://bucket/runs/sft",
        },
        "Evaluation": {
            "model": {"path": "s3://bucket/runs/gpt/model"},
            "perplexity": {"data": "s3://bucket/tokens/held-out"},
            "output": "s3://bucket/evals/gpt",
        },
    }[kind]


KINDS = ("Corpus", "PretrainRun", "AlignmentRun", "Evaluation")


def doc_of(kind: str, storage: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = spec_of(kind)
    if storage is not None:
        spec["storage"] = copy.deepcopy(storage)
    return {"apiVersion": "lmforge.io/v1alpha1", "kind": kind, "metadata": {"name": "res"}, "spec": spec}


def parse(doc: dict[str, Any]) -> tuple[Any, list[Any]]:
    return parse_resource(copy.deepcopy(doc))


def job_of(doc: dict[str, Any], default: Storage | None = None) -> dict[str, Any]:
    res, problems = parse(doc)
    assert not problems, problems
    owner = builders.owner_reference(
        {"apiVersion": res.api_version, "kind": res.kind, "metadata": {"name": res.name, "uid": UID}}
    )
    stage = None
    if res.kind == "Corpus":
        from lmforge_jobs.data.stages import stages

        stage = stages(res.spec)[0]
    objects = builders.children(res, doc, owner, image=IMAGE, stage=stage, storage=default)
    for obj in objects:
        obj["metadata"]["namespace"] = "team-a"
        assert_valid(obj)
    (job,) = [o for o in objects if o["kind"] == "Job"]
    return job


def pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def main_container(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod(job)["containers"]
    return container


def env_values(job: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in main_container(job)["env"]}


# -------------------------------------------------------------------------------------------------- spec
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_takes_the_storage_section(kind: str) -> None:
    doc = doc_of(kind, STORAGE)
    res, problems = parse(doc)
    assert not problems, problems
    assert res.spec.storage.to_yaml_dict() == STORAGE
    assert admission_errors(doc) == []
    assert admission_errors(doc_of(kind)) == []  # and it stays optional


ENDPOINTS_ACCEPTED = [
    "http://minio.storage.svc:9000",
    "https://s3.eu-central-1.amazonaws.com",
    "https://account.r2.cloudflarestorage.com/",
    "http://127.0.0.1:9000",
    "http://[::1]:9000",
    "https://ceph.example.com/s3/prefix",
]
ENDPOINTS_REFUSED = [
    "http://user:secret@minio:9000",
    "https://AKIA@minio",
    "s3://bucket",
    "minio:9000",
    "ftp://minio:21",
    "http://",
    "http://minio:9000/?X-Amz-Signature=abc",
    "http://minio:9000/#x",
    "http://minio :9000",
    "http://-minio:9000",
]


@pytest.mark.parametrize("endpoint", [*ENDPOINTS_ACCEPTED, *ENDPOINTS_REFUSED])
def test_endpoint_rule_agrees_in_python_re2_and_the_crd(endpoint: str) -> None:
    import re

    import re2

    accepted = endpoint in ENDPOINTS_ACCEPTED
    assert bool(re.match(ENDPOINT_PATTERN, endpoint)) is accepted
    assert bool(re2.match(ENDPOINT_PATTERN, endpoint)) is accepted
    doc = doc_of("PretrainRun", {"endpoint": endpoint})
    _, problems = parse(doc)
    assert (not problems) is accepted, problems
    assert (admission_errors(doc) == []) is accepted
    if not accepted:
        assert problems[0].field == "spec.storage.endpoint"


def test_endpoint_credentials_are_refused_with_a_hint_and_not_echoed() -> None:
    with pytest.raises(ValueError, match=r"by Secret \(storage.credentials\)") as refused:
        check_endpoint("http://AKIAX:wJalr-secret@minio:9000")
    assert "wJalr-secret" not in str(refused.value)
    with pytest.raises(ValueError, match=r"http://minio\.storage\.svc:9000"):
        check_endpoint("minio:9000")


@pytest.mark.parametrize(
    ("storage", "field"),
    [
        ({"credentials": {"secretName": "S3_Creds"}}, "spec.storage.credentials.secretName"),
        ({"credentials": {"name": "s3"}}, "spec.storage.credentials"),
        ({"credentials": {"secretName": "s3", "key": "x"}}, "spec.storage.credentials.key"),
        ({"gcsCredentials": {"secretKeyRef": {"name": "Gcs", "key": "k"}}}, "spec.storage.gcsCredentials"),
        ({"gcsCredentials": {"name": "gcs", "key": "k"}}, "spec.storage.gcsCredentials"),
        ({"region": "us east"}, "spec.storage.region"),
        ({"accessKey": "AKIA"}, "spec.storage.accessKey"),  # nothing secret in a spec
    ],
)
def test_bad_storage_sections_are_refused_by_both(storage: dict[str, Any], field: str) -> None:
    doc = doc_of("Evaluation", storage)
    _, problems = parse(doc)
    assert problems and problems[0].field.startswith(field), problems
    assert admission_errors(doc) != []


# ---------------------------------------------------------------------------------------------- builders
@pytest.mark.parametrize("kind", KINDS)
def test_no_storage_section_and_no_defaults_changes_nothing(kind: str) -> None:
    job = job_of(doc_of(kind))
    container = main_container(job)
    names = set(env_values(job))
    assert not names & {
        "LMFORGE_S3_ENDPOINT",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "GOOGLE_APPLICATION_CREDENTIALS",
    }
    assert "envFrom" not in container
    assert {v["name"] for v in pod(job)["volumes"]} <= {"spec", "dshm", "tmp"}


@pytest.mark.parametrize("kind", KINDS)
def test_spec_storage_reaches_every_pod(kind: str) -> None:
    job = job_of(doc_of(kind, STORAGE))
    env = env_values(job)
    assert env["LMFORGE_S3_ENDPOINT"] == "http://minio.storage.svc:9000"
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "us-east-1"
    container = main_container(job)
    # the whole Secret as environment: the kubelet resolves it, the operator never reads it
    assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    # the service-account key as a read-only file, never an environment variable
    (volume,) = [v for v in pod(job)["volumes"] if v["name"] == builders.GCS_VOLUME]
    assert volume["secret"] == {
        "secretName": "gcs",
        "items": [{"key": "key.json", "path": builders.GCS_FILE}],
        "defaultMode": 0o440,
    }
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == builders.GCS_VOLUME]
    assert mount == {"name": builders.GCS_VOLUME, "mountPath": builders.GCS_DIR, "readOnly": True}
    assert env["GOOGLE_APPLICATION_CREDENTIALS"] == f"{builders.GCS_DIR}/{builders.GCS_FILE}"
    assert not [n for n in env if n.startswith("LMFORGE_SECRET_")]
    assert restricted_problems(pod(job)) == []


def test_other_secret_references_still_become_variables_beside_storage() -> None:
    doc = doc_of("PretrainRun", STORAGE)
    doc["spec"]["export"] = {
        "push": {"repo": "org/gpt", "token": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    }
    env = env_values(job_of(doc))
    assert env["LMFORGE_SECRET_HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert "LMFORGE_SECRET_GCS_KEY_JSON" not in env


def test_a_dollar_in_the_endpoint_stays_verbatim() -> None:
    job = job_of(doc_of("Evaluation", {"endpoint": "http://minio:9000/$(HOME)"}))
    assert env_values(job)["LMFORGE_S3_ENDPOINT"] == "http://minio:9000/$$(HOME)"


def test_operator_defaults_apply_only_without_a_spec_section() -> None:
    default = Storage.model_validate(
        {
            "endpoint": "http://minio.lmforge:9000",
            "region": "eu-west-1",
            "credentials": {"secretName": "dflt"},
        }
    )
    job = job_of(doc_of("PretrainRun"), default)
    env = env_values(job)
    assert env["LMFORGE_S3_ENDPOINT"] == "http://minio.lmforge:9000" and env["AWS_REGION"] == "eu-west-1"
    assert main_container(job)["envFrom"] == [{"secretRef": {"name": "dflt"}}]
    # a spec's section replaces the defaults as a whole: here AWS S3 (no endpoint) with the pod's IAM role
    job = job_of(doc_of("PretrainRun", {"region": "us-west-2"}), default)
    env = env_values(job)
    assert "LMFORGE_S3_ENDPOINT" not in env and env["AWS_REGION"] == "us-west-2"
    assert "envFrom" not in main_container(job)


def test_config_reads_the_storage_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LMFORGE_STORAGE_ENDPOINT", "LMFORGE_STORAGE_REGION", "LMFORGE_STORAGE_CREDENTIALS_SECRET"):
        monkeypatch.setenv(name, "")
    assert Config().storage_defaults() is None
    monkeypatch.setenv("LMFORGE_STORAGE_ENDPOINT", "http://minio:9000")
    monkeypatch.setenv("LMFORGE_STORAGE_CREDENTIALS_SECRET", "s3")
    assert Config().storage_defaults().to_yaml_dict() == {
        "endpoint": "http://minio:9000",
        "credentials": {"secretName": "s3"},
    }
    monkeypatch.setenv("LMFORGE_STORAGE_ENDPOINT", "http://k:s@minio:9000")
    with pytest.raises(ValueError, match="endpoint") as bad:
        Config().storage_defaults()
    assert "k:s@" not in str(bad.value)


def test_training_network_policy_leaves_egress_to_the_store_open() -> None:
    """The per-run NetworkPolicy restricts ingress only: the pods reach the object store (and DNS)."""
    res, _ = parse(doc_of("PretrainRun", STORAGE))
    policy = builders.build_network_policy(res, None)
    assert policy["spec"]["policyTypes"] == ["Ingress"] and "egress" not in policy["spec"]


# ------------------------------------------------------------------------------------------------- chart
def operator_env(values: dict[str, Any]) -> dict[str, str]:
    (deployment,) = [o for o in render_without_crds(values) if o["kind"] == "Deployment"]
    assert_valid(deployment)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_chart_storage_values_reach_the_job_pods(monkeypatch: pytest.MonkeyPatch) -> None:
    """values.yaml storage → the operator's environment → its Config → the Job's pods."""
    values = {
        "storage": {
            "endpoint": "http://minio.storage.svc:9000",
            "region": "us-east-1",
            "credentialsSecret": "s3-credentials",
        }
    }
    env = operator_env(values)
    for name in ("LMFORGE_STORAGE_ENDPOINT", "LMFORGE_STORAGE_REGION", "LMFORGE_STORAGE_CREDENTIALS_SECRET"):
        monkeypatch.setenv(name, env[name])
    job = job_of(doc_of("Corpus"), Config().storage_defaults())
    assert env_values(job)["LMFORGE_S3_ENDPOINT"] == "http://minio.storage.svc:9000"
    assert env_values(job)["AWS_DEFAULT_REGION"] == "us-east-1"
    assert main_container(job)["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]

    # the defaults (all empty) configure nothing
    env = operator_env({})
    for name in ("LMFORGE_STORAGE_ENDPOINT", "LMFORGE_STORAGE_REGION", "LMFORGE_STORAGE_CREDENTIALS_SECRET"):
        assert env[name] == ""
        monkeypatch.setenv(name, env[name])
    assert Config().storage_defaults() is None


BAD_STORAGE = [
    {"endpoint": "http://key:secret@minio:9000"},
    {"endpoint": "minio:9000"},
    {"credentialsSecret": "S3_Credentials"},
    {"region": "us east"},
    {"accessKey": "AKIA"},
]


@pytest.mark.parametrize(
    "case", range(len(BAD_STORAGE)), ids=[f"{next(iter(v))}{i}" for i, v in enumerate(BAD_STORAGE)]
)
def test_chart_schema_refuses_bad_storage_values(case: int) -> None:
    """helm's schema check refuses each storage value, with an error at (or naming) it."""
    assert schema_refusals([{"storage": storage} for storage in BAD_STORAGE])[case], BAD_STORAGE[case]
