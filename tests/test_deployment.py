"""The Dockerfile, the compose files and the Prometheus and Grafana files they mount: linted by the
real tools and checked against each other, since no Docker engine runs here to try them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.fast  # needs no engine: `make test-fast`

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # hadolint and docker-compose come with the test extra
PROMTOOL = Path(sys.prefix) / "prometheus/usr/bin/promtool"  # unpacked by `make prometheus`
GPU = ["-f", "docker-compose.yml"]
CPU = [*GPU, "-f", "docker-compose.cpu.yml"]


def run(*command) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"{command}:\n{result.stdout}{result.stderr}"
    return result


def compose_config(files: list[str]) -> dict:
    """The compose model as Docker Compose itself resolves it: schema-validated, files merged."""
    return json.loads(run(BIN / "docker-compose", *files, "config", "--format", "json").stdout)


def test_hadolint_passes_the_dockerfile():
    run(BIN / "hadolint", "Dockerfile")


def test_compose_files_validate_for_gpu_and_cpu_hosts():
    run(BIN / "docker-compose", *GPU, "config", "--quiet")
    run(BIN / "docker-compose", *CPU, "config", "--quiet")
    gpu = compose_config(GPU)["services"]["server"]
    cpu = compose_config(CPU)["services"]["server"]
    assert gpu["build"]["target"] == "gpu"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert cpu["build"]["target"] == "cpu"
    assert "deploy" not in cpu
    assert cpu["command"] == ["--enforce-eager"]  # no --model: the embedded model


def test_dockerfile_targets_are_the_ones_compose_builds():
    stages = [line.split()[-1] for line in (ROOT / "Dockerfile").read_text().splitlines()
              if line.startswith("FROM ")]
    assert stages == ["cpu", "router", "gpu"]  # gpu last: a plain `docker build .` gives the GPU image


def test_promtool_accepts_the_prometheus_config():
    run(PROMTOOL, "check", "config", "deploy/prometheus/prometheus.yml")


def mounts(service: dict) -> dict[str, str]:
    """Container path -> host path of a service's bind mounts."""
    return {v["target"]: v["source"] for v in service["volumes"] if v["type"] == "bind"}


def test_prometheus_and_grafana_files_fit_the_compose_services():
    config = compose_config(GPU)
    services = config["services"]

    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    [target] = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in services
    assert int(port) in [p["target"] for p in services[host]["ports"]]
    assert mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"] == \
        str(ROOT / "deploy/prometheus/prometheus.yml")

    grafana = mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == str(ROOT / "deploy/grafana/provisioning")
    provisioning = ROOT / "deploy/grafana/provisioning"
    [datasource] = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((provisioning / "dashboards/power-sampling-server.yml").read_text())["providers"]
    dashboards_dir = Path(grafana[provider["options"]["path"]])
    assert dashboards_dir == ROOT / "deploy/grafana/dashboards"

    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards_dir / Path(home).relative_to(provider["options"]["path"])).is_file()
    for path in dashboards_dir.glob("*.json"):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == datasource["uid"], (path.name, panel["title"])
