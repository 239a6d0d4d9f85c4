"""deploy/k8s: every overlay, as `kubectl kustomize` renders it, is valid Kubernetes (the API's own
schemas, strictly: no unknown fields); the server container's arguments and environment parse with
the server's own parser; the probes are the server's routes; and the names and labels that tie
the objects together agree."""

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server.__main__ import parse_args

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.32.0"  # the oldest release still maintained upstream at the time of writing


def rendered(kustomization: Path) -> dict[tuple[str, str], dict]:
    out = subprocess.run(["kubectl", "kustomize", str(kustomization)], check=True, capture_output=True, text=True)
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(out.stdout)}


@pytest.fixture(params=sorted(path.name for path in (K8S / "overlays").iterdir()))
def manifests(request) -> dict[tuple[str, str], dict]:
    return rendered(K8S / "overlays" / request.param)


def test_every_object_is_valid_kubernetes(manifests):
    for doc in manifests.values():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert {kind for kind, _ in manifests} >= {"Deployment", "Service", "PodDisruptionBudget", "ServiceAccount",
                                             "Role", "RoleBinding"}


def test_the_server_container_runs_the_server_as_its_parser_reads_it(manifests):
    from server.app import create_app
    from server.state import EngineState

    pod = manifests[("Deployment", "powerserve")]["spec"]["template"]["spec"]
    [server] = pod["containers"]
    environ = {e["name"]: e["value"] for e in server["env"]}
    args = parse_args(server.get("args", []), environ)
    # The kubelet waits out the drain, and the engine's shutdown after it.
    assert pod["terminationGracePeriodSeconds"] >= args.drain_timeout + 10
    routes = {route.path for route in create_app(EngineState("m", "m"), lambda: None).routes}
    assert server["readinessProbe"]["httpGet"]["path"] == "/health" in routes
    assert server["livenessProbe"]["httpGet"]["path"] == "/health/live" in routes
    assert server["ports"][0]["containerPort"] == 8000


def test_names_and_labels_tie_the_objects_together(manifests):
    server = manifests[("Deployment", "powerserve")]
    labels = server["spec"]["template"]["metadata"]["labels"]
    for selector in (manifests[("Service", "powerserve")]["spec"]["selector"],
                     manifests[("PodDisruptionBudget", "powerserve")]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    router = manifests[("Deployment", "powerserve-router")]["spec"]["template"]["spec"]
    args = router["containers"][0]["args"]
    assert args[args.index("--selector") + 1] == "app.kubernetes.io/name=" + labels["app.kubernetes.io/name"]
    assert "--service-discovery-port=8000" in args
    assert "--disable-retries" in args  # else a 504 (a deadline passed) would be run again
    binding = manifests[("RoleBinding", "powerserve-router")]
    assert binding["subjects"][0]["name"] == router["serviceAccountName"]
    assert manifests[("Role", binding["roleRef"]["name"])]["rules"][0]["resources"] == ["pods"]


def test_the_autoscaling_overlay_scales_the_servers_by_waiting_requests():
    autoscaler = rendered(K8S / "overlays" / "cpu-autoscaling")[("HorizontalPodAutoscaler", "powerserve")]
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == "powerserve"
    [metric] = autoscaler["spec"]["metrics"]
    # The server's own gauge (server/metrics.py), as the custom metrics API would serve it.
    from server.metrics import QUEUED

    assert metric["pods"]["metric"]["name"] == QUEUED._name == "powerserve_requests_queued"
