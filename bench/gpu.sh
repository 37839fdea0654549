#!/usr/bin/env bash
# The GPU check (bench/gpu.py) on a GPU machine whose Python already has torch (CUDA) and transformers.
#
#   bash bench/gpu.sh [--out DIR] [gpu.py options]      # installs carried wheels, then runs bench/gpu.py
#   bash bench/gpu.sh --fetch-wheels [DIR]               # on a machine with PyPI: download them into DIR
#
# What lmforge needs beyond such an image (pydantic for the specs, TRL and datasets for the SFT/DPO rows,
# torchao for the fp8 row) is installed, without the network, from the wheels in $LMFORGE_WHEELS
# (default .whl/ in the repository) when that folder exists, into a private target (never the image's
# site-packages). A package still missing only costs its rows: each row then says why.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${LMFORGE_WHEELS:-.whl}
# manylinux wheels of what a CUDA PyTorch image usually lacks (pins = the development venv's); torchao must
# match the image's torch ($LMFORGE_TORCHAO, e.g. torchao==0.14.1), the Python version the image's
# ($LMFORGE_WHEELS_PYTHON, default 3.12)
NEEDED="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 ${LMFORGE_TORCHAO:-torchao}"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  dest=${2:-$WHEELS}
  mkdir -p "$dest"
  for spec in $NEEDED; do
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version "${LMFORGE_WHEELS_PYTHON:-3.12}" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$dest" "$spec"
  done
  exit 0
fi

if [[ -d "$WHEELS" ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  site=${TMPDIR:-/tmp}/lmforge-gpu-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/jobs${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$PY" - <<'EOF' || true
import importlib
missing = []
for name in ("torch", "transformers", "pydantic", "yaml", "prometheus_client", "tokenizers", "trl", "datasets",
             "torchao", "pynvml"):
    try:
        importlib.import_module(name)
    except Exception as exc:
        missing.append(f"{name} ({type(exc).__name__})")
print("missing (their rows will say so): " + (", ".join(missing) or "none"), flush=True)
EOF
exec "$PY" bench/gpu.py "$@"
