"""Training throughput reading token shards from an S3 server on loopback vs from local disk, same run.

    python bench/storage.py                          # tiny CPU run: 2 layers, seqLen 128, 40 steps
    python bench/storage.py --block-bytes 65536 --cache-bytes 131072   # a cache far below the corpus
    python bench/storage.py --json out.json

One corpus (the synthetic one of ``lmforge_jobs.pretrain.testing``) is written to local disk and uploaded
to moto's S3 server on a free 127.0.0.1 port. The same PretrainRun (the job's own ``main``) trains on the
local shards, then on the ``s3://`` ones with an empty block cache, so every block it reads is fetched
over HTTP while training (prefetch of the next steps' windows on a background thread). Reported: the
mean ``tokensPerSecond`` the job logs over the run (evaluation excluded; the first logged interval,
which includes the model's warm-up, dropped), the best of ``--repeats`` alternating runs of each, and their
ratio — goal ≥ 0.95× (prefetch hides
the latency). The losses must be identical: the data is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))

import yaml


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def manifest(root: Path, name: str, data: dict[str, str], args: argparse.Namespace) -> Path:
    spec = {
        "data": data,
        "model": {"layers": 2, "hidden": 128, "heads": 4, "kvHeads": 2, "ffnHidden": 384, "seqLen": 128},
        "budget": {"steps": args.steps},
        "optimizer": {"lr": 1.0e-3, "warmupSteps": 2},
        "batch": {"globalTokens": 128 * 16, "microBatchSize": 16},
        "precision": "fp32",
        "parallelism": {"nodes": 1, "gpusPerNode": 0, "compile": False},
        "checkpoint": {"everySteps": 100000, "keep": 1},
        "eval": {"everySteps": 100000, "batches": 1},
        "output": str(root / name),
    }
    doc = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "PretrainRun",
        "metadata": {"name": name},
        "spec": spec,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def run(path: Path) -> tuple[float, list[float]]:
    from lmforge_jobs.pretrain.__main__ import main

    assert main(["--manifest", str(path)]) == 0
    rows = [json.loads(line) for line in (path.parent / path.stem / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokensPerSecond"] for r in rows if "tokensPerSecond" in r][1:]
    return sum(rates) / len(rates), [r["loss"] for r in rows if "loss" in r]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternating; the best is kept")
    parser.add_argument("--cache-bytes", type=int, default=None, help="LMFORGE_CACHE_BYTES for the S3 run")
    parser.add_argument("--block-bytes", type=int, default=None, help="LMFORGE_CACHE_BLOCK_BYTES")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    from lmforge_jobs import storage
    from lmforge_jobs.pretrain.testing import make_token_data

    os.environ.update(
        LMFORGE_METRICS_PORT="off",
        HF_HUB_OFFLINE="1",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    root = Path(tempfile.mkdtemp(prefix="lmforge-bench-storage-"))
    os.environ["LMFORGE_CACHE"] = str(root / "cache")
    if args.cache_bytes:
        os.environ["LMFORGE_CACHE_BYTES"] = str(args.cache_bytes)
    if args.block_bytes:
        os.environ["LMFORGE_CACHE_BLOCK_BYTES"] = str(args.block_bytes)
    data = make_token_data(
        root / "corpus", vocab_size=512, documents=args.documents, max_tokens_per_file=1 << 18
    )
    corpus_bytes = sum(f.stat().st_size for f in Path(data["tokens"]).glob("*.ds"))

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        os.environ["LMFORGE_S3_ENDPOINT"] = f"http://{host}:{port}"
        fs, _ = storage.filesystem("s3://bench")
        fs.mkdir("bench")
        remote = {}
        for key, local in data.items():
            fs.put(f"{local}/", f"bench/{key}/", recursive=True)
            remote[key] = f"s3://bench/{key}"
        local_rates, s3_rates = [], []
        for r in range(args.repeats):  # alternating, so load from other processes hits both alike
            rate, local_losses = run(manifest(root, f"local-{r}", data, args))
            local_rates.append(rate)
            rate, s3_losses = run(manifest(root, f"s3-{r}", remote, args))  # a fresh, empty cache each time
            s3_rates.append(rate)
    finally:
        server.stop()
    assert s3_losses == local_losses, "the same data must give the same losses"
    local_rate, s3_rate = max(local_rates), max(s3_rates)
    result = {
        "steps": args.steps,
        "repeats": args.repeats,
        "corpusBytes": corpus_bytes,
        "cacheBytes": int(os.environ.get("LMFORGE_CACHE_BYTES", 16 << 30)),
        "localTokensPerSecond": round(local_rate, 1),
        "s3TokensPerSecond": round(s3_rate, 1),
        "ratio": round(s3_rate / local_rate, 3),
    }
    print(
        f"local disk {local_rate:,.0f} tokens/s · loopback S3 {s3_rate:,.0f} tokens/s · "
        f"ratio {s3_rate / local_rate:.3f} (goal ≥ 0.95) · corpus {corpus_bytes:,} bytes"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
