"""The operator tests that run against kmock share one API emulator per test module (each test uses a
namespace of its own)."""

from collections.abc import Iterator

import pytest
from kmock_harness import Cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as c:
        yield c
