"""Prefect flow `score`: batch-score an S3 prefix or a local folder with the champion (or a given version).

Deployed on demand as `score/face` (deployments/prefect.yaml).

Its parameters are untrusted (the Prefect server has no login), so where they lead is checked before
anything is written: a local source or output must lie inside the worker's own folder (its working
directory) or a folder the deployment lists in FACECLF_ALLOW_PATHS (os.pathsep-separated, set in the
worker's environment, never a parameter); an s3:// output must be in the flow's own bucket; a key must
be a plain one outside models/, datasets/ and incoming/ (faceclf.serving.output).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from faceclf.config import ScoreConfig
from faceclf.serving.output import check_output_key
from faceclf.serving.stream import ScoreSummary
from faceclf.serving.stream import score_images
from faceclf.store import registry
from faceclf.store.local_paths import allowed_roots, confine
from faceclf.store.objects import LocalStore, Store, open_store, parse_s3_url, resolve_location
from flows.common import IO_RETRIES
from flows.params import SCORE_GROUPS, ScoringParams, config_of, refuse_old_parameters



@dataclass(frozen=True)
class FetchedModel:
    """A model file downloaded and verified against the registry's sha256."""

    version: str
    path: Path
    sha256: str


@task(cache_policy=NONE, **IO_RETRIES)
def fetch_model(location: str, version: str | None, work: str, int8: bool = False) -> FetchedModel:
    """Download the champion's (or ``version``'s) model.onnx, or its model.int8.onnx with ``int8``, checking
    its sha256 against the registry."""
    store = open_store(location)
    name = registry.INT8_MODEL_FILE if int8 else registry.MODEL_FILE
    dest = Path(work) / name
    if version is None:
        pointer = registry.read_champion(store)
        if pointer is None:
            raise ValueError(f"no champion in {store.uri(registry.CHAMPION_KEY)}: run the train flow first or pass version=")
        version = pointer["version"]
        if int8:  # champion.json holds the fp32 model's sha256; the int8 file is checked against sha256.json
            path = registry.fetch_model(store, version, dest, name=name)
        else:
            path = registry.fetch_model(store, version, dest, pointer.get("model_sha256"), "champion.json")
    else:
        path = registry.fetch_model(store, version, dest, name=name)
    return FetchedModel(version, Path(path), registry.sha256_bytes(Path(path).read_bytes()))


def default_output(version: str, source: str, int8: bool = False) -> str:
    """predictions/<version>/<source>/predictions.csv (predictions.int8.csv for the int8 model): the same key
    on a rerun, so it resumes or, with ``incremental``, scores only what changed; a local folder source is
    named by its folder name."""
    where = f"local/{Path(source).name}" if Path(source).is_dir() else source.strip("/") or "all"
    return f"predictions/{version}/{where}/predictions{'.int8' if int8 else ''}.csv"


def output_location(store: Store, output: str, roots: list[Path] | None = None) -> str:
    """A flow ``output`` as stream.score_images takes it, once it is known to stay in its place: an s3:// URL in the
    flow's own bucket, a local path (/, ./, ../) inside ``roots`` (default ``allowed_roots()``), anything
    else a plain key of the store outside models/, datasets/ and incoming/ (in a local bucket folder, inside
    ``roots`` too). ValueError naming the output otherwise."""
    roots = allowed_roots() if roots is None else roots
    if output.startswith("s3://"):
        if parse_s3_url(output)[0] != store.uri().rstrip("/"):
            raise ValueError(f"output {output!r} is not in the flow's bucket {store.uri()}; expected "
                             f"{store.uri()}PREFIX/ or a key such as predictions/...")
        return output
    if output.startswith(("/", "./", "../")):
        confine(output, roots, "output")
        return output
    target = store.uri(check_output_key(output))
    if isinstance(store, LocalStore):
        confine(target, roots, "output")
    return target


def check_source(source: str, roots: list[Path] | None = None) -> None:
    """ValueError when ``source`` is read from local disk (it exists here) outside ``roots`` (default
    ``allowed_roots()``); a prefix of the bucket is not a local path and passes."""
    if Path(source).exists():
        confine(source, allowed_roots() if roots is None else roots, "source")


@task(cache_policy=NONE, **IO_RETRIES)
def score_stream(model: FetchedModel, location: str, source: str, output: str, cfg: ScoreConfig,
                 incremental: bool) -> ScoreSummary:
    """List, fetch, decode and score ``source`` straight into ``output`` (parts, then one CSV).

    A retry of this task, or a rerun of the flow, resumes from the parts already written. The model's
    sha256 is checked again as it loads."""
    store = open_store(location)
    check_source(source)
    return score_images(model.path, [source], output_location(store, output), cfg,
                        expected_sha256=model.sha256, incremental=incremental, store=store)


@flow(name="score", log_prints=True)
def score(bucket: str | None = None, source: str = "incoming/", version: str | None = None,
          output: str | None = None, incremental: bool = False, int8: bool = False,
          scoring: ScoringParams = ScoringParams()) -> dict[str, Any]:
    """Score ``source`` (a prefix in the bucket, or a local folder) with the champion or ``version``.

    Streamed: nothing is downloaded first. Predictions (path or key, predicted class, probabilities,
    error, model version, etag) go to ``output``: a key in the bucket, s3://BUCKET/PREFIX/ or a local
    path (local paths: inside the worker's folder or FACECLF_ALLOW_PATHS; never under models/, datasets/,
    incoming/); default predictions/<version>/<source>/predictions.csv. ``incremental`` keeps the rows of an
    earlier run there whose image (key and ETag) and model version are unchanged. ``scoring``: the
    ScoreConfig settings (batch size, threads, part size...); its ``ray_address`` ("local", host:port,
    ray://host:port) scores with Ray Data on that cluster instead of in this process. ``int8`` scores with the
    version's int8 model (published by a night with night.int8=true), which agreed with the fp32 model on at
    least 99.5% of its validation images; the default output then ends in predictions.int8.csv.
    """
    cfg = config_of(scoring, ScoreConfig)
    logger = get_run_logger()
    location = resolve_location(bucket)
    with tempfile.TemporaryDirectory(prefix="faceclf-score-") as work:
        model = fetch_model(location, version, work, int8)
        target = output or default_output(model.version, source, int8)
        summary = score_stream(model, location, source, target, cfg, incremental)
    logger.info("scored %d images (%d errors, %d kept from the previous run) with model %s on %s at %.1f "
                "images/s -> %s", summary.images, summary.errors, summary.reused, model.version, summary.provider,
                summary.images_per_s, summary.out)
    return {"images": summary.images, "errors": summary.errors, "reused": summary.reused,
            "resumed": summary.resumed, "images_per_s": round(summary.images_per_s, 1),
            "provider": summary.provider, "version": summary.version, "predictions": summary.out}


refuse_old_parameters(score, SCORE_GROUPS)  # a deployment still holding batch_size etc. is told scoring.batch_size

if __name__ == "__main__":
    score()
