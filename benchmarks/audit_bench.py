"""Label audit (issue 25, item 3): precision and recall of faceclf.nightly.audit with labels flipped on purpose.

    python -m benchmarks --only audit [--quick]

Per set, a FaceSet is built from a folder of class folders (faceclf.dataset.discover, split as `faceclf train`
splits it) and a champion is trained on it with the project's entry point (faceclf.training.launch.run_training,
default config: it learns from train/, stops early on val/) and exported to ONNX (faceclf.serving.export).
The test split then plays tonight's arriving images: for each fraction (5%, 10%, 20%) and seed (0, 1, 2) that
share of its images, drawn at random, get another class as their label (binary: the other one); the val split
is the reference the per-class thresholds also come from, as a night passes it. The audit runs through
audit_labels (decode, ONNX Runtime, cleanlab), and its flags are scored against the flips:

    precision   flipped among the flagged      recall   flagged among the flipped

Sets: face-mask (../shared/datasets/face-mask, 1,376 photos, with_mask / without_mask) and generated cartoon
faces (faceclf.devtools.sample, 64 px, 600 per class). 0% flips is measured as well: what the audit flags on
labels as they came (the champion's confident disagreements; in a real set, some are real label errors).

Rows per set: the champion's test accuracy, then per fraction precision and recall (the mean over seeds,
range and per-seed counts in the note); the baseline of each is the same figure with thresholds from the new
(test) images alone, without the val split: what the design's val reference buys. Then the audit's wall time.
--quick: face-mask with 3 epochs, generated faces at 100 per class and 3 epochs, fraction 10% only, seed 0.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks._timing import DATASET, machine_rows, row

NAME = "audit"
FRACTIONS = (0.05, 0.10, 0.20)   # share of the arriving (test) images whose label is flipped
SEEDS = (0, 1, 2)                # which images are flipped
GENERATED = (600, 64)            # generated faces: per class, pixels (--quick: 100 per class)


def champion(data: Path, run: Path, epochs: int | None) -> tuple[Any, Path, float]:
    """(FaceSet, ONNX champion, its test accuracy): ``data`` split by discover, trained with the default config
    through faceclf.training.launch.run_training, exported to run/model.onnx."""
    from faceclf.config import RunConfig
    from faceclf.dataset.discover import discover
    from faceclf.serving.export import export_onnx
    from faceclf.training.launch import run_training

    cfg = RunConfig()
    if epochs:
        cfg.training.epochs = epochs
    faceset = discover(data, cfg.data.split_fractions, cfg.data.decode_workers)
    metrics = run_training(faceset, run, cfg)
    model = export_onnx(run / "checkpoint.pt", run / "model.onnx").path
    return faceset, model, metrics["test"]["accuracy"]


def flip(items: Sequence[tuple[str, str, Path, str]], classes: Sequence[str], fraction: float,
         seed: int) -> tuple[list[tuple[str, str, Path, str]], set[str]]:
    """``items`` with round(fraction * len) labels, drawn with ``seed``, changed to another class (drawn too);
    and the keys of the flipped ones."""
    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(items)), round(fraction * len(items))))
    out = [(k, s, p, rng.choice([c for c in classes if c != label]) if i in chosen else label)
           for i, (k, s, p, label) in enumerate(items)]
    return out, {items[i][0] for i in chosen}


def score(flagged: set[str], flipped: set[str]) -> tuple[float, float]:
    """(precision, recall) of ``flagged`` against ``flipped``; precision 1 when nothing is flagged, recall 1 when
    nothing is flipped (no wrong flag, no missed flip)."""
    hit = len(flagged & flipped)
    return (hit / len(flagged) if flagged else 1.0), (hit / len(flipped) if flipped else 1.0)


def measure(name: str, faceset: Any, model: Path, fractions: Sequence[float],
            seeds: Sequence[int]) -> dict[float, list[dict[str, Any]]]:
    """Per fraction, per seed: the flags of audit_labels with the val reference and with none, scored."""
    from faceclf.nightly.audit import audit_labels

    test = [(i.path, i.sha256, faceset.file(i), i.label) for i in faceset.split("test")]
    val = [(faceset.file(i), i.label) for i in faceset.split("val")]
    out: dict[float, list[dict[str, Any]]] = {}
    for fraction in (0.0, *fractions):
        for seed in (seeds if fraction else seeds[:1]):
            new, flipped = flip(test, faceset.classes, fraction, seed)
            t0 = time.perf_counter()
            with_val = {r.key for r in audit_labels(model, new, val)}
            seconds = time.perf_counter() - t0
            alone = {r.key for r in audit_labels(model, new, [])}
            p, r = score(with_val, flipped)
            p0, r0 = score(alone, flipped)
            out.setdefault(fraction, []).append({"seed": seed, "flipped": len(flipped), "flagged": len(with_val),
                                                 "hit": len(with_val & flipped), "p": p, "r": r, "p_alone": p0,
                                                 "r_alone": r0, "flagged_alone": len(alone), "s": seconds})
            print(f"  {name} {fraction:.0%} seed {seed}: flipped {len(flipped)}, flagged {len(with_val)} "
                  f"(right {len(with_val & flipped)}): precision {p:.3f} recall {r:.3f}; new-only thresholds "
                  f"flagged {len(alone)}: precision {p0:.3f} recall {r0:.3f}", flush=True)
    return out


def set_rows(name: str, faceset: Any, accuracy: float, got: dict[float, list[dict[str, Any]]]) -> list[dict]:
    """The rows of one set (see the module docstring)."""
    n_test, n_val = len(faceset.split("test")), len(faceset.split("val"))
    clean = got[0.0][0]
    rows = [row(NAME, f"{name}: champion test accuracy", accuracy, "acc",
                note=f"{len(faceset.split('train'))} train / {n_val} val / {n_test} test images; with no flips the "
                     f"audit flags {clean['flagged']} of the {n_test} test images (new-only thresholds: "
                     f"{clean['flagged_alone']})")]
    for fraction, rs in got.items():
        if not fraction:
            continue
        for what, key in (("precision", "p"), ("recall", "r")):
            values, alone = [r[key] for r in rs], [r[f"{key}_alone"] for r in rs]
            value, base = statistics.mean(values), statistics.mean(alone)
            counts = "; ".join(f"seed {r['seed']}: {r['hit']} of {r['flipped'] if key == 'r' else r['flagged']}"
                               for r in rs)
            rows.append(row(NAME, f"{name}, {fraction:.0%} flipped: {what}", value, "share",
                            baseline="thresholds on new only", baseline_value=base,
                            ratio=value / base if base else None,
                            note=f"range {min(values):.3f}..{max(values):.3f}; {counts}"))
    seconds = [r["s"] for rs in got.values() for r in rs]
    rows.append(row(NAME, f"{name}: audit wall time", statistics.median(seconds), "s",
                    note=f"audit_labels over {n_test} new + {n_val} val images (decode, ONNX Runtime, cleanlab); "
                         f"median of {len(seconds)}"))
    return rows


def run(quick: bool = False) -> list[dict]:
    """Train a champion per set, flip labels of its test split, audit, score (see the module docstring)."""
    import logging

    from faceclf.devtools.sample import generate_sample_faces

    logging.getLogger("faceclf").setLevel(logging.WARNING)
    fractions, seeds, epochs = ((0.10,), SEEDS[:1], 3) if quick else (FRACTIONS, SEEDS, None)
    per_class, size = (100, GENERATED[1]) if quick else GENERATED
    rows = machine_rows(NAME)
    with tempfile.TemporaryDirectory(prefix="faceclf-audit-") as tmp:
        root = Path(tmp)
        sets = [("generated", root / "generated")]
        generate_sample_faces(root / "generated", per_class=per_class, size=size, seed=0)
        if DATASET.is_dir():
            sets.insert(0, ("face-mask", DATASET))
        else:
            rows.append(row(NAME, "face-mask", None, note=f"not measured: {DATASET} is missing"))
        for name, data in sets:
            faceset, model, accuracy = champion(data, root / f"run-{name}", epochs)
            rows += set_rows(name, faceset, accuracy, measure(name, faceset, model, fractions, seeds))
    return rows
