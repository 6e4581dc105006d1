"""Scoring throughput: faceclf.serving.score end to end vs its parts (ONNX Runtime, torch eager, decode).

    python -m benchmarks.score_bench [--quick]

A model is trained for 1 epoch on a small generated face set (faceclf.training.run.train_run, default
settings: 96 px, batch 64) and exported with faceclf.serving.export.export_onnx. Then, on the same images
(the face-mask photos: all 1,376 files, --quick 200), interleaved, medians over repetitions:

(a) faceclf.serving.score.score end to end (decode of the next batch overlapped with inference, CSV written);
(b) ONNX Runtime model only, on pre-decoded, pre-normalised float32 batches of 64;
(c) torch eager model only on the same batches (eval, torch.no_grad), default allocator; (c2) the same
    after faceclf.training.loop.reuse_freed_memory() (measured last: it cannot be undone in-process);
(d) decode only: faceclf.dataset.preprocess.load_image over the files with score's thread count.

(b) and (c) take the same batches, built from the decoded uint8 images by the model's own preprocessing
preset (OnnxModel.preprocess.to_input, read from the ONNX metadata), exactly as score feeds ONNX Runtime.

Ratios: ORT/torch (goal >= 4) and end-to-end / min(decode-only, ORT model-only) (goal >= 0.8).
Speed is measured, never asserted.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._timing import (
    DATASET,
    machine_rows,
    median,
    row,
    spread,
    timed,
)

NAME = "score"
GOAL_ORT_VS_TORCH = 4.0
GOAL_E2E_VS_PARTS = 0.8


def _train_and_export(work: Path) -> tuple[Path, Path]:
    """1-epoch checkpoint on 120 generated faces (default settings otherwise), exported to ONNX.

    Trained in a child process (`faceclf train`, `faceclf export`), so this process stays what a
    `faceclf score` process is: training tunes the allocator (faceclf.training.loop.reuse_freed_memory),
    which would speed up the torch eager baseline here.
    """
    from faceclf.devtools.sample import generate_sample_faces

    generate_sample_faces(work / "faces", per_class=60, seed=0)
    ckpt, onnx_path = work / "run" / "checkpoint.pt", work / "model.onnx"
    for args in (["train", str(work / "faces"), "--out", str(work / "run"), "--epochs", "1"],
                 ["export", str(ckpt), "--out", str(onnx_path)]):
        subprocess.run([sys.executable, "-m", "faceclf.cli", *args], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return ckpt, onnx_path


def model_batches(om, images: torch.Tensor, batch_size: int) -> list[np.ndarray]:
    """uint8 images (N, 3, S, S) -> the model's float32 input, normalised by its preset, in contiguous batches.

    ``om.preprocess.to_input`` is what faceclf.serving.score applies before ONNX Runtime (it takes NHWC).
    """
    x = om.preprocess.to_input(images.permute(0, 2, 3, 1).numpy())  # (N, 3, S, S) float32
    return [np.ascontiguousarray(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def _pick(files: list[Path], k: int | None) -> list[Path]:
    """k files evenly spaced over the sorted list (both classes kept), or all of them."""
    if not k or k >= len(files):
        return files
    return [files[round(i * (len(files) - 1) / (k - 1))] for i in range(k)]


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Measure and return the rows (see the module docstring)."""
    from faceclf.config import ScoreConfig
    from faceclf.dataset.layout import list_images
    from faceclf.dataset.preprocess import load_image
    from faceclf.dataset.tensors import decode_images
    from faceclf.serving.score import load_onnx_model, score
    from faceclf.training.checkpoint import load_checkpoint, model_from_checkpoint

    warnings.filterwarnings("ignore")
    logging.getLogger("faceclf").setLevel(logging.WARNING)
    rows = machine_rows(NAME)
    if not DATASET.is_dir():
        rows.append(row(NAME, "face-mask data set", None, note=f"not measured: {DATASET} is missing"))
        return rows
    reps = 3 if quick else 5
    files = _pick(list_images(DATASET), 200 if quick else None)
    n = len(files)
    cfg = ScoreConfig(device="cpu")
    with tempfile.TemporaryDirectory(prefix="faceclf-scorebench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        ckpt_path, onnx_path = _train_and_export(work)
        setup_s = time.perf_counter() - t0
        om = load_onnx_model(onnx_path, "cpu")
        size = om.image_size
        tmodel = model_from_checkpoint(load_checkpoint(ckpt_path), "cpu")

        images, _ok, failed = decode_images(files, om.preprocess, cfg.decode_workers)
        batches = model_batches(om, images, cfg.batch_size)
        tbatches = [torch.from_numpy(b) for b in batches]
        n_ok = len(images)

        def e2e() -> float:
            summary = score(onnx_path, files, work / "predictions.csv", cfg)
            return summary.seconds  # from first batch to CSV written; excludes opening the model

        def ort_only() -> None:
            for b in batches:
                om.session.run(None, {om.input_name: b})

        @torch.no_grad()
        def torch_only() -> None:
            for b in tbatches:
                tmodel(b)

        def decode_only() -> None:
            with ThreadPoolExecutor(max(1, cfg.decode_workers)) as pool:
                list(pool.map(lambda p: load_image(p, size), files))

        fns = {"e2e": e2e, "ort": lambda: timed(ort_only), "torch": lambda: timed(torch_only),
               "decode": lambda: timed(decode_only)}
        for f in fns.values():
            f()  # warm-up (page cache, thread pools, ORT arena), not counted
        t: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(reps):  # interleaved so background load hits all four alike
            for k, f in fns.items():
                t[k].append(f())
        wall_e2e = timed(lambda: score(onnx_path, files, work / "predictions.csv", cfg))
        # Last, because it cannot be undone in this process: torch eager with glibc keeping freed
        # memory, as faceclf's training runs (model-only torch inference allocates MBs per batch).
        from faceclf.training.loop import reuse_freed_memory

        tuned = reuse_freed_memory()
        torch_only()
        t_tuned = [timed(torch_only) for _ in range(reps)]

    ips = {k: (n if k in ("e2e", "decode") else n_ok) / median(v) for k, v in t.items()}
    where = f"{n} face-mask files @{size}px, batch {cfg.batch_size}"
    parts = min(ips["decode"], ips["ort"])
    rows += [
        row(NAME, "(a) faceclf.serving.score end to end", ips["e2e"], "img/s", note=f"{where}; decode overlapped with ORT, "
            f"{cfg.decode_workers} decode threads, CSV written; {spread(t['e2e'])} s; one call incl. opening the model: "
            f"{n / wall_e2e:.0f} img/s"),
        row(NAME, "(b) ONNX Runtime model only", ips["ort"], "img/s", note=f"pre-decoded float32 batches; "
            f"provider {om.provider}; ORT default threads; {spread(t['ort'])} s"),
        row(NAME, "(c) torch eager model only", ips["torch"], "img/s", note=f"same batches, eval + no_grad, "
            f"{torch.get_num_threads()} torch threads; {spread(t['torch'])} s"),
        row(NAME, "(c2) torch eager, allocator tuned", n_ok / median(t_tuned), "img/s", note="same as (c) after "
            f"faceclf.training.loop.reuse_freed_memory() ({'applied' if tuned else 'not available here'}): glibc keeps freed "
            f"memory instead of unmapping it; {spread(t_tuned)} s"),
        row(NAME, "(d) decode only (load_image)", ips["decode"], "img/s", note=f"{cfg.decode_workers} threads "
            f"(score's count); {spread(t['decode'])} s"),
        row(NAME, "ORT vs torch eager (model only)", ips["ort"] / ips["torch"], "x", "(c) torch eager model only",
            ips["torch"], ips["ort"] / ips["torch"], f"ORT/torch; goal >= {GOAL_ORT_VS_TORCH:g}: "
            f"{'met' if ips['ort'] / ips['torch'] >= GOAL_ORT_VS_TORCH else 'NOT met'}"),
        row(NAME, "ORT vs torch eager, allocator tuned", ips["ort"] * median(t_tuned) / n_ok, "x",
            "(c2) torch eager, allocator tuned", n_ok / median(t_tuned), ips["ort"] * median(t_tuned) / n_ok,
            "ORT/(c2): the stronger torch baseline"),
        row(NAME, "end to end vs slower part", ips["e2e"] / parts, "x", "min(decode only, ORT only)", parts,
            ips["e2e"] / parts, f"e2e/min(d, b); goal >= {GOAL_E2E_VS_PARTS:g}: "
            f"{'met' if ips['e2e'] / parts >= GOAL_E2E_VS_PARTS else 'NOT met'}"),
        row(NAME, "end to end vs serial bound", ips["e2e"] * (1 / ips["decode"] + 1 / ips["ort"]), "x",
            "1/(1/decode + 1/ORT)", 1 / (1 / ips["decode"] + 1 / ips["ort"]), ips["e2e"] * (1 / ips["decode"] + 1 / ips["ort"]),
            "informational: decode and ORT both need the same CPU cores, so with no spare core overlap cannot beat "
            "running them one after the other"),
        row(NAME, "setup: train 1 epoch + export", setup_s, "s", note="120 generated faces, default RunConfig; "
            f"not part of the comparison; {len(failed)} of {n} files failed to decode"),
    ]
    return rows


if __name__ == "__main__":  # same as: python -m benchmarks --only score [--quick]
    from benchmarks.__main__ import main

    raise SystemExit(main(["--only", "score", *sys.argv[1:]]))
