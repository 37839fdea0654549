"""The Kubernetes permissions the operator needs, as data.

The Helm chart renders these rules into its Role/ClusterRole, a chart test checks the rendered rules cover
them, and the operator's integration tests check that every API call the operator made is allowed by them
(:func:`allows`). Change the operator's API usage and this file together.

``RULES`` are needed in every namespace the operator watches (a Role per namespace, or a ClusterRole bound
cluster-wide with ``--all-namespaces``). Nothing cluster-scoped is needed: kopf's scanning is off (the chart
installs the CRDs first), so it lists neither CRDs nor namespaces — which is also why ``--namespace`` takes
exact names, not patterns — and API discovery (``/apis/<group>/<version>``) is open to every authenticated
user. No wildcards, and no access to Secrets at all: Secrets reach job pods as ``secretKeyRef`` env vars or
mounted volumes that the kubelet resolves, never through the operator.
"""

from __future__ import annotations

from typing import Any

from lmforge_jobs.kinds import KINDS
from lmforge_jobs.spec import API_GROUP
from lmforge_jobs.sweep.config import TEMPLATE_KINDS

PLURALS = tuple(kind.plural for kind in KINDS.values())
TRIAL_PLURALS = tuple(KINDS[kind].plural for kind in TEMPLATE_KINDS)

READ = ["get", "list", "watch"]

RULES: list[dict[str, Any]] = [
    # The custom resources: watched (kopf lists and watches them). The operator registers only watch-
    # event handlers, so kopf never patches them (no finalizer, no progress or last-handled annotations).
    {"apiGroups": [API_GROUP], "resources": list(PLURALS), "verbs": READ},
    # Their status: merge-patched by the operator, never read through the subresource.
    {"apiGroups": [API_GROUP], "resources": [f"{p}/status" for p in PLURALS], "verbs": ["patch"]},
    # Children carry an ownerReference with blockOwnerDeletion: true (foreground deletion of a resource
    # waits for its Jobs). Setting that flag needs `update` on the owner's finalizers subresource when the
    # API server runs the OwnerReferencesPermissionEnforcement admission plugin; nothing else uses it.
    {"apiGroups": [API_GROUP], "resources": [f"{p}/finalizers" for p in PLURALS], "verbs": ["update"]},
    # A Sweep's trials: PretrainRuns or AlignmentRuns created if absent under deterministic names (owned by
    # the Sweep, so the garbage collector deletes them with it); a pruned trial's is deleted. Read from the
    # watch above, never patched.
    {"apiGroups": [API_GROUP], "resources": list(TRIAL_PLURALS), "verbs": ["create", "delete"]},
    # Children are created if absent under deterministic names. On 409 the existing child is read by name
    # and kept only if its controller ownerReference has this resource's uid; a child of an earlier
    # resource of the same name is deleted first, never adopted. Jobs are also watched; the Jobs and spec
    # ConfigMaps of superseded Evaluation rounds (checkpoints: every) are deleted; everything else goes
    # away through ownerReferences (the garbage collector deletes it).
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": [*READ, "create", "delete"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "delete"]},
    # Services: the headless one of a torchrun resource, and the ClusterIP one of an Evaluation's voting
    # page (arena.human), patched when its spec changes, deleted when the page is turned off.
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "create", "patch", "delete"]},
    # The voting page's Deployment (arena.human): created once the Evaluation succeeded, patched when its
    # spec changes, deleted when the page is turned off (else it goes with the Evaluation).
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "create", "patch", "delete"]},
    # The NetworkPolicy isolating a training resource's pods (created before its Job; off with
    # $LMFORGE_NETWORK_POLICY=false, the chart's networkPolicy.perRun).
    {
        "apiGroups": ["networking.k8s.io"],
        "resources": ["networkpolicies"],
        "verbs": ["get", "create", "delete"],
    },
    # Gang scheduling (spec.scheduling.gang): a PodGroup per Job, Volcano's or the scheduler-plugins'
    # coscheduling one, created before the Job and removed with the resource (ownerReference).
    {
        "apiGroups": ["scheduling.volcano.sh", "scheduling.x-k8s.io"],
        "resources": ["podgroups"],
        "verbs": ["get", "create", "delete"],
    },
    # Job pods: rank 0's IP for its Prometheus endpoint, termination messages and restart counts.
    {"apiGroups": [""], "resources": ["pods"], "verbs": READ},
    # Kubernetes Events on transitions (the operator's and kopf's own, both POSTed as core/v1 Events).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]


LEADER_RULES: list[dict[str, Any]] = [
    # Leader election among operator replicas (lmforge_operator.leader): the Lease in the operator's own
    # namespace only (the chart binds these with a Role there, whatever the watched namespaces).
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "patch"]},
]


def _matches(rule: dict[str, Any], group: str, resource: str, verb: str) -> bool:
    return group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]


def allows(group: str, resource: str, verb: str, *, namespaced: bool = True) -> bool:
    """Whether the operator's rules permit ``verb`` on ``group``/``resource`` (core group is ``""``;
    ``resource`` may carry a subresource, ``pretrainruns/status``).

    A namespaced request is allowed by a Role in each watched namespace; a cluster-wide one (watching a
    kind across all namespaces) by the same rules in a ClusterRole, which the chart binds with a
    ClusterRoleBinding in --all-namespaces mode; the Lease of leader election (LEADER_RULES) by a Role in
    the operator's own namespace. So ``namespaced`` (whether the request names a namespace) never changes
    the answer: callers pass it to say which kind of request they check.
    """
    del namespaced
    return any(_matches(rule, group, resource, verb) for rule in RULES + LEADER_RULES)


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


__all__ = ["LEADER_RULES", "PLURALS", "RULES", "TRIAL_PLURALS", "allows", "verb_for"]
