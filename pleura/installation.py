"""Pleura's top-level import names, checked at start-up.

The distribution installs the packages ``config``, ``contract``, ``node``, ``worker`` and
``training`` beside ``pleura`` (the layout of the design card; docs/ARCHITECTURE.md, "Import
names"). Those names are common: another distribution in the same environment may install a module
of the same name, and whichever comes first on ``sys.path`` wins. Pleura runs in its own virtualenv
or container image; :func:`check_import_names` makes a shared environment fail loudly, in one line,
instead of failing later in a way that points nowhere. This module imports no project package,
so it runs before any of them is imported: at the top of ``pleura/cli.py`` and
``pleura/worker_app.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PROJECT_PACKAGES = ("config", "contract", "node", "worker", "training")


class ShadowedPackageError(ImportError):
    """A top-level package of Pleura's name comes from elsewhere. (An ImportError, not a
    ``PleuraError``: the check runs before ``config`` itself can be trusted to import.)"""


def installation_root() -> Path:
    """The folder that holds the ``pleura`` package and its sibling packages."""
    return Path(__file__).resolve().parent.parent


def package_origin(name: str) -> Path | None:
    """Where ``name`` is (or would be) imported from, without importing it: the module already
    loaded, else what the import system would find; None when nothing provides it."""
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None) if module is not None else None
    if origin is None:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
    return Path(origin).resolve() if origin not in (None, "namespace", "built-in", "frozen") else None


def foreign_packages(root: Path | None = None) -> list[tuple[str, Path | None]]:
    """The project packages that do not come from ``root`` (default: this installation), with
    where they come from instead (None: not found at all)."""
    root = root or installation_root()
    foreign = []
    for name in PROJECT_PACKAGES:
        origin = package_origin(name)
        if origin is None or origin.parent.parent != root:
            foreign.append((name, origin))
    return foreign


def check_import_names() -> None:
    """Raise :class:`ShadowedPackageError` (one line) when a project package is shadowed."""
    foreign = foreign_packages()
    if foreign:
        name, origin = foreign[0]
        where = f"comes from {origin}" if origin is not None else "cannot be found"
        raise ShadowedPackageError(
            f"the module {name!r} {where}, not from this Pleura installation ({installation_root()}): another "
            "distribution's module shadows Pleura's; run Pleura in its own virtualenv or container image "
            "(docs/ARCHITECTURE.md, Import names)"
        )


def exit_if_shadowed() -> None:
    """For the entry points: say which package is shadowed, in one line, and exit 2."""
    try:
        check_import_names()
    except ShadowedPackageError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
