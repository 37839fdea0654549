"""The reconciler (see :mod:`lmforge_operator.controller.reconcile`)."""

from lmforge_operator.controller.reconcile import (
    Config,
    Controller,
    _changed_fields,
    default_image,
    spec_hash,
    validated_status,
)

__all__ = ["Config", "Controller", "_changed_fields", "default_image", "spec_hash", "validated_status"]
