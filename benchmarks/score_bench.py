"""Scoring throughput: faceclf's streaming scorer against the naive serial bound, and its parts.

    python -m benchmarks --only score [--quick]

A model is trained for 1 epoch on 120 generated faces (default settings: 96 px, batch 64) and exported
with faceclf.serving.export.export_onnx (uint8 pixel input); the same model is also exported with the
earlier float32 NCHW input. On two image sets, generated 64 px JPEGs (1,000; --quick 200) and the
face-mask photos (all 1,376; --quick 200), interleaved, medians over repetitions:

- naive serial bound (baseline): 1 / (1/PIL decode + 1/ORT on float32 normalised in numpy), i.e.
  decode everything, then score it, one after the other;
- faceclf end to end: faceclf.serving.stream.score_images on the folder (decode overlapped with ORT, parts, CSV);
- faceclf end to end with the int8 model (`faceclf export --int8`, calibrated on the run's val images);
- decode only: PIL alone (load_image's PIL path: draft + resize) and faceclf's load_image (libjpeg-turbo through
  simplejpeg at PIL's DCT scale for JPEGs: the same pixels);
- model only: the uint8-input model, its int8 variant, and the float32 variant with and without the numpy
  normalisation.

Then 2,000 (--quick 300) generated JPEGs in an S3 bucket on 127.0.0.1 (moto): streaming score vs download
then score, and a local Ray instance (Ray Data) vs the single process. Last, ORT vs torch eager (model
only). Goal (issue 11): faceclf end to end >= 2x the naive serial bound. Speed is measured, never asserted.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
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
GOAL_E2E_VS_NAIVE = 2.0


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


def model_batches(images: torch.Tensor, batch_size: int) -> list[np.ndarray]:
    """uint8 images (N, 3, S, S) -> the exported model's input, uint8 (B, S, S, 3) pixels, in contiguous batches."""
    x = images.permute(0, 2, 3, 1).numpy()
    return [np.ascontiguousarray(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def float_variant(ckpt_path: Path, out: Path):  # noqa: ANN201 - an onnxruntime session
    """The same model exported with the earlier float32 NCHW input (normalised outside), for (b2)."""
    import onnx
    import onnxruntime as ort

    from faceclf.serving.export import parity_batch, to_onnx_proto
    from faceclf.training.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    example = normalize_nchw(parity_batch(ckpt), ckpt)
    onnx.save_model(to_onnx_proto(model_from_checkpoint(ckpt, "cpu"), example), str(out))
    return ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def normalize_nchw(pixels: torch.Tensor, ckpt: dict) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> normalised float32 (B, 3, S, S), as the float variant takes it."""
    from faceclf.dataset.preprocess import Preprocess
    from faceclf.dataset.tensors import normalize

    return normalize(pixels.permute(0, 3, 1, 2), Preprocess.from_checkpoint(ckpt))


def _pick(files: list[Path], k: int | None) -> list[Path]:
    """k files evenly spaced over the sorted list (both classes kept), or all of them."""
    from faceclf.dataset.faceset import evenly_spread

    return [files[i] for i in evenly_spread(len(files), k)] if k else files


def int8_variant(ckpt_path: Path, onnx_path: Path) -> tuple[Path, str]:
    """model.int8.onnx of the benchmark's model (calibrated on the run's val images, never refused here: the
    figure wanted is its speed) and a note on how it agrees with fp32."""
    from faceclf.config import Int8Config
    from faceclf.serving.quantize import export_int8

    q = export_int8(ckpt_path, onnx_path, Int8Config(min_agreement=0.0))
    return q.path, f"agrees with fp32 on {q.agreement:.1%} of {q.images} val images"


def image_sets(work: Path, quick: bool) -> dict[str, list[Path]]:
    """face-mask photos (large JPEGs) and generated 64 px JPEGs, as files."""
    from benchmarks.s3_fixture import make_faces
    from faceclf.dataset.layout import list_images

    small = work / "small"
    for cls, name, data in make_faces(200 if quick else 1000, size=64):
        (small / cls).mkdir(parents=True, exist_ok=True)
        (small / cls / name).write_bytes(data)
    sets = {"64 px JPEGs": list_images(small)}
    if DATASET.is_dir():
        sets["face-mask photos"] = _pick(list_images(DATASET), 200 if quick else None)
    return sets


def measure_set(label: str, files: list[Path], onnx_path: Path, float_session, reps: int, work: Path,  # noqa: ANN001
                int8: tuple[Path, str]) -> list[dict]:
    """Rows for one image set: baseline, faceclf end to end (fp32 and int8 models), decode-only per decoder,
    model-only per input."""
    from faceclf.config import ScoreConfig
    from faceclf.dataset.preprocess import load_image, pil_decode
    from faceclf.dataset.tensors import decode_images
    from faceclf.serving.onnx_model import load_onnx_model
    from faceclf.serving.stream import score_images

    cfg = ScoreConfig(device="cpu")
    om = load_onnx_model(onnx_path, "cpu")
    q8 = load_onnx_model(int8[0], "cpu")
    size, n = om.image_size, len(files)
    images, _ok, _failed = decode_images(files, om.preprocess, cfg.decode_workers)
    pixels = model_batches(images, cfg.batch_size)
    floats = [om.preprocess.to_input(b) for b in pixels]
    datas = [p.read_bytes() for p in files]
    jpeg = all(d[:2] == b"\xff\xd8" for d in datas)
    fname = float_session.get_inputs()[0].name

    def decode(fn) -> None:  # noqa: ANN001
        with ThreadPoolExecutor(max(1, cfg.decode_workers)) as pool:
            list(pool.map(fn, datas))

    fns = {
        "e2e": lambda: score_images(onnx_path, files, work / "predictions.csv", cfg).seconds,
        "pil": lambda: timed(lambda: decode(lambda d: pil_decode(d, size))),
        "faceclf_decode": lambda: timed(lambda: decode(lambda d: load_image(io.BytesIO(d), size))),
        "ort_u8": lambda: timed(lambda: [om.session.run(None, {om.input_name: b}) for b in pixels]),
        "ort_f32": lambda: timed(lambda: [float_session.run(None, {fname: om.preprocess.to_input(b)}) for b in pixels]),
        "ort_f32_model": lambda: timed(lambda: [float_session.run(None, {fname: x}) for x in floats]),
        "e2e_int8": lambda: score_images(int8[0], files, work / "predictions-int8.csv", cfg).seconds,
        "ort_int8": lambda: timed(lambda: [q8.session.run(None, {q8.input_name: b}) for b in pixels]),
    }
    for f in fns.values():
        f()  # warm-up
    t: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):  # interleaved so background load hits all alike
        for k, f in fns.items():
            t[k].append(f())
    ips = {k: n / median(v) for k, v in t.items()}
    naive = 1 / (1 / ips["pil"] + 1 / ips["ort_f32"])  # decode all, then ORT on float32: one after the other
    where = f"{label}: {n} files @{size}px, batch {cfg.batch_size}, {cfg.decode_workers} threads"
    rows = [
        row(NAME, f"{label}: naive serial bound", naive, "img/s", note=f"{where}; 1/(1/PIL decode + 1/ORT float32 "
            "input normalised in numpy): decode then score, one after the other"),
        row(NAME, f"{label}: faceclf end to end", ips["e2e"], "img/s", "naive serial bound", naive,
            ips["e2e"] / naive, f"faceclf.serving.stream.score_images (uint8 model, decode overlapped, parts + CSV); "
            f"goal >= {GOAL_E2E_VS_NAIVE:g}x: {'met' if ips['e2e'] / naive >= GOAL_E2E_VS_NAIVE else 'NOT met'}; "
            f"{spread(t['e2e'])} s"),
        row(NAME, f"{label}: decode only, PIL (draft + resize)", ips["pil"], "img/s",
            note=f"load_image's PIL path alone, from bytes (the baseline's decoder); {spread(t['pil'])} s"),
        row(NAME, f"{label}: decode only, faceclf (libjpeg-turbo for JPEGs)", ips["faceclf_decode"], "img/s", "PIL",
            ips["pil"], ips["faceclf_decode"] / ips["pil"], "faceclf.dataset.preprocess.load_image: simplejpeg at "
            f"PIL's DCT scale, the same pixels{'' if jpeg else ' (not all files are JPEGs)'}; "
            f"{spread(t['faceclf_decode'])} s"),
        row(NAME, f"{label}: model only, uint8 pixels in", ips["ort_u8"], "img/s", "float32 input + numpy normalise",
            ips["ort_f32"], ips["ort_u8"] / ips["ort_f32"], "the exported model: cast/scale/layout in the graph"),
        row(NAME, f"{label}: model only, float32 in (pre-normalised)", ips["ort_f32_model"], "img/s",
            note="the earlier float32 NCHW export, normalisation not counted"),
        row(NAME, f"{label}: faceclf end to end, int8 model", ips["e2e_int8"], "img/s", "naive serial bound",
            naive, ips["e2e_int8"] / naive, f"`faceclf export --int8`'s model; {int8[1]}; {spread(t['e2e_int8'])} s"),
        row(NAME, f"{label}: model only, int8", ips["ort_int8"], "img/s", "uint8 pixels in, fp32", ips["ort_u8"],
            ips["ort_int8"] / ips["ort_u8"], "static QDQ, per-channel int8 weights, uint8 activations"),
    ]
    return rows


def streaming_rows(onnx_path: Path, n: int, work: Path) -> list[dict]:
    """S3 prefix on 127.0.0.1 (moto): streaming score vs download-then-score; a local Ray instance vs one process."""
    from benchmarks.s3_fixture import make_faces, upload_faces
    from faceclf.config import ScoreConfig
    from faceclf.devtools.services import local_s3_env, moto_s3_server
    from faceclf.serving.stream import score_images
    from faceclf.store.objects import open_store

    cfg = ScoreConfig(device="cpu")
    rows = []
    with moto_s3_server(work / "moto.log") as endpoint, local_s3_env(endpoint):
        upload_faces("bench", make_faces(n, size=64))
        url = "s3://bench/incoming/"

        def download_then_score() -> None:
            store, dest = open_store("s3://bench"), work / "copy"
            keys = [o.key for o in store.list("incoming/")]
            with ThreadPoolExecutor(cfg.fetch_workers) as pool:
                list(pool.map(lambda k: store.download(k, dest / k), keys))
            score_images(onnx_path, [dest], work / "copy.csv", cfg)

        stream = timed(lambda: score_images(onnx_path, [url], "s3://bench/predictions/stream/", cfg))
        copy = timed(download_then_score)
        rows.append(row(NAME, "S3 (127.0.0.1): streaming score", n / stream, "img/s", "download then score",
                        n / copy, copy / stream, f"{n} generated 64 px JPEGs on moto; {cfg.fetch_workers} fetch threads; "
                        "download: same threads, then score the folder"))
        try:
            import ray
        except ImportError:
            return rows + [row(NAME, "Ray Data (local) vs one process", None, note="not measured: ray not installed")]
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            on_ray = dataclasses.replace(cfg, ray_address="local")
            score_images(onnx_path, [url], "s3://bench/predictions/ray-warm/", on_ray)  # actor start-up once
            t_ray = timed(lambda: score_images(onnx_path, [url], "s3://bench/predictions/ray/", on_ray))
        finally:
            ray.shutdown()
        rows.append(row(NAME, "Ray Data on a local instance", n / t_ray, "img/s", "one process (streaming)",
                        n / stream, stream / t_ray, f"same {n} S3 images; {os.cpu_count()} CPUs to Ray, 1 ORT actor, "
                        "decode in Ray tasks; on 2 cores Ray's own processes share the cores"))
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Measure and return the rows (see the module docstring)."""
    from faceclf.dataset.layout import list_images
    from faceclf.dataset.tensors import decode_images
    from faceclf.serving.onnx_model import load_onnx_model
    from faceclf.training.checkpoint import load_checkpoint, model_from_checkpoint

    warnings.filterwarnings("ignore")
    logging.getLogger("faceclf").setLevel(logging.WARNING)
    rows = machine_rows(NAME)
    reps = 3 if quick else 5
    with tempfile.TemporaryDirectory(prefix="faceclf-scorebench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        ckpt_path, onnx_path = _train_and_export(work)
        setup_s = time.perf_counter() - t0
        float_session = float_variant(ckpt_path, work / "model-float.onnx")
        int8 = int8_variant(ckpt_path, onnx_path)
        for label, files in image_sets(work, quick).items():
            rows += measure_set(label, files, onnx_path, float_session, reps, work, int8)
        rows += streaming_rows(onnx_path, 300 if quick else 2000, work)

        # ORT vs torch eager on the face-mask photos (issue 5's comparison), model only.
        om = load_onnx_model(onnx_path, "cpu")
        files = _pick(list_images(DATASET), 200 if quick else None) if DATASET.is_dir() else list_images(work / "small")
        images = decode_images(files, om.preprocess, 2)[0]
        pixels = model_batches(images, 64)
        tmodel = model_from_checkpoint(load_checkpoint(ckpt_path), "cpu")
        tbatches = [torch.from_numpy(om.preprocess.to_input(b)) for b in pixels]

        @torch.no_grad()
        def torch_only() -> None:
            for b in tbatches:
                tmodel(b)

        def ort_only() -> None:
            for b in pixels:
                om.session.run(None, {om.input_name: b})

        torch_only(), ort_only()
        t_ort = [timed(ort_only) for _ in range(reps)]
        t_torch = [timed(torch_only) for _ in range(reps)]
    ort_ips, torch_ips = len(images) / median(t_ort), len(images) / median(t_torch)
    rows += [
        row(NAME, "ORT vs torch eager (model only)", ort_ips, "img/s", "torch eager, eval + no_grad", torch_ips,
            ort_ips / torch_ips, f"goal >= {GOAL_ORT_VS_TORCH:g}: {'met' if ort_ips / torch_ips >= GOAL_ORT_VS_TORCH else 'NOT met'}; "
            f"{len(images)} images, {torch.get_num_threads()} torch threads"),
        row(NAME, "setup: train 1 epoch + export", setup_s, "s", note="120 generated faces, default RunConfig; "
            "not part of the comparison"),
    ]
    return rows


if __name__ == "__main__":  # same as: python -m benchmarks --only score [--quick]
    from benchmarks.__main__ import main

    raise SystemExit(main(["--only", "score", *sys.argv[1:]]))
