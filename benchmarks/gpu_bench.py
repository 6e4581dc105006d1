"""GPU figures: training images/s on CUDA with AMP vs fp32 vs the seed pipeline on the same GPU, and
ONNX Runtime CUDA vs torch CUDA for scoring.

    python -m benchmarks --only gpu [--quick]

Training, on N generated 64 px faces (10,000; --quick 600), interleaved, medians:
- faceclf AMP:  train_one_epoch with the default Trainer (bf16 autocast, or fp16 + GradScaler on GPUs
                without bf16; channels_last), the uint8 train split resident on the GPU as fit() puts it;
- faceclf fp32: the same with amp off;
- seed:         ImageFolder + PIL transforms per epoch, DataLoader (one worker per core, pinned
                memory), fp32 model on the GPU: the input pipeline is the part that matters here.
Scoring, on the face-mask photos (all 1,376; --quick 200), batch 64, pre-decoded float32 batches
copied from the host in both cases: ONNX Runtime's CUDA provider vs torch eager on CUDA; and
faceclf.serving.stream.score_images end to end.

Without a CUDA GPU nothing is measured and one row says so. ``measure`` takes any device, so the
tests run this very code on the CPU.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks._timing import DATASET, machine_rows, median, row, spread, timed
from benchmarks.score_bench import _pick, _train_and_export, model_batches
from benchmarks.train_bench import (
    _config,
    _faceclf_epoch,
    _load_train,
    _seed_epoch,
    _symlink_tree,
    _sync,
)

NAME = "gpu"


def train_rows(device: torch.device, n_images: int, reps: int) -> list[dict[str, Any]]:
    """faceclf AMP vs faceclf fp32 vs the seed pipeline: training images/s on ``device``."""
    from faceclf.devtools.sample import generate_sample_faces
    from faceclf.training.loop import amp_dtype_for

    rows = []
    with tempfile.TemporaryDirectory(prefix="faceclf-gpubench-") as tmp:
        faces, tree = Path(tmp) / "faces", Path(tmp) / "tree"
        generate_sample_faces(faces, per_class=n_images // 2, size=64, seed=0)
        faceset, train, _ = _load_train(faces, 64)
        _symlink_tree(tree, faceset, train.records)
        amp_cfg, fp32_cfg = _config(64, len(faceset.classes)), _config(64, len(faceset.classes))
        fp32_cfg.training.amp = False
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        runs = {"faceclf AMP": _faceclf_epoch(amp_cfg, train, device),
                "faceclf fp32": _faceclf_epoch(fp32_cfg, train, device),
                "seed": _seed_epoch(fp32_cfg, tree, 64, device, workers)[0]}
        for f in runs.values():
            f()  # warm-up: CUDA context, cuDNN autotuning, DataLoader workers, page cache
        t: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(reps):
            for k, f in runs.items():
                t[k].append(f())
    n = len(train.labels)
    ips = {k: n / median(v) for k, v in t.items()}
    amp = amp_dtype_for(device, True)
    where = f"{n} generated imgs @64px, batch 64, {device.type}"
    rows += [
        row(NAME, "train: faceclf AMP", ips["faceclf AMP"], "img/s", note=f"{where}; autocast "
            f"{str(amp).replace('torch.', '') if amp else 'off (not available: fp32)'}; {spread(t['faceclf AMP'])} s"),
        row(NAME, "train: faceclf fp32", ips["faceclf fp32"], "img/s", note=f"{where}; {spread(t['faceclf fp32'])} s"),
        row(NAME, "train: seed pipeline", ips["seed"], "img/s", note=f"{where}; ImageFolder + PIL per epoch, "
            f"DataLoader {workers} workers, fp32; {spread(t['seed'])} s"),
        row(NAME, "train: AMP vs fp32", ips["faceclf AMP"] / ips["faceclf fp32"], "x", "train: faceclf fp32",
            ips["faceclf fp32"], ips["faceclf AMP"] / ips["faceclf fp32"], "faceclf AMP / faceclf fp32"),
        row(NAME, "train: faceclf vs seed", ips["faceclf AMP"] / ips["seed"], "x", "train: seed pipeline",
            ips["seed"], ips["faceclf AMP"] / ips["seed"], "faceclf AMP / seed, same GPU"),
    ]
    return rows


def score_rows(device: torch.device, files: list[Path], reps: int) -> list[dict[str, Any]]:
    """ONNX Runtime vs torch eager (model only) and faceclf.serving.stream.score_images end to end, on ``device``."""
    from faceclf.config import ScoreConfig
    from faceclf.dataset.tensors import decode_images
    from faceclf.serving.onnx_model import load_onnx_model
    from faceclf.serving.stream import score_images
    from faceclf.training.checkpoint import load_checkpoint, model_from_checkpoint

    cfg = ScoreConfig(device=device.type)
    with tempfile.TemporaryDirectory(prefix="faceclf-gpuscore-") as tmp:
        ckpt_path, onnx_path = _train_and_export(Path(tmp))
        om = load_onnx_model(onnx_path, device.type)
        tmodel = model_from_checkpoint(load_checkpoint(ckpt_path), device)
        images, _, _ = decode_images(files, om.preprocess, cfg.decode_workers)
        batches = model_batches(images, cfg.batch_size)  # uint8 (B, S, S, 3), the exported model's input
        floats = [om.preprocess.to_input(b) for b in batches]  # torch eager takes the normalised NCHW floats
        host = [torch.from_numpy(b).pin_memory() if device.type == "cuda" else torch.from_numpy(b) for b in floats]

        def ort_only() -> None:
            for b in batches:
                om.session.run(None, {om.input_name: b})

        @torch.no_grad()
        def torch_only() -> None:
            for b in host:
                tmodel(b.to(device, non_blocking=True)).cpu()  # the probabilities come back, as with ORT
            _sync(device)

        def e2e() -> float:
            return score_images(onnx_path, files, Path(tmp) / "predictions.csv", cfg).seconds

        fns = {"ort": lambda: timed(ort_only), "torch": lambda: timed(torch_only), "e2e": e2e}
        for f in fns.values():
            f()  # warm-up: sessions, cuDNN, arenas
        t: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(reps):
            for k, f in fns.items():
                t[k].append(f())
    n_ok, n = len(images), len(files)
    ips = {"ort": n_ok / median(t["ort"]), "torch": n_ok / median(t["torch"]), "e2e": n / median(t["e2e"])}
    where = f"{n} face-mask files @{om.image_size}px, batch {cfg.batch_size}"
    return [
        row(NAME, "score: ONNX Runtime model only", ips["ort"], "img/s", note=f"{where}; provider {om.provider}; "
            f"{spread(t['ort'])} s"),
        row(NAME, "score: torch eager model only", ips["torch"], "img/s", note=f"{where}; {device.type}, eval + "
            f"no_grad, host->device copy included; {spread(t['torch'])} s"),
        row(NAME, "score: ORT vs torch eager", ips["ort"] / ips["torch"], "x", "score: torch eager model only",
            ips["torch"], ips["ort"] / ips["torch"], "ORT / torch on the same device"),
        row(NAME, "score: faceclf.serving.stream.score_images end to end", ips["e2e"], "img/s", note=f"{where}; {cfg.decode_workers} decode "
            f"threads, {cfg.prefetch_batches} batches decoded ahead; {spread(t['e2e'])} s"),
    ]


def measure(device: torch.device, n_images: int, n_files: int | None, reps: int) -> list[dict[str, Any]]:
    """Every row of this benchmark on ``device`` (a GPU in real runs; the CPU in tests)."""
    from faceclf.dataset.layout import list_images

    rows = train_rows(device, n_images, reps)
    if DATASET.is_dir():
        rows += score_rows(device, _pick(list_images(DATASET), n_files), reps)
    else:
        rows.append(row(NAME, "face-mask data set", None, note=f"scoring not measured: {DATASET} is missing"))
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Measure on the first CUDA GPU, or say that there is none."""
    warnings.filterwarnings("ignore")
    logging.getLogger("faceclf").setLevel(logging.WARNING)
    rows = machine_rows(NAME)
    if not torch.cuda.is_available():
        rows.append(row(NAME, "GPU benchmarks", None, note="not measured: no CUDA GPU here "
                        "(torch.cuda.is_available() is False); the CPU figures are in train/score"))
        return rows
    return rows + measure(torch.device("cuda"), 600 if quick else 10_000, 200 if quick else None, 2 if quick else 5)


if __name__ == "__main__":  # same as: python -m benchmarks --only gpu [--quick]
    from benchmarks.__main__ import main

    raise SystemExit(main(["--only", "gpu", *sys.argv[1:]]))
