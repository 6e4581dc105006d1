"""Class imbalance: test accuracy per class with class_weighting "none" vs "balanced".

    python -m benchmarks --only imbalance [--quick]

The face-mask photos are split by content hash (faceclf.dataset.discover, as `faceclf train` does), then
written as a train/ val/ test/ tree of symlinks in a temp folder with the minority class (without_mask)
cut to a quarter (and, in a full run, a tenth) of its images in train/ only (the lowest sha256 first: a
fixed, content-defined choice). val/ and test/ stay as they are, so test accuracy is measured on the same
images as on the full set. Each setting trains with faceclf.training.launch.run_training and the default config
otherwise, for seeds 0, 1, 2 (--quick: seed 0, 5 epochs). The full (balanced) set is trained with both
settings too, to check that "balanced" costs nothing when the classes are already balanced.

Rows: without_mask (minority) test accuracy, overall and with_mask (majority) test accuracy (the mean over
seeds), and the wall time of a run (the median: other work on the machine inflates single runs); the note
holds the per-seed figures. The baseline of a "balanced" row is the "none" row of the same data.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._timing import DATASET, machine_rows, row

NAME = "imbalance"
MINORITY = "without_mask"
KEEPS = (4, 10)    # the minority class keeps 1 in KEEP of its train images (--quick: 4 only)
SETTINGS = ("none", "balanced")


def imbalanced_tree(faceset, dst: Path, minority: str, keep: int) -> dict[str, dict[str, int]]:
    """dst/{train,val,test}/<class>/<name> symlinks to ``faceset``'s files, ``minority`` cut to 1 in ``keep``
    of its train images (lowest sha256 first); returns the image counts per split and class."""
    counts: dict[str, dict[str, int]] = {}
    for split in ("train", "val", "test"):
        for c in faceset.classes:
            records = sorted((r for r in faceset.split(split) if r.label == c), key=lambda r: r.sha256)
            if split == "train" and c == minority:
                records = records[:max(1, len(records) // keep)]
            folder = dst / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for r in records:
                p = faceset.file(r).resolve()
                (folder / f"{r.sha256[:16]}{p.suffix}").symlink_to(p)
            counts.setdefault(split, {})[c] = len(records)
    return counts


def train_once(faceset, weighting: str, seed: int, epochs: int | None) -> dict[str, Any]:
    """One default-config run on ``faceset`` (a temp run folder): test accuracies, best epoch, wall seconds."""
    from faceclf.config import RunConfig
    from faceclf.training.launch import run_training

    cfg = RunConfig()
    cfg.training.seed, cfg.training.class_weighting = seed, weighting
    if epochs:
        cfg.training.epochs = epochs
    with tempfile.TemporaryDirectory(prefix="faceclf-imbalance-run-") as run:
        t0 = time.perf_counter()
        m = run_training(faceset, run, cfg)
        seconds = time.perf_counter() - t0
    test = m["test"]
    return {"accuracy": test["accuracy"], "per_class": test["per_class_accuracy"], "n": test["n"],
            "best_epoch": m["best_epoch"], "seconds": seconds}


def _rows(data: str, results: dict[str, list[dict[str, Any]]], seeds: list[int], classes: list[str]) -> list[dict]:
    """Minority (without_mask), overall and majority accuracy and wall time per setting; "balanced" against
    "none" (ratio: balanced / none)."""
    majority = next(c for c in classes if c != MINORITY)
    figures: dict[str, Callable[[dict[str, Any]], float]] = {
        "minority test acc": lambda r: r["per_class"][MINORITY],
        "overall test acc": lambda r: r["accuracy"],
        "majority test acc": lambda r: r["per_class"][majority],
        "wall time per run": lambda r: r["seconds"],
    }
    out = []
    for what, get in figures.items():
        unit = "s" if what.startswith("wall") else "acc"
        center = statistics.median if unit == "s" else statistics.mean
        base = center([get(r) for r in results["none"]])
        for setting in SETTINGS:
            values = [get(r) for r in results[setting]]
            value = center(values)
            per_seed = ", ".join(f"seed {s}: {v:.3f}" for s, v in zip(seeds, values))
            epochs = ", ".join(str(r["best_epoch"]) for r in results[setting])
            note = f"{per_seed}; best epochs {epochs}" if unit == "acc" else per_seed
            if setting == "none":
                out.append(row(NAME, f"{data}, none: {what}", value, unit, note=note))
            else:
                delta = f"{value - base:+.3f} vs none; " if unit == "acc" else ""
                out.append(row(NAME, f"{data}, balanced: {what}", value, unit, baseline="none, same seeds",
                               baseline_value=base, ratio=value / base if base else None, note=delta + note))
    return out


def run(quick: bool = False) -> list[dict]:
    """Train none vs balanced on the 1:4 and 1:10 face-mask sets and on the full set (seeds 0-2 each)."""
    from faceclf.config import RunConfig
    from faceclf.dataset.discover import discover

    rows = machine_rows(NAME)
    if not DATASET.is_dir():
        return rows + [row(NAME, "imbalance", None, note=f"not measured: {DATASET} is missing")]
    seeds, epochs, keeps = ([0], 5, KEEPS[:1]) if quick else ([0, 1, 2], None, KEEPS)
    cfg = RunConfig()
    full = discover(DATASET, cfg.data.split_fractions, cfg.data.decode_workers)
    for keep in keeps:
        with tempfile.TemporaryDirectory(prefix="faceclf-imbalance-") as tmp:
            counts = imbalanced_tree(full, Path(tmp), MINORITY, keep)
            cut = discover(tmp, cfg.data.split_fractions, cfg.data.decode_workers)  # as run_training sees the tree
            rows.append(row(NAME, f"1:{keep} set: images per split", sum(counts["train"].values()), "train",
                            note="; ".join(f"{s} {c}" for s, c in counts.items())
                            + f" ({MINORITY} train cut to 1 in {keep}; val/test as in the full set)"))
            results = {w: [train_once(cut, w, s, epochs) for s in seeds] for w in SETTINGS}
            rows += _rows(f"1:{keep} set", results, seeds, list(cut.classes))
    results = {w: [train_once(full, w, s, epochs) for s in seeds] for w in SETTINGS}
    rows += _rows("full set", results, seeds, list(full.classes))
    return rows
