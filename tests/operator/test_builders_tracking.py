"""Experiment tracking on a cluster: the chart's ``tracking.mlflow`` values reach the operator's environment,
and from there every job pod (MLFLOW_TRACKING_URI, the credentials Secret as envFrom); a Sweep trial's job
manifest keeps the label that groups its MLflow run under the sweep."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from crdcheck import admission_errors
from helm import render_without_crds, schema_refusals
from k8s_validate import assert_valid

from lmforge_jobs.manifest import parse_resource
from lmforge_jobs.spec import Storage
from lmforge_operator import builders

IMAGE = "registry.example/lmforge-jobs:1.2.3"
URI = "http://mlflow.mlflow.svc:5000"
SETTINGS = (builders.TRACKING_URI_SETTING, builders.TRACKING_SECRET_SETTING)

PRETRAIN = {
    "data": {"tokens": "s3://bucket/tokens/train", "tokenizer": "s3://bucket/tokenizer"},
    "model": {"layers": 2, "hidden": 64, "heads": 4, "seqLen": 64, "vocabSize": 512},
    "budget": {"steps": 1000},
    "batch": {"globalTokens": 1024, "microBatchSize": 4},
    "parallelism": {"nodes": 2, "gpusPerNode": 2},
    "output": "s3://bucket/runs/gpt",
}


@pytest.fixture(autouse=True)
def _no_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)


def doc(labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "gpt", "namespace": "team-a"}
    if labels:
        metadata["labels"] = labels
    return {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "PretrainRun",
        "metadata": metadata,
        "spec": {**copy.deepcopy(PRETRAIN), **spec},
    }


def job_of(document: dict[str, Any], **kw: Any) -> dict[str, Any]:
    res, problems = parse_resource(copy.deepcopy(document))
    assert not problems, problems
    job = builders.build_job(res, None, image=IMAGE, resolved_doc=document, **kw)
    job["metadata"]["namespace"] = "team-a"
    assert_valid(job)
    return job


def container(job: dict[str, Any]) -> dict[str, Any]:
    (main,) = job["spec"]["template"]["spec"]["containers"]
    return main


def env(job: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container(job)["env"]}


def test_tracking_defaults_reach_the_pods_beside_storage() -> None:
    tracking = builders.Tracking(URI, "mlflow-credentials")
    storage = Storage.model_validate({"credentials": {"secretName": "s3-credentials"}})
    job = job_of(doc(), tracking=tracking, storage=storage)
    assert env(job)["MLFLOW_TRACKING_URI"] == URI
    assert container(job)["envFrom"] == [
        {"secretRef": {"name": "s3-credentials"}},
        {"secretRef": {"name": "mlflow-credentials"}},
    ]
    # the spec's own tracking section only says what the job logs: it adds nothing to the pod
    spec_tracking = job_of(doc(tracking={"mlflow": False, "tensorboard": True}), tracking=tracking)
    assert env(spec_tracking)["MLFLOW_TRACKING_URI"] == URI
    assert "tracking" not in str(container(spec_tracking)["args"])


def test_no_tracking_defaults_change_nothing() -> None:
    job = job_of(doc(), tracking=builders.Tracking())
    assert "MLFLOW_TRACKING_URI" not in env(job) and "envFrom" not in container(job)
    assert job_of(doc()) == job  # nothing in the operator's environment either
    # a Secret without a server is no tracking at all
    assert "envFrom" not in container(job_of(doc(), tracking=builders.Tracking(None, "mlflow-credentials")))


def test_a_dollar_in_the_uri_stays_verbatim() -> None:
    job = job_of(doc(), tracking=builders.Tracking("http://mlflow:5000/$(HOME)"))
    assert env(job)["MLFLOW_TRACKING_URI"] == "http://mlflow:5000/$$(HOME)"


def test_a_trial_job_manifest_keeps_its_sweep_label() -> None:
    trial = builders.job_manifest(doc(labels={"lmforge.io/sweep": "lr", "team": "x"}))
    assert trial["metadata"] == {"name": "gpt", "namespace": "team-a", "labels": {"lmforge.io/sweep": "lr"}}
    assert "labels" not in builders.job_manifest(doc(labels={"team": "x"}))["metadata"]


@pytest.mark.parametrize(
    ("tracking", "accepted"),
    [
        ({"mlflow": True, "tensorboard": True, "experiment": "team-a/gpt.v2_1"}, True),
        ({}, True),
        ({"experiment": "has space"}, False),
        ({"experiment": "/leading-slash"}, False),
        ({"experiment": "x" * 129}, False),
        ({"uri": "http://mlflow:5000"}, False),  # the server is never named in a spec
        ({"mlflow": "yes please"}, False),
    ],
)
def test_spec_tracking_is_checked_by_pydantic_and_the_crd_alike(
    tracking: dict[str, Any], accepted: bool
) -> None:
    document = doc(tracking=tracking)
    _, problems = parse_resource(copy.deepcopy(document))
    assert (not problems) is accepted, problems
    assert (admission_errors(document) == []) is accepted
    if not accepted:
        assert problems[0].field.startswith("spec.tracking")


# ------------------------------------------------------------------------------------------------ chart
def operator_env(values: dict[str, Any]) -> dict[str, str]:
    (deployment,) = [o for o in render_without_crds(values) if o["kind"] == "Deployment"]
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in main["env"] if "value" in e}


def test_chart_tracking_values_reach_the_job_pods(monkeypatch: pytest.MonkeyPatch) -> None:
    """values.yaml tracking → the operator's environment → the Job's pods."""
    settings = operator_env({"tracking": {"mlflow": {"uri": URI, "credentialsSecret": "mlflow-credentials"}}})
    for name in SETTINGS:
        monkeypatch.setenv(name, settings[name])
    job = job_of(doc())
    assert env(job)["MLFLOW_TRACKING_URI"] == URI
    assert container(job)["envFrom"] == [{"secretRef": {"name": "mlflow-credentials"}}]

    settings = operator_env({})  # the defaults: empty, no tracking
    for name in SETTINGS:
        assert settings[name] == ""
        monkeypatch.setenv(name, settings[name])
    assert builders.Tracking.from_env() == builders.Tracking()


BAD_MLFLOW = [
    {"uri": "http://user:secret@mlflow:5000"},
    {"uri": "mlflow:5000"},
    {"credentialsSecret": "MLflow_Credentials"},
    {"password": "x"},
]


@pytest.mark.parametrize(
    "case", range(len(BAD_MLFLOW)), ids=[f"{next(iter(v))}{i}" for i, v in enumerate(BAD_MLFLOW)]
)
def test_chart_schema_refuses_bad_tracking_values(case: int) -> None:
    """helm's schema check refuses each MLflow value, with an error at (or naming) it."""
    assert schema_refusals([{"tracking": {"mlflow": m}} for m in BAD_MLFLOW])[case], BAD_MLFLOW[case]
