"""Wall-clock time of the README's main command, `lmforge run examples/quickstart`, from nothing.

    python bench/quickstart.py [--workdir DIR] [--json out.json] [--fresh-venv]

Runs the whole quickstart pipeline (Corpus → PretrainRun → SFT → DPO → Evaluation) in a fresh work
directory on this machine (CPU, or CUDA when present) and prints the total and each resource's share, taken
from the startTime/completionTime the runner writes into each status.json. The goal: ≤ 5 minutes on a
2-core CPU with no network.

--fresh-venv first times the quick start's setup (.ci/setup, as ./quickstart runs it) into a new venv made
with `python -m venv` (the interpreter's bundled pip; packages from the pip cache when it is warm) and then
runs the pipeline with that venv's lmforge, so the output has setup, run and their sum. That part needs the
package registries.
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
    parser.add_argument(
        "--fresh-venv", action="store_true", help="also time the setup into a new venv, then run with it"
    )
    args = parser.parse_args()
    base = Path(args.workdir or tempfile.mkdtemp(prefix="lmforge-bench-"))
    workdir = base / "runs"
    if workdir.exists():
        shutil.rmtree(workdir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    setup = None
    if args.fresh_venv:
        venv = base / "venv"
        shutil.rmtree(venv, ignore_errors=True)
        for key in ("PYTHONPATH", "VIRTUAL_ENV"):  # the new venv must see only its own packages
            env.pop(key, None)
        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        proc = subprocess.run(["bash", str(ROOT / ".ci" / "setup"), str(venv)], env=env, check=False)
        setup = time.monotonic() - start
        if proc.returncode != 0:
            return proc.returncode
        lmforge = str(venv / "bin" / "lmforge")
    else:
        lmforge = shutil.which("lmforge") or str(Path(sys.executable).parent / "lmforge")
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
    numbers = {"totalSeconds": total, "resources": rows}
    if setup is not None:
        print(f"{'setup (fresh venv)':<28} {setup:7.1f} s")
        print(f"{'setup + run':<28} {setup + total:7.1f} s")
        numbers |= {"setupSeconds": setup, "setupAndRunSeconds": setup + total}
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
