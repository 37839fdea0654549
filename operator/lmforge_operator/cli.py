"""The ``lmforge`` command line.

lmforge validate PATH...      check manifests (files or directories); exit 1 with every problem
lmforge crds [--out DIR]      write the CustomResourceDefinitions generated from the spec models
lmforge crds --check [DIR]    exit 1 when DIR differs from what would be generated
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


def _validate(args: argparse.Namespace) -> int:
    from lmforge_jobs.manifest import load_resources

    resources, problems = load_resources(args.paths)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(
            f"{len(problems)} problem(s) in {len({p.source for p in problems})} document(s)", file=sys.stderr
        )
        return EXIT_INVALID
    if not resources:
        print("no lmforge resources found in " + " ".join(args.paths), file=sys.stderr)
        return EXIT_INVALID
    for resource in resources:
        print(f"ok  {resource.ref}")
    return EXIT_OK


def _crds(args: argparse.Namespace) -> int:
    from lmforge_operator.crds import crd_files, write_crds

    out = Path(args.out)
    if args.check:
        stale = []
        expected = crd_files()
        for name, text in expected.items():
            path = out / name
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        extra = (
            sorted(p.name for p in out.glob("*.lmforge.io.yaml") if p.name not in expected)
            if out.is_dir()
            else []
        )
        for name in stale + extra:
            print(
                f"{out / name}: differs from `lmforge crds` output; run `lmforge crds --out {out}`",
                file=sys.stderr,
            )
        return EXIT_INVALID if stale or extra else EXIT_OK
    for path in write_crds(out):
        print(f"wrote {path}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge", description="Build language models from Kubernetes manifests."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate lmforge manifests (files or directories)")
    p.add_argument("paths", nargs="+", help="YAML files or directories (searched recursively)")
    p.set_defaults(func=_validate)

    p = sub.add_parser("crds", help="write the CustomResourceDefinitions")
    p.add_argument("--out", default="crds", help="output directory (default: crds)")
    p.add_argument("--check", action="store_true", help="only check that --out is up to date")
    p.set_defaults(func=_crds)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
