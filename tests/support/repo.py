"""The repository's root, for tests that read what it ships (examples, crds, charts, bench)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
