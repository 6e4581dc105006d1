"""Where predictions go: parts while a run is under way, one atomically written CSV when it ends.

    OUT                      predictions.csv (local path, or a key in a bucket)
    OUT minus .csv + .json   predictions.json: model, source, the resolved ScoreConfig, counts
    OUT.parts/run.json       which model and source the parts belong to
    OUT.parts/part-NNNNNN.csv  each a whole, atomically written batch of rows in key order

Rows arrive in key order, so a killed run resumes after the last key of its last part: no key is scored
twice and no row is duplicated. ``finish`` joins the parts into OUT (atomic) and only then deletes them,
so a run killed at any point leaves OUT as it was (the previous run's, or nothing) or whole.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from faceclf.store.atomic import remove_stale_temps
from faceclf.store.objects import LocalStore, Store, open_store, parse_s3_url

log = logging.getLogger(__name__)

DEFAULT_NAME = "predictions.csv"


@dataclass(frozen=True)
class Destination:
    """A store and the key of the final CSV in it."""

    store: Store
    key: str

    @property
    def parts(self) -> str:
        """Key prefix of the parts folder."""
        return f"{self.key}.parts/"

    @property
    def summary_key(self) -> str:
        """Key of the run's summary beside the CSV: predictions.csv -> predictions.json."""
        return (self.key[:-4] if self.key.lower().endswith(".csv") else self.key) + ".json"

    def uri(self) -> str:
        return self.store.uri(self.key)


def destination(out: str | os.PathLike[str]) -> Destination:
    """``s3://BUCKET/PREFIX/`` or a local folder -> its predictions.csv; a name ending in .csv is the file."""
    text = str(out)
    if text.startswith("s3://"):
        location, key = parse_s3_url(text)
        if not key or key.endswith("/"):
            key += DEFAULT_NAME
        return Destination(open_store(location), key)
    path = Path(text)
    if path.suffix.lower() != ".csv":
        path = path / DEFAULT_NAME
    return Destination(LocalStore(path.parent.resolve()), path.name)


def columns(classes: list[str]) -> list[str]:
    """The CSV's columns for a model with these classes."""
    return ["path", "predicted_class", *[f"p_{c}" for c in classes], "error", "model_version", "etag"]


def _csv_text(fields: list[str], rows: list[dict[str, str]]) -> str:
    """A whole CSV (header and rows) as text: one part file."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


class PredictionOutput:
    """Writes rows into parts of ``part_rows`` and joins them at the end; resumes a killed run's parts."""

    def __init__(self, dest: Destination, fields: list[str], identity: dict[str, str], part_rows: int):
        self.dest, self.fields, self.identity, self.part_rows = dest, fields, identity, part_rows
        self._buffer: list[dict[str, str]] = []
        self._parts: list[str] = []

    # --- start ---------------------------------------------------------------------------------
    def begin(self) -> str:
        """Set up the parts folder; returns the key to start after ('' for a fresh run).

        Parts of a killed run with the same identity (model, source, columns) are kept and resumed;
        parts of any other run are deleted, so rows of two models never mix."""
        store = self.dest.store
        if isinstance(store, LocalStore):
            store.root.mkdir(parents=True, exist_ok=True)
            for p in remove_stale_temps(store.root, self.dest.key) + remove_stale_temps(
                    store.root / self.dest.parts, None):
                log.warning("removed %s, left by an interrupted scoring run", p)
        run_key = self.dest.parts + "run.json"
        parts = sorted(o.key for o in store.list(self.dest.parts) if o.key.rsplit("/", 1)[-1].startswith("part-"))
        if store.exists(run_key) and json.loads(store.get_bytes(run_key)) == self.identity and parts:
            self._parts = parts
            last = _rows(store.get_bytes(parts[-1]).decode("utf-8"))
            log.info("resuming the scoring run of %s: %d part(s) already written, after %s",
                     self.dest.uri(), len(parts), last[-1]["path"])
            return last[-1]["path"]
        for key in parts:
            store.delete(key)
        store.put_bytes(run_key, json.dumps(self.identity, indent=2).encode())
        return ""

    # --- rows ----------------------------------------------------------------------------------
    def write(self, row: dict[str, str]) -> None:
        """Add a row; every ``part_rows`` rows become one part file."""
        self._buffer.append(row)
        if len(self._buffer) >= self.part_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        key = f"{self.dest.parts}part-{len(self._parts) + 1:06d}.csv"
        self.dest.store.put_bytes(key, _csv_text(self.fields, self._buffer).encode("utf-8"))
        self._parts.append(key)
        self._buffer = []

    # --- end -----------------------------------------------------------------------------------
    def finish(self, summary: Callable[[int, int], dict[str, Any]]) -> tuple[int, int]:
        """Join the parts into the final CSV (atomically), write ``summary(rows, errors)`` beside it as JSON
        (the resolved config and counts), then delete the parts; returns (rows, error rows)."""
        self._flush()
        rows = errors = 0
        with tempfile.TemporaryDirectory(prefix="faceclf-predictions-") as tmp:
            joined = Path(tmp) / "predictions.csv"
            with open(joined, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=self.fields, lineterminator="\n")
                w.writeheader()
                for key in self._parts:  # one part in memory at a time
                    for r in _rows(self.dest.store.get_bytes(key).decode("utf-8")):
                        rows += 1
                        errors += bool(r["error"])
                        w.writerow(r)
            self.dest.store.put_file(self.dest.key, joined)
        self.dest.store.put_bytes(self.dest.summary_key, json.dumps(summary(rows, errors), indent=2).encode())
        for key in self._parts:
            self.dest.store.delete(key)
        self.dest.store.delete(self.dest.parts + "run.json")
        return rows, errors

    def previous_rows(self) -> Iterator[dict[str, str]]:
        """Rows of the final CSV a previous run left (key order), streamed; nothing if there is none."""
        if not self.dest.store.exists(self.dest.key):
            return
        with tempfile.TemporaryDirectory(prefix="faceclf-previous-") as tmp:
            local = Path(tmp) / "previous.csv"
            self.dest.store.download(self.dest.key, local)  # a file on disk, never the whole CSV in memory
            with open(local, newline="", encoding="utf-8") as f:
                yield from csv.DictReader(f)


class PreviousRows:
    """Looks up an earlier row for an item, walking the previous CSV alongside the (sorted) listing."""

    def __init__(self, rows: Iterator[dict[str, str]], version: str):
        self.rows, self.version = rows, version
        self.current = next(self.rows, None)

    def reusable(self, key: str, etag: str) -> dict[str, str] | None:
        """The previous row of ``key`` if it was scored by the same model version from the same object."""
        while self.current is not None and self.current["path"] < key:
            self.current = next(self.rows, None)
        r = self.current
        if r is not None and r["path"] == key and r.get("etag") == etag and r["model_version"] == self.version:
            return r
        return None
