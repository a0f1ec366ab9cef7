"""The model registry, managed: import, export, promote and rollback of immutable, checksummed versions.

The registry's layout, its state file and the question "which bundle analyses this kind now" are the
model contract's (:mod:`contract.active`), read by workers and commands alike. This module changes
the state: every change goes through the lock and is written to a temporary file that replaces
``registry.json`` (rename is atomic), so a worker reading it never sees half a state. Versions are
checked (:func:`~contract.active.validate_bundle`) before they are imported, promoted or rolled back
to; a bundle that fails is refused with the reason and the active model stays as it was. Every
change is recorded in the audit trail (:class:`node.audit.AuditTrail`) by the registry itself, however
it was asked for.

``PLEURA_MODEL_BUNDLE_DIR`` (or the deprecated ``PLEURA_MODEL_DIR``) naming a bundle directory is a
fixed model: promote and rollback refuse (there is no registry to change).
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock
from pydantic import ValidationError

from contract.active import (
    KINDS,
    LOCK_NAME,
    RECORD_NAME,
    VERSIONS_DIR,
    Activation,
    Provenance,
    RegistryError,
    RegistryLayout,
    RegistryState,
    VersionRecord,
    checksum_problems,
    file_digests,
    fixed_bundle_dir,
    model_location_setting,
    registry_root,
    utc_now,
    validate_bundle,
    write_json_atomically,
)
from contract.bundle import MANIFEST_NAME, BundleError, Manifest
from node.audit import AuditTrail

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = ["Registry", "open_registry"]

_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-")


def _who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no login name (containers without a passwd entry)
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _checked_name(value: str, what: str, manifest_file: str) -> str:
    if not value or value in (".", "..") or not set(value) <= _SAFE:
        raise BundleError(
            f"manifest {manifest_file}: {what} {value!r} cannot name a registry folder "
            "(use letters, digits and . _ + -)"
        )
    return value


# --- the registry --------------------------------------------------------------------------------


class Registry(RegistryLayout):
    """A registry directory that can be changed (see the module docstring)."""

    def __init__(self, root: Path | str, audit: AuditTrail | None = None) -> None:
        """``audit``: where imports, promotions and rollbacks are recorded (``model_imported``,
        ``model_promoted``, ``model_rolled_back``); by default the ``audit.jsonl`` beside the
        registry, which for the usual ``<storage_dir>/models`` is the storage's own audit trail
        (:func:`open_registry` always passes the settings' one)."""
        super().__init__(root)
        self._lock = FileLock(str(self.root / LOCK_NAME))
        self.audit = audit if audit is not None else AuditTrail(self.root.parent)

    def _write(self, state: RegistryState) -> None:
        write_json_atomically(self.state_file, state.model_dump(mode="json"))

    @contextmanager
    def _changing(self) -> Iterator[RegistryState]:
        """The state under the lock; written back (atomically) when the block ends without error."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            state = self.read()
            yield state
            self._write(state)

    def find(self, ref: str, state: RegistryState | None = None) -> VersionRecord:
        """A version by ``name/version``, or by ``version`` alone when only one name has it."""
        state = state or self.read()
        if ref in state.versions:
            return state.versions[ref]
        matches = [record for record in state.versions.values() if record.version == ref]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(record.id for record in matches)
            raise RegistryError(f"version {ref!r} is ambiguous: {names} (give NAME/VERSION)")
        try:
            demo = json.loads((self.demo_dir / MANIFEST_NAME).read_text())
        except (OSError, ValueError):
            demo = {}
        if ref in (f"{demo.get('name')}/{demo.get('version')}", demo.get("version")):
            raise RegistryError(
                f"{ref} is the demo bundle in {self.demo_dir}, not a registered version: "
                f"`pleura models import {self.demo_dir}` registers it"
            )
        known = ", ".join(state.versions) or "none imported yet"
        raise RegistryError(f"no version {ref!r} in the registry {self.root} (known: {known}; see `pleura models list`)")

    def verify(self, record: VersionRecord) -> list[str]:
        return checksum_problems(self.version_dir(record), record.files)

    # import / export
    def import_bundle(self, source: Path | str, by: str | None = None) -> tuple[VersionRecord, bool]:
        """Copy a bundle (directory or .tar.gz) in as a new immutable version: (record, newly added).

        The copy is checked (:func:`validate_bundle`) before it is registered; a bundle already
        registered with identical files is not added twice, one with the same name and version but
        other files is refused (versions never change).
        """
        source = Path(source)
        self.root.mkdir(parents=True, exist_ok=True)
        incoming = self.root / VERSIONS_DIR / f".incoming-{uuid.uuid4().hex}"
        incoming.mkdir(parents=True)
        try:
            unpacked = incoming / "unpacked"
            bundle_root = _unpack(source, unpacked)
            label = _source_label(source, bundle_root, unpacked)
            staged = incoming / "bundle"
            shutil.copytree(bundle_root, staged, ignore=shutil.ignore_patterns(RECORD_NAME))
            files = file_digests(staged)
            earlier = _read_export_record(bundle_root)
            if earlier is not None:
                problems = checksum_problems(staged, earlier.files)
                if problems:
                    raise BundleError(
                        f"bundle {source} does not match the checksums of its export record "
                        f"{RECORD_NAME} (damaged in transit?): " + "; ".join(problems)
                    )
            try:
                bundle = validate_bundle(staged)
            except BundleError as exc:  # name the files as the user knows them, not the staging copy
                raise BundleError(str(exc).replace(str(staged), label)) from None
            manifest = bundle.manifest
            manifest_file = f"{label}/{MANIFEST_NAME}"
            name = _checked_name(manifest.name, "name", manifest_file)
            version = _checked_name(manifest.version, "version", manifest_file)
            record = VersionRecord(
                name=name,
                version=version,
                kind=manifest.kind,
                files=files,
                size_bytes=sum((staged / f).stat().st_size for f in files),
                metrics=manifest.metrics,
                provenance=_provenance(manifest, source, by or _who(), earlier),
            )
            with self._changing() as state:
                existing = state.versions.get(record.id)
                if existing is not None:
                    if existing.files == record.files:
                        return existing, False
                    raise BundleError(
                        f"version {record.id} is already registered with other files; versions never change: "
                        f"give the bundle a new version in {manifest_file}"
                    )
                target = self.version_dir(record)
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists():  # left by an import that died before writing the state
                    shutil.rmtree(target)
                os.replace(staged, target)
                for path in target.rglob("*"):
                    if path.is_file():
                        path.chmod(0o444)  # a reminder, not a defence: the checksums are that
                state.versions[record.id] = record
            self.audit.record("model_imported", version=record.id, kind=record.kind, source=str(source),
                              by=record.provenance.imported_by)
            return record, True
        finally:
            shutil.rmtree(incoming, ignore_errors=True)

    def export(self, ref: str, out: Path | str) -> Path:
        """Write a version (its files and its record) to ``out``: a ``.tar.gz`` or a directory."""
        record = self.find(ref)
        source = self.version_dir(record)
        problems = self.verify(record)
        if problems:
            raise BundleError(f"version {record.id} is corrupted, not exported: " + "; ".join(problems))
        out = Path(out)
        record_text = record.model_dump_json(indent=2) + "\n"
        if out.name.endswith((".tar.gz", ".tgz")):
            out.parent.mkdir(parents=True, exist_ok=True)
            folder = f"{record.name}-{record.version}"
            partial = out.with_name(out.name + ".partial")
            with tarfile.open(partial, "w:gz") as archive:
                for relative in sorted(record.files):
                    archive.add(source / relative, arcname=f"{folder}/{relative}")
                with tempfile.NamedTemporaryFile("w", suffix=".json") as handle:
                    handle.write(record_text)
                    handle.flush()
                    archive.add(handle.name, arcname=f"{folder}/{RECORD_NAME}")
            os.replace(partial, out)
            return out
        if out.exists() and any(out.iterdir()):
            raise RegistryError(f"export target {out} is not empty: name a new directory or a .tar.gz file")
        out.mkdir(parents=True, exist_ok=True)
        for relative in sorted(record.files):
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / relative, out / relative)
        (out / RECORD_NAME).write_text(record_text)
        return out

    # promote / rollback
    def promote(self, ref: str, kind: str | None = None, by: str | None = None, reason: str | None = None) -> Activation | None:
        """Make a version the active one of its kind, after checking it; None when it already is."""
        record = self.find(ref)
        slot = kind or record.kind
        if slot not in KINDS:
            raise RegistryError(f"kind {slot!r}: use one of {', '.join(KINDS)}")
        validate_bundle(self.version_dir(record), kind=slot, checksums=record.files)
        with self._changing() as state:
            current = state.active.get(slot)
            if current == record.id:
                return None
            if record.id not in state.versions:
                raise RegistryError(f"version {record.id} left the registry while it was checked")
            state.previous.setdefault(slot, []).append(current)
            state.active[slot] = record.id
            event = Activation(kind=slot, action="promote", from_version=current, to_version=record.id,
                               by=by or _who(), at=utc_now(), reason=reason)
            state.history.append(event)
        self.audit.record("model_promoted", **event.model_dump())
        return event

    def rollback(self, kind: str = "radiograph", by: str | None = None, reason: str | None = None) -> Activation:
        """Make the version active before the current one active again (checked first)."""
        state = self.read()
        stack = state.previous.get(kind) or []
        if kind not in state.active or not stack:
            raise RegistryError(f"nothing to roll back to: no {kind} model was promoted before the current one")
        target = stack[-1]
        if target is None:
            if kind != "radiograph":
                raise RegistryError(f"nothing to roll back to: the {kind} model is the first one promoted")
            validate_bundle(self.demo_dir, kind=kind)
        else:
            record = self.find(target, state)
            validate_bundle(self.version_dir(record), kind=kind, checksums=record.files)
        with self._changing() as now:
            if now.active.get(kind) != state.active.get(kind) or now.previous.get(kind) != stack:
                raise RegistryError("the registry changed while the rollback was checked: look again and retry")
            now.previous[kind].pop()
            current = now.active.pop(kind)
            if target is not None:
                now.active[kind] = target
            event = Activation(kind=kind, action="rollback", from_version=current, to_version=target,
                               by=by or _who(), at=utc_now(), reason=reason)
            now.history.append(event)
        self.audit.record("model_rolled_back", **event.model_dump())
        return event

def _unpack(source: Path, into: Path) -> Path:
    """The bundle directory of ``source``: the directory itself, or the one unpacked from an archive."""
    if source.is_dir():
        return source
    if not source.exists():
        raise BundleError(f"no bundle at {source}: give a bundle directory or a .tar.gz archive of one")
    if not source.name.endswith((".tar.gz", ".tgz", ".tar")):
        raise BundleError(f"{source} is neither a bundle directory nor a .tar.gz archive")
    try:
        with tarfile.open(source) as archive:
            if hasattr(tarfile, "data_filter"):
                archive.extractall(into, filter="data")  # refuses links out of the folder, devices, absolute paths
            else:  # Python < 3.11.4 has no extraction filters: take plain files and folders inside only
                members = archive.getmembers()
                for member in members:
                    if not (member.isfile() or member.isdir()) or member.name.startswith("/") or ".." in Path(member.name).parts:
                        raise tarfile.TarError(f"member {member.name!r} is not a plain file inside the archive")
                archive.extractall(into, members=members)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"cannot unpack {source}: {exc}") from None
    if (into / MANIFEST_NAME).is_file():
        return into
    entries = [entry for entry in into.iterdir()]
    if len(entries) == 1 and entries[0].is_dir():
        if (entries[0] / MANIFEST_NAME).is_file():
            return entries[0]
    raise BundleError(f"archive {source} holds no {MANIFEST_NAME} (at its top, or in its one folder): not a bundle")


def _source_label(source: Path, bundle_root: Path, unpacked: Path) -> str:
    """How a bundle's files are named in messages: its directory, or the archive (and its folder)."""
    if source.is_dir():
        return str(source)
    inner = bundle_root.relative_to(unpacked).as_posix()
    return str(source) if inner == "." else f"{source}:{inner}"


def _read_export_record(bundle_root: Path) -> VersionRecord | None:
    path = bundle_root / RECORD_NAME
    if not path.is_file():
        return None
    try:
        return VersionRecord.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise BundleError(f"export record {path} is damaged: {exc}") from None


def _provenance(manifest: Manifest, source: Path, by: str, earlier: VersionRecord | None) -> Provenance:
    presets = [
        str(spec.training["preset"])
        for spec in (manifest.classifier, manifest.segmenter)
        if spec is not None and spec.training.get("preset")
    ]
    history = []
    if earlier is not None:
        history = [*earlier.provenance.earlier, earlier.provenance.model_dump(exclude={"earlier"})]
    return Provenance(
        training_data=manifest.training_data,
        synthetic_demo=manifest.synthetic_demo,
        intended_use=manifest.intended_use,
        created=manifest.created,
        presets=presets,
        imported_from=str(source.resolve()),
        imported_by=by,
        imported_at=utc_now(),
        earlier=history,
    )


# --- from the settings ----------------------------------------------------------------------------


def open_registry(settings: "Settings") -> Registry:
    root = registry_root(settings)
    if root is None:
        raise RegistryError(
            f"{model_location_setting(settings)}={fixed_bundle_dir(settings)} names a single model bundle, not a "
            "registry: unset it (the registry is then <storage_dir>/models) or set PLEURA_MODEL_REGISTRY_DIR instead"
        )
    return Registry(root, audit=AuditTrail(settings.storage_dir))
