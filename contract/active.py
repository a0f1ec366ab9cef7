"""Which model bundle analyses each kind of input now: the read side of the model registry.

A registry is a directory (``<storage_dir>/models`` by default, or ``PLEURA_MODEL_REGISTRY_DIR``)::

    registry.json                     the state: active version per kind, rollback stack, history,
                                      and per version its files' SHA-256, metrics and provenance
    .registry.lock                    taken while the state is read-modified-written
    versions/<name>/<version>/        an imported bundle, never changed after import
    workers/<host>-<pid>.<kind>.json  what each worker has loaded, and its last loading error
    demo/                             the synthetic demo bundle (`pleura demo-model`): the active
                                      radiograph model while nothing has been promoted
    ct-demo/                          the synthetic CT demo bundle: the active CT model while no CT
                                      version has been promoted

This module reads it: :func:`active_bundle_dir` is the one place where "which model runs" is
decided, for the worker before each task and for the commands alike. Changing it (import, promote,
rollback, export) is ``training/registry.py``'s :class:`~training.registry.Registry`, which writes
the state under the lock to a temporary file that replaces ``registry.json`` (rename is atomic), so
a reader never sees half a state. Workers on other hosts share the directory (it lives in the
shared storage).

A bundle is checked on import, on promote and rollback, and again when a worker loads it
(:func:`validate_bundle`): its manifest, the checksums recorded at import, the kind of input it is
made for, and the networks themselves, built from the manifest with their weights loaded. A bundle
that fails is refused with the reason and the active model stays as it was.

``PLEURA_MODEL_BUNDLE_DIR`` names one bundle directory instead: that bundle is the fixed model, and
promote/rollback refuse (there is no registry to change). The deprecated ``PLEURA_MODEL_DIR`` names
either, as before: a bundle when the folder holds ``manifest.json``, else a registry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field, ValidationError

from contract.bundle import MANIFEST_NAME, Bundle, BundleError, BundleKind, load_bundle

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = [
    "KINDS",
    "RegistryError",
    "RegistryLayout",
    "VersionRecord",
    "active_bundle_dir",
    "ct_demo_bundle_dir",
    "demo_bundle_dir",
    "find_version_record",
    "fixed_bundle_dir",
    "is_ct_demo_dir",
    "is_registered_version",
    "registry_root",
    "validate_bundle",
    "worker_reports_root",
]

STATE_NAME = "registry.json"
LOCK_NAME = ".registry.lock"
VERSIONS_DIR = "versions"
WORKERS_DIR = "workers"
DEMO_DIR = "demo"
CT_DEMO_DIR = "ct-demo"
RECORD_NAME = "registry-record.json"
"""Written beside the bundle files by ``export``: the version's record (checksums, metrics,
provenance), so an import elsewhere checks the files and keeps where they came from."""
KINDS: tuple[str, ...] = ("radiograph", "ct")


class RegistryError(BundleError):
    """The registry cannot do what was asked (unknown version, nothing to roll back, a fixed
    bundle instead of a registry, a damaged state file); the message says why and what to do."""


def utc_now() -> str:
    """The time registry files are stamped with: UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Provenance(BaseModel):
    """Where a version came from: what it learnt from, and how it entered this registry."""

    training_data: str = ""
    synthetic_demo: bool = False
    intended_use: str = ""
    created: str | None = None
    presets: list[str] = Field(default_factory=list, description="the `pleura train` presets of its networks")
    imported_from: str = ""
    imported_by: str = ""
    imported_at: str = ""
    earlier: list[dict] = Field(
        default_factory=list, description="the provenance it had in the registries it was exported from"
    )


class VersionRecord(BaseModel):
    name: str
    version: str
    kind: BundleKind
    files: dict[str, str] = Field(description="path inside the bundle -> SHA-256, recorded at import")
    size_bytes: int = 0
    metrics: dict[str, float] = Field(default_factory=dict)
    provenance: Provenance = Field(default_factory=Provenance)

    @property
    def id(self) -> str:
        return f"{self.name}/{self.version}"


class Activation(BaseModel):
    """One change of the active version of a kind (the audit trail of promote and rollback)."""

    kind: BundleKind
    action: Literal["promote", "rollback"]
    from_version: str | None = Field(description="None: the demo bundle (nothing promoted)")
    to_version: str | None
    by: str
    at: str
    reason: str | None = None


class RegistryState(BaseModel):
    format: int = 1
    active: dict[str, str] = Field(default_factory=dict, description="kind -> version id")
    previous: dict[str, list[str | None]] = Field(
        default_factory=dict, description="kind -> the versions active before, most recent last (rollback pops)"
    )
    history: list[Activation] = Field(default_factory=list)
    versions: dict[str, VersionRecord] = Field(default_factory=dict)


# --- checks ---------------------------------------------------------------------------------------


def file_digests(root: Path) -> dict[str, str]:
    """SHA-256 of every regular file under ``root`` (relative POSIX paths), the export record aside."""
    digests: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != RECORD_NAME:
            digests[path.relative_to(root).as_posix()] = _sha256(path)
    return digests


def checksum_problems(root: Path, recorded: dict[str, str]) -> list[str]:
    """What differs between the files under ``root`` and the recorded checksums (empty: intact)."""
    problems = []
    for relative, expected in sorted(recorded.items()):
        path = root / relative
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        actual = _sha256(path)
        if actual != expected:
            problems.append(f"{path} has changed since it was recorded (checksum mismatch: SHA-256 {actual[:12]}…, recorded {expected[:12]}…)")
    return problems


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def validate_bundle(
    path: Path | str,
    *,
    kind: str | None = None,
    checksums: dict[str, str] | None = None,
    networks: Literal["run", "skip"] = "run",
) -> Bundle:
    """Check a bundle thoroughly, or raise :class:`BundleError` naming the file and the reason.

    The manifest must be there and valid; with ``checksums``, every recorded file must be unchanged;
    with ``kind``, the bundle must be made for that input. Then both networks are built on the CPU
    from the manifest, their weights loaded strictly (a truncated file, or a state dict of another
    architecture or channel count, fails here), and each runs once on a blank image of its own input
    grid and must give one logit per image / per pixel. A worker passes ``networks="skip"``: loading
    the networks itself is the same check.
    """
    import torch

    from contract.networks import load_models, load_segmenter  # torch: only when a bundle is checked

    root = Path(path)
    if checksums is not None:
        problems = checksum_problems(root, checksums)
        if problems:
            raise BundleError(f"bundle {root} is corrupted: " + "; ".join(problems))
    bundle = load_bundle(root)
    manifest = bundle.manifest
    if kind is not None and manifest.kind != kind:
        raise BundleError(
            f"bundle {root} is made for another input: its manifest {root / MANIFEST_NAME} says kind "
            f"{manifest.kind!r}, this slot takes {kind!r} models"
        )
    if networks == "skip":
        return bundle
    if manifest.kind == "ct":  # a CT bundle segments only
        roles = [("segmenter", load_segmenter(bundle, "cpu")[0])]
    else:
        models = load_models(bundle, "cpu")
        roles = [("classifier", models.classifier), ("segmenter", models.segmenter)]
    for role, network in roles:
        if network is None:  # a classifier-only radiograph bundle
            continue
        spec = getattr(manifest, role)
        recipe = manifest.network_preprocessing(spec)
        size, channels = recipe.input_size, recipe.channels
        blank = torch.zeros(1, channels, size, size)
        try:
            with torch.inference_mode():
                out = network(blank)
        except Exception as exc:
            raise BundleError(
                f"bundle {root}: the {role} in {bundle.weights_path(spec)} does not run on its input grid "
                f"({channels} x {size} x {size} px, from {root / MANIFEST_NAME}): {type(exc).__name__}: {exc}"
            ) from None
        expected = (1, 1) if role == "classifier" else (1, 1, size, size)
        if tuple(out.shape) != expected:
            raise BundleError(
                f"bundle {root}: the {role} in {bundle.weights_path(spec)} gives output shape {tuple(out.shape)} "
                f"on its {size} px input, expected {expected}"
            )
    return bundle


# --- the registry directory, as readers see it ---------------------------------------------------


class RegistryLayout:
    """A registry directory (see the module docstring): where its parts are, its state as last
    written, and the workers' reports of what they run. :class:`training.registry.Registry` adds the
    changes."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.state_file = self.root / STATE_NAME

    @property
    def demo_dir(self) -> Path:
        return self.root / DEMO_DIR

    @property
    def ct_demo_dir(self) -> Path:
        return self.root / CT_DEMO_DIR

    def version_dir(self, record: VersionRecord) -> Path:
        return self.root / VERSIONS_DIR / record.name / record.version

    def read(self) -> RegistryState:
        """The current state (an empty one when nothing was ever imported)."""
        try:
            text = self.state_file.read_text()
        except FileNotFoundError:
            return RegistryState()
        except OSError as exc:
            raise RegistryError(f"cannot read the registry state {self.state_file}: {exc}") from None
        try:
            return RegistryState.model_validate(json.loads(text))
        except (json.JSONDecodeError, ValidationError) as exc:
            raise RegistryError(
                f"the registry state {self.state_file} is damaged ({exc}); restore it from a backup "
                "(the versions themselves are untouched under versions/)"
            ) from None

    def active(self, kind: str, state: RegistryState | None = None) -> VersionRecord | None:
        """The promoted version of ``kind``; None: nothing promoted (the demo bundle, for radiographs)."""
        state = state or self.read()
        ref = state.active.get(kind)
        return state.versions.get(ref) if ref else None

    def active_dir(self, kind: str, state: RegistryState | None = None) -> Path:
        record = self.active(kind, state)
        if record is not None:
            return self.version_dir(record)
        if kind == "radiograph":
            return self.demo_dir
        if kind == "ct":
            return self.ct_demo_dir
        raise RegistryError(
            f"no active {kind} model in the registry {self.root}: "
            f"`pleura models import BUNDLE` then `pleura models promote VERSION`"
        )

    # workers
    def record_worker(self, worker: str, kind: str, status: dict) -> None:
        """What a worker runs for ``kind`` (and its last loading error), for `pleura models list`."""
        write_json_atomically(
            self.root / WORKERS_DIR / f"{worker}.{kind}.json", {"worker": worker, "kind": kind, "updated": utc_now(), **status}
        )

    def workers(self) -> list[dict]:
        """Every worker's last report, newest first: ``state`` (``warming`` or ``ready``),
        ``loaded``, ``warming``, ``error``, ``pid``, ``ppid`` (see worker/active_model.py)."""
        found = []
        for path in sorted((self.root / WORKERS_DIR).glob("*.json")):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        return sorted(found, key=lambda item: item.get("updated", ""), reverse=True)


def write_json_atomically(target: Path, data: dict) -> None:
    """Write ``data`` to ``target`` whole or not at all (temporary file, fsync, rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# --- resolution from the settings -----------------------------------------------------------------


def fixed_bundle_dir(settings: "Settings") -> Path | None:
    """The one bundle that ``PLEURA_MODEL_BUNDLE_DIR`` names, in place of a registry; or, under the
    deprecated ``PLEURA_MODEL_DIR`` (when neither newer name is set), that folder when it holds a
    manifest, looked at on each call as before."""
    if settings.model_bundle_dir is not None:
        return settings.model_bundle_dir
    if settings.model_registry_dir is None and settings.model_dir is not None:
        if (settings.model_dir / MANIFEST_NAME).is_file():
            return settings.model_dir
    return None


def registry_root(settings: "Settings") -> Path | None:
    """The registry directory: ``PLEURA_MODEL_REGISTRY_DIR``, else the deprecated ``PLEURA_MODEL_DIR``
    when it names no bundle, else ``<storage_dir>/models``; None when a single bundle is the model."""
    if fixed_bundle_dir(settings) is not None:
        return None
    return settings.model_registry_dir or settings.model_dir or settings.storage_dir / "models"


def model_location_setting(settings: "Settings") -> str:
    """The variable that names where the models are, for messages: the one set, the newer first."""
    for name in ("model_bundle_dir", "model_registry_dir", "model_dir"):
        if getattr(settings, name) is not None:
            return f"PLEURA_{name.upper()}"
    return "PLEURA_MODEL_REGISTRY_DIR"


def worker_reports_root(settings: "Settings") -> Path:
    """Where the workers' status reports are (``workers/`` in it): the registry, or beside a fixed
    bundle ``<storage_dir>/models`` (where the CT demo bundle lives too)."""
    return registry_root(settings) or settings.storage_dir / "models"


def demo_bundle_dir(settings: "Settings") -> Path:
    """Where `pleura demo-model` builds the demo bundle: the fixed bundle, or the registry's demo/."""
    return fixed_bundle_dir(settings) or RegistryLayout(registry_root(settings)).demo_dir  # type: ignore[arg-type]


def ct_demo_bundle_dir(settings: "Settings") -> Path:
    """Where the synthetic CT demo bundle lives: the registry's ``ct-demo/`` (``<storage_dir>/models/ct-demo``
    beside a fixed radiograph bundle). It is the CT model while no CT version was promoted."""
    root = registry_root(settings) or settings.storage_dir / "models"
    return RegistryLayout(root).ct_demo_dir


def is_ct_demo_dir(settings: "Settings", bundle_dir: Path) -> bool:
    """Whether ``bundle_dir`` is the CT demo bundle's place (built on first use when missing)."""
    return Path(bundle_dir) == ct_demo_bundle_dir(settings)


_cache: dict[tuple[str, str], tuple[tuple[int, int, int], object]] = {}


def _cached(kind: str, path: Path, read):
    """``read(path)``, again only when the file was replaced or changed (stat: inode, size, mtime)."""
    try:
        info = path.stat()
        stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
    except FileNotFoundError:
        stamp = (0, 0, 0)
    key = (kind, str(path))
    hit = _cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = read(path)
    _cache[key] = (stamp, value)
    return value


def _manifest_kind(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("kind", "radiograph")
    except (OSError, ValueError, AttributeError):
        return None  # a broken manifest: the loader reports it with its reason


def active_bundle_dir(settings: "Settings", kind: str = "radiograph") -> Path:
    """The bundle directory that analyses ``kind`` now: the one place that decides.

    ``PLEURA_CT_MODEL_DIR``, when set, is the CT model. A fixed bundle (:func:`fixed_bundle_dir`)
    serves its own kind (CT series beside a fixed radiograph bundle: the CT demo bundle);
    otherwise the registry's promoted version, or, while nothing of that kind was promoted, the
    demo bundle of the kind (``demo/`` or ``ct-demo/``).
    Cheap enough to call before every task: the state file is read again only when it changed.
    Raises :class:`RegistryError` when there is no model for ``kind`` or the state is damaged.
    """
    if kind == "ct" and settings.ct_model_dir is not None:
        return settings.ct_model_dir
    fixed = fixed_bundle_dir(settings)
    if fixed is not None and kind == "ct" and _cached("manifest", fixed / MANIFEST_NAME, _manifest_kind) != "ct":
        return ct_demo_bundle_dir(settings)
    if fixed is not None:
        bundle_kind = _cached("manifest", fixed / MANIFEST_NAME, _manifest_kind) or "radiograph"
        if bundle_kind != kind:
            raise RegistryError(
                f"{model_location_setting(settings)}={fixed} is a {bundle_kind} bundle: there is no {kind} model "
                "(use a registry to have both)"
            )
        return fixed
    registry = RegistryLayout(registry_root(settings))  # type: ignore[arg-type]
    state = _cached("state", registry.state_file, lambda _: registry.read())
    return registry.active_dir(kind, state)  # type: ignore[arg-type]


def is_registered_version(bundle_dir: Path | str) -> bool:
    """Whether ``bundle_dir`` is a version kept by a registry (``<root>/versions/NAME/VERSION``),
    which must never change after import."""
    path = Path(bundle_dir).resolve()
    return len(path.parents) > 2 and path.parents[1].name == VERSIONS_DIR and (path.parents[2] / STATE_NAME).is_file()


def find_version_record(settings: "Settings", bundle_dir: Path) -> VersionRecord | None:
    """The registry's record of the version stored at ``bundle_dir`` (None: not a registered version)."""
    root = registry_root(settings)
    if root is None:
        return None
    registry = RegistryLayout(root)
    state = _cached("state", registry.state_file, lambda _: registry.read())
    for record in state.versions.values():  # type: ignore[union-attr]
        if registry.version_dir(record) == bundle_dir:
            return record
    return None
