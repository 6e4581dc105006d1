"""A whole night on this machine, stage by stage (item 4): `python -m benchmarks.night_bench [--quick]`.

N generated 64x64 face JPEGs (N=10,000; --quick: 600) are uploaded to a moto S3 server on 127.0.0.1
under incoming/<class>/, then the night's steps run as library calls, in the order of the `train`
flow (flows/train.py), each timed:
  ingest          faceclf.dataset.ingest.ingest(S3Store(bucket), face/) -> report.faceset (the FaceSet
                  every later step takes, built from the manifest)
  read champion   faceclf.store.registry.champion_ref(store): champion.json, read once for the night
  check classes   faceclf.nightly.night.check_classes(faceset, champion, allow_new_classes=False)
  prepare run     what the flow's prepare_run does: faceset.fingerprint(), runs.find_pending_run,
                  runs.start_run(runs/, new_version(), config, fingerprint)
  train           faceclf.training.launch.run_training(faceset, runs/<version>/, RunConfig() with epochs=3;
                  --quick: 1) (includes decoding all splits, val+test evaluation of the best
                  checkpoint and the plots)
  export          faceclf.nightly.night.export_candidate(run/) -> run/model.onnx (checker + parity test)
  evaluate        faceclf.serving.onnx_model.evaluate_onnx(run/model.onnx, faceset): re-scoring on the
                  FaceSet's test split (what night.rescore_champion does with the champion's model)
  upload          publish_version(store, version, the night's files) + set_champion(...) (compare-and-swap on champion.json)
Calling the library functions in sequence is the night without Prefect's overhead (no server,
worker, flow-run process or task state round trips). The bucket starts with no champion, so the
freshly exported candidate stands in for it in the re-score: export runs before evaluate, and rows
are listed in the night's order (..., train, evaluate, export, upload). The gate, decision.json and
report.md are not run (the benchmark always promotes); published are the night's PUBLISHED_FILES that
exist plus model.onnx.

While the night runs, a few functions are wrapped to count what it touches (rows with unit "count"):
recursive walks of face/ (Path.rglob, os.walk; faceclf.dataset.layout.list_images goes through
rglob), sha256 computations over local files (faceclf.dataset.layout.sha256_file, hashlib.file_digest,
and hashlib.sha256 over bytes returned by Path.read_bytes), and reads of models/face/champion.json
(the store's get_bytes).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from benchmarks.s3_fixture import make_faces, row, upload_faces

BENCH = "night"


class NightCounts:
    """What the night did to local files and to champion.json, counted by wrappers installed by ``watch``."""

    def __init__(self, face: Path):
        self.face = Path(face).resolve()
        self.walks: list[str] = []           # recursive walks rooted in face/ (where, by what)
        self.list_images = 0                 # layout.list_images calls on face/ (each is also one walk)
        self.file_hashes: list[Path] = []    # sha256 of a local file read by the hash function itself
        self.byte_hashes: list[Path] = []    # sha256 over the bytes of a local file (Path.read_bytes)
        self.champion_reads = 0
        self._lock = threading.Lock()
        self._local = threading.local()      # per thread: inside sha256_file (its file_digest is not counted twice)

    def in_face(self, path: Any) -> bool:
        try:
            return Path(os.fspath(path)).resolve().is_relative_to(self.face)
        except (TypeError, ValueError, OSError):
            return False

    def face_file_hashes(self) -> int:
        return sum(self.in_face(p) for p in self.file_hashes + self.byte_hashes)

    def other_file_hashes(self) -> list[Path]:
        return [p for p in self.file_hashes + self.byte_hashes if not self.in_face(p)]

    def _add(self, items: list, value: Any) -> None:
        with self._lock:
            items.append(value)


@contextmanager
def watch(counts: NightCounts, store_type: type) -> Iterator[NightCounts]:
    """Install the counting wrappers for the duration of the block (restored afterwards, even on errors).

    Module-level names bound with ``from faceclf.dataset.layout import ...`` are rebound as well, so
    calls through any faceclf module are seen.
    """
    from faceclf.dataset import layout
    from faceclf.store.registry import CHAMPION_KEY

    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, new: Any) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    orig_list_images, orig_sha256_file = layout.list_images, layout.sha256_file
    orig_rglob, orig_read_bytes = pathlib.Path.rglob, pathlib.Path.read_bytes
    orig_walk, orig_file_digest, orig_sha256 = os.walk, hashlib.file_digest, hashlib.sha256
    orig_get_bytes = store_type.get_bytes
    read: dict[int, tuple[bytes, Path]] = {}  # id -> (bytes kept alive, file): what Path.read_bytes returned

    def list_images(folder):  # noqa: ANN001, ANN202 - same signature as the wrapped function
        if counts.in_face(folder):
            with counts._lock:
                counts.list_images += 1
        return orig_list_images(folder)

    def sha256_file(path):  # noqa: ANN001, ANN202
        counts._add(counts.file_hashes, Path(path))
        counts._local.inside = True
        try:
            return orig_sha256_file(path)
        finally:
            counts._local.inside = False

    def file_digest(fileobj, digest, *args, **kwargs):  # noqa: ANN001, ANN202
        if not getattr(counts._local, "inside", False):
            counts._add(counts.file_hashes, Path(getattr(fileobj, "name", "<file object>")))
        return orig_file_digest(fileobj, digest, *args, **kwargs)

    def sha256(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        data = args[0] if args else next(iter(kwargs.values()), None)
        hit = read.get(id(data))
        if hit is not None and hit[0] is data:
            counts._add(counts.byte_hashes, hit[1])
        return orig_sha256(*args, **kwargs)

    def read_bytes(self):  # noqa: ANN001, ANN202
        data = orig_read_bytes(self)
        read[id(data)] = (data, Path(self))
        return data

    def rglob(self, pattern, *args, **kwargs):  # noqa: ANN001, ANN202
        if counts.in_face(self):
            counts._add(counts.walks, f"Path.rglob {self}")
        return orig_rglob(self, pattern, *args, **kwargs)

    def walk(top, *args, **kwargs):  # noqa: ANN001, ANN202
        if counts.in_face(top):
            counts._add(counts.walks, f"os.walk {top}")
        return orig_walk(top, *args, **kwargs)

    def get_bytes(self, key):  # noqa: ANN001, ANN202
        if key == CHAMPION_KEY:
            with counts._lock:
                counts.champion_reads += 1
        return orig_get_bytes(self, key)

    try:
        for mod in [m for name, m in list(sys.modules.items()) if name.startswith("faceclf") and m is not None]:
            for name, orig, new in (("list_images", orig_list_images, list_images),
                                    ("sha256_file", orig_sha256_file, sha256_file)):
                if getattr(mod, name, None) is orig:
                    patch(mod, name, new)
        patch(pathlib.Path, "rglob", rglob)
        patch(pathlib.Path, "read_bytes", read_bytes)
        patch(os, "walk", walk)
        patch(hashlib, "file_digest", file_digest)
        patch(hashlib, "sha256", sha256)
        patch(store_type, "get_bytes", get_bytes)
        yield counts
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)
        read.clear()


def run(quick: bool = False) -> list[dict]:
    """Rows: seconds per stage (share of the total in the note), the total, the slowest stage, and the
    counts of face/ walks, local-file sha256 computations and champion.json reads."""
    from faceclf.config import RunConfig, with_overrides
    from faceclf.dataset.ingest import ingest
    from faceclf.devtools.services import local_s3_env, moto_s3_server
    from faceclf.nightly import night, runs
    from faceclf.serving.onnx_model import evaluate_onnx
    from faceclf.store.registry import (
        MODEL_FILE,
        champion_ref,
        publish_version,
        set_champion,
        sha256_bytes,
    )
    from faceclf.store.s3 import S3Store
    from faceclf.training.fit import new_version
    from faceclf.training.launch import run_training

    n = 600 if quick else 10_000
    epochs = 1 if quick else 3
    logging.getLogger("faceclf").setLevel(logging.WARNING)
    bucket = "faceclf-night-bench"
    secs: dict[str, float] = {}
    facts: dict[str, str] = {}

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        secs[name] = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="faceclf-night-bench-") as tmp:
        root = Path(tmp)
        face, runs_dir = root / "face", root / "runs"
        faces = make_faces(n, size=64, base_per_class=min(500, -(-n // 2)))
        with moto_s3_server(root / "moto.log") as endpoint, local_s3_env(endpoint):
            upload_faces(bucket, faces)
            store = S3Store(bucket)
            cfg = with_overrides(RunConfig(), epochs=epochs).to_dict()  # as the flow builds it

            with watch(NightCounts(face), type(store)) as counts:
                with stage("ingest"):
                    report = ingest(store, face)
                    faceset = report.faceset
                facts["ingest"] = (f"{report.new} new of {report.listed} listed; FaceSet of {len(faceset.images)} "
                                   f"images from the manifest")

                with stage("read champion"):
                    champion = champion_ref(store)
                facts["read champion"] = ("champion_ref: champion.json read once for the night; "
                                          f"{'none yet' if champion is None else champion.version}")

                with stage("check classes"):
                    classes = night.check_classes(faceset, champion, False)
                facts["check classes"] = f"night.check_classes on the FaceSet: {classes}"

                with stage("prepare run"):  # the flow's prepare_run, line for line
                    run_ = runs.find_pending_run(runs_dir, cfg, faceset.fingerprint())
                    if run_ is None:
                        run_ = runs.start_run(runs_dir, new_version(), cfg, faceset.fingerprint())
                facts["prepare run"] = "FaceSet.fingerprint + find_pending_run + start_run (night.json)"

                with stage("train"):
                    metrics = run_training(faceset, run_.run_dir, RunConfig.from_dict(cfg),
                                        resume=run_.resume, version=run_.version)
                split_n = metrics["data"]["counts"]
                facts["train"] = (f"run_training(faceset): {epochs} epoch(s) (default RunConfig otherwise), device "
                                  f"{metrics['device']}, train/val/test {split_n['train']}/{split_n['val']}/"
                                  f"{split_n['test']}, test acc {metrics['test']['accuracy']:.3f}; incl. decode + "
                                  "val/test eval + plots")

                with stage("export"):
                    exported = night.export_candidate(run_.run_dir)
                facts["export"] = f"night.export_candidate: onnx + checker + parity on {exported.batch} images"

                with stage("evaluate"):
                    scored = evaluate_onnx(run_.run_dir / MODEL_FILE, faceset)
                facts["evaluate"] = (f"evaluate_onnx(model.onnx, faceset): its test split, {scored['n']} images, "
                                     f"acc {scored['accuracy']:.3f}")

                version = metrics["version"]
                files = {name: run_.run_dir / name for name in (*night.PUBLISHED_FILES, MODEL_FILE)
                         if (run_.run_dir / name).is_file()}
                with stage("upload"):
                    publish_version(store, version, files)
                    set_champion(store, version, sha256_bytes(files[MODEL_FILE].read_bytes()), "night benchmark",
                                 metrics["test"], metrics["classes"])
                size_mb = sum(p.stat().st_size for p in files.values()) / 2**20
                facts["upload"] = (f"publish_version ({len(files)} files, {size_mb:.1f} MiB) + "
                                   "set_champion (compare-and-swap on the pointer read)")

    order = ["ingest", "read champion", "check classes", "prepare run", "train", "evaluate", "export", "upload"]
    total = sum(secs.values())
    slowest = max(order, key=secs.__getitem__)
    other = counts.other_file_hashes()
    walked = f"; {counts.list_images} via list_images" if counts.list_images else ""
    face_hashes = counts.face_file_hashes()
    tally = (f"face/ walks {len(counts.walks)}, sha256 of face/ files {face_hashes}, sha256 of other local "
             f"files {len(other)}, champion.json reads {counts.champion_reads}")
    rows = [row(BENCH, stage_name, secs[stage_name], "s",
                note=f"{100 * secs[stage_name] / total:.1f}% of total; {facts[stage_name]}") for stage_name in order]
    rows.append(row(BENCH, f"whole night ({n} images, {epochs} epoch(s))", total, "s",
                    note="library calls in sequence: the night without Prefect's overhead; "
                         f"{'--quick: epochs=1' if quick else 'epochs=3 (default RunConfig has 15)'}; {tally}"))
    rows.append(row(BENCH, f"slowest stage: {slowest}", secs[slowest], "s",
                    note=f"{100 * secs[slowest] / total:.1f}% of the night"))
    rows += [
        row(BENCH, "face/ folder walks", len(counts.walks), "count",
            note=f"recursive walks rooted in face/ (Path.rglob, os.walk){walked}"
                 + (f": {', '.join(sorted(set(counts.walks)))[:200]}" if counts.walks else "")),
        row(BENCH, "sha256 of face/ files", face_hashes, "count",
            note="sha256_file / hashlib.file_digest / hashlib.sha256 of Path.read_bytes, on files in face/"),
        row(BENCH, "sha256 of other local files", len(other), "count",
            note="same wrappers, files outside face/: "
                 + (", ".join(f"{name} x{k}" for name, k in _tally(p.name for p in other)) or "none")),
        row(BENCH, "champion.json reads", counts.champion_reads, "count",
            note="S3Store.get_bytes of models/face/champion.json, by any caller"),
    ]
    return rows


def _tally(names: Iterator[str]) -> list[tuple[str, int]]:
    """(name, how many times) in first-seen order."""
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    return list(seen.items())


if __name__ == "__main__":  # same as: python -m benchmarks --only night [--quick]
    from benchmarks.__main__ import main

    raise SystemExit(main(["--only", "night", *sys.argv[1:]]))
