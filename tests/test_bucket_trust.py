"""Issue 24: the registry reads the bucket as input and survives many writers.

Conditional writes (If-Match / If-None-Match) and the lease are S3's behaviour: tested through the moto S3
server on 127.0.0.1 and on a local bucket folder, which keeps the same semantics.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from faceclf.cli import main as cli_main
from faceclf.nightly.lock import LEASE_KEY, LeaseLost, NightLocked, acquire_lease, bucket_lease
from faceclf.store import registry
from faceclf.store.objects import LocalStore, PreconditionFailed, Store, open_store
from faceclf.store.s3 import S3Store
from faceclf.training.warmstart import fetch_checkpoint

A, B, C = "20261201T020000Z-aaaaaa", "20261202T020000Z-bbbbbb", "20261203T020000Z-cccccc"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "bucket")
    return open_store(f"s3://{request.getfixturevalue('bucket')}")


def publish(store: Store, version: str, tmp_path: Path, content: bytes = b"model") -> None:
    """A version with a model.onnx and its sha256.json, as a night publishes it."""
    (tmp_path / "model.onnx").write_bytes(content + version.encode())
    registry.publish_version(store, version, {"model.onnx": tmp_path / "model.onnx"})


# --- item 4: compare-and-swap -------------------------------------------------------------------------------

def test_conditional_writes_refuse_a_stale_etag_and_a_second_create(store: Store) -> None:
    first = store.put_if("models/face/p.json", b"1", None)
    with pytest.raises(PreconditionFailed):
        store.put_if("models/face/p.json", b"2", None)          # If-None-Match: * on an existing object
    second = store.put_if("models/face/p.json", b"2", first)    # If-Match on the ETag read
    with pytest.raises(PreconditionFailed):
        store.put_if("models/face/p.json", b"3", first)         # that ETag is stale now
    assert store.get_versioned("models/face/p.json") == (b"2", second)
    assert store.put_if("models/face/p.json", b"2", first) == second  # a retried write that landed counts as done


def test_concurrent_pointer_updates_lose_nothing(store: Store) -> None:
    """Eight writers add one entry each to the same pointer at once: every entry is there (no lost update)."""
    def add(n: int) -> None:
        mine = store if isinstance(store, LocalStore) else open_store(store.uri().rstrip("/"))  # a client each
        registry.swap_pointer(mine, "models/face/counter.json",
                              lambda cur: {"entries": [*(cur or {}).get("entries", []), n]})

    threads = [threading.Thread(target=add, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(json.loads(store.get_bytes("models/face/counter.json"))["entries"]) == list(range(8))


class PromoteDuringPublish(S3Store):
    """A night's store on which a person's `models promote` lands between the night reading champion.json and
    writing it (the race a read-then-write publish lost)."""

    def __init__(self, bucket: str, person: S3Store, version: str):
        super().__init__(bucket)
        self.person, self.version, self.done = person, version, False

    def _put_conditional(self, key: str, data: bytes, etag: str | None) -> str:
        if key == registry.CHAMPION_KEY and not self.done:
            self.done = True
            registry.promote(self.person, self.version, reason="rollback by a person")
        return super()._put_conditional(key, data, etag)


def test_a_night_never_overwrites_a_promote_made_during_its_publish(bucket: str, tmp_path: Path) -> None:
    person = S3Store(bucket)
    for v in (A, B, C):
        publish(person, v, tmp_path)
    registry.promote(person, B, reason="the night's champion")
    record = registry.PublishRecord(C, True, registry.sha256_bytes(b"model" + C.encode()), "promoted: test", B,
                                    {"accuracy": 0.9}, ["a", "b"], "train flow", 10, "fp")
    night = PromoteDuringPublish(bucket, person, A)
    registry.begin_publish(night, record)
    pointer = registry.finish_publish(night, record)
    assert night.done and pointer["version"] == A                # the swap lost, re-read, and left the person's
    champion = registry.read_champion(person)
    assert champion["version"] == A and [h["version"] for h in champion["history"]] == [B, A]
    assert registry.read_latest(person)["version"] == C          # the night's version is still recorded


def test_latest_only_moves_forward(store: Store) -> None:
    registry.write_latest(store, B, True, 20, "fp-b")
    registry.write_latest(store, A, False, 10, "fp-a")          # an older night finishing late changes nothing
    assert registry.read_latest(store)["version"] == B


# --- item 4: the lease ----------------------------------------------------------------------------------------

def test_two_workers_at_once_get_one_lease(store: Store) -> None:
    """Four workers (each its own S3 client) try to take the bucket's lease at the same moment: exactly one does."""
    barrier, won, refused = threading.Barrier(4), [], []

    def worker() -> None:
        mine = store if isinstance(store, LocalStore) else open_store(store.uri().rstrip("/"))
        barrier.wait()
        try:
            won.append(acquire_lease(mine, "train night", 60))
        except NightLocked as e:
            refused.append(str(e))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 3
    held = json.loads(store.get_bytes(LEASE_KEY))
    assert held["holder"] == won[0].holder and held["expires_at"] > time.time()


def test_a_lease_is_renewed_released_and_taken_over_once_lapsed(store: Store) -> None:
    with bucket_lease(store, "train night", 3) as lease:
        time.sleep(2.5)                         # past two thirds of the term: renewed at 1 s and 2 s
        lease.ensure()
        with pytest.raises(NightLocked, match="train night"):
            acquire_lease(store, "faceclf ingest", 3)
    acquire_lease(store, "a night that dies", 3)  # released at the end of the block: taken at once; never renewed
    with pytest.raises(NightLocked):
        acquire_lease(store, "while held", 3)
    time.sleep(3.2)                             # the holder never renews (it died): the lease lapses
    taker = acquire_lease(store, "next night", 3)
    assert json.loads(store.get_bytes(LEASE_KEY))["holder"] == taker.holder


def test_a_dead_holder_on_this_host_does_not_block_the_rerun(store: Store) -> None:
    """A night killed on this host (no release, its lease unexpired) is taken over at once by the rerun here; a
    holder on another host is waited for until its term passes."""
    import subprocess
    import sys

    location = str(store.root) if isinstance(store, LocalStore) else store.uri().rstrip("/")
    code = ("import os\nfrom faceclf.store.objects import open_store\nfrom faceclf.nightly.lock import acquire_lease\n"
            f"acquire_lease(open_store({location!r}), 'a night that is killed', 900)\nos._exit(137)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 137
    left = json.loads(store.get_bytes(LEASE_KEY))
    assert left["expires_at"] > time.time() + 800
    acquire_lease(store, "the rerun", 60)                  # its process is gone: no 15-minute wait
    elsewhere = {**left, "host": "another-host", "holder": "a night on another host"}
    store.put_bytes(LEASE_KEY, json.dumps(elsewhere).encode())
    with pytest.raises(NightLocked, match="another host"):
        acquire_lease(store, "a night here", 60)


def test_a_worker_whose_lease_was_taken_over_publishes_nothing(store: Store) -> None:
    slow = acquire_lease(store, "a night that stalled", 1)
    time.sleep(1.2)
    acquire_lease(store, "the next night", 60)  # the stalled night's lease lapsed: taken over
    slow.renew()                                # its late renewal loses the swap ...
    with pytest.raises(LeaseLost):
        slow.ensure()                           # ... and it must not publish
    slow.release()                              # nor may it release the new holder's lease
    with pytest.raises(NightLocked, match="the next night"):
        acquire_lease(store, "a third", 60)


def test_ingest_and_promote_refuse_while_a_night_holds_the_lease(store: Store, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    location = str(store.root) if isinstance(store, LocalStore) else store.uri().rstrip("/")
    for v in (A, B):
        publish(store, v, tmp_path)
    registry.promote(store, A, reason="first")
    with bucket_lease(store, "train night", 60):
        assert cli_main(["models", "promote", B, "--reason", "rollback", "--bucket", location]) != 0
        assert "train night" in capsys.readouterr().err
        assert cli_main(["ingest", location, str(tmp_path / "face")]) != 0
        assert "train night" in capsys.readouterr().err
    assert registry.read_champion(store)["version"] == A
    assert cli_main(["models", "promote", B, "--reason", "rollback", "--bucket", location]) == 0
    assert registry.read_champion(store)["version"] == B


# --- items 1 and 2: versions are checked, digests are mandatory ----------------------------------------------

@pytest.mark.parametrize("pointer", [
    {"version": "../../../tmp/evil"},
    {"version": A, "previous_version": "/etc"},
    {"version": A, "history": [{"version": "x/../../y"}]},
    {"version": A, "model_key": "models/face/other/model.onnx"},
    ["not", "an", "object"],
])
def test_a_champion_pointer_naming_an_illegal_version_is_refused(store: Store, pointer: object) -> None:
    store.put_bytes(registry.CHAMPION_KEY, json.dumps(pointer).encode())
    with pytest.raises(registry.RegistryError):
        registry.read_champion(store)
    with pytest.raises(registry.RegistryError):
        registry.champion_ref(store)


def test_latest_and_publishing_records_naming_illegal_versions_are_refused(store: Store) -> None:
    store.put_bytes(registry.LATEST_KEY, json.dumps({"version": "../x", "images": 1}).encode())
    with pytest.raises(registry.RegistryError, match="latest.json"):
        registry.read_latest(store)
    record = registry.PublishRecord("../../x", True, None, "", None, {}, [], "", 0, "")
    store.put_bytes(registry.PUBLISHING_KEY, json.dumps(record.__dict__).encode())
    with pytest.raises(registry.RegistryError, match="publishing.json"):
        registry.unfinished_publish(store)
    with pytest.raises(registry.RegistryError):
        registry.version_key("..", "model.onnx")


def test_a_listing_ignores_folders_that_are_not_versions(store: Store, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    publish(store, A, tmp_path)
    store.put_bytes("models/face/not-a-version/model.onnx", b"x")
    assert [r["version"] for r in registry.list_versions(store)] == [A]
    assert "not-a-version" in caplog.text


def test_a_version_without_sha256_json_is_never_used(store: Store, tmp_path: Path) -> None:
    """Scoring by version, the int8 model, warm start and promote all refuse bytes nothing records."""
    for name in ("model.onnx", "model.int8.onnx", "checkpoint.pt"):
        store.put_bytes(registry.version_key(A, name), b"bytes nobody recorded")
    for name in ("model.onnx", "model.int8.onnx"):
        with pytest.raises(registry.ModelIntegrityError, match="no recorded sha256"):
            registry.fetch_model(store, A, tmp_path / name, name=name)
    with pytest.raises(registry.ModelIntegrityError, match="no recorded sha256"):
        fetch_checkpoint(store, A, tmp_path / "checkpoint.pt")
    with pytest.raises(registry.ModelIntegrityError, match="no recorded sha256"):
        registry.promote(store, A)
    assert registry.read_champion(store) is None and not (tmp_path / "model.onnx").exists()
    store.put_bytes(registry.version_key(A, registry.SHA256_FILE), b'{"model.onnx": "not hex"}')
    with pytest.raises(registry.ModelIntegrityError, match="64-hex"):
        registry.fetch_model(store, A, tmp_path / "model.onnx")


# --- item 5: presigned links live a day ------------------------------------------------------------------------

def test_presigned_links_expire_after_link_seconds(bucket: str) -> None:
    from faceclf.config import LINK_SECONDS, NightConfig

    store = open_store(f"s3://{bucket}")
    store.put_bytes("models/face/x.png", b"png")
    now = time.time()
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(store.link("models/face/x.png")).query)
    if "X-Amz-Expires" in query:   # SigV4: seconds from signing
        lifetime = int(query["X-Amz-Expires"][0])
    else:                          # SigV2 (boto3's choice without a region): the epoch second it ends
        lifetime = round(int(query["Expires"][0]) - now, -1)
    assert lifetime == LINK_SECONDS == NightConfig().link_seconds == 24 * 3600
    with pytest.raises(ValueError, match="7 days"):
        NightConfig(link_seconds=8 * 24 * 3600)

