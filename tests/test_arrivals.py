"""The watch flow's poll (faceclf.nightly.arrivals): what counts as arrived, when it is announced, what it caches.

The deployment trigger it feeds (a real Prefect server starting exactly one night) is driven by tests/test_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from faceclf.config import IngestConfig, WatchConfig
from faceclf.dataset.ingest import ingest
from faceclf.devtools.sample import generate_sample_faces
from faceclf.nightly import arrivals
from faceclf.store.objects import LocalStore
from faceclf.store.s3 import S3Store


def put_faces(store: LocalStore | S3Store, root: Path, per_class: int, seed: int) -> int:
    """Generated faces under incoming/<class>/ of ``store``; how many."""
    generate_sample_faces(root, per_class=per_class, size=48, seed=seed)
    n = 0
    for p in sorted(root.rglob("*.png")) + sorted(root.rglob("*.jpg")):
        store.put_file(f"incoming/{p.parent.name}/s{seed}-{p.name}", p)
        n += 1
    return n


def test_a_poll_counts_what_no_ingest_has_taken(tmp_path: Path) -> None:
    store, cfg = LocalStore(tmp_path / "bucket"), WatchConfig(min_new_images=1000)
    n = put_faces(store, tmp_path / "a", per_class=4, seed=1)
    first = arrivals.poll(store, cfg, tmp_path / "cache")
    assert (first.new, first.listed, first.complete) == (n, n, True)
    assert len(first.examples) == arrivals.EXAMPLES and all(k.startswith("incoming/") for k in first.examples)

    ingest(store, tmp_path / "face", IngestConfig())
    taken = arrivals.poll(store, cfg, tmp_path / "cache")
    assert (taken.new, taken.listed) == (0, n) and taken.records != first.records

    # New images and a corrupt one are new; once an ingest has placed the images and quarantined the corrupt
    # one, none is.
    m = put_faces(store, tmp_path / "b", per_class=2, seed=2)
    store.put_bytes("incoming/with_mask/broken.jpg", b"\xff\xd8 not a jpeg")
    assert arrivals.poll(store, cfg, tmp_path / "cache").new == m + 1
    report = ingest(store, tmp_path / "face", IngestConfig())
    assert report.quarantined == 1
    assert arrivals.poll(store, cfg, tmp_path / "cache").new == 0


def test_the_listing_stops_once_enough_have_arrived(bucket: str, tmp_path: Path) -> None:
    store = S3Store(bucket)
    n = put_faces(store, tmp_path / "a", per_class=6, seed=3)
    seen, _ = arrivals.seen_hashes(store, None)
    assert len(seen) == 0  # no manifest yet: everything is new
    new, listed, complete, _ = arrivals.count_new(store, seen, stop_at=5, page=4)
    assert (new, listed, complete) == (8, 8, False)  # two pages of 4, then enough
    assert arrivals.count_new(store, seen, stop_at=None, page=4)[:3] == (n, n, True)


def test_the_ingest_logs_are_cached_by_their_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, cache = LocalStore(tmp_path / "bucket"), tmp_path / "cache"
    put_faces(store, tmp_path / "a", per_class=3, seed=4)
    ingest(store, tmp_path / "face", IngestConfig())
    seen, tag = arrivals.seen_hashes(store, cache)
    assert [p.name for p in cache.iterdir()] == [f"seen-{tag}.npy"] and len(seen) == 6

    def unread(*_: object) -> None:
        raise AssertionError("the logs were read although their state is cached")

    monkeypatch.setattr(arrivals, "read_manifest", unread)
    assert np.array_equal(arrivals.seen_hashes(store, cache)[0], seen)  # from the cache, logs unread
    monkeypatch.undo()

    (cache / f"seen-{tag}.npy").write_bytes(b"damaged")  # a damaged cache is rebuilt, never trusted
    assert np.array_equal(arrivals.seen_hashes(store, cache)[0], seen)

    put_faces(store, tmp_path / "b", per_class=1, seed=5)
    ingest(store, tmp_path / "face", IngestConfig())  # the logs change: a new cache file, the old one gone
    seen2, tag2 = arrivals.seen_hashes(store, cache)
    assert tag2 != tag and len(seen2) == 8 and [p.name for p in cache.iterdir()] == [f"seen-{tag2}.npy"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), max_size=40), st.lists(st.integers(0, 2**64 - 1), max_size=40))
def test_is_new_is_set_membership(held: list[int], asked: list[int]) -> None:
    seen = np.sort(np.asarray(held, dtype=np.uint64))
    got = arrivals.is_new(seen, np.asarray(asked, dtype=np.uint64))
    assert got.tolist() == [a not in set(held) for a in asked]


def found(new: int, records: str = "r1", complete: bool = True) -> arrivals.Arrivals:
    return arrivals.Arrivals(new=new, complete=complete, listed=new, seconds=0.0, records=records)


@settings(max_examples=300, deadline=None)
@given(new=st.integers(0, 500), minimum=st.integers(1, 300), renotify=st.integers(1, 10_000),
       age=st.floats(0, 20_000), same_records=st.booleans(), announced_before=st.booleans())
def test_announcement_rule(new: int, minimum: int, renotify: int, age: float, same_records: bool,
                           announced_before: bool) -> None:
    cfg, now = WatchConfig(min_new_images=minimum, renotify_after=renotify), 1e9
    state = {"records": "r1" if same_records else "r0", "announced_at": now - age} if announced_before else None
    reason = arrivals.announcement(found(new), state, cfg, now)
    due = new >= minimum and not (announced_before and same_records and age < renotify)
    assert (reason is not None) == due
    if reason:
        assert str(new) in reason and str(minimum) in reason


def test_two_pollers_announce_once_and_a_failed_send_is_undone(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "bucket")
    state, etag = arrivals.read_state(store)
    assert (state, etag) == (None, None)
    assert arrivals.claim(store, found(120), "120 new", etag, 1000.0)
    assert not arrivals.claim(store, found(120), "120 new", etag, 1001.0)  # the other poller read the same state
    state, etag = arrivals.read_state(store)
    assert state["new"] == 120 and state["records"] == "r1"
    assert arrivals.announcement(found(130), state, WatchConfig(), 1002.0) is None  # same logs: already announced
    arrivals.release(store, None)  # the event could not be sent: as if never announced
    assert arrivals.read_state(store) == (None, None)


@pytest.mark.parametrize("body", [b"not json", b"[]", json.dumps({"records": 1, "announced_at": 5}).encode(),
                                  json.dumps({"records": "r1", "announced_at": True}).encode()])
def test_a_malformed_announcement_record_counts_as_none(tmp_path: Path, body: bytes) -> None:
    store = LocalStore(tmp_path / "bucket")
    store.put_bytes(arrivals.ARRIVALS_KEY, body)
    state, etag = arrivals.read_state(store)
    assert state is None and etag is not None  # so a claim replaces it by compare-and-swap
    assert arrivals.claim(store, found(100), "100 new", etag, 5.0)


def test_the_watch_flow_confines_its_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its parameters are input (the Prefect server has no login): a cache folder or a local bucket outside the
    worker's folder and FACECLF_ALLOW_PATHS is refused before anything is read or written."""
    from flows.watch import watch

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FACECLF_ALLOW_PATHS", raising=False)
    (tmp_path / "bucket").mkdir()
    with pytest.raises(ValueError, match="cache_dir"):
        watch.fn(bucket=str(tmp_path / "bucket"), cache_dir="/tmp/elsewhere-arrivals")
    with pytest.raises(ValueError, match="bucket"):
        watch.fn(bucket="/etc", cache_dir="runs/.arrivals")
    assert not (tmp_path / "runs").exists()
