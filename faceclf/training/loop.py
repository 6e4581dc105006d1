"""The training step and evaluation: one epoch over a decoded split, mixed precision where the hardware has it."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from faceclf.config import BATCH_SIZE, RunConfig, imbalanced
from faceclf.dataset.preprocess import Preprocess
from faceclf.dataset.tensors import TensorSplit, augment, normalize
from faceclf.progress import progress
from faceclf.training.distributed import Rank, gather_rows, part_of, share, sum_over_ranks, wrap
from faceclf.training.metrics import summarize
from faceclf.training.model import FaceCNN, build_model

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available else cpu; asking for cuda without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU")
    return torch.device(name)


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None,
                  part: Rank = Rank()) -> Iterator[torch.Tensor]:
    """Index batches over n items: shuffled by ``generator`` when given, else in order; under DDP only this
    rank's part of that order (see faceclf.training.distributed.part_of)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from part_of(order, part).split(batch_size)


@dataclass
class Trainer:
    """What one epoch needs: the model, its optimiser and schedule, and how to feed it."""

    model: FaceCNN
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    preset: Preprocess
    max_rotation_deg: float
    hflip_prob: float
    device: torch.device
    batch_size: int
    amp_dtype: torch.dtype | None      # None: full fp32
    scaler: torch.amp.GradScaler | None
    memory_format: torch.memory_format = torch.contiguous_format
    class_weighting: str = "none"      # "balanced": training loss weighted by inverse class frequency
    part: Rank = Rank()                # this process's rank and the world size (rank 0 of 1 alone)
    step_model: nn.Module | None = None  # what training steps run through: DDP(model) across ranks

    @property
    def stepper(self) -> nn.Module:
        """The module a training step calls (gradients synchronised across ranks under DDP)."""
        return self.step_model if self.step_model is not None else self.model

    def loss_weight(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Per-class weights (C,) of the training loss on ``self.device``, from the training labels (N,).

        None for "none", and for "auto" unless the largest class has more than IMBALANCE_RATIO times the
        images of the smallest (then "balanced"). "balanced": n / (C * n_c) (sklearn's "balanced"), so every class weighs as much
        in total as it would with n / C images, and a balanced set gets weights of exactly 1. Only the
        training loss uses them; validation and test losses stay unweighted, so early stopping and the
        metrics keep their meaning. A class with no training image gets n / C (it never occurs in a
        batch; runs stop before training in that case anyway) instead of a division by zero.
        """
        if self.class_weighting == "none":
            return None
        num_classes = self.model.cfg.num_classes
        counts = torch.bincount(labels.reshape(-1).cpu(), minlength=num_classes).to(torch.float64)  # (C,)
        if self.class_weighting == "auto" and not imbalanced(counts.tolist()):
            return None
        weight = counts.sum() / (num_classes * counts.clamp(min=1))
        return weight.to(torch.float32).to(self.device)

    def autocast(self):
        """Mixed-precision context when ``amp_dtype`` is set, a no-op otherwise."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def prepare(self, images_u8: torch.Tensor, augmented: bool, generator: torch.Generator | None) -> torch.Tensor:
        """uint8 (B, 3, S, S) -> normalised float on the device, ``augmented`` (training batches) or not."""
        x = normalize(images_u8.to(self.device, non_blocking=True), self.preset)
        if augmented:  # after normalising: the same result (bilinear weights sum to 1), one pass fewer
            x = augment(x, generator, self.max_rotation_deg, self.hflip_prob)
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


def release_memory() -> bool:
    """Collect the garbage earlier steps of the process left (ingest's manifest rows, decode buffers, cyclic
    objects not yet collected) and hand the freed heap back to the OS before training builds its own
    working set; True if glibc trimmed. A night runs ingest and decoding in the process that trains, so
    without this its training peak carried part of their peaks (memory that grew with the face set).
    The trim is a no-op off glibc."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def make_trainer(cfg: RunConfig, steps_per_epoch: int, device: torch.device, part: Rank = Rank()) -> Trainer:
    """Build model, AdamW, one-cycle schedule and AMP/memory-layout settings for ``device``; across ranks
    the model is wrapped in DistributedDataParallel for the training steps."""
    memory_format = torch.channels_last if cfg.training.channels_last else torch.contiguous_format
    if device.type == "cpu":
        reuse_freed_memory()
    model = build_model(cfg.model).to(device, memory_format=memory_format)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.training.learning_rate, weight_decay=cfg.training.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.training.learning_rate, total_steps=cfg.training.epochs * steps_per_epoch, pct_start=0.2
    )
    amp_dtype = amp_dtype_for(device, cfg.training.amp)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None  # fp16 gradients underflow
    return Trainer(model, opt, sched, Preprocess.from_config(cfg.data), cfg.data.max_rotation_deg, cfg.data.hflip_prob,
                   device, cfg.training.batch_size, amp_dtype, scaler, memory_format, cfg.training.class_weighting,
                   part, None)


def start_ranks_together(tr: Trainer) -> None:
    """Wrap the model for DDP (after any warm-start or resumed weights are loaded: DDP broadcasts rank 0's
    weights to every rank when it wraps)."""
    tr.step_model = wrap(tr.model, tr.device, tr.part) if tr.part.distributed else None


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
    """One pass over the training split in shuffled batches; returns the mean training NLL.

    With class weights (``tr.class_weighting == "balanced"``, weights from this split's label counts) each
    batch's loss is the weighted sum divided by the sum of its images' weights (NLLLoss's own "mean"), so
    the step size stays that of an unweighted mean whatever the batch's class mix; the returned loss is
    the weighted mean over the epoch. Evaluation (``evaluate``) never weights.
    """
    tr.stepper.train()
    weight = tr.loss_weight(split.labels)  # (C,) or None
    loss_fn = nn.NLLLoss(weight=weight, reduction="sum")
    total, seen = 0.0, 0.0  # loss sum, and the images' weight sum (their count when unweighted)
    n = len(split.labels)
    bar = progress(total=share(n, tr.part), desc="train", unit="img", leave=False, disable=not tr.part.is_main or None)
    for idx in batch_indices(n, tr.batch_size, generator, tr.part):
        if len(idx) < 2:  # a 1-image batch breaks batch norm statistics; it is reshuffled next epoch
            continue
        x = tr.prepare(split.images[idx], augmented=True, generator=generator)
        y = split.labels[idx].to(tr.device, non_blocking=True)
        with tr.autocast():
            loss = loss_fn(tr.stepper(x).float(), y)  # log-probs (B, C) vs (B,)
        tr.optimizer.zero_grad(set_to_none=True)
        batch_weight = weight[y].sum() if weight is not None else len(idx)  # > 0: every weight is > 0
        mean_loss = loss / batch_weight
        if tr.scaler is not None:
            tr.scaler.scale(mean_loss).backward()
            tr.scaler.step(tr.optimizer)
            tr.scaler.update()
        else:
            mean_loss.backward()
            tr.optimizer.step()
        tr.scheduler.step()
        total += float(loss.detach())
        seen += float(batch_weight)
        bar.update(len(idx))
    bar.close()
    total, seen = sum_over_ranks([total, seen], tr.part)
    return total / seen if seen > 0 else 0.0


@torch.no_grad()
def predict_log_probs(model: nn.Module, images_u8: torch.Tensor, preset: Preprocess, device: torch.device,
                      batch_size: int = BATCH_SIZE, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Eval-mode log-probabilities (N, C) for uint8 images (N, 3, S, S), computed in batches; with
    ``positions`` (K,) only for those images, (K, C).

    Batches as large as training's (the default): the activations then fit in the blocks training's steps
    freed, which glibc keeps for reuse (``reuse_freed_memory``). Batches of 256 made every evaluation grow
    a second working set beside training's (measured: training's peak RssAnon 712 -> 508 MiB, 10,000 64 px
    images, 1 epoch). The output is allocated once, before the first batch: a small result tensor kept per
    batch was carved out of the blocks the batch's activations had just freed, so the next batch's
    activations no longer fit there and the heap grew with every batch (measured: evaluating 10,000 images
    grew it by 141 MiB, 1,000 images by a tenth of that)."""
    model.eval()
    rows = positions if positions is not None else torch.arange(len(images_u8))  # (K,)
    out = torch.empty((len(rows), model.cfg.num_classes))  # (K, C) fp32
    weights = next(model.parameters())
    layout = torch.channels_last if weights.dim() == 4 and weights.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format  # follow the model's layout; always fp32, so metrics match the ONNX model
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size]
        x = normalize(images_u8[idx].to(device), preset)
        out[start:start + len(idx)] = model(x.contiguous(memory_format=layout)).float().cpu()  # no copy on the CPU
    return out


def predict_split(model: nn.Module, split: TensorSplit, preset: Preprocess, device: torch.device,
                  part: Rank = Rank(), batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """Log-probabilities (N, C) of every image of a decoded split, in its order. Across ranks each predicts
    its part and every rank gets every row."""
    n = len(split.labels)
    mine = part_of(torch.arange(n), part, pad=False)  # (K,)
    return gather_rows(predict_log_probs(model, split.images, preset, device, batch_size, mine), mine, n, part)


def metrics_of(log_probs: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Loss, accuracy, per-class accuracy and confusion matrix from log-probabilities (N, C) and labels (N,)."""
    loss_sum = float(nn.functional.nll_loss(log_probs, labels, reduction="sum")) if len(labels) else 0.0
    return summarize(loss_sum, log_probs.argmax(dim=1), labels, classes)


def evaluate(model: nn.Module, split: TensorSplit, classes: list[str], preset: Preprocess,
             device: torch.device, part: Rank = Rank(), batch_size: int = BATCH_SIZE) -> dict[str, Any]:
    """Loss, accuracy, per-class accuracy and confusion matrix of ``model`` on a decoded split; across ranks
    every rank computes the same figures."""
    return metrics_of(predict_split(model, split, preset, device, part, batch_size), split.labels, classes)
