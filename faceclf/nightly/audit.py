"""Label audit of arriving images: the new images whose given label the evidence contradicts, before training.

The evidence is the current champion's probabilities (an ONNX model that never saw tonight's new images nor
the val split: out-of-sample for both). Confident learning (cleanlab's ``find_label_issues``) needs a
threshold per class, the champion's mean self-confidence on the images given that class; tonight's new
images may be a handful, so the thresholds come from the val split and the new images together, and only the
new images that are flagged are listed. A flagged image gets a suggested class (the most probable class other
than its given one) and the champion's probability of it.

    audit_labels(champion.onnx, new, val)  -> [AuditRow]        most confident first
    write_audit_csv(rows, label_audit.csv) -> key, sha256, given_class, suggested_class, confidence
    audit_gallery(rows, label_audit.png)   -> a contact sheet, "given -> suggested 0.97" under each image
    audit_markdown(rows, audited)          -> the report.md section

The audit only informs: what to do with the listed images (report, or leave them out of training) is the
caller's choice.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from faceclf.config import ScoreConfig
from faceclf.dataset.layout import SHA256_HEX
from faceclf.dataset.manifest import read_jsonl
from faceclf.nightly.gallery import CAPTION_CHARS, contact_sheet
from faceclf.serving.onnx_model import OnnxModel, load_onnx_model, predict_files
from faceclf.store.atomic import write_text_atomic
from faceclf.store.objects import Store

log = logging.getLogger(__name__)

# --- defaults -------------------------------------------------------------------------------------
FILTER_BY = "prune_by_noise_rate"  # cleanlab's default: per off-diagonal of the confident joint, the images
                                   # with the largest margin of the other class over the given one
CHUNK = 2048                       # images decoded and scored at a time: bounds memory on a large val split
CSV_COLUMNS = ("key", "sha256", "given_class", "suggested_class", "confidence")
GALLERY_TITLE = "Label audit: new images whose label the champion contradicts (given -> suggested, probability)"

NewImage = tuple[str, str, Path, str]   # (key, sha256, file, given class)
Reference = tuple[Path, str]            # (file, given class)


@dataclass(frozen=True)
class AuditRow:
    """One new image whose given label the champion's evidence contradicts."""

    key: str           # the image's object key (incoming/<class>/<name>) or other caller's name for it
    sha256: str
    path: Path         # where the image is on disk (for the gallery)
    given: str         # the class it arrived with
    suggested: str     # the most probable class other than ``given``
    confidence: float  # the champion's probability of ``suggested``


def suggest(probs: np.ndarray, given: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``probs`` (N, C) with given class ``given`` (N,): the most probable class other than the
    given one (N,) and its probability (N,). Excluding the given class keeps a suggestion a real alternative
    even for an image cleanlab flags while its argmax is still the given class (a weak, borderline one)."""
    others = np.array(probs, dtype=np.float64, copy=True)   # (N, C)
    others[np.arange(len(given)), given] = -np.inf
    suggested = others.argmax(1)                              # (N,)
    return suggested, probs[np.arange(len(given)), suggested]


def _known(items: Sequence[tuple], label_at: int, classes: list[str], what: str) -> list[tuple]:
    """The items whose label (at position ``label_at``) the model knows; the others are logged and skipped."""
    unknown = sorted({item[label_at] for item in items} - set(classes))
    if unknown:
        n = sum(item[label_at] in unknown for item in items)
        log.warning("label audit: %d %s image(s) of class(es) %s skipped: the champion knows only %s",
                    n, what, unknown, classes)
    return [item for item in items if item[label_at] in classes]


def champion_probs(model: OnnxModel, files: Sequence[Path], labels: Sequence[int],
                   cfg: ScoreConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities (K, C) float64, rows summing to 1; labels (K,); positions in ``files`` (K,)) of the files
    that decode, scored CHUNK at a time so a large val split never sits in memory decoded at once."""
    probs, ys, pos = [], [], []
    for start in range(0, len(files), CHUNK):
        log_probs, y, ok = predict_files(model, files[start:start + CHUNK], labels[start:start + CHUNK], cfg)
        probs.append(np.exp(log_probs.astype(np.float64)))
        ys.append(y)
        pos.append(np.asarray(ok, dtype=np.int64) + start)
    p = np.concatenate(probs) if probs else np.empty((0, len(model.classes)))
    p /= np.maximum(p.sum(1, keepdims=True), 1e-300)  # float32 softmax rows sum to 1 only within ~1e-7
    return p, np.concatenate(ys) if ys else np.empty(0, np.int64), np.concatenate(pos) if pos else np.empty(0, np.int64)


def flag_issues(labels: np.ndarray, probs: np.ndarray, filter_by: str = FILTER_BY) -> np.ndarray:
    """bool (N,): cleanlab's confident-learning verdict on each (label, probabilities) pair. In this process
    (n_jobs=1): cleanlab would otherwise fork a pool from a process that holds torch and onnxruntime threads."""
    from cleanlab.filter import find_label_issues

    with warnings.catch_warnings():  # a class no image is given (a 3-class champion, 2 classes tonight): cleanlab
        warnings.filterwarnings("ignore", "May not flag all label issues in class")  # warns it has too few examples
        warnings.simplefilter("ignore", RuntimeWarning)  # and may take the mean of its empty probabilities
        return np.asarray(find_label_issues(labels, probs, filter_by=filter_by, n_jobs=1), dtype=bool)


def audit_labels(model_path: str | os.PathLike[str], new: Sequence[NewImage], reference: Sequence[Reference],
                 cfg: ScoreConfig | None = None, expected_sha256: str | None = None,
                 filter_by: str = FILTER_BY) -> list[AuditRow]:
    """The images of ``new`` (key, sha256, file, given class) whose given class the champion at ``model_path``
    contradicts, most confident first. Per-class thresholds come from ``new`` and ``reference`` (file, class:
    the val split) together; only images of ``new`` are listed. Images of a class the champion does not know
    are skipped, as are files that do not decode (both logged). Fewer than two classes among the labels left
    leaves nothing to contrast: no rows."""
    if not new:
        return []
    cfg = cfg or ScoreConfig()
    model = load_onnx_model(model_path, cfg.device, expected_sha256)
    classes = list(model.classes)
    fresh = _known(new, 3, classes, "new")
    ref = _known(reference, 1, classes, "reference")
    if not fresh:
        return []
    files = [f for _, _, f, _ in fresh] + [f for f, _ in ref]
    labels = [classes.index(c) for *_, c in fresh] + [classes.index(c) for _, c in ref]
    probs, y, pos = champion_probs(model, files, labels, cfg)  # (K, C), (K,), (K,)
    if len(np.unique(y)) < 2:
        log.warning("label audit: the %d decodable image(s) hold fewer than two classes; nothing to audit", len(y))
        return []
    flagged = flag_issues(y, probs, filter_by) & (pos < len(fresh))  # (K,): only new images are reported
    suggested, confidence = suggest(probs, y)
    rows = [AuditRow(key=fresh[p][0], sha256=fresh[p][1], path=Path(fresh[p][2]), given=fresh[p][3],
                     suggested=classes[int(suggested[k])], confidence=float(confidence[k]))
            for k, p in enumerate(pos) if flagged[k]]
    log.info("label audit: %d of %d new image(s) flagged (thresholds over %d images with the val split)",
             len(rows), int((pos < len(fresh)).sum()), len(y))
    return sorted(rows, key=lambda r: (-r.confidence, r.key))


def write_audit_csv(rows: Sequence[AuditRow], path: str | os.PathLike[str]) -> Path:
    """Write ``rows`` as label_audit.csv (CSV_COLUMNS; the header even when there are none), atomically."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(CSV_COLUMNS)
    out.writerows((r.key, r.sha256, r.given, r.suggested, f"{r.confidence:.4f}") for r in rows)
    return write_text_atomic(path, buf.getvalue())


def caption(row: AuditRow) -> str:
    """'given ->' on the tile's first caption line, 'suggested 0.97' on the second (padded to the line width)."""
    return f"{row.given} ->".ljust(CAPTION_CHARS) + f"{row.suggested} {row.confidence:.2f}"


def audit_gallery(rows: Sequence[AuditRow], out_png: str | os.PathLike[str]) -> Path | None:
    """A contact sheet of the flagged images, most confident first, captioned 'given -> suggested 0.97';
    None (nothing written) when nothing was flagged."""
    return contact_sheet([(r.path, caption(r)) for r in rows], Path(out_png), GALLERY_TITLE)


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def audit_markdown(rows: Sequence[AuditRow], audited: int, limit: int = 20) -> str:
    """The report.md section: how many new images were audited, how many flagged, the first ``limit`` rows."""
    head = (f"## Label audit\n\n{audited} new image{'s' if audited != 1 else ''} audited against the champion; "
            f"{len(rows)} flagged as probably mislabelled")
    if not rows:
        return head + ".\n"
    shown = list(rows[:limit])
    lines = [head + (f" (the first {len(shown)} below; all in label_audit.csv)." if len(rows) > len(shown)
                     else " (all in label_audit.csv)."), "",
             "| key | given | suggested | confidence |", "| --- | --- | --- | --- |"]
    lines += [f"| {_cell(r.key)} | {_cell(r.given)} | {_cell(r.suggested)} | {r.confidence:.2f} |" for r in shown]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The record in the bucket: every suspect ever flagged, which label_audit=exclude leaves out of training
# ---------------------------------------------------------------------------------------------
SUSPECTS_KEY = "datasets/face/label_suspects.jsonl"   # one JSON row per flagged image, oldest first


def suspect_problem(row: object) -> str | None:
    """Why a suspects row is not plain (sha256 as 64 lowercase hex; key, given, suggested as text; confidence a
    number); None if it is. Read back from the bucket, so checked: only its sha256 is used to leave images out."""
    if not isinstance(row, dict):
        return "not a JSON object"
    if not isinstance(row.get("sha256"), str) or not SHA256_HEX.fullmatch(row["sha256"]):
        return f"sha256 {row.get('sha256')!r} is not 64 lowercase hex digits"
    if not all(isinstance(row.get(k), str) for k in ("key", "given", "suggested")):
        return "key, given and suggested must be text"
    if not isinstance(row.get("confidence"), (int, float)) or isinstance(row.get("confidence"), bool):
        return f"confidence {row.get('confidence')!r} is not a number"
    return None


def read_suspects(store: Store) -> list[dict[str, object]]:
    """Every recorded suspect ([] before the first); ValueError naming the line of a row not in its legal form."""
    return read_jsonl(store, SUSPECTS_KEY, suspect_problem, ("sha256", "key"), "the night's label audit")


def record_suspects(store: Store, rows: Sequence[AuditRow], champion_version: str, now: str) -> int:
    """Append the suspects not recorded yet (by sha256) with who judged them and when; how many were new. The
    record is what label_audit=exclude leaves out on this and every later night."""
    known = read_suspects(store)
    seen = {r["sha256"] for r in known}
    fresh = [{"sha256": r.sha256, "key": r.key, "given": r.given, "suggested": r.suggested,
              "confidence": round(r.confidence, 4), "champion": champion_version, "at": now}
             for r in rows if r.sha256 not in seen]
    if fresh:
        store.put_bytes(SUSPECTS_KEY, "".join(json.dumps(r, sort_keys=True) + "\n" for r in [*known, *fresh]).encode())
    return len(fresh)
