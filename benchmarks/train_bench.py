"""Training epoch time: faceclf's real epoch vs the seed's ImageFolder pipeline vs the compute floor.

    python -m benchmarks.train_bench [--quick]

For each data set (the face-mask photos at the default 96 px, and N generated 64 px faces) the three
are measured in the same run, interleaved, on the same train images, same FaceCNN, batch 64:

- faceclf: images decoded once (discover + load_split), then faceclf.train.train_one_epoch with a
  make_trainer() Trainer (uint8 tensor -> batched flip/rotate on tensors -> AdamW step).
- seed:    torchvision ImageFolder (symlinks to the same files) + per-epoch PIL transforms, DataLoader
           (shuffle, num_workers=2), AdamW + NLL loss: JPEG decode and augmentation every epoch.
- floor:   forward + backward + AdamW step on in-memory float tensors of the same shapes, same number
           of batches; no decode, no augmentation. Extra rows show what moves the floor (channels_last,
           bf16 autocast, batch 32/128); faceclf itself is not changed.

Speed is measured, never asserted: the goals (seed/faceclf >= 1.5, faceclf/floor <= 1.15) are
stated in the notes.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks._timing import (
    DATASET,
    cpu_bf16,
    machine_rows,
    median,
    row,
    spread,
    timed,
)

NAME = "train"
GOAL_SEED_RATIO = 1.5
GOAL_FLOOR_RATIO = 1.15


def _config(image_size: int, num_classes: int):
    from faceclf.config import RunConfig

    cfg = RunConfig()
    cfg.data.image_size = image_size
    cfg.model.image_size = image_size
    cfg.model.num_classes = num_classes
    cfg.model.__post_init__()
    return cfg


def _load_train(root: Path, image_size: int):
    """faceclf's own path: discover + load_split of the train split (decoded once)."""
    from faceclf.data import discover, load_split

    cfg = _config(image_size, 2)
    splits = discover(root, cfg.data.split_fractions, cfg.data.decode_workers)
    t0 = time.perf_counter()
    train = load_split(splits.train, image_size, cfg.data.decode_workers, desc="decode train")
    return splits.classes, train, time.perf_counter() - t0


def _faceclf_epoch(cfg, train) -> Callable[[], float]:
    """A closure running one real faceclf epoch (one Trainer kept across repetitions, as fit() does)."""
    from faceclf.train import (
        make_trainer,
        resolve_device,
        seed_everything,
        train_one_epoch,
    )

    generator = seed_everything(cfg.train.seed)
    steps = math.ceil(len(train.labels) / cfg.train.batch_size)
    tr = make_trainer(cfg, steps, resolve_device("cpu"))

    def run() -> float:
        return timed(lambda: train_one_epoch(tr, train, generator))
    return run


def _symlink_tree(dst: Path, classes: list[str], records) -> None:
    """An ImageFolder tree dst/<class>/<i>_<name> of symlinks to the train split's files."""
    for c in classes:
        (dst / c).mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(records):
        p = Path(r.path).resolve()
        (dst / classes[r.label] / f"{i:06d}_{p.name}").symlink_to(p)


def _seed_epoch(cfg, folder: Path, batch_size: int = 64) -> tuple[Callable[[], float], int]:
    """A closure running one epoch of the seed pipeline: ImageFolder + PIL transforms + DataLoader(workers=2)."""
    from torchvision import datasets, transforms

    from faceclf.model import build_model

    s = cfg.data.image_size
    tf = transforms.Compose([
        transforms.Resize((s, s)), transforms.RandomHorizontalFlip(), transforms.RandomRotation(10),
        transforms.ToTensor(), transforms.Normalize(cfg.data.mean, cfg.data.std),
    ])
    ds = datasets.ImageFolder(str(folder), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=2)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    loss_fn = nn.NLLLoss()

    def epoch() -> None:
        model.train()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

    def run() -> float:
        return timed(epoch)
    return run, len(ds)


def _floor_epoch(cfg, n: int, batch_size: int, channels_last: bool = False, bf16: bool = False) -> Callable[[], float]:
    """A closure: forward+backward+AdamW step over in-memory float batches covering n images."""
    from faceclf.model import build_model

    s = cfg.data.image_size
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    loss_fn = nn.NLLLoss()
    sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
    sizes = [b for b in sizes if b >= 2]  # train_one_epoch skips 1-image batches too
    g = torch.Generator().manual_seed(0)
    xs = {b: torch.randn(b, 3, s, s, generator=g).contiguous(memory_format=fmt) for b in set(sizes)}
    ys = {b: torch.randint(0, cfg.model.num_classes, (b,), generator=g) for b in set(sizes)}

    def epoch() -> None:
        model.train()
        for b in sizes:
            if bf16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(xs[b])
                loss = loss_fn(out.float(), ys[b])
            else:
                loss = loss_fn(model(xs[b]), ys[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def run() -> float:
        return timed(epoch)
    return run


def _bf16_works(cfg) -> tuple[bool, str]:
    """Whether CPU autocast to bf16 runs this model (forward+backward) here, and why not."""
    if not cpu_bf16():
        return False, "CPU has no native bf16 (avx512_bf16/amx_bf16 absent)"
    try:
        from faceclf.model import build_model

        m = build_model(cfg.model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(torch.randn(2, 3, cfg.data.image_size, cfg.data.image_size))
        out.float().sum().backward()
        return True, ""
    except Exception as e:  # noqa: BLE001 - any failure means: not measurable here
        return False, f"bf16 autocast failed: {type(e).__name__}: {e}"


def _subset(train, k: int):
    """k images of a decoded split, evenly spaced (so both classes stay), as a TensorSplit."""
    from faceclf.data import TensorSplit

    n = len(train.labels)
    if k >= n:
        return train
    idx = torch.linspace(0, n - 1, k).round().long().unique()
    return TensorSplit(train.images[idx].contiguous(), train.labels[idx].clone(),
                       [train.records[i] for i in idx.tolist()], [])


def bench_dataset(label: str, root: Path, image_size: int, reps: int, extra_reps: int,
                  limit: int | None = None) -> list[dict[str, Any]]:
    """All rows for one data set: faceclf vs seed vs floor (interleaved), then what moves the floor."""
    classes, train, decode_s = _load_train(root, image_size)
    if limit:
        train = _subset(train, limit)
        label = f"{label} subset"
    n = len(train.labels)
    cfg = _config(image_size, len(classes))
    where = f"{label}, {n} train imgs @{image_size}px"
    with tempfile.TemporaryDirectory(prefix="faceclf-seedtree-") as tmp:
        _symlink_tree(Path(tmp), classes, train.records)
        seed_run, n_seed = _seed_epoch(cfg, Path(tmp), cfg.train.batch_size)
        faceclf_run = _faceclf_epoch(cfg, train)
        floor_run = _floor_epoch(cfg, n, cfg.train.batch_size)
        # one warm-up of each (allocator, thread pools, OS page cache for the seed's files), not counted
        for f in (faceclf_run, seed_run, floor_run):
            f()
        t = {"faceclf": [], "seed": [], "floor": []}
        for _ in range(reps):  # interleaved so background load hits all three alike
            t["faceclf"].append(faceclf_run())
            t["seed"].append(seed_run())
            t["floor"].append(floor_run())
    fc, sd, fl = median(t["faceclf"]), median(t["seed"]), median(t["floor"])
    rows = [
        row(NAME, f"faceclf epoch ({label})", fc, "s/epoch", note=f"{where}; batch 64; {spread(t['faceclf'])}; "
            f"{n / fc:.0f} img/s"),
        row(NAME, f"seed ImageFolder epoch ({label})", sd, "s/epoch", note=f"{n_seed} imgs; PIL decode+aug each epoch, "
            f"DataLoader num_workers=2; {spread(t['seed'])}"),
        row(NAME, f"compute floor epoch ({label})", fl, "s/epoch", note=f"fp32 fwd+bwd+AdamW on in-memory tensors; "
            f"{spread(t['floor'])}"),
        row(NAME, f"speed-up over seed ({label})", sd / fc, "x", "seed ImageFolder epoch", sd, sd / fc,
            f"seed/faceclf; goal >= {GOAL_SEED_RATIO}: {'met' if sd / fc >= GOAL_SEED_RATIO else 'NOT met'}"),
        row(NAME, f"overhead over compute floor ({label})", fc / fl, "x", "compute floor epoch", fl, fc / fl,
            f"faceclf/floor; goal <= {GOAL_FLOOR_RATIO}: {'met' if fc / fl <= GOAL_FLOOR_RATIO else 'NOT met'}"),
    ]
    rows.append(row(NAME, f"faceclf one-time decode ({label})", decode_s, "s", note="load_split of the train split, "
                    "paid once per run (not per epoch); single measurement"))
    # What moves the floor: same model, same images count; faceclf unchanged.
    variants: list[tuple[str, dict]] = [("batch 32", {"batch_size": 32}), ("batch 128", {"batch_size": 128}),
                                        ("channels_last", {"batch_size": 64, "channels_last": True})]
    ok, why = _bf16_works(cfg)
    if ok:
        variants += [("bf16 autocast", {"batch_size": 64, "bf16": True}),
                     ("bf16 autocast + channels_last", {"batch_size": 64, "bf16": True, "channels_last": True})]
    runs = {"fp32 batch 64 (reference)": floor_run}
    runs.update({name: _floor_epoch(cfg, n, **kw) for name, kw in variants})
    for f in list(runs.values())[1:]:
        f()  # warm-up
    vt: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(extra_reps):
        for k, f in runs.items():
            vt[k].append(f())
    ref = median(vt["fp32 batch 64 (reference)"])
    for k, ts in vt.items():
        m = median(ts)
        rows.append(row(NAME, f"floor: {k} ({label})", m, "s/epoch", "fp32 batch 64 floor", ref, ref / m,
                        f"what moves the floor; ratio = speed-up vs fp32 b64; {spread(ts)}"))
    if not ok:
        rows.append(row(NAME, f"floor: bf16 autocast ({label})", None, "", note=f"not measured: {why}"))
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Measure and return the rows (see the module docstring)."""
    from faceclf.sample import generate_sample_faces

    warnings.filterwarnings("ignore", category=UserWarning)
    rows = machine_rows(NAME)
    reps, extra_reps = (2, 1) if quick else (5, 3)
    if DATASET.is_dir():  # --quick: a 384-image subset of the train split keeps the smoke run short
        rows += bench_dataset("face-mask", DATASET, 96, reps, extra_reps, limit=384 if quick else None)
    else:
        rows.append(row(NAME, "face-mask data set", None, note=f"not measured: {DATASET} is missing"))
    n_gen = 600 if quick else 10_000
    with tempfile.TemporaryDirectory(prefix="faceclf-genfaces-") as tmp:
        generate_sample_faces(tmp, per_class=n_gen // 2, size=64, seed=0)
        rows += bench_dataset(f"generated {n_gen}", Path(tmp), 64, reps, extra_reps)
    return rows


if __name__ == "__main__":  # same as: python -m benchmarks --only train [--quick]
    from benchmarks.__main__ import main

    raise SystemExit(main(["--only", "train", *sys.argv[1:]]))
