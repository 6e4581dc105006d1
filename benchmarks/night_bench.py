"""A whole night on this machine, stage by stage (item 4): `python -m benchmarks.night_bench [--quick]`.

N generated 64x64 face JPEGs (N=10,000; --quick: 600) are uploaded to a moto S3 server on 127.0.0.1
under incoming/<class>/, then the night's library calls run in sequence, each timed:
  ingest    faceclf.dataset.ingest.ingest(S3Store(bucket), face/)
  train     faceclf.training.run.train_run(face/, run/, RunConfig() with epochs=3; --quick: 1)
            (includes decoding all splits, val+test evaluation of the best checkpoint and the plots)
  export    faceclf.serving.export.export_onnx(run/checkpoint.pt, run/model.onnx) (checker + parity test)
  evaluate  faceclf.serving.score.evaluate_onnx(run/model.onnx, face/test): re-scoring on the test split
  upload    faceclf.store.registry.publish_version(...) + set_champion(...) to the bucket
Calling the library functions in sequence is the night without Prefect's overhead (no server,
worker, flow-run process or task state round trips). Export runs before evaluate because the
re-score uses the exported model; rows are listed in the night's order (ingest, train, evaluate,
export, upload).
"""

from __future__ import annotations

import hashlib
import logging
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.s3_fixture import make_faces, row, upload_faces

BENCH = "night"


def run(quick: bool = False) -> list[dict]:
    """Rows: seconds per stage (share of the total in the note), the total, and the slowest stage."""
    from faceclf.config import RunConfig
    from faceclf.serving.export import export_onnx
    from faceclf.dataset.ingest import ingest
    from faceclf.training.run import train_run
    from faceclf.store.registry import MODEL_FILE, publish_version, set_champion
    from faceclf.serving.score import evaluate_onnx
    from faceclf.devtools.services import local_s3_env, moto_s3_server
    from faceclf.store.s3 import S3Store

    n = 600 if quick else 10_000
    epochs = 1 if quick else 3
    logging.getLogger("faceclf").setLevel(logging.WARNING)
    bucket = "faceclf-night-bench"
    secs: dict[str, float] = {}
    facts: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="faceclf-night-bench-") as tmp:
        root = Path(tmp)
        face, run_dir = root / "face", root / "run"
        faces = make_faces(n, size=64, base_per_class=min(500, -(-n // 2)))
        with moto_s3_server(root / "moto.log") as endpoint, local_s3_env(endpoint):
            upload_faces(bucket, faces)
            store = S3Store(bucket)

            t0 = time.perf_counter()
            report = ingest(store, face)
            secs["ingest"] = time.perf_counter() - t0
            facts["ingest"] = f"{report.new} new of {report.listed} listed"

            cfg = RunConfig()
            cfg.train.epochs = epochs
            t0 = time.perf_counter()
            metrics = train_run(face, run_dir, cfg)
            secs["train"] = time.perf_counter() - t0
            counts = metrics["data"]["counts"]
            facts["train"] = (f"{epochs} epoch(s) (default RunConfig otherwise), device {metrics['device']}, "
                              f"train/val/test {counts['train']}/{counts['val']}/{counts['test']}, "
                              f"test acc {metrics['test']['accuracy']:.3f}; incl. decode + val/test eval + plots")

            t0 = time.perf_counter()
            exported = export_onnx(run_dir / "checkpoint.pt", run_dir / MODEL_FILE)
            secs["export"] = time.perf_counter() - t0
            facts["export"] = f"onnx + checker + parity on {exported.batch} images"

            t0 = time.perf_counter()
            scored = evaluate_onnx(run_dir / MODEL_FILE, face / "test")
            secs["evaluate"] = time.perf_counter() - t0
            facts["evaluate"] = f"evaluate_onnx on face/test: {scored['n']} images, acc {scored['accuracy']:.3f}"

            version = metrics["version"]
            files = {p.name: p for p in sorted(run_dir.iterdir()) if p.is_file() and not p.name.startswith(".")
                     and p.name not in ("last.pt",)}
            t0 = time.perf_counter()
            publish_version(store, version, files)
            set_champion(store, version, hashlib.sha256((run_dir / MODEL_FILE).read_bytes()).hexdigest(),
                         "night benchmark", metrics["test"])
            secs["upload"] = time.perf_counter() - t0
            size_mb = sum(p.stat().st_size for p in files.values()) / 2**20
            facts["upload"] = f"publish_version ({len(files)} files, {size_mb:.1f} MiB) + set_champion"

    order = ["ingest", "train", "evaluate", "export", "upload"]
    total = sum(secs.values())
    slowest = max(order, key=secs.__getitem__)
    rows = [row(BENCH, f"{stage}", secs[stage], "s",
                note=f"{100 * secs[stage] / total:.1f}% of total; {facts[stage]}") for stage in order]
    rows.append(row(BENCH, f"whole night ({n} images, {epochs} epoch(s))", total, "s",
                    note="library calls in sequence: the night without Prefect's overhead; "
                         f"{'--quick: epochs=1' if quick else 'epochs=3 (default RunConfig has 15)'}"))
    rows.append(row(BENCH, f"slowest stage: {slowest}", secs[slowest], "s",
                    note=f"{100 * secs[slowest] / total:.1f}% of the night"))
    return rows


if __name__ == "__main__":  # same as: python -m benchmarks --only night [--quick]
    from benchmarks.__main__ import main

    raise SystemExit(main(["--only", "night", *sys.argv[1:]]))
