"""Perplexity throughput of the Evaluation job against a plain transformers loop, same model, same data.

    python bench/evaluate.py                              # tiny CPU shape (seconds)
    python bench/evaluate.py --layers 12 --hidden 768 --docs 2000 --seq-len 1024 --batch-size 16 --device cuda

The reference is the usual hand-written loop: one document per forward pass with ``labels=ids`` (documents
shorter than ``--seq-len``, so both compute exactly the same numbers; the script checks they agree). Ours
batches padded windows, longest first. Also times the Bradley–Terry bootstrap of the arena.
Prints one JSON line: tokens/s of both, the speed-up, the perplexities and the arena timing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", type=int, default=4, help="arena: models rated")
    parser.add_argument("--games", type=int, default=2000, help="arena: judged pairs")
    args = parser.parse_args()

    import numpy as np
    import torch
    from tiny_models import tiny_llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge_jobs.evaluate import arena
    from lmforge_jobs.evaluate.perplexity import evaluate_perplexity
    from lmforge_jobs.pretrain.testing import synthetic_texts

    with tempfile.TemporaryDirectory() as tmp:
        texts = synthetic_texts(args.docs, seed=1)
        heads = max(1, args.hidden // 64) if args.hidden >= 64 else 2
        path = tiny_llama(
            Path(tmp) / "m",
            layers=args.layers,
            hidden=args.hidden,
            heads=heads,
            kv_heads=heads,
            ffn=args.hidden * 3,
            texts=texts,
        )
        data = Path(tmp) / "docs.jsonl"
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).to(args.device).eval()
        # documents that fit one window, so both sides compute exactly the same numbers
        fitted = [tok.decode(tok(t)["input_ids"][: args.seq_len - 8]) for t in texts]
        docs = [tok(t)["input_ids"] for t in fitted]
        assert max(len(d) for d in docs) <= args.seq_len
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in fitted), encoding="utf-8")

        def sync() -> None:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        # reference: one document per forward
        sync()
        start = time.perf_counter()
        total, count = 0.0, 0
        with torch.inference_mode():
            for ids in docs:
                x = torch.tensor([ids], device=args.device)
                total += float(model(input_ids=x, labels=x).loss) * (len(ids) - 1)
                count += len(ids) - 1
        sync()
        ref_seconds = time.perf_counter() - start

        # ours
        sync()
        start = time.perf_counter()
        ours = evaluate_perplexity(model, tok, str(data), seq_len=args.seq_len, batch_size=args.batch_size)
        sync()
        our_seconds = time.perf_counter() - start

        rng = np.random.default_rng(0)
        games = [
            (int(i), int(j), float(rng.choice([0.0, 0.5, 1.0])))
            for i, j in (rng.choice(args.models, size=2, replace=False) for _ in range(args.games))
        ]
        start = time.perf_counter()
        arena.rate([f"m{k}" for k in range(args.models)], games, bootstrap_samples=1000)
        arena_seconds = time.perf_counter() - start

    print(
        json.dumps(
            {
                "device": args.device,
                "tokens": count,
                "referenceTokensPerSecond": round(count / ref_seconds, 1),
                "oursTokensPerSecond": round(ours.tokens / our_seconds, 1),
                "speedup": round(ref_seconds / our_seconds, 2),
                "referencePerplexity": math.exp(total / count),
                "oursPerplexity": ours.perplexity,
                "tokensScoredMatch": ours.tokens == count,
                "arenaBootstrap1000Seconds": round(arena_seconds, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
