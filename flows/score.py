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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.events import emit_event

from faceclf.config import MonitorConfig, ScoreConfig
from faceclf.inform import Warnings
from faceclf.serving.output import check_output_key
from faceclf.serving.stream import ScoreSummary
from faceclf.serving.stream import score_images
from faceclf.store import registry
from faceclf.store.local_paths import allowed_roots, confine
from faceclf.store.objects import LocalStore, Store, open_store, parse_s3_url, resolve_location
from flows.common import DEGRADED, IO_RETRIES
from flows.params import SCORE_GROUPS, MonitorParams, ScoringParams, config_of, refuse_old_parameters



@dataclass(frozen=True)
class FetchedModel:
    """A model file downloaded and verified against the registry's sha256."""

    version: str
    path: Path
    sha256: str
    champion: bool = False  # the version champion.json pointed at when it was fetched


@task(cache_policy=NONE, **IO_RETRIES)
def fetch_model(location: str, version: str | None, work: str, int8: bool = False) -> FetchedModel:
    """Download the champion's (or ``version``'s) model.onnx, or its model.int8.onnx with ``int8``, checking
    its sha256 against the registry."""
    store = open_store(location)
    name = registry.INT8_MODEL_FILE if int8 else registry.MODEL_FILE
    dest = Path(work) / name
    pointer = registry.read_champion(store)  # read once: which model, and whether ``version`` is the champion
    if version is None:
        if pointer is None:
            raise ValueError(f"no champion in {store.uri(registry.CHAMPION_KEY)}: run the train flow first or pass version=")
        version = pointer["version"]
        if int8:  # champion.json holds the fp32 model's sha256; the int8 file is checked against sha256.json
            path = registry.fetch_model(store, version, dest, name=name)
        else:
            path = registry.fetch_model(store, version, dest, pointer.get("model_sha256"), "champion.json")
    else:
        path = registry.fetch_model(store, version, dest, name=name)
    return FetchedModel(version, Path(path), registry.sha256_bytes(Path(path).read_bytes()),
                        champion=bool(pointer and pointer["version"] == version))


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
                 incremental: bool, monitor: MonitorConfig | None = None) -> ScoreSummary:
    """List, fetch, decode and score ``source`` straight into ``output`` (parts, then one CSV).

    A retry of this task, or a rerun of the flow, resumes from the parts already written. The model's
    sha256 is checked again as it loads. ``monitor``: the alarms of the run's label-free accuracy estimate."""
    store = open_store(location)
    check_source(source)
    return score_images(model.path, [source], output_location(store, output), cfg,
                        expected_sha256=model.sha256, incremental=incremental, store=store, monitor=monitor)


@task(cache_policy=NONE, **IO_RETRIES)
def record_estimate(location: str, model: FetchedModel, summary: ScoreSummary, source: str) -> str:
    """The run's label-free estimate as the version's last (models/face/<version>/estimate.json): `faceclf models
    list` and the next night's report show it beside the version's test accuracy."""
    return registry.record_estimate(open_store(location), model.version, summary.monitor or {}, source,
                                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def model_resource(location: str, version: str) -> dict[str, str]:
    """The degraded event's resource: ``faceclf.model.<version>``, with its bucket."""
    return {"prefect.resource.id": f"faceclf.model.{version}", "prefect.resource.name": f"model {version}",
            "faceclf.bucket": location}


def degraded(location: str, model: FetchedModel, summary: ScoreSummary, source: str) -> dict[str, str] | None:
    """Emit ``DEGRADED`` when the champion's estimate raised an alarm on these images; the event's subject and
    message (None: no alarm, or the model scored is not the champion). train/face's trigger may start a night on
    it, and the automation `python3 -m flows.notify` saves sends the message."""
    watched = summary.monitor or {}
    if not model.champion or not watched.get("alarms"):
        return None
    low, high = watched["interval"]
    ref = (watched.get("reference") or {}).get("test_accuracy")
    subject = f"faceclf champion {model.version} may be degrading on {source}"
    message = (f"Scoring {watched['n']} images of {source} with champion {model.version}: estimated accuracy "
               f"{watched['estimated_accuracy']:.3f} [{low:.3f}, {high:.3f}] without labels"
               + (f", test accuracy {ref:.3f}" if ref is not None else "") + ". "
               + "; ".join(watched["alarms"]) + f". Predictions: {summary.out}")
    emit_event(DEGRADED, resource=model_resource(location, model.version),
               payload={"subject": subject, "message": message, "source": source, "predictions": summary.out,
                        "estimate": {k: watched.get(k) for k in ("n", "estimated_accuracy", "interval", "alarms",
                                                                "predicted_shares", "reference")}})
    return {"subject": subject, "message": message}


@flow(name="score", log_prints=True)
def score(bucket: str | None = None, source: str = "incoming/", version: str | None = None,
          output: str | None = None, incremental: bool = False, int8: bool = False,
          scoring: ScoringParams = ScoringParams(), monitor: MonitorParams = MonitorParams()) -> dict[str, Any]:
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

    The champion is watched between nights: predictions.json holds the predicted class shares, the confidences
    and a label-free estimate of the model's accuracy on these images (CBPE) set against its test accuracy; the
    estimate becomes the version's last (`faceclf models list`, the night's report), and when ``monitor``'s
    thresholds are crossed by the champion the flow emits faceclf.champion.degraded (a night may start on it:
    deployments/prefect.yaml; the automation of `python3 -m flows.notify` sends it). Both only inform: a failure
    is a warning in the result, never a failed run.
    """
    cfg, monitor_cfg = config_of(scoring, ScoreConfig), config_of(monitor, MonitorConfig)
    logger = get_run_logger()
    location = resolve_location(bucket)
    with tempfile.TemporaryDirectory(prefix="faceclf-score-") as work:
        model = fetch_model(location, version, work, int8)
        target = output or default_output(model.version, source, int8)
        summary = score_stream(model, location, source, target, cfg, incremental, monitor_cfg)
    informed = Warnings()  # recording the estimate and the event only inform: never a failed scoring run
    if summary.monitor:
        informed.attempt("recording the estimate", record_estimate, location, model, summary, source)
    alarm = informed.attempt("the degraded event", degraded, location, model, summary, source)
    if alarm:
        logger.warning("%s: %s", alarm["subject"], alarm["message"])
    logger.info("scored %d images (%d errors, %d kept from the previous run) with model %s on %s at %.1f "
                "images/s -> %s", summary.images, summary.errors, summary.reused, model.version, summary.provider,
                summary.images_per_s, summary.out)
    return {"images": summary.images, "errors": summary.errors, "reused": summary.reused,
            "resumed": summary.resumed, "images_per_s": round(summary.images_per_s, 1),
            "provider": summary.provider, "version": summary.version, "predictions": summary.out,
            "estimate": summary.monitor, "degraded_event": alarm, "warnings": informed.items}


refuse_old_parameters(score, SCORE_GROUPS)  # a deployment still holding batch_size etc. is told scoring.batch_size

if __name__ == "__main__":
    score()
