"""The analysis process pool: decoding and result writing beside the forward pass, on the host's cores.

A worker process runs the networks; with ``analysis_processes`` > 0 it hands the CPU work around
them to a pool of that many processes of its own (:class:`AnalysisPool`, one per worker process,
made on first use and shared by every analysis in flight and every model the worker loads): each
image is decoded in a pool process straight into a block of shared memory
(:class:`SharedArray`), which the worker maps without a copy for the forward pass; the image's
SEG, GSPS and SC are then built and durably written by a pool process that maps the same block
(:mod:`worker.image_jobs`). Only names, file paths and small findings cross between processes.

The pool's processes are started with ``forkserver`` (``spawn`` where there is none): never forked
from a process that runs torch threads or CUDA. A pool whose process died (killed, out of memory)
is broken: the analysis that meets it fails (Celery retries it) and the next one gets a new pool.

Every shared-memory block is made and unlinked by the worker process, also when an analysis fails;
pool processes only map blocks they are given.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import secrets
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np

__all__ = [
    "AnalysisPool", "AnalysisPoolBroken", "SharedArray", "analysis_pool", "attached", "block_name",
    "shutdown_analysis_pools",
]

log = logging.getLogger(__name__)

JOBS_MODULE = "worker.image_jobs"
"""Imported once by the fork server, so each pool process starts with it (and torch) loaded."""


class AnalysisPoolBroken(RuntimeError):
    """A pool process ended while it worked for an analysis: that analysis fails and is retried."""


class SharedArray:
    """A NumPy array in a named shared-memory block, made by this process, which alone unlinks it
    (:meth:`release`, also when the analysis fails)."""

    def __init__(self, shape: tuple[int, ...], dtype: Any = np.float32) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype).str
        size = max(1, int(np.prod(self.shape)) * np.dtype(dtype).itemsize)
        # Named after the worker process that owns it, so a block left in /dev/shm says whose it is.
        self._block: shared_memory.SharedMemory | None = shared_memory.SharedMemory(
            name=block_name(), create=True, size=size
        )
        self.name = self._block.name
        self.array: np.ndarray | None = np.ndarray(self.shape, dtype=self.dtype, buffer=self._block.buf)

    @property
    def handle(self) -> tuple[str, tuple[int, ...], str]:
        """What a pool process needs to map the block: (name, shape, dtype)."""
        return self.name, self.shape, self.dtype

    def release(self) -> None:
        """Unmap and unlink the block (idempotent). A view still held elsewhere keeps the memory
        mapped until it goes, but the block's name is gone at once."""
        block, self._block, self.array = self._block, None, None
        if block is None:
            return
        try:
            block.close()
        except BufferError:  # a view is still alive (an error's traceback): unmapped when it goes
            pass
        try:
            block.unlink()
        except FileNotFoundError:
            pass


BLOCK_PREFIX = "pleura-"


def block_name(pid: int | None = None) -> str:
    """A new block's name: ``pleura-<pid of the process that makes it>-<random>``."""
    return f"{BLOCK_PREFIX}{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}"


class attached:
    """``with attached(handle) as array``: a pool process's view of a block it was given, unmapped
    on exit. The block stays the worker's to unlink."""

    def __init__(self, handle: tuple[str, tuple[int, ...], str]) -> None:
        self.handle = handle
        self._block: shared_memory.SharedMemory | None = None

    def __enter__(self) -> np.ndarray:
        name, shape, dtype = self.handle
        self._block = _open_block(name)
        return np.ndarray(shape, dtype=dtype, buffer=self._block.buf)

    def __exit__(self, *exc_info: object) -> None:
        if self._block is not None:
            try:
                self._block.close()
            except BufferError:  # a view escaped into a traceback; the process unmaps it later
                pass


def _open_block(name: str) -> shared_memory.SharedMemory:
    """Map an existing block without registering it with the resource tracker: the worker made it
    and unlinks it; a pool process that registered it would have it unlinked behind the worker's back."""
    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None  # type: ignore[assignment]
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register  # type: ignore[assignment]


def _pool_process_init() -> None:
    """Each pool process: one torch thread (the pool is the parallelism), quiet about SIGINT (the
    worker decides when the pool stops)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a worker dependency
        pass


def _started() -> int:
    return 0


def _context() -> multiprocessing.context.BaseContext:
    """forkserver (fast starts, nothing forked from a process with torch threads), else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([JOBS_MODULE])
        return context
    return multiprocessing.get_context("spawn")


class AnalysisPool:
    """``processes`` pool processes, started on the first job and started again after one died."""

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"AnalysisPool: processes must be at least 1, got {processes}")
        self.processes = processes
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None

    def submit(self, function: Callable[..., Any], *args: Any) -> Future:
        """Run ``function(*args)`` in a pool process. Raises :class:`AnalysisPoolBroken` when the
        pool is broken (it is replaced for the next caller)."""
        executor = self._current()
        try:
            return executor.submit(function, *args)
        except BrokenProcessPool as exc:
            self.discard(executor)
            raise AnalysisPoolBroken(f"the analysis process pool is broken ({exc})") from exc

    def result(self, future: Future) -> Any:
        """``future``'s result; :class:`AnalysisPoolBroken` when its process died."""
        try:
            return future.result()
        except BrokenProcessPool as exc:
            self.discard()
            raise AnalysisPoolBroken(f"a process of the analysis pool ended while it worked ({exc})") from exc

    def warm(self) -> None:
        """Start the pool processes now (the worker's warm-up), not with the first study."""
        for future in [self.submit(_started) for _ in range(self.processes)]:
            self.result(future)

    def discard(self, executor: ProcessPoolExecutor | None = None) -> None:
        """Drop the broken executor (``executor``, or the current one), so the next job starts a new pool."""
        with self._lock:
            if self._executor is None or (executor is not None and executor is not self._executor):
                return
            broken, self._executor = self._executor, None
        log.warning("the analysis process pool broke; a new one starts with the next job")
        broken.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        """Stop the pool processes once their jobs are done (the worker's exit)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    @property
    def pids(self) -> list[int]:
        """The pool processes' ids (for the tests and the log)."""
        executor = self._executor
        return [] if executor is None else [p.pid for p in list(getattr(executor, "_processes", {}).values())]

    def _current(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    self.processes, mp_context=_context(), initializer=_pool_process_init
                )
                log.info("analysis process pool: %d processes", self.processes)
            return self._executor


_pools: dict[int, AnalysisPool] = {}
_pools_lock = threading.Lock()


def analysis_pool(processes: int) -> AnalysisPool | None:
    """This worker process's pool of ``processes`` processes (made once, shared by every analyser it
    builds, models reloaded included), or None for 0: everything in this process."""
    if processes <= 0:
        return None
    with _pools_lock:
        pool = _pools.get(processes)
        if pool is None:
            pool = _pools[processes] = AnalysisPool(processes)
        return pool


@atexit.register
def shutdown_analysis_pools() -> None:
    """Stop every pool of this process (at its exit; Celery's worker shutdown calls it too)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.shutdown()
