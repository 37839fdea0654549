"""LLM-as-judge and arena: verdict parsing, hand-computed win rates and Bradley–Terry ratings, a tiny local
judge end to end, and an OpenAI-compatible endpoint judge served by a stub on 127.0.0.1."""

from __future__ import annotations

import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import manifests
import numpy as np
import pytest
from prometheus_client import REGISTRY
from repo import ROOT
from tiny_models import tiny_llama

from lmforge_jobs.evaluate import arena
from lmforge_jobs.evaluate.__main__ import main
from lmforge_jobs.evaluate.judge import LOSS, TIE, WIN, Comparison, compare, parse_verdict, win_rate
from lmforge_jobs.pretrain.testing import synthetic_texts
from lmforge_jobs.spec import EXIT_CONFIG_ERROR, EXIT_UNAVAILABLE

PROMPTS = ROOT / "examples" / "tasks" / "judge_prompts.jsonl"
TEXTS = synthetic_texts(30, seed=5)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("models")
    return [tiny_llama(root / f"m{seed}", seed=seed, layers=1) for seed in range(3)]


@pytest.fixture(scope="module")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "held.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:6]), encoding="utf-8")
    return path


def write_manifest(tmp: Path, spec: dict) -> Path:
    spec = {"precision": "fp32", "output": str(tmp / "out"), "batchSize": 4, **spec}
    return manifests.write_manifest(tmp / "ev.yaml", "Evaluation", "ev", spec, sort_keys=False)


def transcript(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "out" / "judgments.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ aggregation
@pytest.mark.parametrize(
    "text,verdict",
    [
        ("[[A]]", "A"),
        ("After thinking, [[B]] is better. Final: [[ b ]]", "B"),
        ("[[C]]", "tie"),
        ("[[tie]]", "tie"),
        ("A", "A"),
        ("**B** because it is shorter", "B"),
        ("Verdict: tie", "tie"),
        ("Answer A is better", "A"),
        ("Both are bad", None),
        ("", None),
        ("Absolutely the first", None),
    ],
)
def test_parse_verdict(text: str, verdict: str | None) -> None:
    assert parse_verdict(text) == verdict


def test_win_rate_hand_computed() -> None:
    comps = [
        Comparison([WIN, WIN]),  # win
        Comparison([WIN, TIE]),  # disagreement: tie
        Comparison([LOSS, LOSS]),  # loss
        Comparison([WIN, None]),  # one readable verdict: win
        Comparison([None, None]),  # not counted
        Comparison([TIE, TIE]),  # tie
        Comparison([WIN, LOSS]),  # position bias cancels: tie
    ]
    out = win_rate(comps, bootstrap_samples=2000)
    assert (out["wins"], out["losses"], out["ties"], out["unparseable"]) == (2, 1, 3, 3)
    assert out["winRate"] == pytest.approx((2 + 3 / 2) / 6)
    low, high = out["ci95"]
    assert 0 <= low < out["winRate"] < high <= 1
    # the interval of 6 pairs is wide; the interval of 600 identical-rate pairs is narrow
    wide = high - low
    many = win_rate(comps * 100, bootstrap_samples=2000)
    assert many["winRate"] == pytest.approx(out["winRate"])
    assert many["ci95"][1] - many["ci95"][0] < wide / 5


def test_swapping_positions_cancels_a_position_biased_judge() -> None:
    def always_a(requests):
        return ["[[A]]"] * len(requests)

    prompts, mine, theirs = ["p1", "p2", "p3"], ["x", "y", "z"], ["u", "v", "w"]
    swapped = win_rate(compare(always_a, prompts, mine, theirs, swap=True))
    assert (swapped["ties"], swapped["winRate"]) == (3, 0.5)
    biased = win_rate(compare(always_a, prompts, mine, theirs, swap=False))
    assert (biased["wins"], biased["winRate"]) == (3, 1.0)


def test_bradley_terry_hand_computed() -> None:
    # two models, 3:1 → strength ratio 3 → 400·log10(3) points apart, centred on 1000
    r = arena.ratings(2, [(0, 1, 1.0)] * 3 + [(0, 1, 0.0)], prior=0)
    assert r[0] - r[1] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert r.mean() == pytest.approx(1000)
    # A 2:1 B, B 2:1 C, A 4:1 C is solved exactly by strengths 4, 2, 1
    games = (
        [(0, 1, 1.0)] * 2
        + [(0, 1, 0.0)]
        + [(1, 2, 1.0)] * 2
        + [(1, 2, 0.0)]
        + [(0, 2, 1.0)] * 4
        + [(2, 0, 1.0)]
    )
    r = arena.ratings(3, games, prior=0)
    assert r == pytest.approx([1000 + 400 * math.log10(2), 1000, 1000 - 400 * math.log10(2)], abs=1e-6)
    # ties count half for each side: 2 ties + 1 win each way is even
    even = arena.ratings(2, [(0, 1, 0.5), (0, 1, 0.5), (0, 1, 1.0), (1, 0, 1.0)], prior=0)
    assert even == pytest.approx([1000, 1000])
    # the prior keeps a model that lost everything finite; intervals contain the estimates
    rated = arena.rate(["a", "b"], [(0, 1, 1.0)] * 5, bootstrap_samples=200)
    assert np.isfinite(rated["b"]["rating"]) and rated["a"]["rating"] > rated["b"]["rating"]
    spread = arena.rate(["a", "b", "c"], games, prior=0.5, bootstrap_samples=300)
    for name in "abc":
        low, high = spread[name]["ci95"]
        assert low <= spread[name]["rating"] <= high


# ------------------------------------------------------------------------------------------ local judge
def test_local_judge_and_arena_end_to_end(tmp_path: Path, models: list[str]) -> None:
    spec = {
        "model": {"path": models[0]},
        "judge": {
            "model": {"path": models[2]},
            "reference": {"path": models[1]},
            "prompts": str(PROMPTS),
            "maxNewTokens": 8,
            "limit": 4,
            "bootstrapSamples": 200,
        },
        "arena": {"opponents": [{"path": models[2]}]},
    }
    assert main(["--manifest", str(write_manifest(tmp_path, spec))]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    judge = res["judge"]
    rows = transcript(tmp_path)
    vs_ref = [r for r in rows if {r["a"], r["b"]} == {"m0", "m1"}]
    assert len(vs_ref) == 4 and len(rows) == 4 * 3  # m0–m1, m0–m2, m1–m2
    assert all(len(r["replies"]) == 2 for r in rows)  # positions swapped
    counted = judge["wins"] + judge["losses"] + judge["ties"]
    assert counted == sum(r["outcome"] is not None for r in vs_ref)
    unreadable = sum(parse_verdict(reply) is None for r in vs_ref for reply in r["replies"])
    assert judge["unparseable"] == unreadable
    assert set(res["arena"]) == {"m0", "m1", "m2"}
    assert sum(v["rating"] for v in res["arena"].values()) == pytest.approx(3000)


# --------------------------------------------------------------------------------------- endpoint judge
def preference(a: str, b: str) -> int:
    """The stub judge's taste, position-independent: > 0 prefers a, < 0 prefers b, 0 is a tie."""
    return len(b) % 3 - len(a) % 3


class StubJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint judging by :func:`preference`; prompts naming zip() get no verdict."""

    key = "sekret"
    seen: list[dict] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            return self._reply(404, {"error": "not found"})
        if self.headers.get("Authorization") != f"Bearer {self.key}":
            return self._reply(401, {"error": "bad key"})
        type(self).seen.append(body)
        if body["model"] == "broken":
            return self._reply(500, {"error": "overloaded"})
        if body["model"] == "empty":
            return self._reply(200, {"choices": []})
        user = body["messages"][-1]["content"]
        m = re.search(
            r"\[Question\]\n(.*)\n\n\[Answer A\]\n(.*)\n\n\[Answer B\]\n(.*)\n\nWhich answer", user, re.S
        )
        question, a, b = m.groups()
        if "zip()" in question:
            text = "I cannot decide."
        else:
            pref = preference(a, b)
            text = "[[A]]" if pref > 0 else "[[B]]" if pref < 0 else "[[C]]"
        self._reply(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

    def _reply(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubJudge)
    StubJudge.seen = []
    # a short poll interval: shutdown() waits for the loop to look (half a second by default)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def endpoint_spec(url: str, models: list[str], **judge: object) -> dict:
    return {
        "model": {"path": models[0]},
        "judge": {
            "model": {
                "endpoint": {
                    "url": url,
                    "modelName": "judge",
                    "apiKey": {"secretKeyRef": {"name": "judge", "key": "key"}},
                }
            },
            "reference": {"path": models[1]},
            "prompts": str(PROMPTS),
            "maxNewTokens": 12,
            "temperature": 1.0,  # sampled: a random tiny model answers every prompt alike when greedy
            "limit": 6,
            "bootstrapSamples": 500,
            **judge,
        },
    }


def test_endpoint_judge_win_rate_matches_hand_count(
    tmp_path: Path, models: list[str], endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = tmp_path / "secrets"
    (secrets / "judge").mkdir(parents=True)
    (secrets / "judge" / "key").write_text("sekret\n")
    monkeypatch.setenv("LMFORGE_SECRETS_DIR", str(secrets))  # the key as a mounted Secret file
    assert main(["--manifest", str(write_manifest(tmp_path, endpoint_spec(endpoint, models)))]) == 0
    rows = transcript(tmp_path)
    assert len(rows) == 6 and len(StubJudge.seen) == 12
    assert all(b["model"] == "judge" and b["messages"][0]["role"] == "system" for b in StubJudge.seen)
    wins = losses = ties = unparseable = 0
    for row in rows:  # the stub's rule, applied by hand to the answers the job recorded
        if "zip()" in row["prompt"]:
            unparseable += 2
            continue
        pref = preference(row["answerA"], row["answerB"])
        wins += pref > 0
        losses += pref < 0
        ties += pref == 0
    judge = json.loads((tmp_path / "out" / "results.json").read_text())["judge"]
    assert (judge["wins"], judge["losses"], judge["ties"], judge["unparseable"]) == (
        wins,
        losses,
        ties,
        unparseable,
    )
    assert unparseable == 2  # one prompt of the first six names zip()
    assert wins and losses  # a mixed record, so the count is informative
    assert judge["winRate"] == pytest.approx((wins + ties / 2) / (wins + losses + ties))
    assert judge["ci95"][0] <= judge["winRate"] <= judge["ci95"][1]
    assert REGISTRY.get_sample_value("lmforge_eval_judge_win_rate") == pytest.approx(judge["winRate"])


def test_endpoint_errors_name_the_field_and_keep_results(
    tmp_path: Path,
    models: list[str],
    endpoint: str,
    text_data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # no secret at all: refused before any work
    monkeypatch.setenv("LMFORGE_SECRETS_DIR", str(tmp_path / "empty"))
    assert (
        main(["--manifest", str(write_manifest(tmp_path, endpoint_spec(endpoint, models)))])
        == EXIT_CONFIG_ERROR
    )
    assert (
        "error: spec.judge.model.endpoint.apiKey: Secret 'judge' key 'key' is not available"
        in capsys.readouterr().err
    )
    # the wrong key: the endpoint's 401 names apiKey
    monkeypatch.setenv("LMFORGE_SECRET_JUDGE_KEY", "wrong")
    assert (
        main(["--manifest", str(write_manifest(tmp_path, endpoint_spec(endpoint, models, limit=1)))])
        == EXIT_CONFIG_ERROR
    )
    assert "error: spec.judge.model.endpoint.apiKey:" in capsys.readouterr().err
    # nothing listens on the port: the perplexity computed before is kept, no completion marker
    monkeypatch.setenv("LMFORGE_SECRET_JUDGE_KEY", "sekret")
    import functools
    import socket

    from lmforge_jobs.evaluate.judge import EndpointJudge

    # every attempt is still made, without the seconds of backoff between them
    monkeypatch.setattr(EndpointJudge, "__init__", functools.partialmethod(EndpointJudge.__init__, backoff=0))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    spec = {**endpoint_spec(dead, models, limit=2), "perplexity": {"data": str(text_data), "seqLen": 64}}
    # an outage is not the spec's fault: exit 69, which the Job retries (64 would fail it for good)
    assert main(["--manifest", str(write_manifest(tmp_path, spec))]) == EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert f"error: spec.judge.model.endpoint.url: cannot reach the judge at {dead} (" in err
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert progress["state"] == "Failed" and progress["field"] == "spec.judge.model.endpoint.url"
    assert "Traceback" not in err
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["perplexity"] > 1 and "judge" not in res
    assert not (tmp_path / "out" / "outputs.json").exists()


def test_endpoint_judge_failures(endpoint: str) -> None:
    from lmforge_jobs.entry import ConfigError, ServiceUnavailable
    from lmforge_jobs.evaluate.judge import EndpointJudge

    request = [("q", "a", "b")]
    assert EndpointJudge(endpoint, "empty", "sekret")(request) == [""]  # no message: an unparseable verdict
    with pytest.raises(ServiceUnavailable) as err:  # 5xx after the retries: an outage, retried by the Job
        EndpointJudge(endpoint, "broken", "sekret", retries=2, backoff=0)(request)
    assert err.value.field == "judge.model.endpoint.url"
    assert "kept failing (HTTP 500" in err.value.message and "after 3 attempts" in err.value.message
    assert sum(b["model"] == "broken" for b in StubJudge.seen) == 3  # retried
    with pytest.raises(ConfigError) as err:
        EndpointJudge(endpoint.removesuffix("/v1") + "/nothing", "judge", "sekret")(request)
    assert err.value.field == "judge.model.endpoint.url" and "HTTP 404" in err.value.message


def test_read_prompts_limit_applies_to_every_row_kind(tmp_path: Path) -> None:
    from lmforge_jobs.evaluate.judge import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text('"bare one"\n"bare two"\n{"prompt": "three"}\n"bare four"\n', encoding="utf-8")
    assert read_prompts(str(path), limit=2) == ["bare one", "bare two"]
    assert read_prompts(str(path), limit=3) == ["bare one", "bare two", "three"]
    assert len(read_prompts(str(path))) == 4


def test_swapped_verdicts_are_mapped_back_to_the_first_model() -> None:
    def prefers_good(requests):  # a content judge: the answer "good" wins wherever it stands
        return ["[[A]]" if a == "good" else "[[B]]" for _, a, b in requests]

    prompts = ["p1", "p2", "p3", "p4"]
    out = win_rate(compare(prefers_good, prompts, ["good", "good", "bad", "good"], ["bad"] * 4, swap=True))
    assert (out["wins"], out["losses"], out["ties"]) == (3, 0, 1)
    assert out["winRate"] == pytest.approx(3.5 / 4)
