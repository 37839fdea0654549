"""References between resources, resolved into concrete URIs before a job runs.

Jobs never look another resource up. The operator (into the ConfigMap it mounts) and ``lmforge run`` (into a
file) hand each job a *resolved* manifest: every reference by name replaced with URIs taken from the
referenced resource's ``status.outputs``, and ``spec.output`` filled in. The rewrites:

===========================================  ===============================================================
reference                                    resolved form
===========================================  ===============================================================
PretrainRun ``corpus: {name}``               ``data: {tokens, heldOut, tokenizer}`` from the Corpus outputs
ModelRef ``pretrainRun`` / ``alignmentRun``  ``{path: outputs.model}`` (AlignmentRun base and rewardModel,
                                             Evaluation model, judge.reference, arena.opponents)
ModelRef ``sweep``                           ``{path: outputs.model}`` of the Sweep: its best trial's model
Evaluation ``perplexity.corpus``             ``perplexity.data: <Corpus outputs.heldOut>``
Evaluation ``checkpoints: every``            also ``checkpointDir: <PretrainRun outputs.checkpoint>``
===========================================  ===============================================================

Where each kind puts its results (``expected_outputs``) is a function of ``spec.output`` alone, so the
operator can fill ``status.outputs`` without reading the job's storage.

This module is pure and import-light: the operator uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, TypeVar

from lmforge_jobs.kinds import KINDS, STUDY_LABEL, SWEEP_LABEL
from lmforge_jobs.manifest import Resource
from lmforge_jobs.spec import FieldError, ModelRef

Ref = tuple[str, str]  # (kind, name)
N = TypeVar("N", bound=Hashable)

# Where the dependency must be before a dependent may start: "Succeeded" for everything except an
# Evaluation with checkpoints: every, which follows its PretrainRun while it runs.
NEEDS_SUCCEEDED = "Succeeded"
NEEDS_RUNNING = "Running"


class UnresolvedReference(FieldError, ValueError):
    """A reference whose target has no outputs (yet); ``field`` is the spec path, ``ref`` the target."""

    def __init__(self, field: str, ref: Ref, message: str):
        super().__init__(field, message)
        self.ref = ref


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def default_output(kind: str, name: str, root: str, namespace: str | None = None) -> str:
    """``<root>[/<namespace>]/<kind-lower>/<name>``: where a resource's results go when spec.output is unset."""
    parts = [namespace] if namespace else []
    return _join(root, *parts, KINDS[kind].singular, name)


def expected_outputs(kind: str, output: str, spec: Any = None) -> dict[str, str]:
    """status.outputs (camelCase) of a resource of ``kind`` whose spec.output is ``output``."""
    if kind == "Corpus":
        return {
            "documents": _join(output, "documents"),
            "tokens": _join(output, "tokens", "train"),
            "heldOut": _join(output, "tokens", "held-out"),
            "tokenizer": _join(output, "tokenizer"),
            "stats": _join(output, "stats.json"),
        }
    if kind == "PretrainRun":
        model = _join(output, "model")
        return {"checkpoint": _join(output, "checkpoints"), "model": model, "tokenizer": model}
    if kind == "AlignmentRun":
        outputs = {"model": _join(output, "model")}
        if spec is not None and getattr(spec, "peft", None) is not None:
            outputs["adapter"] = _join(output, "adapter")
        return outputs
    if kind == "Evaluation":
        return {"results": _join(output, "results.json")}
    raise ValueError(f"unknown kind {kind!r}")


def _model_refs(resource: Resource[Any, Any]) -> list[tuple[str, ModelRef]]:
    """(field path, ModelRef) of every model reference in the spec."""
    spec = resource.spec
    found: list[tuple[str, ModelRef]] = []
    if resource.kind == "AlignmentRun":
        found.append(("base", spec.base))
        if spec.reward_model is not None:
            found.append(("rewardModel", spec.reward_model))
        if spec.synthetic is not None:
            found.append(("synthetic.teacher", spec.synthetic.teacher))
    elif resource.kind == "Evaluation":
        found.append(("model", spec.model))
        if spec.judge is not None:
            found.append(("judge.reference", spec.judge.reference))
        if spec.arena is not None:
            found.extend((f"arena.opponents[{i}]", ref) for i, ref in enumerate(spec.arena.opponents))
    return found


def dependencies(resource: Resource[Any, Any]) -> list[tuple[str, Ref, str]]:
    """(field path, (kind, name), the phase the target must reach) for every reference in the spec."""
    if resource.kind == "Sweep":  # its trials' references: the template's
        template = trial_resource(resource, resource.name, {})
        return [(f"template.spec.{field}", ref, needs) for field, ref, needs in dependencies(template)]
    if resource.kind == "ScalingStudy":  # its points' references: the template's
        template = point_resource(resource, resource.name, {}, 1)
        return [(f"template.{field}", ref, needs) for field, ref, needs in dependencies(template)]
    spec = resource.spec
    deps: list[tuple[str, Ref, str]] = []
    if resource.kind == "PretrainRun" and spec.corpus is not None:
        deps.append(("corpus", ("Corpus", spec.corpus.name), NEEDS_SUCCEEDED))
    for field, ref in _model_refs(resource):
        target = ref.reference()
        if target is None:
            continue
        follows = resource.kind == "Evaluation" and field == "model" and spec.checkpoints.value == "every"
        deps.append((field, target, NEEDS_RUNNING if follows else NEEDS_SUCCEEDED))
    if resource.kind == "Evaluation" and spec.perplexity is not None and spec.perplexity.corpus is not None:
        deps.append(("perplexity.corpus", ("Corpus", spec.perplexity.corpus.name), NEEDS_SUCCEEDED))
    return deps


def trial_resource(sweep: Resource[Any, Any], name: str, parameters: dict[str, Any]) -> Resource[Any, Any]:
    """A Sweep's trial ``name``: its template with ``parameters`` (path → value) written in, its output
    ``<sweep spec.output>/<name>`` when the sweep sets one (else the trial kind's default)."""
    from lmforge_jobs.manifest import MODELS
    from lmforge_jobs.sweep.config import apply_parameters

    template = sweep.spec.template
    spec = apply_parameters(template.spec, parameters)
    if sweep.spec.output is not None:
        spec["output"] = _join(str(sweep.spec.output), name)
    else:
        spec.pop("output", None)  # each trial its own folder, never the template's shared one
    metadata = {"name": name, "labels": {SWEEP_LABEL: sweep.name}}
    if sweep.metadata.namespace:
        metadata["namespace"] = sweep.metadata.namespace
    document = {"apiVersion": sweep.api_version, "kind": template.kind, "metadata": metadata, "spec": spec}
    return MODELS[template.kind].model_validate(document)


def point_resource(
    study: Resource[Any, Any], name: str, shape: dict[str, Any], tokens: int
) -> Resource[Any, Any]:
    """A ScalingStudy's point ``name``: a PretrainRun, its template with ``shape`` in its model and
    ``budget: {tokens}``, its output ``<study spec.output>/<name>`` when the study sets one (else the
    PretrainRun default)."""
    from lmforge_jobs.manifest import MODELS
    from lmforge_jobs.scaling_study import point_spec

    spec = point_spec(study.spec.template, shape, tokens)
    if study.spec.output is not None:
        spec["output"] = _join(str(study.spec.output), name)
    else:
        spec.pop("output", None)  # each point its own folder, never the template's shared one
    metadata = {"name": name, "labels": {STUDY_LABEL: study.name}}
    if study.metadata.namespace:
        metadata["namespace"] = study.metadata.namespace
    document = {"apiVersion": study.api_version, "kind": "PretrainRun", "metadata": metadata, "spec": spec}
    return MODELS["PretrainRun"].model_validate(document)


def references(resource: Resource[Any, Any]) -> list[Ref]:
    """The (kind, name) of every resource this one refers to, without repeats, in spec order."""
    seen: list[Ref] = []
    for _, ref, _ in dependencies(resource):
        if ref not in seen:
            seen.append(ref)
    return seen


def dependency_order(roots: Iterable[N], needs: Callable[[N], Iterable[N]]) -> tuple[list[N], list[list[N]]]:
    """Every node reachable from ``roots``, each after the nodes it ``needs`` (depth first, roots and needs
    in the order given), and the cycles met on the way, each a path ``[n, …, n]``.

    ``lmforge run`` runs a manifest set in this order and refuses it for its first cycle; the operator
    refuses a resource on a cycle (DependencyCycle). Every cycle through a root is among those reported: the
    root stays on the path while everything reachable from it is visited.
    """
    ordered: list[N] = []
    cycles: list[list[N]] = []
    done: set[N] = set()
    for root in roots:
        if root in done:
            continue
        path = [root]  # the nodes being visited, each needing the next
        pending = [iter(list(needs(root)))]  # the needs of each node on the path not looked at yet
        while path:
            for node in pending[-1]:
                if node in path:
                    cycles.append([*path[path.index(node) :], node])
                elif node not in done:
                    path.append(node)
                    pending.append(iter(list(needs(node))))
                    break
            else:  # every need of path[-1] is done: it comes next
                pending.pop()
                done.add(path[-1])
                ordered.append(path.pop())
    return ordered, cycles


def unresolved(resource: Resource[Any, Any]) -> list[str]:
    """Spec field paths that still hold a reference by name (a job refuses to start with any)."""
    return [field for field, _, _ in dependencies(resource)]


def resolve(
    resource: Resource[Any, Any],
    outputs_by_ref: Mapping[Ref, Mapping[str, Any]],
    default_output_uri: str,
) -> Resource[Any, Any]:
    """A copy of ``resource`` with every reference replaced by URIs and spec.output filled in.

    ``outputs_by_ref`` maps (kind, name) to that resource's status.outputs (camelCase). Raises
    UnresolvedReference when a needed output is missing.
    """
    doc = resource.model_dump(by_alias=True, exclude_none=True, mode="json")
    spec = doc["spec"]

    def outputs_of(field: str, ref: Ref, key: str) -> str:
        value = (outputs_by_ref.get(ref) or {}).get(key)
        if not value:
            raise UnresolvedReference(field, ref, f"{ref[0]}/{ref[1]} has no outputs.{key} yet")
        return str(value)

    def model_path(field: str, ref_doc: dict[str, Any], ref: ModelRef) -> None:
        target = ref.reference()
        if target is None:
            return
        path = outputs_of(field, target, "model")
        for key in ("pretrainRun", "alignmentRun", "sweep"):
            ref_doc.pop(key, None)
        ref_doc["path"] = path

    kind = resource.kind
    if kind == "PretrainRun" and resource.spec.corpus is not None:
        ref = ("Corpus", resource.spec.corpus.name)
        data = {
            "tokens": outputs_of("corpus", ref, "tokens"),
            "tokenizer": outputs_of("corpus", ref, "tokenizer"),
        }
        held_out = (outputs_by_ref.get(ref) or {}).get("heldOut")
        if held_out:
            data["heldOut"] = str(held_out)
        spec.pop("corpus")
        spec["data"] = data
    for field, ref in _model_refs(resource):
        node = spec
        for part in field.replace("]", "").replace("[", ".").split("."):
            node = node[int(part)] if part.isdigit() else node[part]
        if kind == "Evaluation" and field == "model" and resource.spec.checkpoints.value == "every":
            target = ref.reference()
            assert target is not None  # the spec's own rule: every needs model.pretrainRun
            spec["checkpointDir"] = outputs_of(field, target, "checkpoint")
        model_path(field, node, ref)
    if kind == "Evaluation" and resource.spec.perplexity is not None:
        corpus = resource.spec.perplexity.corpus
        if corpus is not None:
            ref = ("Corpus", corpus.name)
            spec["perplexity"].pop("corpus")
            spec["perplexity"]["data"] = outputs_of("perplexity.corpus", ref, "heldOut")
    spec.setdefault("output", default_output_uri)
    return type(resource).model_validate(doc)


__all__ = [
    "UnresolvedReference",
    "default_output",
    "dependencies",
    "dependency_order",
    "expected_outputs",
    "references",
    "resolve",
    "unresolved",
]
