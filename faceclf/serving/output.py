"""Where predictions go: parts while a run is under way, one atomically written CSV when it ends.

    OUT                      predictions.csv (local path, or a key in a bucket)
    OUT minus .csv + .json   predictions.json: model, source, the resolved ScoreConfig, counts
    OUT.parts/run.json       which model and source the parts belong to
    OUT.parts/part-NNNNNN.csv  each a whole, atomically written batch of rows in key order

Rows arrive in key order, so a killed run resumes after the last key of its last part: no key is scored
twice and no row is duplicated. ``finish`` joins the parts into OUT (atomic) and only then deletes them,
so a run killed at any point leaves OUT as it was (the previous run's, or nothing) or whole.

Writes stay in their place: OUT is refused under a bucket's models/, datasets/ or incoming/ (the
registry's, the data's and the labellers' prefixes; for a local folder, where one of its parents holds
models/face/ or datasets/face/, as a bucket folder does), and where any of these files exists without
being a scoring run's: the summary and run.json carry ``"written_by": "faceclf score"`` (a summary of
the versions before that marker is known by its fields), so a rerun, a resume and --incremental work
while a champion.json or a settings.json beside OUT is never overwritten.

Flow parameters are untrusted (the Prefect server has no login): ``confine`` keeps a local path a flow
reads or writes inside the worker's own folder (its working directory) or a folder the deployment lists
in FACECLF_ALLOW_PATHS (os.pathsep-separated, as PATH).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Sequence

from faceclf.dataset.manifest import INCOMING, MANIFEST_KEY
from faceclf.store.atomic import remove_stale_temps
from faceclf.store.local_paths import ALLOW_PATHS_ENV, allowed_roots, confine  # noqa: F401 - the flows' names
from faceclf.store.objects import LocalStore, Store, open_store, parse_s3_url, safe_key
from faceclf.store.registry import MODELS_PREFIX

log = logging.getLogger(__name__)

DEFAULT_NAME = "predictions.csv"
WRITTEN_BY = "faceclf score"    # the marker in run.json and the summary: files a scoring run wrote
LEGACY_SUMMARY = frozenset({"model_version", "source", "columns", "model_sha256", "finished_at"})  # before it
LEGACY_RUN = frozenset({"model_version", "source", "columns"})
# Top-level prefixes of a bucket that belong to others: the registry, the data set, the labellers' images.
RESERVED_PREFIXES = tuple(sorted({k.split("/", 1)[0] + "/" for k in (MODELS_PREFIX, MANIFEST_KEY, INCOMING)}))
BUCKET_MARKERS = (MODELS_PREFIX, MANIFEST_KEY.rsplit("/", 1)[0] + "/")  # a local folder holding one is a bucket


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


def check_output_key(key: str, where: str = "") -> str:
    """``key`` if scoring output may go there in a bucket; else ValueError naming it and why.

    A plain key (``safe_key``: no '..', no leading '/') outside RESERVED_PREFIXES: predictions under
    models/ would overwrite the registry (CSV text in champion.json), under datasets/ or incoming/ the
    data the next night trains on.
    """
    shown = where or key
    try:
        safe_key(key)
    except ValueError as e:
        raise ValueError(f"output {shown!r} is not a plain key in a bucket: {e}") from None
    for prefix in RESERVED_PREFIXES:
        if key.startswith(prefix):
            raise ValueError(f"output {shown!r} is under {prefix!r}, which holds the model registry, the data set "
                             f"or the incoming images ({', '.join(RESERVED_PREFIXES)}); scoring never writes there "
                             "(expected e.g. predictions/...)")
    return key


def _check_local_output(path: Path) -> None:
    """ValueError when ``path`` (resolved) lies under a reserved prefix of a local bucket folder above it."""
    for folder in path.parents:
        if any((folder / marker).is_dir() for marker in BUCKET_MARKERS):
            check_output_key(path.relative_to(folder).as_posix(), str(path))


def destination(out: str | os.PathLike[str]) -> Destination:
    """``s3://BUCKET/PREFIX/`` or a local folder -> its predictions.csv; a name ending in .csv is the file.

    Refused (ValueError): a key that is not plain or lies under models/, datasets/ or incoming/, in a
    bucket or in a local bucket folder (one holding models/face/ or datasets/face/).
    """
    text = str(out)
    if text.startswith("s3://"):
        location, key = parse_s3_url(text)
        if not key or key.endswith("/"):
            key += DEFAULT_NAME
        check_output_key(key, text)
        return Destination(open_store(location), key)
    path = Path(text)
    if path.suffix.lower() != ".csv":
        path = path / DEFAULT_NAME
    folder = path.parent.resolve()
    _check_local_output(folder / path.name)
    return Destination(LocalStore(folder), path.name)


def _scorer_wrote(store: Store, key: str, legacy: frozenset[str]) -> bool:
    """True when ``key`` holds a JSON object a scoring run wrote (the marker, or the fields of ``legacy``)."""
    try:
        record = json.loads(store.get_bytes(key))
    except (ValueError, FileNotFoundError):  # not JSON (UnicodeDecodeError is a ValueError), or gone
        return False
    return isinstance(record, dict) and (record.get("written_by") == WRITTEN_BY or legacy <= record.keys())


def check_ownership(dest: Destination) -> None:
    """ValueError unless every file the run would replace was written by a scoring run (or is absent).

    The CSV is the scorer's when its summary or its parts' run.json is; the parts are when run.json is.
    A foreign file (settings.json beside settings.csv, a champion.json) is named and left alone.
    """
    store, run_key = dest.store, dest.parts + "run.json"
    found = {k: store.exists(k) for k in (dest.key, dest.summary_key, run_key)}
    ours = {dest.summary_key: found[dest.summary_key] and _scorer_wrote(store, dest.summary_key, LEGACY_SUMMARY),
            run_key: found[run_key] and _scorer_wrote(store, run_key, LEGACY_RUN)}
    refuse = [k for k in (dest.summary_key, run_key) if found[k] and not ours[k]]
    if found[dest.key] and not any(ours.values()):
        refuse.insert(0, dest.key)
    if not found[run_key] and any(o.key != run_key for o in store.list_stat(dest.parts)):
        refuse.append(dest.parts)
    if refuse:
        raise ValueError(f"refusing to overwrite {', '.join(store.uri(k) for k in refuse)}: not written by a scoring "
                         f"run (neither {store.uri(dest.summary_key)} nor {store.uri(run_key)} is a JSON object with "
                         f"\"written_by\": \"{WRITTEN_BY}\"); choose another output")


def columns(classes: list[str]) -> list[str]:
    """The CSV's columns for a model with these classes."""
    return ["path", "predicted_class", *prob_columns(classes), "error", "model_version", "etag"]


def prob_columns(classes: list[str]) -> list[str]:
    """The probability columns, one per class in the model's order."""
    return [f"p_{c}" for c in classes]


def _csv_text(fields: list[str], rows: Iterable[Sequence[str]]) -> str:
    """A whole CSV (header and rows of values in ``fields`` order) as text: one part file.

    Python 3.11's csv quotes a value holding "\n" but not one holding a bare "\r" (the line terminator is
    "\n"), which every reader then takes for a line end: a part with one is written again with such values
    quoted too (the writer of a "\r\n" terminator quotes them; each line then ends in "\n" as the others).
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(fields)
    rows = list(rows)
    w.writerows(rows)
    text = buf.getvalue()
    if "\r" not in text:
        return text
    quoting = csv.writer(_Echo(), lineterminator="\r\n")
    return "".join([text.partition("\n")[0] + "\n", *(quoting.writerow(r)[:-2] + "\n" for r in rows)])


class _Echo:
    """A file for csv.writer whose write returns the text, so writerow returns the line it wrote."""

    def write(self, text: str) -> str:
        return text


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


class PredictionOutput:
    """Writes rows into parts of ``part_rows`` and joins them at the end; resumes a killed run's parts."""

    def __init__(self, dest: Destination, fields: list[str], identity: dict[str, str], part_rows: int):
        self.dest, self.fields, self.identity, self.part_rows = dest, fields, identity, part_rows
        self._buffer: list[dict[str, str]] = []
        self._parts: list[str] = []
        self._counts: dict[str, tuple[int, int]] = {}  # part written by this run -> (rows, error rows)
        self._values = itemgetter(*fields)  # a row -> its values in column order (a row has every column)
        self._header = _csv_text(fields, []).encode("utf-8")

    # --- start ---------------------------------------------------------------------------------
    def begin(self) -> str:
        """Set up the parts folder; returns the key to start after ('' for a fresh run).

        Parts of a killed run with the same identity (model, source, columns) are kept and resumed;
        parts of any other run are deleted, so rows of two models never mix. Files a scoring run did not
        write are never replaced (``check_ownership``)."""
        store = self.dest.store
        if isinstance(store, LocalStore):
            store.root.mkdir(parents=True, exist_ok=True)
            for p in remove_stale_temps(store.root, self.dest.key) + remove_stale_temps(
                    store.root / self.dest.parts, None):
                log.warning("removed %s, left by an interrupted scoring run", p)
        check_ownership(self.dest)
        run_key = self.dest.parts + "run.json"
        parts = sorted(o.key for o in store.list_stat(self.dest.parts) if o.key.rsplit("/", 1)[-1].startswith("part-"))
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

    def resumed_rows(self) -> Iterator[dict[str, str]]:
        """The rows of the killed run's parts that ``begin`` kept (none on a fresh run), one part in memory at a
        time: they belong to this run as much as the rows it writes."""
        for key in list(self._parts):
            yield from _rows(self.dest.store.get_bytes(key).decode("utf-8"))

    # --- rows ----------------------------------------------------------------------------------
    def write(self, row: dict[str, str]) -> None:
        """Add a row; every ``part_rows`` rows become one part file."""
        self._buffer.append(row)
        if len(self._buffer) >= self.part_rows:
            self._flush()

    def _flush(self) -> None:
        """Write the buffered rows as the next part, and keep its counts for ``finish``."""
        if not self._buffer:
            return
        key = f"{self.dest.parts}part-{len(self._parts) + 1:06d}.csv"
        self.dest.store.put_bytes(key, _csv_text(self.fields, map(self._values, self._buffer)).encode("utf-8"))
        self._counts[key] = (len(self._buffer), sum(1 for r in self._buffer if r["error"]))
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
            with open(joined, "wb") as f:
                f.write(self._header)
                for key in self._parts:  # one part in memory at a time
                    n, e = self._append(key, self.dest.store.get_bytes(key), f)
                    rows, errors = rows + n, errors + e
            self.dest.store.put_file(self.dest.key, joined)
        self.dest.store.put_bytes(self.dest.summary_key, json.dumps(summary(rows, errors), indent=2).encode())
        for key in self._parts:
            self.dest.store.delete(key)
        self.dest.store.delete(self.dest.parts + "run.json")
        return rows, errors

    def _append(self, key: str, data: bytes, f: IO[bytes]) -> tuple[int, int]:
        """Add part ``key`` (its bytes ``data``) to the joined CSV ``f``; returns its (rows, error rows).

        A part this run wrote is copied as bytes after its header line, with the counts kept when it was
        written: no CSV parse and render again (7.7 -> 0.8 us a row). Only a killed run's part is parsed,
        counted and written again, row by row."""
        if key in self._counts and data.startswith(self._header):
            f.write(memoryview(data)[len(self._header):])
            return self._counts[key]
        rows = _rows(data.decode("utf-8"))
        f.write(_csv_text(self.fields, map(self._values, rows)).encode("utf-8")[len(self._header):])
        return len(rows), sum(1 for r in rows if r["error"])

    def previous_rows(self) -> Iterator[dict[str, str]]:
        """Rows of the final CSV a previous run left (key order), streamed; nothing if there is none, or
        (with a warning: every image is scored again) if it is not a whole CSV of these columns."""
        if not self.dest.store.exists(self.dest.key):
            return
        with tempfile.TemporaryDirectory(prefix="faceclf-previous-") as tmp:
            local = Path(tmp) / "previous.csv"
            self.dest.store.download(self.dest.key, local)  # a file on disk, never the whole CSV in memory
            if problem := csv_problem(local, self.fields):
                log.warning("not reusing the previous predictions %s: %s; scoring every image again",
                            self.dest.uri(), problem)
                return
            with open(local, newline="", encoding="utf-8") as f:
                yield from csv.DictReader(f)


def csv_problem(path: Path, fields: list[str]) -> str | None:
    """Why the CSV at ``path`` is not a previous run's whole output with ``fields``, or None (one pass, streamed).

    Checked: UTF-8 and CSV syntax, the header, every row's number of fields (a truncated last line has
    fewer), and paths in strictly increasing order (the merge with tonight's listing relies on it).
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header != fields:
                return f"its header is {str(header)[:200]}, expected {fields}"
            last = None
            for row in reader:
                if len(row) != len(fields):
                    return f"line {reader.line_num} has {len(row)} fields, expected {len(fields)}"
                if last is not None and row[0] <= last:
                    return f"line {reader.line_num}: path {row[0][:200]!r} is not after {last[:200]!r}"
                last = row[0]
    except (UnicodeDecodeError, csv.Error) as e:
        return f"it is not a readable UTF-8 CSV ({type(e).__name__}: {str(e)[:200]})"
    return None


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
