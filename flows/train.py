"""Prefect flow `train`: one night of retraining, as thin tasks over faceclf.

    ingest -> train -> re-score champion -> gate -> export (if promoted) -> report -> publish

Retries only on the tasks that do I/O with the bucket. Deployed as `train/face` (deployments/prefect.yaml).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NONE

from faceclf.nightly import night
from faceclf.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from faceclf.config import GateConfig
from faceclf.nightly.gate import Decision, decide
from faceclf.store.objects import open_store
from faceclf.training.loop import TrainingDiverged, new_version
from flows.common import IO_RETRIES


@task(cache_policy=NONE, **IO_RETRIES)
def ingest_images(location: str, face_dir: str) -> dict[str, Any]:
    """New images from LOCATION/incoming/ into face_dir (train/val/test), manifest updated."""
    from faceclf.dataset.ingest import ingest

    return ingest(open_store(location), Path(face_dir)).to_dict()


@task(cache_policy=NONE, **IO_RETRIES)
def check_data(location: str, face_dir: str, allow_new_classes: bool) -> list[str]:
    """Stop before training if there is nothing to train on or a class appeared/vanished."""
    return night.check_classes(Path(face_dir), night.champion_classes(open_store(location)), allow_new_classes)


@task(cache_policy=NONE)
def prepare_run(runs_dir: str, face_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Resume tonight's unfinished run (same data, same config) or start a new one."""
    logger = get_run_logger()
    fingerprint = night.data_fingerprint(Path(face_dir))
    pending = night.find_pending_run(Path(runs_dir), cfg, fingerprint)
    if pending:
        logger.info("resuming unfinished night %s (%s)", pending.version,
                    "trained; gate and publish" if pending.trained else "training from last.pt")
        return {"run_dir": str(pending.run_dir), "version": pending.version, "resume": True, "trained": pending.trained}
    version = new_version()
    run_dir = night.start_run(Path(runs_dir), version, cfg, fingerprint)
    return {"run_dir": str(run_dir), "version": version, "resume": False, "trained": False}


@task(cache_policy=NONE)
def train_candidate(face_dir: str, run: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Train on face_dir's train/val (or continue from last.pt), evaluate on test; returns metrics.json."""
    from faceclf.training.run import train_run

    if run["trained"]:
        return night.read_json(Path(run["run_dir"]) / "metrics.json")
    try:
        return train_run(face_dir, run["run_dir"], RunConfig.from_dict(cfg), resume=run["resume"] and
                         (Path(run["run_dir"]) / "last.pt").is_file(), version=run["version"])
    except TrainingDiverged as e:  # a rejected night with its reason, not a bare failed run
        return night.record_divergence(Path(run["run_dir"]), run["version"], Path(face_dir), str(e))


@task(cache_policy=NONE, **IO_RETRIES)
def rescore_champion(location: str, test_dir: str, run_dir: str) -> dict[str, Any] | None:
    """The current champion's metrics on tonight's test set (None before the first promotion)."""
    found = night.rescore_champion(open_store(location), Path(test_dir), Path(run_dir))
    return {"version": found.version, "metrics": found.metrics} if found else None


@task(cache_policy=NONE)
def gate_candidate(test_metrics: dict[str, Any], gate: dict[str, float], champion: dict[str, Any] | None) -> dict[str, Any]:
    """Promote or reject, with every failed rule spelled out."""
    decision = decide(test_metrics, GateConfig(**gate), champion["metrics"] if champion else None,
                      champion["version"] if champion else None)
    return decision.to_dict()


@task(cache_policy=NONE)
def export_model(run_dir: str) -> dict[str, Any]:
    """ONNX export of the best checkpoint, checked and parity-tested in onnxruntime."""
    report = night.export_candidate(Path(run_dir))
    return {"path": str(report.path), "max_abs_diff": report.max_abs_diff}


@task(cache_policy=NONE, **IO_RETRIES)
def publish(location: str, run_dir: str, decision: dict[str, Any], metrics: dict[str, Any],
            data: dict[str, Any], champion: dict[str, Any] | None) -> dict[str, Any]:
    """Upload the version (report, decision, checkpoint, model if promoted); move champion.json last."""
    d = Decision(**decision)
    champ = night.ChampionScore(champion["version"], champion["metrics"]) if champion else None
    files = night.write_night_files(Path(run_dir), d, metrics, data, champ)
    result = night.publish(open_store(location), metrics["version"], files, d, metrics)
    night.mark_published(Path(run_dir), result)
    result["report_md"] = (Path(run_dir) / "report.md").read_text()
    return result


def training_config(epochs: int, image_size: int, batch_size: int, seed: int,
                    conv_channels: list[int] | None, learning_rate: float | None) -> dict[str, Any]:
    """The run's resolved config as a plain dict (what train_candidate receives)."""
    t = TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed)
    if learning_rate is not None:
        t.learning_rate = learning_rate
    m = ModelConfig(image_size=image_size, **({"conv_channels": tuple(conv_channels)} if conv_channels else {}))
    return RunConfig(data=DataConfig(image_size=image_size), model=m, train=t).to_dict()


def publish_artifacts(result: dict[str, Any], metrics: dict[str, Any], decision: dict[str, Any],
                      champion: dict[str, Any] | None) -> None:
    """Report (markdown), per-class accuracy (table) and a link to the model version in the bucket."""
    create_markdown_artifact(result["report_md"], key="face-night-report", description=Decision(**decision).summary())
    champ_pc = (champion or {}).get("metrics", {}).get("per_class_accuracy", {})
    create_table_artifact([{"class": c, "candidate_accuracy": a, "champion_accuracy": champ_pc.get(c)}
                           for c, a in metrics["test"]["per_class_accuracy"].items()],
                          key="face-per-class-accuracy", description="test accuracy per class")
    link = result["uris"].get("model.onnx") or result["uris"].get("decision.json")
    create_link_artifact(link, link_text=f"model {metrics['version']}", key="face-model",
                         description="promoted model" if decision["promote"] else "rejected candidate's decision")


@flow(name="train", log_prints=True)
def train(bucket: str | None = None, face_dir: str = "face", runs_dir: str = "runs",
          min_accuracy: float = 0.90, min_class_accuracy: float = 0.85, tolerance: float = 0.0,
          epochs: int = 15, image_size: int = 96, batch_size: int = 64, seed: int = 0,
          conv_channels: list[int] | None = None, learning_rate: float | None = None,
          allow_new_classes: bool = False) -> dict[str, Any]:
    """One night: ingest new images, train a candidate, gate it against the champion, publish.

    ``bucket``: an S3 bucket name (default $FACECLF_BUCKET) or a local folder with the same layout.
    A rerun after a crash resumes the unfinished run (same data and settings) and promotes it once.
    """
    logger = get_run_logger()
    location = night.resolve_location(bucket)
    gate = GateConfig(min_accuracy, min_class_accuracy, tolerance).__dict__
    cfg = training_config(epochs, image_size, batch_size, seed, conv_channels, learning_rate)

    with night.night_lock(Path(face_dir)):  # one night at a time on this face/ folder
        data = ingest_images(location, face_dir)
        check_data(location, face_dir, allow_new_classes)
        run = prepare_run(runs_dir, face_dir, cfg)
        metrics = train_candidate(face_dir, run, cfg)
        champion = rescore_champion(location, str(Path(face_dir) / "test"), run["run_dir"])
        decision = gate_candidate(metrics["test"], gate, champion)
        if decision["promote"]:
            export_model(run["run_dir"])
        result = publish(location, run["run_dir"], decision, metrics, _data_counts(data, metrics), champion)
    publish_artifacts(result, metrics, decision, champion)
    logger.info("%s; model %s in %s", Decision(**decision).summary(), run["version"], location)
    return {"version": run["version"], "promoted": decision["promote"], "reasons": decision["reasons"],
            "test_accuracy": metrics["test"]["accuracy"], "ingest": data, "uris": result["uris"],
            "champion": result["champion"], "resumed": run["resume"]}


def _data_counts(ingest: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The counts the report's data table shows."""
    counts = {f"ingest: {k}": ingest.get(k) for k in ("listed", "new", "skipped", "duplicates", "quarantined")}
    counts.update({f"{s} images": n for s, n in metrics["data"]["counts"].items()})
    return counts


if __name__ == "__main__":
    train()
