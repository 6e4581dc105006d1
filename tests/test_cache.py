"""The decoded-image cache: decode once, hits and misses, killed and corrupted shards, memmap training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_config

from faceclf.config import CacheConfig
from faceclf.dataset.cache import CATALOG, DecodedCache, cache_folder, update_cache
from faceclf.dataset.discover import discover
from faceclf.dataset.faceset import FaceSet
from faceclf.dataset.preprocess import Preprocess
from faceclf.dataset.tensors import load_cached_split, load_split
from faceclf.store.objects import LocalStore
from faceclf.training.launch import run_training

FRACTIONS = (0.8, 0.1, 0.1)
SMALL = CacheConfig(shard_images=16, decode_workers=2)


def subset(faceset: FaceSet, n: int) -> FaceSet:
    """The first ``n`` images (a face set the night before it grew)."""
    return FaceSet(faceset.root, faceset.classes, faceset.images[:n])


def test_a_night_decodes_only_what_no_shard_holds_and_reads_what_it_decoded(faces: Path, tmp_path: Path) -> None:
    faceset, preset = discover(faces, FRACTIONS, workers=2), Preprocess(32)
    face = tmp_path / "face"
    cache, first = update_cache(subset(faceset, 50), face, preset, cfg=SMALL)
    assert (first.decoded, first.shards, first.images) == (50, 4, 50)   # 16 + 16 + 16 + 2
    assert cache.folder == cache_folder(face, 32) == tmp_path / "face-decoded" / "32"
    cache, second = update_cache(faceset, face, preset, cfg=SMALL)
    assert (second.decoded, second.images, second.rebuilt) == (len(faceset.images) - 50, len(faceset.images), [])
    again = update_cache(faceset, face, preset, cfg=SMALL)[1]
    assert again.decoded == 0 and again.shards == second.shards                      # all hits
    for split in ("train", "val", "test"):
        cached, decoded = load_cached_split(faceset, split, cache), load_split(faceset, split, preset, 2)
        assert torch.equal(cached.images[torch.arange(len(cached.labels))], decoded.images)
        assert torch.equal(cached.labels, decoded.labels) and cached.records == decoded.records
    other = DecodedCache(cache_folder(face, 48), Preprocess(48), SMALL)            # another image size: a miss
    assert other.missing(faceset) == list(faceset.images)


def test_a_big_decode_in_a_child_process_writes_the_same_cache(faces: Path, tmp_path: Path) -> None:
    faceset, preset = discover(faces, FRACTIONS, workers=2), Preprocess(32)
    here = update_cache(faceset, tmp_path / "here" / "face", preset, cfg=SMALL)[0]
    child_cfg = CacheConfig(shard_images=16, decode_workers=2, decode_in_child_above=10)
    child, report = update_cache(faceset, tmp_path / "child" / "face", preset, cfg=child_cfg)
    assert report.decoded == len(faceset.images) and report.images == len(faceset.images)  # reread from disk
    assert [(s.name, s.sha256) for s in child.shards] == [(s.name, s.sha256) for s in here.shards]
    assert update_cache(faceset, tmp_path / "child" / "face", preset, cfg=child_cfg)[1].decoded == 0  # all hits
    with pytest.raises(ValueError, match="decode_in_child_above must be >= 0, got -1"):
        CacheConfig(decode_in_child_above=-1)


def test_a_corrupted_shard_is_detected_reported_and_rebuilt(faces: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    faceset, preset, face = discover(faces, FRACTIONS, workers=2), Preprocess(32), tmp_path / "face"
    cache, _ = update_cache(faceset, face, preset, cfg=SMALL)
    victim, rotten = cache.shards[1], cache.shards[2]
    path = cache.folder / victim.name
    path.write_bytes(path.read_bytes()[:-100])                                        # a shard cut short
    # Bit rot: one byte flipped in place, size and modification time as they were.
    rot = cache.folder / rotten.name
    stat, data = rot.stat(), bytearray(rot.read_bytes())
    data[-10] ^= 0xFF
    rot.write_bytes(bytes(data))
    os.utime(rot, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cache, report = update_cache(faceset, face, preset, cfg=SMALL)                   # the night: a cheap check
    assert report.rebuilt == [victim.name] and report.decoded == len(victim.rows)
    assert "checksum does not match" in caplog.text and victim.name in caplog.text
    assert cache.verify(full=True) == [rotten.name]                                   # every byte hashed
    cache, report = update_cache(faceset, face, preset, cfg=SMALL)
    assert report.decoded == len(rotten.rows) and cache.verify(full=True) == []
    decoded = load_split(faceset, "train", preset, 2)
    cached = load_cached_split(faceset, "train", cache)
    assert torch.equal(cached.images[torch.arange(len(cached.labels))], decoded.images)


KILLED_WRITER = """
import sys, time
from pathlib import Path
from faceclf.config import CacheConfig
from faceclf.dataset.cache import update_cache
from faceclf.dataset.discover import discover
from faceclf.dataset.preprocess import Preprocess
import faceclf.dataset.cache as C
real = C.write_atomic
def slow(path, writer):  # a slow disk: the kill lands while shard files are being written
    time.sleep(0.05)
    return real(path, writer)
C.write_atomic = slow
faceset = discover(sys.argv[1], (0.8, 0.1, 0.1), 2)
print("start", flush=True)
update_cache(faceset, Path(sys.argv[2]), Preprocess(32), cfg=CacheConfig(shard_images=4, decode_workers=1))
print("finished", flush=True)
"""


def test_a_killed_cache_write_leaves_a_usable_cache(faces: Path, tmp_path: Path) -> None:
    face = tmp_path / "face"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(faces), str(face)], cwd=REPO,
                            stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"start"
    folder = cache_folder(face, 32)
    deadline = time.monotonic() + 60
    while not (folder / CATALOG).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    held = json.loads((folder / CATALOG).read_text())["shards"]
    assert 0 < len(held) < 31                                                        # killed half-way
    faceset, preset = discover(faces, FRACTIONS, workers=2), Preprocess(32)
    cache, report = update_cache(faceset, face, preset, cfg=SMALL)                   # the next night goes on
    assert report.rebuilt == [] and report.decoded == len(faceset.images) - sum(len(s["rows"]) for s in held)
    assert not list(folder.glob(".*.tmp"))                                           # leftovers removed
    assert torch.equal(load_cached_split(faceset, "val", cache).images[slice(None)],
                       load_split(faceset, "val", preset, 2).images)


def test_a_fresh_worker_downloads_shards_instead_of_decoding(faces: Path, tmp_path: Path) -> None:
    (tmp_path / "bucket").mkdir()
    faceset, preset, store = discover(faces, FRACTIONS, workers=2), Preprocess(32), LocalStore(tmp_path / "bucket")
    _, first = update_cache(faceset, tmp_path / "worker1" / "face", preset, store, SMALL)
    assert first.uploaded == first.shards > 0
    assert store.exists(f"datasets/face/decoded/32/{CATALOG}")
    cache, fresh = update_cache(faceset, tmp_path / "worker2" / "face", preset, store, SMALL)
    assert (fresh.downloaded, fresh.decoded, fresh.uploaded) == (first.shards, 0, 0)
    assert torch.equal(load_cached_split(faceset, "test", cache).images[slice(None)],
                       load_split(faceset, "test", preset, 2).images)


def test_training_from_the_cache_equals_training_in_memory(faces: Path, tmp_path: Path) -> None:
    """Same seed, same data: the memory-mapped run ends with the same history and metrics."""
    cfg = tiny_config(epochs=3)
    faceset = discover(faces, cfg.data.split_fractions, workers=2)
    cache, _ = update_cache(faceset, tmp_path / "face", Preprocess.from_config(cfg.data), cfg=SMALL)
    in_memory = run_training(faceset, tmp_path / "memory", tiny_config(epochs=3))
    mapped = run_training(faceset, tmp_path / "mapped", tiny_config(epochs=3), cache=cache)
    assert mapped["test"] == in_memory["test"] and mapped["val"] == in_memory["val"]
    assert (tmp_path / "memory" / "history.csv").read_text().count("\n") == 4
    strip = lambda p: [row.split(",")[:4] for row in p.read_text().splitlines()]  # noqa: E731 - not the seconds
    assert strip(tmp_path / "memory" / "history.csv") == strip(tmp_path / "mapped" / "history.csv")
    with pytest.raises(ValueError, match="holds 32 px images; the run wants 48 px"):
        bigger = tiny_config(epochs=1)
        bigger.data.image_size = 48
        run_training(faceset, tmp_path / "wrong", bigger, cache=cache)


def test_a_catalog_from_the_bucket_never_names_a_path_outside_the_cache(faces: Path, tmp_path: Path, bucket: str,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Issue 24's worst finding: a catalog.json in the bucket whose shard names hold '../' or an absolute path
    (with digests its writer computed) made the cache pull write those bytes anywhere, and verify delete there.
    Every entry not in its one legal form is refused, named in the log; the legal shards are still used."""
    from faceclf.dataset.cache import REMOTE_PREFIX, shard_name
    from faceclf.store.objects import open_store
    from faceclf.store.registry import sha256_bytes

    faceset, preset, store = discover(faces, FRACTIONS, workers=2), Preprocess(32), open_store(f"s3://{bucket}")
    _, first = update_cache(faceset, tmp_path / "worker1" / "face", preset, store, SMALL)
    catalog_key = f"{REMOTE_PREFIX}32/{CATALOG}"
    catalog = json.loads(store.get_bytes(catalog_key))
    evil = b"import os; os.system('echo owned')\n"
    digest = sha256_bytes(evil)
    target = tmp_path / "worker2" / "evil.pth"          # where '../../evil.pth' lands from worker2/face-decoded/32/
    target.parent.mkdir(parents=True)
    sentinel = tmp_path / "worker2" / "keep.txt"        # a file a later verify must never delete
    sentinel.write_text("mine")
    bad = [{"name": "../../evil.pth", "sha256": digest, "rows": []},
           {"name": str(tmp_path / "abs-evil.npy"), "sha256": digest, "rows": []},
           {"name": "../../keep.txt", "sha256": digest, "rows": []},
           {"name": shard_name("0" * 64), "sha256": digest, "rows": []},                  # name of another digest
           {"name": shard_name(digest), "sha256": digest, "rows": ["../x"]},              # rows not image digests
           {"name": shard_name(digest.upper()), "sha256": digest.upper(), "rows": []},    # not the writer's form
           "not an object"]
    for entry in bad:
        if isinstance(entry, dict):
            store.put_bytes(f"{REMOTE_PREFIX}32/{Path(entry['name']).name}", evil)
    store.put_bytes(catalog_key, json.dumps({**catalog, "shards": catalog["shards"] + bad}).encode())

    with caplog.at_level("WARNING", logger="faceclf.dataset.cache"):
        cache, fresh = update_cache(faceset, tmp_path / "worker2" / "face", preset, store, SMALL)
    assert (fresh.downloaded, fresh.decoded) == (first.shards, 0)  # the legal shards, nothing decoded again
    refused = [r.getMessage() for r in caplog.records if "shard entry refused" in r.getMessage()]
    assert len(refused) == len(bad), refused
    assert any("'../../evil.pth' is not the one legal name" in m for m in refused), refused
    assert not target.exists() and not (tmp_path / "abs-evil.npy").exists() and sentinel.read_text() == "mine"
    assert sorted(p.name for p in cache.folder.iterdir() if p.suffix == ".npy") == sorted(s.name for s in cache.shards)
    cache.verify(full=True)
    assert sentinel.read_text() == "mine"
