"""Training: one epoch, evaluation, checkpoints and the fit loop with early stopping and resume.

Files written into the run folder (all atomically):
    checkpoint.pt   best-val-loss weights + everything needed to rebuild and use them
    last.pt         the latest epoch, with optimizer/scheduler/RNG state, for --resume
    history.csv     one row per epoch
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import dataclasses
import functools
import io
import logging
import math
import os
import random
import re
import secrets
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from faceclf.store.atomic import write_atomic, write_text_atomic
from faceclf.config import DataConfig, RunConfig
from faceclf.dataset.images import TensorSplit, augment, normalize
from faceclf.training.metrics import summarize
from faceclf.training.model import FaceCNN, build_model, model_config_from_dict
from faceclf.progress import progress

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
SAMPLE_IMAGES = 16  # real val images kept in checkpoint.pt for export parity checks
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available else cpu; asking for cuda without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return the CPU generator used for shuffling and augmentation."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def new_version() -> str:
    """A model version that sorts by creation time and does not collide: 20261123T021500Z-3fa2c1."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """Index batches over n items: shuffled by ``generator`` when given, else in order."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from order.split(batch_size)


@dataclass
class Trainer:
    """What one epoch needs: the model, its optimiser and schedule, and how to feed it."""

    model: FaceCNN
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data_cfg: DataConfig
    device: torch.device
    batch_size: int
    amp_dtype: torch.dtype | None      # None: full fp32
    scaler: torch.amp.GradScaler | None
    memory_format: torch.memory_format = torch.contiguous_format

    def autocast(self):
        """Mixed-precision context when ``amp_dtype`` is set, a no-op otherwise."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def prepare(self, images_u8: torch.Tensor, train: bool, generator: torch.Generator | None) -> torch.Tensor:
        """uint8 (B, 3, S, S) -> normalised float on the device, augmented when training."""
        x = normalize(images_u8.to(self.device, non_blocking=True), self.data_cfg.mean, self.data_cfg.std)
        if train:  # after normalising: the same result (bilinear weights sum to 1), one pass fewer
            x = augment(x, generator, self.data_cfg.max_rotation_deg, self.data_cfg.hflip_prob)
        return x.contiguous(memory_format=self.memory_format)  # same layout as the weights


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises native bf16 arithmetic (AVX512-BF16 or AMX-BF16; Linux /proc/cpuinfo).

    Without it, bf16 autocast on CPU is emulated and slower than fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype_for(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype for training on ``device``: bf16 where the hardware has it, fp16 on older
    GPUs, None (fp32) when disabled or on a CPU without native bf16."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


@functools.cache
def reuse_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the OS; True if it did.

    A CPU training step allocates and frees the same large tensors (megabytes each) every batch. By
    default glibc serves each from fresh mmap'd pages and unmaps them on free, so every batch pays
    page faults and zeroing again (measured: 7-15% of a face-mask epoch, most of it in augmentation).
    Peak memory is unchanged; the process keeps what it reached until it exits. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False


def make_trainer(cfg: RunConfig, steps_per_epoch: int, device: torch.device) -> Trainer:
    """Build model, AdamW, one-cycle schedule and AMP/memory-layout settings for ``device``."""
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    if device.type == "cpu":
        reuse_freed_memory()
    model = build_model(cfg.model).to(device, memory_format=memory_format)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.train.learning_rate, total_steps=cfg.train.epochs * steps_per_epoch, pct_start=0.2
    )
    amp_dtype = amp_dtype_for(device, cfg.train.amp)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None  # fp16 gradients underflow
    return Trainer(model, opt, sched, cfg.data, device, cfg.train.batch_size, amp_dtype, scaler, memory_format)


def split_on_device(split: TensorSplit, device: torch.device, max_share: float = 0.25) -> TensorSplit:
    """The split with its uint8 images and labels moved to ``device`` once, so a GPU epoch gathers,
    augments and trains without a host copy per batch. Stays on the host for the CPU, and when the
    images would take more than ``max_share`` of the GPU's free memory."""
    if device.type != "cuda":
        return split
    free, _total = torch.cuda.mem_get_info(device)
    if split.images.nbytes > max_share * free:
        log.info("train images stay in host memory: %.0f MB is over %.0f%% of the GPU's free %.0f MB",
                 split.images.nbytes / 1e6, max_share * 100, free / 1e6)
        return split
    return dataclasses.replace(split, images=split.images.to(device), labels=split.labels.to(device))


def train_one_epoch(tr: Trainer, split: TensorSplit, generator: torch.Generator) -> float:
    """One pass over the training split in shuffled batches; returns the mean training NLL."""
    tr.model.train()
    loss_fn = nn.NLLLoss(reduction="sum")
    total, seen = 0.0, 0
    n = len(split.labels)
    bar = progress(total=n, desc="train", unit="img", leave=False)
    for idx in batch_indices(n, tr.batch_size, generator):
        if len(idx) < 2:  # a 1-image batch breaks batch norm statistics; it is reshuffled next epoch
            continue
        x = tr.prepare(split.images[idx], train=True, generator=generator)
        y = split.labels[idx].to(tr.device, non_blocking=True)
        with tr.autocast():
            loss = loss_fn(tr.model(x).float(), y)  # log-probs (B, C) vs (B,)
        tr.optimizer.zero_grad(set_to_none=True)
        mean_loss = loss / len(idx)
        if tr.scaler is not None:
            tr.scaler.scale(mean_loss).backward()
            tr.scaler.step(tr.optimizer)
            tr.scaler.update()
        else:
            mean_loss.backward()
            tr.optimizer.step()
        tr.scheduler.step()
        total += float(loss.detach())
        seen += len(idx)
        bar.update(len(idx))
    bar.close()
    return total / max(seen, 1)


@torch.no_grad()
def predict_log_probs(model: nn.Module, images_u8: torch.Tensor, data_cfg: DataConfig, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Eval-mode log-probabilities (N, C) for uint8 images (N, 3, S, S), computed in batches."""
    model.eval()
    out = []
    weights = next(model.parameters())
    layout = torch.channels_last if weights.dim() == 4 and weights.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format  # follow the model's layout; always fp32, so metrics match the ONNX model
    for idx in batch_indices(len(images_u8), batch_size, None):
        x = normalize(images_u8[idx].to(device), data_cfg.mean, data_cfg.std)
        out.append(model(x.contiguous(memory_format=layout)).float().cpu())
    return torch.cat(out) if out else torch.empty((0, model.cfg.num_classes))


def evaluate(model: nn.Module, split: TensorSplit, classes: list[str], data_cfg: DataConfig, device: torch.device) -> dict[str, Any]:
    """Loss, accuracy, per-class accuracy and confusion matrix of ``model`` on a decoded split."""
    log_probs = predict_log_probs(model, split.images, data_cfg, device)
    loss_sum = float(nn.functional.nll_loss(log_probs, split.labels, reduction="sum")) if len(split.labels) else 0.0
    return summarize(loss_sum, log_probs.argmax(dim=1), split.labels, classes)


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors, so a checkpoint loads on any machine."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """torch.save to a temp file, then os.replace: the previous file stays whole if this dies."""
    write_atomic(path, lambda p: torch.save(payload, p))


def _one_line(e: BaseException) -> str:
    """torch's weights_only refusal spans many lines (with ANSI codes): keep what was refused, on one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Please use|Check the documentation|$)", text, re.S)
    return " ".join((m.group(1) if m and m.group(1).strip() else text).split()) or type(e).__name__


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True (no pickled code runs) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError/RuntimeError for unsafe or broken files
        raise ValueError(f"checkpoint {str(path)!r} cannot be loaded safely (weights_only): {_one_line(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != CHECKPOINT_FORMAT:
        found = ckpt.get("format_version") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"checkpoint {str(path)!r} has format {found!r}, expected {CHECKPOINT_FORMAT}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], device: torch.device | str = "cpu") -> FaceCNN:
    """Rebuild the CNN from the config stored in the checkpoint and load its weights (eval mode)."""
    model = build_model(model_config_from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model_state"])
    return model.to(device).eval()


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
        "train_config": cfg.to_dict()["train"],
        "classes": list(classes),
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "image_size": cfg.data.image_size,
        "epoch": epoch,
        "best_val_loss": best_val_loss,
        "metrics": metrics,
        "sample_images": sample_images,
    }


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite history.csv whole (atomically): one row per finished epoch."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())


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


def _restore(tr: Trainer, last: dict[str, Any], generator: torch.Generator) -> None:
    """Put model, optimiser, schedule and RNG streams back where last.pt left them."""
    tr.model.load_state_dict(last["model_state"])
    tr.optimizer.load_state_dict(last["optimizer_state"])
    tr.scheduler.load_state_dict(last["scheduler_state"])
    generator.set_state(last["generator_state"])
    torch.set_rng_state(last["torch_rng_state"])
    if tr.device.type == "cuda" and last.get("cuda_rng_state") is not None:
        torch.cuda.set_rng_state(last["cuda_rng_state"])


def fit(cfg: RunConfig, classes: list[str], train: TensorSplit, val: TensorSplit, run_dir: Path, resume: bool = False,
        version: str | None = None) -> FitResult:
    """Train until cfg.train.epochs or until val loss has not improved for cfg.train.patience epochs.

    Keeps the best-val-loss weights in run_dir/checkpoint.pt and the latest state in run_dir/last.pt;
    with ``resume`` it continues from last.pt and reaches the same result as an uninterrupted run.
    ``version`` names the model (default: a new time-sortable one).
    """
    device = resolve_device(cfg.train.device)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    generator = seed_everything(cfg.train.seed)
    steps = math.ceil(len(train.labels) / cfg.train.batch_size)
    tr = make_trainer(cfg, steps, device)
    train = split_on_device(train, device)
    history: list[dict[str, Any]] = []
    best_val_loss, best_epoch, version, start = math.inf, -1, version or new_version(), 0
    if resume:
        last = load_checkpoint(run_dir / "last.pt")
        _restore(tr, last, generator)
        history, best_val_loss, best_epoch = last["history"], last["best_val_loss"], last["best_epoch"]
        version, start = last["version"], last["epoch"] + 1
        log.info("resuming %s at epoch %d (best val loss %.4f at epoch %d)", run_dir, start, best_val_loss, best_epoch)
    log.info("training on %s: %d train / %d val images, %d epochs max", device, len(train.labels), len(val.labels), cfg.train.epochs)
    bar = progress(range(start, cfg.train.epochs), desc="epochs", unit="epoch", initial=start, total=cfg.train.epochs)
    for epoch in bar:
        if best_epoch >= 0 and epoch - best_epoch > cfg.train.patience:
            break  # a resumed run that had already stopped early
        t0 = time.perf_counter()
        train_loss = train_one_epoch(tr, train, generator)
        val_metrics = evaluate(tr.model, val, classes, cfg.data, device)
        row = {"epoch": epoch, "train_loss": round(train_loss, 6), "val_loss": round(val_metrics["loss"], 6),
               "val_accuracy": round(val_metrics["accuracy"], 6), "lr": tr.scheduler.get_last_lr()[0],
               "seconds": round(time.perf_counter() - t0, 3)}
        history.append(row)
        if val_metrics["loss"] < best_val_loss:
            best_val_loss, best_epoch = val_metrics["loss"], epoch
            save_checkpoint(run_dir / "checkpoint.pt",
                            best_payload(tr, cfg, classes, epoch, best_val_loss, {"val": val_metrics}, version,
                                         val.images[:SAMPLE_IMAGES].clone()))
        save_checkpoint(run_dir / "last.pt", {
            "format_version": CHECKPOINT_FORMAT, "version": version, "epoch": epoch, "history": history,
            "best_val_loss": best_val_loss, "best_epoch": best_epoch, "model_state": cpu_state(tr.model),
            "optimizer_state": tr.optimizer.state_dict(), "scheduler_state": tr.scheduler.state_dict(),
            "generator_state": generator.get_state(), "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state": torch.cuda.get_rng_state() if device.type == "cuda" else None,
            "run_config": cfg.to_dict(),
        })
        write_history(run_dir / "history.csv", history)
        bar.set_postfix(train_loss=f"{train_loss:.4f}", val_loss=f"{val_metrics['loss']:.4f}", val_acc=f"{val_metrics['accuracy']:.3f}")
        log.info("epoch %d: train_loss %.4f val_loss %.4f val_acc %.4f (%.1fs)", epoch, train_loss,
                 val_metrics["loss"], val_metrics["accuracy"], row["seconds"])
        if epoch - best_epoch >= cfg.train.patience:
            log.info("early stop: val loss has not improved for %d epochs", cfg.train.patience)
            break
    bar.close()
    if best_epoch < 0:
        raise TrainingDiverged("no epoch produced a finite validation loss; no weights were kept "
                               "(check the data and learning rate)")
    return FitResult(best_epoch, best_val_loss, history, version, device.type)
