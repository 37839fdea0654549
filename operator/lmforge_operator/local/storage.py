"""Object storage for ``lmforge run``: what a job's processes get in their environment.

On a cluster the operator gives each pod ``spec.storage`` (or the chart's defaults): the endpoint and region
as variables, the credentials Secret as ``envFrom``, a gs:// key file as a Secret volume. Locally the same
settings come from here, first found wins:

* the endpoint: ``lmforge run --s3-endpoint URL``, else ``spec.storage.endpoint``, else what the user's
  environment already holds (``LMFORGE_S3_ENDPOINT``, ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``: the jobs
  inherit it and :mod:`lmforge_jobs.storage` reads it);
* the region: ``spec.storage.region``, else the environment's ``AWS_REGION`` / ``AWS_DEFAULT_REGION``;
* the credentials: the user's environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
  ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``GOOGLE_APPLICATION_CREDENTIALS``), which the jobs inherit.
  ``spec.storage.credentials`` names a cluster Secret that ``lmforge run`` cannot read; a copy of it as files
  ``$LMFORGE_SECRETS_DIR/<secretName>/<KEY>`` (one file per key, as a mounted Secret holds them) is used
  when that directory exists, each file a variable unless the environment already sets it; likewise
  ``spec.storage.gcsCredentials`` as the file ``$LMFORGE_SECRETS_DIR/<name>/<key>``.

Values are never printed: only the names of what was used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmforge_jobs.manifest import Resource
from lmforge_jobs.secrets import DEFAULT_SECRETS_DIR

ENDPOINT_ENV = "LMFORGE_S3_ENDPOINT"
REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")
GCS_CREDENTIALS_ENV = "GOOGLE_APPLICATION_CREDENTIALS"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def secrets_dir(environ: Mapping[str, str]) -> Path:
    """Where local copies of Secrets live: ``$LMFORGE_SECRETS_DIR`` (default /var/run/secrets/lmforge)."""
    return Path(environ.get("LMFORGE_SECRETS_DIR") or DEFAULT_SECRETS_DIR)


def storage_env(
    resource: Resource[Any, Any], s3_endpoint: str | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The variables to add to the environment of ``resource``'s job (see the module docstring)."""
    environ = os.environ if environ is None else environ
    storage = getattr(resource.spec, "storage", None)
    env: dict[str, str] = {}
    endpoint = s3_endpoint or (storage.endpoint if storage is not None else None)
    if endpoint:
        env[ENDPOINT_ENV] = endpoint
    if storage is None:
        return env
    if storage.region:
        env.update(dict.fromkeys(REGION_ENV, storage.region))
    if storage.credentials is not None:
        copy = secrets_dir(environ) / storage.credentials.secret_name
        if copy.is_dir():
            for path in sorted(copy.iterdir()):
                if path.is_file() and _ENV_NAME.match(path.name) and path.name not in environ:
                    env[path.name] = path.read_text(encoding="utf-8").strip()
    if storage.gcs_credentials is not None and GCS_CREDENTIALS_ENV not in environ:
        ref = storage.gcs_credentials.secret_key_ref
        key_file = secrets_dir(environ) / ref.name / ref.key
        if key_file.is_file():
            env[GCS_CREDENTIALS_ENV] = str(key_file)
    return env


__all__ = ["ENDPOINT_ENV", "secrets_dir", "storage_env"]
