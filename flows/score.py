"""Prefect flow `score`: batch-score an S3 prefix or a local folder with the champion (or a given version).

Deployed on demand as `score/face` (deployments/prefect.yaml).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from faceclf.config import ScoreConfig
from faceclf.nightly import night
from faceclf.serving.score import ScoreSummary
from faceclf.serving.score import score as score_images
from faceclf.store import registry
from faceclf.store.objects import download_prefix, open_store
from flows.common import IO_RETRIES

_SCORE = ScoreConfig()  # the flow's defaults are the config's


@dataclass(frozen=True)
class FetchedModel:
    """A model file downloaded and verified against the registry's sha256."""

    version: str
    path: Path
    sha256: str


@dataclass(frozen=True)
class ScoreInputs:
    """What to score: folders/files, and the folder their keys are relative to (None for a local source)."""

    inputs: list[str]
    relative_to: Path | None


@task(cache_policy=NONE, **IO_RETRIES)
def fetch_model(location: str, version: str | None, work: str) -> FetchedModel:
    """Download the champion's (or ``version``'s) model.onnx, checking its sha256 against the registry."""
    store = open_store(location)
    dest = Path(work) / "model.onnx"
    if version is None:
        found = registry.fetch_champion(store, dest)
        if found is None:
            raise ValueError(f"no champion in {store.uri(registry.CHAMPION_KEY)}: run the train flow first or pass version=")
        path = found[1]
        version = found[0]["version"]
    else:
        path = registry.fetch_model(store, version, dest)
    return FetchedModel(version, Path(path), registry.sha256_bytes(Path(path).read_bytes()))


@task(cache_policy=NONE, **IO_RETRIES)
def gather_images(location: str, source: str, work: str) -> ScoreInputs:
    """The images to score: a local folder as it is, or every object under a prefix of the store."""
    if Path(source).is_dir():
        return ScoreInputs([source], None)
    root = Path(work) / "images"
    paths = download_prefix(open_store(location), source, root)
    if not paths:
        raise ValueError(f"nothing to score under {open_store(location).uri(source)}")
    return ScoreInputs([str(root)], root)


@task(cache_policy=NONE)
def score_batch(model: FetchedModel, images: ScoreInputs, out_csv: str, batch_size: int) -> ScoreSummary:
    """ONNX Runtime batch scoring of the verified model (its sha256 is checked again as it loads)."""
    return score_images(model.path, images.inputs, out_csv, ScoreConfig(batch_size=batch_size),
                        relative_to=images.relative_to, expected_sha256=model.sha256)


@task(cache_policy=NONE, **IO_RETRIES)
def publish_predictions(location: str, out_csv: str, output: str) -> str:
    """Put predictions.csv at ``output``: a key in the store, or a local path (ends with .csv and has a '/')."""
    if output.startswith(("/", "./", "../")):
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_bytes(Path(out_csv).read_bytes())
        return str(Path(output).resolve())
    store = open_store(location)
    store.put_file(output, Path(out_csv))
    return store.uri(output)


@flow(name="score", log_prints=True)
def score(bucket: str | None = None, source: str = "incoming/", version: str | None = None,
          output: str | None = None, batch_size: int = _SCORE.batch_size) -> dict[str, Any]:
    """Score ``source`` (a prefix in the bucket, or a local folder) with the champion or ``version``.

    Predictions (path or key, predicted class, probabilities, error, model version) go to
    ``output`` (default predictions/<time>/predictions.csv in the bucket, or a local path).
    """
    logger = get_run_logger()
    location = night.resolve_location(bucket)
    with tempfile.TemporaryDirectory(prefix="faceclf-score-") as work:
        model = fetch_model(location, version, work)
        images = gather_images(location, source, work)
        out_csv = str(Path(work) / "predictions.csv")
        summary = score_batch(model, images, out_csv, batch_size)
        target = output or f"predictions/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}/predictions.csv"
        where = publish_predictions(location, out_csv, target)
    logger.info("scored %d images (%d errors) with model %s on %s at %.1f images/s -> %s", summary.images,
                summary.errors, model.version, summary.provider, summary.images_per_s, where)
    return {"images": summary.images, "errors": summary.errors, "images_per_s": round(summary.images_per_s, 1),
            "provider": summary.provider, "version": summary.version, "predictions": where}


if __name__ == "__main__":
    score()
