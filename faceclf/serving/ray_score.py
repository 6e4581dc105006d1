"""Scoring on a Ray cluster with Ray Data (the optional extra ``faceclf[ray]``; imported only when used).

    items (sorted keys, listed by the driver) -> chunks of ``ray_chunk`` keys
        -> ray.data.from_items -> map_batches(fetch_decode)        CPU tasks: read from the bucket, decode
        -> map_batches(OnnxScorer, ActorPoolStrategy(size=N))      ONNX Runtime actors, one GPU each on GPUs
        -> iter_batches (order preserved) -> the driver's PredictionOutput (parts, resume, final CSV)

Workers read images themselves: a bucket through boto3 on the worker, local paths only on a local
instance or a shared filesystem. Only where the bucket is travels in the tasks' runtime_env (the
driver's endpoint, region and retry settings: ``RAY_AWS_ENV``), never a credential: Ray's dashboard and
State API show every runtime_env, so each node signs with its own credential chain (its instance or
pod role, its own environment or ~/.aws; a local instance's workers inherit the driver's environment).
The model travels as bytes and is checked against its sha256 in every actor. Rows, and the size and
pixel limits, are the single-machine path's (faceclf.serving.stream).
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from faceclf.config import IngestConfig, ScoreConfig
from faceclf.serving.onnx_model import OnnxModel, predict_proba
from faceclf.serving.sources import Item, Source
from faceclf.store.registry import sha256_bytes

log = logging.getLogger(__name__)

# Where the bucket is and how to retry it: all a worker's boto3 needs from the driver. Credentials
# (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, ...) never travel.
RAY_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_MAX_ATTEMPTS",
               "AWS_RETRY_MODE")


def fetch_decode(batch: dict[str, np.ndarray], source: Source, image_size: int,
                 limits: IngestConfig) -> dict[str, np.ndarray]:
    """Ray task: keys -> uint8 images (B, S, S, 3), each decoded straight into its slot (zeros where the error
    column says why not), as a single machine's workers decode (faceclf.serving.stream.decode_checked)."""
    from faceclf.serving.stream import decode_checked, read_checked

    images = np.zeros((len(batch["key"]), image_size, image_size, 3), dtype=np.uint8)
    errors = []
    for k, (key, etag, size, path) in enumerate(zip(batch["key"], batch["etag"], batch["size"], batch["path"])):
        item = Item(str(key), str(etag), int(size) if size >= 0 else None, os.fsdecode(bytes(path)))
        data = read_checked(source, item, limits)
        error = data if isinstance(data, str) else decode_checked(data, image_size, limits, images[k])
        if error:
            images[k] = 0  # a failed decode may have written part of the slot
        errors.append(error or "")
    return {"key": batch["key"], "etag": batch["etag"], "image": images, "error": np.array(errors, dtype=object)}


class OnnxScorer:
    """Ray actor: one ONNX Runtime session (CUDA where the actor was given a GPU) scoring decoded batches."""

    def __init__(self, model_bytes: bytes, sha256: str, device: str):
        from faceclf.serving.onnx_model import load_onnx_model

        # The session holds the weights once built, so the file goes with its folder right away (an actor
        # pool per chunk of keys left a model-sized folder in /tmp per actor before).
        with tempfile.TemporaryDirectory(prefix="faceclf-ray-model-") as folder:
            path = Path(folder) / "model.onnx"
            path.write_bytes(model_bytes)
            self.model = load_onnx_model(path, device, expected_sha256=sha256)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        probs = np.zeros((len(ok), len(self.model.classes)), dtype=np.float32)
        if ok.any():
            probs[ok] = predict_proba(self.model, batch["image"][ok])
        return {"key": batch["key"], "etag": batch["etag"], "probs": probs, "error": batch["error"]}


def aws_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The driver's endpoint, region and retry settings (``RAY_AWS_ENV``) for the workers' boto3; never a
    credential, since a runtime_env is shown by Ray's dashboard and State API."""
    return {k: environ[k] for k in RAY_AWS_ENV if k in environ}


def cluster_gpus(ray: Any) -> int:
    """GPUs the cluster has (0 on CPU machines)."""
    return int(ray.cluster_resources().get("GPU", 0))


def score_items_on_ray(address: str, model: OnnxModel, source: Source, items: Iterable[Item], cfg: ScoreConfig,
                       reuse: Callable[[Item], dict[str, str] | None] = lambda item: None) -> Iterator[dict[str, str]]:
    """Rows of ``items`` in item order, scored by Ray Data on the cluster at ``address`` ("local": here)."""
    from faceclf.serving.stream import batches, image_limits, result_row
    from faceclf.training.ray_train import connect

    ray = connect(address)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows leave in key order: resume and incremental rely on it
    ctx.enable_progress_bars = False
    gpus = cluster_gpus(ray)
    actors = gpus or cfg.ray_actors
    model_bytes = model.path.read_bytes()
    log.info("scoring on Ray at %s: %d ONNX Runtime actor(s)%s", address, actors, " with one GPU each" if gpus else "")
    remote = {"runtime_env": {"env_vars": aws_env()}}
    for chunk in batches(items, cfg.ray_chunk):
        kept = [reuse(i) for i in chunk]
        todo = [i for i, r in zip(chunk, kept) if r is None]
        scored: Iterator[dict[str, Any]] = iter(())
        if todo:
            ds = ray.data.from_items([{"key": i.key, "etag": i.etag, "size": -1 if i.size is None else i.size,
                                       "path": os.fsencode(i.path)} for i in todo])  # bytes: not UTF-8 is fine
            ds = ds.map_batches(fetch_decode, batch_size=cfg.batch_size, batch_format="numpy",
                                fn_kwargs={"source": source, "image_size": model.image_size,
                                           "limits": image_limits(cfg)}, **remote)
            ds = ds.map_batches(OnnxScorer, batch_size=cfg.batch_size, batch_format="numpy",
                                compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=1 if gpus else 0,
                                fn_constructor_kwargs={"model_bytes": model_bytes, "sha256": sha256_bytes(model_bytes),
                                                       "device": "cuda" if gpus else "cpu"}, **remote)
            scored = itertools.chain.from_iterable(_rows_of(b) for b in ds.iter_batches(batch_size=None,
                                                                                      batch_format="numpy"))
        for item, row in zip(chunk, kept):
            if row is not None:
                yield row
                continue
            got = next(scored)
            if got["key"] != item.key:
                raise RuntimeError(f"Ray Data returned {got['key']!r} where {item.key!r} was expected")
            yield result_row(model, item, got["probs"] if not got["error"] else None, got["error"])


def _rows_of(batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    for k in range(len(batch["key"])):
        yield {"key": str(batch["key"][k]), "probs": batch["probs"][k], "error": str(batch["error"][k])}
