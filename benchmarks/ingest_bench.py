"""Ingest throughput against `aws s3 sync` (item 3): `python -m benchmarks.ingest_bench [--quick]`.

A moto S3 server on 127.0.0.1 holds N small distinct face JPEGs under incoming/<class>/ (N=10,000;
--quick: 500). Timed, alternately and back to back in the same run:
  ours: faceclf.dataset.ingest.ingest(S3Store(bucket), fresh dest): list, download (16 threads), validate,
        sha256, split, write the files and the manifest;
  aws:  `aws s3 sync s3://BUCKET/incoming/ DIR --endpoint-url URL --only-show-errors` into a fresh folder
        (download only: no validation, hashing or manifest).
Between repetitions the manifest and quarantine log are deleted (a second ingest would skip everything).
Both talk to the same single-process moto server, which is likely the bottleneck for both: the ratio
says how our client compares with the AWS CLI's against that server, not against real S3.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.s3_fixture import (
    make_faces,
    median,
    reset_ingest_state,
    row,
    upload_faces,
)

BENCH = "ingest"


def _time_ours(bucket: str, root: Path, rep: int) -> tuple[float, dict]:
    from faceclf.dataset.ingest import ingest
    from faceclf.store.s3 import S3Store

    reset_ingest_state(bucket)
    dest = root / f"ours-{rep}" / "face"
    t0 = time.perf_counter()
    report = ingest(S3Store(bucket), dest)
    dt = time.perf_counter() - t0
    shutil.rmtree(dest.parent, ignore_errors=True)
    return dt, report.to_dict()


def _time_aws(bucket: str, endpoint: str, root: Path, rep: int) -> tuple[float, int]:
    from faceclf.devtools.services import LOCAL_S3_ENV

    dest = root / f"aws-{rep}"
    dest.mkdir(parents=True)
    env = {**os.environ, **LOCAL_S3_ENV}
    argv = [_aws(), "s3", "sync", f"s3://{bucket}/incoming/", str(dest), "--endpoint-url", endpoint,
            "--only-show-errors"]
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True)
    dt = time.perf_counter() - t0
    files = sum(1 for p in dest.rglob("*") if p.is_file())
    shutil.rmtree(dest, ignore_errors=True)
    return dt, files


def _aws() -> str:
    found = shutil.which("aws") or str(Path(sys.executable).with_name("aws"))
    if not Path(found).exists():
        raise FileNotFoundError("the aws CLI is not installed (pip install awscli)")
    return found


def run(quick: bool = False) -> list[dict]:
    """Rows: ingest and aws-sync medians (s), the ratio ours/aws, images/s for each, upload time."""
    from faceclf.devtools.services import local_s3_env, moto_s3_server

    n = 500 if quick else 10_000
    reps = 1 if quick else 2
    logging.getLogger("faceclf").setLevel(logging.WARNING)
    bucket = "faceclf-ingest-bench"
    ours, aws, reports, synced = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="faceclf-ingest-bench-") as tmp:
        root = Path(tmp)
        faces = make_faces(n, size=64, base_per_class=min(500, -(-n // 2)))
        with moto_s3_server(root / "moto.log") as endpoint, local_s3_env(endpoint):
            upload_s = upload_faces(bucket, faces)
            for rep in range(reps):  # alternate, so drift (the other engineer's load) hits both alike
                dt, rep_report = _time_ours(bucket, root, rep)
                ours.append(dt)
                reports.append(rep_report)
                dt, files = _time_aws(bucket, endpoint, root, rep)
                aws.append(dt)
                synced.append(files)
    last = reports[-1]
    if last["new"] != n or any(f != n for f in synced):
        raise RuntimeError(f"expected {n} images each run; ingest wrote {[r['new'] for r in reports]} "
                           f"(quarantined {last['quarantined']}, failed {last['failed']}), aws synced {synced}")
    m_ours, m_aws = median(ours), median(aws)
    how = f"median of {reps} (alternating, back to back); N={n} 64x64 JPEGs, moto on 127.0.0.1"
    return [
        row(BENCH, f"ingest() of {n} images", m_ours, "s", "aws s3 sync (download only)",
            m_aws, f"ours = download+validate+hash+split+manifest; {how}; goal ratio <= 1.0; runs ours {[round(x, 2) for x in ours]} aws {[round(x, 2) for x in aws]}"),
        row(BENCH, "ingest throughput", n / m_ours, "img/s", "aws s3 sync throughput", n / m_aws,
            "higher is better (ratio > 1 means ours is faster)"),
        row(BENCH, f"setup: boto3 upload of {n} images", upload_s, "s",
            note="32 threads; not compared, for scale"),
    ]


if __name__ == "__main__":  # same as: python -m benchmarks --only ingest [--quick]
    from benchmarks.__main__ import main

    raise SystemExit(main(["--only", "ingest", *sys.argv[1:]]))
