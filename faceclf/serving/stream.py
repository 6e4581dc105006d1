"""Bulk scoring as a bounded stream: list -> workers that each read, decode and score a batch -> parts -> CSV.

Each of ``decode_workers`` threads takes a whole batch: reads its files, decodes them into one uint8
(B, S, S, 3) array and runs ONNX Runtime on it with one intra-op thread (``score_batch``). libjpeg-turbo,
Pillow's resize and ONNX Runtime release the GIL, so every core runs model or decoder and no image moves
between threads. From a bucket, ``fetch_workers`` threads fetch bytes ahead of the workers.

Nothing is copied to local disk first and memory does not grow with the number of images: at most
``decode_workers + prefetch_batches + 1`` batches are in flight, the listing is read page by page, and rows
leave in parts of ``part_rows``. Keys are processed in sorted order, which is what makes resume (after the
last written key) and ``incremental`` (a merge with the previous CSV) constant-memory too.

Images are bounded as ingest bounds them (faceclf.dataset.checks): an object over ``max_bytes`` (its listed
size) is never read, and format, sides and pixel count are judged from the header before any pixel is
decoded (a WebP from its own chunk header, since opening one allocates its canvas). Each refusal is an
error row; the run goes on.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from faceclf.config import IngestConfig, MonitorConfig, ScoreConfig, json_ready
from faceclf.dataset import jpeg
from faceclf.dataset.checks import FORMAT_ALIASES, Refused, bomb_reason, check_header, webp_canvas
from faceclf.dataset.layout import sha256_file
from faceclf.dataset.preprocess import decode_into
from faceclf.progress import progress
from faceclf.serving.monitor import Tally, brief, summarize
from faceclf.serving.output import WRITTEN_BY, PredictionOutput, PreviousRows, columns, destination, prob_columns
from faceclf.serving.onnx_model import OnnxModel, load_onnx_model, predict_proba
from faceclf.serving.sources import Item, Source, open_source, require_images
from faceclf.store.objects import Store

log = logging.getLogger(__name__)


@dataclass
class ScoreSummary:
    """What a scoring run did and how fast."""

    out: str            # where the final CSV is (local path or s3:// URI)
    images: int         # rows in the final CSV
    scored: int         # rows without an error
    errors: int         # rows with an error (undecodable or vanished image)
    seconds: float
    images_per_s: float  # images run through the model by this run, per second
    provider: str
    version: str
    reused: int = 0     # rows kept from the previous CSV (--incremental)
    resumed: int = 0    # rows a killed run had already written
    monitor: dict[str, Any] | None = None  # predictions.json "monitor": the label-free accuracy estimate and alarms


def batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """Consecutive lists of ``size`` items (the last may be shorter), read lazily."""
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def image_limits(cfg: ScoreConfig) -> IngestConfig:
    """Ingest's checks with scoring's limits: ``cfg``'s bytes and pixels, any side from 1 pixel, and ingest's
    format allow-list (JPEG, PNG, WebP: what a model is trained on; a .bmp or .gif gets an error row)."""
    return IngestConfig(max_bytes=cfg.max_bytes, max_pixels=cfg.max_pixels, min_side=1)


def image_header(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header alone; an exception where Pillow cannot identify the bytes.

    A WebP from its own chunk header (opening one in Pillow allocates its whole canvas), a JPEG through
    libjpeg-turbo's header parser (2.5 us a face-mask JPEG; a second Pillow open took 100 us of Python,
    under the GIL the decode threads need), anything else from Pillow's open (header only).
    """
    if canvas := webp_canvas(data):
        return "WEBP", *canvas
    if jpeg.simplejpeg is not None and data.startswith(b"\xff\xd8\xff"):
        try:
            height, width, _, _ = jpeg.simplejpeg.decode_jpeg_header(data)
            return "JPEG", width, height
        except ValueError:
            pass  # Pillow's turn: it may still read it, or say why not
    with Image.open(io.BytesIO(data)) as img:
        return FORMAT_ALIASES.get(img.format or "", img.format or "unknown"), *img.size


def header_problem(data: bytes, limits: IngestConfig) -> str | None:
    """Why ``data`` must not be decoded (format, sides or pixel count from its header), or None.

    Ingest's own checks (faceclf.dataset.checks), without its full decode: the decode that follows does
    that. Bytes whose header cannot be read give None, so the decoder's message names what is wrong.
    """
    try:
        check_header(*image_header(data), limits)
    except Refused as e:
        return str(e)
    except Image.DecompressionBombError as e:  # PIL's own guard, from the header
        return bomb_reason(limits, e)
    except Exception:  # noqa: BLE001 - untrusted bytes: the decode below reports them in its own words
        return None
    return None


def read_checked(source: Source, item: Item, limits: IngestConfig) -> bytes | str:
    """An item's bytes, or why not: over the size limit (as listed: never read; or grown since), unreadable,
    or gone between listing and reading."""
    if item.size is not None and item.size > limits.max_bytes:
        return f"object of {item.size} bytes is over the {limits.max_bytes}-byte limit; not read"
    try:
        data = source.read(item, limits.max_bytes)
    except FileNotFoundError:
        return "image disappeared between listing and reading"
    except OSError as e:  # a folder, no permission, ...: this image's problem, not the run's
        return f"cannot read image: {type(e).__name__}: {e.strerror or e}"
    if len(data) > limits.max_bytes:
        return f"object is over the {limits.max_bytes}-byte limit (it grew after listing); not decoded"
    return data


def decode_checked(data: bytes, size: int, limits: IngestConfig, out: np.ndarray) -> str | None:
    """Decode ``data`` into ``out`` (uint8 (size, size, 3)) once its header passes ``limits``; the reason it
    does not (format, sides, pixels, undecodable), or None."""
    return header_problem(data, limits) or decode_into(data, size, out)


def result_row(model: OnnxModel, item: Item, probs: np.ndarray | None, error: str) -> dict[str, str]:
    """A CSV row: probabilities (C,) to 6 decimals, or (``probs`` None) the error with empty class columns."""
    names = prob_columns(model.classes)
    if probs is None:
        return _row(model, names, item, error, None, [])
    return _row(model, names, item, error, int(probs.argmax()), probs.tolist())


def result_rows(model: OnnxModel, items: Sequence[Item], errors: Sequence[str],
                probs: np.ndarray) -> list[dict[str, str]]:
    """``result_row`` of each item: one whose error is "" takes the next row of ``probs`` ((G, C) for the G such
    items), one with an error gets empty class columns. argmax and tolist run once for the batch."""
    names = prob_columns(model.classes)
    best, values = iter(probs.argmax(axis=1).tolist()), iter(probs.tolist())
    rows = []
    for item, error in zip(items, errors):
        scored = not error
        rows.append(_row(model, names, item, error, next(best) if scored else None, next(values) if scored else []))
    return rows


def _row(model: OnnxModel, names: list[str], item: Item, error: str, best: int | None,
         values: list[float]) -> dict[str, str]:
    """One row in ``columns`` order: class ``best`` (None: "") and ``values`` as '%.6f' of a Python float (the
    text f"{float(v):.6f}" gave, faster), or empty class columns when there are no values."""
    row = {"path": item.key, "predicted_class": "" if best is None else model.classes[best]}
    row.update(zip(names, ["%.6f" % v for v in values] if values else [""] * len(names)))
    row["error"], row["model_version"], row["etag"] = error, model.version, item.etag
    return row


def score_batch(model: OnnxModel, batch: Sequence[Item], data: Sequence[bytes | str | Future] | None,
                source: Source, limits: IngestConfig) -> list[dict[str, str]]:
    """Rows of ``batch``: each item read (or its fetched ``data``), decoded into one uint8 (B, S, S, 3) array
    and the decodable ones scored in one ONNX Runtime call. Runs whole on one worker thread: libjpeg-turbo
    and ONNX Runtime release the GIL, so each core decodes and scores its own batch without handing images
    between threads."""
    size = model.image_size
    images = np.empty((len(batch), size, size, 3), np.uint8)  # filled slot by slot, no array per image
    errors: list[str] = []
    for k, item in enumerate(batch):
        got = data[k] if data is not None else read_checked(source, item, limits)
        got = got.result() if isinstance(got, Future) else got
        errors.append(got if isinstance(got, str) else decode_checked(got, size, limits, images[k]) or "")
    good = [k for k, e in enumerate(errors) if not e]
    probs = np.empty((0, len(model.classes)))
    if good:
        probs = predict_proba(model, images if len(good) == len(batch) else images[good])  # (G, C)
    return result_rows(model, batch, errors, probs)


def score_items(model: OnnxModel, source: Source, items: Iterable[Item], cfg: ScoreConfig,
                reuse: Callable[[Item], dict[str, str] | None] = lambda item: None) -> Iterator[dict[str, str]]:
    """One row per item, in item order, from ``cfg.decode_workers`` threads that each decode and score whole
    batches (``score_batch``), ``prefetch_batches`` more in flight. From a bucket, ``fetch_workers``
    threads fetch the bytes ahead (the network, not the CPU, bounds them). An item ``reuse`` returns a row
    for is neither fetched nor scored."""
    limits = image_limits(cfg)
    fetching = ThreadPoolExecutor(cfg.fetch_workers) if _remote(source) else None
    with ThreadPoolExecutor(cfg.decode_workers) as scoring:
        def submit(batch: list[Item]) -> tuple[list[dict[str, str] | None], Future]:
            kept = [reuse(i) for i in batch]
            todo = [i for i, row in zip(batch, kept) if row is None]
            data = [fetching.submit(read_checked, source, i, limits) for i in todo] if fetching else None
            return kept, scoring.submit(score_batch, model, todo, data, source, limits)

        try:
            stream = batches(items, cfg.batch_size)
            pending = deque(submit(b) for b in itertools.islice(stream, cfg.decode_workers + cfg.prefetch_batches))
            while pending:
                kept, work = pending.popleft()
                if (nxt := next(stream, None)) is not None:
                    pending.append(submit(nxt))
                scored = iter(work.result())
                yield from (row if row is not None else next(scored) for row in kept)
        finally:
            if fetching:
                fetching.shutdown(cancel_futures=True)


def scoring_threads(cfg: ScoreConfig) -> int:
    """ONNX Runtime threads per session call: 1 where several workers each score their own batch (the cores
    are theirs), else ORT's default (0: one per core)."""
    return 1 if cfg.decode_workers > 1 else 0


def _remote(source: Source) -> bool:
    """True when reading an item waits on the network (threads beyond the cores then pay)."""
    return source.uri.startswith("s3://")


def monitor_summary(model: OnnxModel, tally: Tally, cfg: MonitorConfig) -> dict[str, Any]:
    """The run's monitor block (faceclf.serving.monitor.summarize) for ``model``'s reference, logged in one line."""
    summary = summarize(tally, model.reference, cfg, model.temperature)
    (log.warning if summary["alarms"] else log.info)("model %s: %s", model.version, brief(summary))
    return summary


def score_images(model_path: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
          cfg: ScoreConfig | None = None, expected_sha256: str | None = None, incremental: bool = False,
          store: Store | None = None, monitor: MonitorConfig | None = None) -> ScoreSummary:
    """Score every image of ``inputs`` (local files/folders, one s3://BUCKET/PREFIX, or a prefix of
    ``store``) into ``out`` (a .csv path, a local folder or s3://BUCKET/PREFIX/ -> predictions.csv).

    Columns: path, predicted_class, p_<class>..., error, model_version, etag. An undecodable file, or
    one over ``cfg.max_bytes`` / ``cfg.max_pixels``, gets a row with its error and the run goes on. A
    rerun replaces the CSV; a killed run's rerun resumes from its parts. ``incremental`` keeps the
    previous CSV's rows whose (key, etag, model version) match and scores only the rest (all of them
    again, with a warning, when that CSV is malformed). ``out`` is refused under the bucket's models/,
    datasets/ or incoming/, and where a file exists that an earlier scoring run did not write. With
    ``expected_sha256`` a model file whose sha256 differs is refused before onnxruntime opens it. An
    input without images raises NoImages.

    Every row without an error (new, reused or resumed) also feeds a label-free estimate of the model's accuracy
    on these images, set against its test accuracy with ``monitor``'s alarms (faceclf.serving.monitor): it is
    logged and recorded under "monitor" in predictions.json and the returned summary.
    """
    cfg = cfg or ScoreConfig()
    model = load_onnx_model(model_path, cfg.device, expected_sha256, scoring_threads(cfg))
    source = open_source(inputs, store)
    require_images(source)
    log.info("scoring %s with %s on %s (model version %s)", source.uri, model.path, model.provider, model.version)
    output = PredictionOutput(destination(out), columns(model.classes),
                              {"model_version": model.version, "source": source.uri,
                               "columns": ",".join(columns(model.classes)), "written_by": WRITTEN_BY}, cfg.part_rows)
    start_after = output.begin()
    tally = Tally(model.classes)
    for row in output.resumed_rows():
        tally.add_row(row)
    items = source.items(start_after)
    previous = PreviousRows(output.previous_rows(), model.version) if incremental else None
    reused = 0

    def reuse(item: Item) -> dict[str, str] | None:
        nonlocal reused
        row = previous.reusable(item.key, item.etag) if previous else None
        reused += row is not None
        return row

    if cfg.ray_address:
        from faceclf.serving.ray_score import score_items_on_ray

        rows_of = score_items_on_ray(cfg.ray_address, model, source, items, cfg, reuse)
    else:
        rows_of = score_items(model, source, items, cfg, reuse)
    t0 = time.perf_counter()
    new = 0
    for row in progress(rows_of, desc="score", unit="img"):
        output.write(row)
        tally.add_row(row)
        new += 1
    seconds = time.perf_counter() - t0
    fresh = new - reused
    watched = monitor_summary(model, tally, monitor or MonitorConfig())

    def run_record(rows: int, errors: int) -> dict[str, Any]:
        return {**output.identity, "model_sha256": sha256_file(model.path), "provider": model.provider,
                "config": json_ready(dataclasses.asdict(cfg)), "incremental": incremental, "images": rows,
                "errors": errors, "reused": reused, "resumed": rows - new, "scored_now": fresh,
                "seconds": round(seconds, 3), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "monitor": watched}

    rows, errors = output.finish(run_record)
    summary = ScoreSummary(output.dest.uri(), rows, rows - errors, errors, seconds,
                           fresh / seconds if seconds > 0 else 0.0, model.provider, model.version,
                           reused=reused, resumed=rows - new, monitor=watched)
    log.info("scored %d images (%d errors; %d kept from the previous run, %d from a killed run) in %.2fs: "
             "%.1f images/s on %s", rows, errors, reused, summary.resumed, seconds, summary.images_per_s,
             model.provider)
    return summary
