"""The decoded-image cache: every image decoded once per image size, kept in uint8 shard files.

    <face_dir>-decoded/<size>/catalog.json           shards (name, sha256 of the file, image sha256 per row)
                              shard-<sha256[:16]>.npy uint8 (rows, 3, S, S), written once, never changed
    s3://BUCKET/datasets/face/decoded/<size>/...       the same files, mirrored (catalog.json written last)

A night decodes only the images its FaceSet holds that no shard holds yet, appends them as new shards,
and trains from memory maps of the shards. A shard whose bytes do not match its checksum is reported,
dropped and its images decoded again. A shard is hashed when it was written or fetched and again
whenever its size or modification time changed since (``verify(full=True)`` hashes every shard), so a
night costs what is new, not the size of the cache. Every file is written to a temporary name and renamed into
place, and the catalog is rewritten after the shard it names: a killed write leaves the cache usable.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from faceclf.child import ChildDied, run_in_child
from faceclf.config import CacheConfig
from faceclf.dataset.faceset import FaceImage, FaceSet, ImageIndex
from faceclf.dataset.layout import SHA256_HEX, sha256_file
from faceclf.dataset.preprocess import Preprocess
from faceclf.progress import progress
from faceclf.store.atomic import remove_stale_temps, write_atomic, write_json_atomic
from faceclf.store.objects import Store
from faceclf.store.registry import sha256_bytes

log = logging.getLogger(__name__)

CATALOG = "catalog.json"
VERIFIED = "verified.json"   # local only: shard name -> [size, mtime_ns] when its checksum last matched
FORMAT = 1
REMOTE_PREFIX = "datasets/face/decoded/"


@dataclass(frozen=True, eq=False)
class Shard:
    """One shard file: its name, the sha256 of its bytes, and the image held in each row (hex sha256,
    bytes dtype S64: 64 bytes per image instead of a Python string each)."""

    name: str
    sha256: str
    rows: np.ndarray


@dataclass(frozen=True)
class CacheIndex:
    """Where each cached image is: image sha256s sorted, with the shard and row of each (numpy columns,
    so looking up a split of N images costs a few arrays of N, not a dict entry per image)."""

    sha256: np.ndarray     # S64 (M,), sorted
    shard: np.ndarray      # int64 (M,)
    row: np.ndarray        # int64 (M,)

    def lookup(self, sha256: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, where) for hex digests ``sha256`` (S64 (N,)): bool (N,), and int64 (K, 2) shard and row
        of each found one, in order."""
        pos = np.searchsorted(self.sha256, sha256)
        pos = np.minimum(pos, max(len(self.sha256) - 1, 0))
        found = (self.sha256[pos] == sha256) if len(self.sha256) else np.zeros(len(sha256), dtype=bool)
        hit = pos[found]
        return found, np.stack([self.shard[hit], self.row[hit]], axis=1).reshape(-1, 2)


@dataclass
class CacheReport:
    """What bringing the cache up to date did."""

    image_size: int
    shards: int = 0                   # shards held after the update
    images: int = 0                   # images decodable from the cache
    decoded: int = 0                  # images decoded tonight (not in any shard yet)
    downloaded: int = 0               # shards fetched from the store instead of decoding
    uploaded: int = 0                 # shards mirrored to the store
    rebuilt: list[str] = field(default_factory=list)   # shards dropped for a checksum mismatch
    rejected: dict[str, str] = field(default_factory=dict)  # image sha256 -> why it does not decode


def shard_name(sha256: str) -> str:
    """The one legal name of the shard whose bytes have this sha256: 'shard-<first 16 hex digits>.npy'."""
    return f"shard-{sha256[:16]}.npy"


def check_shard(entry: Any) -> Shard:
    """A catalog's shard entry as a Shard, or ValueError saying what is wrong with it.

    A catalog can come from the bucket, and its writer supplies the names and the digests alike: a name is
    accepted only in its one legal form, derived from a well-formed digest (never '../', '/', or anything
    else that would make a path outside the cache), and every row must be an image's hex sha256."""
    if not isinstance(entry, dict):
        raise ValueError(f"a shard entry must be an object, got {type(entry).__name__}")
    name, digest, rows = entry.get("name"), entry.get("sha256"), entry.get("rows")
    if not (isinstance(digest, str) and SHA256_HEX.fullmatch(digest)):
        raise ValueError(f"shard {name!r}: sha256 {digest!r} is not 64 lowercase hex digits")
    if name != shard_name(digest):
        raise ValueError(f"shard name {name!r} is not the one legal name {shard_name(digest)!r} for its sha256")
    if not (isinstance(rows, list) and all(isinstance(r, str) and SHA256_HEX.fullmatch(r) for r in rows)):
        raise ValueError(f"shard {name!r}: rows must be a list of 64-hex-digit image sha256s")
    return Shard(name, digest, np.array(rows, dtype="S64"))


def parse_catalog(catalog: dict[str, Any], image_size: int, where: str) -> tuple[list[Shard], dict[str, str]]:
    """(shards, rejected images) of a catalog; ValueError if it is not a cache of ``image_size`` px images. A
    shard entry that is not in its legal form is left out with a warning naming it (its images are decoded
    again): no name read from a catalog becomes a path unchecked."""
    if catalog.get("format") != FORMAT or catalog.get("image_size") != image_size:
        raise ValueError(f"{where} is not a format-{FORMAT} cache of {image_size} px images")
    shards = []
    for entry in catalog.get("shards") or []:
        try:
            shards.append(check_shard(entry))
        except ValueError as e:
            log.warning("%s: shard entry refused, its images are decoded instead: %s", where, e)
    return shards, dict(catalog.get("rejected", {}))


def cache_folder(face_dir: Path, image_size: int) -> Path:
    """The cache of ``face_dir`` for one image size: next to face/, not inside it."""
    return face_dir.parent / f"{face_dir.name}-decoded" / str(image_size)


class DecodedCache:
    """The shards of one image size in ``folder`` and their catalog."""

    def __init__(self, folder: Path, preset: Preprocess, cfg: CacheConfig | None = None):
        self.folder, self.preset, self.cfg = Path(folder), preset, cfg or CacheConfig()
        self.shards: list[Shard] = []
        self.rejected: dict[str, str] = {}
        self.verified: dict[str, list[int]] = {}
        self._read_catalog()

    # --- the catalog --------------------------------------------------------------------------
    def _read_catalog(self) -> None:
        path = self.folder / CATALOG
        if path.is_file():
            self.shards, self.rejected = parse_catalog(json.loads(path.read_text()), self.preset.image_size, str(path))
        if (self.folder / VERIFIED).is_file():
            self.verified = json.loads((self.folder / VERIFIED).read_text())

    def catalog(self) -> dict[str, Any]:
        """The catalog as JSON-ready data."""
        return {"format": FORMAT, "image_size": self.preset.image_size, "rejected": self.rejected,
                "shards": [{"name": s.name, "sha256": s.sha256, "rows": np.char.decode(s.rows).tolist()}
                           for s in self.shards]}

    def _write_catalog(self) -> None:
        write_json_atomic(self.folder / CATALOG, self.catalog())

    def locate(self) -> CacheIndex:
        """The shard and row of every image the cache holds."""
        if not self.shards:
            return CacheIndex(np.zeros(0, dtype="S64"), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        sha = np.concatenate([s.rows for s in self.shards])
        shard = np.concatenate([np.full(len(s.rows), i, dtype=np.int64) for i, s in enumerate(self.shards)])
        row = np.concatenate([np.arange(len(s.rows), dtype=np.int64) for s in self.shards])
        order = np.argsort(sha, kind="stable")
        return CacheIndex(sha[order], shard[order], row[order])

    # --- checking and decoding -----------------------------------------------------------------
    def verify(self, full: bool = False) -> list[str]:
        """Drop the shards whose file is missing or whose bytes do not match their checksum; their
        images are decoded again by ``add``. Returns the names of the dropped shards.

        A shard whose size and modification time are those recorded when its checksum last matched is
        not hashed again, unless ``full``.
        """
        bad = [s for s in self.shards if not self._intact(s, full)]
        self._write_verified()
        for s in bad:
            log.warning("decoded-image shard %s is missing or its checksum does not match: rebuilding its %d "
                        "images", self.folder / s.name, len(s.rows))
            (self.folder / s.name).unlink(missing_ok=True)
        if bad:
            self.shards = [s for s in self.shards if s not in bad]
            self._write_catalog()
        return [s.name for s in bad]

    def _intact(self, shard: Shard, full: bool) -> bool:
        path = self.folder / shard.name
        if not path.is_file():
            return False
        if not full and self.verified.get(shard.name) == self._stamp(path):
            return True
        if sha256_file(path) != shard.sha256:
            self.verified.pop(shard.name, None)
            return False
        self.verified[shard.name] = self._stamp(path)
        return True

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]

    def _write_verified(self) -> None:
        held = {s.name for s in self.shards}
        self.verified = {k: v for k, v in self.verified.items() if k in held}
        write_json_atomic(self.folder / VERIFIED, self.verified)

    def missing(self, faceset: FaceSet) -> ImageIndex:
        """The FaceSet's images that no shard holds and that were not found undecodable before (one per
        sha256, in the FaceSet's order)."""
        shas = faceset.images.sha256s
        found, _ = self.locate().lookup(shas)
        if self.rejected:
            found |= np.isin(shas, np.array(list(self.rejected), dtype="S64"))
        _, first = np.unique(shas, return_index=True)
        todo = np.zeros(len(shas), dtype=bool)
        todo[first] = True                      # the first of byte-identical copies
        return faceset.images.take(todo & ~found)

    def add(self, faceset: FaceSet, images: Sequence[FaceImage]) -> int:
        """Decode ``images`` (files of ``faceset``) into new shards of at most ``shard_images`` rows; returns
        how many decoded. The catalog is rewritten after each shard, so a killed run keeps what it wrote.

        ``decode_in_child_above`` images or more are decoded in a fresh child process, so the heap a big
        decode leaves (thread arenas, freed shard buffers) is not carried into what this process does next."""
        if 0 < self.cfg.decode_in_child_above <= len(images):
            return self._add_in_child(faceset, images)
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.folder)
        done = 0
        bar = progress(total=len(images), desc=f"decode {self.preset.image_size}px", unit="img", leave=False)
        with ThreadPoolExecutor(max(1, self.cfg.decode_workers)) as pool:
            for start in range(0, len(images), self.cfg.shard_images):
                chunk = images[start:start + self.cfg.shard_images]
                results = list(pool.map(self.preset.try_decode, [faceset.file(i) for i in chunk]))
                self._append(chunk, results)
                done += len(chunk)
                bar.update(len(chunk))
        bar.close()
        return done

    def _add_in_child(self, faceset: FaceSet, images: Sequence[FaceImage]) -> int:
        """``add`` in a spawned child process; this cache then rereads the catalog the child wrote."""
        log.info("decoding %d images in a child process", len(images))
        cfg = dataclasses.replace(self.cfg, decode_in_child_above=0)
        try:
            return run_in_child(_add_child, self.folder, self.preset, cfg, faceset, images, name="faceclf-decode")
        except ChildDied as err:
            raise RuntimeError(f"the child process decoding into {self.folder} {err}; the shards it finished "
                               "are kept and a rerun decodes only the rest") from None
        finally:
            self._read_catalog()

    def _append(self, chunk: Sequence[FaceImage], results: list[np.ndarray | str]) -> None:
        """Write one shard of the decoded images of ``chunk`` and record the ones that did not decode."""
        good = [(img, arr) for img, arr in zip(chunk, results) if not isinstance(arr, str)]
        for img, arr in zip(chunk, results):
            if isinstance(arr, str):
                log.warning("skipped %s: %s", img.path, arr)
                self.rejected[img.sha256] = arr
        if good:
            stacked = np.ascontiguousarray(np.stack([a for _, a in good]).transpose(0, 3, 1, 2))  # (N, 3, S, S)
            buf = io.BytesIO()
            np.save(buf, stacked, allow_pickle=False)
            data = buf.getvalue()
            digest = sha256_bytes(data)
            name = shard_name(digest)
            write_atomic(self.folder / name, lambda p: p.write_bytes(data))
            self.shards.append(Shard(name, digest, np.array([img.sha256 for img, _ in good], dtype="S64")))
            self.verified[name] = self._stamp(self.folder / name)  # hashed as it was written
            self._write_verified()
        self._write_catalog()

    def open(self, index: int) -> np.ndarray:
        """Shard ``index`` as a read-only memory map, uint8 (rows, 3, S, S)."""
        return np.load(self.folder / self.shards[index].name, mmap_mode="r", allow_pickle=False)

    # --- the mirror in the store ---------------------------------------------------------------
    def remote(self, name: str = "") -> str:
        """Key of ``name`` in the store's mirror of this image size."""
        return f"{REMOTE_PREFIX}{self.preset.image_size}/{name}"

    def pull(self, store: Store) -> int:
        """Fetch the shards the store's mirror holds and this cache lacks (checksum-checked, so a bad
        download is skipped and decoded instead); returns how many were fetched."""
        try:
            remote = json.loads(store.get_bytes(self.remote(CATALOG)))
        except FileNotFoundError:
            return 0
        shards, rejected = parse_catalog(remote, self.preset.image_size, store.uri(self.remote(CATALOG)))
        held, fetched = {s.name for s in self.shards}, 0
        for shard in (s for s in shards if s.name not in held):
            data = store.get_bytes(self.remote(shard.name))
            if sha256_bytes(data) != shard.sha256:
                log.warning("%s does not match its checksum: not used (its images are decoded here)",
                            store.uri(self.remote(shard.name)))
                continue
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.folder / shard.name, lambda p, d=data: p.write_bytes(d))
            self.shards.append(shard)
            self.verified[shard.name] = self._stamp(self.folder / shard.name)
            fetched += 1
        self.rejected.update(rejected)
        if fetched:
            self._write_catalog()
        return fetched

    def push(self, store: Store) -> int:
        """Upload the shards the mirror lacks, then the catalog (last); returns how many shards went up."""
        sent = 0
        for shard in self.shards:  # a shard never changes once written: one that is there is whole
            if not store.exists(self.remote(shard.name)):
                store.put_file(self.remote(shard.name), self.folder / shard.name)
                sent += 1
        store.put_bytes(self.remote(CATALOG), (json.dumps(self.catalog()) + "\n").encode())
        return sent


def _add_child(folder: Path, preset: Preprocess, cfg: CacheConfig, faceset: FaceSet,
               images: Sequence[FaceImage]) -> int:
    """Child process of ``DecodedCache._add_in_child``: open the same cache and decode into it."""
    return DecodedCache(folder, preset, cfg).add(faceset, images)


def update_cache(faceset: FaceSet, face_dir: Path, preset: Preprocess, store: Store | None = None,
                 cfg: CacheConfig | None = None) -> tuple[DecodedCache, CacheReport]:
    """Bring the cache of ``face_dir`` at ``preset``'s size up to date with ``faceset``: fetch the mirror's
    shards, drop corrupt ones, decode what is still missing, mirror the result."""
    cache = DecodedCache(cache_folder(face_dir, preset.image_size), preset, cfg)
    report = CacheReport(preset.image_size)
    if store is not None:
        report.downloaded = cache.pull(store)
    report.rebuilt = cache.verify()
    report.decoded = cache.add(faceset, cache.missing(faceset))
    if store is not None:
        report.uploaded = cache.push(store)
    report.shards, report.images = len(cache.shards), sum(len(s.rows) for s in cache.shards)
    report.rejected = {sha: cache.rejected[sha] for sha in np.char.decode(faceset.images.sha256s).tolist()
                       if sha in cache.rejected} if cache.rejected else {}
    log.info("decoded cache %s: %d shards, %d images; decoded %d, downloaded %d shards, uploaded %d, rebuilt %s",
             cache.folder, report.shards, report.images, report.decoded, report.downloaded, report.uploaded,
             report.rebuilt or "none")
    return cache, report
