"""Tiny offline data for tests and ``bench/pretrain.py``: a byte-level BPE tokenizer and datatrove shards.

    from lmforge_jobs.pretrain.testing import make_token_data
    data = make_token_data("/tmp/tiny", vocab_size=320, documents=400)   # {tokens, heldOut, tokenizer}

The text is generated from templates with a fixed seed, so it has structure a tiny model can learn and
is identical on every run. Shards are written by datatrove's own ``DocumentTokenizer``.
"""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = [
    "the cat",
    "a dog",
    "my friend",
    "the teacher",
    "our robot",
    "the old man",
    "a small bird",
    "the baker",
]
VERBS = ["sees", "likes", "finds", "builds", "paints", "carries", "follows", "counts"]
OBJECTS = [
    "a red ball",
    "the blue house",
    "two green apples",
    "a long road",
    "the quiet river",
    "five stones",
]
ENDINGS = ["every morning.", "in the park.", "after dinner.", "with great care.", "near the sea.", "at noon."]


def synthetic_texts(documents: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(documents):
        sentences = [
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
            for _ in range(rng.randint(3, 8))
        ]
        texts.append(" ".join(s[0].upper() + s[1:] for s in sentences))
    return texts


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> Path:
    """A byte-level BPE tokenizer with ``<|endoftext|>``, saved as ``out_dir/tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tok.save(str(path))
    return path


def write_shards(
    texts: list[str], tokenizer_file: Path, out_dir: Path, max_tokens_per_file: int | None = None
) -> Path:
    """Tokenise ``texts`` with datatrove's DocumentTokenizer into ``out_dir`` (documents end in EOS)."""
    from datatrove.data import Document
    from datatrove.pipeline.tokens.tokenizer import DocumentTokenizer

    step = DocumentTokenizer(
        output_folder=str(out_dir),
        tokenizer_name_or_path=str(tokenizer_file),
        eos_token="<|endoftext|>",
        seed=0,
        max_tokens_per_file=max_tokens_per_file,
    )
    docs = (Document(text=t, id=str(i)) for i, t in enumerate(texts))
    step.run(docs, rank=0, world_size=1)
    return out_dir


def make_token_data(
    root: str | Path,
    vocab_size: int = 320,
    documents: int = 400,
    held_out: int = 40,
    seed: int = 0,
    max_tokens_per_file: int | None = None,
) -> dict[str, str]:
    """Tokenizer directory plus train and held-out shards under ``root``; returns spec.data (camelCase)."""
    root = Path(root)
    texts = synthetic_texts(documents + held_out, seed)
    tokenizer = train_tokenizer(texts[:documents], vocab_size, root / "tokenizer")
    write_shards(texts[:documents], tokenizer, root / "tokens" / "train", max_tokens_per_file)
    write_shards(texts[documents:], tokenizer, root / "tokens" / "held-out")
    return {
        "tokens": str(root / "tokens" / "train"),
        "heldOut": str(root / "tokens" / "held-out"),
        "tokenizer": str(root / "tokenizer"),
    }
