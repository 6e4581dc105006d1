"""Prefect flow `train`: one night of retraining, as thin tasks over faceclf.

    ingest -> check classes -> re-score champion -> warm or cold -> train -> gate -> export (if promoted) -> publish

Tasks pass typed values (FaceSet, ChampionRef, NightRun, RunMetrics, Decision, Published). Retries only
on the tasks that do I/O with the bucket. Deployed as `train/face` (deployments/prefect.yaml).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NONE

from faceclf.config import DriftConfig, GateConfig, Int8Config, NightConfig, RunConfig
from faceclf.dataset.cache import CacheReport
from faceclf.dataset.faceset import FaceSet, resolve_image_size
from faceclf.dataset.ingest import IngestReport
from faceclf.inform import Warnings, with_warnings
from faceclf.nightly import night as nightly
from faceclf.nightly import runs, start
from faceclf.nightly.drift import DriftDetected, DriftReport
from faceclf.nightly.gate import Decision, decide, with_approval
from faceclf.nightly.lock import bucket_lease, night_lock
from faceclf.serving.export import ExportReport
from faceclf.store.objects import open_store, resolve_location
from faceclf.store.registry import ChampionRef, champion_ref, read_latest, version_key
from faceclf.training.fit import TrainingDiverged, new_version
from faceclf.training.metrics import RunMetrics
from flows import notify
from flows.common import IO_RETRIES, check_local_paths
from flows.params import (
    TRAIN_GROUPS,
    DataParams,
    DriftParams,
    GateParams,
    ModelParams,
    NightParams,
    QuantizationParams,
    TrainingParams,
    config_of,
    refuse_old_parameters,
    run_config_of,
)

APPROVAL_POLL_S = 2  # how often a paused night asks the server whether a person answered


@task(cache_policy=NONE, **IO_RETRIES)
def ingest_images(location: str, face_dir: str, allow_new_classes: bool, champion: ChampionRef | None) -> IngestReport:
    """New images from LOCATION/incoming/ into face_dir (train/val/test), manifest updated; its FaceSet. An image
    of a class neither the manifest nor ``champion`` has is quarantined unless ``allow_new_classes``."""
    from faceclf.config import IngestConfig
    from faceclf.dataset.ingest import ingest_in_child

    # in a child: its manifest heap stays out of the night's process
    return ingest_in_child(location, Path(face_dir), IngestConfig(allow_new_classes=allow_new_classes),
                           champion.classes if champion else ())


@task(cache_policy=NONE, **IO_RETRIES)
def finish_publish(location: str, runs_dir: str) -> str | None:
    """Finish the publish a killed night left half done (champion.json, then latest.json), on whichever worker
    it ran; the version it finished, or None."""
    return nightly.finish_unfinished_publish(open_store(location), Path(runs_dir))


@task(cache_policy=NONE, **IO_RETRIES)
def read_champion(location: str) -> ChampionRef | None:
    """champion.json, read once for the whole night (None before the first promotion)."""
    return champion_ref(open_store(location))


@task(cache_policy=NONE)
def check_data(faceset: FaceSet, champion: ChampionRef | None, allow_new_classes: bool) -> list[str]:
    """Stop before training if there is nothing to train on or a class appeared/vanished."""
    return nightly.check_classes(faceset, champion, allow_new_classes)


@task(cache_policy=NONE)
def find_unfinished(runs_dir: str, faceset: FaceSet, cfg: dict[str, Any]) -> runs.NightRun | None:
    """An unfinished run on the same data with the same config, to resume (None: there is none)."""
    pending = runs.find_pending_run(Path(runs_dir), cfg, faceset.fingerprint())
    if pending:
        get_run_logger().info("resuming unfinished night %s (%s)", pending.version,
                              "trained; gate and publish" if pending.trained else "training from last.pt")
    return pending


@task(cache_policy=NONE, **IO_RETRIES)
def nothing_new(location: str, faceset: FaceSet, night_cfg: NightConfig) -> str | None:
    """Why the night ends after ingest (fewer than min_new_images since the last published version)."""
    return nightly.nothing_new(faceset, read_latest(open_store(location)), night_cfg.min_new_images, night_cfg.force)


@task(cache_policy=NONE, **IO_RETRIES)
def choose_start(location: str, night_cfg: NightConfig, gate: GateConfig, champion: ChampionRef | None,
                 faceset: FaceSet, score: nightly.ChampionScore | None) -> start.StartChoice:
    """Warm or cold tonight, and why (faceclf.nightly.start): from the champion re-scored on tonight's test split
    and the share of the images new to it."""
    return start.night_start(open_store(location), night_cfg, gate, champion, faceset, score.metrics if score else None)


@task(cache_policy=NONE)
def start_run(runs_dir: str, faceset: FaceSet, cfg: dict[str, Any], choice: start.StartChoice) -> runs.NightRun:
    """A new run folder for tonight, recording its data, config and how its training starts (nightly.json)."""
    return runs.start_run(Path(runs_dir), new_version(), cfg, faceset.fingerprint(), choice.to_dict())


@task(cache_policy=NONE, **IO_RETRIES)
def refresh_cache(location: str, face_dir: str, faceset: FaceSet, cfg: dict[str, Any]) -> CacheReport:
    """Decode the images no cache shard holds yet (or fetch the bucket's shards); mirror new shards."""
    return nightly.refresh_cache(open_store(location), Path(face_dir), faceset, RunConfig.from_dict(cfg).data)


@task(cache_policy=NONE, **IO_RETRIES)
def check_drift(location: str, report: IngestReport, face_dir: str, cfg: dict[str, Any], champion: ChampionRef | None,
                run: runs.NightRun, drift_cfg: DriftConfig) -> DriftReport:
    """Tonight's new images against the train split already held, and the champion on them; what moved."""
    return nightly.check_drift(open_store(location), report.faceset, report.new_sha256, Path(face_dir),
                             RunConfig.from_dict(cfg).data, champion, run.run_dir, drift_cfg)


@task(cache_policy=NONE, **IO_RETRIES)
def audit_labels(location: str, report: IngestReport, champion: ChampionRef | None, runs_dir: str,
                 mode: str) -> nightly.LabelAudit:
    """The champion's audit of tonight's new labels (confident learning); suspects recorded in the bucket."""
    return nightly.audit_new_labels(open_store(location), report.faceset, report.new_sha256, report.new_keys, champion,
                                  Path(runs_dir), mode)


@task(cache_policy=NONE, **IO_RETRIES)
def leave_out_suspects(location: str, faceset: FaceSet,
                       labels: nightly.LabelAudit) -> tuple[FaceSet, nightly.LabelAudit]:
    """label_audit=exclude: the face set without every train/val image an audit flagged (test keeps its images)."""
    return nightly.without_suspects(open_store(location), faceset, labels)


@task(cache_policy=NONE)
def train_candidate(location: str, faceset: FaceSet, face_dir: str, run: runs.NightRun, cfg: dict[str, Any]) -> RunMetrics:
    """Train on the FaceSet's train/val from the decoded cache (or continue from last.pt), evaluate on test;
    metrics.json's content. A warm start fetches the champion's checkpoint (sha256-checked) from LOCATION."""
    from faceclf.training.launch import run_training

    if run.trained:
        return RunMetrics.from_dict(runs.read_json(run.run_dir / "metrics.json"))
    config = RunConfig.from_dict(cfg)
    progress = Warnings()  # the progress artifact only informs: it never stops training
    artifact = progress.attempt("training progress artifact", create_progress_artifact, 0.0,
                                key="face-training-progress", description=f"training {run.version}")

    def on_epoch(epoch: int, epochs: int, row: dict[str, Any]) -> None:  # moves while training runs
        if artifact is not None:
            progress.attempt("training progress artifact", update_progress_artifact, artifact,
                             100.0 * (epoch + 1) / epochs,
                             description=f"training {run.version}: epoch {epoch + 1} of at most {epochs}, "
                                         f"val loss {row['val_loss']}, val accuracy {row['val_accuracy']}")

    try:
        metrics = RunMetrics.from_dict(run_training(faceset, run.run_dir, config,
                                             resume=run.resume and (run.run_dir / "last.pt").is_file(),
                                             version=run.version, cache=nightly.open_cache(Path(face_dir), config.data),
                                             store=open_store(location), on_epoch=on_epoch))
    except TrainingDiverged as e:  # a rejected night with its reason, not a bare failed run
        return RunMetrics.from_dict(nightly.record_divergence(run.run_dir, run.version, faceset, str(e)))
    if artifact is not None:
        progress.attempt("training progress artifact", update_progress_artifact, artifact, 100.0,
                         description=f"trained {run.version} (best epoch {metrics.best_epoch})")
    return dataclasses.replace(metrics, warnings=[*metrics.warnings, *progress.items])


@task(cache_policy=NONE, **IO_RETRIES)
def rescore_champion(location: str, champion: ChampionRef | None, faceset: FaceSet,
                     runs_dir: str) -> nightly.ChampionScore | None:
    """The current champion's metrics on tonight's test set (None before the first promotion), before training:
    the warm-or-cold rule and the gate both use them (the model is kept in runs_dir/.champion)."""
    return nightly.rescore_champion(open_store(location), champion, faceset, nightly.champion_dir(Path(runs_dir)))


@task(cache_policy=NONE)
def gate_candidate(metrics: RunMetrics, gate: GateConfig, champion: nightly.ChampionScore | None,
                   run: runs.NightRun) -> Decision:
    """Promote or reject, with every failed rule spelled out: the absolute bars, then the champion compared
    image by image on the same test set (McNemar overall, per-class F1 by a paired permutation test), unless
    the champion fails the bars itself (stale)."""
    return decide(metrics.test, gate, champion.metrics if champion else None, champion.version if champion else None,
                  *nightly.paired_outcomes(run.run_dir, champion, metrics.classes, gate.permutations))


class Approval(RunInput):
    """What a person answers to a paused night (Prefect UI, or `python3 -m flows.approve FLOW_RUN_ID`)."""

    approve: bool
    comment: str = ""


def ask_approval(decision: Decision, version: str, timeout: int) -> Decision:
    """Pause the night until a person approves or rejects the candidate (the gate has passed); no answer
    within ``timeout`` seconds rejects it. champion.json has not moved yet."""
    logger = get_run_logger()
    logger.info("waiting up to %d s for a person to approve %s: %s (Prefect UI, or python3 -m flows.approve "
                "FLOW_RUN_ID --approve/--reject --comment TEXT)", timeout, version, decision.why)
    try:
        answer = pause_flow_run(wait_for_input=Approval.with_initial_data(
            description=f"Promote candidate {version}? {decision.why}", approve=False), timeout=timeout,
            poll_interval=APPROVAL_POLL_S)
    except FlowPauseTimeout:
        return with_approval(decision, False, f"no approval within {timeout} s", timed_out=True)
    logger.info("%s by a person: %s", "approved" if answer.approve else "rejected", answer.comment or "(no comment)")
    return with_approval(decision, answer.approve, answer.comment)


@task(cache_policy=NONE)
def export_model(run: runs.NightRun, int8: bool, int8_cfg: Int8Config) -> ExportReport:
    """ONNX export of the best checkpoint, checked and parity-tested in onnxruntime (and its int8 model)."""
    return nightly.export_candidate(run.run_dir, int8, int8_cfg)


@task(cache_policy=NONE, **IO_RETRIES)
def publish(location: str, run: runs.NightRun, decision: Decision, metrics: RunMetrics, data: dict[str, Any],
            champion: ChampionRef | None, faceset: FaceSet, drift: DriftReport | None, night_cfg: NightConfig,
            warnings: list[str], score: nightly.ChampionScore | None = None,
            labels: nightly.LabelAudit | None = None) -> nightly.Published:
    """Upload the version (report, decision, checkpoint, model if promoted, the test images candidate and champion
    disagree on); move champion.json, then latest.json. ``warnings``: the informing steps that failed so far, for
    the top of report.md."""
    store = open_store(location)
    informed = Warnings(warnings)
    audited = nightly.audit_section(run.run_dir, labels, informed)
    changed = nightly.what_changed(run.run_dir, score, faceset, run.version, informed)
    files, body, stuck = nightly.night_files(run.run_dir, decision, metrics.to_dict(), data, store, champion, night_cfg,
                                           drift, informed, [audited, changed])
    result = nightly.publish(store, files, decision, metrics.to_dict(), champion, faceset, body)
    runs.mark_published(run.run_dir, result.version, result.promoted)
    return dataclasses.replace(result, warnings=informed.items, stuck=stuck)


@task(cache_policy=NONE, **IO_RETRIES)
def amend_report(location: str, run: runs.NightRun, result: nightly.Published, warnings: list[str]) -> str:
    """Publish report.md again with the warnings that came after it (artifacts, notification)."""
    return nightly.amend_report(open_store(location), run.run_dir, result, Warnings(warnings))


def publish_artifacts(location: str, result: nightly.Published, metrics: RunMetrics, decision: Decision,
                      champion: nightly.ChampionScore | None, warnings: Warnings, link_seconds: int) -> None:
    """Per-class accuracy (table), a link to the model version in the bucket, the night's plots (images), the
    rejection notification, and last the report (markdown, with every warning so far). Each only informs: a
    failure joins ``warnings``."""
    champ_pc = champion.metrics.get("per_class_accuracy", {}) if champion else {}
    warnings.attempt("per-class accuracy table artifact", create_table_artifact,
                     [{"class": c, "candidate_accuracy": a, "champion_accuracy": champ_pc.get(c)}
                      for c, a in metrics.test["per_class_accuracy"].items()],
                     key="face-per-class-accuracy", description="test accuracy per class")
    link = result.uris.get("model.onnx") or result.uris.get("decision.json")
    warnings.attempt("model link artifact", create_link_artifact, link, link_text=f"model {metrics.version}",
                     key="face-model",
                     description="promoted model" if decision.promote else "rejected candidate's decision")
    publish_plots(location, result, warnings, link_seconds)
    if not decision.promote:
        warnings.attempt("rejection notification", notify.night_rejected, metrics.version, decision.why, location,
                         result.stuck)
    warnings.attempt("night report artifact", create_markdown_artifact, with_warnings(result.report_body, warnings.items),
                     key="face-night-report", description=decision.summary())


def publish_plots(location: str, result: nightly.Published, warnings: Warnings, link_seconds: int) -> None:
    """Learning curves, confusion matrix and accuracy across versions as image artifacts, from the bucket
    (presigned links, valid ``link_seconds``: NightConfig.link_seconds, a day by default); a local bucket folder,
    which no browser can reach, gets their paths."""
    store = open_store(location)
    titles = {"history.png": "learning curves", "confusion_matrix.png": "confusion matrix (test)",
              "versions.png": "test accuracy across the last versions",
              "label_audit.png": "new images whose label the champion contradicts",
              "disagreements.png": "test images the candidate and the champion disagree on",
              "reliability.png": "reliability diagram (test, before and after calibration)"}
    links = {name: warnings.attempt(f"presigned link to {name}", store.link, version_key(result.version, name),
                                      link_seconds)
             for name in nightly.PLOTS if name in result.uris}
    for name, url in links.items():
        if url:
            warnings.attempt(f"{titles[name]} image artifact", create_image_artifact, url,
                             key=f"face-{name.removesuffix('.png').replace('_', '-')}",
                             description=f"{titles[name]}, model {result.version}")
    if links and not any(links.values()):
        warnings.attempt("plot paths artifact", create_markdown_artifact,
                         "\n".join(f"- {titles[n]}: `{result.uris[n]}`" for n in links),
                         key="face-plots", description=f"plots of model {result.version} (local bucket)")


def skip_night(reason: str, report: IngestReport, champion: ChampionRef | None,
               finished: str | None) -> dict[str, Any]:
    """End a night after ingest: say so in the log and the report artifact; nothing is trained or published.
    ``finished``: the version of a half-done publish this night finished first (None: there was none)."""
    informed = Warnings()
    informed.attempt("night report artifact", create_markdown_artifact,
                     nightly.skipped_report(reason, report.to_dict(), champion), key="face-night-report",
                     description=reason)
    get_run_logger().info("%s; champion %s unchanged", reason, champion.version if champion else "none")
    return {"version": None, "promoted": False, "skipped": True, "reasons": [reason], "test_accuracy": None,
            "ingest": report.to_dict(), "uris": {}, "champion": champion.pointer if champion else None,
            "resumed": False, "finished_publish": finished, "warnings": informed.items}


@flow(name="train", log_prints=True, on_failure=[notify.on_night_failed], on_crashed=[notify.on_night_failed])
def train(bucket: str | None = None, face_dir: str = "face", runs_dir: str = "runs", data: DataParams = DataParams(),
          model: ModelParams = ModelParams(), training: TrainingParams = TrainingParams(),
          gate: GateParams = GateParams(), drift: DriftParams = DriftParams(), night: NightParams = NightParams(),
          quantization: QuantizationParams = QuantizationParams()) -> dict[str, Any]:
    """One night: ingest new images, train a candidate, gate it against the champion, publish.

    ``bucket``: an S3 bucket name (default $FACECLF_BUCKET) or a local folder with the same layout; ``face_dir``
    and ``runs_dir``: the worker's image tree and run folders. The settings come grouped by concern, each group
    the fields of its faceclf.config dataclass (their help texts are the forms' in the Prefect UI; a group left
    out keeps its defaults):
    ``data``, ``model``, ``training``: what the candidate trains on and how (``training.workers`` > 1: DDP
    processes on the worker, or Ray Train workers with ``training.ray_address``);
    ``gate``: the bars and the comparison with the champion on the same test images;
    ``drift``: the drift checks on arrival (``drift.fail_on_drift`` stops the night before training);
    ``night``: when a night trains (``min_new_images``, ``force``), warm or cold start, label audit, approval
    (the night pauses until a person answers in the UI or with `python3 -m flows.approve`), int8 publishing;
    ``quantization``: the agreement an int8 model must keep with fp32.
    A rerun after a crash resumes the unfinished run (same data and settings) and promotes it once. A failed,
    crashed or rejected night sends a notification (flows/notify.py); a night with nothing new, or a promoted
    one, sends none. Parameters of the old flat form fail the run with the new place of each.
    """
    location = resolve_location(bucket)
    check_local_paths(location, face_dir=face_dir, runs_dir=runs_dir)
    gate_cfg, drift_cfg = config_of(gate, GateConfig), config_of(drift, DriftConfig)
    night_cfg, int8_cfg = config_of(night, NightConfig), config_of(quantization, Int8Config)
    run_cfg = run_config_of(data, model, training)
    informed = Warnings()  # the informing steps that failed: warnings atop report.md, never a failed night
    # One night at a time: on this face/ folder (a file lock), and on the bucket, whatever host runs it (a lease).
    with night_lock(Path(face_dir)), bucket_lease(open_store(location), "train night", night_cfg.lease_seconds) as lease:
        finished = finish_publish(location, runs_dir)
        champion = read_champion(location)  # under the lease: no night or promote moves it until we publish
        report = ingest_images(location, face_dir, night_cfg.allow_new_classes, champion)
        check_data(report.faceset, champion, night_cfg.allow_new_classes)
        reason = nothing_new(location, report.faceset, night_cfg)
        if reason and runs.find_pending_run(Path(runs_dir), None, report.faceset.fingerprint()) is None:
            return skip_night(reason, report, champion, finished)  # nothing to resume either: no re-score
        score = rescore_champion(location, champion, report.faceset, runs_dir)  # for the start rule and the gate
        faceset = report.faceset  # what trains: without the audit's suspects when label_audit=exclude
        if night_cfg.label_audit == "exclude":  # then the audit decides the training set: its failure fails the night
            labels = audit_labels(location, report, champion, runs_dir, night_cfg.label_audit)
            faceset, labels = leave_out_suspects(location, faceset, labels)
        else:
            labels = informed.attempt("label audit", audit_labels, location, report, champion, runs_dir,
                                      night_cfg.label_audit)
        begin = choose_start(location, night_cfg, gate_cfg, champion, report.faceset, score)
        if begin.warm:  # an "auto" size becomes the champion's: its weights fit that size only
            run_cfg = nightly.warm_start(run_cfg, champion, faceset, night_cfg.warm_epochs, open_store(location))
        run_cfg = resolve_image_size(run_cfg, faceset)  # "auto" (from scratch): tonight's train images
        cfg = run_cfg.to_dict()
        run = find_unfinished(runs_dir, faceset, cfg)  # the start is part of the config a rerun matches
        if run is None:
            if reason:
                return skip_night(reason, report, champion, finished)
            run = start_run(runs_dir, faceset, cfg, begin)
        cache = None if run.trained else refresh_cache(location, face_dir, faceset, cfg)
        drift = None
        if not run.trained and drift_cfg.fail_on_drift:  # then the drift check decides: its failure fails the night
            drift = check_drift(location, report, face_dir, cfg, champion, run, drift_cfg)
            if drift.flags:
                raise DriftDetected("the new images drifted (fail_on_drift=true, nothing trained): " + "; ".join(drift.flags))
        elif not run.trained:
            drift = informed.attempt("drift check", check_drift, location, report, face_dir, cfg, champion, run, drift_cfg)
        metrics = train_candidate(location, faceset, face_dir, run, cfg)
        decision = gate_candidate(metrics, gate_cfg, score, run)
        if decision.promote and night_cfg.approval:
            decision = ask_approval(decision, run.version, night_cfg.approval_timeout)
        exported = export_model(run, night_cfg.int8, int8_cfg) if decision.promote else None
        lease.ensure()  # a worker whose lease was taken over publishes nothing (champion.json is swapped anyway)
        result = publish(location, run, decision, metrics,
                         {**nightly.report_counts(report.to_dict(), metrics.to_dict()), "training start": begin.summary()},
                         champion, faceset, drift, night_cfg, [*informed.items, *metrics.warnings], score, labels)
    informed = Warnings(result.warnings)  # every warning so far, the publish task's own included
    publish_artifacts(location, result, metrics, decision, score, informed, night_cfg.link_seconds)
    if informed.items != result.warnings:  # report.md went up before these: publish it again with them
        informed.attempt("amending report.md with the later warnings", amend_report, location, run, result,
                         informed.items)
    logger = get_run_logger()
    logger.info("%s; model %s in %s", decision.summary(), run.version, location)
    if informed.items:
        logger.warning("the night went on past %d failed informing step(s): %s", len(informed.items),
                       "; ".join(informed.items))
    return {"version": run.version, "promoted": decision.promote, "reasons": decision.reasons,
            "test_accuracy": metrics.test["accuracy"], "ingest": report.to_dict(), "uris": result.uris,
            "champion": result.champion, "resumed": run.resume, "skipped": False, "start": begin.to_dict(),
            "decoded_cache": dataclasses.asdict(cache) if cache else None,
            "int8": exported.int8 if exported else None, "finished_publish": finished, "warnings": informed.items,
            "label_audit": ({"mode": labels.mode, "audited": labels.audited, "flagged": len(labels.rows),
                             "excluded": labels.excluded, "skipped": labels.skipped} if labels else None)}


refuse_old_parameters(train, TRAIN_GROUPS)  # a deployment still holding min_accuracy etc. is told gate.min_accuracy

if __name__ == "__main__":
    train()
