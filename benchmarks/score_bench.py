"""Scoring at its CPU ceiling (issue 27): what `faceclf score` costs against what its model and decoder cost.

    python -m benchmarks --only score [--quick]

A model is trained for 1 epoch on 200 generated 64 px faces (defaults otherwise: image_size auto = 64) and
exported (uint8 pixel input), plus its int8 variant. Two image sets, each copied into a folder and scored as
a user scores a folder: generated 64 px JPEGs (4,000; --quick 400) and the face-mask photos (all 1,376;
--quick 200). For each, interleaved, medians over repetitions, wall time and the CPU time of the whole
process (every thread):

- plain script (baseline): read + PIL decode on every core, then ONNX Runtime with its defaults on batches,
  then a CSV: one after the other, as a user would write it;
- faceclf end to end: faceclf.serving.stream.score_images on the folder (listing, parts, CSV), fp32 and int8;
- model alone: batches of decoded pixels through ONNX Runtime, as faceclf runs it (one ORT thread per
  worker, a batch per worker) and with ORT's defaults (one caller, a thread per core);
- decode alone: bytes in memory -> uint8 (S, S, 3), faceclf's decoder (libjpeg-turbo into the batch array)
  and PIL's;
- the ratio of faceclf's CPU per image to (model alone + decode alone), the lower model figure: goal <= 1.2.

Then the stages one at a time on one thread (CPU microseconds an image: list, read, header check, decode,
model, rows, CSV), the model's own levers on the 64 px set (graph optimisation level, batch size, threads,
int8; CPU per image and agreement with the default), the S3 endpoint on 127.0.0.1 (streaming vs download
then score), a local Ray instance, and ORT vs torch eager. Speed is measured, never asserted.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks._timing import (DATASET, cpu_seconds, cpu_timed, machine_rows, median, row, spread, stolen_seconds,
                                timed)

NAME = "score"
GOAL_ORT_VS_TORCH = 4.0
GOAL_CPU_RATIO = 1.2  # faceclf's CPU per image at most 1.2x (model alone + decode alone)
MODEL_SIZE = 64       # generated faces of this side train the model: image_size auto = 64, as the issue measured


def _train_and_export(work: Path, size: int = MODEL_SIZE) -> tuple[Path, Path]:
    """1-epoch checkpoint on 200 generated ``size`` px faces (default settings otherwise), exported to ONNX.

    Trained in a child process (`faceclf train`, `faceclf export`), so this process stays what a
    `faceclf score` process is: training tunes the allocator (faceclf.training.loop.reuse_freed_memory),
    which would speed up the torch eager baseline here.
    """
    from faceclf.devtools.sample import generate_sample_faces

    generate_sample_faces(work / "faces", per_class=100, size=size, seed=0)
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


def image_sets(work: Path, quick: bool) -> dict[str, Path]:
    """Folders to score: generated 64 px JPEGs, and the face-mask photos (large JPEGs) copied in."""
    from benchmarks.s3_fixture import make_faces
    from faceclf.dataset.layout import list_images

    small = work / "small"
    for cls, name, data in make_faces(400 if quick else 4000, size=64):
        (small / cls).mkdir(parents=True, exist_ok=True)
        (small / cls / name).write_bytes(data)
    sets = {"64 px JPEGs": small}
    if DATASET.is_dir():
        photos = work / "photos"
        for f in _pick(list_images(DATASET), 200 if quick else None):
            (photos / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, photos / f.parent.name / f.name)
        sets["face-mask photos"] = photos
    return sets


def session(onnx_path: Path, threads: int = 0, level: str = "ORT_ENABLE_ALL", spinning: bool = False):  # noqa: ANN201
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (0: its default) at graph ``level``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def run_model(sess, batches: list[np.ndarray], callers: int) -> list[np.ndarray]:  # noqa: ANN001
    """Every batch through ``sess``: from ``callers`` threads at once (a batch each), or one after the other."""
    name = sess.get_inputs()[0].name
    call: Callable[[np.ndarray], np.ndarray] = lambda b: sess.run(None, {name: b})[0]  # noqa: E731
    if callers <= 1:
        return [call(b) for b in batches]
    with ThreadPoolExecutor(callers) as pool:
        return list(pool.map(call, batches))


def decoded_batches(datas: list[bytes], size: int, batch_size: int, workers: int) -> list[np.ndarray]:
    """faceclf's decoder alone: bytes in memory -> uint8 (B, S, S, 3) batches, a batch per thread."""
    from faceclf.dataset.preprocess import decode_into

    def one(start: int) -> np.ndarray:
        chunk = datas[start:start + batch_size]
        out = np.empty((len(chunk), size, size, 3), np.uint8)
        for k, d in enumerate(chunk):
            decode_into(d, size, out[k])
        return out

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(0, len(datas), batch_size)))


def pil_decoded(datas: list[bytes], size: int, workers: int) -> list[np.ndarray]:
    """PIL alone (draft + resize), an image per call, on ``workers`` threads."""
    from faceclf.dataset.preprocess import pil_decode

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda d: pil_decode(d, size), datas))


def plain_script(files: list[Path], sess, size: int, batch_size: int, workers: int, out: Path) -> None:  # noqa: ANN001
    """The baseline a user writes: read and PIL-decode every file on every core, then the model with ORT's
    defaults batch by batch, then a CSV of probabilities: one stage after the other."""
    from faceclf.dataset.preprocess import pil_decode

    with ThreadPoolExecutor(workers) as pool:
        images = np.stack(list(pool.map(lambda f: pil_decode(f.read_bytes(), size), files)))
    probs = np.exp(np.concatenate(run_model(sess, [images[i:i + batch_size]
                                                   for i in range(0, len(images), batch_size)], 1)))
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([str(p), *(f"{v:.6f}" for v in pr)] for p, pr in zip(files, probs))


def measure_set(label: str, folder: Path, onnx_path: Path, int8_path: Path, reps: int, work: Path) -> list[dict]:
    """End to end against plain script, model alone and decode alone, wall and CPU (module docstring)."""
    from faceclf.config import ScoreConfig
    from faceclf.dataset.layout import list_images
    from faceclf.serving.onnx_model import load_onnx_model
    from faceclf.serving.stream import score_images, scoring_threads

    cfg = ScoreConfig(device="cpu")
    workers, bs = cfg.decode_workers, cfg.batch_size
    files = list_images(folder)
    size, n = load_onnx_model(onnx_path, "cpu").image_size, len(files)
    datas = [f.read_bytes() for f in files]
    batches = decoded_batches(datas, size, bs, workers)
    ours, ort_default = session(onnx_path, scoring_threads(cfg)), session(onnx_path)
    ours8 = session(int8_path, scoring_threads(cfg))
    fns: dict[str, Callable[[], Any]] = {
        "plain": lambda: plain_script(files, ort_default, size, bs, workers, work / "plain.csv"),
        "e2e": lambda: score_images(onnx_path, [folder], work / "predictions.csv", cfg),
        "model": lambda: run_model(ours, batches, workers),
        "model_ort": lambda: run_model(ort_default, batches, 1),
        "decode": lambda: decoded_batches(datas, size, bs, workers),
        "pil": lambda: pil_decoded(datas, size, workers),
        "e2e_int8": lambda: score_images(int8_path, [folder], work / "predictions-int8.csv", cfg),
        "model_int8": lambda: run_model(ours8, batches, workers),
    }
    for f in fns.values():
        f()  # warm-up: imports, page cache, ORT's first-run allocations
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    stolen0, t0 = stolen_seconds(), time.perf_counter()
    for _ in range(reps):  # interleaved, so background load hits all alike
        for k, f in fns.items():
            w, c = cpu_timed(f)
            wall[k].append(w)
            cpu[k].append(c)
    stolen = (stolen_seconds() - stolen0) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))
    ips = {k: n / median(v) for k, v in wall.items()}
    us = {k: median(v) / n * 1e6 for k, v in cpu.items()}
    busy = {k: median(cpu[k]) / median(wall[k]) for k in fns}
    model_us = min(us["model"], us["model_ort"])
    bound = model_us + us["decode"]
    ratio = us["e2e"] / bound
    where = (f"{label}: {n} files @{size}px, batch {bs}, {workers} workers; the host took {stolen:.0%} of the "
             "cores' time meanwhile (steal)")

    def fig(k: str) -> str:
        return f"{us[k]:.0f} us CPU/img, {busy[k]:.2f} cores busy; wall {spread(wall[k])} s"

    return [
        row(NAME, f"{label}: plain script", ips["plain"], "img/s", note=f"{where}; PIL decode on {workers} threads, "
            f"then ORT defaults, then csv: one after the other; {fig('plain')}"),
        row(NAME, f"{label}: faceclf end to end", ips["e2e"], "img/s", "plain script", ips["plain"],
            ips["e2e"] / ips["plain"], f"score_images on the folder (list, parts, CSV); {fig('e2e')}"),
        row(NAME, f"{label}: model alone (faceclf's threads)", ips["model"], "img/s", "ORT defaults",
            ips["model_ort"], ips["model"] / ips["model_ort"], f"1 ORT thread x {workers} callers: {fig('model')}; "
            f"ORT defaults ({workers} threads, one caller): {fig('model_ort')}"),
        row(NAME, f"{label}: decode alone (faceclf)", ips["decode"], "img/s", "PIL decode alone", ips["pil"],
            ips["decode"] / ips["pil"], f"libjpeg-turbo into the batch array, bytes in memory: {fig('decode')}; "
            f"PIL: {fig('pil')}"),
        row(NAME, f"{label}: CPU/img, faceclf / (model + decode)", us["e2e"], "us/img", "model + decode alone",
            bound, ratio, f"model {model_us:.0f} + decode {us['decode']:.0f} us; goal <= {GOAL_CPU_RATIO:g}x: "
            f"{'met' if ratio <= GOAL_CPU_RATIO else 'NOT met'}; against model + PIL decode: "
            f"{us['e2e'] / (model_us + us['pil']):.2f}x"),
        row(NAME, f"{label}: faceclf end to end, int8 model", ips["e2e_int8"], "img/s", "fp32 model", ips["e2e"],
            ips["e2e_int8"] / ips["e2e"], f"{fig('e2e_int8')}; model alone int8 {fig('model_int8')}"),
    ]


def stage_rows(label: str, folder: Path, onnx_path: Path, work: Path) -> list[dict]:
    """CPU microseconds an image for each stage of score_images, run one stage at a time on one thread."""
    from faceclf.config import ScoreConfig
    from faceclf.serving import stream
    from faceclf.serving.onnx_model import load_onnx_model, predict_proba
    from faceclf.serving.output import PredictionOutput, columns, destination
    from faceclf.serving.sources import LocalSource

    cfg = ScoreConfig(device="cpu")
    model = load_onnx_model(onnx_path, "cpu", threads=1)
    limits, size, source = stream.image_limits(cfg), model.image_size, LocalSource([folder])
    timings: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        c0 = cpu_seconds()
        got = fn()
        timings[name] = cpu_seconds() - c0
        return got

    items = stage("list (walk, stat)", lambda: list(source.items()))
    datas = stage("read", lambda: [stream.read_checked(source, i, limits) for i in items])
    stage("header check", lambda: [stream.header_problem(d, limits) for d in datas])
    images = np.empty((len(items), size, size, 3), np.uint8)
    images[:] = 0  # pages touched before the decode is timed
    stage("decode (into the batch array)", lambda: [stream.decode_checked(d, size, limits, images[k])
                                                    for k, d in enumerate(datas)])
    probs = stage("model (1 ORT thread)", lambda: np.concatenate(
        [predict_proba(model, images[i:i + cfg.batch_size]) for i in range(0, len(images), cfg.batch_size)]))
    rows = stage("rows (text of each row)", lambda: [stream.result_row(model, i, p, "") for i, p in zip(items, probs)])
    out = Path(tempfile.mkdtemp(prefix="stages-", dir=work)) / "predictions.csv"

    def write() -> None:
        output = PredictionOutput(destination(out), columns(model.classes), {"run": "stages"}, cfg.part_rows)
        output.begin()
        for r in rows:
            output.write(r)
        output.finish(lambda rows, errors: {"rows": rows})

    stage("CSV (parts, joined)", write)
    n, total = len(items), sum(timings.values())
    return [row(NAME, f"{label}: stage {k}", v / n * 1e6, "us/img", "all stages", total / n * 1e6, v / total,
                f"{n} images, one thread, one stage at a time") for k, v in timings.items()]


def model_rows(folder: Path, onnx_path: Path, int8_path: Path, reps: int) -> list[dict]:
    """The model's own levers on one image set: CPU per image and agreement with the default configuration."""
    from faceclf.config import ScoreConfig
    from faceclf.dataset.layout import list_images

    cfg = ScoreConfig(device="cpu")
    workers = cfg.decode_workers
    datas = [f.read_bytes() for f in list_images(folder)]
    images = np.concatenate(decoded_batches(datas, MODEL_SIZE, cfg.batch_size, workers))
    n = len(images)

    def split(bs: int) -> list[np.ndarray]:
        return [np.ascontiguousarray(images[i:i + bs]) for i in range(0, n, bs)]

    variants = {  # name: (model, threads, level, batch size, callers, spinning)
        f"default: ALL, batch {cfg.batch_size}, 1 thread x {workers}": (onnx_path, 1, "ORT_ENABLE_ALL", cfg.batch_size, workers, False),
        "level DISABLE_ALL": (onnx_path, 1, "ORT_DISABLE_ALL", cfg.batch_size, workers, False),
        "level BASIC": (onnx_path, 1, "ORT_ENABLE_BASIC", cfg.batch_size, workers, False),
        "level EXTENDED": (onnx_path, 1, "ORT_ENABLE_EXTENDED", cfg.batch_size, workers, False),
        "batch 16": (onnx_path, 1, "ORT_ENABLE_ALL", 16, workers, False),
        "batch 256": (onnx_path, 1, "ORT_ENABLE_ALL", 256, workers, False),
        f"{workers} threads x 1 caller, no spinning": (onnx_path, workers, "ORT_ENABLE_ALL", cfg.batch_size, 1, False),
        f"{workers} threads x 1 caller, spinning": (onnx_path, workers, "ORT_ENABLE_ALL", cfg.batch_size, 1, True),
        "int8 (static QDQ)": (int8_path, 1, "ORT_ENABLE_ALL", cfg.batch_size, workers, False),
    }
    results = {}
    for name, (path, threads, level, bs, callers, spin) in variants.items():
        sess, batches = session(path, threads, level, spin), split(bs)
        out = np.exp(np.concatenate(run_model(sess, batches, callers)))
        cpus = [cpu_timed(lambda: run_model(sess, batches, callers))[1] for _ in range(reps)]
        results[name] = (median(cpus) / n * 1e6, out)
    base_us, base_p = next(iter(results.values()))
    shares = op_shares(onnx_path, split(cfg.batch_size))
    rows = []
    for name, (us, p) in results.items():
        diff = float(np.abs(p - base_p).max())
        same = float(np.mean(p.argmax(1) == base_p.argmax(1)))
        rows.append(row(NAME, f"model lever: {name}", us, "us/img", "default", base_us, us / base_us,
                        f"{n} 64 px images; max |p - default p| {diff:.1e}, same class {same:.1%}"))
    rows.append(row(NAME, "model: where its time goes (ORT profile)", shares.pop("Conv"), "share", note="Conv; "
                    + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()) + "; default configuration, one thread"))
    return rows


INPUT_OPS = frozenset({"Transpose", "Cast", "Mul", "Sub"})  # the graph's own uint8 NHWC -> normalised NCHW


def op_shares(onnx_path: Path, batches: list[np.ndarray]) -> dict[str, float]:
    """Share of ONNX Runtime's kernel time per kind of node (one thread, the optimised graph): Conv, MaxPool,
    the input's layout and normalisation (INPUT_OPS), the rest."""
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="ortprof-")) / "ort")
    sess = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    run_model(sess, batches, 1)
    events = json.loads(Path(sess.end_profiling()).read_text())
    time_by: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            kind = "input layout + normalisation" if op in INPUT_OPS else op if op in ("Conv", "MaxPool") else "rest"
            time_by[kind] = time_by.get(kind, 0.0) + e["dur"]
    total = sum(time_by.values()) or 1.0
    return {k: v / total for k, v in sorted(time_by.items(), key=lambda kv: -kv[1])}


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
    reps = 2 if quick else 5
    with tempfile.TemporaryDirectory(prefix="faceclf-scorebench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        ckpt_path, onnx_path = _train_and_export(work)
        setup_s = time.perf_counter() - t0
        int8_path, int8_note = int8_variant(ckpt_path, onnx_path)
        sets = image_sets(work, quick)
        for label, folder in sets.items():
            rows += measure_set(label, folder, onnx_path, int8_path, reps, work)
        for label, folder in sets.items():
            rows += stage_rows(label, folder, onnx_path, work)
        rows += model_rows(sets["64 px JPEGs"], onnx_path, int8_path, reps)
        rows[-1]["note"] += f"; {int8_note}"
        rows += streaming_rows(onnx_path, 300 if quick else 2000, work)

        # ORT vs torch eager (issue 5's comparison), model only.
        om = load_onnx_model(onnx_path, "cpu")
        images = decode_images(list_images(next(iter(sets.values()))), om.preprocess, 2)[0]
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
        row(NAME, "setup: train 1 epoch + export", setup_s, "s", note="200 generated 64 px faces, default RunConfig; "
            "not part of the comparison"),
    ]
    return rows


if __name__ == "__main__":  # same as: python -m benchmarks --only score [--quick]
    from benchmarks.__main__ import main

    raise SystemExit(main(["--only", "score", *sys.argv[1:]]))
