"""DDP training: epoch time with 1 and 2 processes, and the communication share of a step.

    python -m benchmarks --only ddp [--quick]

Epochs: the same generated 64 px face set (4,000 images; --quick: 600) trained for 3 epochs (--quick: 2)
with the default config at image_size 64, once in one process (faceclf.training.launch.run_training) and once
in 2 DDP processes on this machine (faceclf.training.launch.run_training with workers=2: torch's elastic launcher,
gloo, each process with half the cores). The epoch time is history.csv's median "seconds" (training
steps plus the validation pass), so start-up and decoding are left out; the same images are seen per
epoch in both (each rank takes half). On a 2-core machine two processes share the cores one process
already uses, so no speed-up is expected here: the row says what it costs.

Communication: in a 2-process gloo group (torch.multiprocessing, one core each), the model in DDP runs
training steps on random 64 px batches of 64 twice: with gradient all-reduce (the normal step) and
inside DDP's no_sync() (no all-reduce). The communication share is 1 - no_sync / normal step time.
On a GPU machine the same code uses NCCL and the GPU (world size 1 against plain, see README).
"""

from __future__ import annotations

import csv
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._timing import machine_rows
from benchmarks.s3_fixture import row

NAME = "ddp"
STEPS, WARMUP = 30, 5


def epoch_seconds(run: Path) -> float:
    """Median epoch time of a run, from its history.csv."""
    with open(run / "history.csv", newline="") as f:
        return statistics.median(float(r["seconds"]) for r in csv.DictReader(f))


def _steps(rank: int, world: int, init_file: str, out: dict[str, Any]) -> None:
    """One rank of the communication measurement: seconds per step with and without gradient all-reduce."""
    import torch
    import torch.distributed as dist

    from faceclf.config import RunConfig, with_overrides
    from faceclf.training.distributed import Rank
    from faceclf.training.loop import make_trainer, start_ranks_together

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = with_overrides(RunConfig(), image_size=64)
    tr = make_trainer(cfg, STEPS * 2 + WARMUP * 2, torch.device("cpu"), Rank(rank, world))
    start_ranks_together(tr)
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, 256, (cfg.training.batch_size, 3, 64, 64), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 2, (cfg.training.batch_size,), generator=g)

    def step() -> None:
        with tr.autocast():
            loss = torch.nn.functional.nll_loss(tr.stepper(tr.prepare(x, True, g)).float(), y)
        tr.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        tr.optimizer.step()

    times = {}
    for name in ("sync", "no_sync"):
        for i in range(WARMUP + STEPS):
            if i == WARMUP:
                dist.barrier()
                t0 = time.perf_counter()
            if name == "sync":
                step()
            else:
                with tr.stepper.no_sync():
                    step()
        times[name] = (time.perf_counter() - t0) / STEPS
    if rank == 0:
        out.update(times)
    dist.destroy_process_group()


def communication_share(world: int = 2) -> dict[str, float]:
    """Seconds per training step with and without DDP's gradient all-reduce, rank 0's view."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="faceclf-ddp-bench-") as tmp, mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_steps, args=(world, str(Path(tmp) / "init"), out), nprocs=world, join=True)
        return dict(out)


def run(quick: bool = False) -> list[dict]:
    """Epoch time in 1 and 2 processes on the same data; the all-reduce share of a 2-process step."""
    import logging

    from faceclf.config import RunConfig, with_overrides
    from faceclf.devtools.sample import generate_sample_faces
    from faceclf.training.launch import run_training

    logging.getLogger("faceclf").setLevel(logging.WARNING)
    per_class, epochs = (300, 2) if quick else (2000, 3)
    cfg = with_overrides(RunConfig(), image_size=64, epochs=epochs, patience=epochs)
    with tempfile.TemporaryDirectory(prefix="faceclf-ddp-bench-") as tmp:
        data = Path(tmp) / "faces"
        generate_sample_faces(data, per_class=per_class, size=64, seed=3)
        t0 = time.perf_counter()
        one = run_training(data, Path(tmp) / "one", cfg)
        wall_one = time.perf_counter() - t0
        t0 = time.perf_counter()
        two = run_training(data, Path(tmp) / "two", with_overrides(cfg, workers=2))
        wall_two = time.perf_counter() - t0
        e1, e2 = epoch_seconds(Path(tmp) / "one"), epoch_seconds(Path(tmp) / "two")
    comm = communication_share()
    share = 1 - comm["no_sync"] / comm["sync"]
    n_train = one["data"]["counts"]["train"]
    rows = machine_rows(NAME)
    rows.append(row(NAME, "epoch, 1 process", e1, "s", note=f"{n_train} train images at 64 px, median of {epochs} "
                    f"epochs (train steps + validation); whole run {wall_one:.1f} s; test accuracy "
                    f"{one['test']['accuracy']:.3f}"))
    rows.append(row(NAME, "epoch, 2 DDP processes (gloo)", e2, "s", "1 process", e1,
                    note=f"torch elastic launch, each rank half the images and half the cores; whole run "
                         f"{wall_two:.1f} s incl. process start and decoding into the run's cache; test accuracy "
                         f"{two['test']['accuracy']:.3f}; weights identical on both ranks: "
                         f"{len(set(two['ranks']['weights_sha256'])) == 1}"))
    rows.append(row(NAME, "2-process step, all-reduce share", share, "share",
                    note=f"step with gradient all-reduce {comm['sync'] * 1000:.1f} ms vs inside no_sync() "
                         f"{comm['no_sync'] * 1000:.1f} ms (gloo, batch 64 at 64 px per rank, {STEPS} steps)"))
    return rows
