"""Helpers for the Corpus job tests: a tiny fastText language-ID model trained on the spot, manifests,
and readers for the job's outputs (documents and token shards)."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from repo import ROOT

WARC = ROOT / "examples" / "data" / "python-docs.warc.gz"

# Sentences for the language-ID model, written for these tests (the WARC's foreign pages say other things).
TRAINING = {
    "de": [
        "Der Zug nach Hamburg fährt heute wegen Bauarbeiten eine halbe Stunde später ab.",
        "Meine Großmutter backt jeden Sonntag einen Apfelkuchen für die ganze Familie.",
        "Die Kinder spielen nach der Schule gern im Park neben dem Rathaus.",
        "Wir haben im Urlaub eine kleine Wohnung am See gemietet und sind viel gewandert.",
        "Das Museum zeigt ab nächster Woche eine Ausstellung über die Geschichte der Stadt.",
        "Kannst du mir bitte sagen, wo ich hier eine Apotheke finde?",
        "Im Winter ist es in den Bergen oft sehr kalt und es liegt viel Schnee.",
        "Der neue Fahrradweg verbindet das Dorf mit dem Bahnhof in der Nachbarstadt.",
        "Nach dem Essen trinken wir meistens noch einen Kaffee auf dem Balkon.",
        "Die Firma sucht für das kommende Jahr mehrere Auszubildende im Handwerk.",
        "Es ist wichtig, dass wir die Rechnung bis zum Ende des Monats bezahlen.",
        "Am Wochenende besuchen wir unsere Freunde, die auf einem Bauernhof wohnen.",
    ],
    "fr": [
        "Le train pour Lyon partira avec une demi-heure de retard à cause des travaux.",
        "Ma grand-mère prépare une tarte aux pommes chaque dimanche pour toute la famille.",
        "Les enfants aiment jouer dans le jardin public après l'école.",
        "Nous avons loué un petit appartement au bord du lac pendant les vacances.",
        "Le musée présente la semaine prochaine une exposition sur l'histoire de la ville.",
        "Pouvez-vous me dire où se trouve la pharmacie la plus proche, s'il vous plaît ?",
        "En hiver, il fait souvent très froid dans les montagnes et il neige beaucoup.",
        "La nouvelle piste cyclable relie le village à la gare de la ville voisine.",
        "Après le repas, nous buvons généralement un café sur le balcon.",
        "L'entreprise cherche plusieurs apprentis pour l'année prochaine.",
        "Il est important que nous payions la facture avant la fin du mois.",
        "Ce week-end, nous rendons visite à des amis qui habitent dans une ferme.",
    ],
    "es": [
        "El tren a Sevilla saldrá media hora tarde por las obras en la vía.",
        "Mi abuela prepara una tarta de manzana todos los domingos para toda la familia.",
        "A los niños les gusta jugar en el parque después del colegio.",
        "Alquilamos un pequeño apartamento junto al lago durante las vacaciones.",
        "El museo presenta la próxima semana una exposición sobre la historia de la ciudad.",
        "¿Me puede decir dónde está la farmacia más cercana, por favor?",
        "En invierno hace mucho frío en las montañas y nieva con frecuencia.",
        "El nuevo carril bici une el pueblo con la estación de la ciudad vecina.",
        "Después de comer solemos tomar un café en el balcón.",
        "La empresa busca varios aprendices para el año que viene.",
        "Es importante que paguemos la factura antes de que termine el mes.",
        "Este fin de semana visitamos a unos amigos que viven en una granja.",
    ],
}


def english_sentences(limit: int = 300) -> list[str]:
    """Paragraphs of the documentation pages in the test WARC (docs.python.org only)."""
    from warcio.archiveiterator import ArchiveIterator

    out: list[str] = []
    with open(WARC, "rb") as fh:
        for record in ArchiveIterator(fh):
            url = record.rec_headers.get_header("WARC-Target-URI") or ""
            if record.rec_type != "response" or not url.startswith("https://docs.python.org/"):
                continue
            html = record.content_stream().read().decode("utf-8", "replace")
            for para in re.findall(r"<p>(.*?)</p>", html, flags=re.S):
                text = " ".join(re.sub(r"<[^>]+>", " ", para).split())
                if len(text.split()) >= 8:
                    out.append(text)
            if len(out) >= limit:
                break
    return out[:limit]


def train_lid_model(path: Path) -> Path:
    """A fastText language-ID model (labels en, de, fr, es) trained in about a second."""
    import fasttext

    lines = [f"__label__en {s}" for s in english_sentences()]
    for lang, sentences in TRAINING.items():
        lines += [f"__label__{lang} {s}" for s in sentences] * 8
    data = path.with_suffix(".train.txt")
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    model = fasttext.train_supervised(
        str(data), epoch=25, lr=0.5, minn=2, maxn=4, dim=16, wordNgrams=1, thread=1, seed=1, verbose=0
    )
    model.save_model(str(path))
    return path


def corpus_doc(output: Path, spec: dict[str, Any], name: str = "test-corpus") -> dict[str, Any]:
    return {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "Corpus",
        "metadata": {"name": name},
        "spec": {**spec, "output": str(output)},
    }


def write_manifest(path: Path, output: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(corpus_doc(output, spec), sort_keys=False), encoding="utf-8")
    return path


def offline_env() -> dict[str, str]:
    """The environment of a command a test starts as a process (``lmforge run`` as a user would): this
    process's (the s3 fixture's credentials and endpoint included), offline, unbuffered, one compile
    thread."""
    env = dict(os.environ)
    env.update(
        TORCHINDUCTOR_COMPILE_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def job_env(*drop: str) -> dict[str, str]:
    """The environment of a job a test starts as a process (any job, not only the Corpus one):
    :func:`offline_env` with one thread, no metrics port, and without a Job's index, a termination log
    or the variables named in ``drop``."""
    env = offline_env()
    env.update(OMP_NUM_THREADS="1", LMFORGE_METRICS_PORT="off")
    for key in ("JOB_COMPLETION_INDEX", "LMFORGE_TERMINATION_LOG", *drop):
        env.pop(key, None)
    return env


def run_job(manifest: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmforge_jobs.data", "--manifest", str(manifest), *args],
        capture_output=True,
        text=True,
        env=job_env(),
        timeout=timeout,
        cwd=ROOT,
    )


def run_job_here(manifest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """:func:`run_job` without the process: the Corpus job's ``main`` in this process, under
    :func:`job_env` (this process's environment is restored afterwards), its stdout and stderr captured —
    datatrove's log included, as a job process prints it. For the tests of what the job decides (exit code,
    the one ``error:`` line, outputs); those of the process itself (exit status, signals, worker processes,
    imports) start one. What forked workers print is not captured."""
    from datatrove.utils.logging import setup_default_logger

    from lmforge_jobs.data.__main__ import main

    argv = ["--manifest", str(manifest), *args]
    saved, env = dict(os.environ), job_env()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.clear()
        os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            setup_default_logger()  # datatrove logs to sys.stderr as it is when a sink is added
            code = main(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        setup_default_logger()  # back on this process's stderr
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def read_jsonl_gz(folder: Path) -> list[dict[str, Any]]:
    """Documents of every ``*.jsonl.gz`` in ``folder``, files in name order."""
    docs: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            docs += [json.loads(line) for line in fh if line.strip()]
    return docs


def read_shards(folder: Path) -> list[list[int]]:
    """Documents (token id lists, EOS included) of every shard in ``folder``, files in name order."""
    import numpy as np

    docs: list[list[int]] = []
    for path in sorted(folder.glob("*.ds")):
        meta = (path.parent / f"{path.name}.metadata").read_text().splitlines()
        size = int(meta[0].rsplit("|", 1)[1])
        tokens = np.fromfile(path, dtype=np.uint16 if size == 2 else np.uint32)
        ends = np.fromfile(path.parent / f"{path.name}.index", dtype=np.uint64)
        start = 0
        for end in ends:
            docs.append(tokens[start : int(end)].tolist())
            start = int(end)
        assert start == len(tokens), f"{path}: index does not cover the file"
    return docs


# -------------------------------------------------------------------------------------------- processes
# The environment variable every process a test starts inherits (tests/conftest.py sets it to the pytest
# process's pid); a process carrying it is found even after its parent died and init adopted it.
SESSION_VARIABLE = "LMFORGE_TEST_SESSION"


def tagged_processes(tag: str) -> dict[int, str]:
    """pid → command line of every live process (but this one) whose environment has
    ``LMFORGE_TEST_SESSION=tag`` (Linux ``/proc``; processes of other users are not readable and skipped)."""
    needle = f"{SESSION_VARIABLE}={tag}".encode()
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = fh.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone, or not ours
            continue
        if needle in environ and state != b"Z":  # a zombie is dead, waiting for its parent to reap it
            found[int(entry)] = cmdline
    return found
