"""The shared ``main`` of every job: ``python -m lmforge_jobs.<stage> --manifest FILE [job options]``.

``job_main`` loads and validates the manifest, refuses references that were not resolved (the operator or
``lmforge run`` resolves them, see :mod:`lmforge_jobs.resolve`), fills in a default ``spec.output`` and calls
the job. Every user-fixable problem — an invalid spec, a missing input file, data in the wrong shape —
becomes one line ``error: spec.<field>: <message>`` on stderr and exit code 64 (``EXIT_CONFIG_ERROR``), so a
Kubernetes podFailurePolicy can fail the Job at once instead of retrying it. Crashes keep their traceback
and a different exit code: they may be worth a retry.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lmforge_jobs import tracking
from lmforge_jobs.kinds import KINDS
from lmforge_jobs.launch import record_exit
from lmforge_jobs.manifest import ManifestError, Resource, load_spec
from lmforge_jobs.resolve import default_output, unresolved
from lmforge_jobs.spec import EXIT_CONFIG_ERROR, EXIT_STOPPED, EXIT_UNAVAILABLE, FieldError, SpecError
from lmforge_jobs.telemetry import Telemetry, report_dir

DEFAULT_WORKDIR = "lmforge-runs"


class ConfigError(FieldError):
    """A problem the user fixes in the spec or its inputs (``field``: the camelCase path under spec).
    Exit code 64 (``EXIT_CONFIG_ERROR``)."""


class ServiceUnavailable(FieldError):
    """A service named in the spec (``field``) is down or overloaded after the job's own retries: worth
    retrying later, unlike a ConfigError. Exit code 69 (``EXIT_UNAVAILABLE``)."""


def error_line(exc: BaseException) -> str:
    """The one-line message for a configuration error."""
    if isinstance(exc, FieldError):
        return f"spec.{exc.field}: {exc.message}"
    return str(exc)


def load_job_resource(path: str, kind: str) -> Resource[Any, Any]:
    """Load the job's resource, check it is resolved, and fill in spec.output when unset."""
    resource = load_spec(path, kind)
    fields = unresolved(resource)
    if fields:
        raise ConfigError(
            fields[0],
            "references by name must be resolved first (run the manifest set with `lmforge run`, or let the "
            "operator run it); a job takes URIs (data, path) only",
        )
    if resource.spec.output is None:
        workdir = os.environ.get("LMFORGE_WORKDIR", DEFAULT_WORKDIR)
        resource.spec.output = default_output(kind, resource.name, workdir)
    return resource


def job_main(
    kind: str,
    run: Callable[[Resource[Any, Any], argparse.Namespace], Any],
    argv: Sequence[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    description: str | None = None,
) -> int:
    """Parse ``--manifest``, load the resource of ``kind`` and run it; return the exit code."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {KINDS[kind].module}", description=description or f"Run a {kind}."
    )
    parser.add_argument("--manifest", required=True, help=f"YAML file with one {kind} (references resolved)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    resource = None
    ended = "FAILED"  # what the tracker's runs are unless the job says otherwise (a crash)
    try:
        resource = load_job_resource(args.manifest, kind)
        tracking.activate(resource, report_dir(resource.spec.output))  # Telemetry reports to it
        result = run(resource, args)
        ended = "KILLED" if result == EXIT_STOPPED else "FINISHED"  # a stopped run resumes its own
    except ManifestError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        record_exit(EXIT_CONFIG_ERROR)
        return EXIT_CONFIG_ERROR
    except (ConfigError, SpecError) as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        if resource is not None and os.environ.get("RANK", "0") == "0":
            # progress.json and the termination message say why, for lmforge run and the operator
            Telemetry(kind, resource.spec.output, port="off").fail(
                error_line(exc), field=f"spec.{exc.field}", config_error=True
            )
        record_exit(EXIT_CONFIG_ERROR)  # under torchrun, the launcher turns this into the pod's exit code
        return EXIT_CONFIG_ERROR
    except ServiceUnavailable as exc:
        print(f"error: {error_line(exc)} (the Job retries the pod)", file=sys.stderr)
        if resource is not None and os.environ.get("RANK", "0") == "0":
            Telemetry(kind, resource.spec.output, port="off").fail(error_line(exc), field=f"spec.{exc.field}")
        return EXIT_UNAVAILABLE
    finally:
        tracking.deactivate(ended)
    return int(result) if isinstance(result, int) else 0


__all__ = [
    "DEFAULT_WORKDIR",
    "ConfigError",
    "ServiceUnavailable",
    "error_line",
    "job_main",
    "load_job_resource",
]
