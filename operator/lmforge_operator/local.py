"""``lmforge run``: the same manifests on one machine, without a cluster.

``lmforge run PATH... [--workdir lmforge-runs]`` loads the manifests, orders them by their references (a
cycle or a reference to nothing is an error before anything runs), and runs each resource through the
same entry points a cluster uses: the Corpus job with its local workers, PretrainRun and AlignmentRun under
torchrun, the Evaluation job — each launched by torchx's local scheduler. References resolve to the
outputs of the resources run before (:mod:`lmforge_jobs.resolve`).

Everything of ``<kind>/<name>`` lies in ``WORKDIR/<kind>/<name>/``: the resolved ``manifest.yaml``, the
job's logs, its outputs (unless spec.output points elsewhere), ``progress.json``/``metrics.jsonl`` written by
the job and ``status.json`` (the resource's status, in the CRD's status schema) written here. A rerun skips
resources whose outputs are complete for the same resolved spec and resumes interrupted ones (the jobs
resume from their checkpoints and completion markers). Ctrl-C stops the running job gracefully: it saves
a checkpoint before exiting.

This module never imports torch: jobs run in their own processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from lmforge_jobs.data.config import CorpusStage
from lmforge_jobs.manifest import Problem, Resource, load_resources
from lmforge_jobs.resolve import (
    UnresolvedReference,
    default_output,
    dependencies,
    resolve,
)
from lmforge_jobs.spec import EXIT_CONFIG_ERROR, Condition, derive_phase
from lmforge_jobs.telemetry import read_progress, write_json_atomic
from lmforge_operator import status as status_helpers
from lmforge_operator.status import corpus_counts, evaluation_results, metrics_for_status

DEFAULT_WORKDIR = "lmforge-runs"
MODULES = {
    "Corpus": "lmforge_jobs.data",
    "PretrainRun": "lmforge_jobs.pretrain",
    "AlignmentRun": "lmforge_jobs.align",
    "Evaluation": "lmforge_jobs.evaluate",
}
DISTRIBUTED = ("PretrainRun", "AlignmentRun")  # launched under torchrun
EXIT_INTERRUPTED = 130
LOCAL_KEYS = ("specHash", "output")
CORPUS_PHASES = {s.value for s in CorpusStage}


class RunError(Exception):
    """The manifest set cannot run (invalid, a cycle, a dangling reference); nothing was started."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# ----------------------------------------------------------------------------------------------- layout
def resource_dir(workdir: Path, kind: str, name: str) -> Path:
    return workdir / kind.lower() / name


def read_status(workdir: Path, kind: str, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((resource_dir(workdir, kind, name) / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


# ---------------------------------------------------------------------------------------------- ordering
def order(resources: list[Resource[Any, Any]], workdir: Path) -> list[Resource[Any, Any]]:
    """Resources in an order where each comes after everything it refers to.

    A reference to a resource outside the set is fine when an earlier ``lmforge run`` in ``workdir``
    finished it; otherwise it is dangling. Raises RunError for dangling references and cycles.
    """
    by_ref = {(r.kind, r.name): r for r in resources}
    problems: list[Problem] = []
    for r in resources:
        for field_path, ref, _ in dependencies(r):
            if ref in by_ref:
                continue
            done = read_status(workdir, *ref)
            if not (done and done.get("phase") == "Succeeded"):
                problems.append(
                    Problem(
                        "(set)",
                        r.ref,
                        f"spec.{field_path}",
                        f"refers to {ref[0]}/{ref[1]}, which is neither in the manifests given nor finished "
                        f"in {workdir}",
                    )
                )
    if problems:
        raise RunError(problems)

    ordered: list[Resource[Any, Any]] = []
    state: dict[tuple[str, str], str] = {}  # visiting | done

    def visit(ref: tuple[str, str], path: list[tuple[str, str]]) -> None:
        if state.get(ref) == "done":
            return
        if state.get(ref) == "visiting":
            cycle = [*path[path.index(ref) :], ref]
            raise RunError(
                [
                    Problem(
                        "(set)",
                        f"{ref[0]}/{ref[1]}",
                        "spec",
                        "reference cycle: " + " → ".join(f"{k}/{n}" for k, n in cycle),
                    )
                ]
            )
        state[ref] = "visiting"
        for _, dep, _ in dependencies(by_ref[ref]):
            if dep in by_ref:
                visit(dep, [*path, ref])
        state[ref] = "done"
        ordered.append(by_ref[ref])

    for r in resources:
        visit((r.kind, r.name), [])
    return ordered


# ------------------------------------------------------------------------------------------------ status
def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def set_condition(status: dict[str, Any], ctype: str, value: bool, reason: str, message: str = "") -> None:
    """Set one condition (Kubernetes API conventions: lastTransitionTime changes only with the status) and
    the phase derived from the conditions."""
    status_helpers.set_condition(status, ctype, value, reason, message)
    status["phase"] = derive_phase([Condition.model_validate(c) for c in status["conditions"]]).value


def apply_progress(status: dict[str, Any], kind: str, progress: dict[str, Any]) -> None:
    """Mirror a job's progress.json into the status (progress, metrics, Corpus stage)."""
    p = {
        k: progress[k]
        for k in ("step", "totalSteps", "tokens", "percent", "etaSeconds")
        if progress.get(k) is not None
    }
    if p:
        p["percent"] = min(100.0, max(0.0, float(p.get("percent", 0.0))))
        p["updatedAt"] = progress.get("updatedAt") or _now().isoformat()
        status["progress"] = p
    metrics = metrics_for_status(kind, progress.get("metrics") or {})
    if metrics:
        status["metrics"] = metrics
    if kind == "Corpus" and progress.get("stage"):
        # the data job reports the stage's phase (lmforge_jobs.data.stages.Stage.phase)
        stage = str(progress["stage"])
        if stage in CORPUS_PHASES:
            status["stage"] = stage


def apply_results(status: dict[str, Any], resource: Resource[Any, Any], output: str) -> None:
    """Kind-specific final numbers: Corpus counts from stats.json, Evaluation results from results.json."""
    out = _local(output)
    name = {"Corpus": "stats.json", "Evaluation": "results.json"}.get(resource.kind)
    if name is None:
        return
    try:
        data = json.loads((out / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if resource.kind == "Corpus":
        status.update(corpus_counts(data))
        status["stage"] = "Done"
    else:
        status.update(evaluation_results(data))


def validated_status(kind: str, status: dict[str, Any]) -> dict[str, Any]:
    """The status checked against the kind's status model (the CRD's status schema)."""
    from lmforge_jobs.manifest import KINDS

    model = KINDS[kind].model_fields["status"].annotation
    status_cls = next(a for a in getattr(model, "__args__", (model,)) if a is not type(None))
    return status_cls.model_validate(status).model_dump(by_alias=True, exclude_none=True, mode="json")


def spec_hash(resource: Resource[Any, Any], inputs: Iterable[Any] = ()) -> str:
    """Identity of a run: its resolved spec plus what identifies its inputs (see LocalRunner.input_ids)."""
    text = json.dumps([resource.spec.to_yaml_dict(), list(inputs)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ devices
def local_gpus() -> int:
    """GPUs on this machine, without importing torch (CUDA_VISIBLE_DEVICES, else nvidia-smi)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def processes_for(resource: Resource[Any, Any], gpus: int) -> int:
    """Local worker processes of a distributed job: one per local GPU the spec asks for, else one."""
    if resource.kind not in DISTRIBUTED or gpus == 0:
        return 1
    wanted = resource.spec.parallelism.world_size if resource.spec.parallelism.gpus_per_node else 1
    n = min(gpus, wanted)
    # the global batch must still split evenly over the processes
    if resource.kind == "PretrainRun":
        spec = resource.spec
        while n > 1 and spec.batch.global_tokens % (spec.model.seq_len * spec.batch.micro_batch_size * n):
            n -= 1
    return n


def command(resource: Resource[Any, Any], manifest: Path, nproc: int) -> list[str]:
    """The job's argument list (never a shell string)."""
    module = MODULES[resource.kind]
    if resource.kind in DISTRIBUTED:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            f"--nproc-per-node={nproc}",
            "-m",
            module,
            "--manifest",
            str(manifest),
        ]
    extra = ["--stage", "all"] if resource.kind == "Corpus" else []
    return [sys.executable, "-m", module, "--manifest", str(manifest), *extra]


# ---------------------------------------------------------------------------------------------- launching
class Launch:
    """One job process tree, started through torchx's local scheduler (falls back to plain Popen only
    when torchx is not installed). ``poll()`` returns the exit code once it ended."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self._runner: Any = None
        self._handle: Any = None
        self._proc: subprocess.Popen[bytes] | None = None
        try:
            from torchx import specs
            from torchx.runner import get_runner
        except ImportError:
            specs = None
        if specs is not None:
            role = specs.Role(
                name=name,
                image=os.getcwd(),
                entrypoint=args[0],
                args=args[1:],
                env=env,
                resource=specs.Resource(cpu=1, gpu=0, memMB=1024),
            )
            app = specs.AppDef(name=name, roles=[role])
            handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
            self._runner = get_runner()
            self._handle = self._runner.run(app, scheduler="local_cwd", cfg={"log_dir": str(log_dir)})
            # torchx installs its own SIGINT/SIGTERM handlers; Ctrl-C is ours to handle gracefully
            signal.signal(signal.SIGINT, handlers[0])
            signal.signal(signal.SIGTERM, handlers[1])
        else:
            out = open(log_dir / "stdout.log", "ab")  # noqa: SIM115 - closed with the process
            err = open(log_dir / "stderr.log", "ab")  # noqa: SIM115
            self._proc = subprocess.Popen(
                args, env={**os.environ, **env}, stdout=out, stderr=err, start_new_session=True
            )

    def poll(self) -> int | None:
        if self._proc is not None:
            return self._proc.poll()
        status = self._runner.status(self._handle)
        if status is None or not status.is_terminal():
            return None
        return 0 if status.state.name == "SUCCEEDED" else self._exit_code(status)

    def _exit_code(self, status: Any) -> int:
        """torchx reports FAILED without the code; the replica's error file or log names it."""
        for replica in getattr(status, "roles", []) or []:
            for r in getattr(replica, "replicas", []) or []:
                code = getattr(r, "exit_code", None)
                if isinstance(code, int) and code:
                    return code
        text = self.log_tail(50)
        if "error: spec." in text:
            return EXIT_CONFIG_ERROR
        return 1

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the job (it saves a checkpoint), SIGKILL after ``grace`` seconds."""
        if self._proc is not None:
            with _suppress():
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(grace)
            except subprocess.TimeoutExpired:
                with _suppress():
                    os.killpg(self._proc.pid, signal.SIGKILL)
            return
        self._runner.cancel(self._handle)

    def log_files(self) -> list[Path]:
        return sorted(p for p in self.log_dir.rglob("*.log") if p.is_file())

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the job wrote (torchx's combined log, else stderr)."""
        files = self.log_files()
        chosen = [p for p in files if p.name == "combined.log"] or [
            p for p in files if p.name == "stderr.log"
        ]
        chunks: list[str] = []
        for path in chosen:
            with _suppress():
                chunks.extend(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        return "\n".join(chunks[-lines:])


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], (OSError, ProcessLookupError))


# ------------------------------------------------------------------------------------------------ runner
@dataclass
class Outcome:
    resource: Resource[Any, Any]
    phase: str
    message: str = ""
    skipped: bool = False


@dataclass
class LocalRunner:
    """Runs a manifest set in dependency order; see the module docstring."""

    workdir: Path
    display: Any = None  # lmforge_operator.progress.Display or None
    metrics: Any = None  # lmforge_operator.progress.RunMetrics or None
    poll_seconds: float = 0.5
    gpus: int = field(default_factory=local_gpus)
    interrupted: bool = False
    env: dict[str, str] = field(default_factory=dict)

    def run(self, resources: list[Resource[Any, Any]]) -> list[Outcome]:
        ordered = order(resources, self.workdir)
        outcomes: list[Outcome] = []
        failed: set[tuple[str, str]] = set()
        previous = signal.signal(signal.SIGINT, self._on_signal)
        previous_term = signal.signal(signal.SIGTERM, self._on_signal)
        try:
            for resource in ordered:
                if self.interrupted:
                    break
                blocked = [ref for _, ref, _ in dependencies(resource) if ref in failed]
                if blocked:
                    failed.add((resource.kind, resource.name))
                    msg = f"not run: {blocked[0][0]}/{blocked[0][1]} did not succeed"
                    self._write(resource, {}, "Waiting", "DependencyFailed", msg)
                    outcomes.append(Outcome(resource, "Waiting", msg))
                    continue
                outcome = self.run_one(resource)
                outcomes.append(outcome)
                if outcome.phase != "Succeeded":
                    failed.add((resource.kind, resource.name))
        finally:
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGTERM, previous_term)
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
        out = default_output(resource.kind, resource.name, str(self.workdir.resolve()))
        return resolve(resource, outputs, out)

    def run_one(self, resource: Resource[Any, Any]) -> Outcome:
        kind, name = resource.kind, resource.name
        rdir = resource_dir(self.workdir, kind, name)
        try:
            job = self.resolved(resource)
        except UnresolvedReference as exc:
            self._write(resource, {}, "Waiting", "DependencyNotReady", exc.message)
            return Outcome(resource, "Waiting", exc.message)
        output = str(job.spec.output)
        digest = spec_hash(job, self.input_ids(resource))
        previous = read_status(self.workdir, kind, name) or {}
        if (
            previous.get("phase") == "Succeeded"
            and previous.get("specHash") == digest
            and (_local(output) / "outputs.json").exists()
        ):
            if self.display:
                self.display.skipped(resource, "up to date")
            return Outcome(resource, "Succeeded", "up to date", skipped=True)

        if previous.get("specHash") not in (None, digest):
            self._discard_stale(resource, output)
        rdir.mkdir(parents=True, exist_ok=True)
        manifest = rdir / "manifest.yaml"
        doc = job.model_dump(by_alias=True, exclude_none=True, mode="json")
        doc.pop("status", None)
        manifest.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        status: dict[str, Any] = {
            k: v for k, v in previous.items() if k in ("conditions", "startTime", "plan")
        }
        status["startTime"] = status.get("startTime") or _now().isoformat()
        status["specHash"] = digest
        status["output"] = output
        extra = self._plan(job)
        if extra:
            status["plan"] = extra
        resumed = (rdir / "logs").exists()
        set_condition(status, "Failed", False, "Running")
        set_condition(status, "Waiting", False, "DependenciesReady")
        set_condition(status, "Running", True, "Resumed" if resumed else "Started", "job started")
        self._save(resource, status)

        nproc = processes_for(job, self.gpus)
        env = {
            "LMFORGE_METRICS_PORT": "off",
            "PYTHONUNBUFFERED": "1",
            "LMFORGE_WORKDIR": str(self.workdir.resolve()),
            **self.env,
        }
        if self.display:
            self.display.started(resource, nproc, self.gpus)
        launch = Launch(f"{kind.lower()}-{name}", command(job, manifest.resolve(), nproc), env, rdir / "logs")
        code: int | None = None
        stopping = False
        while code is None:
            time.sleep(self.poll_seconds)
            if self.interrupted and not stopping:
                stopping = True
                if self.display:
                    self.display.note(resource, "interrupted: stopping the job (it saves its state)")
                launch.stop()
            code = launch.poll()
            self._progress(resource, status, output)
        self._progress(resource, status, output)

        set_condition(status, "Running", False, "Finished" if code == 0 else "Stopped")
        if code == 0 and (_local(output) / "outputs.json").exists() and not self.interrupted:
            status["outputs"] = json.loads((_local(output) / "outputs.json").read_text(encoding="utf-8"))
            apply_results(status, resource, output)
            status["completionTime"] = _now().isoformat()
            set_condition(status, "Succeeded", True, "JobSucceeded", "outputs complete")
            set_condition(status, "Ready", True, "OutputsReady")
            phase, message = "Succeeded", ""
        elif self.interrupted:
            message = "interrupted; run again to resume from the last checkpoint"
            set_condition(status, "Failed", True, "Interrupted", message)
            phase = "Failed"
        else:
            tail = launch.log_tail(20)
            progress = read_progress(output) or {}
            if code == EXIT_CONFIG_ERROR or progress.get("state") == "Invalid":
                message = progress.get("message") or _last_error(tail) or "configuration error"
                set_condition(status, "Invalid", True, "InvalidSpec", message)
                phase = "Invalid"
            else:
                message = _last_error(tail) or f"job exited with code {code}"
                set_condition(status, "Failed", True, "JobFailed", message)
                phase = "Failed"
            if self.display:
                self.display.log(resource, tail)
        self._save(resource, status)
        if self.display:
            self.display.finished(resource, phase, message)
        return Outcome(resource, phase, message)

    def input_ids(self, resource: Resource[Any, Any]) -> list[list[str]]:
        """(kind, name, run identity, completion time) of each dependency: a dependency that ran again
        makes its dependents run again, although their resolved specs (paths) are unchanged."""
        ids = []
        for _, ref, _ in dependencies(resource):
            st = read_status(self.workdir, *ref) or {}
            ids.append([*ref, str(st.get("specHash", "")), str(st.get("completionTime", ""))])
        return sorted(ids)

    def _discard_stale(self, resource: Resource[Any, Any], output: str) -> None:
        """The spec or an input changed since the last run: its completion marker no longer counts.

        A Corpus in the work directory starts over (datatrove's per-rank completion markers do not know
        the spec); the training jobs decide themselves what of their checkpoints they can keep."""
        out = _local(output)
        with _suppress():
            (out / "outputs.json").unlink()
        inside = out.resolve().is_relative_to(self.workdir.resolve())
        if resource.kind == "Corpus" and inside and out.is_dir():
            if self.display:
                self.display.note(resource, "spec changed: starting the corpus over")
            for child in out.iterdir():
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

    def _progress(self, resource: Resource[Any, Any], status: dict[str, Any], output: str) -> None:
        progress = read_progress(output)
        if not progress:
            return
        apply_progress(status, resource.kind, progress)
        self._save(resource, status)
        if self.display:
            self.display.progress(resource, progress)
        if self.metrics:
            self.metrics.observe(resource, progress)

    def _save(self, resource: Resource[Any, Any], status: dict[str, Any]) -> None:
        # specHash and output are the runner's own bookkeeping, beside the CRD's status fields
        own = {k: status[k] for k in LOCAL_KEYS if k in status}
        body = validated_status(resource.kind, {k: v for k, v in status.items() if k not in LOCAL_KEYS})
        body.update(own)
        write_json_atomic(resource_dir(self.workdir, resource.kind, resource.name) / "status.json", body)

    def _write(
        self, resource: Resource[Any, Any], status: dict[str, Any], ctype: str, reason: str, msg: str
    ) -> None:
        set_condition(status, ctype, True, reason, msg)
        self._save(resource, status)
        if self.display:
            self.display.finished(resource, ctype, msg)


def _last_error(text: str) -> str:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("error:"):
            return line.removeprefix("error:").strip()
    for line in reversed(text.splitlines()):
        if line.strip() and not line.startswith(" "):
            return line.strip()[:500]
    return ""


def tokenizer_vocab(uri: str) -> int | None:
    """Vocabulary size of a tokenizer.json (file or directory), for the plan; None when unknown."""
    path = _local(uri)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [t.get("id", 0) for t in data.get("added_tokens") or []]
    return max(ids) + 1 if ids else None


# -------------------------------------------------------------------------------------------- status view
def collect(workdir: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, name, status) of every resource run in ``workdir``."""
    found = []
    for path in sorted(workdir.glob("*/*/status.json")):
        try:
            status = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        kind = {k.lower(): k for k in MODULES}.get(path.parent.parent.name)
        if kind:
            found.append((kind, path.parent.name, status))
    rank = {k: i for i, k in enumerate(MODULES)}
    return sorted(found, key=lambda t: (rank[t[0]], t[1]))


def _fmt_eta(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return ""
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def status_rows(workdir: Path) -> list[list[str]]:
    """The rows `lmforge status` prints, like `kubectl get lmforge`."""
    rows = [["KIND", "NAME", "PHASE", "PROGRESS", "STEP", "LOSS", "TOKENS/S", "ETA", "MESSAGE"]]
    for kind, name, st in collect(workdir):
        progress = st.get("progress") or {}
        metrics = st.get("metrics") or {}
        step = (
            f"{progress.get('step', '')}/{progress.get('totalSteps', '')}"
            if progress.get("totalSteps")
            else ""
        )
        loss = metrics.get("loss")
        tps = metrics.get("tokensPerSecond")
        message = next(
            (
                c.get("message", "")
                for c in st.get("conditions", [])
                if c["type"] in ("Invalid", "Failed") and c["status"] == "True"
            ),
            "",
        )
        if kind == "Corpus" and st.get("documents"):
            d = st["documents"]
            message = message or f"kept {d.get('kept', 0)}/{d.get('read', 0)} documents"
        if kind == "Evaluation" and st.get("results", {}).get("perplexity") is not None:
            message = message or f"perplexity {st['results']['perplexity']:.3f}"
        rows.append(
            [
                kind,
                name,
                st.get("phase", "Pending"),
                f"{progress.get('percent', 0):.0f}%" if progress else "",
                step,
                f"{loss:.4f}" if isinstance(loss, (int, float)) else "",
                f"{tps:,.0f}" if isinstance(tps, (int, float)) else "",
                _fmt_eta(progress.get("etaSeconds")) if st.get("phase") == "Running" else "",
                message[:80],
            ]
        )
    return rows


def load_set(paths: Iterable[str]) -> list[Resource[Any, Any]]:
    resources, problems = load_resources(paths)
    if problems:
        raise RunError(problems)
    if not resources:
        raise RunError([Problem(" ".join(paths), "?", "(set)", "no lmforge resources found")])
    return resources
