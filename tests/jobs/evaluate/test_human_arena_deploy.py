"""The voting page as the operator runs it: ``python -m lmforge_jobs.evaluate.human`` with the results and
the database from the environment (a Secret as an env var or a mounted file), PostgreSQL URLs pointed at
psycopg 3, SQLite still the default, ``/healthz`` (the database answers) and ``/livez`` for the probes."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from lmforge_jobs.evaluate import human


@pytest.fixture
def results(tmp_path: Path) -> Path:
    out = tmp_path / "eval"
    out.mkdir()
    rows = [
        {
            "prompt": f"q{k}",
            "a": "sft",
            "b": "base",
            "answerA": f"yes {k}",
            "answerB": f"no {k}",
            "outcome": "win",
        }
        for k in range(3)
    ]
    (out / "judgments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (human.DB_ENV, human.DB_FILE_ENV, human.RESULTS_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@db:5432/votes", "postgresql+psycopg://u:p@db:5432/votes"),
        ("postgresql://u:p@db/votes?sslmode=require", "postgresql+psycopg://u:p@db/votes?sslmode=require"),
        ("postgresql+psycopg://u:p@db/votes", "postgresql+psycopg://u:p@db/votes"),
        ("postgresql+psycopg2://u:p@db/votes", "postgresql+psycopg2://u:p@db/votes"),
        ("sqlite:////data/human-votes.sqlite", "sqlite:////data/human-votes.sqlite"),
        ("  postgres://u:p@db/votes\n", "postgresql+psycopg://u:p@db/votes"),
    ],
)
def test_postgres_urls_use_psycopg_3(given: str, expected: str) -> None:
    assert human.database_url(given) == expected
    if expected.startswith("postgresql"):
        assert sa.engine.make_url(human.database_url(given)).drivername == expected.split(":")[0]


def test_the_url_comes_from_the_env_then_a_secret_file_then_sqlite_beside_the_results(
    results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert human.default_db(results) == f"sqlite:///{(results / human.DB_FILE).resolve()}"
    secret = tmp_path / "secret" / "url"
    secret.parent.mkdir()
    secret.write_text("postgresql://arena:pw@pg/votes\n", encoding="utf-8")  # a Secret file ends in \n
    monkeypatch.setenv(human.DB_FILE_ENV, str(secret))
    assert human.default_db(results) == "postgresql://arena:pw@pg/votes"
    monkeypatch.setenv(human.DB_ENV, "postgresql+psycopg://from:env@pg/votes")
    assert human.default_db(results) == "postgresql+psycopg://from:env@pg/votes"
    # in object storage no SQLite file can live beside the results: the environment must say
    monkeypatch.delenv(human.DB_ENV)
    monkeypatch.delenv(human.DB_FILE_ENV)
    with pytest.raises(ValueError, match="LMFORGE_ARENA_DB"):
        human.default_db("s3://bucket/eval")


def serve_through_main(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> tuple[int, dict[str, Any]]:
    """Run the module's main with uvicorn.run caught: the exit code and what it would have served."""
    import uvicorn

    served: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    return human.main(argv), served


def test_main_serves_the_results_the_env_names_with_sqlite_on_a_volume(
    results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume = tmp_path / "votes"
    volume.mkdir()
    monkeypatch.setenv(human.RESULTS_ENV, str(results))
    monkeypatch.setenv(human.DB_ENV, f"sqlite:///{volume / human.DB_FILE}")
    code, served = serve_through_main(monkeypatch, ["--host", "0.0.0.0", "--port", "8080"])
    assert code == 0
    assert (served["host"], served["port"]) == ("0.0.0.0", 8080)
    assert (volume / human.DB_FILE).exists()
    client = TestClient(served["app"])
    for probe in ("/healthz", "/livez"):
        health = client.get(probe)
        assert (health.status_code, health.text) == (200, "ok")
    board = client.get("/leaderboard.json").json()
    assert {m["name"] for m in board["models"]} == {"sft", "base"}
    assert board["votes"] == 0


def test_healthz_fails_when_the_database_does_not_answer(results: Path) -> None:
    state = human.open_arena(results, bootstrap_samples=100)

    def down() -> None:
        raise sa.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))

    state.store.ping = down  # type: ignore[method-assign]
    client = TestClient(human.create_app(state), raise_server_exceptions=False)
    response = client.get("/healthz")
    assert response.status_code == 500
    assert "connection refused" not in response.text  # no details for users
    # liveness does not depend on the database: an outage makes the page unready, never restarts it
    live = client.get("/livez")
    assert (live.status_code, live.text) == (200, "ok")


def test_main_refuses_missing_results_with_exit_64(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(human.RESULTS_ENV, str(tmp_path / "nowhere"))
    code, served = serve_through_main(monkeypatch, [])
    assert code == 64 and not served
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "where",
    [
        "in this process",  # the module run as __main__, as -m runs it
        pytest.param("in a fresh interpreter", marks=pytest.mark.slow),  # a second of imports
    ],
)
def test_the_module_runs_as_an_entry_point(
    where: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if where == "in a fresh interpreter":
        done = subprocess.run(
            [sys.executable, "-m", "lmforge_jobs.evaluate.human", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        code, out, err = done.returncode, done.stdout, done.stderr
    else:
        monkeypatch.setattr(sys, "argv", ["human", "--help"])
        monkeypatch.delitem(sys.modules, "lmforge_jobs.evaluate.human")  # run afresh, as -m does
        with pytest.raises(SystemExit) as done:
            runpy.run_module("lmforge_jobs.evaluate.human", run_name="__main__", alter_sys=True)
        code = done.value.code
        out, err = capsys.readouterr()
    assert code == 0, err
    assert "LMFORGE_ARENA_RESULTS" in out


def test_the_arena_example_compares_the_quickstarts_models() -> None:
    """``examples/arena`` (what ./quickstart suggests next) is valid, judges the quickstart's three models,
    and reads its judge from where the quickstart's default work directory puts tiny-sft."""
    from repo import ROOT

    from lmforge_jobs.manifest import load_resources
    from lmforge_jobs.resolve import default_output, dependencies

    resources, problems = load_resources([ROOT / "examples" / "quickstart", ROOT / "examples" / "arena"])
    assert not problems
    (arena_eval,) = [r for r in resources if r.name == "tiny-arena"]
    names = {r.name for r in resources}
    refs = {ref for _, ref, _ in dependencies(arena_eval)}
    assert refs == {("AlignmentRun", "tiny-dpo"), ("PretrainRun", "tiny-gpt"), ("AlignmentRun", "tiny-sft")}
    assert {name for _, name in refs} <= names
    judge = arena_eval.spec.judge.model.path
    assert judge == default_output("AlignmentRun", "tiny-sft", "lmforge-runs") + "/model"
    script = (ROOT / "quickstart").read_text(encoding="utf-8")
    assert "lmforge run examples/arena" in script
    assert "lmforge arena serve --results $workdir/evaluation/tiny-arena" in script
