"""docker-compose.yml and the Dockerfile, checked structurally (no Docker engine needed)."""

from pathlib import Path

import pytest
import yaml

from streamlearn.cli import COMMANDS, UsageError, build_parser
from streamlearn.config import ServeSettings, TrainSettings

ROOT = Path(__file__).parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
STREAMLEARN_SERVICES = ("trainer", "server", "producer")
SETTINGS = {f"STREAMLEARN_{name.upper()}" for model, _, _ in COMMANDS.values() for name in model.model_fields}


def test_every_part_of_the_deployment_is_there():
    assert {"kafka", "create-topic", "trainer", "server", "producer", "prometheus", "grafana"} <= set(
        SERVICES
    )
    assert SERVICES["producer"]["profiles"] == ["demo"]


@pytest.mark.parametrize("name", ["kafka", "server", "prometheus", "grafana"])
def test_long_running_services_have_healthchecks(name):
    assert SERVICES[name]["healthcheck"]["test"]


def test_every_image_is_pinned():
    for name, service in SERVICES.items():
        image = service.get("image") or COMPOSE["x-streamlearn"]["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: {image}"
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")


def test_snapshots_are_written_by_the_trainer_and_only_read_by_the_server():
    assert "snapshots:/snapshots" in SERVICES["trainer"]["volumes"]
    assert "snapshots:/snapshots:ro" in SERVICES["server"]["volumes"]


def test_every_streamlearn_variable_is_a_real_setting():
    for name, service in SERVICES.items():
        for variable in service.get("environment", {}):
            if variable.startswith("STREAMLEARN_") and not variable.startswith("STREAMLEARN_KAFKA_"):
                assert variable in SETTINGS, f"{name}: {variable} is no setting"


@pytest.mark.parametrize("name", STREAMLEARN_SERVICES)
def test_service_commands_parse_as_streamlearn_commands(name):
    try:
        build_parser().parse_args(SERVICES[name]["command"])
    except UsageError as exc:
        pytest.fail(f"{name}: {exc}")


def test_published_ports_match_the_defaults_and_stay_on_loopback():
    ports = {name: service.get("ports", []) for name, service in SERVICES.items()}
    assert ports["server"] == [f"127.0.0.1:{ServeSettings.model_fields['port'].default}:8000"]
    assert ports["trainer"] == [f"127.0.0.1:{TrainSettings.model_fields['metrics_port'].default}:9101"]
    assert all(port.startswith("127.0.0.1:") for published in ports.values() for port in published)


def test_mounted_files_exist():
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source}"


def test_the_image_runs_as_an_ordinary_user_with_cpu_torch_first():
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert dockerfile.index('"$TORCH_SPEC"') < dockerfile.index("pip install .")
    assert 'ENTRYPOINT ["streamlearn"]' in dockerfile
    assert ".venv" in (ROOT / ".dockerignore").read_text()
