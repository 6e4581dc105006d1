"""Warm start against training from scratch, on the same nights: test accuracy and wall time.

    python -m benchmarks --only warmstart [--quick]

The face-mask photos are split by content hash (faceclf.dataset.discover, as `faceclf train` does). Night 1
trains from scratch (default config) on 70% of the train split (the lowest sha256 first: a fixed,
content-defined choice); night 2 has all of it (30% new images). Night 2 is trained three ways on the same
data and judged on the same test split: from scratch (15 epochs, the default), and warm-started from night
1's checkpoint for 3 and for 5 epochs. Seeds 0, 1, 2 (--quick: seed 0, scratch 5 epochs, warm 2).

Rows: night 2's test accuracy (mean over seeds; per seed in the note) and wall time (median) of each way;
the baseline of a warm row is the scratch row.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._timing import DATASET, machine_rows
from benchmarks.s3_fixture import row

NAME = "warmstart"
FIRST_NIGHT_SHARE = 0.7
WARM_EPOCHS = (3, 5)


def tree(faceset, dst: Path, train_share: float) -> int:
    """dst/{train,val,test}/<class>/ symlinks to ``faceset``'s files, train cut to ``train_share`` (lowest
    sha256 first); returns the number of train images."""
    n_train = 0
    for split in ("train", "val", "test"):
        for c in faceset.classes:
            records = sorted((r for r in faceset.split(split) if r.label == c), key=lambda r: r.sha256)
            if split == "train":
                records = records[:max(1, round(len(records) * train_share))]
                n_train += len(records)
            folder = dst / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for r in records:
                p = faceset.file(r).resolve()
                (folder / f"{r.sha256[:16]}{p.suffix}").symlink_to(p)
    return n_train


def night(data: Path, run: Path, seed: int, epochs: int | None, init_from: Path | None) -> dict[str, Any]:
    """One training run (default config otherwise): test accuracy, best epoch, wall seconds."""
    from faceclf.config import RunConfig
    from faceclf.training.run import train_run

    cfg = RunConfig()
    cfg.train.seed = seed
    if epochs:
        cfg.train.epochs = epochs
    if init_from:
        cfg.train.init_from = str(init_from)
    t0 = time.perf_counter()
    m = train_run(data, run, cfg)
    return {"acc": m["test"]["accuracy"], "best": m["best_epoch"], "s": time.perf_counter() - t0}


def run(quick: bool = False) -> list[dict]:
    """Night 2 from scratch vs warm-started from night 1, per seed."""
    import logging

    from faceclf.config import SPLIT_FRACTIONS
    from faceclf.dataset.discover import discover

    logging.getLogger("faceclf").setLevel(logging.WARNING)
    seeds, scratch_epochs, warm = ((0,), 5, (2,)) if quick else ((0, 1, 2), None, WARM_EPOCHS)
    faceset = discover(DATASET, SPLIT_FRACTIONS, 2)
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="faceclf-warmstart-") as tmp:
        root = Path(tmp)
        n1, n2 = tree(faceset, root / "night1", FIRST_NIGHT_SHARE), tree(faceset, root / "night2", 1.0)
        for seed in seeds:
            first = root / f"n1-s{seed}"
            night(root / "night1", first, seed, scratch_epochs, None)
            results.setdefault("scratch", []).append(night(root / "night2", root / f"scratch-s{seed}", seed,
                                                           scratch_epochs, None))
            for e in warm:
                results.setdefault(f"warm {e}", []).append(night(root / "night2", root / f"warm{e}-s{seed}", seed, e,
                                                                 first / "checkpoint.pt"))
    base = results["scratch"]
    rows = machine_rows(NAME)
    for way, rs in results.items():
        acc, secs = statistics.mean(r["acc"] for r in rs), statistics.median(r["s"] for r in rs)
        per_seed = ", ".join(f"seed {s}: {r['acc']:.3f} (best epoch {r['best']}, {r['s']:.1f} s)" for s, r in zip(seeds, rs))
        is_base = way == "scratch"
        rows.append(row(NAME, f"night 2 {way}: test accuracy", acc, "acc",
                        None if is_base else "scratch", None if is_base else statistics.mean(r["acc"] for r in base),
                        f"{n2} train images ({n2 - n1} new since night 1); {per_seed}"))
        rows.append(row(NAME, f"night 2 {way}: wall time", secs, "s", None if is_base else "scratch",
                        None if is_base else statistics.median(r["s"] for r in base), "median over seeds"))
    return rows
