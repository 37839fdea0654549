"""An Evaluation's human arena (``spec.arena.human``) on a cluster: the voting page's Deployment and Service,
and its ratings mirrored into ``status.results.human``.

Once the Evaluation has **Succeeded** (its ``judgments*.jsonl`` exist: the pairs the page serves), every
reconcile — the periodic resync included, :meth:`WorkQueue.needs_resync` keeps such an Evaluation in it —
creates the Deployment and Service of :mod:`lmforge_operator.arena` if absent, patches them when their spec
digest changed, records the Service in ``status.humanArena`` and GETs the page's ``/leaderboard.json``.
With ``arena.human`` removed or ``enabled: false`` the two are deleted (the votes stay in the database) and
``status.humanArena`` goes; ``status.results.human`` keeps the last ratings.

**The ratings are read directly through the Service's cluster DNS name** (``http://<name>-arena.<ns>.svc/``),
as the operator already reads the Jobs' metrics endpoints, rather than through the API server's service
proxy: the proxy needs ``services/proxy``, which would let the operator reach every HTTP Service of the
namespace with its own credentials, and it puts each read through the API server. The chart's operator
NetworkPolicy allows the egress (port 8080 of lmforge pods). An operator running outside the cluster cannot
resolve the name: the ratings are then not mirrored, and nothing else changes.

Nothing here ever breaks the reconcile: a refused object is logged and posted as a Warning Event, a page
that does not answer (starting, no database, a timeout of :data:`TIMEOUT` seconds) leaves the status as it
was. Changing only ``arena.human`` never re-runs the Evaluation (its Jobs' spec digest leaves it out).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from lmforge_jobs.manifest import Resource
from lmforge_operator import arena, builders
from lmforge_operator.controller.events import post_note
from lmforge_operator.controller.outcomes import Outcome
from lmforge_operator.kube import ApiError

log = logging.getLogger("lmforge.operator")

TIMEOUT = 5.0
ARENA_REJECTED = "ArenaRejected"
ARENA_CREATED = "ArenaCreated"


def leaderboard_url(resource: Resource[Any, Any], namespace: str) -> str:
    """Where the ratings are read (tests point it at a stand-in server)."""
    return arena.service_url(resource, namespace)


async def fetch_leaderboard(url: str, timeout: float = TIMEOUT) -> dict[str, Any] | None:
    """The page's leaderboard JSON, or None when it does not answer in ``timeout`` seconds or not with JSON."""
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url, headers={"accept": "application/json"}) as resp,
        ):
            if resp.status != 200:
                return None
            data = json.loads(await resp.text())
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        log.debug("arena leaderboard %s: %s", url, exc)
        return None
    return data if isinstance(data, dict) else None


def human_results(board: dict[str, Any]) -> dict[str, Any] | None:
    """``status.results.human`` from the page's leaderboard JSON (None when it is not one): votes, ratings
    per model (``{rating, ci95}``) and the overall human–judge agreement over the judged votes."""
    try:
        votes = int(board.get("votes") or 0)
        ratings = {}
        for model in board.get("models") or []:
            rating = model["human"]
            entry: dict[str, Any] = {"rating": round(float(rating["rating"]), 1)}
            if rating.get("ci95"):
                entry["ci95"] = [round(float(x), 1) for x in rating["ci95"]]
            ratings[str(model["name"])] = entry
        judged = sum(int(p.get("judged") or 0) for p in board.get("pairs") or [])
        agree = sum(int(p.get("agree") or 0) for p in board.get("pairs") or [])
    except (KeyError, TypeError, ValueError):
        return None
    out: dict[str, Any] = {"votes": votes}
    if votes:  # without votes every rating is the mean: nothing to report yet
        out["ratings"] = ratings
    if judged:
        out["agreement"] = round(agree / judged, 4)
    return out


def job_spec(resource: Resource[Any, Any]) -> dict[str, Any]:
    """The spec as the Jobs' digest sees it: without an Evaluation's ``arena.human``, which the Jobs never
    read, so turning the voting page on or off never counts as a change of the evaluation."""
    spec = resource.spec.to_yaml_dict()
    if isinstance(spec.get("arena"), dict):
        spec["arena"] = {k: v for k, v in spec["arena"].items() if k != "human"}
    return spec


async def reconcile_arena(
    ctl: Any,
    key: tuple[str, str, str],
    body: dict[str, Any],
    resource: Resource[Any, Any],
    status: dict[str, Any],
    output: str,
    *,
    succeeded: bool,
) -> None:
    """Bring the voting page of ``resource`` (an Evaluation; ``succeeded``: its outcome this reconcile) to
    what its spec says; see the module docstring. Never raises: the Evaluation's outcome is decided."""
    kind, ns, name = key
    if kind != "Evaluation":
        return
    try:
        if arena.human(resource) is None:
            await _remove(ctl, ns, resource, status)
        elif succeeded:
            await _apply(ctl, ns, body, resource, status, output)
    except (ApiError, Outcome) as exc:
        log.warning("%s/%s/%s: arena: %s", kind, ns, name, exc)


async def _remove(ctl: Any, ns: str, resource: Resource[Any, Any], status: dict[str, Any]) -> None:
    if not status.get("humanArena"):
        return  # never ran (or already removed): no API calls for the Evaluations without a page
    owner_uid = resource.metadata.uid
    for kind in ("Deployment", "Service"):
        child = await ctl.api.get(kind, ns, arena.arena_name(resource))
        refs = ((child or {}).get("metadata") or {}).get("ownerReferences") or []
        if child is not None and any(r.get("uid") == owner_uid and r.get("controller") for r in refs):
            await ctl.api.delete(kind, ns, arena.arena_name(resource))
    status.pop("humanArena", None)
    log.info("%s/%s: arena.human off: removed the voting page", ns, resource.name)


async def _apply(
    ctl: Any, ns: str, body: dict[str, Any], resource: Resource[Any, Any], status: dict[str, Any], output: str
) -> None:
    owner = builders.owner_reference(body)
    image = getattr(resource.spec, "image", None) or ctl.config.image
    wanted = [
        arena.build_deployment(
            resource,
            owner,
            image=image,
            results=output,
            storage=ctl.storage,
            template_defaults=ctl.template_defaults.get("Evaluation"),
        ),
        arena.build_service(resource, owner),
    ]
    for obj in wanted:
        obj["metadata"]["namespace"] = ns
        kind, obj_name = str(obj["kind"]), obj["metadata"]["name"]
        there = await ctl.api.get(kind, ns, obj_name)
        if there is None:
            try:
                _, fresh = await ctl.api.create(obj, ns)
            except ApiError as exc:
                if exc.status >= 500 or exc.status in (408, 429):
                    raise
                await post_note(
                    ctl.api,
                    ctl.host,
                    body,
                    ARENA_REJECTED,
                    f"the API server refused {kind} {obj_name}: {exc.status} {exc.reason}: {exc.message}",
                    warning=True,
                )
                return
            if fresh and kind == "Deployment":
                await post_note(
                    ctl.api,
                    ctl.host,
                    body,
                    ARENA_CREATED,
                    f"voting page {kind} and Service {obj_name} created (arena.human)",
                )
            continue
        await ctl.claim(owner, ns, there)  # another resource's object of that name: Waiting, logged
        annotations = (there.get("metadata") or {}).get("annotations") or {}
        digest = obj["metadata"]["annotations"][arena.ANNOTATION_DIGEST]
        if annotations.get(arena.ANNOTATION_DIGEST) != digest:
            patch = {
                "metadata": {
                    "labels": obj["metadata"]["labels"],
                    "annotations": obj["metadata"]["annotations"],
                },
                "spec": obj["spec"],
            }
            await ctl.api.patch(kind, ns, obj_name, patch)
            log.info("%s/%s: arena: patched %s %s", ns, resource.name, kind, obj_name)
    status["humanArena"] = {"service": arena.arena_name(resource)}

    board = await fetch_leaderboard(leaderboard_url(resource, ns))
    mirrored = human_results(board) if board is not None else None
    if mirrored is not None:
        status["results"] = {**(status.get("results") or {}), "human": mirrored}


__all__ = ["fetch_leaderboard", "human_results", "job_spec", "leaderboard_url", "reconcile_arena"]
