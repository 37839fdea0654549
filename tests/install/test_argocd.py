"""Argo CD health checks (charts/lmforge/argocd/health.lua) run in a real Lua interpreter (lupa).

Argo CD hands the script the live object as the global ``obj`` and reads ``{status, message}`` back;
Healthy on Succeeded, Progressing while Running or Waiting (or before the operator has written a status
for the current generation), Degraded on Failed or Invalid.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from lupa.lua51 import LuaRuntime  # Argo CD runs health checks in gopher-lua, a Lua 5.1
from repo import ROOT

from lmforge_jobs.spec import Condition, Phase, derive_phase

ARGOCD = ROOT / "charts" / "lmforge" / "argocd"
SCRIPT = (ARGOCD / "health.lua").read_text()
KINDS = ("Corpus", "PretrainRun", "AlignmentRun", "Evaluation", "Sweep", "ScalingStudy")
HEALTH_OF_PHASE = {
    Phase.pending: "Progressing",
    Phase.waiting: "Progressing",
    Phase.running: "Progressing",
    Phase.succeeded: "Healthy",
    Phase.failed: "Degraded",
    Phase.invalid: "Degraded",
}


def health(obj: dict[str, Any], script: str = SCRIPT) -> dict[str, str]:
    """Run an Argo CD health script the way Argo CD does: ``obj`` global, a table returned."""
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(script)
    return {"status": result["status"], "message": result["message"]}


def cond(ctype: str, status: str = "True", reason: str = "Reason", message: str = "", generation: int = 1):
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
        "observedGeneration": generation,
    }


def resource(kind: str = "PretrainRun", status: dict[str, Any] | None = None, generation: int = 1):
    obj: dict[str, Any] = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "run", "namespace": "team-a", "generation": generation},
        "spec": {},
    }
    if status is not None:
        obj["status"] = status
    return obj


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ([], "Progressing"),
        ([cond("Waiting", reason="QueueNotAdmitted")], "Progressing"),
        ([cond("Running", reason="JobRunning")], "Progressing"),
        ([cond("Running", "False"), cond("Succeeded", reason="JobSucceeded")], "Healthy"),
        ([cond("Failed", reason="BackoffLimitExceeded", message="pod OOMKilled")], "Degraded"),
        (
            [cond("Invalid", reason="SpecInvalid", message="spec.model.kvHeads: must divide heads")],
            "Degraded",
        ),
        # Precedence: a failure wins over an earlier Running that was not cleared.
        ([cond("Running"), cond("Failed")], "Degraded"),
        ([cond("Succeeded"), cond("Invalid")], "Degraded"),
        ([cond("Ready", reason="Admitted")], "Progressing"),
    ],
)
def test_health_per_condition(kind: str, conditions: list[dict[str, Any]], expected: str) -> None:
    status = {"observedGeneration": 1, "conditions": conditions}
    assert health(resource(kind, status))["status"] == expected


def test_no_status_yet_is_progressing() -> None:
    result = health(resource())
    assert result["status"] == "Progressing" and "operator" in result["message"]


def test_message_carries_reason_and_message() -> None:
    status = {"conditions": [cond("Invalid", reason="SpecInvalid", message="spec.batch: not divisible")]}
    assert health(resource(status=status)) == {
        "status": "Degraded",
        "message": "SpecInvalid: spec.batch: not divisible",
    }


def test_status_of_an_older_generation_is_progressing() -> None:
    """After a spec edit, a Succeeded from the previous generation must not read as Healthy."""
    status = {"observedGeneration": 1, "conditions": [cond("Succeeded", generation=1)]}
    assert health(resource(status=status, generation=2))["status"] == "Progressing"
    # Conditions of an older generation are ignored even when status.observedGeneration is absent.
    assert health(resource(status={"conditions": [cond("Failed", generation=1)]}, generation=2))[
        "status"
    ] == ("Progressing")
    assert health(resource(status=status, generation=1))["status"] == "Healthy"


@pytest.mark.parametrize("phase", list(Phase))
def test_phase_only_fallback(phase: Phase) -> None:
    assert health(resource(status={"phase": phase.value}))["status"] == HEALTH_OF_PHASE[phase]


def test_agrees_with_derive_phase_on_every_combination() -> None:
    """For every set of True conditions, the health is what the printer column's phase implies."""
    types = ["Waiting", "Running", "Succeeded", "Failed", "Invalid"]
    for mask in range(1 << len(types)):
        conditions = [cond(t) for i, t in enumerate(types) if mask >> i & 1]
        phase = derive_phase([Condition.model_validate(c) for c in conditions])
        status = {"observedGeneration": 1, "conditions": conditions, "phase": phase.value}
        assert health(resource(status=status))["status"] == HEALTH_OF_PHASE[phase], conditions


def test_argocd_cm_snippet_ships_the_script_for_every_kind() -> None:
    import kubernetes_validate

    cm = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())
    kubernetes_validate.validate(cm, kubernetes_validate.utils.latest_version(), strict=True)
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    from crdcheck import generated_crd_files

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd_kinds = sorted(
        yaml.load(text, Loader=loader)["spec"]["names"]["kind"] for text in generated_crd_files().values()
    )
    assert crd_kinds == sorted(KINDS)
    assert sorted(cm["data"]) == sorted(f"resource.customizations.health.lmforge.io_{k}" for k in KINDS)
    for key, script in cm["data"].items():
        assert script == SCRIPT, f"{key} differs from health.lua"


def test_a_broken_script_is_noticed() -> None:
    """The harness really runs the Lua: a script with the Healthy/Degraded mapping swapped fails the cases."""
    swapped = SCRIPT.replace('status = "Healthy"', 'status = "Degraded"')
    status = {"conditions": [cond("Succeeded")]}
    assert health(resource(status=status), swapped)["status"] == "Degraded"


def test_application_installs_the_chart() -> None:
    app = yaml.safe_load((ARGOCD / "application.yaml").read_text())
    assert app["apiVersion"] == "argoproj.io/v1alpha1" and app["kind"] == "Application"
    source = app["spec"]["source"]
    assert (ROOT / source["path"] / "Chart.yaml").is_file()
    values = yaml.safe_load((ROOT / source["path"] / "values.yaml").read_text())
    assert set(source["helm"]["valuesObject"]) <= set(values)  # keys the strict schema accepts
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]


def test_statuses_the_operator_writes() -> None:
    """Statuses built by the operator's own status code, through a run's life, read as expected."""
    from lmforge_operator import status as st

    status: dict[str, Any] = {}
    for true, running, expected in (
        ("Waiting", False, "Progressing"),  # a reference not ready, or queued in Kueue
        ("Running", False, "Progressing"),
        ("Waiting", True, "Progressing"),  # an Evaluation between checkpoints
        ("Succeeded", False, "Healthy"),
        ("Failed", False, "Degraded"),
        ("Invalid", False, "Degraded"),
    ):
        phase = st.set_state(status, true, "SomeReason", "details", generation=3, running=running)
        assert (
            health(resource(status=status, generation=3))["status"]
            == expected
            == HEALTH_OF_PHASE[Phase(phase)]
        )
    # The user edits the spec: until the operator acts on generation 4, the old verdict does not count.
    assert health(resource(status=status, generation=4))["status"] == "Progressing"
