"""Storage shared by hosts: received instances and result files in a shared directory or an
S3-compatible object store, selected by ``PLEURA_SHARED_STORAGE_URL`` (fsspec; s3fs for ``s3://``).

Unset, every process reads and writes its own ``storage_dir`` (one host, or one shared mount). Set:

- the node writes each received instance durably to its own ``storage_dir`` first (that copy is
  authoritative) and uploads a study's instances just before it dispatches the study
  (:func:`uploading_dispatcher`). A crash between the acknowledgement and the upload loses
  nothing: the study is still waiting in the ledger, so the next settle round uploads and
  dispatches it again. Uploads are idempotent (same key, same bytes).
- a worker fetches the instances of its task into its own ``storage_dir`` (a cache), analyses
  them, uploads the result files and removes what it fetched and wrote
  (:func:`analyse_with_shared_storage`); it needs no access to the node's disk or ledger.
- the node side fetches a summary's result files into its ``storage_dir`` before it records the
  analysis (:func:`fetch_results`), so delivery and the worklist's previews read local files.

Keys are the same relative paths as in ``storage_dir`` (``instances/<study>/<series>/<sop>.dcm``,
``results/<study>/<sop>.dcm``) under the URL's prefix. Credentials come from the object store's
usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, an IAM role), never the URL.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from config.errors import PleuraError
from config.settings import Settings
from contract.messages import AnalysisOptions, storage_keys
from node.storage import InstanceStore, write_durably

if TYPE_CHECKING:  # a type only: the worker, which imports this module, dispatches nothing
    from node.dispatch import Dispatcher

log = logging.getLogger(__name__)

SETTING = "shared_storage_url (PLEURA_SHARED_STORAGE_URL)"


class SharedStorageError(PleuraError, RuntimeError):
    """The shared storage URL cannot be used, or a file cannot be moved; the message says which."""


def _option_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return text


def split_storage_url(url: str) -> tuple[str, dict[str, Any]]:
    """``s3://bucket/prefix?endpoint_url=http://minio:9000`` -> (``s3://bucket/prefix``,
    ``{"endpoint_url": "http://minio:9000"}``): the query holds the file system's options."""
    parts = urlsplit(url)
    options = {key: _option_value(value) for key, value in parse_qsl(parts.query)}
    if parts.scheme in ("file", "local"):
        options.setdefault("auto_mkdir", True)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), options


def _without_query(url: str) -> str:
    return split_storage_url(url)[0]


class SharedStorage:
    """One shared store: keys under a prefix of an fsspec file system."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = _without_query(url)
        base, options = split_storage_url(url)
        try:
            self.fs, root = fsspec.core.url_to_fs(base, **options)
        except ImportError as exc:
            raise SharedStorageError(
                f"{SETTING} {self.url}: {exc} (for s3:// install the s3 extra: pip install 'pleura[s3]')"
            ) from exc
        except (ValueError, TypeError) as exc:
            raise SharedStorageError(f"{SETTING} {self.url}: {exc}") from exc
        self.root = str(root).rstrip("/")

    def __repr__(self) -> str:
        return f"SharedStorage({self.url!r})"

    def remote(self, key: str) -> str:
        """Where `key` lives in the shared store; refuses keys that would leave the prefix."""
        parts = key.split("/")
        if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"storage key {key!r} is not a relative path inside the shared storage")
        return f"{self.root}/{key}"

    def upload(self, store: InstanceStore, keys: Sequence[str]) -> None:
        """Copy the local files of `keys` to the shared store (in one batch: s3fs sends them
        concurrently); raises :class:`SharedStorageError` naming the store."""
        if not keys:
            return
        local = [str(store.path(key)) for key in keys]
        remote = [self.remote(key) for key in keys]
        try:
            self.fs.put(local, remote)
        except Exception as exc:
            raise SharedStorageError(f"cannot upload {len(keys)} file(s) to {self.url}: {exc}") from exc

    def download(self, store: InstanceStore, keys: Sequence[str]) -> tuple[list[str], list[str]]:
        """Fetch `keys` that `store` lacks, each written durably; returns (fetched, missing).

        A key the shared store does not hold is reported as missing; any other error (the store
        unreachable) raises :class:`SharedStorageError`, so the caller can try again later.
        """
        wanted = [key for key in dict.fromkeys(keys) if not store.path(key).is_file()]
        if not wanted:
            return [], []
        remote = {self.remote(key): key for key in wanted}
        try:
            contents = self.fs.cat(list(remote), on_error="return")
        except Exception as exc:
            raise SharedStorageError(f"cannot fetch {len(wanted)} file(s) from {self.url}: {exc}") from exc
        if not isinstance(contents, dict):  # one path: fsspec returns the bytes alone
            contents = {next(iter(remote)): contents}
        fetched, missing = [], []
        for path, key in remote.items():
            data = contents.get(path, contents.get(self.fs._strip_protocol(path)))
            if isinstance(data, FileNotFoundError) or data is None:
                missing.append(key)
            elif isinstance(data, BaseException):
                raise SharedStorageError(f"cannot fetch {key} from {self.url}: {data}")
            else:
                write_durably(store.path(key), data)
                fetched.append(key)
        return fetched, missing

    def check(self) -> str:
        """Write a small probe object (readiness: reachable, credentials valid, writable); raises
        when that fails. Returns the URL checked."""
        self.fs.pipe_file(self.remote(".pleura-ready"), b"ok\n")
        return self.url


_opened: dict[str, SharedStorage] = {}
_opened_lock = threading.Lock()


def shared_storage_for(settings: Settings) -> SharedStorage | None:
    """The shared store of these settings (opened once per process), or None for one host."""
    url = settings.shared_storage_url
    if not url:
        return None
    with _opened_lock:
        if url not in _opened:
            _opened[url] = SharedStorage(url)
        return _opened[url]


def uploading_dispatcher(shared: SharedStorage, store: InstanceStore, dispatch: Dispatcher) -> Dispatcher:
    """A dispatcher that first uploads the study's instances; an upload failure raises, so the
    settle loop keeps the study and tries again next round."""

    def upload_then_dispatch(study_uid: str, instances: list[dict[str, str]], *extra: dict[str, Any]) -> str:
        shared.upload(store, storage_keys(instances))
        return dispatch(study_uid, instances, *extra)

    return upload_then_dispatch


def analyse_with_shared_storage(
    analyse: Callable[[str, list[dict[str, str]], Any], dict[str, Any]],
    settings: Settings,
    study_uid: str,
    instances: list[dict[str, str]],
    options: AnalysisOptions | dict[str, Any] | None,
) -> dict[str, Any]:
    """Run `analyse` (the worker's analysis) with its inputs fetched from and its results put in
    the shared store; without shared storage, just `analyse`. ``options`` (the task's
    :class:`~contract.messages.AnalysisOptions`, or their wire form) are handed to `analyse` as given.

    An instance the store does not hold is left for the analysis to report ("cannot read stored
    instance"); the store being unreachable raises, so the task is retried. What this call
    fetched or wrote is removed from the worker's cache afterwards (files that were there before
    stay, so a worker that shares the node's directory never removes the node's copies).
    """
    shared = shared_storage_for(settings)
    if shared is None:
        return analyse(study_uid, instances, options)
    store = InstanceStore(settings.storage_dir)
    # A re-analysis also reads the report it supersedes (its header: which series it is in).
    report = AnalysisOptions.from_message(options or {}).supersedes
    superseded = [report.storage_key] if report is not None else []
    fetched, missing = shared.download(store, storage_keys(instances) + superseded)
    if missing:
        log.warning("%d instance(s) of a study are not in the shared storage %s", len(missing), shared.url)
    written: list[str] = []
    try:
        summary = analyse(study_uid, instances, options)
        written = storage_keys(summary["results"])
        shared.upload(store, written)
    finally:
        for key in [*fetched, *written]:
            with contextlib.suppress(OSError, ValueError):
                store.path(key).unlink()
    return summary


def fetch_results(settings: Settings, store: InstanceStore, summary: dict[str, Any]) -> None:
    """Node side: fetch the result files a worker's summary names into `store`, before the
    analysis is recorded; raises :class:`SharedStorageError` when one cannot be had."""
    shared = shared_storage_for(settings)
    if shared is None:
        return
    _, missing = shared.download(store, storage_keys(summary.get("results", [])))
    if missing:
        raise SharedStorageError(f"result file(s) {', '.join(missing)} are not in the shared storage {shared.url}")
