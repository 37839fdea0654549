"""lmforge's control plane: the ``lmforge`` CLI, the local runner and the Kubernetes operator.

Importing the package stays light (the CLI imports only what a subcommand needs). The kopf handlers live
in :mod:`lmforge_operator.handlers`; they are registered here only when this process is ``kopf run``, so
that ``kopf run -m lmforge_operator`` works as well as ``kopf run -m lmforge_operator.handlers`` and
``lmforge operator``.
"""

import os as _os
import sys as _sys


def _run_by_kopf() -> bool:
    if "kopf" not in _sys.modules or not _sys.argv:
        return False
    program = _os.path.basename(_sys.argv[0])
    by_kopf = program.startswith("kopf") or _sys.argv[0].endswith(_os.path.join("kopf", "__main__.py"))
    return by_kopf and "run" in _sys.argv[1:]


if _run_by_kopf():
    from lmforge_operator import handlers as handlers
