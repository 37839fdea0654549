"""The Kubernetes permissions the operator needs, as data.

The Helm chart renders these rules into its Role/ClusterRole, a chart test checks the rendered rules cover
them, and the operator's integration tests check that every API call the operator made is allowed by them
(:func:`allows`). Change the operator's API usage and this file together.

``RULES`` are needed in every namespace the operator watches (a Role per namespace, or a ClusterRole bound
cluster-wide with ``--all-namespaces``); ``CLUSTER_RULES`` only ever cluster-wide. No wildcards, and no
access to Secrets at all: Secrets reach job pods as ``secretKeyRef`` env vars or mounted volumes that the
kubelet resolves, never through the operator.
"""

from __future__ import annotations

from typing import Any

from lmforge_jobs.spec import API_GROUP

PLURALS = ("corpora", "pretrainruns", "alignmentruns", "evaluations")

READ = ["get", "list", "watch"]

RULES: list[dict[str, Any]] = [
    # The four custom resources: watched; kopf patches annotations (handler progress, last-handled
    # configuration) and finalizers on the object itself, and the operator writes status.
    {"apiGroups": [API_GROUP], "resources": list(PLURALS), "verbs": [*READ, "patch", "update"]},
    {
        "apiGroups": [API_GROUP],
        "resources": [f"{p}/status" for p in PLURALS],
        "verbs": ["get", "patch", "update"],
    },
    # Children: created if absent under deterministic names, read back after a restart, watched for
    # progress. The Jobs and spec ConfigMaps of superseded Evaluation rounds (checkpoints: every) are
    # deleted; everything else goes away through ownerReferences (the garbage collector deletes it).
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": [*READ, "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": [*READ, "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": [*READ, "create"]},
    # Job pods: rank 0's IP for its Prometheus endpoint, termination messages and restart counts.
    {"apiGroups": [""], "resources": ["pods"], "verbs": READ},
    # Kubernetes Events on transitions (kopf posts core/v1 Events).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
]

CLUSTER_RULES: list[dict[str, Any]] = [
    # kopf scans CRDs to learn when the lmforge resources appear or go away...
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": READ},
    # ...and namespaces, when it watches several (--all-namespaces or glob patterns).
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
]


def _matches(rule: dict[str, Any], group: str, resource: str, verb: str) -> bool:
    return group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]


def allows(group: str, resource: str, verb: str, *, namespaced: bool = True) -> bool:
    """Whether the operator's rules permit ``verb`` on ``group``/``resource`` (core group is ``""``;
    ``resource`` may carry a subresource, ``pretrainruns/status``).

    A namespaced request must be allowed by RULES alone (a Role in each watched namespace is enough);
    a cluster-wide request (listing CRDs, or watching a kind across all namespaces) by RULES +
    CLUSTER_RULES, which the chart binds with a ClusterRoleBinding in --all-namespaces mode.
    """
    rules = RULES if namespaced else RULES + CLUSTER_RULES
    return any(_matches(rule, group, resource, verb) for rule in rules)


def verb_for(method: str, *, named: bool, watch: bool = False) -> str:
    """The RBAC verb of an HTTP request: ``GET`` on a collection is ``list`` (``watch`` with ?watch=true),
    on a named object ``get``; ``POST`` is ``create``; ``PUT`` ``update``; ``PATCH`` ``patch``;
    ``DELETE`` on a collection ``deletecollection``."""
    method = method.upper()
    if method == "GET":
        return "watch" if watch else ("get" if named else "list")
    if method == "DELETE":
        return "delete" if named else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}[method]


__all__ = ["CLUSTER_RULES", "PLURALS", "RULES", "allows", "verb_for"]
