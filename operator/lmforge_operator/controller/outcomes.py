"""How one reconcile of a resource ends.

A reconcile step returns the outcome of a resource that is progressing (:class:`Pending`, :class:`Running`,
:class:`Succeeded`) and raises the others (:class:`Waiting`, :class:`Invalid`, :class:`Failed`), whatever
the depth it finds them at. :meth:`Controller.reconcile <lmforge_operator.controller.Controller.reconcile>`
is the one place that turns either into the resource's conditions and its Event.
"""

from __future__ import annotations


class Outcome(Exception):
    """``condition`` becomes the one True condition among Running/Succeeded/Failed/Invalid/Waiting (None:
    none of them, the resource is Pending), with ``reason`` and ``message``."""

    condition: str | None = None

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message


class Pending(Outcome):
    """Children were created; their pods have not started yet."""


class Running(Outcome):
    condition = "Running"


class Succeeded(Outcome):
    condition = "Succeeded"


class Waiting(Outcome):
    """A dependency, a checkpoint or Kueue has to come first."""

    condition = "Waiting"


class Invalid(Outcome):
    """Only a change of the spec can help; ``field`` (e.g. ``spec.batch``) names the one to change, when
    there is one, and starts the message."""

    condition = "Invalid"

    def __init__(self, reason: str, message: str, field: str | None = None) -> None:
        super().__init__(reason, f"{field}: {message}" if field else message)
        self.field = field


class Failed(Outcome):
    condition = "Failed"


__all__ = ["Failed", "Invalid", "Outcome", "Pending", "Running", "Succeeded", "Waiting"]
