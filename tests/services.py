"""Real peer processes for the end-to-end tests: Redis, Orthanc, and Pleura's own node and worker.

Each runs on free loopback ports in a temporary folder and is stopped by the test that started it.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dicom_peers import free_port, port_open, wait_for  # noqa: F401  (re-exported for the end-to-end tests)

REPO = Path(__file__).resolve().parent.parent


def find_tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)
    if path is None:
        raise RuntimeError(f"{name} is not installed: run ./scripts/setup.sh (it installs the Debian packages)")
    return path


class Process:
    """A child process with its output in a log file, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.args, self.log = args, log
        self._log_handle = open(log, "ab")
        self.proc = subprocess.Popen(
            args, stdout=self._log_handle, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log_handle.close()


class RedisServer:
    def __init__(self, folder: Path):
        self.port = free_port()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.start()

    def start(self) -> None:
        """Start (again, after stop()) on the same port."""
        self.process = Process(
            [find_tool("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            self.folder / "redis.log",
        )
        wait_for(lambda: port_open(self.port), 20, "redis-server to listen")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.stop()


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """Orthanc, the open-source PACS, as the destination of Pleura's results, with its DICOMweb
    plugin (Debian package orthanc-dicomweb): a STOW-RS archive at `dicomweb_url`, and a DICOMweb
    client that pushes studies to the servers named with :meth:`add_dicomweb_server`."""

    def __init__(self, folder: Path, ae_title: str = "ORTHANC"):
        folder.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.dicom_port, self.http_port = free_port(), free_port()
        config = {
            "Name": "pleura-test-pacs",
            "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"),
            "DicomAet": ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": True,
            "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Servers": {}},
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.process = Process([find_tool("Orthanc"), str(folder / "orthanc.json")], folder / "orthanc.log")
        wait_for(lambda: self._http_ready(), 60, "Orthanc to answer over HTTP")

    def _http_ready(self) -> bool:
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            data = response.read()
            return json.loads(data) if response.headers.get_content_type() == "application/json" else data

    def send(self, method: str, path: str, body: object):
        """A PUT or POST of a JSON body (a str is sent as it is); the answer's JSON. An HTTP error
        raises, with Orthanc's words."""
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method,
            headers={"Content-Type": "text/plain" if isinstance(body, str) else "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                data = response.read()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"Orthanc answered {method} {path} with HTTP {exc.code}: {exc.read().decode()}") from None
        return json.loads(data) if data.strip() else None

    def add_modality(self, name: str, ae_title: str, port: int) -> None:
        """Make a DICOM peer on the loopback known to Orthanc, to push studies to."""
        self.send("PUT", f"/modalities/{name}", {"AET": ae_title, "Host": "127.0.0.1", "Port": port})

    def push_study(self, modality: str, study_instance_uid: str):
        """C-STORE every instance of the study to `modality` in one association (REST
        ``/modalities/<name>/store``, as a routing rule or a user's "send" does)."""
        found = [item["ID"] for item in self.send("POST", "/tools/lookup", study_instance_uid) if item["Type"] == "Study"]
        assert found, f"Orthanc holds no study {study_instance_uid}"
        return self.send("POST", f"/modalities/{modality}/store", {"Resources": found, "Synchronous": True})

    @property
    def dicomweb_url(self) -> str:
        """The base URL of Orthanc's DICOMweb services (STOW-RS at <url>/studies)."""
        if not DICOMWEB_PLUGIN.exists():
            raise RuntimeError("Orthanc's DICOMweb plugin is not installed: run ./scripts/setup.sh (orthanc-dicomweb)")
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def add_dicomweb_server(self, name: str, url: str, headers: dict[str, str] | None = None) -> None:
        """Make a DICOMweb server known to Orthanc, to push studies to by STOW-RS."""
        self.send("PUT", f"/dicom-web/servers/{name}", {"Url": url, "HttpHeaders": headers or {}})

    def stow_study(self, server: str, study_instance_uid: str):
        """STOW-RS every instance of the study to the DICOMweb `server` (REST
        ``/dicom-web/servers/<name>/stow``, as a user's "send to DICOMweb server" does)."""
        found = [item["ID"] for item in self.send("POST", "/tools/lookup", study_instance_uid) if item["Type"] == "Study"]
        assert found, f"Orthanc holds no study {study_instance_uid}"
        return self.send("POST", f"/dicom-web/servers/{server}/stow", {"Resources": found, "Synchronous": True})

    def instances(self) -> list[dict]:
        """Every stored instance's main tags (simplified)."""
        return [self.get(f"/instances/{iid}/simplified-tags") | {"_id": iid} for iid in self.get("/instances")]

    def download(self, instance_id: str, target: Path) -> Path:
        target.write_bytes(self.get(f"/instances/{instance_id}/file"))
        return target

    def stop(self) -> None:
        self.process.stop()


def write_config(path: Path, **values) -> Path:
    """A TOML settings file (the subset of TOML that Pleura's settings need). The node's metrics
    port is a free one unless given: the default (9464) may be held by another node on the host."""
    values.setdefault("metrics_port", free_port())
    lines, tables = [], []
    for key, value in values.items():
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            for item in value:  # destinations, api_users...: an array of tables
                tables.append(f"[[{key}]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in item.items()))
        else:
            lines.append(f"{key} = {json.dumps(str(value) if isinstance(value, Path) else value)}\n")
    path.write_text("".join(lines) + "\n".join(tables))
    return path


def pleura_process(
    command: str, config: Path, log: Path, extra_env: dict[str, str] | None = None, args: tuple[str, ...] = ()
) -> Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLEURA_")}
    env.update(extra_env or {})
    env["PYTHONUNBUFFERED"] = "1"
    return Process([sys.executable, "-m", "pleura.cli", command, *args, "--config", str(config)], log, env=env, cwd=REPO)


class MotoS3:
    """An S3-compatible object store on loopback (moto's server), with one bucket, for the shared
    storage of many hosts. `env` holds the credentials the processes that use it need."""

    env = {"AWS_ACCESS_KEY_ID": "pleura-test", "AWS_SECRET_ACCESS_KEY": "pleura-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}

    def __init__(self, bucket: str = "pleura-test"):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

        self.port, self.bucket = free_port(), bucket
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, **self._client_credentials()).create_bucket(Bucket=bucket)

    def _client_credentials(self) -> dict[str, str]:
        return {"aws_access_key_id": self.env["AWS_ACCESS_KEY_ID"], "region_name": self.env["AWS_DEFAULT_REGION"],
                "aws_secret_access_key": self.env["AWS_SECRET_ACCESS_KEY"]}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, prefix: str = "site") -> str:
        """A PLEURA_SHARED_STORAGE_URL for this store."""
        return f"s3://{self.bucket}/{prefix}?endpoint_url={self.endpoint}"

    def keys(self) -> list[str]:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, **self._client_credentials())
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def stop(self) -> None:
        self.server.stop()


class PostgresCluster:
    """A throw-away PostgreSQL server (the Debian binaries) on a free loopback port."""

    def __init__(self) -> None:
        debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"))  # Debian keeps them off PATH
        search = os.pathsep.join([os.environ.get("PATH", ""), *map(str, debian)])
        initdb, pg_ctl = shutil.which("initdb", path=search), shutil.which("pg_ctl", path=search)
        if not (initdb and pg_ctl):
            pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: run ./scripts/setup.sh")
        pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg is not installed")
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="pleura-pg-"))
        # PostgreSQL refuses to run as root: run it as the postgres user where we are root.
        self._as_owner: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self._as_owner = ["runuser", "-u", "postgres", "--"]
        data = self.folder / "data"
        self._run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run(
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(self.folder / "server.log"),
            "-w",
            "start",
            "-o",
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off",
        )
        self._pg_ctl, self._data = pg_ctl, data
        self._databases = 0

    def _run(self, *command: str) -> None:
        subprocess.run([*self._as_owner, *command], check=True, capture_output=True, timeout=60)

    def new_database_url(self) -> str:
        import psycopg

        self._databases += 1
        name = f"ledger{self._databases}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self._run(self._pg_ctl, "-D", str(self._data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


def http_get(url: str) -> tuple[int, str]:
    """(status, body) of a GET, error statuses included."""
    import urllib.error

    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric_sample(text: str, metric: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, or None when it is absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for entry in family.samples:
            if entry.name == metric and all(entry.labels.get(k) == v for k, v in labels.items()):
                return entry.value
    return None
