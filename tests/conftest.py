"""Set-up shared by every test. The tests mirror the package layout (tests/README.md); the helpers in
tests/support (crdcheck, kmock_harness, tiny_models, ...) are imported as top-level modules."""

import functools
import os
import sys
from pathlib import Path

import kubernetes_validate.utils

sys.path.insert(0, str(Path(__file__).parent / "support"))

# numpy's and scipy's OpenBLAS on two threads spend more time spinning than computing on the tiny matrices
# the tests use (the scaling fits took two to four times the CPU); one thread, here and in the jobs the tests
# start. Set before anything imports numpy. Torch keeps its own threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Every process a test starts inherits this, so one that outlives its test is found even after its
# parent died and init adopted it (see data_fixtures.tagged_processes and the autouse fixture in
# tests/jobs/data/conftest.py).
os.environ["LMFORGE_TEST_SESSION"] = str(os.getpid())

# kubernetes-validate reads and parses its JSON schemas (the definitions file is megabytes) on every call:
# ~50 ms an object and Kubernetes version, seconds for the chart and builder tests. The files never change,
# so one read per session is enough; the validation itself is untouched.
kubernetes_validate.utils.schema_contents = functools.cache(kubernetes_validate.utils.schema_contents)
kubernetes_validate.utils.all_versions = functools.cache(kubernetes_validate.utils.all_versions)

# ------------------------------------------------------------------ a loopback S3 server (s3_fixtures)
from s3_fixtures import s3, s3_server  # noqa: E402, F401
