"""Pairwise LLM-as-judge: two models answer the same prompts, a judge says which answer is better.

Prompts (``judge.prompts``) are JSONL, one prompt per line: ``{"prompt": "..."}`` (also ``question`` or
``instruction``, or a bare JSON string). Each model answers with its chat template when it has one, else
with the raw prompt.

The judge sees the question and two answers labelled A and B and replies with ``[[A]]``, ``[[B]]`` or
``[[C]]`` (tie); see :data:`SYSTEM_PROMPT`. With ``swapPositions`` each pair is judged twice, the second
time with the answers' positions swapped, to cancel the judge's position bias. A pair's outcome is
conservative (as in MT-Bench): a *win* only when every parseable verdict prefers the model, a *loss* only
when every parseable verdict prefers the other, otherwise a *tie*; a pair with no parseable verdict is not
counted. Judge replies that name no winner are counted (``unparseable``), never an error.

``winRate = (wins + ties / 2) / judged pairs`` with a 95 % percentile bootstrap interval over pairs.

Judges: a local Hugging Face model (``judge.model.path`` / ``huggingface``) or an OpenAI-compatible chat
completions endpoint (``judge.model.endpoint``; API key from a secret, see :mod:`.models`).
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge_jobs import storage
from lmforge_jobs.entry import ConfigError, ServiceUnavailable

WIN, LOSS, TIE = "win", "loss", "tie"
PROMPT_KEYS = ("prompt", "question", "instruction", "input")

SYSTEM_PROMPT = (
    "You are an impartial judge. Compare two AI assistant answers to the user's question and decide which "
    "one is more helpful, correct and relevant. Ignore the order of the answers and their length. Reply "
    "with only your verdict: [[A]] if answer A is better, [[B]] if answer B is better, [[C]] for a tie."
)
USER_TEMPLATE = (
    "[Question]\n{question}\n\n[Answer A]\n{answer_a}\n\n[Answer B]\n{answer_b}\n\n"
    "Which answer is better? Reply [[A]], [[B]] or [[C]]."
)


# ---------------------------------------------------------------------------------------------- prompts
def read_prompts(uri: str, field: str = "judge.prompts", limit: int | None = None) -> list[str]:
    """The prompts of a JSONL file (local or on object storage); ConfigError(field) when missing or
    malformed."""
    try:
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rt", encoding="utf-8", compression="infer") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        storage.require(uri, field)  # a missing bucket or denied access says so
        raise ConfigError(field, f"prompts file {uri} not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(field, f"cannot read prompts file {uri}: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(field, f"cannot read prompts file {uri}: {storage.describe(exc, uri)}") from None
    prompts: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(field, f"{uri}:{number}: not valid JSON ({exc})") from exc
        if isinstance(row, str):
            prompts.append(row)
        else:
            key = next(
                (k for k in PROMPT_KEYS if isinstance(row, dict) and isinstance(row.get(k), str)), None
            )
            if key is None:
                raise ConfigError(field, f"{uri}:{number}: no prompt field (one of {', '.join(PROMPT_KEYS)})")
            prompts.append(row[key])
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise ConfigError(field, f"{uri} holds no prompts")
    return prompts


# -------------------------------------------------------------------------------------------- generation
def chat_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The generation prompt: the tokenizer's chat template, or the messages' contents joined."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\n"


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 8,
    system: str | None = None,
    seed: int = 0,
) -> list[str]:
    """Completions of ``prompts`` (chat formatted), decoded without special tokens, in prompt order."""
    import torch

    texts = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        texts.append(chat_text(tokenizer, messages))
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues the last real token
    torch.manual_seed(seed)
    answers: list[str] = []
    try:
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            kwargs: dict[str, Any] = {
                "max_new_tokens": max_new_tokens,
                "pad_token_id": tokenizer.pad_token_id,
            }
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.inference_mode():
                out = model.generate(**batch, **kwargs)
            new = out[:, batch["input_ids"].shape[1] :]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return answers


# ------------------------------------------------------------------------------------------------ judges
def judge_messages(question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    user = USER_TEMPLATE.format(question=question, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_BRACKETED = re.compile(r"\[\[\s*(A|B|C|TIE)\s*\]\]", re.IGNORECASE)
_LEADING = re.compile(
    r"^(?:verdict|answer|assistant|response)?\s*[:\-]?\s*(A|B|C|TIE|DRAW)(?![A-Za-z0-9])", re.IGNORECASE
)


def parse_verdict(text: str) -> str | None:
    """``"A"``, ``"B"``, ``"tie"`` or None: the last ``[[X]]`` in the reply, else a leading A/B/C/tie."""
    found = _BRACKETED.findall(text or "")
    if found:
        choice = found[-1].upper()
    else:
        match = _LEADING.match((text or "").strip().lstrip("*#`\"' ").strip())
        if match is None:
            return None
        choice = match.group(1).upper()
    return {"A": "A", "B": "B"}.get(choice, "tie")


class LocalJudge:
    """A Hugging Face causal LM (loaded by the caller) as judge; greedy verdicts."""

    def __init__(self, model: Any, tokenizer: Any, max_tokens: int = 32, batch_size: int = 8):
        self.model, self.tokenizer = model, tokenizer
        self.max_tokens, self.batch_size = max_tokens, batch_size

    def __call__(self, requests: Sequence[tuple[str, str, str]]) -> list[str]:
        import torch

        texts = [chat_text(self.tokenizer, judge_messages(*r)) for r in requests]
        device = next(self.model.parameters()).device
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        replies: list[str] = []
        try:
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[i : i + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                ).to(device)
                with torch.inference_mode():
                    out = self.model.generate(
                        **batch,
                        max_new_tokens=self.max_tokens,
                        do_sample=False,
                        temperature=None,
                        top_p=None,
                        top_k=None,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )
                new = out[:, batch["input_ids"].shape[1] :]
                replies.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        finally:
            self.tokenizer.padding_side = side
        return replies


class EndpointJudge:
    """An OpenAI-compatible ``POST {url}/chat/completions`` endpoint (vLLM, TGI, hosted APIs) as judge.

    Requests run ``concurrency`` at a time; connection errors, 429 and 5xx are retried with backoff. An
    endpoint that refuses the key or does not know the model is a ConfigError naming the field (the spec
    must change); one that stays unreachable or overloaded is ServiceUnavailable (exit 69: the Job retries
    the pod later). A reply without a message counts as an unparseable verdict."""

    FIELD = "judge.model.endpoint"

    def __init__(
        self,
        url: str,
        model_name: str,
        api_key: str | None = None,
        *,
        max_tokens: int = 32,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.5,
        concurrency: int = 8,
    ):
        self.url = url.rstrip("/") + "/chat/completions"
        self.base = url
        self.model_name, self.api_key = model_name, api_key
        self.max_tokens, self.timeout = max_tokens, timeout
        self.retries, self.backoff, self.concurrency = retries, backoff, concurrency

    def _post(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps(
            {"model": self.model_name, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):
                    raise ConfigError(
                        f"{self.FIELD}.apiKey",
                        f"{self.base} refused the request (HTTP {exc.code}): check the API key",
                    ) from exc
                if exc.code == 404:
                    raise ConfigError(
                        f"{self.FIELD}.url",
                        f"{self.url} answered HTTP 404: not an OpenAI-compatible endpoint, or no model "
                        f"{self.model_name!r}",
                    ) from exc
                if exc.code == 429 or exc.code >= 500:
                    last = exc
                    continue
                raise ConfigError(
                    f"{self.FIELD}.url", f"{self.url} answered HTTP {exc.code}: {exc.reason}"
                ) from exc
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last = exc
                continue
            except ValueError:
                return ""  # not JSON: the verdict is unparseable
            try:
                return str(payload["choices"][0]["message"]["content"] or "")
            except (KeyError, IndexError, TypeError):
                return ""
        if isinstance(last, urllib.error.HTTPError):
            problem = f"the judge at {self.base} kept failing (HTTP {last.code} {last.reason})"
        else:
            problem = f"cannot reach the judge at {self.base} ({getattr(last, 'reason', None) or last})"
        raise ServiceUnavailable(f"{self.FIELD}.url", f"{problem} after {self.retries + 1} attempts")

    def __call__(self, requests: Sequence[tuple[str, str, str]]) -> list[str]:
        if not requests:
            return []
        messages = [judge_messages(*r) for r in requests]
        # the first request alone: an unreachable endpoint fails once, not once per thread
        first = self._post(messages[0])
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            rest = list(pool.map(self._post, messages[1:]))
        return [first, *rest]


Judge = Callable[[Sequence[tuple[str, str, str]]], list[str]]


# ------------------------------------------------------------------------------------------- comparison
@dataclass
class Comparison:
    """Verdicts of one pair of answers, from the first model's point of view."""

    verdicts: list[str | None]  # WIN / LOSS / TIE per judgment, None when unparseable
    replies: list[str] = dc_field(default_factory=list)  # the judge's raw replies, same order

    @property
    def outcome(self) -> str | None:
        """The pair's outcome (conservative: a win needs every parseable verdict to agree)."""
        valid = [v for v in self.verdicts if v is not None]
        if not valid:
            return None
        if all(v == WIN for v in valid):
            return WIN
        if all(v == LOSS for v in valid):
            return LOSS
        return TIE

    @property
    def unparseable(self) -> int:
        return sum(v is None for v in self.verdicts)


def _from_first(verdict: str | None, first_is_a: bool) -> str | None:
    if verdict is None:
        return None
    if verdict == "tie":
        return TIE
    return WIN if (verdict == "A") == first_is_a else LOSS


def compare(
    judge: Judge, prompts: Sequence[str], first: Sequence[str], second: Sequence[str], swap: bool = True
) -> list[Comparison]:
    """Judge ``first[i]`` against ``second[i]`` for every prompt (twice, positions swapped, when ``swap``)."""
    requests = [(q, a, b) for q, a, b in zip(prompts, first, second, strict=True)]
    if swap:
        requests += [(q, b, a) for q, a, b in zip(prompts, first, second, strict=True)]
    replies = judge(requests)
    n = len(prompts)
    out = []
    for i in range(n):
        raw = [replies[i], replies[n + i]] if swap else [replies[i]]
        verdicts = [_from_first(parse_verdict(r), k == 0) for k, r in enumerate(raw)]
        out.append(Comparison(verdicts, raw))
    return out


# ------------------------------------------------------------------------------------------- aggregation
def _score(outcome: str) -> float:
    return {WIN: 1.0, TIE: 0.5, LOSS: 0.0}[outcome]


def win_rate(
    comparisons: Sequence[Comparison], bootstrap_samples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """JudgeResult fields (camelCase): winRate, ci95, wins, losses, ties, unparseable."""
    outcomes = [c.outcome for c in comparisons if c.outcome is not None]
    wins, losses, ties = outcomes.count(WIN), outcomes.count(LOSS), outcomes.count(TIE)
    result: dict[str, Any] = {
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "unparseable": sum(c.unparseable for c in comparisons),
    }
    if outcomes:
        scores = np.array([_score(o) for o in outcomes])
        result["winRate"] = float(scores.mean())
        result["ci95"] = bootstrap_interval(scores, bootstrap_samples, seed)
    return result


def bootstrap_interval(scores: np.ndarray, samples: int = 1000, seed: int = 0) -> list[float]:
    """95 % percentile bootstrap interval of the mean of ``scores``."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(scores), size=(samples, len(scores)))
    means = scores[idx].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(low), float(high)]


def save_transcript(uri: str | Path, rows: list[dict[str, Any]]) -> None:
    """The answers and verdicts, one JSON line each, for a human to audit the judge (a local path or an
    object storage URI, written whole or not at all)."""
    storage.write_text_atomic(uri, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


__all__ = [
    "SYSTEM_PROMPT",
    "Comparison",
    "EndpointJudge",
    "LocalJudge",
    "bootstrap_interval",
    "compare",
    "generate",
    "parse_verdict",
    "read_prompts",
    "win_rate",
]
