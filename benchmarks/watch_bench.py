"""What one poll of the watch flow costs (faceclf.nightly.arrivals.poll), and what it would cost at 1M keys.

A poll is two parts: what ingest already holds (manifest.jsonl + quarantine.jsonl, read and hashed once per state
of the logs, then a cached array of 8-byte hashes) and the listing of incoming/ (one LIST per 1,000 keys on S3).
Measured here, against a real S3 endpoint (moto) on 127.0.0.1:

- the ingest logs at 1M rows (full run; quick: 20,000): a cold poll's read-and-hash, against the baseline of
  ingest's own way (read_manifest + read_quarantine + a Python set of identities), and a warm poll's cache load;
- the listing of N keys (full run: 50,000; quick: 2,000), per 1,000-key page, scaled to 1M keys; the baseline is
  ingest's own listing (``store.list``) with its set lookup.

The price of a quiet poll at 1M keys (no arrivals: the whole listing) is 1,000 LIST requests; the README gives it
at S3's list price. Nothing here asserts a speed: the figures are printed beside their baselines.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

from benchmarks.s3_fixture import row

LIST_PRICE_PER_1000 = 0.005  # USD per 1,000 LIST requests, S3 Standard (us-east-1), the list price in 2026


def manifest_rows(n: int, held: list[tuple[str, str, int]] | None = None) -> bytes:
    """``n`` manifest rows in their legal form (JSONL): of the identities ``held`` (key, etag, size), or of keys
    incoming/<class>/img-<i>.jpg."""
    lines = []
    for i in range(n):
        cls = ("with_mask", "without_mask")[i % 2]
        sha = hashlib.sha256(str(i).encode()).hexdigest()
        split = ("train", "val", "test")[i % 3]
        key, etag, size = held[i] if held else (f"incoming/{cls}/img-{i:07d}.jpg", f'"{sha[:32]}"', 1000 + i)
        lines.append(json.dumps({"key": key, "etag": etag, "size": size,
                                 "sha256": sha, "class": cls, "split": split, "path": f"{split}/{cls}/{sha}.jpg",
                                 "format": "JPEG", "width": 64, "height": 64, "ingested_at": "2026-12-07T00:00:00Z",
                                 "status": "ok"}, sort_keys=True))
    return ("\n".join(lines) + "\n").encode()


def timed(fn, *args):  # noqa: ANN001, ANN202 - a benchmark helper: (result, seconds)
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def naive_seen(store) -> set:  # noqa: ANN001 - ingest's own way: every identity in a Python set
    from faceclf.dataset.manifest import identity, read_manifest, read_quarantine

    return {identity(r) for r in read_manifest(store)} | {identity(r) for r in read_quarantine(store)}


def logs_rows(rows: int, store) -> list[dict]:  # noqa: ANN001
    """Cold and warm reads of ingest logs of ``rows`` rows, and ingest's own read as the baseline."""
    from faceclf.dataset.manifest import MANIFEST_KEY
    from faceclf.nightly import arrivals

    store.put_bytes(MANIFEST_KEY, manifest_rows(rows))
    with TemporaryDirectory() as cache:
        _, naive_s = timed(naive_seen, store)
        (seen, _), cold_s = timed(arrivals.seen_hashes, store, Path(cache))
        _, warm_s = timed(arrivals.seen_hashes, store, Path(cache))
    what = f"ingest logs, {rows:,} rows"
    return [row("watch", f"{what}: cold poll (read + hash + cache)", cold_s, "s", "ingest's set of identities",
                naive_s, note="once per change of the logs (an ingest)"),
            row("watch", f"{what}: warm poll (cached hashes)", warm_s, "s", "cold poll", cold_s,
                note=f"{len(seen) * 8 / 2**20:.1f} MiB of hashes on the worker's disk")]


def client_rows(keys: int) -> list[dict]:
    """The poll's own CPU per listed key, without the endpoint: ``keys`` identities checked page by page against
    as many held ones (what count_new does with each page), scaled to 1M keys."""
    import numpy as np

    from faceclf.nightly import arrivals

    ids = [(f"incoming/with_mask/img-{i:07d}.jpg", f'"{i:032x}"', 1000 + i) for i in range(keys)]
    seen = arrivals.identity_hashes(ids)
    t0 = time.perf_counter()
    new = 0
    for at in range(0, keys, 1000):
        page = np.fromiter((arrivals.identity_hash(*i) for i in ids[at:at + 1000]), dtype=np.uint64)
        new += int(arrivals.is_new(seen, page).sum())
    seconds = time.perf_counter() - t0
    assert new == 0
    return [row("watch", f"poll CPU without the endpoint, {keys:,} keys", seconds / keys * 1e6, "us/key", None, None,
                note=f"{seconds / keys * 1e6:.2f} s at 1M keys")]


def put_keys(bucket: str, n: int) -> None:
    """``n`` tiny objects under incoming/ (a listing reads keys, never bodies)."""
    from faceclf.store.s3 import s3_client

    client = s3_client()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"incoming/with_mask/img-{i:07d}.jpg",
                                                  Body=b"x"), range(n)))


def listing_rows(keys: int, store) -> list[dict]:  # noqa: ANN001
    """A quiet poll's listing of ``keys`` keys (none new to the logs' first ``keys`` rows), per 1,000-key page and
    scaled to 1M keys, against ingest's own listing with its set lookup."""
    from faceclf.dataset.manifest import INCOMING, identity
    from faceclf.nightly import arrivals

    from faceclf.dataset.manifest import MANIFEST_KEY

    listed_ids = [identity(o) for o in store.list(INCOMING)]
    store.put_bytes(MANIFEST_KEY, manifest_rows(len(listed_ids), listed_ids))  # all taken: a quiet poll
    seen, _ = arrivals.seen_hashes(store, None)
    held = naive_seen(store)
    (new, listed, _, _), ours_s = timed(arrivals.count_new, store, seen, None)
    _, naive_s = timed(lambda: sum(identity(o) not in held for o in store.list(INCOMING)))
    pages = -(-listed // 1000)
    per_page = ours_s / pages
    return [row("watch", f"listing {listed:,} keys ({new:,} new), per 1,000-key page", per_page * 1000, "ms",
                "ingest's listing + set", naive_s / pages * 1000, note=f"{pages} LIST requests"),
            row("watch", "quiet poll at 1M keys: listing, scaled", per_page * 1000, "s", None, None,
                note=f"1,000 LIST requests = ${LIST_PRICE_PER_1000:.3f} a poll; every 5 min "
                     f"${LIST_PRICE_PER_1000 * 288:.2f}/day (S3 list price); local moto pages")]


def run(quick: bool = False) -> list[dict]:
    """Print and return the watch rows (quick: small sizes)."""
    from benchmarks.s3_fixture import machine
    from faceclf.devtools.services import local_s3_env, moto_s3_server
    from faceclf.store.s3 import S3Store, s3_client

    rows_n, keys = (20_000, 2_000) if quick else (1_000_000, 50_000)
    print(f"watch benchmark on {machine()}: ingest logs of {rows_n:,} rows, {keys:,} keys listed", flush=True)
    with TemporaryDirectory() as tmp, moto_s3_server(Path(tmp) / "s3.log") as url, local_s3_env(url):
        s3_client().create_bucket(Bucket="watch-bench")
        store = S3Store("watch-bench")
        out = logs_rows(rows_n, store) + client_rows(rows_n)
        put_keys("watch-bench", keys)
        out += listing_rows(keys, store)
    return out
