"""`faceclf resplit`: move the near-duplicates that straddle splits in an existing bucket, explicitly and on record.

Buckets filled before near-duplicates decided the split hold test images whose twin was trained on (every
night reports how many: ``IngestReport.twins``). Nothing moves by itself; this does, once asked:

    1. under the bucket lease, read the manifest; sign every image from its file in dest (rotated probes
       included, which a night's count from the stored hashes lacks); rows without a stored hash get it
    2. plan: each twin group that straddles splits goes whole to the first of train, val, test holding one of its
       members (faceclf.dataset.placement.resplit_moves): images leave test for train, never the reverse
    3. link each moved file at its new path in dest, rewrite the manifest (moved rows keep ``resplit_from`` and
       ``resplit_at``), then remove the old paths: killed anywhere, every path the manifest names is whole
    4. re-score the champion on the old and the new test split, and record the resplit in champion.json's history
       (moved images, test images before and after, the champion's accuracy on both); its ``test_accuracy``
       becomes the new split's, which the next night's drift check compares with

The next night trains (the data fingerprint changed) and re-scores the champion on the new test split before
its gate, as every night does.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faceclf.config import DECODE_WORKERS, IngestConfig
from faceclf.dataset.faceset import FaceSet, from_manifest
from faceclf.dataset.manifest import read_manifest, signature_of_row, write_manifest
from faceclf.dataset.near import signature_file, to_hex
from faceclf.dataset.placement import Sig, resplit_moves, twin_counts
from faceclf.progress import progress
from faceclf.dataset.tree import local_path, make_tree
from faceclf.store.objects import Store
from faceclf.store.registry import CHAMPION_KEY, champion_ref, fetch_champion, swap_pointer, who

log = logging.getLogger(__name__)
Row = dict[str, Any]


@dataclass
class ResplitReport:
    """What a resplit found and did (``dry_run``: found only)."""

    images: int = 0                                             # "ok" images in the manifest
    moved: dict[str, int] = field(default_factory=dict)         # "test->train": images, per direction
    twins_before: dict[str, int] = field(default_factory=dict)  # val/test images with a train twin
    twins_after: dict[str, int] = field(default_factory=dict)
    test_before: int = 0                                        # test images
    test_after: int = 0
    signed: int = 0                                             # rows given their signature first
    champion: dict[str, Any] | None = None                      # version, accuracy_before, accuracy_after
    dry_run: bool = False

    def summary(self) -> str:
        """One line for the log, the CLI and the registry history."""
        moved = ", ".join(f"{n} {k}" for k, n in sorted(self.moved.items())) or "nothing"
        champ = ""
        if self.champion:
            champ = (f"; champion {self.champion['version']} test accuracy {self.champion['accuracy_before']:.4f} -> "
                     f"{self.champion['accuracy_after']:.4f}")
        return (f"{'would move' if self.dry_run else 'moved'} {moved}; test images {self.test_before} -> "
                f"{self.test_after}, with a train twin {self.twins_before.get('test', 0)} -> "
                f"{self.twins_after.get('test', 0)}{champ}")


def moved_row(row: Row, split: str, now: str) -> Row:
    """``row`` in ``split``: its path's split part replaced, where it came from recorded."""
    rest = row["path"].split("/", 1)[1]
    return {**row, "split": split, "path": f"{split}/{rest}", "resplit_from": row["split"], "resplit_at": now}


def signatures(dest: Path, rows: list[Row]) -> list[Sig]:
    """Each row's signature: from its file in dest (probes included) where it is there and decodes, else the
    stored hash (None for "duplicate"/"conflict" rows and unsigned rows without a file). An "ok" row without a
    stored hash gets it, in place."""
    def sign(row: Row) -> Sig:
        if row.get("status", "ok") != "ok":
            return None
        path = local_path(dest, row["path"])
        try:
            return signature_file(path) if path.is_file() else signature_of_row(row)
        except Exception as e:  # noqa: BLE001 - a file that no longer decodes: its stored hash, if any
            log.warning("cannot sign %s: %s", path, e)
            return signature_of_row(row)

    with ThreadPoolExecutor(DECODE_WORKERS) as pool:
        sigs = list(progress(pool.map(sign, rows), total=len(rows), desc="sign", unit="img"))
    for row, sig in zip(rows, sigs):
        if sig is not None and "phash" not in row:
            row["phash"] = to_hex(sig if isinstance(sig, int) else sig.value)
    return sigs


def plan(rows: list[Row], sigs: list[Sig], distance: int, now: str) -> tuple[list[Row], dict[str, str]]:
    """The manifest after the resplit, and {old path: new path} of every moved file. A "duplicate" row holding
    a moved image's path moves with it (its split and path are its owner's)."""
    ok = [i for i, r in enumerate(rows) if r.get("status", "ok") == "ok"]
    moves = resplit_moves([rows[i]["split"] for i in ok], [sigs[i] for i in ok], distance)
    new_rows = list(rows)
    paths: dict[str, str] = {}
    for k, split in moves.items():
        i = ok[k]
        new_rows[i] = moved_row(rows[i], split, now)
        paths[rows[i]["path"]] = new_rows[i]["path"]
    for i, r in enumerate(rows):
        if r.get("status") == "duplicate" and r["path"] in paths:
            new_rows[i] = {**moved_row(r, paths[r["path"]].split("/", 1)[0], now), "path": paths[r["path"]]}
    return new_rows, paths


def link_files(dest: Path, paths: dict[str, str]) -> None:
    """Make each moved file exist at its new path too (a hard link, or a copy across file systems); a file
    already at its new path (a rerun) is left, a missing one is left to ingest's restore."""
    for old, new in paths.items():
        src, dst = local_path(dest, old), local_path(dest, new)
        if dst.is_file() or not src.is_file():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".resplit-tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)


def unlink_old(dest: Path, paths: dict[str, str]) -> None:
    """Remove the old path of each moved file whose new path holds it (after the manifest names the new ones)."""
    for old, new in paths.items():
        if local_path(dest, new).is_file():
            local_path(dest, old).unlink(missing_ok=True)


def split_counts(rows: list[Row], sigs: list[Sig], distance: int) -> tuple[int, dict[str, int]]:
    """(test images, val/test images with a train twin) of manifest rows with their signatures."""
    ok = [(r["split"], s) for r, s in zip(rows, sigs) if r.get("status", "ok") == "ok"]
    return sum(split == "test" for split, _ in ok), twin_counts(ok, distance)


def champion_accuracy(store: Store, faceset: FaceSet, work_dir: Path) -> tuple[str, float] | None:
    """(champion version, its accuracy on ``faceset``'s test split); None before the first promotion. The model
    is fetched sha256-checked to work_dir (once: a copy there that matches is used)."""
    from faceclf.serving.onnx_model import evaluate_onnx

    champion = champion_ref(store)
    if champion is None:
        return None
    fetched = fetch_champion(store, work_dir / "champion.onnx", champion)
    assert fetched is not None  # champion_ref found one
    return champion.version, evaluate_onnx(fetched[1], faceset)["accuracy"]


def record(store: Store, report: ResplitReport, by: str, now: str) -> None:
    """Append the resplit to champion.json's history and set its test_accuracy to the new split's (compare-and-swap;
    nothing is recorded without a champion: then the moved rows' resplit_from / resplit_at are the record)."""
    if report.champion is None:
        return
    entry = {"version": report.champion["version"], "resplit_at": now, "by": by, "reason": report.summary(),
             "moved": report.moved, "test_images": {"before": report.test_before, "after": report.test_after},
             "test_accuracy": {"before": report.champion["accuracy_before"],
                               "after": report.champion["accuracy_after"]}}

    def change(current: dict[str, Any] | None) -> dict[str, Any] | None:
        if current is None or current["version"] != report.champion["version"]:
            log.warning("champion.json moved during the resplit; the resplit is recorded in the manifest only")
            return None
        return {**current, "test_accuracy": report.champion["accuracy_after"],
                "history": [*current.get("history", []), entry]}

    swap_pointer(store, CHAMPION_KEY, change)


def resplit(store: Store, dest: str | os.PathLike[str], cfg: IngestConfig | None = None, dry_run: bool = False,
            work_dir: str | os.PathLike[str] | None = None, by: str | None = None) -> ResplitReport:
    """Move the twins that straddle splits (see the module docstring); the caller holds the bucket lease.

    ``dest``: the worker's face/ folder (ingest's dest: moved files are linked there, unsigned rows signed from it);
    ``work_dir``: where the champion's model is fetched for its re-score (default: dest's parent / .resplit)."""
    cfg = cfg or IngestConfig()
    dest = Path(dest)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows = read_manifest(store)
    report = ResplitReport(dry_run=dry_run)
    unsigned = sum(r.get("status", "ok") == "ok" and "phash" not in r for r in rows)
    sigs = signatures(dest, rows)
    report.signed = unsigned - sum(r.get("status", "ok") == "ok" and "phash" not in r for r in rows)
    new_rows, paths = plan(rows, sigs, cfg.near_distance, now)
    report.images = sum(r.get("status", "ok") == "ok" for r in rows)
    report.test_before, report.twins_before = split_counts(rows, sigs, cfg.near_distance)
    report.test_after, report.twins_after = split_counts(new_rows, sigs, cfg.near_distance)
    report.moved = dict(collections.Counter(f"{old.split('/', 1)[0]}->{new.split('/', 1)[0]}" for old, new in paths.items()))
    if dry_run:
        log.info("resplit (dry run): %s", report.summary())
        return report
    work = Path(work_dir or dest.parent / ".resplit")
    before = champion_accuracy(store, from_manifest(rows, dest, missing(rows, dest)), work) if paths else None
    if paths or report.signed:
        make_tree(dest, sorted({r["class"] for r in new_rows if r.get("status", "ok") == "ok"}))
        link_files(dest, paths)
        write_manifest(store, new_rows)
        unlink_old(dest, paths)
    if before is not None:
        after = champion_accuracy(store, from_manifest(new_rows, dest, missing(new_rows, dest)), work)
        if after is not None and after[0] == before[0]:
            report.champion = {"version": before[0], "accuracy_before": before[1], "accuracy_after": after[1]}
            record(store, report, by or who(), now)
    log.info("resplit: %s", report.summary())
    return report


def missing(rows: list[Row], dest: Path) -> list[str]:
    """The paths of "ok" rows whose file is not in dest (left out of a FaceSet that only reads what is there)."""
    return [r["path"] for r in rows if r.get("status", "ok") == "ok" and not local_path(dest, r["path"]).is_file()]
