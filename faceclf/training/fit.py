"""The fit loop: epochs until early stop, best-val-loss weights kept, resumable from last.pt.

Files written into the run folder (all atomically):
    checkpoint.pt   best-val-loss weights + everything needed to rebuild and use them
    last.pt         the latest epoch, with optimizer/scheduler/RNG state, for --resume
    history.csv     one row per epoch
"""

from __future__ import annotations

import csv
import io
import logging
import math
import random
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from faceclf.config import RunConfig
from faceclf.dataset.tensors import TensorSplit
from faceclf.progress import progress
from faceclf.store.atomic import write_text_atomic
from faceclf.training.checkpoint import (
    CHECKPOINT_FORMAT,
    cpu_state,
    load_checkpoint,
    save_checkpoint,
)
from faceclf.training.distributed import barrier, current, digests_of_every_rank, share
from faceclf.training.loop import (
    Trainer,
    evaluate,
    make_trainer,
    resolve_device,
    split_on_device,
    start_ranks_together,
    train_one_epoch,
)

log = logging.getLogger(__name__)

SAMPLE_IMAGES = 16  # real val images kept in checkpoint.pt for export parity checks
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return the CPU generator used for shuffling and augmentation."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def new_version() -> str:
    """A model version that sorts by creation time and does not collide: 20261123T021500Z-3fa2c1."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def best_payload(tr: Trainer, cfg: RunConfig, classes: list[str], epoch: int, best_val_loss: float,
                 metrics: dict[str, Any], version: str, sample_images: torch.Tensor) -> dict[str, Any]:
    """checkpoint.pt contents: plain types only (weights_only loads them).

    ``sample_images`` (uint8 (k, 3, S, S), a few real val images) lets export check ONNX parity
    on real data without needing the data folder.
    """
    return {
        "format_version": CHECKPOINT_FORMAT,
        "version": version,
        "model_state": cpu_state(tr.model),
        "model_config": cfg.to_dict()["model"],
        "data_config": cfg.to_dict()["data"],
        "train_config": cfg.to_dict()["training"],  # the checkpoint format's key
        "classes": list(classes),
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "image_size": cfg.data.image_size,
        "epoch": epoch,
        "best_val_loss": best_val_loss,
        "metrics": metrics,
        "sample_images": sample_images,
    }


def last_payload(tr: Trainer, cfg: RunConfig, generator: torch.Generator, version: str, epoch: int,
                 history: list[dict[str, Any]], best_val_loss: float, best_epoch: int) -> dict[str, Any]:
    """last.pt contents: where the run is, with optimiser, schedule and RNG state, so --resume continues exactly."""
    return {
        "format_version": CHECKPOINT_FORMAT, "version": version, "epoch": epoch, "history": history,
        "best_val_loss": best_val_loss, "best_epoch": best_epoch, "model_state": cpu_state(tr.model),
        "optimizer_state": tr.optimizer.state_dict(), "scheduler_state": tr.scheduler.state_dict(),
        "generator_state": generator.get_state(), "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if tr.device.type == "cuda" else None,
        "run_config": cfg.to_dict(),
    }


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite history.csv whole (atomically): one row per finished epoch."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())


EpochCallback = Callable[[int, int, dict[str, Any]], None]  # (epoch, epochs at most, history row)


class TrainingDiverged(RuntimeError):
    """Every epoch's validation loss was NaN/inf: no weights are worth keeping (history.csv shows it)."""


@dataclass
class FitResult:
    """Where fitting ended: the best epoch and its val loss, the per-epoch history, the model version."""

    best_epoch: int
    best_val_loss: float
    history: list[dict[str, Any]]
    version: str
    device: str
    rank_digests: list[str]      # sha256 of the final weights on each rank, in rank order (one alone)


def _restore(tr: Trainer, last: dict[str, Any], generator: torch.Generator) -> None:
    """Put model, optimiser, schedule and RNG streams back where last.pt left them."""
    tr.model.load_state_dict(last["model_state"])
    tr.optimizer.load_state_dict(last["optimizer_state"])
    tr.scheduler.load_state_dict(last["scheduler_state"])
    generator.set_state(last["generator_state"])
    torch.set_rng_state(last["torch_rng_state"])
    if tr.device.type == "cuda" and last.get("cuda_rng_state") is not None:
        torch.cuda.set_rng_state(last["cuda_rng_state"])


def fit(cfg: RunConfig, classes: list[str], train_split: TensorSplit, val_split: TensorSplit, run_dir: Path, resume: bool = False,
        version: str | None = None, init_state: dict[str, torch.Tensor] | None = None,
        on_epoch: EpochCallback | None = None) -> FitResult:
    """Train until cfg.training.epochs or until val loss has not improved for cfg.training.patience epochs.

    Keeps the best-val-loss weights in run_dir/checkpoint.pt and the latest state in run_dir/last.pt;
    with ``resume`` it continues from last.pt and reaches the same result as an uninterrupted run.
    ``version`` names the model (default: a new time-sortable one). ``init_state`` (weights of a model of
    the same classes and architecture) replaces the random initialisation: a warm start. ``on_epoch(epoch,
    epochs, row)`` is called on rank 0 after each epoch with its history row (a progress display).

    Under torch.distributed (torchrun, Ray Train) every rank calls this with the same arguments: each
    trains on its part of every epoch, all agree on the validation figures, rank 0 alone writes files.
    """
    device = resolve_device(cfg.training.device)
    part = current()
    if cfg.training.num_threads > 0:
        torch.set_num_threads(cfg.training.num_threads)
    generator = seed_everything(cfg.training.seed)
    steps = math.ceil(share(len(train_split.labels), part) / cfg.training.batch_size)
    tr = make_trainer(cfg, steps, device, part)
    if init_state is not None and not resume:  # a resumed run continues from last.pt's weights
        tr.model.load_state_dict(init_state)
    train_split = split_on_device(train_split, device)
    history: list[dict[str, Any]] = []
    best_val_loss, best_epoch, version, start = math.inf, -1, version or new_version(), 0
    if resume:
        last = load_checkpoint(run_dir / "last.pt")
        _restore(tr, last, generator)
        history, best_val_loss, best_epoch = last["history"], last["best_val_loss"], last["best_epoch"]
        version, start = last["version"], last["epoch"] + 1
        log.info("resuming %s at epoch %d (best val loss %.4f at epoch %d)", run_dir, start, best_val_loss, best_epoch)
    start_ranks_together(tr)
    log.info("training on %s: %d train / %d val images, %d epochs max%s", device, len(train_split.labels), len(val_split.labels),
             cfg.training.epochs, f"; rank {part.rank} of {part.world_size}" if part.distributed else "")
    bar = progress(range(start, cfg.training.epochs), desc="epochs", unit="epoch", initial=start, total=cfg.training.epochs,
                   disable=not part.is_main or None)
    for epoch in bar:
        if best_epoch >= 0 and epoch - best_epoch > cfg.training.patience:
            break  # a resumed run that had already stopped early
        t0 = time.perf_counter()
        train_loss = train_one_epoch(tr, train_split, generator)
        val_metrics = evaluate(tr.model, val_split, classes, tr.preset, device, part, tr.batch_size)
        row = {"epoch": epoch, "train_loss": round(train_loss, 6), "val_loss": round(val_metrics["loss"], 6),
               "val_accuracy": round(val_metrics["accuracy"], 6), "lr": tr.scheduler.get_last_lr()[0],
               "seconds": round(time.perf_counter() - t0, 3)}
        history.append(row)
        if val_metrics["loss"] < best_val_loss:
            best_val_loss, best_epoch = val_metrics["loss"], epoch
            if part.is_main:
                save_checkpoint(run_dir / "checkpoint.pt",
                                best_payload(tr, cfg, classes, epoch, best_val_loss, {"val": val_metrics}, version,
                                             val_split.images[:SAMPLE_IMAGES].clone()))
        if part.is_main:
            save_checkpoint(run_dir / "last.pt", last_payload(tr, cfg, generator, version, epoch, history,
                                                              best_val_loss, best_epoch))
            write_history(run_dir / "history.csv", history)
        if on_epoch is not None and part.is_main:
            on_epoch(epoch, cfg.training.epochs, row)
        bar.set_postfix(train_loss=f"{train_loss:.4f}", val_loss=f"{val_metrics['loss']:.4f}", val_acc=f"{val_metrics['accuracy']:.3f}")
        log.info("epoch %d: train_loss %.4f val_loss %.4f val_acc %.4f (%.1fs)", epoch, train_loss,
                 val_metrics["loss"], val_metrics["accuracy"], row["seconds"])
        if epoch - best_epoch >= cfg.training.patience:
            log.info("early stop: val loss has not improved for %d epochs", cfg.training.patience)
            break
    bar.close()
    if best_epoch < 0:
        raise TrainingDiverged("no epoch produced a finite validation loss; no weights were kept "
                               "(check the data and learning rate)")
    digests = digests_of_every_rank(tr.model, part)
    barrier(part)  # rank 0's files are whole before any rank goes on
    return FitResult(best_epoch, best_val_loss, history, version, device.type, digests)
