"""Training epoch time: faceclf's real epoch vs the seed's ImageFolder pipeline vs the compute floor.

    python -m benchmarks.train_bench [--quick]

For each data set (the face-mask photos at the default 96 px, and N generated 64 px faces) the three
are measured in the same run, interleaved, on the same train images, same FaceCNN, batch 64:

- faceclf: images decoded once (discover + load_split), then faceclf.training.loop.train_one_epoch with a
  make_trainer() Trainer (uint8 tensor -> batched flip/rotate on tensors -> AdamW step), with its
  default arithmetic: channels_last, and bf16 autocast where the CPU has native bf16.
- seed:    torchvision ImageFolder (symlinks to the same files) + per-epoch PIL transforms, DataLoader
           (shuffle, num_workers=2), AdamW + NLL loss in fp32: JPEG decode and augmentation every epoch.
- floor:   forward + backward + AdamW step on in-memory tensors of the same shapes and the same
           arithmetic as faceclf (layout, autocast), same number of batches; no decode, no augmentation.
           faceclf/floor is the input pipeline's overhead. Extra rows show what moves the floor from
           the seed's fp32 NCHW arithmetic (channels_last, bf16 autocast, torch.compile, batch 32/128).

Then, on the face-mask photos, test accuracy after full training (faceclf.training.launch.run_training with the
default config vs the seed pipeline with the same model, optimiser, schedule, epochs and best-val-loss
weights), on the same content-hash test split.

Speed is measured, never asserted: the goals (seed/faceclf >= 1.5 with equal or better accuracy,
faceclf/floor <= 1.15) are stated in the notes.
"""

from __future__ import annotations

import json
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
    """faceclf's own path: discover (a FaceSet, every file hashed once) + load_split of its train split
    (decoded once with the run's preprocessing preset). Returns (faceset, train TensorSplit, decode seconds)."""
    from faceclf.dataset.discover import discover
    from faceclf.dataset.preprocess import Preprocess
    from faceclf.dataset.tensors import load_split

    cfg = _config(image_size, 2)
    faceset = discover(root, cfg.data.split_fractions, cfg.data.decode_workers)
    t0 = time.perf_counter()
    train = load_split(faceset, "train", Preprocess.from_config(cfg.data), cfg.data.decode_workers)
    return faceset, train, time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so a wall-clock time covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _faceclf_epoch(cfg, train, device: torch.device = torch.device("cpu")) -> Callable[[], float]:
    """A closure running one real faceclf epoch (one Trainer kept across repetitions, the train split
    placed on ``device`` as fit() places it)."""
    from faceclf.training.fit import seed_everything
    from faceclf.training.loop import make_trainer, split_on_device, train_one_epoch

    generator = seed_everything(cfg.training.seed)
    steps = math.ceil(len(train.labels) / cfg.training.batch_size)
    tr = make_trainer(cfg, steps, device)
    train = split_on_device(train, device)

    def epoch() -> None:
        train_one_epoch(tr, train, generator)
        _sync(device)

    def run() -> float:
        return timed(epoch)
    return run


def _symlink_tree(dst: Path, faceset, records) -> None:
    """An ImageFolder tree dst/<class>/<i>_<name> of symlinks to the files of ``records`` (FaceImages of
    ``faceset``); every class of the FaceSet gets its folder, so ImageFolder's labels match the FaceSet's."""
    for c in faceset.classes:
        (dst / c).mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(records):
        p = faceset.file(r).resolve()
        (dst / r.label / f"{i:06d}_{p.name}").symlink_to(p)


def _seed_epoch(cfg, folder: Path, batch_size: int = 64, device: torch.device = torch.device("cpu"),
                workers: int = 2) -> tuple[Callable[[], float], int]:
    """A closure running one epoch of the seed pipeline: ImageFolder + PIL transforms + DataLoader(workers),
    fp32 model on ``device`` (batches copied from pinned host memory on CUDA)."""
    from torchvision import datasets

    from faceclf.training.model import build_model

    ds = datasets.ImageFolder(str(folder), transform=_seed_transforms(cfg, train=True))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.training.learning_rate, weight_decay=cfg.training.weight_decay)
    loss_fn = nn.NLLLoss()

    def epoch() -> None:
        model.train()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        _sync(device)

    def run() -> float:
        return timed(epoch)
    return run, len(ds)


def _floor_epoch(cfg, n: int, batch_size: int, channels_last: bool = False, bf16: bool = False,
                 compile_model: bool = False) -> Callable[[], float]:
    """A closure: forward+backward+AdamW step over in-memory float batches covering n images."""
    from faceclf.training.model import build_model

    s = cfg.data.image_size
    torch.manual_seed(cfg.training.seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(cfg.model).to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.training.learning_rate, weight_decay=cfg.training.weight_decay)
    forward = torch.compile(model) if compile_model else model
    loss_fn = nn.NLLLoss()
    sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
    sizes = [b for b in sizes if b >= 2]  # train_one_epoch skips 1-image batches too
    g = torch.Generator().manual_seed(0)
    xs = {b: torch.randn(b, 3, s, s, generator=g).contiguous(memory_format=fmt) for b in set(sizes)}
    ys = {b: torch.randint(0, cfg.model.num_classes, (b,), generator=g) for b in set(sizes)}

    def epoch() -> None:
        model.train()
        for b in sizes:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = forward(xs[b])  # (b, C) log-probs
            loss = loss_fn(out.float(), ys[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def run() -> float:
        return timed(epoch)
    return run


def _faceclf_arithmetic(cfg) -> tuple[bool, bool]:
    """(channels_last, bf16 autocast) as faceclf's Trainer resolves them on this CPU."""
    from faceclf.training.loop import amp_dtype_for

    return cfg.training.channels_last, amp_dtype_for(torch.device("cpu"), cfg.training.amp) is not None


def _bf16_works(cfg) -> tuple[bool, str]:
    """Whether CPU autocast to bf16 runs this model (forward+backward) here, and why not."""
    from faceclf.training.loop import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        return False, "CPU has no native bf16 (avx512_bf16/amx_bf16 absent)"
    try:
        from faceclf.training.model import build_model

        m = build_model(cfg.model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(torch.randn(2, 3, cfg.data.image_size, cfg.data.image_size))
        out.float().sum().backward()
        return True, ""
    except Exception as e:  # noqa: BLE001 - any failure means: not measurable here
        return False, f"bf16 autocast failed: {type(e).__name__}: {e}"


def _subset(train, k: int):
    """k images of a decoded split, evenly spaced (so both classes stay), as a TensorSplit."""
    from faceclf.dataset.tensors import TensorSplit

    n = len(train.labels)
    if k >= n:
        return train
    idx = torch.linspace(0, n - 1, k).round().long().unique()
    return TensorSplit(train.images[idx].contiguous(), train.labels[idx].clone(),
                       [train.records[i] for i in idx.tolist()], [])


def bench_dataset(label: str, root: Path, image_size: int, reps: int, extra_reps: int,
                  limit: int | None = None, compile_floor: bool = True) -> list[dict[str, Any]]:
    """All rows for one data set: faceclf vs seed vs floor (interleaved), then what moves the floor."""
    faceset, train, decode_s = _load_train(root, image_size)
    if limit:
        train = _subset(train, limit)
        label = f"{label} subset"
    n = len(train.labels)
    cfg = _config(image_size, len(faceset.classes))
    channels_last, bf16 = _faceclf_arithmetic(cfg)
    arithmetic = f"{'channels_last' if channels_last else 'NCHW'}, {'bf16 autocast' if bf16 else 'fp32'}"
    where = f"{label}, {n} train imgs @{image_size}px"
    with tempfile.TemporaryDirectory(prefix="faceclf-seedtree-") as tmp:
        _symlink_tree(Path(tmp), faceset, train.records)
        seed_run, n_seed = _seed_epoch(cfg, Path(tmp), cfg.training.batch_size)
        faceclf_run = _faceclf_epoch(cfg, train)
        floor_run = _floor_epoch(cfg, n, cfg.training.batch_size, channels_last, bf16)
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
        row(NAME, f"faceclf epoch ({label})", fc, "s/epoch", note=f"{where}; batch 64; {arithmetic}; "
            f"{spread(t['faceclf'])}; {n / fc:.0f} img/s"),
        row(NAME, f"seed ImageFolder epoch ({label})", sd, "s/epoch", note=f"{n_seed} imgs; PIL decode+aug each epoch, "
            f"DataLoader num_workers=2, fp32 NCHW; {spread(t['seed'])}"),
        row(NAME, f"compute floor epoch ({label})", fl, "s/epoch", note=f"fwd+bwd+AdamW on in-memory tensors, "
            f"faceclf's arithmetic ({arithmetic}); {spread(t['floor'])}"),
        row(NAME, f"speed-up over seed ({label})", sd / fc, "x", "seed ImageFolder epoch", sd, sd / fc,
            f"seed/faceclf; goal >= {GOAL_SEED_RATIO}: {'met' if sd / fc >= GOAL_SEED_RATIO else 'NOT met'}"),
        row(NAME, f"overhead over compute floor ({label})", fc / fl, "x", "compute floor epoch", fl, fc / fl,
            f"faceclf/floor (same arithmetic); goal <= {GOAL_FLOOR_RATIO}: "
            f"{'met' if fc / fl <= GOAL_FLOOR_RATIO else 'NOT met'}"),
    ]
    rows.append(row(NAME, f"faceclf one-time decode ({label})", decode_s, "s", note="load_split of the train split, "
                    "paid once per run (not per epoch); single measurement"))
    return rows + floor_variant_rows(cfg, n, label, extra_reps, compile_floor)


def floor_variant_rows(cfg, n: int, label: str, reps: int, compile_floor: bool) -> list[dict[str, Any]]:
    """What moves the floor away from the seed's fp32 NCHW batch-64 arithmetic (same model, same image count)."""
    variants: list[tuple[str, dict]] = [("batch 32", {"batch_size": 32}), ("batch 128", {"batch_size": 128}),
                                        ("channels_last", {"batch_size": 64, "channels_last": True})]
    ok, why = _bf16_works(cfg)
    if ok:
        variants += [("bf16 autocast", {"batch_size": 64, "bf16": True}),
                     ("bf16 autocast + channels_last", {"batch_size": 64, "bf16": True, "channels_last": True})]
    if compile_floor:
        variants += [("torch.compile", {"batch_size": 64, "compile_model": True})]
        if ok:
            variants += [("torch.compile + bf16 + channels_last",
                          {"batch_size": 64, "bf16": True, "channels_last": True, "compile_model": True})]
    runs = {"fp32 batch 64 (reference)": _floor_epoch(cfg, n, 64)}
    runs.update({name: _floor_epoch(cfg, n, **kw) for name, kw in variants})
    warmup = {k: f() for k, f in runs.items()}  # not counted: allocator, thread pools, torch.compile's compilation
    vt: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):
        for k, f in runs.items():
            vt[k].append(f())
    ref = median(vt["fp32 batch 64 (reference)"])
    rows = []
    for k, ts in vt.items():
        m = median(ts)
        extra = f"; first epoch incl. compilation {warmup[k]:.1f} s" if "compile" in k else ""
        rows.append(row(NAME, f"floor: {k} ({label})", m, "s/epoch", "fp32 batch 64 floor", ref, ref / m,
                        f"what moves the floor; ratio = speed-up vs fp32 b64; {spread(ts)}{extra}"))
    if not ok:
        rows.append(row(NAME, f"floor: bf16 autocast ({label})", None, "", note=f"not measured: {why}"))
    return rows


def _seed_transforms(cfg, train: bool):
    """The seed's per-image PIL pipeline: resize (+ flip, rotation when training), tensor, normalise."""
    from torchvision import transforms

    s = cfg.data.image_size
    aug = [transforms.RandomHorizontalFlip(), transforms.RandomRotation(10)] if train else []
    return transforms.Compose([transforms.Resize((s, s)), *aug, transforms.ToTensor(),
                               transforms.Normalize(cfg.data.mean, cfg.data.std)])


def seed_fit_accuracy(cfg, trees: dict[str, Path]) -> float:
    """Train the seed pipeline for cfg.training.epochs (faceclf's optimiser and one-cycle schedule, fp32),
    keep the weights with the best validation loss, and return their test accuracy."""
    from torchvision import datasets

    from faceclf.training.model import build_model

    def loader(split: str, train: bool) -> torch.utils.data.DataLoader:
        ds = datasets.ImageFolder(str(trees[split]), transform=_seed_transforms(cfg, train))
        return torch.utils.data.DataLoader(ds, batch_size=cfg.training.batch_size, shuffle=train, num_workers=2)

    @torch.no_grad()
    def loss_and_accuracy(dl) -> tuple[float, float]:
        model.eval()
        loss, right, seen = 0.0, 0, 0
        for x, y in dl:
            out = model(x)  # (B, C) log-probs
            loss += float(nn.functional.nll_loss(out, y, reduction="sum"))
            right += int((out.argmax(1) == y).sum())
            seen += len(y)
        return loss / seen, right / seen

    torch.manual_seed(cfg.training.seed)
    train_dl, val_dl, test_dl = loader("train", True), loader("val", False), loader("test", False)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.training.learning_rate, weight_decay=cfg.training.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.training.learning_rate,
                                                total_steps=cfg.training.epochs * len(train_dl), pct_start=0.2)
    best, best_state = math.inf, None
    for _ in range(cfg.training.epochs):
        model.train()
        for x, y in train_dl:
            opt.zero_grad(set_to_none=True)
            nn.functional.nll_loss(model(x), y).backward()
            opt.step()
            sched.step()
        val_loss, _ = loss_and_accuracy(val_dl)
        if val_loss < best:
            best, best_state = val_loss, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return loss_and_accuracy(test_dl)[1]


def accuracy_rows(root: Path, epochs: int | None = None) -> list[dict[str, Any]]:
    """Test accuracy of faceclf's full training vs the seed pipeline's, same splits/model/epochs."""
    from faceclf.config import RunConfig
    from faceclf.dataset.discover import discover
    from faceclf.training.launch import run_training

    cfg = RunConfig()
    if epochs:
        cfg.training.epochs = epochs
    faceset = discover(root, cfg.data.split_fractions, cfg.data.decode_workers)  # the split run_training makes
    with tempfile.TemporaryDirectory(prefix="faceclf-accbench-") as tmp:
        t0 = time.perf_counter()
        metrics = run_training(root, Path(tmp) / "run", cfg)  # from the folder, as `faceclf train DATA`: hashes it too
        fc_s = time.perf_counter() - t0
        trees = {}
        for split in ("train", "val", "test"):
            trees[split] = Path(tmp) / "seed" / split
            _symlink_tree(trees[split], faceset, faceset.split(split))
        resolved = json.loads((Path(tmp) / "run" / "config.json").read_text())["data"]["image_size"]  # "auto" -> px
        model_cfg = _config(resolved, len(faceset.classes))
        model_cfg.training.epochs = cfg.training.epochs
        t0 = time.perf_counter()
        seed_acc = seed_fit_accuracy(model_cfg, trees)
        sd_s = time.perf_counter() - t0
    fc_acc, n_test = metrics["test"]["accuracy"], metrics["test"]["n"]
    where = f"face-mask, {n_test} test imgs @{resolved}px, up to {cfg.training.epochs} epochs, best val loss weights"
    return [
        row(NAME, "test accuracy: faceclf run_training", fc_acc, "", note=f"{where}; default RunConfig "
            f"(early stop at best epoch {metrics.get('best_epoch')}); whole run {fc_s:.0f} s incl. decode"),
        row(NAME, "test accuracy: seed pipeline", seed_acc, "", note=f"{where}; same model/AdamW/one-cycle, "
            f"fp32, PIL transforms each epoch; {sd_s:.0f} s"),
        row(NAME, "accuracy faceclf vs seed", fc_acc - seed_acc, "diff", "test accuracy: seed pipeline", seed_acc,
            None, f"faceclf - seed; goal >= 0 (equal or better): {'met' if fc_acc >= seed_acc else 'NOT met'}; "
            f"whole-run wall time seed/faceclf {sd_s / fc_s:.2f}x"),
    ]


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Measure and return the rows (see the module docstring)."""
    from faceclf.devtools.sample import generate_sample_faces

    warnings.filterwarnings("ignore", category=UserWarning)
    rows = machine_rows(NAME)
    reps, extra_reps = (2, 1) if quick else (5, 3)
    # --quick: a 384-image subset, no torch.compile rows (~40 s of compilation), 2-epoch accuracy runs
    if DATASET.is_dir():
        rows += bench_dataset("face-mask", DATASET, 96, reps, extra_reps, limit=384 if quick else None,
                              compile_floor=not quick)
    else:
        rows.append(row(NAME, "face-mask data set", None, note=f"not measured: {DATASET} is missing"))
    n_gen = 600 if quick else 10_000
    with tempfile.TemporaryDirectory(prefix="faceclf-genfaces-") as tmp:
        generate_sample_faces(tmp, per_class=n_gen // 2, size=64, seed=0)
        rows += bench_dataset(f"generated {n_gen}", Path(tmp), 64, reps, extra_reps, compile_floor=not quick)
    if DATASET.is_dir():
        rows += accuracy_rows(DATASET, epochs=2 if quick else None)
    return rows


if __name__ == "__main__":  # same as: python -m benchmarks --only train [--quick]
    from benchmarks.__main__ import main

    raise SystemExit(main(["--only", "train", *sys.argv[1:]]))
