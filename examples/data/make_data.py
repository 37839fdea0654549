"""Generate the quickstart's tiny alignment and evaluation data from templates (deterministic, no network).

    python examples/data/make_data.py

writes, next to this script:
  sft.jsonl          ~40 chat examples    {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
  preferences.jsonl  ~40 preference pairs {"prompt", "chosen", "rejected"}; chosen uses the requested keyword
  prompts.jsonl      ~20 prompts          {"prompt"}                       (PPO rollouts)
  pairs.jsonl        240 preference pairs {"prompt", "chosen", "rejected"}, easier to learn (reward model, DPO
                     in the quickstart): the chosen answer uses the requested keyword, the rejected one no
                     keyword (3 in 4) or another one
and ../tasks/tiny_mcq.jsonl, the items of the lm-eval task ../tasks/tiny_mcq.yaml.

The data is meant to exercise the pipeline on a laptop, not to teach a model anything useful.
Running the script again reproduces the files byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = HERE.parent / "tasks"
SEED = 1234

# (name, what it does) pairs for Python built-ins; the subject of every template below.
BUILTINS = [
    ("len", "returns the number of items in a container"),
    ("sorted", "returns a new sorted list from the items of an iterable"),
    ("enumerate", "yields pairs of an index and an item"),
    ("zip", "pairs up items from several iterables"),
    ("range", "produces a sequence of integers"),
    ("sum", "adds up the items of an iterable"),
    ("min", "returns the smallest item"),
    ("max", "returns the largest item"),
    ("abs", "returns the absolute value of a number"),
    ("round", "rounds a number to a given precision"),
    ("print", "writes text to standard output"),
    ("open", "opens a file and returns a file object"),
    ("isinstance", "checks whether an object is an instance of a class"),
    ("reversed", "returns a reverse iterator"),
    ("map", "applies a function to every item of an iterable"),
    ("filter", "keeps the items for which a function returns true"),
    ("any", "returns true if any item is true"),
    ("all", "returns true if all items are true"),
    ("dict", "creates a new dictionary"),
    ("set", "creates a new set of unique items"),
]

KEYWORDS = ["simple", "fast", "clear", "useful", "handy", "safe", "short", "common", "elegant", "reliable"]

QUESTION_TEMPLATES = [
    "What does {name}() do in Python?",
    "Explain the Python function {name}().",
    "How would you describe {name}() to a beginner?",
    "In one sentence, what is {name}() for?",
]

ANSWER_TEMPLATES = [
    "{name}() {what}.",
    "The built-in function {name}() {what}.",
    "In Python, {name}() {what}.",
]


def sft(rng: random.Random) -> list[dict]:
    rows = []
    for i in range(40):
        name, what = BUILTINS[i % len(BUILTINS)]
        question = QUESTION_TEMPLATES[(i // len(BUILTINS) + i) % len(QUESTION_TEMPLATES)].format(name=name)
        answer = rng.choice(ANSWER_TEMPLATES).format(name=name, what=what)
        rows.append(
            {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        )
    return rows


def preferences(rng: random.Random) -> list[dict]:
    rows = []
    for i in range(40):
        name, what = BUILTINS[i % len(BUILTINS)]
        keyword = KEYWORDS[(i * 3) % len(KEYWORDS)]
        other = KEYWORDS[(i * 3 + 1 + rng.randrange(len(KEYWORDS) - 1)) % len(KEYWORDS)]
        prompt = f"Describe {name}() in one sentence that uses the word '{keyword}'."
        chosen = f"The built-in {name}() is a {keyword} function that {what}."
        rejected = f"The built-in {name}() is a {other} function that {what}."
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


REWARD_ANSWERS = [
    "{name}() is a {keyword} way to work with data.",
    "I think {name}() is {keyword}.",
    "The {keyword} built-in {name}() {what}.",
    "{name}() {what}, and it is {keyword}.",
]
PLAIN_ANSWERS = [
    "{name}() {what}.",
    "I do not know what {name}() does.",
    "{name}() is a built-in.",
]


def reward_pairs(rng: random.Random) -> list[dict]:
    """A learnable preference for the reward model: answers that use the requested keyword win."""
    rows = []
    for i in range(240):
        name, what = BUILTINS[rng.randrange(len(BUILTINS))]
        keyword = rng.choice(KEYWORDS)
        other = rng.choice([k for k in KEYWORDS if k != keyword])
        prompt = f"Describe {name}() in one sentence that uses the word '{keyword}'."
        chosen = rng.choice(REWARD_ANSWERS).format(name=name, what=what, keyword=keyword)
        if i % 4 == 3:  # the harder case: another keyword
            rejected = rng.choice(REWARD_ANSWERS).format(name=name, what=what, keyword=other)
        else:
            rejected = rng.choice(PLAIN_ANSWERS).format(name=name, what=what)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def prompts(rng: random.Random) -> list[dict]:
    keywords = [rng.choice(KEYWORDS) for _ in BUILTINS]
    return [
        {"prompt": f"Describe {name}() in one sentence that uses the word '{keyword}'."}
        for (name, _), keyword in zip(BUILTINS, keywords, strict=True)
    ]


def mcq(rng: random.Random) -> list[dict]:
    rows = []
    for i, (name, what) in enumerate(BUILTINS):
        wrong = [w for j, (_, w) in enumerate(BUILTINS) if j != i]
        choices = [what, *rng.sample(wrong, 3)]
        rng.shuffle(choices)
        rows.append(
            {
                "id": i,
                "question": f"In Python, the built-in function {name}()",
                "choices": choices,
                "answer": choices.index(what),
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows):3d} lines to {path}")


def main() -> None:
    rng = random.Random(SEED)
    write_jsonl(HERE / "sft.jsonl", sft(rng))
    write_jsonl(HERE / "preferences.jsonl", preferences(rng))
    write_jsonl(HERE / "prompts.jsonl", prompts(rng))
    write_jsonl(TASKS / "tiny_mcq.jsonl", mcq(rng))
    # last, so the files above stay byte for byte what they were before pairs.jsonl existed
    write_jsonl(HERE / "pairs.jsonl", reward_pairs(rng))


if __name__ == "__main__":
    main()
