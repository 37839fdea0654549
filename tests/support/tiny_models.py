"""Tiny Hugging Face models for tests, built offline from configs (no downloads).

    from tiny_models import tiny_llama
    path = tiny_llama(tmp_path / "base")          # LlamaForCausalLM + BPE tokenizer + chat template

The tokenizer is a byte-level BPE trained in a fraction of a second on the repository's example data
(examples/data/*.jsonl) plus any ``texts`` given, so every string the tests use tokenizes without unknowns.
It has ``<|bos|>``, ``<|eos|>`` and ``<|pad|>`` tokens and, unless ``chat_template=False``, a small
chat template (the shape of a PretrainRun export is ``chat_template=False``: the AlignmentRun job must add one).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from repo import ROOT

DATA = ROOT / "examples" / "data"

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|eos|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _example_texts() -> list[str]:
    """Every string in the example JSONL files (prompts, answers, chat turns)."""
    texts: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for path in sorted(DATA.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                walk(json.loads(line))
    return texts


def tiny_tokenizer(
    vocab_size: int = 512, texts: Iterable[str] = (), chat_template: bool = True
):  # -> PreTrainedTokenizerFast
    """A byte-level BPE ``PreTrainedTokenizerFast`` with bos/eos/pad (and a chat template by default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, EOS, "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [*_example_texts(), *texts] or ["hello world"]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=2048
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(
    path: str | Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 128,
    vocab_size: int = 512,
    chat_template: bool = True,
    seed: int = 0,
    texts: Iterable[str] = (),
) -> str:
    """Write a randomly initialised LlamaForCausalLM and its tokenizer into ``path``; return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(vocab_size, texts=texts, chat_template=chat_template)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


__all__ = ["BOS", "CHAT_TEMPLATE", "EOS", "PAD", "tiny_llama", "tiny_tokenizer"]
