"""The local runner: a manifest set in dependency order, each resource skipped, resumed or run, and its
status written to ``WORKDIR/<kind>/<name>/status.json`` (see the package docstring)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge_jobs.kinds import KINDS
from lmforge_jobs.manifest import Problem, Resource, load_resources
from lmforge_jobs.resolve import UnresolvedReference, default_output, dependencies, dependency_order, resolve
from lmforge_jobs.spec import EXIT_CONFIG_ERROR, spec_hash
from lmforge_jobs.storage import is_remote, local_path, read_json
from lmforge_jobs.telemetry import RUN_DIR_ENV, read_progress, write_json_atomic
from lmforge_operator import status as status_helpers
from lmforge_operator.local.launch import (
    STOP_GRACE_SECONDS,
    Launch,
    MeshRefused,
    command,
    local_gpus,
    processes_for,
)
from lmforge_operator.local.storage import storage_env

LOCAL_KEYS = ("specHash", "output")
"""The runner's own bookkeeping in status.json, beside the CRD's status fields."""


class RunError(Exception):
    """The manifest set cannot run (invalid, a cycle, a dangling reference); nothing was started."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# ----------------------------------------------------------------------------------------------- layout
def resource_dir(workdir: Path, kind: str, name: str) -> Path:
    return workdir / KINDS[kind].singular / name


def read_status(workdir: Path, kind: str, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((resource_dir(workdir, kind, name) / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def load_set(paths: Iterable[str]) -> list[Resource[Any, Any]]:
    resources, problems = load_resources(paths)
    if problems:
        raise RunError(problems)
    if not resources:
        raise RunError([Problem(" ".join(paths), "?", "(set)", "no lmforge resources found")])
    return resources


# ---------------------------------------------------------------------------------------------- ordering
def order(resources: list[Resource[Any, Any]], workdir: Path) -> list[Resource[Any, Any]]:
    """Resources in an order where each comes after everything it refers to.

    A reference to a resource outside the set is fine when an earlier ``lmforge run`` in ``workdir``
    finished it; otherwise it is dangling. Raises RunError for dangling references and cycles.
    """
    by_ref = {(r.kind, r.name): r for r in resources}
    problems: list[Problem] = []
    for resource in resources:
        for field_path, ref, _ in dependencies(resource):
            if ref in by_ref:
                continue
            finished = read_status(workdir, *ref)
            if not (finished and finished.get("phase") == "Succeeded"):
                problems.append(
                    Problem(
                        "(set)",
                        resource.ref,
                        f"spec.{field_path}",
                        f"refers to {ref[0]}/{ref[1]}, which is neither in the manifests given nor finished "
                        f"in {workdir}",
                    )
                )
    if problems:
        raise RunError(problems)

    def needs(ref: tuple[str, str]) -> list[tuple[str, str]]:
        return [dependency for _, dependency, _ in dependencies(by_ref[ref]) if dependency in by_ref]

    ordered, cycles = dependency_order(by_ref, needs)
    if cycles:
        cycle = cycles[0]
        path = " → ".join(f"{kind}/{name}" for kind, name in cycle)
        raise RunError([Problem("(set)", f"{cycle[0][0]}/{cycle[0][1]}", "spec", f"reference cycle: {path}")])
    return [by_ref[ref] for ref in ordered]


# ------------------------------------------------------------------------------------------------ status
_ENVIRONMENT_LOCK = threading.RLock()
"""One job's variables in os.environ at a time: trials run side by side in threads (local.parallel)."""


@contextlib.contextmanager
def job_environment(env: dict[str, str]) -> Iterator[None]:
    """This process's environment with a job's storage variables on top, for the runner's own reads of
    the job's inputs and results (the same store the job reaches)."""
    with _ENVIRONMENT_LOCK:
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def apply_results(status: dict[str, Any], resource: Resource[Any, Any], output: str) -> None:
    """Kind-specific final numbers: Corpus counts from stats.json, Evaluation results from results.json
    (read where the output is: a local directory or object storage)."""
    filename = {"Corpus": "stats.json", "Evaluation": "results.json"}.get(resource.kind)
    if filename is None:
        return
    data = read_json(f"{output.rstrip('/')}/{filename}")
    if not isinstance(data, dict):
        return
    if resource.kind == "Corpus":
        status.update(status_helpers.corpus_counts(data))
        status["stage"] = "Done"
    else:
        status.update(status_helpers.evaluation_results(data))


def run_hash(resource: Resource[Any, Any], inputs: Iterable[Any] = ()) -> str:
    """Identity of a run (``specHash`` in status.json): its resolved spec plus what identifies its inputs
    (see LocalRunner.input_ids)."""
    return spec_hash([resource.spec.to_yaml_dict(), list(inputs)])


def last_error(log: str) -> str:
    """The job's last ``error:`` line, else its last unindented line."""
    for line in reversed(log.splitlines()):
        line = line.strip()
        if line.startswith("error:"):
            return line.removeprefix("error:").strip()
    for line in reversed(log.splitlines()):
        if line.strip() and not line.startswith(" "):
            return line.strip()[:500]
    return ""


def tokenizer_vocab(uri: str) -> int | None:
    """Vocabulary size of a tokenizer.json (file or directory), for the plan; None when unknown."""
    text = str(uri).rstrip("/")
    data = read_json(text if text.endswith(".json") else f"{text}/tokenizer.json")
    if not isinstance(data, dict):
        return None
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [token.get("id", 0) for token in data.get("added_tokens") or []]
    return max(ids) + 1 if ids else None


# ------------------------------------------------------------------------------------------------ runner
@dataclass
class Outcome:
    resource: Resource[Any, Any]
    phase: str
    message: str = ""
    skipped: bool = False


@dataclass
class LocalRunner:
    """Runs a manifest set in dependency order; see the package docstring."""

    workdir: Path
    display: Any = None  # lmforge_operator.progress.Display or None
    metrics: Any = None  # lmforge_operator.progress.RunMetrics or None
    poll_seconds: float = 0.5
    stop_grace_seconds: float = STOP_GRACE_SECONDS
    gpus: int = field(default_factory=local_gpus)
    interrupted: bool = False
    env: dict[str, str] = field(default_factory=dict)
    s3_endpoint: str | None = None
    """``--s3-endpoint``: the S3 endpoint of every job, before spec.storage.endpoint (local.storage)."""
    parallel: int | None = None
    """``--parallel``: a Sweep's trials or a study's points at once, at most (None: what the machine
    allows, see local.parallel)."""
    status_lock: Any = field(default_factory=threading.RLock, repr=False, compare=False)
    """Held while a Sweep or ScalingStudy writes its own status.json (its children run in threads)."""
    _launches: set[Launch] = field(default_factory=set, init=False, repr=False, compare=False)

    def run(self, resources: list[Resource[Any, Any]]) -> list[Outcome]:
        ordered = order(resources, self.workdir)
        outcomes: list[Outcome] = []
        failed: set[tuple[str, str]] = set()
        previous_sigint = signal.signal(signal.SIGINT, self._on_signal)
        previous_sigterm = signal.signal(signal.SIGTERM, self._on_signal)
        try:
            for resource in ordered:
                if self.interrupted:
                    break
                blocked = [ref for _, ref, _ in dependencies(resource) if ref in failed]
                if blocked:
                    failed.add((resource.kind, resource.name))
                    message = f"not run: {blocked[0][0]}/{blocked[0][1]} did not succeed"
                    self._not_run(resource, status_helpers.DEPENDENCY_FAILED, message)
                    outcomes.append(Outcome(resource, "Waiting", message))
                    continue
                outcome = self.run_one(resource)
                outcomes.append(outcome)
                if outcome.phase != "Succeeded":
                    failed.add((resource.kind, resource.name))
        finally:
            signal.signal(signal.SIGINT, previous_sigint)
            signal.signal(signal.SIGTERM, previous_sigterm)
        return outcomes

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.interrupted:  # second Ctrl-C: stop waiting for a graceful exit
            raise KeyboardInterrupt
        self.interrupted = True

    # --------------------------------------------------------------------------------------- one resource
    def outputs_of(self, kind: str, name: str) -> dict[str, Any]:
        status = read_status(self.workdir, kind, name) or {}
        return status.get("outputs") or {}

    def resolved(self, resource: Resource[Any, Any]) -> Resource[Any, Any]:
        outputs = {ref: self.outputs_of(*ref) for _, ref, _ in dependencies(resource)}
        output = default_output(resource.kind, resource.name, str(self.workdir.resolve()))
        return resolve(resource, outputs, output)

    def run_one(self, resource: Resource[Any, Any], *, stop_when: Any = None, slot: Any = None) -> Outcome:
        """Skip, resume or run one resource and write its status. ``stop_when`` is called with the job's
        run directory at every poll; True stops the job (a pruned trial). ``slot`` (a
        local.parallel.Slot) is where it runs when it runs beside others: its GPUs or CPU threads."""
        if not KINDS[resource.kind].job:  # it runs other resources: a Sweep's trials, a study's points
            from lmforge_operator.local.scaling import run_study
            from lmforge_operator.local.sweep import run_sweep

            return {"Sweep": run_sweep, "ScalingStudy": run_study}[resource.kind](self, resource)
        kind, name = resource.kind, resource.name
        run_dir = resource_dir(self.workdir, kind, name)
        try:
            job = self.resolved(resource)
        except UnresolvedReference as exc:
            self._not_run(resource, status_helpers.DEPENDENCY_NOT_READY, str(exc))
            return Outcome(resource, "Waiting", str(exc))
        output = str(job.spec.output)
        # the job reports into the run directory (LMFORGE_RUN_DIR), wherever its output is
        outputs_file = run_dir / "outputs.json"
        digest = run_hash(job, self.input_ids(resource))
        previous = read_status(self.workdir, kind, name) or {}
        if (
            previous.get("phase") == "Succeeded"
            and previous.get("specHash") == digest
            and outputs_file.exists()
        ):
            if self.display:
                self.display.skipped(resource, "up to date")
            return Outcome(resource, "Succeeded", "up to date", skipped=True)

        if previous.get("specHash") not in (None, digest):
            self._discard_stale(resource, output)
        run_dir.mkdir(parents=True, exist_ok=True)
        manifest = run_dir / "manifest.yaml"
        document = job.model_dump(by_alias=True, exclude_none=True, mode="json")
        document.pop("status", None)
        manifest.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
        status: dict[str, Any] = {
            k: v for k, v in previous.items() if k in ("conditions", "startTime", "plan")
        }
        status["startTime"] = status.get("startTime") or status_helpers.now_iso()
        status["specHash"] = digest
        status["output"] = output
        with job_environment(storage_env(job, self.s3_endpoint)):  # the tokenizer may be on object storage
            plan = self._plan(job)
        if plan:
            status["plan"] = plan
        try:
            gpus = len(slot.devices) if slot is not None and slot.devices else self.gpus
            processes = processes_for(job, gpus)
        except MeshRefused as exc:  # what the job would refuse with exit 64, before any process starts
            phase = status_helpers.set_state(status, "Invalid", status_helpers.CONFIG_ERROR, str(exc))
            self._save(resource, status)
            if self.display:
                self.display.finished(resource, phase, str(exc))
            return Outcome(resource, phase, str(exc))
        resumed = (run_dir / "logs").exists()
        status_helpers.set_state(
            status, "Running", status_helpers.JOB_RUNNING, "job resumed" if resumed else "job started"
        )
        self._save(resource, status)

        env = {
            "LMFORGE_METRICS_PORT": "off",
            "PYTHONUNBUFFERED": "1",
            "LMFORGE_WORKDIR": str(self.workdir.resolve()),
            **storage_env(job, self.s3_endpoint),
            RUN_DIR_ENV: str(run_dir.resolve()),
            **self.env,
            **(slot.env() if slot is not None else {}),
        }
        if self.display:
            self.display.started(resource, processes, gpus)
        launch = Launch(
            f"{kind.lower()}-{name}", command(job, manifest.resolve(), processes), env, run_dir / "logs"
        )
        self._launches.add(launch)
        try:
            code, stopped_early = self._wait(resource, launch, status, run_dir, stop_when)
        finally:
            launch.kill()  # whatever ended the wait (a second Ctrl-C included), nothing of the job is left
            self._launches.discard(launch)

        if code == 0 and outputs_file.exists() and not self.interrupted:
            status["outputs"] = json.loads(outputs_file.read_text(encoding="utf-8"))
            with job_environment(storage_env(job, self.s3_endpoint)):
                apply_results(status, resource, output)
            status["completionTime"] = status_helpers.now_iso()
            status_helpers.set_state(status, "Succeeded", status_helpers.JOB_SUCCEEDED, "outputs complete")
            phase, message = "Succeeded", ""
        elif self.interrupted:
            message = "interrupted; run again to resume from the last checkpoint"
            phase = status_helpers.set_state(status, "Failed", status_helpers.INTERRUPTED, message)
        elif stopped_early:
            message = "stopped early"
            phase = status_helpers.set_state(status, "Failed", status_helpers.JOB_FAILED, message)
        else:
            log = launch.log_tail(20)
            progress = read_progress(run_dir) or {}
            if code == EXIT_CONFIG_ERROR or progress.get("state") == "Invalid":
                message = progress.get("message") or last_error(log) or "configuration error"
                phase = status_helpers.set_state(status, "Invalid", status_helpers.CONFIG_ERROR, message)
            else:
                message = last_error(log) or f"job exited with code {code}"
                phase = status_helpers.set_state(status, "Failed", status_helpers.JOB_FAILED, message)
            if self.display:
                self.display.log(resource, log)
        self._save(resource, status)
        if self.display:
            self.display.finished(resource, phase, message)
        return Outcome(resource, phase, message)

    def kill_running(self) -> None:
        """SIGKILL to every job still running (a second Ctrl-C while trials run in threads)."""
        for launch in list(self._launches):
            launch.kill()

    def _wait(
        self,
        resource: Resource[Any, Any],
        launch: Launch,
        status: dict[str, Any],
        run_dir: Path,
        stop_when: Any = None,
    ) -> tuple[int, bool]:
        """Mirror the job's progress until it exits (stopping it once ``lmforge run`` is interrupted, or
        once ``stop_when`` says so); its exit code and whether ``stop_when`` stopped it."""
        code: int | None = None
        stopped = stopped_early = False
        while code is None:
            time.sleep(self.poll_seconds)
            if self.interrupted and not stopped:
                stopped = True
                if self.display:
                    self.display.note(resource, "interrupted: stopping the job (it saves its state)")
                launch.stop(self.stop_grace_seconds)
            code = launch.poll()
            self._progress(resource, status, run_dir)
            if code is None and not stopped and stop_when is not None and stop_when(run_dir):
                stopped = stopped_early = True
                launch.stop(self.stop_grace_seconds)
                code = launch.poll()
        self._progress(resource, status, run_dir)
        return code, stopped_early

    def input_ids(self, resource: Resource[Any, Any]) -> list[list[str]]:
        """(kind, name, run identity, completion time) of each dependency: a dependency that ran again
        makes its dependents run again, although their resolved specs (paths) are unchanged."""
        ids = []
        for _, ref, _ in dependencies(resource):
            dependency_status = read_status(self.workdir, *ref) or {}
            ids.append(
                [
                    *ref,
                    str(dependency_status.get("specHash", "")),
                    str(dependency_status.get("completionTime", "")),
                ]
            )
        return sorted(ids)

    def _discard_stale(self, resource: Resource[Any, Any], output: str) -> None:
        """The spec or an input changed since the last run: its completion marker no longer counts.

        A Corpus in the work directory starts over (datatrove's per-rank completion markers do not know
        the spec); the training jobs decide themselves what of their checkpoints they can keep."""
        with contextlib.suppress(OSError):
            (resource_dir(self.workdir, resource.kind, resource.name) / "outputs.json").unlink()
        if is_remote(output):
            if resource.kind == "Corpus" and self.display:
                self.display.note(
                    resource,
                    f"spec changed: stages already complete in {output} are kept (delete it to start over)",
                )
            return
        output_dir = local_path(output)
        with contextlib.suppress(OSError):
            (output_dir / "outputs.json").unlink()  # the job's own marker beside its output
        inside = output_dir.resolve().is_relative_to(self.workdir.resolve())
        if resource.kind == "Corpus" and inside and output_dir.is_dir():
            if self.display:
                self.display.note(resource, "spec changed: starting the corpus over")
            for child in output_dir.iterdir():
                if child.name != "status.json":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()

    def _plan(self, job: Resource[Any, Any]) -> dict[str, Any] | None:
        """The compute plan of a PretrainRun, shown before it starts and kept in status.plan."""
        if job.kind != "PretrainRun":
            return None
        from lmforge_jobs import plan as planner

        vocab = tokenizer_vocab(job.spec.data.tokenizer) if job.spec.data is not None else None
        try:
            plan = planner.plan_pretrain(job.spec, vocab_size=vocab)
        except ValueError:
            return None
        if self.display:
            self.display.plan(job, planner.explain(plan))
        return plan.to_status().to_yaml_dict()

    def _progress(self, resource: Resource[Any, Any], status: dict[str, Any], run_dir: Path) -> None:
        progress = read_progress(run_dir)
        if not progress:
            return
        status_helpers.apply_progress(status, resource.kind, progress)
        self._save(resource, status)
        if self.display:
            self.display.progress(resource, progress)
        if self.metrics:
            self.metrics.observe(resource, progress)

    def _save(self, resource: Resource[Any, Any], status: dict[str, Any]) -> None:
        bookkeeping = {k: status[k] for k in LOCAL_KEYS if k in status}
        body = status_helpers.validated_status(
            resource.kind, {k: v for k, v in status.items() if k not in LOCAL_KEYS}
        )
        body.update(bookkeeping)
        write_json_atomic(resource_dir(self.workdir, resource.kind, resource.name) / "status.json", body)

    def _not_run(self, resource: Resource[Any, Any], reason: str, message: str) -> None:
        """A resource left Waiting: a dependency failed or has no outputs yet."""
        status: dict[str, Any] = {}
        status_helpers.set_state(status, "Waiting", reason, message)
        self._save(resource, status)
        if self.display:
            self.display.finished(resource, "Waiting", message)
