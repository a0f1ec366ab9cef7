"""Files and folders Pleura's processes create are their own user's alone: 0600 and 0700.

In config/ (it imports nothing but the standard library), the lowest layer, because every layer
makes such files: the Celery app factory (contract/celery_app.py) the embedded broker's, the node
its ledger and storage, the worker its exports.

The storage directory holds patient identifiers (the ledger, the embedded broker's messages, the
audit trail), the images themselves and pictures of them (previews, outlines). Nobody else on the
host needs to read them, and the default umask (022) would let everyone.

Two layers, because neither covers everything alone:

- The code that makes a file or folder sets its mode explicitly (:func:`make_private_dirs`,
  :func:`make_private`), so the modes hold in any process that uses it, whatever its umask (the
  worklist server on its own, tests, another program embedding the node's parts).
- Every long-running process sets its umask to 077 once, at start (:func:`restrict_umask`):
  ``pleura node`` (``node/service.py: run_node()``), ``pleura worklist`` and ``pleura
  export-worker`` (their commands), ``pleura worker`` (``worker/startup.py: run_worker()``, so
  its pool's processes inherit it). It covers the files libraries make on their own: SQLite's
  ``-wal`` and ``-shm``, kombu's embedded broker tables. The umask is process-wide, so library
  code never changes it.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
NODE_UMASK = 0o077


def restrict_umask() -> int:
    """Set the process umask to 077; returns the one before. For process start only."""
    return os.umask(NODE_UMASK)


def make_private_dirs(directory: Path) -> None:
    """Create `directory` and its missing parents, each 0700 (``mkdir(parents=True)`` gives the
    parents the umask's mode). Folders that already exist keep theirs: an administrator may have
    made the storage directory with a group on purpose."""
    directory = Path(directory)
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # made by another thread or process just now
        os.chmod(folder, PRIVATE_DIR_MODE)  # mkdir's mode is masked by the umask


def make_private(path: Path) -> None:
    """Make an existing file (or folder) readable and writable by its owner only."""
    path = Path(path)
    os.chmod(path, PRIVATE_DIR_MODE if path.is_dir() else PRIVATE_FILE_MODE)


def create_private_file(path: Path) -> None:
    """Create `path` empty with mode 0600 if it does not exist (before a library opens it, so the
    library's file is never readable by others, not even for a moment)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE_MODE)
    os.close(descriptor)
    make_private(path)
