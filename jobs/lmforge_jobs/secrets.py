"""Secret values in a job: how a spec's ``{secretKeyRef: {name, key}}`` reaches the process.

A spec never holds a secret, only a reference. On Kubernetes the operator adds one environment variable per
referenced Secret key to the job's container (``env[].valueFrom.secretKeyRef``; the kubelet resolves it, the
operator never reads Secrets). Its name is a pure function of the reference, so both sides agree::

    {secretKeyRef: {name: hf, key: token}}      ->  LMFORGE_SECRET_HF_TOKEN
    {secretKeyRef: {name: judge-api, key: key}} ->  LMFORGE_SECRET_JUDGE_API_KEY

(The operator refuses, naming the field, a spec whose two different references would share a variable.)

Locally (``lmforge run``, ``python -m lmforge_jobs.<stage>``) set that variable yourself, or put the value in
a file ``$LMFORGE_SECRETS_DIR/<name>/<key>`` (default ``/var/run/secrets/lmforge``; a Secret volume mounted
there by hand works too). :func:`read_secret` tries the variable, then the file, and otherwise raises a
:class:`~lmforge_jobs.entry.ConfigError` naming the spec field (exit code 64). Never log the value.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lmforge_jobs.spec import SecretRef

ENV_PREFIX = "LMFORGE_SECRET_"
DEFAULT_SECRETS_DIR = "/var/run/secrets/lmforge"


def secret_env_name(name: str, key: str) -> str:
    """Environment variable holding key ``key`` of Secret ``name``: ``LMFORGE_SECRET_<NAME>_<KEY>``
    (upper case, every character other than a letter or digit replaced by ``_``)."""
    return ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", f"{name}_{key}".upper())


def env_name(ref: SecretRef) -> str:
    """:func:`secret_env_name` of a spec's SecretRef."""
    return secret_env_name(ref.secret_key_ref.name, ref.secret_key_ref.key)


def read_secret(ref: SecretRef, field: str) -> str:
    """The value of ``ref`` (``field``: its camelCase spec path, for the error message).

    Surrounding whitespace (a file's trailing newline) is dropped. Raises ConfigError when neither the
    environment variable nor the file provides a non-empty value.
    """
    var = env_name(ref)
    value = (os.environ.get(var) or "").strip()
    if value:
        return value
    secrets_dir = Path(os.environ.get("LMFORGE_SECRETS_DIR") or DEFAULT_SECRETS_DIR)
    path = secrets_dir / ref.secret_key_ref.name / ref.secret_key_ref.key
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError:
        value = ""
    if value:
        return value
    from lmforge_jobs.entry import ConfigError  # entry imports telemetry; keep this module light

    raise ConfigError(
        field,
        f"Secret {ref.secret_key_ref.name!r} key {ref.secret_key_ref.key!r} is not available: set ${var} "
        f"or write the value to {path}",
    )


__all__ = ["DEFAULT_SECRETS_DIR", "ENV_PREFIX", "env_name", "read_secret", "secret_env_name"]
