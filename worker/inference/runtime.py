"""How the worker runs its networks fast: CPU thread counts, and on CUDA mixed precision,
channels-last, pinned-memory transfers and optionally ``torch.compile``.

Everything CUDA-specific is switched on only for a CUDA device, so the CPU path computes exactly
what training and evaluation compute (fp32, default memory format, no compilation).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

from contract.networks import LoadedModels

__all__ = ["AUTOCAST_DTYPES", "accelerate", "configure_torch_threads", "forward_context", "thread_counts", "to_device"]

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "auto": torch.float16, "fp32": None}
"""Autocast dtype on CUDA per ``inference_precision`` setting; None = fp32."""

_threads_configured = False


def thread_counts(cpu_count: int, processes: int, setting: int = 0) -> tuple[int, int]:
    """(intra-op, inter-op) torch threads for one of ``processes`` worker processes on ``cpu_count`` CPUs.

    ``setting`` > 0 fixes the intra-op count. Otherwise the CPUs are shared out between the
    processes, so that several worker processes on one host do not oversubscribe the cores (which
    slows all of them). Inter-op threads only help graphs with parallel branches, which these
    convolutional networks do not have: one, or two on a large share of CPUs.
    """
    intra = setting if setting > 0 else max(1, cpu_count // max(1, processes))
    return intra, 2 if intra >= 8 else 1


def configure_torch_threads(setting: int, processes: int) -> tuple[int, int]:
    """Apply :func:`thread_counts` to this process once (before the models run); returns the counts."""
    global _threads_configured
    intra, interop = thread_counts(os.cpu_count() or 1, processes, setting)
    if _threads_configured:
        return torch.get_num_threads(), torch.get_num_interop_threads()
    torch.set_num_threads(intra)
    try:
        torch.set_num_interop_threads(interop)
    except RuntimeError:  # torch allows it only before the first parallel work of the process
        log.debug("inter-op threads already fixed at %d", torch.get_num_interop_threads())
    _threads_configured = True
    log.info("torch threads: %d intra-op, %d inter-op", torch.get_num_threads(), torch.get_num_interop_threads())
    return torch.get_num_threads(), torch.get_num_interop_threads()


def accelerate(models: LoadedModels, precision: str = "auto", compile_networks: bool = False) -> LoadedModels:
    """On CUDA: channels-last weights, the autocast dtype for ``precision``, optionally compiled
    networks. On the CPU: ``models`` unchanged."""
    if models.device.type != "cuda":
        return models
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"inference precision {precision!r}: use auto, fp32, fp16 or bf16")
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no bf16: running fp16")
        dtype = torch.float16
    models.classifier = models.classifier.to(memory_format=torch.channels_last)
    if models.segmenter is not None:  # None: a classifier-only bundle
        models.segmenter = models.segmenter.to(memory_format=torch.channels_last)
    if compile_networks:  # beside the modules, which Grad-CAM copies and hooks by layer
        segmenter = None if models.segmenter is None else torch.compile(models.segmenter)
        models.compiled = (torch.compile(models.classifier), segmenter)
    models.autocast_dtype = dtype
    return models


@contextlib.contextmanager
def forward_context(models: LoadedModels) -> Iterator[None]:
    """Inference mode, with autocast when :func:`accelerate` chose a dtype (CUDA only)."""
    dtype = getattr(models, "autocast_dtype", None)
    with torch.inference_mode():
        if dtype is None or models.device.type != "cuda":
            yield
        else:
            with torch.autocast(device_type="cuda", dtype=dtype):
                yield


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``batch`` on ``device``; to CUDA from pinned host memory without blocking, channels-last."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
