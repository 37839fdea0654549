"""Production scheduling beyond spec.template: a Corpus stage's own template and resources merged over the
Corpus-wide ones for that stage's Jobs only, GPUs asked for as a MIG profile (in place of nvidia.com/gpu),
what the operator would refuse reported offline by ``lmforge validate`` (exit 64, the field named), and the
Kueue examples. Rendered objects are checked with tests/support/k8s_validate.py."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from crdcheck import admission_errors
from k8s_validate import problems, restricted_problems
from repo import ROOT

from lmforge_jobs.data.config import STAGE_NAMES
from lmforge_jobs.data.stages import stage_names, stages
from lmforge_jobs.manifest import load_yaml_documents, parse_resource
from lmforge_operator import builders
from lmforge_operator.builders import BuildError
from lmforge_operator.cli import main as cli

IMAGE = "registry.example/lmforge-jobs:1.2.3"
MIG = "nvidia.com/mig-1g.10gb"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ------------------------------------------------------------------------------------------------ helpers
def corpus(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sources": [{"jsonl": {"paths": ["s3://bucket/docs/*.jsonl.gz"]}}],
        "dedup": {"exact": True},
        "output": "s3://bucket/corpora/web",
        "parallelism": {"tasks": 8, "workers": 3},
        "resources": {"cpu": "2", "memory": "4Gi"},
        **spec,
    }
    return {"apiVersion": "lmforge.io/v1alpha1", "kind": "Corpus", "metadata": {"name": "web"}, "spec": base}


def pretrain(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "data": {"tokens": "s3://bucket/tokens/train", "tokenizer": "s3://bucket/tokenizer"},
        "model": {"layers": 2, "hidden": 64, "heads": 4, "seqLen": 64, "vocabSize": 512},
        "budget": {"steps": 1000},
        "batch": {"globalTokens": 8192, "microBatchSize": 4},
        "parallelism": {"nodes": 4, "gpusPerNode": 1},
        "output": "s3://bucket/runs/gpt",
        **spec,
    }
    return {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "PretrainRun",
        "metadata": {"name": "gpt"},
        "spec": base,
    }


def parsed(doc: dict[str, Any]) -> Any:
    res, found = parse_resource(doc)
    assert not found, found
    return res


def jobs_by_stage(doc: dict[str, Any], **kw: Any) -> dict[str, dict[str, Any]]:
    res = parsed(doc)
    return {s.name: builders.build_job(res, None, image=IMAGE, stage=s, **kw) for s in stages(res.spec)}


def pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def main_container(job: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod(job)["containers"] if c["name"] == "main")


def env(job: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in main_container(job)["env"]}


def refusal(doc: dict[str, Any], **kw: Any) -> tuple[str, str]:
    found = builders.refusals(parsed(doc), **kw)
    assert found, "expected a refusal"
    return found[0].field, found[0].message


SPOT = {"key": "capacity", "operator": "Equal", "value": "spot", "effect": "NoSchedule"}
CPU_POOL = {"key": "pool", "operator": "Equal", "value": "cpu", "effect": "NoSchedule"}


def staged_corpus() -> dict[str, Any]:
    return corpus(
        template={
            "metadata": {"labels": {"team": "data"}},
            "spec": {
                "nodeSelector": {"pool": "cpu"},
                "tolerations": [CPU_POOL],
                "containers": [{"name": "main", "env": [{"name": "LOG_LEVEL", "value": "info"}]}],
            },
        },
        stages={
            "extract": {
                "template": {
                    "metadata": {"labels": {"capacity": "spot"}},
                    "spec": {
                        "nodeSelector": {"capacity": "spot"},
                        "tolerations": [SPOT],
                        "priorityClassName": "batch-low",
                        "containers": [
                            {
                                "name": "main",
                                "env": [
                                    {"name": "LOG_LEVEL", "value": "debug"},
                                    {"name": "TRAFILATURA_TIMEOUT", "value": "30"},
                                ],
                            }
                        ],
                    },
                }
            },
            "tokenizer": {"resources": {"memory": "64Gi"}},
        },
    )


# ------------------------------------------------------------------------------------ per-stage templates
def test_a_stage_template_merges_over_the_corpus_template_for_that_stage_only() -> None:
    jobs = jobs_by_stage(staged_corpus())
    assert list(jobs) == stage_names(parsed(staged_corpus()).spec)
    extract = jobs["extract"]
    # maps merged key by key, tolerations appended, env merged by name (the stage's value wins)
    assert pod(extract)["nodeSelector"] == {"pool": "cpu", "capacity": "spot"}
    assert pod(extract)["tolerations"] == [CPU_POOL, SPOT]
    assert pod(extract)["priorityClassName"] == "batch-low"
    assert env(extract)["LOG_LEVEL"] == "debug" and env(extract)["TRAFILATURA_TIMEOUT"] == "30"
    assert [e["name"] for e in main_container(extract)["env"]].count("LOG_LEVEL") == 1
    labels = extract["spec"]["template"]["metadata"]["labels"]
    assert (
        labels["team"] == "data" and labels["capacity"] == "spot" and labels["lmforge.io/stage"] == "extract"
    )
    for name, job in jobs.items():
        if name == "extract":
            continue
        assert pod(job)["nodeSelector"] == {"pool": "cpu"}, name
        assert pod(job)["tolerations"] == [CPU_POOL], name
        assert "priorityClassName" not in pod(job), name
        assert env(job)["LOG_LEVEL"] == "info" and "TRAFILATURA_TIMEOUT" not in env(job), name
    for job in (extract, jobs["tokenizer"], jobs["tokenize"]):
        assert problems(job) == [], job["metadata"]["name"]
        assert restricted_problems(pod(job)) == []


def test_stage_resources_replace_only_the_fields_they_set() -> None:
    jobs = jobs_by_stage(staged_corpus())
    tokenizer = main_container(jobs["tokenizer"])["resources"]
    assert tokenizer["requests"] == tokenizer["limits"] == {"cpu": "2", "memory": "64Gi"}
    assert main_container(jobs["extract"])["resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}


def test_no_stages_renders_the_same_jobs_as_before() -> None:
    plain = corpus()
    with_empty = corpus(stages={"extract": {}})
    assert jobs_by_stage(plain) == jobs_by_stage(with_empty)


def test_a_stage_template_passes_the_same_guards() -> None:
    doc = corpus(stages={"extract": {"template": {"spec": {"hostNetwork": True}}}})
    field, why = refusal(doc)
    assert field == "stages.extract.template.spec.hostNetwork"
    assert "allowPrivileged" in why
    assert builders.refusals(parsed(doc), allow_privileged=True) == []
    jobs = jobs_by_stage(doc, allow_privileged=True)
    assert pod(jobs["extract"])["hostNetwork"] is True and "hostNetwork" not in pod(jobs["tokenize"])
    # always refused, whatever the chart allows: the job's command
    doc = corpus(
        stages={"tokenize": {"template": {"spec": {"containers": [{"name": "main", "command": ["sh"]}]}}}}
    )
    assert refusal(doc, allow_privileged=True)[0] == "stages.tokenize.template.spec.containers[0].command"


def test_stage_names_are_checked_by_the_model_the_crd_and_the_operator() -> None:
    bad = corpus(stages={"extracting": {"resources": {"memory": "8Gi"}}})
    _, found = parse_resource(bad)
    assert [p.field for p in found] == ["spec.stages.extracting"]
    assert any("keys must be stage names" in e for e in admission_errors(bad))
    assert admission_errors(staged_corpus()) == []
    # a real stage this Corpus does not run (MinHash off): its settings would never apply
    doc = corpus(dedup={"exact": True, "minhash": {"enabled": False}}, stages={"minhash-sigs": {}})
    field, why = refusal(doc)
    assert (
        field == "stages.minhash-sigs" and "extract, exact-sigs, exact-dups, exact-filter, tokenizer" in why
    )


def test_stage_names_table_matches_the_stages() -> None:
    everything = parsed(corpus(dedup={"exact": True, "minhash": {"enabled": True}})).spec
    assert tuple(stage_names(everything)) == STAGE_NAMES


def test_a_stage_priority_class_reaches_its_pod_group() -> None:
    doc = staged_corpus()
    doc["spec"]["scheduling"] = {"gang": "volcano"}
    res = parsed(doc)
    groups = {s.name: builders.build_pod_group(res, None, s) for s in stages(res.spec)}
    assert groups["extract"]["spec"]["priorityClassName"] == "batch-low"
    assert "priorityClassName" not in groups["tokenize"]["spec"]


# ---------------------------------------------------------------------------------------------------- MIG
@pytest.mark.parametrize("kind", ["PretrainRun", "Evaluation"])
def test_a_mig_profile_replaces_nvidia_gpu(kind: str) -> None:
    if kind == "PretrainRun":
        doc = pretrain(resources={"gpuResource": MIG, "cpu": "4", "memory": "32Gi"})
    else:
        doc = {
            "apiVersion": "lmforge.io/v1alpha1",
            "kind": "Evaluation",
            "metadata": {"name": "ev"},
            "spec": {
                "model": {"path": "s3://bucket/model"},
                "perplexity": {"data": "s3://bucket/held-out"},
                "parallelism": {"nodes": 2, "gpusPerNode": 1},
                "resources": {"gpuResource": MIG},
            },
        }
    res = parsed(doc)
    job = builders.build_job(res, None, image=IMAGE)
    resources = main_container(job)["resources"]
    assert resources["limits"][MIG] == resources["requests"][MIG] == "1"
    assert "nvidia.com/gpu" not in resources["limits"] and "nvidia.com/gpu" not in resources["requests"]
    assert "--nproc-per-node=1" in main_container(job)["args"]
    assert problems(job) == []


def test_another_vendors_gpus_keep_the_count_and_torchrun_one_process_each() -> None:
    res = parsed(
        pretrain(parallelism={"nodes": 2, "gpusPerNode": 8}, resources={"gpuResource": "amd.com/gpu"})
    )
    job = builders.build_job(res, None, image=IMAGE)
    assert main_container(job)["resources"]["limits"] == {"amd.com/gpu": "8"}
    assert "--nproc-per-node=8" in main_container(job)["args"]


@pytest.mark.parametrize(
    ("spec", "field", "why"),
    [
        (
            {"resources": {"gpuResource": "nvidia.com/mig-1g10gb"}},
            "resources.gpuResource",
            "not a MIG profile",
        ),
        (
            {"resources": {"gpuResource": "nvidia.com/mig-9g.10gb"}},
            "resources.gpuResource",
            "not a MIG profile",
        ),
        (
            {"parallelism": {"nodes": 1, "gpusPerNode": 2}, "resources": {"gpuResource": MIG}},
            "resources.gpuResource",
            "one MIG device",
        ),
        ({"resources": {"gpuResource": "example.kubernetes.io/gpu"}}, "resources.gpuResource", "reserved"),
        (
            {"parallelism": {"nodes": 1, "gpusPerNode": 0}, "resources": {"gpuResource": MIG}},
            "resources.gpuResource",
            "no GPU",
        ),
        (
            {"template": {"spec": {"containers": [{"name": "main", "resources": {"limits": {MIG: "1"}}}]}}},
            f"template.spec.containers[0].resources.limits[{MIG}]",
            "spec.resources.gpuResource",
        ),
    ],
)
def test_mig_refusals_name_the_field(spec: dict[str, Any], field: str, why: str) -> None:
    doc = pretrain(**spec)
    got_field, got_why = refusal(doc)
    assert got_field == field and why in got_why
    with pytest.raises(BuildError) as err:
        builders.build_job(parsed(doc), None, image=IMAGE)
    assert err.value.field == field


def test_a_stage_may_ask_for_a_mig_device() -> None:
    jobs = jobs_by_stage(corpus(stages={"tokenizer": {"resources": {"gpu": 1, "gpuResource": MIG}}}))
    assert main_container(jobs["tokenizer"])["resources"]["limits"][MIG] == "1"
    assert pod(jobs["tokenizer"])["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert MIG not in main_container(jobs["extract"])["resources"]["limits"]
    doc = corpus(stages={"tokenizer": {"resources": {"gpu": 2, "gpuResource": MIG}}})
    assert refusal(doc)[0] == "stages.tokenizer.resources.gpuResource"
    # named Corpus-wide, used by the one stage asking for a GPU; the others ask for none and are fine
    jobs = jobs_by_stage(
        corpus(resources={"gpuResource": MIG}, stages={"tokenizer": {"resources": {"gpu": 1}}})
    )
    assert main_container(jobs["tokenizer"])["resources"]["limits"] == {MIG: "1"}
    assert "resources" not in main_container(jobs["extract"])
    doc = corpus(
        resources={"gpuResource": "nvidia.com/mig-1g10gb"}, stages={"tokenizer": {"resources": {"gpu": 1}}}
    )
    assert refusal(doc)[0] == "resources.gpuResource"


def test_gpu_resource_syntax_is_checked_by_the_model_and_the_crd() -> None:
    doc = pretrain(resources={"gpuResource": "mig-1g.10gb"})
    _, found = parse_resource(doc)
    assert [p.field for p in found] == ["spec.resources.gpuResource"]
    assert admission_errors(doc)
    assert admission_errors(pretrain(resources={"gpuResource": MIG})) == []


# ------------------------------------------------------------------------------- gang scheduler conflicts
def test_gang_scheduling_refuses_the_default_scheduler() -> None:
    doc = pretrain(scheduling={"gang": "volcano"}, template={"spec": {"schedulerName": "default-scheduler"}})
    field, why = refusal(doc)
    assert field == "template.spec.schedulerName" and "ignores PodGroups" in why
    doc["spec"]["template"]["spec"]["schedulerName"] = "volcano-gpu"  # a second Volcano under its own name
    assert builders.refusals(parsed(doc)) == []


# ------------------------------------------------------------------------------------- lmforge validate
def write(tmp_path: Path, doc: dict[str, Any], name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (pretrain(template={"spec": {"hostPID": True}}), "spec.template.spec.hostPID"),
        (
            corpus(
                stages={
                    "extract": {"template": {"spec": {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}}}
                }
            ),
            "spec.stages.extract.template.spec.volumes[0].hostPath",
        ),
    ],
)
def test_validate_reports_pod_security_refusals_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], doc: dict[str, Any], field: str
) -> None:
    path = write(tmp_path, doc)
    assert cli(["validate", str(path)]) == 64
    err = capsys.readouterr().err
    assert f"error: {field}: " in err and "allowPrivileged" in err
    assert cli(["validate", "--allow-privileged", str(path)]) == 0
    assert "ok  " in capsys.readouterr().out


def test_validate_reports_every_operator_refusal_and_keeps_schema_errors_at_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, pretrain(resources={"gpuResource": "nvidia.com/mig-1g10gb"}), "mig.yaml")
    gang = pretrain(
        scheduling={"gang": "coscheduling"}, template={"spec": {"schedulerName": "default-scheduler"}}
    )
    gang["metadata"]["name"] = "gang"
    write(tmp_path, gang, "gang.yaml")
    write(tmp_path, corpus(), "fine.yaml")
    assert cli(["validate", str(tmp_path)]) == 64
    captured = capsys.readouterr()
    assert "error: spec.resources.gpuResource: 'nvidia.com/mig-1g10gb' is not a MIG profile" in captured.err
    assert "error: spec.template.spec.schedulerName: " in captured.err
    assert "ok  Corpus/web" in captured.out
    # a schema problem is still exit 1 (the operator's checks need a valid resource)
    write(tmp_path, pretrain(resources={"gpuResource": "no domain"}), "mig.yaml")
    assert cli(["validate", str(tmp_path / "mig.yaml")]) == 1


def test_validate_applies_the_charts_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, pretrain())
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text(yaml.safe_dump({"PretrainRun": {"spec": {"hostNetwork": True}}}))
    assert cli(["validate", "--pod-template-defaults", str(defaults), str(path)]) == 64
    assert "error: podTemplate.defaults.PretrainRun.spec.hostNetwork: " in capsys.readouterr().err
    args = ["validate", "--allow-privileged", "--pod-template-defaults", str(defaults), str(path)]
    assert cli(args) == 0


# ------------------------------------------------------------------------------------------- Kueue examples
KUEUE = ROOT / "examples" / "kueue"
KUEUE_KINDS = {"ResourceFlavor", "ClusterQueue", "LocalQueue", "Topology"}


def _docs(folder: Path) -> list[dict[str, Any]]:
    return [d for f in sorted(folder.rglob("*.yaml")) for d in load_yaml_documents(f.read_text())]


def test_kueue_examples_are_valid_objects(capsys: pytest.CaptureFixture[str]) -> None:
    assert (KUEUE / "README.md").is_file()
    docs = _docs(KUEUE)
    kinds = {d["kind"] for d in docs}
    assert KUEUE_KINDS | {"Namespace", "PretrainRun", "Configuration"} <= kinds
    for doc in docs:
        group = doc["apiVersion"].split("/")[0]
        if doc["kind"] in KUEUE_KINDS:
            assert doc["apiVersion"] == "kueue.x-k8s.io/v1beta1", doc["kind"]
            assert doc["metadata"]["name"] and isinstance(doc["spec"], dict)
        elif doc["kind"] == "Configuration":
            assert doc["apiVersion"] == "config.kueue.x-k8s.io/v1beta1"
            wait = doc["waitForPodsReady"]
            assert wait["enable"] is True and wait["blockAdmission"] is True and wait["timeout"]
            assert wait["requeuingStrategy"]["timestamp"] in ("Eviction", "Creation")
        elif group != "lmforge.io":
            assert problems(doc) == [], doc["kind"]
    flavors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ResourceFlavor"}
    queues = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterQueue"}
    topologies = {d["metadata"]["name"] for d in docs if d["kind"] == "Topology"}
    for queue in queues.values():  # every flavor a queue uses exists, and every TAS flavor's topology
        for group in queue["spec"]["resourceGroups"]:
            for flavor in group["flavors"]:
                assert flavor["name"] in flavors
    assert all(f["spec"].get("topologyName", next(iter(topologies))) in topologies for f in flavors.values())
    local = {
        (d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs if d["kind"] == "LocalQueue"
    }
    for doc in docs:
        if doc["kind"] == "PretrainRun":
            assert (doc["metadata"]["namespace"], doc["spec"]["queue"]) in local
            assert (
                local[(doc["metadata"]["namespace"], doc["spec"]["queue"])]["spec"]["clusterQueue"] in queues
            )
    assert cli(["validate", str(KUEUE)]) == 0, capsys.readouterr().err


def test_kueue_examples_render_queued_jobs_with_the_topology_request() -> None:
    runs = [d for d in _docs(KUEUE) if d["kind"] == "PretrainRun"]
    assert len(runs) == 2
    for doc in runs:
        res = parsed(copy.deepcopy(doc))
        job = builders.build_job(res, None, image=IMAGE)
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == doc["spec"]["queue"]
        assert job["spec"]["suspend"] is True
        annotations = job["spec"]["template"]["metadata"]["annotations"]
        if doc["metadata"]["name"] == "gpt-1b":
            assert (
                annotations["kueue.x-k8s.io/podset-required-topology"] == "cloud.provider.com/topology-block"
            )
        assert problems(job) == []


# ------------------------------------------------------------------------------------------ the docs' YAML
def _docs_block(opening: str) -> dict[str, Any]:
    import re

    text = (ROOT / "docs" / "cluster.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if b.startswith(opening)]
    return yaml.safe_load(block)["spec"]


def test_the_docs_stage_and_mig_examples_render_as_described() -> None:
    spec = _docs_block("# a Corpus\n")
    jobs = jobs_by_stage(corpus(**spec))
    extract = jobs["extract"]
    assert pod(extract)["nodeSelector"] == {"pool": "cpu", "capacity": "spot"}
    assert env(extract)["LOG_LEVEL"] == "debug" and env(jobs["tokenize"])["LOG_LEVEL"] == "info"
    assert main_container(jobs["tokenizer"])["resources"]["limits"] == {"cpu": "4", "memory": "64Gi"}
    assert problems(extract) == []
    spec = _docs_block("# a PretrainRun on 1g.10gb")
    job = builders.build_job(parsed(pretrain(**spec)), None, image=IMAGE)
    assert main_container(job)["resources"]["limits"] == {MIG: "1", "cpu": "4", "memory": "32Gi"}
    assert job["spec"]["completions"] == 8
