"""The Evaluation job: ``python -m lmforge_jobs.evaluate --manifest eval.yaml``.

The manifest is resolved (``lmforge run`` or the operator replaced references by name with URIs). In
order, for the model (``checkpoints: final``) or for every complete checkpoint (``checkpoints: every``):

1. **perplexity** on ``perplexity.data`` (:mod:`.perplexity`)
2. **benchmarks**, one lm-eval call per entry (:mod:`.benchmarks`)
3. **judge**: the model and ``judge.reference`` answer ``judge.prompts``; the judge picks (:mod:`.judge`);
   **arena**: Bradley–Terry ratings of the model, the reference and ``arena.opponents`` (:mod:`.arena`)

``OUT/results.json`` (``OUT`` = spec.output) has the shape of ``status.results`` (the ``Results`` model)
and is rewritten after every part, so the numbers computed before a failure are kept; with ``checkpoints:
every`` it also holds ``history``, one Results per evaluated checkpoint (with ``checkpoint`` and ``step``).
The judge's answers and verdicts go to ``OUT/judgments[-<checkpoint>].jsonl``. ``outputs.json`` (the
completion marker) is written only when everything succeeded, last.

Every input and ``OUT`` may be on object storage (``s3://…``, through :mod:`lmforge_jobs.storage`: endpoint
and credentials from the environment). Results files are written whole or not at all
(``storage.write_text_atomic``), so a reader never takes half an object for results; access denied, a
missing bucket or a missing object is a ConfigError naming the spec field.

Inputs that can be checked without a model (model directories, task files, the prompts file, secrets,
the perplexity data, the output's bucket) are checked first, so a typo fails in a second with
``error: spec.<field>: …`` and exit 64.

``checkpoints: every`` follows ``spec.checkpointDir`` (the PretrainRun's ``checkpoints/``, on a volume or in
object storage, where each poll lists afresh): each complete checkpoint
(``lmforge_jobs.pretrain.checkpoint.list_complete``) not evaluated yet is exported to a scratch Hugging
Face directory and evaluated, oldest first. **Stop rule**: the job ends successfully once the
PretrainRun's ``outputs.json`` (in the checkpoint directory's parent, the run's spec.output) existed
*before* a listing that found no checkpoint left to evaluate — so every checkpoint written before the run
finished is evaluated. It fails (exit 64, field ``checkpoints``) when the run does not finish and no new
checkpoint appears for ``checkpointTimeoutSeconds``. A restarted job resumes: checkpoints already in
``history`` (same spec) are not evaluated again. A checkpoint the run deleted (``keep``) before it could be
exported is skipped with a warning.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lmforge_jobs import storage
from lmforge_jobs.entry import ConfigError
from lmforge_jobs.evaluate import arena as arena_mod
from lmforge_jobs.evaluate import judge as judge_mod
from lmforge_jobs.evaluate.benchmarks import check_task_path, make_lm, run_benchmark
from lmforge_jobs.evaluate.config import Checkpoints, EvaluationSpec, JudgeModel, Results
from lmforge_jobs.evaluate.models import (
    LoadedModel,
    check_model_dir,
    free,
    load_model,
    model_name,
)
from lmforge_jobs.evaluate.perplexity import evaluate_perplexity, is_token_shards, text_files
from lmforge_jobs.manifest import Resource
from lmforge_jobs.secrets import read_secret
from lmforge_jobs.spec import ModelRef
from lmforge_jobs.telemetry import Telemetry

KIND = "Evaluation"
RESULTS = "results.json"


# ----------------------------------------------------------------------------------------- results file
def spec_digest(spec: EvaluationSpec) -> str:
    """What the results depend on (not where they go): a resumed job keeps history only for the same."""
    doc = spec.to_yaml_dict()
    for key in ("output", "queue", "image", "resources", "checkpointPollSeconds", "checkpointTimeoutSeconds"):
        doc.pop(key, None)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def clean(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` checked against the Results model (status.results), camelCase."""
    doc = Results.model_validate(results).model_dump(by_alias=True, exclude_none=True, mode="json")
    return {k: v for k, v in doc.items() if v != {}}


class ResultsFile:
    """``OUT/results.json``: the latest Results, plus ``history`` for checkpoints: every."""

    def __init__(self, output: str, digest: str, keep_history: bool):
        self.output = output
        self.digest = digest
        self.keep_history = keep_history
        self.history: list[dict[str, Any]] = []
        self.latest: dict[str, Any] = {}
        if keep_history:
            previous = self.read()
            if previous.get("specDigest") == digest and isinstance(previous.get("history"), list):
                self.history = previous["history"]
                self.latest = self.history[-1] if self.history else {}

    @property
    def uri(self) -> str:
        return storage.join(self.output, RESULTS)

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(storage.read_text(self.uri))
        except (OSError, ValueError):
            return {}

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {**clean(self.latest), "specDigest": self.digest}
        if self.keep_history:
            doc["history"] = [clean(h) for h in self.history]
        return doc

    def save(self, latest: dict[str, Any] | None = None) -> None:
        if latest is not None:
            self.latest = latest
        text = json.dumps(self.document(), indent=2, sort_keys=True, default=str) + "\n"
        storage.write_text_atomic(self.uri, text)  # whole or not at all, on a disk or an object store

    def append(self, results: dict[str, Any]) -> None:
        self.history.append(results)
        self.save(results)


# ------------------------------------------------------------------------------------------- preflight
def _model_field(ref: ModelRef, field: str) -> None:
    if ref.reference() is not None:
        raise ConfigError(field, "references by name must be resolved first (lmforge run or the operator)")
    if ref.path is not None:
        check_model_dir(ref.path, f"{field}.path")
    if ref.token is not None:
        read_secret(ref.token, f"{field}.token")


def preflight(spec: EvaluationSpec) -> list[str] | None:
    """Check every input that needs no model; returns the judge prompts (read once) when there is a judge."""
    if spec.checkpoints == Checkpoints.final:
        _model_field(spec.model, "model")
    elif spec.checkpoint_dir is None:
        raise ConfigError("checkpointDir", "checkpoints: every needs the PretrainRun's checkpoint directory")
    if spec.perplexity is not None:
        ppl = spec.perplexity
        if ppl.seq_len is not None and ppl.stride is not None and ppl.stride > ppl.seq_len:
            raise ConfigError("perplexity.stride", f"stride {ppl.stride} is larger than seqLen {ppl.seq_len}")
        data = str(ppl.data)
        if not is_token_shards(data):
            text_files(data)  # raises for a missing path or a directory without data
    for i, bench in enumerate(spec.benchmarks):
        if bench.task_path is not None:
            check_task_path(bench.task_path, f"benchmarks[{i}].taskPath")
    prompts = None
    if spec.judge is not None:
        judge = spec.judge
        prompts = judge_mod.read_prompts(judge.prompts, "judge.prompts", judge.limit)
        _model_field(judge.reference, "judge.reference")
        if spec.arena is not None:
            for i, ref in enumerate(spec.arena.opponents):
                _model_field(ref, f"arena.opponents[{i}]")
        if judge.model.path is not None:
            check_model_dir(judge.model.path, "judge.model.path")
        if judge.model.endpoint is not None and judge.model.endpoint.api_key is not None:
            read_secret(judge.model.endpoint.api_key, "judge.model.endpoint.apiKey")
    return prompts


# ------------------------------------------------------------------------------------------- evaluator
def parts_per_model(spec: EvaluationSpec) -> int:
    return (spec.perplexity is not None) + len(spec.benchmarks) + (spec.judge is not None)


class Evaluator:
    """Evaluates one model after another with the same spec; caches what does not depend on the model
    (the reference's and opponents' answers, their games, the judge)."""

    def __init__(self, spec: EvaluationSpec, tel: Telemetry, file: ResultsFile, prompts: list[str] | None):
        self.spec = spec
        self.tel = tel
        self.file = file
        self.prompts = prompts
        self.gpus = spec.parallelism.gpus_per_node
        self.scratch = Path(tempfile.mkdtemp(prefix="lmforge-eval-"))
        self.step = 0
        self.total = parts_per_model(spec)
        self.answers: dict[str, list[str]] = {}
        self.games: dict[tuple[str, str], list[judge_mod.Comparison]] = {}
        self.names: dict[str, str] = {}  # field → unique display name
        self._judge: Any = None
        self._judge_model: LoadedModel | None = None
        self.bench_gauge = tel.gauge(
            "lmforge_eval_benchmark", "lm-eval benchmark metric of the evaluated model", ("task", "metric")
        )
        self.rating_gauge = tel.gauge(
            "lmforge_eval_arena_rating", "Bradley-Terry rating (Elo scale)", ("model",)
        )

    # ------------------------------------------------------------------------------------------ helpers
    def _progress(self, stage: str, metrics: dict[str, Any] | None = None, tokens: int | None = None) -> None:
        self.tel.update(
            step=self.step, total_steps=self.total, stage=stage, metrics=metrics, tokens=tokens, force=True
        )

    def _part_done(self, stage: str, results: dict[str, Any], metrics: dict[str, Any] | None = None) -> None:
        self.step += 1
        self.file.save(results)
        self._progress(stage, metrics)

    def close(self) -> None:
        free(self._judge_model)
        import shutil

        shutil.rmtree(self.scratch, ignore_errors=True)

    # ----------------------------------------------------------------------------------------- one model
    def evaluate(
        self, ref: ModelRef, field: str, checkpoint: str | None = None, step: int | None = None
    ) -> dict[str, Any]:
        """All parts of the spec for one model; the Results dict (camelCase)."""
        spec = self.spec
        results: dict[str, Any] = {}
        if checkpoint is not None:
            results["checkpoint"] = checkpoint
        if step is not None:
            results["step"] = step
        label = checkpoint or model_name(spec.model)
        self._progress(f"loading {label}")
        loaded = load_model(ref, field, precision=spec.precision, gpus=self.gpus, name=label)
        try:
            if spec.perplexity is not None:
                self._perplexity(loaded, results)
            if spec.benchmarks:
                self._benchmarks(loaded, results)
            if spec.judge is not None:
                self._judge_part(loaded, results, checkpoint)
        finally:
            free(loaded)
        return results

    def _perplexity(self, loaded: LoadedModel, results: dict[str, Any]) -> None:
        ppl = self.spec.perplexity
        assert ppl is not None
        self._progress("perplexity")
        last = [0.0]

        def progress(tokens: int) -> None:
            if time.monotonic() - last[0] >= 1.0:
                last[0] = time.monotonic()
                self.tel.update(tokens=tokens, stage="perplexity")

        out = evaluate_perplexity(
            loaded.model,
            loaded.tokenizer,
            str(ppl.data),
            seq_len=ppl.seq_len,
            stride=ppl.stride,
            batch_size=ppl.batch_size,
            max_tokens=ppl.max_tokens,
            on_progress=progress,
        )
        results.update(out.as_results())
        print(
            f"perplexity {out.perplexity:.4f} (nll {out.nll:.4f} nats/token, {out.bits_per_byte or 0:.4f} bits/byte) "
            f"on {out.tokens} tokens of {out.documents} documents",
            flush=True,
        )
        self.tel.update(tokens=out.tokens)
        self._part_done("perplexity", results, out.as_results())

    def _benchmarks(self, loaded: LoadedModel, results: dict[str, Any]) -> None:
        lm = make_lm(loaded.model, loaded.tokenizer, self.spec.batch_size)
        benchmarks: dict[str, dict[str, float]] = results.setdefault("benchmarks", {})
        for i, bench in enumerate(self.spec.benchmarks):
            self._progress(f"benchmark {bench.task or Path(str(bench.task_path)).stem}")
            found = run_benchmark(bench, i, lm, self.scratch)
            benchmarks.update(found)
            for task, metrics in found.items():
                for metric, value in metrics.items():
                    self.bench_gauge.labels(task=task, metric=metric).set(value)
                print(
                    f"benchmark {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True
                )
            self._part_done("benchmarks", results)

    # --------------------------------------------------------------------------------------------- judge
    def judge(self) -> Any:
        """The judge callable, built once (a local judge model stays loaded)."""
        if self._judge is not None:
            return self._judge
        j = self.spec.judge
        assert j is not None
        jm: JudgeModel = j.model
        if jm.endpoint is not None:
            key = (
                read_secret(jm.endpoint.api_key, "judge.model.endpoint.apiKey")
                if jm.endpoint.api_key
                else None
            )
            self._judge = judge_mod.EndpointJudge(
                jm.endpoint.url, jm.endpoint.model_name, key, max_tokens=j.verdict_max_tokens
            )
        else:
            ref = ModelRef(huggingface=jm.huggingface) if jm.huggingface else ModelRef(path=jm.path)
            self._judge_model = load_model(ref, "judge.model", precision=self.spec.precision, gpus=self.gpus)
            self._judge = judge_mod.LocalJudge(
                self._judge_model.model,
                self._judge_model.tokenizer,
                max_tokens=j.verdict_max_tokens,
                batch_size=self.spec.batch_size,
            )
        return self._judge

    def _generate(self, loaded: LoadedModel) -> list[str]:
        j = self.spec.judge
        assert j is not None and self.prompts is not None
        return judge_mod.generate(
            loaded.model,
            loaded.tokenizer,
            self.prompts,
            max_new_tokens=j.max_new_tokens,
            temperature=j.temperature,
            batch_size=self.spec.batch_size,
        )

    def _others(self) -> list[tuple[str, ModelRef]]:
        """(field, ref) of the models the evaluated one is compared with: the reference, then opponents."""
        j = self.spec.judge
        assert j is not None
        found = [("judge.reference", j.reference)]
        if self.spec.arena is not None:
            found += [(f"arena.opponents[{i}]", r) for i, r in enumerate(self.spec.arena.opponents)]
        return found

    def _name(self, field: str, ref: ModelRef, taken: set[str]) -> str:
        if field not in self.names:
            base = model_name(ref)
            name = base if base not in taken else f"{base} ({field})"
            self.names[field] = name
        taken.add(self.names[field])
        return self.names[field]

    def _answers_of(self, field: str, ref: ModelRef) -> list[str]:
        if field not in self.answers:
            self._progress(f"answers of {field}")
            other = load_model(ref, field, precision=self.spec.precision, gpus=self.gpus)
            try:
                self.answers[field] = self._generate(other)
            finally:
                free(other)
        return self.answers[field]

    def _judge_part(self, loaded: LoadedModel, results: dict[str, Any], checkpoint: str | None) -> None:
        j = self.spec.judge
        assert j is not None and self.prompts is not None
        self._progress("judge: answers")
        own = self._generate(loaded)
        others = self._others()
        taken: set[str] = {loaded.name}
        names = [loaded.name] + [self._name(f, r, taken) for f, r in others]
        answers = [own] + [self._answers_of(f, r) for f, r in others]
        judge = self.judge()
        self._progress("judge: verdicts")
        transcript: list[dict[str, Any]] = []

        def judged(a: int, b: int, cache: bool) -> list[judge_mod.Comparison]:
            key = (others[a - 1][0], others[b - 1][0]) if cache else None
            if key is not None and key in self.games:
                return self.games[key]
            comps = judge_mod.compare(judge, self.prompts, answers[a], answers[b], j.swap_positions)
            for prompt, comp, x, y in zip(self.prompts, comps, answers[a], answers[b], strict=True):
                transcript.append(
                    {
                        "prompt": prompt,
                        "a": names[a],
                        "b": names[b],
                        "answerA": x,
                        "answerB": y,
                        "replies": comp.replies,
                        "outcome": comp.outcome,
                    }
                )
            if key is not None:
                self.games[key] = comps
            return comps

        vs_reference = judged(0, 1, cache=False)
        verdict = judge_mod.win_rate(vs_reference, j.bootstrap_samples)
        results["judge"] = verdict
        print(
            f"judge: win rate {verdict.get('winRate', float('nan')):.3f} against {names[1]} "
            f"({verdict['wins']} wins, {verdict['losses']} losses, {verdict['ties']} ties, "
            f"{verdict['unparseable']} unparseable verdicts)",
            flush=True,
        )
        metrics = {"judgeWinRate": verdict["winRate"]} if "winRate" in verdict else {}
        if self.spec.arena is not None:
            games: list[tuple[int, int, float]] = []
            scores = {judge_mod.WIN: 1.0, judge_mod.TIE: 0.5, judge_mod.LOSS: 0.0}
            for a in range(len(names)):
                for b in range(a + 1, len(names)):
                    comps = vs_reference if (a, b) == (0, 1) else judged(a, b, cache=a > 0)
                    games += [(a, b, scores[c.outcome]) for c in comps if c.outcome is not None]
            ratings = arena_mod.rate(names, games, bootstrap_samples=j.bootstrap_samples)
            results["arena"] = ratings
            for name, rating in ratings.items():
                self.rating_gauge.labels(model=name).set(float(rating["rating"]))
            print("arena: " + ", ".join(f"{n} {r['rating']:.0f}" for n, r in ratings.items()), flush=True)
        suffix = f"-{checkpoint}" if checkpoint else ""
        judge_mod.save_transcript(
            storage.join(self.spec.output or ".", f"judgments{suffix}.jsonl"), transcript
        )
        self._part_done("judge", results, metrics)


# -------------------------------------------------------------------------------------------- follow
def follow_checkpoints(spec: EvaluationSpec, evaluator: Evaluator, file: ResultsFile) -> None:
    """checkpoints: every — evaluate each complete checkpoint as it lands (see the module docstring)."""
    from lmforge_jobs.pretrain.checkpoint import list_complete
    from lmforge_jobs.pretrain.export import export_checkpoint

    root = str(spec.checkpoint_dir)
    fs, path = storage.filesystem(root)
    run_outputs = storage.join(storage.to_uri(fs, path.rpartition("/")[0]), "outputs.json")
    done = {int(h["step"]) for h in file.history if h.get("step") is not None}
    per_model = parts_per_model(spec)
    last_new = time.monotonic()
    while True:
        storage.refresh(root)  # what the run wrote since the last poll, not a listing cached then
        storage.refresh(run_outputs)
        finished = storage.exists(run_outputs)  # looked at before listing: see the stop rule
        todo = [(s, d) for s, d in list_complete(root) if s not in done]
        evaluator.total = per_model * (len(done) + len(todo))
        for step, directory in todo:
            name = Path(directory).name
            with tempfile.TemporaryDirectory(prefix="lmforge-ckpt-") as tmp:
                try:
                    export_checkpoint(directory, tmp)
                except FileNotFoundError as exc:  # removed by the run's checkpoint retention meanwhile
                    print(
                        f"warning: checkpoint {name} disappeared before it was evaluated: {exc}",
                        file=sys.stderr,
                    )
                    done.add(step)
                    evaluator.total -= per_model
                    continue
                print(f"evaluating checkpoint {name} (step {step})", flush=True)
                results = evaluator.evaluate(ModelRef(path=tmp), "checkpointDir", checkpoint=name, step=step)
            file.append(results)
            done.add(step)
            last_new = time.monotonic()
        if todo:
            continue
        if finished:
            break
        if time.monotonic() - last_new > spec.checkpoint_timeout_seconds:
            raise ConfigError(
                "checkpoints",
                f"no new checkpoint in {root} for {spec.checkpoint_timeout_seconds} s and the PretrainRun has not "
                f"finished ({run_outputs} is missing)",
            )
        evaluator._progress("waiting for checkpoints")
        time.sleep(spec.checkpoint_poll_seconds)
    if not file.history:
        raise ConfigError(
            "checkpointDir", f"the PretrainRun finished but {root} holds no complete checkpoint"
        )


# ----------------------------------------------------------------------------------------------- main
def quiet_progress_bars() -> None:
    """No download/loading progress bars in job logs (progress goes to progress.json and Prometheus)."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's request bars; read when tqdm is imported
    try:
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    except (ImportError, AttributeError):  # pragma: no cover - both come with the eval extra
        pass


def run(resource: Resource[Any, Any], args: argparse.Namespace | None = None) -> int:
    """Run the Evaluation described by a resolved resource; the job's exit code."""
    spec: EvaluationSpec = resource.spec
    output = str(spec.output)
    quiet_progress_bars()
    tel = Telemetry(KIND, output)
    every = spec.checkpoints == Checkpoints.every
    storage.check_bucket(output, "output")  # before the first write: a missing bucket is never created
    file = ResultsFile(output, spec_digest(spec), keep_history=every)
    file.save()  # a results.json of an earlier run must not pass for this one's
    prompts = preflight(spec)
    evaluator = Evaluator(spec, tel, file, prompts)
    try:
        if every:
            follow_checkpoints(spec, evaluator, file)
        else:
            results = evaluator.evaluate(spec.model, "model")
            file.save(results)
    except ConfigError:
        raise
    except BaseException as exc:
        tel.fail(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        evaluator.close()
    outputs = {"results": file.uri}
    tel.finish(outputs, results=clean(file.latest))  # writes outputs.json beside the output, last
    return 0


__all__ = ["Evaluator", "ResultsFile", "follow_checkpoints", "preflight", "run", "spec_digest"]
