"""Human evaluation: a Chatbot-Arena-style voting page whose votes become Bradley–Terry ratings.

    lmforge arena serve --results OUT [--db URL] [--host 127.0.0.1] [--port 8000]
    lmforge arena export --results OUT [--db URL] [--out votes.jsonl]
    python -m lmforge_jobs.evaluate.human [--results OUT] [--host H] [--port P]   # the jobs image's entry

The module entry point is what the operator runs in the jobs image for an Evaluation's ``arena.human``: the
results URI comes from ``$LMFORGE_ARENA_RESULTS`` and the database URL from ``$LMFORGE_ARENA_DB`` (a
``secretKeyRef``) or the file ``$LMFORGE_ARENA_DB_FILE`` names (a mounted Secret), never from arguments.

**Items** are the pairs the LLM judge saw: every line of ``OUT/judgments*.jsonl`` (an Evaluation's
transcripts, :mod:`.judge`) is one item — a prompt, two models and their answers, and the judge's outcome.
An item's id is a hash of its content, so it stays the same across restarts and replicas.

**The page** (``/``) shows a prompt and two anonymised answers side by side, in random order, with four
buttons: "A is better", "B is better", "Tie", "Both bad". A vote redirects to ``/reveal/ITEM``, which names
the models (and what the judge said) and links to the next pair. **Sampling is fewest-votes-first**: among
the items this voter has not voted on, the model pair with the fewest votes, then its item with the fewest
votes, ties broken at random — every pair's rating gets votes before any pair gets many.

**The leaderboard** (``/leaderboard``) shows Bradley–Terry ratings with 95 % bootstrap intervals (the
same fit as the judge's arena, :mod:`.arena`) from the human votes next to the judge's from the same items,
vote counts, and per model pair the human–judge agreement rate: of the votes on items the judge decided,
the share where the judge's outcome (win, loss or tie, from :mod:`.judge`) equals the person's. "Both bad"
counts as a tie, for the ratings and for agreement (as Chatbot Arena does).

**Votes** go through SQLAlchemy to ``--db``, else ``$LMFORGE_ARENA_DB`` or the file named by
``$LMFORGE_ARENA_DB_FILE`` (on a cluster: a PostgreSQL URL such as ``postgresql+psycopg://user:pass@host/db``
from a Secret; ``postgres://`` and ``postgresql://`` mean psycopg 3, the arena extra's driver), else a
SQLite file beside the results (``OUT/human-votes.sqlite``). One row per vote: voter, item, prompt, the
two models as shown (A left, B right), choice, time; ``UNIQUE(voter, item)`` refuses a second vote of the
same voter on the same item, whichever replica receives it.

**Safety.** Prompts and answers are untrusted: every page is a Jinja2 template with autoescaping, the
Content-Security-Policy allows no script at all (the page has none: plain forms), no framing, and forms
only to this site. Votes are POSTs that need the anonymous voter cookie (``SameSite=Lax``, so a person
keeps one identity when arriving through a link) and a CSRF token that equals the ``SameSite=Strict``
cookie set with the page (double submit; a cross-site request carries neither cookie). Each voter may cast
``rate_limit`` votes a minute (429 beyond), request bodies are at most 16 KiB, and errors are plain pages
without tracebacks. The app has no passwords: on a cluster, expose it through an Ingress or Gateway with
the cluster's own authentication (oauth2-proxy or similar).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import random
import secrets
import sys
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge_jobs import storage
from lmforge_jobs.evaluate import arena

# the outcomes judge.py writes in judgments*.jsonl (not imported: judge.py imports torch, which the
# operator, importing this module for `lmforge arena`, must not)
WIN, LOSS, TIE = "win", "loss", "tie"
DB_ENV = "LMFORGE_ARENA_DB"
DB_FILE_ENV = "LMFORGE_ARENA_DB_FILE"
RESULTS_ENV = "LMFORGE_ARENA_RESULTS"
DB_FILE = "human-votes.sqlite"
VOTER_COOKIE = "lmforge_arena_voter"
CSRF_COOKIE = "lmforge_arena_csrf"
MAX_BODY = 16 * 1024
CHOICES = {"a": "A is better", "b": "B is better", "tie": "Tie", "bad": "Both bad"}
SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5, "bad": 0.5}  # from the left (A) model's side
JUDGE_SCORE = {WIN: 1.0, TIE: 0.5, LOSS: 0.0}


# ------------------------------------------------------------------------------------------------ items
@dataclass(frozen=True)
class Item:
    """One prompt answered by two models, as the judge saw it; ``judge`` is its outcome for ``model_a``."""

    id: str
    prompt: str
    model_a: str
    model_b: str
    answer_a: str
    answer_b: str
    judge: str | None

    @property
    def pair(self) -> tuple[str, str]:
        return pair_key(self.model_a, self.model_b)


def pair_key(x: str, y: str) -> tuple[str, str]:
    return (x, y) if x <= y else (y, x)


def item_id(prompt: str, a: str, b: str, answer_a: str, answer_b: str) -> str:
    text = json.dumps([prompt, a, b, answer_a, answer_b], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def judgment_files(results: str | Path) -> list[str]:
    """The transcripts of ``results``: a judgments JSONL file, or every ``judgments*.jsonl`` under a
    directory (an Evaluation's output, or a local run's work directory); a results.json means its folder.
    ``results`` may be in object storage (``s3://…``, through :mod:`lmforge_jobs.storage`)."""
    text = str(results)
    if storage.is_remote(text):
        fs, path = storage.filesystem(text)
        if path.endswith(".jsonl"):
            return [text]
        if path.endswith(".json"):
            path = path.rpartition("/")[0]
        found = [p for p in fs.find(path) if fnmatch.fnmatch(p.rpartition("/")[2], "judgments*.jsonl")]
        return sorted(storage.to_uri(fs, p) for p in found)
    local = Path(results)
    if local.is_file() and local.suffix == ".jsonl":
        return [str(local)]
    if local.is_file():
        local = local.parent
    if not local.is_dir():
        raise FileNotFoundError(f"{results}: no such file or directory")
    return [str(p) for p in sorted(local.rglob("judgments*.jsonl"))]


def load_items(results: str | Path) -> list[Item]:
    """The items of every transcript under ``results``, each once, in file order."""
    items: dict[str, Item] = {}
    for uri in judgment_files(results):
        for line in storage.read_text(uri).splitlines():
            try:
                row = json.loads(line)
                prompt, a, b = str(row["prompt"]), str(row["a"]), str(row["b"])
                answer_a, answer_b = str(row["answerA"]), str(row["answerB"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short, or not a transcript row
            if a == b:
                continue
            key = item_id(prompt, a, b, answer_a, answer_b)
            outcome = row.get("outcome")
            judge = outcome if outcome in JUDGE_SCORE else None
            items.setdefault(key, Item(key, prompt, a, b, answer_a, answer_b, judge))
    if not items:
        raise FileNotFoundError(
            f"{results}: no judgments*.jsonl with answer pairs (run an Evaluation with judge)"
        )
    return list(items.values())


def database_url(url: str) -> str:
    """``url`` with PostgreSQL's bare schemes (``postgres://``, ``postgresql://``: what Postgres operators and
    hosted databases put in their Secrets) pointed at psycopg 3, the driver the arena extra declares
    (SQLAlchemy's bare ``postgresql://`` means psycopg2). Other URLs are returned unchanged."""
    url = url.strip()
    for scheme in ("postgres://", "postgresql://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def configured_db() -> str | None:
    """The database URL the environment gives: ``$LMFORGE_ARENA_DB``, else the content of the file
    ``$LMFORGE_ARENA_DB_FILE`` names (a Secret mounted as a file); None when neither is set."""
    if os.environ.get(DB_ENV):
        return os.environ[DB_ENV]
    if os.environ.get(DB_FILE_ENV):
        return Path(os.environ[DB_FILE_ENV]).read_text(encoding="utf-8").strip()
    return None


def default_db(results: str | Path) -> str:
    """``$LMFORGE_ARENA_DB`` (or ``$LMFORGE_ARENA_DB_FILE``'s content), else a SQLite file beside the results
    (when they are on a local disk)."""
    configured = configured_db()
    if configured:
        return configured
    if storage.is_remote(results):
        raise ValueError(
            f"{results} is in object storage, where no database can live: give --db or ${DB_ENV}"
        )
    path = Path(results)
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise FileNotFoundError(f"{results}: no such file or directory")
    return f"sqlite:///{(folder / DB_FILE).resolve()}"


# ------------------------------------------------------------------------------------------------ store
metadata = sa.MetaData()
votes_table = sa.Table(
    "votes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("voter", sa.String(64), nullable=False),
    sa.Column("item", sa.String(64), nullable=False, index=True),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("model_a", sa.String(256), nullable=False),  # shown left, as "A"
    sa.Column("model_b", sa.String(256), nullable=False),  # shown right, as "B"
    sa.Column("choice", sa.String(8), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("voter", "item", name="uq_votes_voter_item"),
    sa.CheckConstraint("choice IN ('a', 'b', 'tie', 'bad')", name="ck_votes_choice"),
)


@dataclass(frozen=True)
class Vote:
    voter: str
    item: str
    prompt: str
    model_a: str
    model_b: str
    choice: str
    created_at: datetime

    def as_json(self) -> dict[str, Any]:
        winner = {"a": self.model_a, "b": self.model_b}.get(self.choice)
        return {
            "voter": self.voter,
            "item": self.item,
            "prompt": self.prompt,
            "modelA": self.model_a,
            "modelB": self.model_b,
            "choice": self.choice,
            "winner": winner,
            "time": self.created_at.isoformat(),
        }


class DuplicateVote(Exception):
    """The voter has voted on this item already."""


class VoteStore:
    """Votes in a database through SQLAlchemy: a SQLite file or PostgreSQL; the table is created when
    missing, so a restarted server (or a second replica) continues with the votes already cast."""

    def __init__(self, url: str):
        url = database_url(url)
        sqlite = url.startswith("sqlite")
        self.engine = sa.create_engine(url, pool_pre_ping=not sqlite)
        if sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)

    def add(self, vote: Vote) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    votes_table.insert().values(
                        voter=vote.voter,
                        item=vote.item,
                        prompt=vote.prompt,
                        model_a=vote.model_a,
                        model_b=vote.model_b,
                        choice=vote.choice,
                        created_at=vote.created_at,
                    )
                )
        except sa.exc.IntegrityError as exc:
            raise DuplicateVote(vote.item) from exc

    def all(self) -> list[Vote]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(votes_table).order_by(votes_table.c.id)).all()
        return [_vote(r) for r in rows]

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(votes_table)).scalar_one())

    def per_item(self) -> Counter[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(votes_table.c.item, sa.func.count()).group_by(votes_table.c.item)
            ).all()
        return Counter({item: int(n) for item, n in rows})

    def items_of(self, voter: str) -> set[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(votes_table.c.item).where(votes_table.c.voter == voter)).all()
        return {r[0] for r in rows}

    def vote_of(self, voter: str, item: str) -> Vote | None:
        query = sa.select(votes_table).where(votes_table.c.voter == voter, votes_table.c.item == item)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else _vote(row)

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: readers do not block the writer; busy_timeout: concurrent writers wait instead of failing
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _vote(row: Any) -> Vote:
    created = row.created_at
    if created.tzinfo is None:  # SQLite keeps no zone; every vote is stored in UTC
        created = created.replace(tzinfo=timezone.utc)
    return Vote(row.voter, row.item, row.prompt, row.model_a, row.model_b, row.choice, created)


def export_jsonl(store: VoteStore, out: Any) -> int:
    """Every vote as one JSON line to the text stream ``out``; the number written."""
    n = 0
    for vote in store.all():
        out.write(json.dumps(vote.as_json(), ensure_ascii=False) + "\n")
        n += 1
    return n


# ---------------------------------------------------------------------------------------------- ratings
def models_of(items: Iterable[Item]) -> list[str]:
    return sorted({m for item in items for m in (item.model_a, item.model_b)})


def human_games(names: Sequence[str], votes: Iterable[Vote]) -> list[arena.Game]:
    index = {name: k for k, name in enumerate(names)}
    return [
        (index[v.model_a], index[v.model_b], SCORE[v.choice])
        for v in votes
        if v.model_a in index and v.model_b in index
    ]


def judge_games(names: Sequence[str], items: Iterable[Item]) -> list[arena.Game]:
    index = {name: k for k, name in enumerate(names)}
    return [(index[i.model_a], index[i.model_b], JUDGE_SCORE[i.judge]) for i in items if i.judge is not None]


def agreement(items: Iterable[Item], votes: Iterable[Vote]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per model pair: votes, votes on items the judge decided, and the share of those where the judge's
    outcome equals the person's ("both bad" is a tie)."""
    by_id = {item.id: item for item in items}
    out: dict[tuple[str, str], dict[str, Any]] = defaultdict(lambda: {"votes": 0, "judged": 0, "agree": 0})
    for vote in votes:
        item = by_id.get(vote.item)
        if item is None:
            continue
        row = out[item.pair]
        row["votes"] += 1
        if item.judge is None:
            continue
        human = SCORE[vote.choice] if vote.model_a == item.model_a else 1.0 - SCORE[vote.choice]
        row["judged"] += 1
        row["agree"] += human == JUDGE_SCORE[item.judge]
    for row in out.values():
        row["rate"] = row["agree"] / row["judged"] if row["judged"] else None
    return dict(out)


def leaderboard(
    items: Sequence[Item], votes: Sequence[Vote], bootstrap_samples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """``{"models": [{name, human, judge, votes}], "pairs": [{pair, votes, judged, agree, rate}]}`` with
    ``human``/``judge`` in the Results.arena shape (``{rating, ci95}``), models best (human) first."""
    names = models_of(items)
    human = arena.rate(names, human_games(names, votes), bootstrap_samples=bootstrap_samples, seed=seed)
    judge = arena.rate(names, judge_games(names, items), bootstrap_samples=bootstrap_samples, seed=seed)
    counts = Counter(m for v in votes for m in (v.model_a, v.model_b))
    models = [{"name": n, "human": human[n], "judge": judge[n], "votes": counts[n]} for n in names]
    models.sort(key=lambda m: -float(m["human"]["rating"]))
    agree = agreement(items, votes)
    pairs = [
        {"pair": p, **agree.get(p, {"votes": 0, "judged": 0, "agree": 0, "rate": None})}
        for p in _pairs(items)
    ]
    return {"models": models, "pairs": pairs, "votes": len(votes)}


def _pairs(items: Iterable[Item]) -> list[tuple[str, str]]:
    return sorted({item.pair for item in items})


def human_ratings(
    results: str | Path, db: str | None = None, bootstrap_samples: int = 1000
) -> dict[str, Any]:
    """The leaderboard of the votes on ``results`` (``{}`` when nobody voted): for reports."""
    items = load_items(results)
    store = VoteStore(db or default_db(results))
    try:
        votes = store.all()
    finally:
        store.close()
    return leaderboard(items, votes, bootstrap_samples) if votes else {}


# ------------------------------------------------------------------------------------------------ pages
_BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}lmforge arena{% endblock %}</title>
<link rel="stylesheet" href="/static/arena.css">
</head><body>
<header><strong>lmforge arena</strong>
<nav><a href="/">Vote</a> <a href="/leaderboard">Leaderboard</a></nav></header>
<main>{% block main %}{% endblock %}</main>
</body></html>
"""

_PAIR = """{% extends "base.html" %}{% block main %}
<section class="prompt"><h2>Prompt</h2><div class="text" id="prompt">{{ item.prompt }}</div></section>
<div class="answers">
<article><h3>{% if reveal %}A: <span class="model" id="model-a">{{ left }}</span>{% else %}Model A{% endif %}</h3>
<div class="text" id="answer-a">{{ left_answer }}</div></article>
<article><h3>{% if reveal %}B: <span class="model" id="model-b">{{ right }}</span>{% else %}Model B{% endif %}</h3>
<div class="text" id="answer-b">{{ right_answer }}</div></article>
</div>
{% if reveal %}
<p class="reveal" id="reveal">You chose <strong>{{ choice }}</strong>.
{{ judge }}</p>
<p><a class="button" id="next" href="/">Next pair</a></p>
{% else %}
<form method="post" action="/vote" class="choices">
<input type="hidden" name="item" value="{{ item.id }}">
<input type="hidden" name="order" value="{{ order }}">
<input type="hidden" name="csrf" value="{{ csrf }}">
{% for value, label in choices %}<button type="submit" name="choice" value="{{ value }}" id="vote-{{ value }}">{{ label }}</button>
{% endfor %}</form>
{% endif %}
{% endblock %}"""

_DONE = """{% extends "base.html" %}{% block main %}
<p>You have voted on every pair ({{ n }}). Thank you! See the <a href="/leaderboard">leaderboard</a>.</p>
{% endblock %}"""

_BOARD = """{% extends "base.html" %}{% block title %}lmforge arena: leaderboard{% endblock %}{% block main %}
<h2>Leaderboard</h2>
<p>{{ board.votes }} votes. Bradley–Terry ratings on the Elo scale (mean 1000) with 95 % bootstrap intervals;
"both bad" counts as a tie. Pairs to vote on are chosen fewest-votes-first.</p>
<div class="scroll"><table id="ratings"><thead><tr><th>model</th><th>human rating</th><th>95 % interval</th>
<th>votes</th><th>judge rating</th><th>95 % interval</th></tr></thead><tbody>
{% for m in board.models %}<tr><td>{{ m.name }}</td><td>{{ "%.0f"|format(m.human.rating) }}</td>
<td>{{ interval(m.human) }}</td><td>{{ m.votes }}</td><td>{{ "%.0f"|format(m.judge.rating) }}</td>
<td>{{ interval(m.judge) }}</td></tr>
{% endfor %}</tbody></table></div>
<h3>Human–judge agreement</h3>
<p>Of the votes on items the LLM judge decided, the share where the judge picked what the person picked.</p>
<div class="scroll"><table id="agreement"><thead><tr><th>pair</th><th>votes</th><th>judged</th><th>agreement</th></tr>
</thead><tbody>
{% for p in board.pairs %}<tr><td>{{ p.pair[0] }} vs {{ p.pair[1] }}</td><td>{{ p.votes }}</td><td>{{ p.judged }}</td>
<td>{% if p.rate is not none %}{{ "%.0f"|format(100 * p.rate) }} %{% else %}—{% endif %}</td></tr>
{% endfor %}</tbody></table></div>
{% endblock %}"""

_ERROR = """{% extends "base.html" %}{% block main %}<h2>{{ status }}</h2><p>{{ message }}</p>
<p><a href="/">Back to voting</a></p>{% endblock %}"""

CSS = """*{box-sizing:border-box}body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{display:flex;justify-content:space-between;align-items:center;padding:.6em 1em;background:#283593;color:#fff}
header a{color:#fff;margin-left:1em}main{max-width:1100px;margin:0 auto;padding:1em}
.text{white-space:pre-wrap;overflow-wrap:anywhere;background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8em}
.answers{display:grid;grid-template-columns:1fr 1fr;gap:1em}h2,h3{margin:.6em 0 .3em}
.choices{display:grid;grid-template-columns:repeat(4,1fr);gap:.6em;margin:1em 0}
button,.button{font-size:1.05em;padding:.8em;border:0;border-radius:6px;background:#3949ab;color:#fff;cursor:pointer;
text-align:center;text-decoration:none;display:inline-block}.model{color:#c62828}
table{border-collapse:collapse;width:100%;background:#fff}th,td{border:1px solid #ddd;padding:.4em .6em;text-align:left}
.scroll{overflow-x:auto}
@media (max-width:700px){.answers{grid-template-columns:1fr}.choices{grid-template-columns:1fr 1fr}}
"""

TEMPLATES = jinja2.Environment(
    loader=jinja2.DictLoader(
        {
            "base.html": _BASE,
            "pair.html": _PAIR,
            "done.html": _DONE,
            "board.html": _BOARD,
            "error.html": _ERROR,
        }
    ),
    autoescape=True,  # model outputs and prompts are untrusted text
    undefined=jinja2.StrictUndefined,
)
TEMPLATES.globals["interval"] = lambda r: f"{r['ci95'][0]:.0f} – {r['ci95'][1]:.0f}" if r.get("ci95") else "—"

SECURITY_HEADERS = {
    # no script at all, styles only from here, forms only to here, never framed
    "content-security-policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


class Guard:
    """ASGI middleware: security headers on every response; request bodies over ``max_body`` refused
    (413) before the app reads them, and a POST must say its length (411)."""

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.decode().lower() not in SECURITY_HEADERS
                ]
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                if not any(k.lower() == b"cache-control" for k, _ in headers):
                    headers.append((b"cache-control", b"no-store"))  # pages name a voter's choices
                message = {**message, "headers": headers}
            await send(message)

        if scope["method"] in ("POST", "PUT", "PATCH"):
            length = dict(scope.get("headers", [])).get(b"content-length")
            problem = None
            if length is None or not length.isdigit():
                problem = PlainTextResponse("length required", status_code=411)
            elif int(length) > self.max_body:
                problem = PlainTextResponse("request too large", status_code=413)
            if problem is not None:
                await problem(scope, receive, send_with_headers)
                return
        await self.app(scope, receive, send_with_headers)


class RateLimit:
    """At most ``per_minute`` votes per voter in any 60 s (in memory, per replica)."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.recent: dict[str, deque[float]] = {}
        self.lock = threading.Lock()

    def allow(self, voter: str) -> bool:
        now = time.monotonic()
        with self.lock:
            if len(self.recent) > 100_000:  # forget idle voters rather than grow without bound
                self.recent = {k: q for k, q in self.recent.items() if q and now - q[-1] < 60}
            stamps = self.recent.setdefault(voter, deque())
            while stamps and now - stamps[0] >= 60:
                stamps.popleft()
            if len(stamps) >= self.per_minute:
                return False
            stamps.append(now)
            return True


class Arena:
    """The voting app's state: the items (fixed), the vote store, the rate limit, a cached leaderboard."""

    def __init__(
        self,
        items: Sequence[Item],
        store: VoteStore,
        *,
        rate_limit: int = 30,
        bootstrap_samples: int = 1000,
        seed: int | None = None,
    ):
        self.items = list(items)
        self.by_id = {item.id: item for item in self.items}
        self.store = store
        self.limit = RateLimit(rate_limit)
        self.bootstrap_samples = bootstrap_samples
        self.rng = random.Random(seed)
        self._board: tuple[int, dict[str, Any]] | None = None
        self._board_lock = threading.Lock()

    def next_item(self, voter: str) -> Item | None:
        """Fewest-votes-first: the least-voted pair, then its least-voted item; ties at random."""
        done = self.store.items_of(voter)
        todo = [item for item in self.items if item.id not in done]
        if not todo:
            return None
        per_item = self.store.per_item()
        per_pair: Counter[tuple[str, str]] = Counter()
        for item in self.items:
            per_pair[item.pair] += per_item[item.id]
        return min(todo, key=lambda i: (per_pair[i.pair], per_item[i.id], self.rng.random()))

    def leaderboard(self) -> dict[str, Any]:
        with self._board_lock:  # a bootstrap per page view would be wasted work: recompute on new votes
            n = self.store.count()
            if self._board is None or self._board[0] != n:
                self._board = (n, leaderboard(self.items, self.store.all(), self.bootstrap_samples))
            return self._board[1]


def _page(name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(TEMPLATES.get_template(name).render(**context), status_code=status_code)


def _token() -> str:
    return secrets.token_urlsafe(24)


def _valid(value: str | None) -> bool:
    return bool(value) and 16 <= len(value) <= 64 and all(c.isalnum() or c in "-_" for c in value)


def _cookie(response: Response, request: Request, name: str, value: str, same_site: str) -> None:
    response.set_cookie(
        name,
        value,
        max_age=365 * 24 * 3600,
        httponly=True,
        samesite=same_site,
        secure=request.url.scheme == "https",
    )


def create_app(arena_state: Arena) -> ASGIApp:
    """The ASGI app of the voting page over ``arena_state`` (security headers on every response, error
    pages included)."""
    state = arena_state

    async def vote_page(request: Request) -> Response:
        voter = request.cookies.get(VOTER_COOKIE)
        voter = voter if _valid(voter) else _token()
        csrf = request.cookies.get(CSRF_COOKIE)
        csrf = csrf if _valid(csrf) else _token()
        item = await run_in_threadpool(state.next_item, voter)
        if item is None:
            response = _page("done.html", n=len(state.items))
        else:
            order = state.rng.choice(("ab", "ba"))
            left, right = _sides(item, order)
            response = _page(
                "pair.html",
                item=item,
                order=order,
                csrf=csrf,
                reveal=False,
                left_answer=left[1],
                right_answer=right[1],
                choices=list(CHOICES.items()),
            )
        _cookie(response, request, VOTER_COOKIE, voter, "lax")
        _cookie(response, request, CSRF_COOKIE, csrf, "strict")
        return response

    async def vote(request: Request) -> Response:
        if request.headers.get("sec-fetch-site") == "cross-site":
            raise HTTPException(403, "votes are only accepted from this site")
        form = await request.form(max_files=0, max_fields=8)
        voter, cookie_csrf = request.cookies.get(VOTER_COOKIE), request.cookies.get(CSRF_COOKIE)
        sent_csrf = form.get("csrf")
        if (
            not _valid(voter)
            or not _valid(cookie_csrf)
            or not isinstance(sent_csrf, str)
            or not secrets.compare_digest(sent_csrf.encode(), str(cookie_csrf).encode())
        ):
            raise HTTPException(403, "the page expired or came from elsewhere: reload it and vote again")
        assert voter is not None
        item = state.by_id.get(str(form.get("item")))
        choice, order = form.get("choice"), form.get("order")
        if item is None or choice not in CHOICES or order not in ("ab", "ba"):
            raise HTTPException(400, "unknown item or choice")
        if not state.limit.allow(voter):
            raise HTTPException(429, "too many votes in a minute: take a breath and try again")
        (left, _), (right, _) = _sides(item, str(order))
        record = Vote(voter, item.id, item.prompt, left, right, str(choice), datetime.now(timezone.utc))
        try:
            await run_in_threadpool(state.store.add, record)
        except DuplicateVote:
            raise HTTPException(409, "you have voted on this pair already") from None
        return RedirectResponse(f"/reveal/{item.id}", status_code=303)

    async def reveal(request: Request) -> Response:
        voter = request.cookies.get(VOTER_COOKIE)
        item = state.by_id.get(request.path_params["item"])
        record = (
            await run_in_threadpool(state.store.vote_of, voter, item.id) if item and _valid(voter) else None
        )
        if item is None or record is None:
            return RedirectResponse("/", status_code=303)
        order = "ab" if record.model_a == item.model_a else "ba"
        (left, left_answer), (right, right_answer) = _sides(item, order)
        judge = {
            WIN: f"The LLM judge preferred {item.model_a}.",
            LOSS: f"The LLM judge preferred {item.model_b}.",
            TIE: "The LLM judge called it a tie.",
        }.get(item.judge or "", "The LLM judge gave no verdict.")
        choice = {"a": left, "b": right, "tie": "a tie", "bad": "both bad"}[record.choice]
        return _page(
            "pair.html",
            item=item,
            reveal=True,
            left=left,
            right=right,
            left_answer=left_answer,
            right_answer=right_answer,
            choice=choice,
            judge=judge,
        )

    async def board(request: Request) -> Response:
        return _page("board.html", board=await run_in_threadpool(state.leaderboard))

    async def ratings_json(request: Request) -> Response:
        data = await run_in_threadpool(state.leaderboard)
        return Response(json.dumps(data, default=list), media_type="application/json")

    async def css(request: Request) -> Response:
        return Response(CSS, media_type="text/css", headers={"cache-control": "max-age=3600"})

    async def healthz(request: Request) -> Response:
        await run_in_threadpool(state.store.ping)
        return PlainTextResponse("ok")

    async def livez(request: Request) -> Response:
        # the process answers: a liveness probe must not restart the page because its database is down
        return PlainTextResponse("ok")

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", "") or "error"
        return _page("error.html", status_code=status, status=status, message=detail)

    async def server_error(request: Request, exc: Exception) -> Response:
        # never a traceback for users: the log has it
        return _page("error.html", status_code=500, status=500, message="something went wrong on our side")

    app = Starlette(
        routes=[
            Route("/", vote_page, methods=["GET"]),
            Route("/vote", vote, methods=["POST"]),
            Route("/reveal/{item}", reveal, methods=["GET"]),
            Route("/leaderboard", board, methods=["GET"]),
            Route("/leaderboard.json", ratings_json, methods=["GET"]),
            Route("/static/arena.css", css, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/livez", livez, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, 500: server_error},
    )
    return Guard(app)


def _sides(item: Item, order: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """((left model, answer), (right model, answer)) for display order ``ab`` or ``ba``."""
    a, b = (item.model_a, item.answer_a), (item.model_b, item.answer_b)
    return (a, b) if order == "ab" else (b, a)


# -------------------------------------------------------------------------------------------- commands
def open_arena(results: str | Path, db: str | None = None, **options: Any) -> Arena:
    return Arena(load_items(results), VoteStore(db or default_db(results)), **options)


def serve(results: str | Path, db: str | None, host: str, port: int, rate_limit: int = 30) -> None:
    """Serve the voting page with uvicorn until interrupted (behind a proxy: X-Forwarded-* from
    ``$FORWARDED_ALLOW_IPS`` are trusted, uvicorn's default 127.0.0.1 otherwise)."""
    import uvicorn

    state = open_arena(results, db, rate_limit=rate_limit)
    print(f"arena: {len(state.items)} items, {state.store.count()} votes; http://{host}:{port}/", flush=True)
    uvicorn.run(create_app(state), host=host, port=port, proxy_headers=True, server_header=False)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lmforge_jobs.evaluate.human``: serve the page; 64 when the results or database are unusable."""
    import argparse

    from lmforge_jobs.spec import EXIT_CONFIG_ERROR

    parser = argparse.ArgumentParser(
        prog="python -m lmforge_jobs.evaluate.human", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--results", default=os.environ.get(RESULTS_ENV), help=f"default ${RESULTS_ENV}")
    parser.add_argument("--db", default=None, help=f"SQLAlchemy URL (default ${DB_ENV}, ${DB_FILE_ENV})")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--rate-limit", type=int, default=30, help="votes per voter per minute")
    args = parser.parse_args(argv)
    if not args.results:
        parser.error(f"give --results or ${RESULTS_ENV}")
    try:
        serve(args.results, args.db, args.host, args.port, rate_limit=args.rate_limit)
    except (FileNotFoundError, ValueError, sa.exc.ArgumentError) as exc:
        print(f"arena: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR
    return 0


__all__ = [
    "Arena",
    "DuplicateVote",
    "Item",
    "Vote",
    "VoteStore",
    "agreement",
    "configured_db",
    "create_app",
    "database_url",
    "default_db",
    "export_jsonl",
    "human_ratings",
    "leaderboard",
    "load_items",
    "main",
    "open_arena",
    "serve",
]


if __name__ == "__main__":
    raise SystemExit(main())
