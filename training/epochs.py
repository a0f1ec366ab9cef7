"""The epoch loop every training run shares (radiograph networks, CT U-Nets), and its parts:
the cached data set, losses, optimisers, LR schedulers, the monitored score, checkpoints and the
per-epoch metrics file.

An epoch: everything random follows from (seed, epoch), so a resumed run repeats it exactly;
batches of one are skipped (BatchNorm); mixed precision on CUDA when asked; then validation, the
LR scheduler, the best checkpoint, early stopping, ``metrics.csv`` and (when resumable) the
``last.pt`` checkpoint.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, Dataset

from contract.bundle import Preprocessing
from contract.preprocess import normalise_input
from training.cache import CachedImages
from training.presets import Preset

METRICS_FILE = "metrics.csv"


class CachedDataset(Dataset):
    """(image (1, S, S), mask (1, S, S) or empty, label) from the cache, augmented."""

    def __init__(self, cache: CachedImages, indices: Sequence[int], transform: Callable | None) -> None:
        self.cache, self.indices, self.transform = cache, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        index = self.indices[item]
        sample = {"image": torch.from_numpy(np.asarray(self.cache.images[index], dtype=np.float32))[None]}
        if self.cache.masks is not None:
            sample["mask"] = torch.from_numpy(np.asarray(self.cache.masks[index], dtype=np.float32))[None]
        if self.transform is not None:
            sample = self.transform(sample)
        image = torch.as_tensor(sample["image"], dtype=torch.float32)
        mask = torch.as_tensor(sample["mask"], dtype=torch.float32) if "mask" in sample else torch.zeros(0)
        return image, mask, torch.tensor(float(self.cache.labels[index]))


def squared_hinge(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """L2-SVM loss on one score per image, labels 0/1 mapped to -1/+1 (torch has no binary form)."""
    signs = labels * 2 - 1
    losses = torch.clamp(1 - signs * scores, min=0) ** 2
    return (losses * weights).mean() if weights is not None else losses.mean()


def loss_function(
    preset: Preset, positive_weight: float | None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if preset.loss == "bce":

        def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            weight = torch.tensor(positive_weight, device=logits.device) if positive_weight else None
            return nn.functional.binary_cross_entropy_with_logits(
                logits[:, 0], labels.to(logits.dtype), pos_weight=weight
            )

        return bce
    if preset.loss == "squared_hinge":

        def hinge(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            weights = None
            if positive_weight:
                weights = torch.where(labels > 0.5, positive_weight, 1.0).to(scores.dtype)
            return squared_hinge(scores[:, 0], labels.to(scores.dtype), weights)

        return hinge
    if preset.loss == "dice":
        return DiceLoss(sigmoid=True, batch=True)
    if preset.loss == "dice_bce":
        return DiceCELoss(sigmoid=True, batch=True)
    if preset.loss == "jaccard_bce":  # MONAI's soft Jaccard (DiceLoss with jaccard=True) + BCE
        return DiceCELoss(sigmoid=True, batch=True, jaccard=True)
    return DiceFocalLoss(sigmoid=True, batch=True)


def make_optimiser(preset: Preset, network: nn.Module) -> torch.optim.Optimizer:
    if preset.optimiser == "adam":
        return torch.optim.Adam(network.parameters(), lr=preset.lr, weight_decay=preset.weight_decay)
    if preset.optimiser == "adamw":
        return torch.optim.AdamW(network.parameters(), lr=preset.lr, weight_decay=preset.weight_decay)
    return torch.optim.SGD(network.parameters(), lr=preset.lr, momentum=0.9, weight_decay=preset.weight_decay)


def make_scheduler(preset: Preset, optimiser: torch.optim.Optimizer):
    if preset.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, mode="max", factor=0.5, patience=3)
    if preset.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=preset.epochs)
    return None


def monitor_score(preset: Preset, metrics: dict[str, float]) -> float:
    name = preset.monitored
    value = metrics.get(f"val_{name}")
    if name == "loss" or value is None or not math.isfinite(value):
        return -metrics["val_loss"]
    return value


def atomic_save(payload: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def append_metrics(path: Path, metrics: dict[str, float], first: bool) -> None:
    rows: list[dict[str, Any]] = []
    if path.exists() and not first:
        with path.open(newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if float(row["epoch"]) < metrics["epoch"]]
    rows.append({k: (int(v) if k == "epoch" else f"{v:.6g}") for k, v in metrics.items()})
    names = list(dict.fromkeys(name for row in rows for name in row))
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)



@dataclass
class LoopState:
    """Where a run stands: the best epoch so far and how many epochs since it improved."""

    best_score: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    epoch: int = 0
    """The last epoch run."""


@dataclass
class EpochLoop:
    """One network's training: :meth:`run` trains epoch ``start_epoch`` to ``preset.epochs``.

    ``loader(epoch_seed)`` gives an epoch's (augmented, shuffled) training batches of
    ``(images, masks, labels)``; ``validate(network)`` the ``val_*`` metrics; ``truth(masks,
    labels)`` what the loss compares the output with.
    """

    preset: Preset
    network: nn.Module
    optimiser: torch.optim.Optimizer
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    recipe: Preprocessing
    device: torch.device
    loader: Callable[[int], DataLoader]
    validate: Callable[[nn.Module], dict[str, float]]
    truth: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    steps_per_epoch: int
    out_dir: Path
    best_file: Path
    console: Console
    scheduler: Any = None
    amp: bool = False
    last_file: Path | None = None
    """Where the resumable checkpoint goes after each epoch (None: not resumable)."""
    record_lr: bool = False
    rate_name: str = "images_per_second"
    show_rate: bool = True
    on_epoch_start: Callable[[], None] = lambda: None
    on_step: Callable[[], None] = lambda: None
    on_epoch_end: Callable[[], None] = lambda: None

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    def resume(self, state_file: Path) -> tuple[int, LoopState]:
        """Network, optimiser, scheduler and scaler from ``state_file``: (next epoch, state)."""
        state = torch.load(state_file, map_location=self.device, weights_only=False)
        self.network.load_state_dict(state["model"])
        self.optimiser.load_state_dict(state["optimiser"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        loop = LoopState(
            state["best_score"], state["best_epoch"], state["bad_epochs"], state["best_metrics"],
            bool(state.get("stopped_early", False)), state["epoch"],
        )
        return state["epoch"] + 1, loop

    def run(self, start_epoch: int = 1, state: LoopState | None = None) -> LoopState:
        state = state or LoopState()
        state.epoch = start_epoch - 1
        preset = self.preset
        if state.stopped_early:  # a resumed run that had stopped early stays stopped
            start_epoch = preset.epochs + 1
        for epoch in range(start_epoch, preset.epochs + 1):
            state.epoch = epoch
            if self._epoch(epoch, state):
                break
        return state

    def _epoch(self, epoch: int, state: LoopState) -> bool:
        """Train and validate one epoch; True when training stops early here."""
        preset, network, device = self.preset, self.network, self.device
        # Everything random in an epoch follows from (seed, epoch): a resumed run repeats it exactly.
        epoch_seed = preset.seed * 100_003 + epoch
        torch.manual_seed(epoch_seed)
        loader = self.loader(epoch_seed)
        network.train()
        self.on_epoch_start()
        started, seen, loss_sum = time.perf_counter(), 0, 0.0
        for step, (images, masks, labels) in enumerate(loader):
            if step >= self.steps_per_epoch:
                break
            if len(images) < 2:  # BatchNorm needs two samples
                continue
            inputs = normalise_input(images, self.recipe).to(device)
            truth = self.truth(masks, labels).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=self.amp):
                output = network(inputs)
                loss = self.loss(output.float(), truth)
            self.optimiser.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimiser)
            self.scaler.update()
            seen += len(images)
            loss_sum += float(loss.detach()) * len(images)
            self.on_step()
        seconds = time.perf_counter() - started
        metrics = {"epoch": float(epoch), "train_loss": loss_sum / max(seen, 1)}
        metrics.update(self.validate(network))
        if self.record_lr:
            metrics["lr"] = self.optimiser.param_groups[0]["lr"]
        metrics["seconds"] = seconds
        metrics[self.rate_name] = seen / seconds if seconds > 0 else 0.0
        score = monitor_score(preset, metrics)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(score)
        elif self.scheduler is not None:
            self.scheduler.step()
        improved = score > state.best_score or state.best_epoch == 0  # the first epoch counts even with a NaN score
        if improved:
            state.best_score, state.best_epoch, state.bad_epochs, state.best_metrics = score, epoch, 0, dict(metrics)
            atomic_save({key: value.detach().cpu() for key, value in network.state_dict().items()}, self.best_file)
        else:
            state.bad_epochs += 1
        state.stopped_early = bool(preset.patience and state.bad_epochs >= preset.patience)
        append_metrics(self.out_dir / METRICS_FILE, metrics, first=epoch == 1)
        if self.last_file is not None:
            atomic_save(
                {
                    "epoch": epoch,
                    "model": network.state_dict(),
                    "optimiser": self.optimiser.state_dict(),
                    "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                    "scaler": self.scaler.state_dict(),
                    "best_score": state.best_score,
                    "best_epoch": state.best_epoch,
                    "bad_epochs": state.bad_epochs,
                    "best_metrics": state.best_metrics,
                    "stopped_early": state.stopped_early,
                },
                self.last_file,
            )
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(("train_", "val_")))
        rate = f"  {metrics[self.rate_name]:.1f} img/s" if self.show_rate else ""
        self.console.print(f"epoch {epoch}/{preset.epochs}  {shown}{rate}" + ("  [green]best[/]" if improved else ""))
        self.on_epoch_end()
        if state.stopped_early:
            self.console.print(f"early stop: no improvement of val {preset.monitored} for {preset.patience} epochs")
        return state.stopped_early

    def load_best(self) -> None:
        """The best epoch's weights, in evaluation mode."""
        self.network.load_state_dict(torch.load(self.best_file, map_location=self.device, weights_only=True))
        self.network.eval()
