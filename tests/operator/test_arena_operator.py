"""An Evaluation's human arena on a cluster: the voting page's Deployment and Service (pure builders, valid
for the API server, restricted Pod Security, owned by the Evaluation), created by the reconcile once the
Evaluation succeeded, patched when they drift, deleted when ``arena.human`` is turned off, and the page's
ratings mirrored into ``status.results.human`` from a stand-in server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import copy
import http.server
import json
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from fake_api import FakeApi
from k8s_validate import assert_valid, restricted_problems

from lmforge_jobs.evaluate import human as page
from lmforge_jobs.manifest import parse_resource
from lmforge_operator import arena, builders, rbac
from lmforge_operator import status as status_helpers
from lmforge_operator.controller import Config, Controller, human_arena
from lmforge_operator.controller.workqueue import WorkQueue

NS = "ml"
OUTPUT = "s3://bucket/evals/chat"
EVAL: dict[str, Any] = {
    "model": {"alignmentRun": "chat-sft"},
    "judge": {
        "model": {"endpoint": {"url": "http://vllm.judges:8000/v1", "modelName": "judge"}},
        "reference": {"pretrainRun": "chat-base"},
        "prompts": "s3://bucket/prompts.jsonl",
    },
    "arena": {"opponents": [{"huggingface": "org/other"}], "human": {}},
    "output": OUTPUT,
}


def body(spec: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    doc = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "Evaluation",
        "metadata": {"name": "chat", "namespace": NS, "uid": "uid-chat", "generation": 1},
        "spec": copy.deepcopy(EVAL if spec is None else spec),
    }
    if status:
        doc["status"] = status
    return doc


def with_human(**fields: Any) -> dict[str, Any]:
    spec = copy.deepcopy(EVAL)
    spec["arena"]["human"] = fields
    return spec


def parsed(doc: dict[str, Any]) -> Any:
    resource, problems = parse_resource(doc, "Evaluation/chat")
    assert resource is not None, problems
    return resource


def built(spec: dict[str, Any] | None = None, results: str = OUTPUT, **kw: Any) -> tuple[dict, dict]:
    doc = body(spec)
    resource = parsed(doc)
    owner = builders.owner_reference(doc)
    deployment = arena.build_deployment(
        resource, owner, image="ghcr.io/lmforge/lmforge-jobs:1", results=results, **kw
    )
    return deployment, arena.build_service(resource, owner)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment)["env"]}


# ------------------------------------------------------------------------------------------------ builders
@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"database": {"name": "arena-db", "key": "url"}},
        {"storage": {"claimName": "votes"}, "rateLimit": 5},
    ],
)
def test_the_objects_are_valid_restricted_and_owned_by_the_evaluation(fields: dict[str, Any]) -> None:
    deployment, service = built(with_human(**fields))
    for obj in (deployment, service):
        assert_valid(obj)
        assert obj["metadata"]["name"] == "chat-arena"
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner["uid"] == "uid-chat" and owner["kind"] == "Evaluation" and owner["controller"] is True
    pod = deployment["spec"]["template"]["spec"]
    assert restricted_problems(pod, "spec.template.spec") == []
    c = container(deployment)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/tmp"]] == {"name": "tmp", "emptyDir": {}}
    for probe in ("startupProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert c["command"] == ["python", "-m", "lmforge_jobs.evaluate.human"]
    assert OUTPUT not in c["args"]  # spec strings travel in the environment, never in arguments
    assert env_of(deployment)["LMFORGE_ARENA_RESULTS"] == OUTPUT
    assert c["args"][c["args"].index("--rate-limit") + 1] == str(fields.get("rateLimit", 30))
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    # the Service reaches exactly the page's pods
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in c["ports"]


def test_the_evaluations_job_service_and_network_policy_never_select_the_page() -> None:
    deployment, _ = built()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    job_selector = builders.selector(parsed(body()))
    assert not job_selector.items() <= labels.items()


def test_database_by_secret_reference_else_sqlite_on_a_claim_else_an_empty_dir() -> None:
    postgres, _ = built(with_human(database={"name": "arena-db", "key": "url"}))
    assert env_of(postgres)["LMFORGE_ARENA_DB"] == {"secretKeyRef": {"name": "arena-db", "key": "url"}}
    assert "votes" not in {v["name"] for v in postgres["spec"]["template"]["spec"]["volumes"]}
    assert "arena-db" not in json.dumps(container(postgres)["args"])

    on_claim, _ = built(with_human(storage={"claimName": "arena-votes"}))
    assert env_of(on_claim)["LMFORGE_ARENA_DB"] == "sqlite:////var/lib/lmforge-arena/human-votes.sqlite"
    volumes = {v["name"]: v for v in on_claim["spec"]["template"]["spec"]["volumes"]}
    assert volumes["votes"]["persistentVolumeClaim"] == {"claimName": "arena-votes"}

    ephemeral, _ = built()
    volumes = {v["name"]: v for v in ephemeral["spec"]["template"]["spec"]["volumes"]}
    assert volumes["votes"] == {"name": "votes", "emptyDir": {}}
    assert {"name": "votes", "mountPath": "/var/lib/lmforge-arena"} in container(ephemeral)["volumeMounts"]


def test_results_on_a_claim_are_mounted_read_only_and_object_storage_settings_carried() -> None:
    from lmforge_jobs.spec import Storage

    defaults = Storage.model_validate(
        {"endpoint": "http://minio.storage:9000", "credentials": {"secretName": "s3-creds"}}
    )
    deployment, _ = built(results="pvc://evals/chat", storage=defaults)
    c = container(deployment)
    assert env_of(deployment)["LMFORGE_ARENA_RESULTS"] == "/mnt/lmforge/pvc/evals/chat"
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/mnt/lmforge/pvc/evals"]
    assert mount["readOnly"] is True
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert env_of(deployment)["LMFORGE_S3_ENDPOINT"] == "http://minio.storage:9000"
    assert_valid(deployment)


def test_only_image_pull_secrets_come_from_the_pod_templates() -> None:
    spec = copy.deepcopy(EVAL)
    spec["template"] = {
        "spec": {"imagePullSecrets": [{"name": "team"}], "nodeSelector": {"gpu": "h100"}},
    }
    defaults = {"spec": {"imagePullSecrets": [{"name": "registry"}], "tolerations": [{"key": "gpu"}]}}
    deployment, _ = built(spec, template_defaults=defaults)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "registry"}, {"name": "team"}]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert_valid(deployment)
    assert "imagePullSecrets" not in built()[0]["spec"]["template"]["spec"]


def test_the_digest_follows_the_spec() -> None:
    first, service = built()
    again, service_again = built()
    other, _ = built(with_human(rateLimit=7))
    digest = arena.ANNOTATION_DIGEST
    assert first["metadata"]["annotations"][digest] == again["metadata"]["annotations"][digest]
    assert first["metadata"]["annotations"][digest] != other["metadata"]["annotations"][digest]
    assert service["metadata"]["annotations"][digest] == service_again["metadata"]["annotations"][digest]


def test_disabled_or_absent_means_no_page() -> None:
    assert arena.human(parsed(body(with_human(enabled=False)))) is None
    spec = copy.deepcopy(EVAL)
    del spec["arena"]["human"]
    assert arena.human(parsed(body(spec))) is None
    with pytest.raises(ValueError, match=r"arena\.human"):
        built(spec)


def test_rbac_allows_what_the_arena_does() -> None:
    for verb in ("get", "create", "patch", "delete"):
        assert rbac.allows("apps", "deployments", verb)
        assert rbac.allows("", "services", verb)
    assert not rbac.allows("", "services", "proxy") and not rbac.allows("", "services/proxy", "get")


# -------------------------------------------------------------------------------------------- reconcile
def succeeded(spec: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """An Evaluation that succeeded for its generation (its Job's verdict kept)."""
    status: dict[str, Any] = {
        "results": {"judge": {"winRate": 0.7}},
        "outputs": {"results": f"{OUTPUT}/results.json"},
    }
    status_helpers.set_state(status, "Succeeded", status_helpers.JOB_SUCCEEDED, "done", 1)
    status["observedGeneration"] = 1
    status.update(extra)
    return body(spec, **status)


def reconcile(controller: Controller, doc: dict[str, Any]) -> dict[str, Any]:
    key = ("Evaluation", NS, "chat")
    controller.cache[key] = doc
    asyncio.run(controller.reconcile(doc))
    return controller.cache[key].get("status") or {}


@pytest.fixture
def controller() -> Controller:
    ctl = Controller(Config(storage="s3://store", image="ghcr.io/lmforge/lmforge-jobs:1"))
    ctl.api = FakeApi()  # type: ignore[assignment]
    return ctl


def leaderboard_json() -> dict[str, Any]:
    """What the real page answers at /leaderboard.json after three votes for the fine-tuned model."""
    items = [page.Item(f"i{k}", f"q{k}", "chat-sft", "chat-base", "good", "bad", "win") for k in range(3)]
    votes = [
        page.Vote(f"voter{k}", f"i{k}", f"q{k}", "chat-sft", "chat-base", "a", datetime.now(timezone.utc))
        for k in range(3)
    ]
    return json.loads(json.dumps(page.leaderboard(items, votes, bootstrap_samples=100), default=list))


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A stand-in voting page on 127.0.0.1 serving ``state["board"]`` (None: answers 503)."""
    state: dict[str, Any] = {"board": leaderboard_json(), "paths": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["paths"].append(self.path)
            if state["board"] is None:
                self.send_error(503)
                return
            data = json.dumps(state["board"]).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    port = server.server_address[1]
    monkeypatch.setattr(
        human_arena, "leaderboard_url", lambda resource, ns: f"http://127.0.0.1:{port}/leaderboard.json"
    )
    yield state
    server.shutdown()
    server.server_close()


def test_a_succeeded_evaluation_gets_its_page_and_the_ratings_are_mirrored(
    controller: Controller, stand_in: dict[str, Any]
) -> None:
    api: FakeApi = controller.api  # type: ignore[assignment]
    status = reconcile(controller, succeeded())
    assert status["phase"] == "Succeeded"
    deployment = api.objects[("Deployment", NS, "chat-arena")]
    assert api.objects[("Service", NS, "chat-arena")]["metadata"]["ownerReferences"][0]["uid"] == "uid-chat"
    assert container(deployment)["image"] == "ghcr.io/lmforge/lmforge-jobs:1"
    assert env_of(deployment)["LMFORGE_ARENA_RESULTS"] == OUTPUT
    assert status["humanArena"] == {"service": "chat-arena"}
    mirrored = status["results"]["human"]
    assert mirrored["votes"] == 3 and mirrored["agreement"] == 1.0
    assert mirrored["ratings"]["chat-sft"]["rating"] > mirrored["ratings"]["chat-base"]["rating"]
    assert status["results"]["judge"]["winRate"] == 0.7  # the job's results are kept
    assert stand_in["paths"] == ["/leaderboard.json"]
    assert [e["reason"] for e in api.events] == [human_arena.ARENA_CREATED]

    # again (the resync): nothing created or patched; new votes reach the status
    api.calls.clear()
    stand_in["board"]["votes"] = 4
    status = reconcile(controller, {**succeeded(), "status": status})
    assert [c for c in api.calls if c[0] in ("create", "delete") or c[:2] == ("patch", "Deployment")] == []
    assert status["results"]["human"]["votes"] == 4


def test_a_page_that_does_not_answer_changes_nothing(
    controller: Controller, stand_in: dict[str, Any]
) -> None:
    stand_in["board"] = None
    status = reconcile(controller, succeeded())
    assert status["phase"] == "Succeeded" and "human" not in status["results"]
    stand_in["board"] = {"models": "not a list"}
    status = reconcile(controller, {**succeeded(), "status": status})
    assert "human" not in status["results"]
    assert human_arena.human_results({"votes": 1, "models": [{"name": "x"}]}) is None


def test_a_changed_deployment_is_patched_back(controller: Controller, stand_in: dict[str, Any]) -> None:
    api: FakeApi = controller.api  # type: ignore[assignment]
    reconcile(controller, succeeded())
    stored = api.objects[("Deployment", NS, "chat-arena")]
    wanted = copy.deepcopy(stored)
    stored["metadata"]["annotations"][arena.ANNOTATION_DIGEST] = "stale"
    stored["spec"]["replicas"] = 3
    api.calls.clear()
    reconcile(controller, succeeded())
    assert ("patch", "Deployment", "chat-arena") in api.calls
    assert api.objects[("Deployment", NS, "chat-arena")]["spec"] == wanted["spec"]


def test_no_page_before_success_nor_for_evaluations_without_one(
    controller: Controller, stand_in: dict[str, Any]
) -> None:
    api: FakeApi = controller.api  # type: ignore[assignment]
    status = reconcile(controller, body())  # a fresh one, waiting for the models it compares
    assert status["phase"] == "Waiting"
    assert not [k for k in api.objects if k[0] == "Deployment"] and "humanArena" not in status

    spec = copy.deepcopy(EVAL)
    del spec["arena"]["human"]
    api.calls.clear()
    reconcile(controller, succeeded(spec))
    assert not [c for c in api.calls if c[1] in ("Deployment", "Service")]  # not even a look
    assert stand_in["paths"] == []


def test_turning_the_page_off_deletes_it_and_keeps_the_ratings(
    controller: Controller, stand_in: dict[str, Any]
) -> None:
    api: FakeApi = controller.api  # type: ignore[assignment]
    status = reconcile(controller, succeeded())
    doc = succeeded(with_human(enabled=False))
    doc["status"] = status
    status = reconcile(controller, doc)
    assert ("Deployment", NS, "chat-arena") not in api.objects
    assert ("Service", NS, "chat-arena") not in api.objects
    assert "humanArena" not in status and status["results"]["human"]["votes"] == 3
    assert status["phase"] == "Succeeded"


def test_another_owners_deployment_is_neither_adopted_nor_deleted(
    controller: Controller, stand_in: dict[str, Any]
) -> None:
    api: FakeApi = controller.api  # type: ignore[assignment]
    foreign = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "chat-arena", "ownerReferences": [{"uid": "someone-else", "controller": True}]},
        "spec": {},
    }
    api.objects[("Deployment", NS, "chat-arena")] = foreign
    status = reconcile(controller, succeeded())
    assert status["phase"] == "Succeeded"
    assert api.objects[("Deployment", NS, "chat-arena")] == foreign
    doc = succeeded(with_human(enabled=False))
    doc["status"] = {**status, "humanArena": {"service": "chat-arena"}}
    reconcile(controller, doc)
    assert api.objects[("Deployment", NS, "chat-arena")] == foreign


def test_turning_the_page_on_or_off_is_not_a_spec_change_of_the_evaluation() -> None:
    job = {"metadata": {"name": "chat-evaluate", "annotations": {}}}
    without = copy.deepcopy(EVAL)
    del without["arena"]["human"]
    Controller._annotate(job, parsed(body(without)), {})
    assert Controller.spec_changed(job, parsed(body(with_human(rateLimit=3)))) is None
    assert Controller.spec_changed(job, parsed(body(with_human(enabled=False)))) is None
    other = copy.deepcopy(without)
    other["judge"]["maxNewTokens"] = 64
    assert "spec.judge.maxNewTokens" in (Controller.spec_changed(job, parsed(body(other))) or "")


def test_an_evaluation_with_a_page_is_resynced_after_it_succeeded() -> None:
    key = ("Evaluation", NS, "chat")
    assert WorkQueue.needs_resync(key, succeeded())
    assert not WorkQueue.needs_resync(key, succeeded(with_human(enabled=False)))
    spec = copy.deepcopy(EVAL)
    del spec["arena"]["human"]
    assert not WorkQueue.needs_resync(key, succeeded(spec))


# ------------------------------------------------------------------------------- through the API server
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_through_the_api_server_the_page_follows_the_evaluation(stand_in: dict[str, Any]) -> None:
    """kmock and the operator (kopf): the Job succeeds, the page appears with the ratings in the status,
    a rate-limit change patches it without a new Job, ``enabled: false`` removes it; every call allowed."""
    from kmock_harness import Cluster, Operator, assert_rbac

    spec = copy.deepcopy(EVAL)
    spec["model"] = {"huggingface": "org/chat-sft"}
    spec["judge"]["reference"] = {"huggingface": "org/chat-base"}
    ns = "arena"
    with Cluster() as cluster, Operator(cluster, ns):
        cluster.create(body(spec) | {"metadata": {"name": "chat"}}, ns)
        cluster.wait_job("chat-evaluate", ns)
        cluster.add_pod("chat-evaluate", namespace=ns, termination={"state": "Succeeded", "results": {}})
        cluster.finish_job("chat-evaluate", ns)
        deployment = cluster.wait(lambda: cluster.get("Deployment", "chat-arena", ns), what="the Deployment")
        cluster.wait(lambda: cluster.get("Service", "chat-arena", ns), what="the Service")
        (owner,) = deployment["metadata"]["ownerReferences"]
        evaluation = cluster.get("Evaluation", "chat", ns)
        assert (
            evaluation is not None and owner["uid"] == evaluation["metadata"]["uid"] and owner["controller"]
        )
        status = cluster.wait(
            lambda: (s := cluster.status("Evaluation", "chat", ns)).get("results", {}).get("human") and s,
            what="the mirrored ratings",
        )
        assert status["phase"] == "Succeeded" and status["results"]["human"]["votes"] == 3

        rate = {"spec": {"arena": {"human": {"rateLimit": 5}}}, "metadata": {"generation": 2}}
        cluster.patch("Evaluation", "chat", rate, ns)
        cluster.wait(
            lambda: "5" in container(cluster.get("Deployment", "chat-arena", ns) or deployment)["args"],
            what="the patched Deployment",
        )
        status = cluster.wait_phase("Evaluation", "chat", "Succeeded", ns)
        assert cluster.job_names(ns) == ["chat-evaluate"]  # not re-run

        off = {"spec": {"arena": {"human": {"enabled": False}}}, "metadata": {"generation": 3}}
        cluster.patch("Evaluation", "chat", off, ns)
        cluster.wait(lambda: cluster.get("Deployment", "chat-arena", ns) is None, what="the page removed")
        assert cluster.get("Service", "chat-arena", ns) is None
        assert cluster.status("Evaluation", "chat", ns)["phase"] == "Succeeded"
        assert_rbac(cluster)
