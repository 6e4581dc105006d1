"""image_size "auto" against the fixed 96 px: test accuracy and wall time on 64 px faces.

    python -m benchmarks --only imagesize [--quick]

2,000 generated 64 px faces (faceclf.devtools.sample; --quick: 400) are trained with the default config
twice per seed: image_size 96 (each face upsampled to 96 px) and "auto" (the median short side: 64 px),
seeds 0, 1, 2 (--quick: seed 0, 5 epochs). The face-mask photos' median short side is 320 px, so "auto"
gives 96 there: the same runs as today.

Rows: test accuracy (mean over seeds; per seed in the note) and wall time (median) of each setting; the
baseline of the "auto" rows is the 96 px rows.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._timing import machine_rows
from benchmarks.s3_fixture import row

NAME = "imagesize"


def run(quick: bool = False) -> list[dict]:
    """Default training at 96 px and at "auto" on 64 px faces, per seed."""
    import logging

    from faceclf.config import RunConfig
    from faceclf.devtools.sample import generate_sample_faces
    from faceclf.training.launch import run_training

    logging.getLogger("faceclf").setLevel(logging.WARNING)
    seeds, epochs, per_class = ((0,), 5, 200) if quick else ((0, 1, 2), None, 1000)
    results: dict[str, list[tuple[float, float, int]]] = {"96": [], "auto": []}
    with tempfile.TemporaryDirectory(prefix="faceclf-imagesize-") as tmp:
        data = Path(tmp) / "faces"
        generate_sample_faces(data, per_class=per_class, size=64, seed=7)
        for seed in seeds:
            for setting in results:
                cfg = RunConfig()
                cfg.training.seed = seed
                cfg.data.image_size = 96 if setting == "96" else "auto"
                if epochs:
                    cfg.training.epochs = epochs
                t0 = time.perf_counter()
                m = run_training(data, Path(tmp) / f"{setting}-{seed}", cfg)
                results[setting].append((m["test"]["accuracy"], time.perf_counter() - t0, m["test"]["n"]))
    rows = machine_rows(NAME)
    base = results["96"]
    for setting, rs in results.items():
        is_base = setting == "96"
        per_seed = ", ".join(f"seed {s}: {a:.3f} ({t:.1f} s)" for s, (a, t, _) in zip(seeds, rs))
        rows.append(row(NAME, f"image_size {setting}: test accuracy", statistics.mean(a for a, _, _ in rs), "acc",
                        None if is_base else "96 px", None if is_base else statistics.mean(a for a, _, _ in base),
                        f"{2 * per_class} generated 64 px faces, {rs[0][2]} test images; {per_seed}"))
        rows.append(row(NAME, f"image_size {setting}: wall time", statistics.median(t for _, t, _ in rs), "s",
                        None if is_base else "96 px", None if is_base else statistics.median(t for _, t, _ in base),
                        "median over seeds; includes hashing and decoding the folder"))
    return rows
