"""Spec models: defaults, YAML number rules, descriptions, phases."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from pydantic import BaseModel

from lmforge_jobs.manifest import MODELS, ManifestError, load_spec, load_yaml_documents, parse_resource
from lmforge_jobs.pretrain.config import PretrainRunSpec
from lmforge_jobs.spec import Condition, ConditionStatus, Phase, derive_phase


def test_yaml_12_numbers() -> None:
    doc = load_yaml_documents("a: 2.5e9\nb: 6.0e-4\nc: 1e-5\nd: '3'\ne: 20\nf: 1.5\n")[0]
    assert doc == {"a": 2_500_000_000, "b": 6.0e-4, "c": 1e-5, "d": "3", "e": 20, "f": 1.5}
    assert isinstance(doc["a"], int)


def test_defaults_fill_a_minimal_pretrain_run() -> None:
    spec = PretrainRunSpec.model_validate({"corpus": {"name": "web"}, "batch": {"globalTokens": 8192}})
    assert spec.budget.tokens_per_parameter == 20
    assert spec.model.n_kv_heads == spec.model.heads == 12
    assert spec.model.ffn_size == 2048  # 8/3 · 768 rounded up to 256
    assert spec.optimizer.schedule.value == "cosine"
    assert spec.to_yaml_dict()["budget"] == {"tokensPerParameter": 20.0}


def test_snake_case_is_also_accepted_in_python() -> None:
    spec = PretrainRunSpec(corpus={"name": "web"}, batch={"global_tokens": 8192})
    assert spec.batch.global_tokens == 8192


def _models(root: type[BaseModel], seen: set[type[BaseModel]]) -> None:
    if root in seen:
        return
    seen.add(root)
    for field in root.model_fields.values():
        for tp in [field.annotation, *getattr(field.annotation, "__args__", ())]:
            for inner in [tp, *getattr(tp, "__args__", ())]:
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    _models(inner, seen)


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_field_has_a_description(kind: str) -> None:
    seen: set[type[BaseModel]] = set()
    for part in ("spec", "status"):
        ann = MODELS[kind].model_fields[part].annotation
        for tp in [ann, *getattr(ann, "__args__", ())]:
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                _models(tp, seen)
    missing = [f"{m.__name__}.{n}" for m in seen for n, f in m.model_fields.items() if not f.description]
    assert missing == []


def _cond(type_: str, status: str = "True") -> Condition:
    return Condition(
        type=type_,
        status=ConditionStatus(status),
        reason="Test",
        last_transition_time=datetime.now(timezone.utc),
    )


@pytest.mark.parametrize(
    ("conditions", "phase"),
    [
        ([], Phase.pending),
        ([_cond("Waiting")], Phase.waiting),
        ([_cond("Waiting", "False"), _cond("Running")], Phase.running),
        ([_cond("Running", "False"), _cond("Succeeded")], Phase.succeeded),
        ([_cond("Running"), _cond("Failed")], Phase.failed),
        ([_cond("Invalid"), _cond("Running")], Phase.invalid),
    ],
)
def test_derive_phase(conditions: list[Condition], phase: Phase) -> None:
    assert derive_phase(conditions) == phase


def test_load_spec_for_a_job(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "apiVersion: lmforge.io/v1alpha1\nkind: PretrainRun\nmetadata: {name: a}\n"
        "spec: {corpus: {name: web}, batch: {globalTokens: 8192}, budget: {tokens: 1.0e6}}\n"
    )
    assert load_spec(path, "PretrainRun").spec.budget.tokens == 1_000_000
    with pytest.raises(ManifestError, match="expected exactly one Corpus"):
        load_spec(path, "Corpus")


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ([1, 2], "(document)"),
        ({"apiVersion": "v1", "kind": "Corpus"}, "apiVersion"),
        ({"apiVersion": "lmforge.io/v1alpha1", "kind": "Model"}, "kind"),
        ({"apiVersion": "lmforge.io/v1alpha1", "kind": "Corpus", "metadata": {"name": "c"}}, "spec"),
    ],
)
def test_malformed_documents(doc: Any, field: str) -> None:
    resource, problems = parse_resource(doc)
    assert resource is None
    assert problems[0].field == field


# The CRD's patterns are matched by the API server with Go's RE2; these run them with google-re2 (cel-python's
# regex engine) as well as Python's re, and against the Python-side check that `lmforge validate` uses.
URIS_ACCEPTED = [
    "/data/a.jsonl",
    "./x",
    "../shared/x",
    "rel/path",
    "file.txt",
    "~/x",
    "s3://bucket/key",
    "s3://bucket/a@b",
    "gs://b/k/x.parquet",
    "hf://datasets/org/name@main/x",
    "file:///tmp/x",
    "https://example.com/x",
    "pvc://my-claim/data/x",
    "pvc://claim",
    "pvc://claim/",
    "pvc://c.d/x/./y/..z/...",
    "pv://x/../y",
    "C:foo",
]
URIS_REFUSED = [
    "pvc://Bad/x",
    "pvc://claim/../x",
    "pvc://claim/x/..",
    "pvc://claim/x/../..",
    "pvc://-x/y",
    "pvc:///x",
    "https://user:pw@host/x",
    "s3://key@bucket/x",
    "pvcx://a@b/c",
    "a b",
]


@pytest.mark.parametrize("uri", [*URIS_ACCEPTED, *URIS_REFUSED])
def test_uri_pattern_agrees_with_check_uri_in_re2_and_python(uri: str) -> None:
    import re

    import re2

    from lmforge_jobs.spec import URI_STRICT_PATTERN, check_uri

    accepted = uri in URIS_ACCEPTED
    assert bool(re.match(URI_STRICT_PATTERN, uri)) is accepted
    assert bool(re2.match(URI_STRICT_PATTERN, uri)) is accepted
    try:
        check_uri(uri)
        checked = True
    except ValueError:
        checked = False
    assert checked is accepted


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        *[("4", True), ("500m", True), ("16Gi", True), ("0.5", True), ("1e3", True), ("1.5Ti", True)],
        *[("0", False), ("0Gi", False), ("0.0", False), ("-1", False), ("+2", False), ("lots", False)],
    ],
)
def test_positive_quantity_pattern_in_re2_and_python(value: str, ok: bool) -> None:
    import re

    import re2

    from lmforge_jobs.spec import POSITIVE_QUANTITY_PATTERN

    assert bool(re.match(POSITIVE_QUANTITY_PATTERN, value)) is ok
    assert bool(re2.match(POSITIVE_QUANTITY_PATTERN, value)) is ok


@pytest.mark.parametrize(
    ("image", "ok"),
    [
        ("ghcr.io/lmforge/lmforge-jobs:0.1.0", True),
        ("registry.example:5000/team/jobs:v1_2.3-rc", True),
        ("jobs", True),
        ("jobs@sha256:" + "0" * 64, True),
        ("ghcr.io/Org/jobs:1", False),
        ("jobs:1 --privileged", False),
        ("jobs:", False),
        ("'jobs'", False),
    ],
)
def test_image_pattern_in_re2_and_python(image: str, ok: bool) -> None:
    import re

    import re2

    from lmforge_jobs.spec import IMAGE_PATTERN

    assert bool(re.match(IMAGE_PATTERN, image)) is ok
    assert bool(re2.match(IMAGE_PATTERN, image)) is ok
