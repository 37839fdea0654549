"""HTML extraction in the Corpus job: an extractor that cannot run is one configuration error found within
the first documents, and timeouts are counted apart from failures."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from data_fixtures import ROOT, WARC, job_env, run_job_here, write_manifest

# per document: a worker that never starts would cost this much on each document (the WARC has dozens);
# the checks below allow a fraction of it, however loaded the machine is
TIMEOUT = 300


def _spec(**extract: Any) -> dict[str, Any]:
    return {
        "sources": [{"warc": {"paths": [str(WARC)]}}],
        "extract": {"method": "trafilatura", "timeoutSeconds": TIMEOUT, **extract},
        "dedup": {"exact": False, "minhash": {"enabled": False}},
        "tokenizer": {"train": {"vocabSize": 300}},
        "parallelism": {"tasks": 2, "workers": 2},
    }


def _without_lxml_html_clean(tmp_path: Path) -> dict[str, str]:
    """A job environment where ``lxml_html_clean`` (which trafilatura needs) fails to import for real."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "lxml_html_clean.py").write_text("raise ImportError(\"No module named 'lxml_html_clean'\")\n")
    env = job_env()
    env["PYTHONPATH"] = os.pathsep.join([str(shadow), env.get("PYTHONPATH", "")])
    return env


def _run_without_lxml_html_clean(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Python with ``args`` where lxml_html_clean cannot be imported; the process and its seconds."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=_without_lxml_html_clean(tmp),
        cwd=ROOT,
        timeout=TIMEOUT,
    )
    return proc, time.monotonic() - started


# trafilatura imports justext, which imports lxml.html.clean, which imports lxml_html_clean
_IMPORTERS = ("trafilatura", "justext", "lxml.html.clean", "lxml_html_clean")


def _importer(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _IMPORTERS)


@contextlib.contextmanager
def _this_process_without_lxml_html_clean() -> Iterator[None]:
    """This process, and the workers it forks, as if ``lxml_html_clean`` were not installed: the modules
    that import it are forgotten (imported again on demand, and failing for real), then restored."""
    saved = {name: module for name, module in sys.modules.items() if _importer(name)}
    for name in saved:
        del sys.modules[name]
    sys.modules["lxml_html_clean"] = None  # type: ignore[assignment]  # "import ... halted"
    try:
        yield
    finally:
        for name in [name for name in sys.modules if _importer(name)]:
            del sys.modules[name]
        sys.modules.update(saved)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# in this process (the job's main) by default; as a process of its own, where the library is shadowed on
# the import path, in the slow suite (the same exit path as test_data.py's bad input run as a process)
HOW = ["in-process", pytest.param("process", marks=pytest.mark.slow)]


@pytest.mark.parametrize("how", HOW)
def test_unimportable_extractor_is_a_config_error_before_any_document(how: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "c.yaml", out, _spec())
    args = ("--manifest", str(manifest), "--stage", "extract")
    if how == "process":
        proc, elapsed = _run_without_lxml_html_clean(tmp_path, "-m", "lmforge_jobs.data", *args)
    else:
        started = time.monotonic()
        with _this_process_without_lxml_html_clean():
            proc = run_job_here(manifest, *args[2:])
        elapsed = time.monotonic() - started
    assert proc.returncode == 64, proc.stderr[-2000:]
    errors = _errors(proc.stderr)
    assert len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith("error: spec.extract.method: trafilatura could not be imported: ")
    assert "lxml_html_clean" in errors[0]
    assert elapsed < TIMEOUT / 3
    assert not (out / "logs" / "extract" / "completions").exists()


@pytest.mark.parametrize("how", HOW)
def test_extractor_failing_in_the_workers_ends_the_stage_early(how: str, tmp_path: Path) -> None:
    """The workers cannot import trafilatura although the job process could (the preflight passed): the
    stage stops once the worker failed to start, not after every document timed out."""
    from lmforge_jobs.data.config import CorpusSpec
    from lmforge_jobs.data.run import run_stage
    from lmforge_jobs.entry import ConfigError

    out = tmp_path / "out"
    spec = CorpusSpec.model_validate({**_spec(), "output": str(out)})
    if how == "in-process":  # datatrove's pool and the extraction sandboxes are forked from here
        started = time.monotonic()
        with _this_process_without_lxml_html_clean(), pytest.raises(ConfigError) as caught:
            run_stage(spec, "extract", rank=None, workers=2)
        assert time.monotonic() - started < TIMEOUT / 3
        assert caught.value.field == "extract.method"
        assert caught.value.message.startswith("trafilatura could not be imported: "), caught.value.message
        assert "lxml_html_clean" in caught.value.message
        assert not (out / "logs" / "extract" / "completions").exists()
        return
    script = textwrap.dedent(
        f"""
        import json, sys
        from lmforge_jobs.data.config import CorpusSpec
        from lmforge_jobs.data.run import run_stage
        from lmforge_jobs.entry import ConfigError

        spec = CorpusSpec.model_validate(json.loads({spec.model_dump_json(by_alias=True)!r}))
        try:
            run_stage(spec, "extract", rank=None, workers=2)
        except ConfigError as exc:
            print("CONFIG", exc.field, exc.message, file=sys.stderr)
            sys.exit(64)
        """
    )
    proc, elapsed = _run_without_lxml_html_clean(tmp_path, "-c", script)
    assert proc.returncode == 64, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("CONFIG"))
    assert line.startswith("CONFIG extract.method trafilatura could not be imported: "), line
    assert "lxml_html_clean" in line
    assert elapsed < TIMEOUT / 3
    assert not (out / "logs" / "extract" / "completions").exists()


# ------------------------------------------------------------------------------------- the guard itself
class _Scripted:
    """An extractor whose behaviour each document's text picks: ``slow`` sleeps past the timeout,
    ``bad`` raises, ``crash`` kills the worker; anything else comes back as it is."""

    library = "scripted"

    def extract(self, text: str) -> str:
        if text == "slow":
            time.sleep(60)
        if text == "bad":
            raise ValueError("cannot parse this page")
        if text == "crash":
            os._exit(3)
        return text


def _extractor(timeout: float, broken_import: bool = False) -> Any:
    from lmforge_jobs.data.blocks import GuardedExtractor

    class Scripted(_Scripted, GuardedExtractor):
        name = "scripted"

        def __init__(self) -> None:
            super().__init__(timeout)

        def extract(self, text: str) -> str:
            if broken_import:
                import lmforge_no_such_module  # noqa: F401

            return super().extract(text)

    return Scripted()


# a document's timeout, also what a worker that died on one costs (datatrove notices it once the wait
# ends); starting the sandbox worker, which must fit in it too, takes 5 to 40 ms on a loaded 2-core machine
SHORT = 0.5


def _documents(texts: list[str]) -> list[Any]:
    from datatrove.data import Document

    return [Document(text=t, id=str(i)) for i, t in enumerate(texts)]


def _run(extractor: Any, texts: list[str]) -> list[str]:
    return [d.text for d in extractor.run(iter(_documents(texts)))]


def _stat(extractor: Any, key: str) -> int:
    return int(extractor.stats[key].total) if key in extractor.stats.stats else 0


# the same documents through the same guard: test_counts_separate_timeouts_from_failures
@pytest.mark.slow
def test_timeouts_and_failures_are_counted_apart() -> None:
    extractor = _extractor(timeout=SHORT)
    kept = _run(extractor, ["one", "slow", "bad", "crash", "two"])
    assert kept == ["one", "two"]
    assert _stat(extractor, "timeout") == 1
    assert _stat(extractor, "failed") == 2
    assert _stat(extractor, "extracted") == 2


def test_a_worker_that_cannot_import_its_library_stops_at_the_first_document() -> None:
    from lmforge_jobs.data.blocks import ExtractorBroken

    extractor = _extractor(timeout=TIMEOUT, broken_import=True)
    started = time.monotonic()
    with pytest.raises(ExtractorBroken, match="scripted could not be imported: No module named"):
        _run(extractor, ["page"] * 20)
    assert time.monotonic() - started < TIMEOUT / 2
    assert _stat(extractor, "timeout") == 0


def test_failing_on_each_of_the_first_documents_stops_the_stage() -> None:
    from lmforge_jobs.data.blocks import ExtractorBroken, GuardedExtractor

    extractor = _extractor(timeout=TIMEOUT)
    with pytest.raises(ExtractorBroken, match="failed on each of the first 5 documents: cannot parse"):
        _run(extractor, ["bad"] * 20)
    assert _stat(extractor, "failed") == GuardedExtractor.GUARD == 5
    # a few bad pages among good ones are only skipped
    extractor = _extractor(timeout=TIMEOUT)
    assert _run(extractor, ["bad"] * 4 + ["fine"] + ["bad"] * 6) == ["fine"]
    assert _stat(extractor, "failed") == 10


def test_counts_separate_timeouts_from_failures(tmp_path: Path) -> None:
    """What each rank's Counts file says about extraction, which stats.json adds up."""
    from lmforge_jobs.data.blocks import Counts

    extractor = _extractor(timeout=SHORT)
    counts = Counts(str(tmp_path), [("extract", extractor)])
    texts = ["one", "slow", "bad", "crash", "two", ""]
    kept = [d.text for d in counts.run(extractor.run(iter(_documents(texts))))]
    assert kept == ["one", "two"]
    # a worker that died on a document is a failure too, not a timeout
    assert (_stat(extractor, "timeout"), _stat(extractor, "failed")) == (1, 2)
    written = json.loads((tmp_path / "00000.json").read_text())
    assert written["removed"] == {"extract": 4}  # a timeout, two failures and an empty page
    assert written["extraction"] == {"timeouts": 1, "failures": 2}
