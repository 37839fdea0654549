"""References resolved into URIs (lmforge_jobs.resolve), the shared job entry and telemetry files."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import yaml
from repo import ROOT

from lmforge_jobs.entry import ConfigError, job_main
from lmforge_jobs.manifest import load_resources
from lmforge_jobs.resolve import (
    UnresolvedReference,
    default_output,
    dependencies,
    expected_outputs,
    references,
    resolve,
    unresolved,
)
from lmforge_jobs.spec import EXIT_CONFIG_ERROR
from lmforge_jobs.telemetry import Telemetry, metric_name, read_progress


def _by_ref(paths: list[Path]) -> dict[tuple[str, str], object]:
    resources, problems = load_resources(paths)
    assert not problems, problems
    return {(r.kind, r.name): r for r in resources}


def _outputs(resources: dict) -> dict:
    return {
        ref: expected_outputs(ref[0], default_output(ref[0], ref[1], "/runs"), r.spec)
        for ref, r in resources.items()
    }


def test_cluster_examples_resolve_to_uris() -> None:
    resources = _by_ref([ROOT / "examples" / "cluster"])
    outputs = _outputs(resources)
    for ref, resource in resources.items():
        resolved = resolve(resource, outputs, default_output(*ref, "/runs"))
        assert unresolved(resolved) == [], ref
        assert resolved.spec.output is not None
        for dep in references(resource):
            assert dep in resources, f"{ref} refers to missing {dep}"
    pretrain = next(r for (k, _), r in resources.items() if k == "PretrainRun")
    corpus_name = pretrain.spec.corpus.name
    resolved = resolve(pretrain, outputs, "/runs/x")
    assert resolved.spec.corpus is None
    assert resolved.spec.data.tokens == f"/runs/corpus/{corpus_name}/tokens/train"
    assert resolved.spec.data.held_out == f"/runs/corpus/{corpus_name}/tokens/held-out"
    assert resolved.spec.data.tokenizer == f"/runs/corpus/{corpus_name}/tokenizer"


def test_the_realistic_experiments_run_on_the_cluster_corpus() -> None:
    """examples/sweep/02 and examples/scaling/02 sit beside examples/cluster: every trial and point they
    create refers to the cluster's Corpus and resolves to its URIs."""
    from lmforge_jobs.resolve import point_resource, trial_resource
    from lmforge_jobs.scaling_study import study_points

    resources = _by_ref(
        [
            ROOT / "examples" / "cluster",
            ROOT / "examples" / "sweep" / "02-llama-lr.yaml",
            ROOT / "examples" / "scaling" / "02-llama-iso.yaml",
        ]
    )
    outputs = _outputs({ref: r for ref, r in resources.items() if ref[0] not in ("Sweep", "ScalingStudy")})
    sweep, study = resources[("Sweep", "llama-lr")], resources[("ScalingStudy", "llama-iso")]
    children = [trial_resource(sweep, "llama-lr-t000", {"optimizer.lr": 1e-3, "optimizer.warmupSteps": 200})]
    points = study_points(study.spec, study.name, 32000)
    assert len(points) == 20
    children += [point_resource(study, p["name"], p["shape"], p["tokens"]) for p in points[:2]]
    for child in children:
        assert [dep for dep in references(child)] == [("Corpus", "web-en")]
        resolved = resolve(child, outputs, default_output(child.kind, child.name, "/runs"))
        assert unresolved(resolved) == [], child.name
        assert resolved.spec.data.tokens == "/runs/corpus/web-en/tokens/train"
    assert children[0].spec.optimizer.lr == 1e-3 and children[0].spec.optimizer.warmup_steps == 200


def test_model_references_become_paths_and_every_gets_checkpoint_dir() -> None:
    doc = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "Evaluation",
        "metadata": {"name": "ev"},
        "spec": {
            "model": {"pretrainRun": "gpt"},
            "checkpoints": "every",
            "perplexity": {"corpus": {"name": "web"}},
            "judge": {
                "model": {"path": "/judge"},
                "reference": {"alignmentRun": "sft"},
                "prompts": "/p.jsonl",
            },
            "arena": {"opponents": [{"alignmentRun": "dpo"}, {"huggingface": "org/m"}]},
        },
    }
    from lmforge_jobs.manifest import parse_resource

    resource, problems = parse_resource(doc)
    assert not problems and resource is not None
    deps = dependencies(resource)
    assert ("model", ("PretrainRun", "gpt"), "Running") in deps
    assert ("perplexity.corpus", ("Corpus", "web"), "Succeeded") in deps
    assert references(resource) == [
        ("PretrainRun", "gpt"),
        ("AlignmentRun", "sft"),
        ("AlignmentRun", "dpo"),
        ("Corpus", "web"),
    ]
    outputs = {
        ("PretrainRun", "gpt"): expected_outputs("PretrainRun", "/o/gpt"),
        ("AlignmentRun", "sft"): expected_outputs("AlignmentRun", "/o/sft"),
        ("AlignmentRun", "dpo"): expected_outputs("AlignmentRun", "/o/dpo"),
        ("Corpus", "web"): expected_outputs("Corpus", "/o/web"),
    }
    r = resolve(resource, outputs, "/o/ev")
    assert r.spec.model.path == "/o/gpt/model" and r.spec.model.pretrain_run is None
    assert r.spec.checkpoint_dir == "/o/gpt/checkpoints"
    assert r.spec.perplexity.data == "/o/web/tokens/held-out" and r.spec.perplexity.corpus is None
    assert r.spec.judge.reference.path == "/o/sft/model"
    assert [o.path for o in r.spec.arena.opponents] == ["/o/dpo/model", None]
    assert r.spec.arena.opponents[1].huggingface == "org/m"
    assert r.spec.output == "/o/ev"
    assert unresolved(r) == []

    missing = dict(outputs)
    del missing[("AlignmentRun", "dpo")]
    with pytest.raises(UnresolvedReference) as info:
        resolve(resource, missing, "/o/ev")
    assert info.value.field == "arena.opponents[0]" and info.value.ref == ("AlignmentRun", "dpo")


def test_expected_outputs_adapter_only_with_peft() -> None:
    resources = _by_ref([ROOT / "examples" / "quickstart"])
    sft, dpo = resources[("AlignmentRun", "tiny-sft")], resources[("AlignmentRun", "tiny-dpo")]
    assert "adapter" not in expected_outputs("AlignmentRun", "/o", sft.spec)
    assert expected_outputs("AlignmentRun", "/o", dpo.spec)["adapter"] == "/o/adapter"


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def test_job_main_refuses_unresolved_and_reports_config_errors(tmp_path: Path, capsys) -> None:
    doc = yaml.safe_load((ROOT / "examples/quickstart/02-pretrain.yaml").read_text())
    called = []
    code = job_main("PretrainRun", lambda r, a: called.append(r), ["--manifest", str(_write(tmp_path, doc))])
    assert code == EXIT_CONFIG_ERROR and not called
    assert "error: spec.corpus: references by name must be resolved" in capsys.readouterr().err

    doc["spec"].pop("corpus")
    doc["spec"]["data"] = {"tokens": str(tmp_path / "t"), "tokenizer": str(tmp_path / "tok")}
    out = tmp_path / "out"
    doc["spec"]["output"] = str(out)

    def failing(resource, args):
        raise ConfigError("data.tokens", "no token shards in " + resource.spec.data.tokens)

    code = job_main("PretrainRun", failing, ["--manifest", str(_write(tmp_path, doc))])
    assert code == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err.strip()
    assert err == f"error: spec.data.tokens: no token shards in {tmp_path / 't'}"
    progress = read_progress(out)
    assert progress["state"] == "Invalid" and progress["field"] == "spec.data.tokens"

    doc["spec"].pop("output")
    seen = []
    code = job_main(
        "PretrainRun",
        lambda r, a: seen.append(r.spec.output) or 3,
        ["--manifest", str(_write(tmp_path, doc))],
    )
    assert code == 3 and seen == ["lmforge-runs/pretrainrun/tiny-gpt"]


def test_telemetry_progress_outputs_and_metrics(tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv("LMFORGE_TERMINATION_LOG", str(log))
    tel = Telemetry("PretrainRun", tmp_path, port=0, total_steps=10)
    assert tel.port and tel.port > 0
    tel.update(step=0, tokens=0, metrics={"loss": 5.0})
    tel.update(step=5, tokens=500, metrics={"loss": 4.0, "mfu": 0.3, "nan": float("nan")}, force=True)
    progress = read_progress(tmp_path)
    assert progress["step"] == 5 and progress["percent"] == 50.0 and progress["tokens"] == 500
    assert progress["metrics"] == {"loss": 4.0, "mfu": 0.3}
    assert "etaSeconds" in progress and progress["state"] == "Running"
    body = urllib.request.urlopen(f"http://127.0.0.1:{tel.port}/metrics", timeout=5).read().decode()
    assert "lmforge_train_loss 4.0" in body
    assert "lmforge_train_mfu_ratio 0.3" in body
    assert "lmforge_train_progress_ratio 0.5" in body
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(0, 5.0), (5, 4.0)] and "nan" not in rows[1]
    tel.finish({"model": "/m"}, results=None)
    assert json.loads((tmp_path / "outputs.json").read_text()) == {"model": "/m"}
    assert read_progress(tmp_path)["state"] == "Succeeded"
    assert json.loads(log.read_text())["outputs"] == {"model": "/m"}

    quiet = Telemetry("PretrainRun", tmp_path / "rank1", enabled=False)
    quiet.update(step=1, metrics={"loss": 1.0}, force=True)
    quiet.finish({"model": "/m"})
    assert not (tmp_path / "rank1").exists()


def test_metric_names_follow_prometheus_conventions() -> None:
    assert metric_name("PretrainRun", "tokensPerSecond") == "lmforge_train_tokens_per_second"
    assert metric_name("PretrainRun", "evalLoss") == "lmforge_eval_loss"
    assert metric_name("AlignmentRun", "rewardAccuracy") == "lmforge_align_reward_accuracy"
    assert metric_name("Evaluation", "perplexity") == "lmforge_eval_perplexity"
    assert metric_name("Corpus", "documentsPerSecond") == "lmforge_data_documents_per_second"
    assert metric_name("PretrainRun", "gpuUtilization") == "lmforge_gpu_utilization_ratio"
