"""Durable storage of received instances, and a quarantine for what cannot be accepted.

Everything is written the same way: a temporary file in the target directory, written, flushed and
fsynced, renamed over the target, and the directory fsynced, so that after a crash a file is either
absent or complete. Keys are paths relative to the storage directory; workers on other hosts read
the same keys from shared storage.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from config.errors import PleuraError
from config.private_files import PRIVATE_DIR_MODE

INSTANCES_DIR = "instances"
QUARANTINE_DIR = "quarantine"

# PS3.5 9.1: digits and dots, no empty component, at most 64 characters. Leading zeros in a
# component break the rule but occur in the wild; they are harmless in a path, so they are allowed.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class InvalidUIDError(PleuraError, ValueError):
    """A UID that is missing or not a valid DICOM UID; the message names the attribute."""


def validate_uid(value: object, attribute: str) -> str:
    """Return `value` as a UID string, or raise :class:`InvalidUIDError` naming `attribute`.

    A valid UID contains only digits and dots, so it can be used as a file name component
    without any risk of path traversal.
    """
    if value is None:
        raise InvalidUIDError(f"{attribute} is missing")
    text = str(value).rstrip("\x00 ")
    if not text:
        raise InvalidUIDError(f"{attribute} is empty")
    if len(text) > 64 or not _UID.match(text):
        raise InvalidUIDError(f"{attribute} {text[:80]!r} is not a valid DICOM UID")
    return text


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Held while folders are made, so that "the folder exists" always means "made and its entry
# fsynced": otherwise a second association could write into a study folder whose own entry is not
# yet durable, acknowledge, and lose that instance with the folder on a power cut.
_directories_lock = threading.Lock()


def _make_directories(directory: Path) -> None:
    """Create `directory` and its missing parents, fsyncing each parent that gained an entry."""
    if directory.is_dir():
        return
    with _directories_lock:
        missing: list[Path] = []
        current = directory
        while not current.exists():
            missing.append(current)
            current = current.parent
        for folder in reversed(missing):
            try:
                folder.mkdir(mode=PRIVATE_DIR_MODE)  # files are 0600 (mkstemp); see config/private_files.py
            except FileExistsError:
                pass  # made by another process: fsync its parent all the same
            _fsync_directory(folder.parent)


def write_durably(target: Path, data: bytes) -> None:
    """Write `data` to `target` atomically: temp file, fsync, rename, fsync of the directory."""
    _make_directories(target.parent)
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    _fsync_directory(target.parent)


def move_durably(source: Path, target: Path) -> None:
    """Put the file `source` at `target` atomically and durably, without reading it into memory:
    renamed when both are on one file system, else copied in chunks to a temporary file beside the
    target; fsynced before the rename, the directory after it. `source` is gone afterwards."""
    _make_directories(target.parent)
    source = Path(source)
    if os.stat(source).st_dev == os.stat(target.parent).st_dev:
        with open(source, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(source, target)
    else:
        fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle, open(source, "rb") as original:
                shutil.copyfileobj(original, handle, _COPY_CHUNK)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp_name, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(source)
    _fsync_directory(target.parent)


_COPY_CHUNK = 1024 * 1024


class InstanceStore:
    """Received instances under ``<root>/instances/<study>/<series>/<sop>.dcm``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self._quarantine_lock = threading.Lock()

    @staticmethod
    def instance_key(study_uid: str, series_instance_uid: str, sop_instance_uid: str) -> str:
        """The storage key of an instance; raises :class:`InvalidUIDError` for a bad UID."""
        study = validate_uid(study_uid, "Study Instance UID")
        series = validate_uid(series_instance_uid, "Series Instance UID")
        sop = validate_uid(sop_instance_uid, "SOP Instance UID")
        return f"{INSTANCES_DIR}/{study}/{series}/{sop}.dcm"

    def write_instance(self, study_uid: str, series_instance_uid: str, sop_instance_uid: str, data: bytes) -> str:
        """Write a DICOM Part 10 file durably and return its storage key.

        Writing the same instance again replaces the file atomically; a reader that has the old
        file open keeps reading the old content.
        """
        storage_key = self.instance_key(study_uid, series_instance_uid, sop_instance_uid)
        write_durably(self.path(storage_key), data)
        return storage_key

    def store_file(self, study_uid: str, series_instance_uid: str, sop_instance_uid: str, source: Path) -> str:
        """Move the received DICOM Part 10 file `source` durably into place and return its storage
        key; like :meth:`write_instance`, for instances received to disk."""
        storage_key = self.instance_key(study_uid, series_instance_uid, sop_instance_uid)
        move_durably(source, self.path(storage_key))
        return storage_key

    def path(self, key: str) -> Path:
        """The absolute path of `key`; refuses keys that would leave the storage directory."""
        relative = PurePosixPath(key)
        if not key or relative.is_absolute() or any(part in ("..", "") for part in relative.parts):
            raise ValueError(f"storage key {key!r} is not a relative path inside the storage directory")
        resolved = (self.root / relative).resolve()
        if not resolved.is_relative_to(self.root):
            raise ValueError(f"storage key {key!r} resolves outside the storage directory {self.root}")
        return resolved

    def quarantine(self, data: bytes | Path, reason: str) -> Path:
        """Keep what could not be accepted (bytes, or a received file, which is moved), with
        ``<name>.reason.txt`` beside it."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{stamp}-{uuid.uuid4().hex[:12]}"
        folder = self.root / QUARANTINE_DIR
        target = folder / f"{name}.dcm"
        if isinstance(data, Path):
            move_durably(data, target)
        else:
            write_durably(target, data)
        write_durably(folder / f"{name}.reason.txt", (reason.rstrip("\n") + "\n").encode("utf-8"))
        return target


    def quarantined(self) -> list["QuarantinedInstance"]:
        """What the quarantine holds, newest first: for the PACS team (`pleura quarantine`)."""
        folder = self.root / QUARANTINE_DIR
        entries = []
        for path in sorted(folder.glob("*.dcm"), reverse=True) if folder.is_dir() else []:
            try:
                size = path.stat().st_size
            except FileNotFoundError:  # trimmed meanwhile
                continue
            try:
                reason = reason_file(path).read_text(encoding="utf-8", errors="replace").strip()
            except FileNotFoundError:
                reason = "(no reason file)"
            stamp = path.name.split("-", 1)[0]
            try:
                kept_at = datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=timezone.utc)
            except ValueError:
                kept_at = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
            entries.append(QuarantinedInstance(path.name, kept_at, size, reason))
        return entries

    def trim_quarantine(self, max_bytes: int) -> list[Path]:
        """Remove the oldest quarantined instances (names begin with the time they were kept) and
        their reason files until the folder holds at most `max_bytes`; returns what was removed."""
        folder = self.root / QUARANTINE_DIR
        with self._quarantine_lock:
            kept = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
            sizes = {path: path.stat().st_size + _size(reason_file(path)) for path in kept}
            total = sum(sizes.values())
            removed = []
            for path in kept:
                if total <= max_bytes:
                    break
                for item in (path, reason_file(path)):
                    with contextlib.suppress(FileNotFoundError):
                        item.unlink()
                total -= sizes[path]
                removed.append(path)
            if removed:
                _fsync_directory(folder)
            return removed


@dataclass(frozen=True)
class QuarantinedInstance:
    """One instance kept in the quarantine: its file name there, when it was kept, its size and
    why it was refused."""

    name: str
    kept_at: datetime
    size_bytes: int
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "kept_at": self.kept_at.isoformat(), "size_bytes": self.size_bytes, "reason": self.reason}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def reason_file(quarantined: Path) -> Path:
    """The reason file that :meth:`InstanceStore.quarantine` wrote beside `quarantined`."""
    return quarantined.with_name(quarantined.stem + ".reason.txt")
