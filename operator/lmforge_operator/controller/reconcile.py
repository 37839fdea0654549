"""The reconcile of one resource, from scratch every time (level-based, restart-safe):

1. validate the spec (the same models ``lmforge validate`` uses) → Invalid naming the field, no children;
   a reference to itself or a cycle → Invalid; a PretrainRun whose compute plan does not fit in GPU memory
   → Invalid (``status.plan`` is written at admission either way);
2. look for the children under their deterministic names (builders.py): none yet → check dependencies
   (Waiting with the reason until every referenced resource has the needed phase and outputs), resolve the
   references to their status.outputs and create the ConfigMap, Service, NetworkPolicy and Job if absent
   (409 is fine);
3. otherwise mirror the Job's state into the status (mirror.py); a Corpus advances stage by stage
   (corpus_stages.py); an Evaluation with ``checkpoints: every`` runs one Job per round (eval_rounds.py);
   a Sweep has no Job: its trials are child PretrainRuns or AlignmentRuns (sweeps.py); nor has a
   ScalingStudy: its points are child PretrainRuns, fitted in the operator once all have ended
   (scaling_studies.py);
4. patch ``status`` (validated by the kind's status model) only when it changed, post a Kubernetes Event on
   every transition (events.py), and wake the resources that depend on this one.

The steps return or raise an :class:`~lmforge_operator.controller.outcomes.Outcome`;
:meth:`Controller.reconcile` alone turns it into conditions.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from typing import Any

from lmforge_jobs.manifest import Resource, parse_resource
from lmforge_jobs.resolve import (
    NEEDS_RUNNING,
    UnresolvedReference,
    default_output,
    dependencies,
    dependency_order,
    expected_outputs,
    resolve,
)
from lmforge_jobs.spec import spec_hash
from lmforge_operator import podtemplate
from lmforge_operator import status as status_helpers
from lmforge_operator.controller.config import Config
from lmforge_operator.controller.corpus_stages import reconcile_corpus
from lmforge_operator.controller.eval_rounds import reconcile_rounds
from lmforge_operator.controller.events import post_event, post_note
from lmforge_operator.controller.human_arena import job_spec, reconcile_arena
from lmforge_operator.controller.mirror import mirror_job, verdict_kept
from lmforge_operator.controller.outcomes import Failed, Invalid, Outcome, Pending, Waiting
from lmforge_operator.controller.scaling_studies import reconcile_study
from lmforge_operator.controller.sweeps import reconcile_sweep
from lmforge_operator.controller.workqueue import Key, WorkQueue
from lmforge_operator.kube import ApiError, kind_key

log = logging.getLogger("lmforge.operator")

SPEC_ANNOTATION = "lmforge.io/spec"
SPEC_HASH_ANNOTATION = "lmforge.io/spec-digest"
# Reason of the Event saying which of the operator's default pod template fields a new Job got.
POD_TEMPLATE_DEFAULTS = "PodTemplateDefaults"
# The phases (and the reasons for them) that are a resource's verdict: kept without looking at its Jobs.
FINAL_REASONS = {
    "Succeeded": status_helpers.FINAL_SUCCESS_REASONS,
    "Failed": status_helpers.FINAL_FAILURE_REASONS,
    "Invalid": (status_helpers.CONFIG_ERROR,),
}


def changed_fields(old: Any, new: Any, prefix: str = "spec") -> list[str]:
    """Field paths whose values differ between two spec dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            out += changed_fields(old.get(k), new.get(k), f"{prefix}.{k}")
        return out
    return [] if old == new else [prefix]


def _status_fields(kind: str) -> set[str]:
    return {f.alias or n for n, f in status_helpers.status_model(kind).model_fields.items()}


def _reason_for_phase(status: dict[str, Any]) -> str | None:
    """The reason of the True condition that gave the status its phase."""
    phase = status.get("phase")
    for c in status.get("conditions") or []:
        if c.get("type") == phase and c.get("status") == "True":
            return c.get("reason")
    # Pending has no condition of its own: the others carry its reason (set_state)
    return (status_helpers.condition(status, "Ready") or {}).get("reason")


class Controller(WorkQueue):
    """The work queue and cache (:class:`WorkQueue`) and the reconcile logic; see the module docstring."""

    def __init__(self, config: Config | None = None, metrics: Any = None) -> None:
        super().__init__(config, metrics)
        self._parsed: dict[Key, tuple[str, Resource[Any, Any] | None, list[Any]]] = {}
        self._locks: dict[Key, asyncio.Lock] = {}
        self.isolation = self.config.isolation()
        self.storage = self.config.storage_defaults()
        self.template_defaults = self.config.template_defaults()

    def forget(self, key: Key) -> None:
        super().forget(key)
        self._parsed.pop(key, None)
        self._locks.pop(key, None)

    # ------------------------------------------------------------------------------------ reconcile
    async def reconcile(self, body: dict[str, Any]) -> Outcome | None:
        """Reconcile the resource of ``body``: its conditions from the outcome of the steps, its status
        patched when changed, an Event on a transition. None when it is being deleted."""
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return None
        kind, ns, name = str(body["kind"]), str(meta.get("namespace") or ""), str(meta["name"])
        key = (kind, ns, name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            body = self.cache.get(key, body)
            old = {k: v for k, v in (body.get("status") or {}).items() if k in _status_fields(kind)}
            status = copy.deepcopy(old)
            generation = meta.get("generation")
            try:
                outcome = await self._steps(key, body, status)
            except Outcome as raised:
                outcome = raised
            if not outcome.message and outcome.condition in ("Failed", "Invalid", "Waiting"):
                # never a condition without a word: say where to look
                outcome.message = f"{outcome.reason}: see kubectl describe {kind.lower()}/{name} and its Jobs"
            phase = status_helpers.set_state(
                status, outcome.condition, outcome.reason, outcome.message, generation
            )
            if generation is not None:
                status["observedGeneration"] = generation
            try:
                new = status_helpers.validated_status(kind, status)
            except Exception as exc:  # a bug of ours: say so in the log, never write a broken status
                log.error("status of %s/%s/%s does not validate: %s", *key, exc)
                raise
            if new != old:
                patch = {k: None for k in old if k not in new}
                patch.update(new)
                assert self.api is not None
                updated = await self.api.patch(kind, ns, name, {"status": patch}, subresource="status")
                if updated is not None and key in self.cache:
                    self.cache[key] = updated
                elif key in self.cache:
                    self.cache[key] = {**self.cache[key], "status": new}
            old_phase, new_phase = old.get("phase"), new.get("phase")
            if self.metrics is not None and key in self.cache:
                self.metrics.phase(kind, ns, name, new_phase)
            # a transition: the phase, or why it is in it
            if (new_phase, outcome.reason) != (old_phase, _reason_for_phase(old)) and self.api is not None:
                await post_event(self.api, self.host, body, phase, outcome)
            if new_phase != old_phase:
                self._wake_dependents(key)
            return outcome

    async def _steps(self, key: Key, body: dict[str, Any], status: dict[str, Any]) -> Outcome:
        """The resource's steps (:meth:`_job_steps`), then an Evaluation's voting page (human_arena.py),
        which never changes the outcome."""
        try:
            outcome = await self._job_steps(key, body, status)
        except Outcome as raised:
            outcome = raised
        resource = self.parse(key, body)[0] if key[0] == "Evaluation" else None
        if resource is not None:
            output = resource.spec.output or default_output(key[0], key[2], self.config.storage, key[1])
            succeeded = outcome.condition == "Succeeded"
            await reconcile_arena(self, key, body, resource, status, output, succeeded=succeeded)
        return outcome

    async def _job_steps(self, key: Key, body: dict[str, Any], status: dict[str, Any]) -> Outcome:
        """Admission, then the children: returns the outcome, or raises it (Waiting, Invalid, Failed)."""
        kind, ns, name = key
        resource = self.admit(key, body, status)
        if self.finished(body, status):
            # Terminal means terminal: its Jobs may be gone (a TTL, a cleanup policy, a user); only a new
            # spec (generation) runs it again.
            return verdict_kept(status)
        from lmforge_operator import builders

        owner = builders.owner_reference(body)
        if kind == "Sweep":
            return await reconcile_sweep(self, key, resource, status, owner)
        if kind == "ScalingStudy":
            return await reconcile_study(self, key, resource, status, owner)
        output = resource.spec.output or default_output(kind, name, self.config.storage, ns)
        if kind == "Corpus":
            return await reconcile_corpus(self, key, resource, status, owner)
        if kind == "Evaluation" and resource.spec.checkpoints.value == "every":
            return await reconcile_rounds(self, key, resource, status, owner, output)

        job_name = builders.job_name(resource)
        assert self.api is not None
        job = await self.find_job(ns, job_name, status, owner)
        if job is None:
            outputs = self.check_dependencies(resource, ns)
            job = await self.create_children(key, resource, owner, outputs, stage=None)
            job = job or await self.find_job(ns, job_name, None, owner)
            if job is None:
                return Pending(status_helpers.JOB_CREATED, f"Job {job_name} created")
        changed = self.spec_changed(job, resource)
        if changed:
            raise Invalid(status_helpers.SPEC_CHANGED, changed)
        return await mirror_job(self.api, resource, ns, status, job, output)

    @staticmethod
    def finished(body: dict[str, Any], status: dict[str, Any]) -> bool:
        """Whether the resource has its Jobs' verdict for its current generation (Succeeded, Failed, or
        Invalid because the job refused its configuration)."""
        generation = (body.get("metadata") or {}).get("generation")
        if status.get("observedGeneration") != generation:
            return False
        return _reason_for_phase(status) in FINAL_REASONS.get(str(status.get("phase")), ())

    # ------------------------------------------------------------------------------------ admission
    def admit(self, key: Key, body: dict[str, Any], status: dict[str, Any]) -> Resource[Any, Any]:
        """The validated resource; raises Invalid when its spec is invalid, it refers to itself or to a
        cycle, or (a PretrainRun) its compute plan does not fit in GPU memory."""
        kind, _, name = key
        resource, problems = self.parse(key, body)
        if resource is None:
            message = "; ".join(f"{p.field}: {p.message}" for p in problems) or "invalid resource"
            raise Invalid(status_helpers.SPEC_INVALID, message)

        # References to itself, and cycles through the cache.
        for field, ref, _ in dependencies(resource):
            if ref == (kind, name):
                raise Invalid(
                    status_helpers.DEPENDENCY_CYCLE, f"refers to this {kind} itself", f"spec.{field}"
                )
        cycle = self._cycle_through(key)
        if cycle:
            path = " → ".join(f"{k}/{n}" for k, _, n in cycle)
            field = next(f for f, ref, _ in dependencies(resource) if ref == (cycle[1][0], cycle[1][2]))
            raise Invalid(status_helpers.DEPENDENCY_CYCLE, f"dependency cycle {path}", f"spec.{field}")

        # The compute plan, at admission; a run that cannot fit is refused.
        if kind == "PretrainRun":
            self._plan(resource, status, key[1])
        return resource

    def parse(self, key: Key, body: dict[str, Any]) -> tuple[Resource[Any, Any] | None, list[Any]]:
        """The validated resource (cached per spec), or the problems that make it invalid."""
        doc = {
            "apiVersion": body.get("apiVersion"),
            "kind": body.get("kind"),
            "metadata": {
                k: v
                for k, v in (body.get("metadata") or {}).items()
                if k in ("name", "namespace", "labels", "annotations", "uid", "generation")
            },
            "spec": body.get("spec"),
        }
        text = json.dumps(doc, sort_keys=True, default=str)
        cached = self._parsed.get(key)
        if cached is not None and cached[0] == text:
            return cached[1], cached[2]
        resource, problems = parse_resource(doc, f"{key[0]}/{key[2]}")
        self._parsed[key] = (text, resource, problems)
        if resource is not None:  # reverse index: stale entries only cause a spare reconcile
            for _, ref, _ in dependencies(resource):
                self._dependents.setdefault((ref[0], key[1], ref[1]), set()).add(key)
        return resource, problems

    def _cycle_through(self, key: Key) -> list[Key] | None:
        """The path key → … → key through references, when there is one (resources in the cache)."""
        ns = key[1]

        def needs(k: Key) -> list[Key]:
            body = self.cache.get(k)
            if body is None:
                return []
            resource, _ = self.parse(k, body)
            if resource is None:
                return []
            return [(ref[0], ns, ref[1]) for _, ref, _ in dependencies(resource)]

        _, cycles = dependency_order([key], needs)
        return next((cycle for cycle in cycles if cycle[0] == key), None)

    def _plan(self, resource: Resource[Any, Any], status: dict[str, Any], ns: str) -> None:
        """Write status.plan; raise Invalid naming the field when the run cannot fit in GPU memory."""
        from lmforge_jobs import plan as planner

        vocab = None
        spec = resource.spec
        if spec.model.vocab_size == "auto" and spec.corpus is not None:
            corpus = self.cache.get(("Corpus", ns, spec.corpus.name))
            train = ((corpus or {}).get("spec") or {}).get("tokenizer", {}).get("train") or {}
            if isinstance(train.get("vocabSize"), int):
                vocab = train["vocabSize"]
        try:
            plan = planner.plan_pretrain(spec, vocab_size=vocab, gpu=self.config.gpu)
        except ValueError:
            return  # a shape the planner does not model (encoder, encoder-decoder): no plan
        status["plan"] = plan.to_status().to_yaml_dict()
        if plan.fits:
            return
        where = "spec.batch.microBatchSize" if spec.batch.micro_batch_size > 1 else "spec.parallelism"
        raise Invalid(status_helpers.DOES_NOT_FIT, f"does not fit in GPU memory: {plan.reason}", where)

    def check_dependencies(
        self, resource: Resource[Any, Any], ns: str
    ) -> dict[tuple[str, str], dict[str, Any]]:
        """Outputs of every referenced resource; raises Waiting saying why when one is not ready."""
        outputs: dict[tuple[str, str], dict[str, Any]] = {}
        waits: list[tuple[str, str]] = []
        for field, ref, needs in dependencies(resource):
            target = self.cache.get((ref[0], ns, ref[1]))
            label = f"{ref[0]}/{ref[1]}"
            if target is None:
                waits.append((status_helpers.DEPENDENCY_NOT_FOUND, f"spec.{field}: {label} not found"))
                continue
            target_status = target.get("status") or {}
            phase = target_status.get("phase") or "Pending"
            if phase in ("Failed", "Invalid"):
                waits.append((status_helpers.DEPENDENCY_FAILED, f"spec.{field}: {label} is {phase}"))
                continue
            ok = phase == "Succeeded" or (needs == NEEDS_RUNNING and phase == "Running")
            if not ok:
                waits.append(
                    (status_helpers.DEPENDENCY_NOT_READY, f"spec.{field}: waiting for {label} ({phase})")
                )
                continue
            found = dict(target_status.get("outputs") or {})
            if phase == "Running":  # followed while it runs (checkpoints: every): where it will write
                out = (target.get("spec") or {}).get("output") or default_output(
                    ref[0], ref[1], self.config.storage, ns
                )
                found = {**expected_outputs(ref[0], out), **found}
            outputs[ref] = found
        if waits:
            order = [
                status_helpers.DEPENDENCY_FAILED,
                status_helpers.DEPENDENCY_NOT_FOUND,
                status_helpers.DEPENDENCY_NOT_READY,
            ]
            reason = min((r for r, _ in waits), key=order.index)
            raise Waiting(reason, "; ".join(m for _, m in waits))
        return outputs

    # -------------------------------------------------------------------------------------- children
    async def find_job(
        self, ns: str, name: str, status: dict[str, Any] | None, owner: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """The Job from the watch cache. On a miss it is read from the API server only when the resource
        may have Jobs already (``status`` says it got past Waiting, or ``status`` is None: just created);
        a new resource's Job is created if absent anyway (409 tolerated), so no read is needed for it.
        With ``owner`` (the resource's ownerReference), a Job of an earlier resource of the same name is
        never returned: see :meth:`claim`."""
        job = self.jobs.get((ns, name))
        if job is None:
            phase = (status or {}).get("phase") if status is not None else "?"
            if phase in (None, "Waiting"):
                return None
            assert self.api is not None
            job = await self.api.get("Job", ns, name)
            if job is None:
                return None
            self.jobs.setdefault((ns, name), job)
        if owner is not None:
            await self.claim(owner, ns, job)
        return job

    async def claim(self, owner: dict[str, Any], ns: str, child: dict[str, Any]) -> None:
        """Return when ``child`` is the resource's own (its controller ownerReference has the resource's
        uid); else raise Waiting (OldChildrenPresent): a child of an earlier resource of the same name
        (deleted, its children not yet collected, or orphaned) is deleted first, never adopted."""
        from lmforge_operator import builders

        meta = child.get("metadata") or {}
        refs = [r for r in meta.get("ownerReferences") or [] if r.get("controller")]
        if not owner.get("uid") or any(r.get("uid") == owner["uid"] for r in refs):
            return
        what = f"{child.get('kind')} {meta.get('name')}"
        label = f"{owner.get('kind')}/{owner.get('name')}"
        whose = f"owner uid {refs[0].get('uid')}" if refs else "no owner: orphaned"
        labels = meta.get("labels") or {}
        ours = (labels.get(builders.LABEL_KIND), labels.get(builders.LABEL_NAME)) == (
            owner.get("kind"),
            owner.get("name"),
        )
        if not ours:
            raise Waiting(
                status_helpers.OLD_CHILDREN,
                f"{what} exists and is not this {label}'s ({whose}); delete or rename it",
            )
        if not meta.get("deletionTimestamp"):
            assert self.api is not None
            await self.api.delete(kind_key(child), ns, str(meta.get("name")))
            log.info(
                "%s/%s/%s: deleted %s of an earlier resource (%s)",
                owner.get("kind"),
                ns,
                owner.get("name"),
                what,
                whose,
            )
        if child.get("kind") == "Job":
            self.jobs.pop((ns, str(meta.get("name"))), None)
        raise Waiting(
            status_helpers.OLD_CHILDREN,
            f"{what} belongs to an earlier {label} ({whose}): deleting it before creating this one's",
        )

    def _resolved_doc(
        self, resource: Resource[Any, Any], outputs: dict[tuple[str, str], dict[str, Any]], ns: str
    ) -> dict[str, Any]:
        root_default = default_output(resource.kind, resource.name, self.config.storage, ns)
        try:
            resolved = resolve(resource, outputs, root_default)
        except UnresolvedReference as exc:
            raise Waiting(status_helpers.DEPENDENCY_NOT_READY, str(exc)) from None
        return resolved.model_dump(by_alias=True, exclude_none=True, mode="json")

    @staticmethod
    def _annotate(obj: dict[str, Any], resource: Resource[Any, Any], extra: dict[str, str]) -> None:
        spec = job_spec(resource)
        annotations = obj.setdefault("metadata", {}).setdefault("annotations", {})
        annotations[SPEC_HASH_ANNOTATION] = spec_hash(spec)
        annotations[SPEC_ANNOTATION] = json.dumps(spec, sort_keys=True, separators=(",", ":"))
        annotations.update(extra)

    async def create_children(
        self,
        key: Key,
        resource: Resource[Any, Any],
        owner: dict[str, Any],
        outputs: dict[tuple[str, str], dict[str, Any]],
        *,
        stage: Any = None,
        round: int = 0,
        extra: dict[str, str] | None = None,
    ) -> dict[str, Any] | None:
        """Create the children of a step (a Corpus ``stage``, an Evaluation ``round``) if absent, in order:
        the Job as created (None if it existed). Raises Invalid naming the field when the resource cannot
        be built, Waiting when a reference does not resolve yet."""
        from lmforge_operator import builders

        kind, ns, _ = key
        doc = self._resolved_doc(resource, outputs, ns)
        image = getattr(resource.spec, "image", None) or self.config.image
        try:
            objs = builders.children(
                resource,
                doc,
                owner,
                image=image,
                stage=stage,
                round=round,
                isolation=self.isolation,
                storage=self.storage,
                template_defaults=self.template_defaults.get(kind),
                allow_privileged=self.config.pod_template_allow_privileged,
            )
        except builders.BuildError as exc:
            raise Invalid(status_helpers.SPEC_INVALID, exc.message, f"spec.{exc.field}") from None
        created_job = None
        assert self.api is not None
        for obj in objs:
            if obj.get("kind") == "Job":
                self._annotate(obj, resource, extra or {})
            obj.setdefault("metadata", {})["namespace"] = ns
            try:
                made, fresh = await self.api.create(obj, ns)
            except ApiError as exc:
                if exc.status == 404 and obj.get("kind") == "PodGroup":
                    # the scheduler's CRDs are not installed: waits (resynced) until they are
                    raise Waiting(
                        status_helpers.CHILD_REJECTED,
                        f"spec.scheduling.gang: the API server does not serve {obj.get('apiVersion')} "
                        "PodGroups: install the scheduler (its CRDs) or set gang: none",
                    ) from None
                if exc.status >= 500 or exc.status in (404, 408, 409, 429):
                    raise  # the server's trouble, or a conflict: retried with backoff
                # refused for good (403 a quota or policy, 400/413/422 an invalid or oversized object)
                cls = Failed if exc.status == 403 else Invalid
                raise cls(
                    status_helpers.CHILD_REJECTED,
                    f"the API server refused {obj.get('kind')} {obj['metadata'].get('name')}: "
                    f"{exc.status} {exc.reason}: {exc.message}",
                ) from None
            if not fresh and obj.get("kind") != "Job":  # the Job is looked up (and claimed) by the caller
                there = await self.api.get(kind_key(obj), ns, obj["metadata"]["name"])
                if there is not None:
                    await self.claim(owner, ns, there)
            if fresh and self.metrics is not None:
                self.metrics.children.labels(kind, str(obj.get("kind"))).inc()
            if obj.get("kind") == "Job" and fresh:
                created_job = made
                log.info("%s/%s/%s: created Job %s", *key, obj["metadata"]["name"])
                applied = podtemplate.fields_set(self.template_defaults.get(kind))
                if applied:
                    body = self.cache.get(key) or {
                        "apiVersion": owner["apiVersion"],
                        "kind": owner["kind"],
                        "metadata": {"name": owner["name"], "uid": owner["uid"], "namespace": ns},
                    }
                    await post_note(
                        self.api,
                        self.host,
                        body,
                        POD_TEMPLATE_DEFAULTS,
                        f"Job {obj['metadata']['name']}: the operator's {kind} pod template defaults applied "
                        f"({', '.join(applied)}) under spec.template",
                    )
        return created_job

    @staticmethod
    def spec_changed(job: dict[str, Any], resource: Resource[Any, Any]) -> str | None:
        """Why the spec no longer matches the one ``job`` was created from (the fields that changed)."""
        annotations = (job.get("metadata") or {}).get("annotations") or {}
        spec = job_spec(resource)
        if annotations.get(SPEC_HASH_ANNOTATION) in (None, spec_hash(spec)):
            return None
        try:
            before = json.loads(annotations.get(SPEC_ANNOTATION) or "{}")
        except ValueError:
            before = {}
        fields = changed_fields(before, spec) or ["spec"]
        return (
            f"{', '.join(fields)}: cannot change after Job {job['metadata']['name']} was created "
            "(restore the previous value, or delete and re-create the resource to run it again)"
        )


__all__ = ["Controller", "changed_fields"]
