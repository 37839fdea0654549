"""The human arena: votes through the page (recorded, refused twice, kept across restarts, exported),
ratings and human–judge agreement from planted votes, CSRF, escaping of hostile answers, rate and size
limits, many voters at once through a real server, and a real headless browser when one is installed."""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from lmforge_jobs.evaluate import human
from lmforge_jobs.evaluate.human import Arena, Vote, VoteStore, create_app
from lmforge_operator.cli import main as cli

XSS = '<script>window.pwned=1;alert(1)</script><img src=x onerror="window.pwned=1;alert(1)">'


def transcript_row(prompt: str, a: str, b: str, answer_a: str, answer_b: str, outcome: str | None) -> str:
    row = {"prompt": prompt, "a": a, "b": b, "answerA": answer_a, "answerB": answer_b, "outcome": outcome}
    return json.dumps(row) + "\n"


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """An Evaluation's output: three models, three pairs, four prompts each; the judge prefers `good`."""
    out = tmp_path / "eval"
    out.mkdir()
    lines = []
    for k in range(4):
        lines.append(transcript_row(f"q{k}", "good", "bad", f"good answer {k}", f"bad answer {k}", "win"))
        lines.append(transcript_row(f"q{k}", "good", "mid", f"good answer {k}", f"mid answer {k}", "win"))
        lines.append(transcript_row(f"q{k}", "mid", "bad", f"mid answer {k}", f"bad answer {k}", "tie"))
    (out / "judgments.jsonl").write_text("".join(lines), encoding="utf-8")
    return out


def make_app(results: Path, **options: Any) -> tuple[Arena, TestClient]:
    state = human.open_arena(results, **{"bootstrap_samples": 200, "seed": 0, **options})
    return state, TestClient(create_app(state), base_url="http://testserver")


def form_of(page: str) -> dict[str, str]:
    fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', page))
    assert set(fields) == {"item", "order", "csrf"}, page
    return fields


def vote(client: TestClient, choice: str = "a") -> tuple[dict[str, str], httpx.Response]:
    page = client.get("/")
    assert page.status_code == 200
    fields = form_of(page.text)
    return fields, client.post("/vote", data={**fields, "choice": choice}, follow_redirects=False)


def test_outcomes_are_the_judges() -> None:
    from lmforge_jobs.evaluate import judge

    assert (human.WIN, human.LOSS, human.TIE) == (judge.WIN, judge.LOSS, judge.TIE)


def test_a_vote_is_recorded_and_reveals_the_models(results: Path) -> None:
    state, client = make_app(results)
    page = client.get("/")
    assert "A is better" in page.text and "Both bad" in page.text
    assert "good" not in re.sub(r"good answer", "", page.text)  # the models are anonymous before the vote
    fields = form_of(page.text)
    response = client.post("/vote", data={**fields, "choice": "b"}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == f"/reveal/{fields['item']}"
    reveal = client.get(response.headers["location"])
    item = state.by_id[fields["item"]]
    left, right = (item.model_a, item.model_b) if fields["order"] == "ab" else (item.model_b, item.model_a)
    assert f'id="model-a">{left}<' in reveal.text and f'id="model-b">{right}<' in reveal.text
    assert f"You chose <strong>{right}</strong>" in reveal.text
    assert 'id="next" href="/"' in reveal.text
    verdict = f"preferred {item.model_a}." if item.judge == "win" else "called it a tie."
    assert f"The LLM judge {verdict}" in reveal.text
    assert reveal.headers["cache-control"] == "no-store"
    assert client.get("/static/arena.css").headers["cache-control"] == "max-age=3600"
    [stored] = state.store.all()
    assert (stored.item, stored.prompt, stored.choice) == (item.id, item.prompt, "b")
    assert (stored.model_a, stored.model_b) == (left, right)
    assert stored.voter == client.cookies[human.VOTER_COOKIE]
    assert (datetime.now(timezone.utc) - stored.created_at).total_seconds() < 60


def test_a_second_vote_on_the_same_item_is_refused(results: Path) -> None:
    state, client = make_app(results)
    fields, first = vote(client)
    assert first.status_code == 303
    again = client.post("/vote", data={**fields, "choice": "tie"}, follow_redirects=False)
    assert again.status_code == 409 and "already" in again.text
    assert [v.choice for v in state.store.all()] == ["a"]
    with pytest.raises(human.DuplicateVote):  # the database refuses it too, whatever replica asks
        state.store.add(
            Vote(state.store.all()[0].voter, fields["item"], "p", "x", "y", "b", datetime.now(timezone.utc))
        )
    # the next page offers an item this voter has not voted on
    assert form_of(client.get("/").text)["item"] != fields["item"]


def test_votes_survive_a_restart(results: Path) -> None:
    state, client = make_app(results)
    fields, _ = vote(client, "tie")
    cookies = dict(client.cookies)
    state.store.close()
    restarted, client2 = make_app(results)  # a new process on the same SQLite file
    client2.cookies.update(cookies)
    assert [(v.item, v.choice) for v in restarted.store.all()] == [(fields["item"], "tie")]
    again = client2.post("/vote", data={**fields, "choice": "a"}, follow_redirects=False)
    assert again.status_code == 409
    assert (results / human.DB_FILE).is_file()


def test_votes_export_as_jsonl(results: Path, tmp_path: Path) -> None:
    _, client = make_app(results)
    for choice in ("a", "bad"):
        assert vote(client, choice)[1].status_code == 303
    out = tmp_path / "votes.jsonl"
    assert cli(["arena", "export", "--results", str(results), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["choice"] for r in rows] == ["a", "bad"]
    assert rows[0]["winner"] == rows[0]["modelA"] and rows[1]["winner"] is None
    assert set(rows[0]) == {"voter", "item", "prompt", "modelA", "modelB", "choice", "winner", "time"}
    assert datetime.fromisoformat(rows[0]["time"]).tzinfo is not None


def test_export_of_missing_results_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["arena", "export", "--results", str(tmp_path / "nope")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_results_in_object_storage(results: Path, s3: Any, tmp_path: Path) -> None:
    from lmforge_jobs import storage

    uri = f"{s3.uri}/evals/chat"
    storage.write_text_atomic(f"{uri}/judgments.jsonl", (results / "judgments.jsonl").read_text())
    storage.write_text_atomic(
        f"{uri}/deep/judgments-step-10.jsonl", transcript_row("q", "x", "y", "1", "2", None)
    )
    with pytest.raises(ValueError, match="--db"):
        human.default_db(uri)
    state = human.open_arena(uri, f"sqlite:///{tmp_path / 'votes.sqlite'}", bootstrap_samples=100)
    assert len(state.items) == 13 and {"x", "y", "good"} <= set(human.models_of(state.items))
    assert cli(["arena", "export", "--results", uri]) == 1  # no database named


def plant(store: VoteStore, items: list[human.Item], wins: dict[tuple[str, str], tuple[int, int]]) -> None:
    """``wins[(x, y)] = (n, m)``: x beats y in n votes, loses in m, each vote by its own voter and shown
    in alternating order."""
    by_pair = {item.pair: item for item in items}
    k = 0
    for (x, y), (n, m) in wins.items():
        item = by_pair[human.pair_key(x, y)]
        for w in range(n + m):
            winner = x if w < n else y
            left, right = (x, y) if k % 2 else (y, x)
            choice = "a" if winner == left else "b"
            store.add(
                Vote(f"voter-{k:04d}", item.id, item.prompt, left, right, choice, datetime.now(timezone.utc))
            )
            k += 1


def test_ratings_rank_the_better_model_first(results: Path) -> None:
    state, client = make_app(results)
    plant(
        state.store,
        state.items,
        {("good", "bad"): (16, 4), ("good", "mid"): (12, 8), ("mid", "bad"): (13, 7)},
    )
    board = state.leaderboard()
    assert [m["name"] for m in board["models"]] == ["good", "mid", "bad"]
    for m in board["models"]:
        low, high = m["human"]["ci95"]
        assert low < m["human"]["rating"] < high
    assert board["models"][0]["votes"] == 40 and board["votes"] == 60
    # the judge's ratings from the same items: it always preferred good
    judge = {m["name"]: m["judge"]["rating"] for m in board["models"]}
    assert judge["good"] > max(judge["mid"], judge["bad"])
    page = client.get("/leaderboard").text
    assert page.index("<td>good</td>") < page.index("<td>mid</td>") < page.index("<td>bad</td>")


def test_agreement_with_the_judge_per_pair(results: Path) -> None:
    state, client = make_app(results)
    items = {(i.pair, i.prompt): i for i in state.items}
    now = datetime.now(timezone.utc)
    gb = [items[(("bad", "good"), f"q{k}")] for k in range(4)]
    mb = items[(("bad", "mid"), "q0")]
    votes = [
        Vote("v1", gb[0].id, "q0", "good", "bad", "a", now),  # agrees (judge: good wins)
        Vote("v1", gb[1].id, "q1", "bad", "good", "b", now),  # agrees, shown swapped
        Vote("v1", gb[2].id, "q2", "bad", "good", "a", now),  # disagrees
        Vote("v2", gb[0].id, "q0", "good", "bad", "tie", now),  # disagrees
        Vote("v1", mb.id, "q0", "mid", "bad", "bad", now),  # both bad = tie: agrees with the judge's tie
    ]
    for v in votes:
        state.store.add(v)
    pairs = {p["pair"]: p for p in state.leaderboard()["pairs"]}
    assert (pairs[("bad", "good")]["votes"], pairs[("bad", "good")]["judged"]) == (4, 4)
    assert pairs[("bad", "good")]["rate"] == pytest.approx(0.5)
    assert pairs[("bad", "mid")]["rate"] == 1.0
    assert pairs[("good", "mid")]["rate"] is None
    page = client.get("/leaderboard").text
    assert "<td>bad vs good</td><td>4</td><td>4</td>\n<td>50 %</td>" in page


def test_sampling_offers_the_least_voted_pair_first(results: Path) -> None:
    state, client = make_app(results)
    plant(state.store, state.items, {("good", "bad"): (3, 0), ("good", "mid"): (2, 0)})
    for _ in range(5):  # fresh voters each time: always the unvoted pair
        fresh = TestClient(client.app, base_url="http://testserver")
        assert state.by_id[form_of(fresh.get("/").text)["item"]].pair == ("bad", "mid")


@pytest.mark.parametrize("case", ["no token", "wrong token", "no cookie", "cross-site"])
def test_votes_without_a_valid_csrf_token_are_refused(results: Path, case: str) -> None:
    state, client = make_app(results)
    fields = form_of(client.get("/").text)
    data, headers = {**fields, "choice": "a"}, {}
    if case == "no token":
        del data["csrf"]
    elif case == "wrong token":
        data["csrf"] = "x" * 32
    elif case == "no cookie":
        client.cookies.delete(human.CSRF_COOKIE)
    else:
        headers["sec-fetch-site"] = "cross-site"
    response = client.post("/vote", data=data, headers=headers, follow_redirects=False)
    assert response.status_code == 403
    assert state.store.count() == 0


def test_cookies_are_http_only_and_same_site(results: Path) -> None:
    _, client = make_app(results)
    cookies = client.get("/").headers.get_list("set-cookie")
    csrf = next(c for c in cookies if c.startswith(human.CSRF_COOKIE))
    voter = next(c for c in cookies if c.startswith(human.VOTER_COOKIE))
    assert "httponly" in csrf.lower() and "samesite=strict" in csrf.lower()
    assert "httponly" in voter.lower() and "samesite=lax" in voter.lower()


def test_hostile_answers_and_prompts_are_escaped(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    out.mkdir()
    (out / "judgments.jsonl").write_text(transcript_row(XSS, "m<b>1", "m2", XSS, "fine", "loss"))
    _state, client = make_app(out)
    page = client.get("/")
    assert "<script" not in page.text.lower() and "<img" not in page.text.lower()
    assert "&lt;script&gt;window.pwned=1;alert(1)&lt;/script&gt;" in page.text
    assert "&lt;img src=x onerror=" in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    _fields, response = vote(client)
    reveal = client.get(response.headers["location"]).text
    assert "<script" not in reveal.lower() and "<img" not in reveal.lower() and "m&lt;b&gt;1" in reveal
    board = client.get("/leaderboard")
    assert "<b>" not in board.text and "m&lt;b&gt;1" in board.text
    assert board.headers["content-security-policy"] == csp


def test_rate_limit_size_limit_and_plain_errors(results: Path) -> None:
    _, client = make_app(results, rate_limit=2)
    assert vote(client)[1].status_code == 303
    assert vote(client)[1].status_code == 303
    third = vote(client)[1]
    assert third.status_code == 429 and "too many votes" in third.text
    huge = client.post("/vote", content=b"x" * (human.MAX_BODY + 1), headers={"content-type": "text/plain"})
    assert huge.status_code == 413
    missing = client.get("/nowhere")
    assert missing.status_code == 404 and "Traceback" not in missing.text
    assert missing.headers["x-frame-options"] == "DENY"


# ----------------------------------------------------------------------------------- a real server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The app under uvicorn in a thread, on 127.0.0.1."""

    def __init__(self, state: Arena):
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(create_app(state), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.mark.slow  # a few seconds on two cores
def test_fifty_voters_at_once_lose_no_vote(results: Path) -> None:
    state = human.open_arena(results, bootstrap_samples=100, seed=0)
    errors: list[str] = []
    voters = 50

    with Server(state) as url:
        pages = []
        for _ in range(voters):  # every voter has its page open, then all press a button at once
            client = httpx.Client(base_url=url)
            pages.append((client, form_of(client.get("/").text)))
        start = threading.Barrier(voters)

        def press(client: httpx.Client, fields: dict[str, str]) -> None:
            start.wait()
            try:
                response = client.post(
                    "/vote", data={**fields, "choice": "a"}, timeout=60, follow_redirects=True
                )
                if response.status_code != 200 or "You chose" not in response.text:
                    errors.append(f"{response.status_code} {response.text[:200]}")
            finally:
                client.close()

        threads = [threading.Thread(target=press, args=page) for page in pages]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors
    assert state.store.count() == voters
    assert len({v.voter for v in state.store.all()}) == voters


# ------------------------------------------------------------------------------------- a real browser
def _browser() -> Any:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no chromium + chromedriver on PATH (Debian: apt install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_in_a_real_browser_nothing_hostile_runs_and_votes_count(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    out.mkdir()
    rows = [
        transcript_row(f"{XSS} q{k}", "alpha", "beta", f"{XSS} alpha {k}", f"beta {k}", "win")
        for k in range(2)
    ]
    (out / "judgments.jsonl").write_text("".join(rows))
    state = human.open_arena(out, bootstrap_samples=100, seed=0)
    browser = _browser()
    from selenium.webdriver.common.by import By

    try:
        with Server(state) as url:
            browser.get(url + "/")
            assert browser.execute_script("return window.pwned === undefined")
            assert browser.find_elements(By.CSS_SELECTOR, "main script, main img") == []
            browser.implicitly_wait(15)  # a click returns before the next page has loaded
            assert "<script>window.pwned=1" in browser.find_element(By.ID, "prompt").text
            # the stylesheet loads under the CSP: the buttons are styled
            assert browser.find_element(By.ID, "vote-a").value_of_css_property("border-radius") == "6px"
            browser.find_element(By.ID, "vote-a").click()
            reveal = browser.find_element(By.ID, "reveal").text
            shown = browser.find_element(By.ID, "model-a").text
            assert shown in ("alpha", "beta") and f"You chose {shown}" in reveal
            assert browser.execute_script("return window.pwned === undefined")
            browser.find_element(By.ID, "next").click()
            browser.find_element(By.ID, "vote-b").click()
            assert browser.find_element(By.ID, "reveal")
            browser.get(url + "/leaderboard")
            table = browser.find_element(By.ID, "ratings").text
            assert "alpha" in table and "beta" in table
            assert "2 votes" in browser.find_element(By.TAG_NAME, "main").text
            browser.get(url + "/")  # every item voted on
            assert "voted on every pair" in browser.find_element(By.TAG_NAME, "main").text
    finally:
        browser.quit()
    assert state.store.count() == 2
    assert len({v.voter for v in state.store.all()}) == 1  # one person, one cookie


def test_the_run_report_shows_human_ratings_next_to_the_judges(results: Path, tmp_path: Path) -> None:
    from lmforge_operator.report import build_report

    state = human.open_arena(results)
    plant(state.store, state.items, {("good", "bad"): (5, 1)})
    state.store.close()
    workdir = tmp_path / "runs"
    (workdir / "evaluation" / "chat").mkdir(parents=True)
    status = {
        "phase": "Succeeded",
        "outputs": {"results": str(results / "results.json")},
        "results": {"arena": {"good": {"rating": 1100.0}, "bad": {"rating": 900.0}}},
    }
    (workdir / "evaluation" / "chat" / "status.json").write_text(json.dumps(status))
    page = build_report(workdir).read_text()
    assert "<td>arena good</td>" in page and "<td>human arena good</td>" in page
    assert "6 votes" in page and "human–judge agreement bad vs good" in page
