"""`lmforge run` / `lmforge status` / the report: ordering, refusal of bad sets, status and report files.

The whole quickstart pipeline through the real jobs is tests/install/test_quickstart.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from repo import ROOT

from lmforge_jobs.manifest import load_resources
from lmforge_operator import status as st
from lmforge_operator.cli import main
from lmforge_operator.local import Launch, LocalRunner, RunError, command, order, run_hash, status_rows
from lmforge_operator.local import runner as local_runner
from lmforge_operator.report import build_report, funnel, series


def _quickstart() -> list:
    resources, problems = load_resources([ROOT / "examples" / "quickstart"])
    assert not problems
    return resources


def test_order_follows_references(tmp_path: Path) -> None:
    resources = list(reversed(_quickstart()))
    names = [r.name for r in order(resources, tmp_path)]
    assert names.index("tiny-web") < names.index("tiny-gpt") < names.index("tiny-sft")
    assert names.index("tiny-sft") < names.index("tiny-dpo") < names.index("tiny-eval")


def _write_set(tmp_path: Path, docs: list[dict]) -> Path:
    path = tmp_path / "set.yaml"
    path.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
    return path


def _align(name: str, base: str) -> dict:
    return {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "AlignmentRun",
        "metadata": {"name": name},
        "spec": {
            "base": {"alignmentRun": base},
            "method": "sft",
            "dataset": {"path": "x.jsonl", "format": "messages"},
        },
    }


def test_cycle_is_refused_before_anything_runs(tmp_path: Path, capsys) -> None:
    path = _write_set(tmp_path, [_align("a", "b"), _align("b", "c"), _align("c", "a")])
    workdir = tmp_path / "runs"
    assert main(["run", str(path), "--workdir", str(workdir), "--no-report"]) == 1
    err = capsys.readouterr().err
    assert "reference cycle: AlignmentRun/a → AlignmentRun/b → AlignmentRun/c → AlignmentRun/a" in err
    assert "nothing was run" in err
    assert not workdir.exists()


def test_dangling_reference_names_the_field(tmp_path: Path, capsys) -> None:
    path = _write_set(tmp_path, [_align("a", "missing")])
    workdir = tmp_path / "runs"
    assert main(["run", str(path), "--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err
    assert "AlignmentRun/a: spec.base: refers to AlignmentRun/missing, which is neither" in err
    assert not workdir.exists()
    # a reference to a resource an earlier run finished is not dangling
    done = workdir / "alignmentrun" / "missing"
    done.mkdir(parents=True)
    (done / "status.json").write_text(json.dumps({"phase": "Succeeded", "outputs": {"model": "/m"}}))
    resources, _ = load_resources([path])
    assert [r.name for r in order(resources, workdir)] == ["a"]
    with pytest.raises(RunError):
        order(resources, tmp_path / "elsewhere")


def test_commands_are_argument_lists(tmp_path: Path) -> None:
    by_name = {r.name: r for r in _quickstart()}
    manifest = tmp_path / "weird; rm -rf $HOME.yaml"
    cmd = command(by_name["tiny-gpt"], manifest, 2)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in cmd and cmd[-1] == str(manifest)
    assert command(by_name["tiny-web"], manifest, 1)[-4:] == ["--manifest", str(manifest), "--stage", "all"]
    assert command(by_name["tiny-eval"], manifest, 1)[1:3] == ["-m", "lmforge_jobs.evaluate"]


def test_status_follows_the_crd_schema() -> None:
    status: dict = {}
    st.set_state(status, "Running", st.JOB_RUNNING, "job started")
    st.apply_progress(
        status,
        "AlignmentRun",
        {
            "step": 5,
            "totalSteps": 10,
            "percent": 50.0,
            "etaSeconds": 7,
            "metrics": {"loss": 1.5, "rewardMargin": 0.2, "entropy": 3.0},
        },
    )
    body = st.validated_status("AlignmentRun", status)
    assert body["phase"] == "Running"
    assert body["progress"]["step"] == 5 and body["progress"]["etaSeconds"] == 7
    assert body["metrics"] == {"loss": 1.5, "rewardMargin": 0.2, "methodMetrics": {"entropy": 3.0}}
    st.set_state(status, "Succeeded", st.JOB_SUCCEEDED, "outputs complete")
    assert st.validated_status("AlignmentRun", status)["phase"] == "Succeeded"
    st.apply_progress(status, "Corpus", {"stage": "Deduplicating", "metrics": {"documentsPerSecond": 12.0}})
    assert status["stage"] == "Deduplicating"
    st.apply_progress(status, "Corpus", {"stage": "minhash-buckets"})  # not a status.stage value: ignored
    assert status["stage"] == "Deduplicating"


def test_rerun_skips_finished_resources(tmp_path: Path) -> None:
    """A Succeeded resource with the same resolved spec and its outputs.json is not run again."""
    corpus = next(r for r in _quickstart() if r.kind == "Corpus")
    runner = LocalRunner(workdir=tmp_path, gpus=0)
    job = runner.resolved(corpus)
    out = Path(job.spec.output)
    out.mkdir(parents=True)
    (out / "outputs.json").write_text("{}")
    (out / "status.json").write_text(json.dumps({"phase": "Succeeded", "specHash": run_hash(job)}))
    outcome = runner.run_one(corpus)
    assert outcome.skipped and outcome.phase == "Succeeded"


def test_rerun_after_an_input_changed(tmp_path: Path) -> None:
    """A dependent's resolved spec names the same paths after its dependency ran again; it must rerun."""
    pretrain = next(r for r in _quickstart() if r.kind == "PretrainRun")
    runner = LocalRunner(workdir=tmp_path, gpus=0)
    corpus_dir = tmp_path / "corpus" / "tiny-web"
    corpus_dir.mkdir(parents=True)
    outputs = {"tokens": "/t", "heldOut": "/h", "tokenizer": "/k", "documents": "/d"}

    def corpus_finished(at: str) -> None:
        (corpus_dir / "status.json").write_text(
            json.dumps({"phase": "Succeeded", "specHash": "c1", "completionTime": at, "outputs": outputs})
        )

    corpus_finished("2026-01-01T00:00:00+00:00")
    first = run_hash(runner.resolved(pretrain), runner.input_ids(pretrain))
    assert run_hash(runner.resolved(pretrain), runner.input_ids(pretrain)) == first
    corpus_finished("2026-01-02T00:00:00+00:00")
    assert run_hash(runner.resolved(pretrain), runner.input_ids(pretrain)) != first


def test_changed_corpus_spec_starts_over(tmp_path: Path) -> None:
    """datatrove's completion markers do not know the spec: a changed Corpus clears its own output."""
    corpus = next(r for r in _quickstart() if r.kind == "Corpus")
    runner = LocalRunner(workdir=tmp_path, gpus=0)
    out = Path(runner.resolved(corpus).spec.output)
    (out / "logs" / "extract" / "completions").mkdir(parents=True)
    (out / "logs" / "extract" / "completions" / "00000").write_text("")
    (out / "outputs.json").write_text("{}")
    (out / "status.json").write_text(json.dumps({"phase": "Succeeded", "specHash": "old"}))
    runner._discard_stale(corpus, str(out))
    assert sorted(p.name for p in out.iterdir()) == ["status.json"]
    outside = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    (outside / "logs").mkdir(parents=True)
    (outside / "outputs.json").write_text("{}")  # the job's marker beside its output
    (out / "outputs.json").write_text("{}")  # and the copy in the run directory, which the runner reads
    runner._discard_stale(corpus, str(outside))  # not ours to delete: only the markers go
    assert sorted(p.name for p in outside.iterdir()) == ["logs"]
    assert not (out / "outputs.json").exists()
    runner._discard_stale(corpus, "s3://bucket/corpus")  # nothing remote is deleted, and nothing fails


def test_report_and_status_table(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus" / "web"
    corpus.mkdir(parents=True)
    stats = {
        "read": 100,
        "kept": 60,
        "removedBy": {"gopherQuality": 15, "url": 5, "duplicates": 20},
        "filters": [{"name": "url", "position": 0}, {"name": "gopherQuality", "position": 1}],
    }
    (corpus / "stats.json").write_text(json.dumps(stats))
    (corpus / "status.json").write_text(
        json.dumps({"phase": "Succeeded", "documents": stats, "conditions": []})
    )
    run = tmp_path / "pretrainrun" / "gpt"
    run.mkdir(parents=True)
    lines = [{"step": s, "loss": 5 - s / 10, "tokensPerSecond": 1000.0} for s in range(10)]
    lines += [{"step": 5, "loss": 1.0}]  # resumed: the later value of step 5 wins
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken")
    (run / "status.json").write_text(
        json.dumps(
            {
                "phase": "Running",
                "progress": {"step": 9, "totalSteps": 20, "percent": 45.0, "etaSeconds": 65},
                "metrics": {"loss": 4.1, "tokensPerSecond": 1000.0},
            }
        )
    )
    ev = tmp_path / "evaluation" / "ev"
    ev.mkdir(parents=True)
    (ev / "status.json").write_text(
        json.dumps(
            {"phase": "Succeeded", "results": {"perplexity": 12.5, "benchmarks": {"mcq": {"acc": 0.4}}}}
        )
    )
    assert funnel(stats) == [("read", 100), ("url", 95), ("gopherQuality", 80), ("duplicates", 60)]
    # stats.json from the Corpus job: the filters' positions order the funnel, whatever the key order
    job_stats = {
        "read": 50,
        "removedBy": {"duplicates": 5, "extract": 2, "gopherQuality": 10, "nearDuplicates": 3, "url": 4},
        "filters": [
            {"name": "url", "position": 0, "kept": 44, "removed": 4},
            {"name": "gopherQuality", "position": 1, "kept": 34, "removed": 10},
        ],
    }
    assert funnel(job_stats) == [
        ("read", 50),
        ("extract", 48),
        ("url", 44),
        ("gopherQuality", 34),
        ("duplicates", 29),
        ("nearDuplicates", 26),
    ]
    steps, losses = series(
        [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()[:-1]], "loss"
    )
    assert steps[5] == 5 and losses[5] == 1.0 and len(steps) == 10

    rows = status_rows(tmp_path)
    assert rows[1][:3] == ["Corpus", "web", "Succeeded"] and "kept 60/100" in rows[1][-1]
    assert rows[2][:5] == ["PretrainRun", "gpt", "Running", "45%", "9/20"] and rows[2][7] == "1m05s"
    assert rows[3][-1] == "perplexity 12.500"

    html = build_report(tmp_path).read_text()
    assert html.count("data:image/png;base64,") == 3  # funnel, loss, throughput
    assert "mcq acc" in html and "12.5000" in html
    assert sorted(p.name for p in (tmp_path / "report").glob("*.png")) == [
        "corpus-web-funnel.png",
        "pretrainrun-gpt-loss.png",
        "pretrainrun-gpt-speed.png",
    ]
    assert main(["status", "--workdir", str(tmp_path)]) == 0
    assert "PretrainRun  gpt" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ stopping a job
# A job process with two workers that ignore SIGTERM (like workers busy saving): only the SIGKILL after the
# grace period ends them (a short one: what is checked does not depend on its length). One shares the job's
# process group, the other leads a session of its own, as torchrun's workers do. Each worker writes
# "<job pid> <its pid>" to its file once it ignores SIGTERM.
WORKER = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getppid()} {os.getpid()}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""
JOB = """
import subprocess, sys, time
pid_dir, worker = sys.argv[1:]
subprocess.Popen([sys.executable, "-S", "-c", worker, pid_dir + "/same-group"])
subprocess.Popen([sys.executable, "-S", "-c", worker, pid_dir + "/own-session"], start_new_session=True)
time.sleep(600)
"""


def _tree_command(pid_dir: Path) -> list[str]:
    pid_dir.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-S", "-c", JOB, str(pid_dir), WORKER]  # -S: only the standard library, sooner


def _wait_for_tree(pid_dir: Path) -> list[int]:
    """[job, worker in its group, worker in its own session], once both workers ignore SIGTERM."""
    files = [pid_dir / "same-group", pid_dir / "own-session"]
    deadline = time.monotonic() + 60
    while not all(f.exists() for f in files):
        assert time.monotonic() < deadline, "the job tree did not start"
        time.sleep(0.02)
    (job, first), (_, second) = ([int(pid) for pid in f.read_text().split()] for f in files)
    return [job, first, second]


def _running(pid: int) -> bool:
    """Whether the process runs (a zombie is dead, only not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.parametrize("scheduler", ["torchx", "subprocess"])
def test_stop_leaves_no_process_of_the_job(tmp_path: Path, monkeypatch, scheduler: str) -> None:
    if scheduler == "subprocess":
        monkeypatch.setitem(sys.modules, "torchx", None)  # as if torchx were not installed
    launch = Launch("tree", _tree_command(tmp_path / "pids"), {}, tmp_path / "logs")
    job, same_group, own_session = _wait_for_tree(tmp_path / "pids")
    assert launch.job_processes() == [job]
    assert os.getpgid(job) == job != os.getpgid(0)  # the job leads its own group, apart from ours
    assert os.getpgid(same_group) == job and os.getpgid(own_session) == own_session
    assert launch.process_groups() == {job, own_session}
    started = time.monotonic()
    launch.stop(grace=0.1)
    assert [pid for pid in (job, same_group, own_session) if _running(pid)] == []
    assert time.monotonic() - started < 15
    assert launch.poll() not in (None, 0)


def test_sigterm_stops_the_run_and_its_job_tree(tmp_path: Path, monkeypatch) -> None:
    """SIGTERM to `lmforge run` (Ctrl-C alike) stops the running job with everything it started, and the
    resource is left Failed/Interrupted, to be resumed by the next run."""
    pid_dir = tmp_path / "pids"
    monkeypatch.setattr(local_runner, "command", lambda job, manifest, processes: _tree_command(pid_dir))
    corpus = next(r for r in _quickstart() if r.kind == "Corpus")
    runner = LocalRunner(workdir=tmp_path / "runs", gpus=0, poll_seconds=0.02, stop_grace_seconds=0.1)
    pids: list[int] = []

    def terminate_once_started() -> None:
        pids.extend(_wait_for_tree(pid_dir))
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=terminate_once_started, daemon=True)
    sender.start()
    outcomes = runner.run([corpus])
    sender.join(timeout=5)
    assert runner.interrupted and [o.phase for o in outcomes] == ["Failed"]
    assert len(pids) == 3 and [pid for pid in pids if _running(pid)] == []
    status = json.loads((tmp_path / "runs" / "corpus" / corpus.name / "status.json").read_text())
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "Interrupted")


def test_jobs_launched_from_threads_at_once_are_submitted_one_at_a_time(tmp_path: Path, monkeypatch) -> None:
    """Trials started side by side (`lmforge run --parallel`) launch from threads at the same moment; torchx's
    submission parses source with `ast`, which CPython 3.11 cannot do in two threads at once (a SystemError
    that failed a trial), so submissions take turns while the jobs themselves still run together."""
    from torchx.runner.api import Runner

    submit = Runner.run
    inside, most = 0, 0
    lock = threading.Lock()

    def counted(self, *args, **kwargs):
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        try:
            time.sleep(0.05)  # long enough for every thread to arrive while one is inside
            return submit(self, *args, **kwargs)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(Runner, "run", counted)
    gate = threading.Barrier(4)
    launches: list[Launch] = []

    def launch(n: int) -> None:
        gate.wait()
        launches.append(Launch(f"job{n}", [sys.executable, "-S", "-c", "pass"], {}, tmp_path / f"logs{n}"))

    threads = [threading.Thread(target=launch, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(launches) == 4 and most == 1
    deadline = time.monotonic() + 30
    while any(job.poll() is None for job in launches):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert [job.poll() for job in launches] == [0, 0, 0, 0]
