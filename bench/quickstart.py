"""Wall-clock time of the README's main command, `lmforge run examples/quickstart`, from nothing.

    python bench/quickstart.py [--workdir DIR] [--json out.json]

Runs the whole quickstart pipeline (Corpus → PretrainRun → SFT → DPO → Evaluation) in a fresh work
directory on this machine (CPU, or CUDA when present) and prints the total and each resource's share, taken
from the startTime/completionTime the runner writes into each status.json. Issue 9's goal: ≤ 5 minutes on a
2-core CPU with no network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="work directory (default: a new temporary one)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lmforge-bench-")) / "runs"
    if workdir.exists():
        shutil.rmtree(workdir)
    lmforge = shutil.which("lmforge") or str(Path(sys.executable).parent / "lmforge")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    start = time.monotonic()
    proc = subprocess.run(
        [lmforge, "run", "examples/quickstart", "--workdir", str(workdir), "--plain", "--metrics-port", "-1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    total = time.monotonic() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        return proc.returncode
    rows = []
    for path in sorted(workdir.glob("*/*/status.json")):
        st = json.loads(path.read_text(encoding="utf-8"))
        began = datetime.fromisoformat(st["startTime"])
        ended = datetime.fromisoformat(st["completionTime"])
        rows.append(
            {
                "resource": f"{path.parent.parent.name}/{path.parent.name}",
                "seconds": (ended - began).total_seconds(),
            }
        )
    order = ["corpus", "pretrainrun", "alignmentrun", "evaluation"]
    rows.sort(key=lambda r: (order.index(r["resource"].split("/")[0]), r["resource"]))
    for row in rows:
        print(f"{row['resource']:<28} {row['seconds']:7.1f} s")
    print(f"{'total (lmforge run)':<28} {total:7.1f} s   cores: {os.cpu_count()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"totalSeconds": total, "resources": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
