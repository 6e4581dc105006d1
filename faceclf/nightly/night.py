"""The steps of a nightly retraining, as plain functions the Prefect `train` flow wraps one by one.

    ingest -> FaceSet -> check classes -> re-score champion -> warm or cold (faceclf.nightly.start) -> train
           -> gate -> export (if promoted) -> report -> publish

The FaceSet (from ingest) and the ChampionRef (champion.json, read once) travel through the steps:
no step walks face/ or re-reads the champion pointer.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from faceclf.config import (
    CacheConfig,
    DataConfig,
    DriftConfig,
    Int8Config,
    NightConfig,
    RunConfig,
    with_overrides,
)
from faceclf.dataset.cache import CacheReport, DecodedCache, cache_folder, update_cache
from faceclf.dataset.faceset import FaceSet
from faceclf.dataset.preprocess import Preprocess
from faceclf.inform import Warnings, with_warnings
from faceclf.nightly import audit, disagree
from faceclf.nightly.drift import DriftReport, measure, new_mask, spread
from faceclf.nightly.drift import markdown as drift_markdown
from faceclf.nightly.gate import Decision
from faceclf.nightly import runs
from faceclf.nightly.report import render_report
from faceclf.nightly.stuck import stuck_reasons
from faceclf.nightly.stats import ClassComparison, McNemar, compare_classes, mcnemar
from faceclf.serving.export import ExportReport, export_onnx
from faceclf.serving.onnx_model import accuracy_on, evaluate_onnx_per_image
from faceclf.store.atomic import write_json_atomic, write_text_atomic
from faceclf.store.objects import Store
from faceclf.store.registry import (
    DECISION_FILE,
    INT8_MODEL_FILE,
    MODEL_FILE,
    ChampionRef,
    PublishRecord,
    begin_publish,
    fetch_champion,
    finish_publish,
    list_versions,
    publish_version,
    read_estimate,
    sha256_bytes,
    unfinished_publish,
    version_key,
    who,
)
from faceclf.training.plots import plot_versions
from faceclf.training.run import TEST_PREDICTIONS

log = logging.getLogger(__name__)

DRIFT_FILE = "drift.json"  # the drift checks of a night (faceclf.nightly.drift), published with the version
PUBLISHED_FILES = ("checkpoint.pt", "metrics.json", "report.md", DECISION_FILE, "history.csv", "config.json",
                   "history.png", "confusion_matrix.png", TEST_PREDICTIONS, "versions.png", DRIFT_FILE,
                   disagree.GALLERY_FILE, "label_audit.csv", "label_audit.png", "reliability.png")
PLOTS = ("history.png", "confusion_matrix.png", "versions.png", disagree.GALLERY_FILE,  # the image artifacts
         "label_audit.png", "reliability.png")
AUDIT_CSV, AUDIT_GALLERY = "label_audit.csv", "label_audit.png"  # the night's label audit, published with it
RECENT_VERSIONS = 20  # versions.png: tonight's candidate and the versions before it
CHAMPION_DIR = ".champion"  # under runs/: the champion's model (sha256-checked), fetched once for the re-score
                            # before training and the drift check, and kept while it stays the champion


@dataclass(frozen=True)
class ChampionScore:
    """The champion re-scored on tonight's test set, with its predicted class per test image (by sha256)."""

    version: str
    metrics: dict[str, Any]
    predicted: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Published:
    """What publishing a night did: the version's URIs, whether it was promoted, the pointer after it, its
    report without the warnings block (``report_body``: faceclf.inform.with_warnings adds them), the informing
    steps that failed so far (``warnings``) and why the pipeline is stuck (``stuck``)."""

    version: str
    promoted: bool
    uris: dict[str, str]
    champion: dict[str, Any] | None
    report_body: str
    warnings: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)   # why the pipeline is stuck (faceclf.nightly.stuck)


def check_classes(faceset: FaceSet, champion: ChampionRef | None, allow_new_classes: bool = False) -> list[str]:
    """Stop the night before training when there is nothing to train on or the class set changed.

    A class that appears (or vanishes) compared to the champion is an error naming it, unless
    ``allow_new_classes``: a new label should be a decision, not an accident of an upload.
    """
    if not faceset.images:
        raise ValueError(f"no images to train on: {faceset.root} is empty and nothing new was ingested "
                         "(is incoming/ empty?)")
    present = sorted(c for c, n in faceset.class_totals().items() if n)
    if champion is not None and not allow_new_classes:
        known = list(champion.classes)
        new, gone = sorted(set(present) - set(known)), sorted(set(known) - set(present))
        if new:
            raise ValueError(f"new class {new[0]!r} appeared in the data (the champion knows {known}); "
                             "rerun with allow_new_classes=true to train a model with it")
        if gone:
            raise ValueError(f"class {gone[0]!r} of the champion has no images any more (data has {present})")
    return present


def new_images(faceset: FaceSet, latest: dict[str, Any] | None) -> int | None:
    """Images in tonight's FaceSet that the last published version was not trained on; None before the
    first published version. The set only grows, so this is the difference in counts; when the data
    changed without growing (a conflict withdrawn and an image added), it counts as 1."""
    if latest is None:
        return None
    if latest.get("data_fingerprint") == faceset.fingerprint():
        return 0
    return max(len(faceset.images) - int(latest.get("images", 0)), 1)


def nothing_new(faceset: FaceSet, latest: dict[str, Any] | None, min_new_images: int, force: bool) -> str | None:
    """Why tonight does not train ("nothing new: ..."), or None when it should train."""
    new = new_images(faceset, latest)
    if force or new is None or new >= min_new_images:
        return None
    return (f"nothing new: {new} new image(s) since version {latest['version']} (min_new_images={min_new_images}); "
            "no training, no new version (force=true trains anyway)")


def skipped_report(reason: str, ingest: dict[str, Any], champion: ChampionRef | None) -> str:
    """report.md of a night that ended after ingest: why, what ingest saw, the champion left as it was."""
    rows = [f"| ingest: {k} | {ingest.get(k)} |" for k in ("listed", "new", "skipped", "duplicates", "quarantined")]
    rows += [f"| {k} | {v} |" for k, v in twin_lines(ingest).items()]
    return "\n".join([
        "# faceclf night: nothing new", "", "**Decision: SKIPPED**", "", f"- {reason}",
        f"- Champion: {champion.version if champion else 'none'} (unchanged)", "",
        "## Data", "", "| what | count |", "| --- | --- |", *rows, "",
    ])


def warm_start(cfg: RunConfig, champion: ChampionRef | None, faceset: FaceSet, warm_epochs: int,
               store: Store) -> RunConfig:
    """``cfg`` set to fine-tune the champion for ``warm_epochs`` epochs; unchanged (and said why) when there is
    no champion yet or its classes are not tonight's (a deliberate class change needs a new model).

    An "auto" image size becomes the champion's (its weights fit that size only), so a median that moved
    since does not refuse the warm start; a size given in pixels must match it.
    """
    if champion is None:
        log.info("warm start: no champion yet, training from scratch")
        return cfg
    if list(champion.classes) != list(faceset.classes):
        log.warning("warm start: champion %s knows classes %s, tonight's data has %s: training from scratch",
                    champion.version, list(champion.classes), list(faceset.classes))
        return cfg
    size = cfg.data.image_size
    if size == "auto":
        size = json.loads(store.get_bytes(version_key(champion.version, "config.json")))["data"]["image_size"]
    return with_overrides(cfg, init_from=champion.version, epochs=warm_epochs, image_size=size)


def refresh_cache(store: Store, face_dir: Path, faceset: FaceSet, data: DataConfig) -> CacheReport:
    """Bring the decoded-image cache at the night's image size up to date (decoding only what is new)
    and mirror it to the bucket."""
    return update_cache(faceset, face_dir, Preprocess.from_config(data), store,
                        CacheConfig(decode_workers=data.decode_workers))[1]


def open_cache(face_dir: Path, data: DataConfig) -> DecodedCache:
    """The night's decoded-image cache, for training to read through memory maps."""
    preset = Preprocess.from_config(data)
    return DecodedCache(cache_folder(face_dir, preset.image_size), preset)


def record_divergence(run_dir: Path, version: str, faceset: FaceSet, reason: str) -> dict[str, Any]:
    """metrics.json for a run whose training diverged: nothing measured, the reason kept.

    The night then goes on like any rejected one (the gate fails it, the report and decision are
    published, the champion stays), instead of ending as a bare failed flow run.
    """
    classes, per_split = list(faceset.classes), faceset.counts()

    def unmeasured(split: str) -> dict[str, Any]:
        return {"loss": None, "accuracy": None, "per_class_accuracy": {c: None for c in classes},
                "confusion_matrix": None, "n": sum(per_split[split].values()), "per_class_n": per_split[split],
                "diverged": reason}

    metrics = {"classes": classes, "best_epoch": None, "device": None, "version": version,
               "val": unmeasured("val"), "test": unmeasured("test"),
               "data": {"counts": {s: sum(n.values()) for s, n in per_split.items()}}, "diverged": reason}
    write_json_atomic(run_dir / "metrics.json", metrics)
    log.error("training diverged (%s): the night records a rejected version %s", reason, version)
    return metrics


def check_drift(store: Store, faceset: FaceSet, new_sha256: list[str], face_dir: Path, data: DataConfig,
                champion: ChampionRef | None, run_dir: Path, cfg: DriftConfig) -> DriftReport:
    """Tonight's new images against the train split already held (faceclf.nightly.drift), and the champion's
    accuracy on them (at most ``cfg.sample``, evenly spread) against its own test accuracy; run_dir/drift.json."""
    champion_new = None
    if champion is not None and new_sha256:
        fresh = spread(faceset.images.take(new_mask(faceset, new_sha256)), cfg.sample)
        _, path = fetch_champion(store, champion_dir(run_dir.parent) / "champion.onnx", champion)
        champion_new = accuracy_on(path, [faceset.file(i) for i in fresh], [i.label for i in fresh])
    report = measure(faceset, new_sha256, open_cache(face_dir, data), cfg, champion_new,
                     champion.pointer.get("test_accuracy") if champion else None)
    write_json_atomic(run_dir / DRIFT_FILE, report.to_dict())
    return report


@dataclass(frozen=True)
class LabelAudit:
    """Tonight's label audit (faceclf.nightly.audit): the new images the champion says are mislabelled, how many
    new images it judged, and how many train/val images label_audit=exclude left out (every recorded suspect)."""

    mode: str                                  # NightConfig.label_audit
    rows: tuple[audit.AuditRow, ...] = ()
    audited: int = 0
    excluded: int = 0
    skipped: str | None = None                 # why no audit ran (no champion yet, nothing new, off)


def audit_new_labels(store: Store, faceset: FaceSet, new_sha256: Sequence[str], new_keys: Sequence[str],
                     champion: ChampionRef | None, runs_dir: Path, mode: str) -> LabelAudit:
    """The champion's audit of tonight's new labels, thresholds from the val split with them; the suspects are
    appended to the bucket's record (datasets/face/label_suspects.jsonl). The champion is the out-of-sample
    judge: it never saw tonight's images. Before the first champion, or with nothing new, there is none."""
    if mode == "off":
        return LabelAudit(mode, skipped="label_audit=off")
    if champion is None:
        return LabelAudit(mode, skipped="no champion yet: no model that has not seen these images to judge them")
    fresh = faceset.images.take(new_mask(faceset, new_sha256))
    if not len(fresh):
        return LabelAudit(mode, skipped="no new images")
    key_of = dict(zip(new_sha256, new_keys))
    _, path = fetch_champion(store, champion_dir(runs_dir) / "champion.onnx", champion)
    rows = audit.audit_labels(path, [(key_of.get(i.sha256, i.path), i.sha256, faceset.file(i), i.label) for i in fresh],
                              [(faceset.file(i), i.label) for i in faceset.split("val")],
                              expected_sha256=champion.model_sha256)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    audit.record_suspects(store, rows, champion.version, now)
    return LabelAudit(mode, tuple(rows), len(fresh))


def without_suspects(store: Store, faceset: FaceSet, result: LabelAudit) -> tuple[FaceSet, LabelAudit]:
    """label_audit=exclude: ``faceset`` without the train and val images any audit flagged (the bucket's record
    and tonight's), and ``result`` counting them. Test keeps them: filtering the test split by a model's opinion
    would flatter that model."""
    shas = {str(r["sha256"]) for r in audit.read_suspects(store)} | {r.sha256 for r in result.rows}
    flagged = np.isin(faceset.images.sha256s, np.array(sorted(shas), dtype="S64")) & ~faceset.images.split_mask("test")
    if not flagged.any():
        return faceset, result
    log.warning("label_audit=exclude: %d train/val image(s) flagged as mislabelled are left out of training",
                int(flagged.sum()))
    kept = FaceSet(faceset.root, faceset.classes, faceset.images.take(~flagged), faceset.duplicates,
                   faceset.conflicts, faceset.presplit)
    return kept, dataclasses.replace(result, excluded=int(flagged.sum()))


def audit_section(run_dir: Path, result: LabelAudit | None, warnings: Warnings) -> str:
    """Write run_dir/label_audit.csv and its gallery (label_audit.png), and return the report section; "" without
    an audit. Only informs: a failure joins ``warnings``."""
    if result is None:
        return ""
    if result.skipped:
        return f"## Label audit\n\nNot run: {result.skipped}.\n"
    warnings.attempt("label audit file (label_audit.csv)", audit.write_audit_csv, result.rows, run_dir / AUDIT_CSV)
    warnings.attempt("label audit gallery (label_audit.png)", audit.audit_gallery, result.rows, run_dir / AUDIT_GALLERY)
    body = warnings.attempt("label audit section of the report", audit.audit_markdown, result.rows, result.audited) or ""
    if result.mode == "exclude":
        body += (f"\nlabel_audit=exclude: {result.excluded} train/val image(s) flagged tonight or on an earlier "
                 "night were left out of training (test keeps its images).\n")
    return body


def champion_dir(runs_dir: Path) -> Path:
    """Where a night keeps its copy of the champion's model: runs_dir/.champion (no run folder: no night.json)."""
    return runs_dir / CHAMPION_DIR


def rescore_champion(store: Store, champion: ChampionRef | None, faceset: FaceSet, work_dir: Path) -> ChampionScore | None:
    """Download the champion (sha256-checked) to work_dir/champion.onnx, unless the copy there is it, and measure
    it on tonight's test split (the night does it before training: the warm-or-cold rule and the gate use it).

    None before the first promotion, and when the test set has classes the champion does not know
    (a deliberate class change): then the gate uses the absolute thresholds alone.
    """
    if champion is None:
        log.info("no champion yet: the gate uses the absolute thresholds only")
        return None
    unknown = sorted({i.label for i in faceset.split("test")} - set(champion.classes))
    if unknown:
        log.warning("champion %s does not know class(es) %s: not comparable, absolute thresholds only",
                    champion.version, unknown)
        return None
    _, path = fetch_champion(store, work_dir / "champion.onnx", champion)
    metrics, predicted = evaluate_onnx_per_image(path, faceset)
    log.info("champion %s re-scored on tonight's test set: accuracy %.4f on %d images",
             champion.version, metrics["accuracy"], metrics["n"])
    return ChampionScore(champion.version, metrics, predicted)


def paired_outcomes(run_dir: Path, champion: ChampionScore | None, classes: Sequence[str],
                    permutations: int) -> tuple[McNemar, list[ClassComparison]] | tuple[None, None]:
    """The candidate (RUN/test_predictions.csv) and the champion compared image by image on the test images
    both scored: McNemar overall, and each class's precision, recall and F1 (paired permutation test);
    (None, None) without a champion, or for a run written before per-image predictions existed."""
    path = run_dir / TEST_PREDICTIONS
    if champion is None or not champion.predicted or not path.is_file():
        return None, None
    with open(path, newline="", encoding="utf-8") as f:
        candidate = {r["sha256"]: (r["class"], r["predicted"]) for r in csv.DictReader(f)}
    common = sorted(set(candidate) & set(champion.predicted))
    index = {c: i for i, c in enumerate(classes)}
    truth = [index[candidate[s][0]] for s in common]
    ours, theirs = [index[candidate[s][1]] for s in common], [index[champion.predicted[s]] for s in common]
    return (mcnemar([a == y for a, y in zip(ours, truth)], [b == y for b, y in zip(theirs, truth)]),
            compare_classes(classes, truth, ours, theirs, permutations))


def export_candidate(run_dir: Path, int8: bool = False, int8_cfg: Int8Config | None = None) -> ExportReport:
    """Export the run's best checkpoint to run_dir/model.onnx (checked and parity-tested); with ``int8`` also
    run_dir/model.int8.onnx, calibrated on the run's validation images. An int8 model that disagrees with
    fp32 (below ``int8_cfg.min_agreement``) is refused and left out, with the reason in the report: the fp32 model
    is promoted all the same."""
    from faceclf.serving.quantize import QuantizationRefused, export_int8

    report = export_onnx(run_dir / "checkpoint.pt", run_dir / MODEL_FILE)
    if int8:
        try:
            q = export_int8(run_dir / "checkpoint.pt", run_dir / MODEL_FILE, int8_cfg)
            report.int8 = {"file": q.path.name, "images": q.images, "agreement": q.agreement,
                           "speedup": round(q.speedup, 3)}
        except QuantizationRefused as e:
            log.warning("int8 model not published: %s", e)
            report.int8 = {"refused": str(e)}
    return report


def recent_versions(store: Store, version: str, decision: Decision) -> list[dict[str, Any]]:
    """The registry's last versions (faceclf.store.registry.list_versions rows) with tonight's as the newest,
    as it will read once published."""
    rows = [r for r in list_versions(store, RECENT_VERSIONS) if r["version"] != version][-(RECENT_VERSIONS - 1):]
    accuracy = (decision.candidate or {}).get("accuracy") or {}
    rows.append({"version": version, "test_accuracy": decision.candidate_accuracy, "test_low": accuracy.get("low"),
                 "test_high": accuracy.get("high"), "gate_passed": decision.promote, "champion": decision.promote,
                 "promoted": decision.promote, "why": decision.why, "champion_stale": decision.champion_stale})
    if decision.promote:
        rows = [{**r, "champion": r is rows[-1]} for r in rows]
    return rows


def what_changed(run_dir: Path, score: ChampionScore | None, faceset: FaceSet, version: str,
                 warnings: Warnings) -> str:
    """The report section on the test images candidate and champion disagree on (per class, both directions) and
    their gallery, run_dir/disagreements.png; "" without a champion scored image by image. Only informs."""
    if score is None or not score.predicted or not (run_dir / TEST_PREDICTIONS).is_file():
        return ""
    rows = warnings.attempt("test disagreements", disagree.disagreements, run_dir / TEST_PREDICTIONS,
                            score.predicted, faceset)
    if rows is None:
        return ""
    warnings.attempt("disagreement gallery (disagreements.png)", disagree.disagreement_gallery, rows,
                     run_dir / disagree.GALLERY_FILE)
    return warnings.attempt("disagreement section of the report", disagree.disagreement_markdown, rows, version,
                            score.version) or ""


def night_files(run_dir: Path, decision: Decision, metrics: dict[str, Any], data: dict[str, Any], store: Store,
                champion: ChampionRef | None, cfg: NightConfig, drift: DriftReport | None = None,
                warnings: Warnings | None = None, sections: Sequence[str] = ()) -> tuple[dict[str, Path], str, list[str]]:
    """Write decision.json, versions.png and report.md (stuck pipeline and drift sections, when they apply, then
    ``sections``, and a block of ``warnings`` under its title) next to the run's outputs; return every file to
    publish, the report without its warnings block, and why the pipeline is stuck (faceclf.nightly.stuck). The
    versions plot, the stuck check and the drift section only inform: their failures join ``warnings``."""
    warnings = warnings if warnings is not None else Warnings()
    version = metrics["version"]
    write_json_atomic(run_dir / DECISION_FILE, decision.to_dict())
    rows = warnings.attempt("reading the last versions", recent_versions, store, version, decision) or []
    if rows:
        warnings.attempt("versions plot (versions.png)", plot_versions, rows, run_dir / "versions.png")
    stuck = stuck_reasons(rows, version if decision.promote else champion.version if champion else None,
                          cfg.stuck_after) if rows else []
    estimate = warnings.attempt("reading the champion's last estimate", read_estimate, store,
                                champion.version) if champion else None
    body = render_report(version, metrics["classes"], metrics, decision.to_dict(), data, stuck, estimate)
    if drift is not None:
        body += "\n" + (warnings.attempt("drift section of the report", drift_markdown, drift) or "")
    body += "".join("\n" + s for s in sections if s)
    write_text_atomic(run_dir / "report.md", with_warnings(body, warnings.items))
    files = {name: run_dir / name for name in PUBLISHED_FILES}
    if decision.promote:
        files[MODEL_FILE] = run_dir / MODEL_FILE
        files[INT8_MODEL_FILE] = run_dir / INT8_MODEL_FILE  # kept below only where export wrote one
    return {k: v for k, v in files.items() if v.is_file()}, body, stuck


def publish(store: Store, files: dict[str, Path], decision: Decision, metrics: dict[str, Any],
            champion: ChampionRef | None, faceset: FaceSet, report_body: str) -> Published:
    """Publish the night as one idempotent step: upload the version's files, record the publish
    (publishing.json), then move champion.json (only if promoted) and write latest.json, in that order
    (faceclf.store.registry.finish_publish). Killed anywhere after the record, the next night finishes it."""
    version = metrics["version"]
    uris = publish_version(store, version, files)
    record = PublishRecord(version, decision.promote,
                           sha256_bytes(files[MODEL_FILE].read_bytes()) if decision.promote else None,
                           decision.summary(), champion.version if champion else None, metrics["test"],
                           list(metrics["classes"]), f"train flow (gate) on {who()}", len(faceset.images),
                           faceset.fingerprint())
    begin_publish(store, record)
    pointer = finish_publish(store, record)
    return Published(version, decision.promote, uris, pointer, report_body)


def finish_unfinished_publish(store: Store, runs_dir: Path) -> str | None:
    """Finish the publish a killed night left half done (champion.json, latest.json), whichever worker it ran
    on, and mark its run folder published if this worker has it; the version finished, or None."""
    record = unfinished_publish(store)
    if record is None:
        return None
    log.warning("finishing the publish of version %s, which a night left unfinished (%s)", record.version,
                "promoted" if record.promote else "rejected")
    finish_publish(store, record)
    if (runs_dir / record.version / runs.NIGHT_FILE).is_file():
        runs.mark_published(runs_dir / record.version, record.version, record.promote)
    return record.version


def amend_report(store: Store, run_dir: Path, published: Published, warnings: Warnings) -> str:
    """Rewrite the version's report.md with every warning of the night (some came after it was first
    published: the Prefect artifacts, the notification); the report as amended."""
    report = with_warnings(published.report_body, warnings.items)
    write_text_atomic(run_dir / "report.md", report)
    publish_version(store, published.version, {"report.md": run_dir / "report.md"})
    return report


def twin_lines(ingest: dict[str, Any]) -> dict[str, Any]:
    """The near-duplicate counts of a night's data table: new images placed with a twin, and the test images that
    still have a train twin (placed before near-duplicates decided the split; `faceclf resplit` moves them)."""
    twins = ingest.get("twins") or {}
    leak = twins.get("test", 0)
    return {"ingest: joined a near-duplicate's split": ingest.get("joined_twins", 0),
            "test images with a near-duplicate in train": (f"{leak} (the test accuracy partly measures memory: "
                                                            "run `faceclf resplit`)" if leak else 0)}


def report_counts(ingest: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The counts the report's data table shows: what ingest did tonight, and the images per split used."""
    counts = {f"ingest: {k}": ingest.get(k) for k in ("listed", "new", "skipped", "duplicates", "quarantined")}
    counts.update(twin_lines(ingest))
    counts.update({f"{s} images": n for s, n in metrics["data"]["counts"].items()})
    return counts
