"""One small object-store interface over S3 (boto3) and a local folder.

Everything that reads or writes the bucket layout (incoming/, datasets/face/, models/face/,
predictions/) goes through a ``Store``, so a user without a bucket runs the same code on a folder.
The S3 endpoint and credentials come from boto3's own configuration (AWS_ENDPOINT_URL, profiles,
the credential chain): nothing here reads or prints them.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from faceclf.atomic import write_atomic

DEFAULT_POOL = 32  # HTTP connections per S3 client; >= the download threads that share it


@dataclass(frozen=True)
class ObjectInfo:
    """A listed object: key relative to the store, ETag (change detector) and size in bytes."""

    key: str
    etag: str
    size: int


def safe_key(key: str) -> str:
    """Return ``key`` if it is a plain relative POSIX key, else raise ValueError saying why.

    Refused: empty, absolute, '..' or '.' parts, backslashes, NUL or other control characters,
    parts over 255 bytes. Such keys could write outside a local folder.
    """
    if not key or key.startswith("/"):
        raise ValueError(f"key {key!r} is empty or absolute")
    if "\\" in key or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ValueError(f"key {key!r} holds a backslash or control character")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in ("", ".", ".."):
        raise ValueError(f"key {key!r} has an empty, '.' or '..' path part")
    if any(len(p.encode()) > 255 for p in parts):
        raise ValueError(f"key {key[:80]!r}... has a path part over 255 bytes")
    return key


class Store(ABC):
    """Keys are '/'-separated and relative to the store's root (bucket or folder)."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's content; FileNotFoundError if it does not exist."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write the whole object at once: readers see the old or the new content, never a mix."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Upload a local file as ``key`` (atomically, as put_bytes)."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """True if ``key`` exists."""

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """Where ``key`` lives, for people and logs: s3://bucket/key or a local path."""

    def download(self, key: str, path: Path) -> None:
        """Copy an object to a local file atomically."""
        data = self.get_bytes(key)
        write_atomic(path, lambda p: p.write_bytes(data))


class LocalStore(Store):
    """A folder used as a bucket: key 'a/b.jpg' is ROOT/a/b.jpg. ETag: sha256 of the content."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*PurePosixPath(safe_key(key)).parts)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"folder {str(self.root)!r} does not exist")
        for p in sorted(self.root.rglob("*")):
            if not p.is_file() or p.name.startswith(".") and p.name.endswith(".tmp"):
                continue
            key = p.relative_to(self.root).as_posix()
            if key.startswith(prefix):
                with open(p, "rb") as f:
                    etag = hashlib.file_digest(f, "sha256").hexdigest()
                yield ObjectInfo(key, etag, p.stat().st_size)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        return path.read_bytes()

    def put_bytes(self, key: str, data: bytes) -> None:
        write_atomic(self._path(key), lambda p: p.write_bytes(data))

    def put_file(self, key: str, path: Path) -> None:
        self.put_bytes(key, Path(path).read_bytes())

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def uri(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)  # display only (may be a prefix): not validated


def s3_client(max_pool_connections: int = DEFAULT_POOL):
    """A boto3 S3 client: standard retry mode (backoff on 5xx/throttling), a pool sized for threads."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": 8}, max_pool_connections=max_pool_connections)
    return boto3.client("s3", config=config)


class S3Store(Store):
    """An S3 bucket (AWS or any S3-compatible endpoint boto3 is configured for)."""

    def __init__(self, bucket: str, client=None):  # noqa: ANN001 - a boto3 client
        if not bucket:
            raise ValueError("no bucket given (set FACECLF_BUCKET or pass s3://BUCKET)")
        self.bucket = bucket
        self.client = client or s3_client()

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield ObjectInfo(obj["Key"], obj["ETag"].strip('"'), int(obj["Size"]))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(f"s3://{self.bucket}/{key} does not exist") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, key)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"


def open_store(location: str | os.PathLike[str], client=None) -> Store:  # noqa: ANN001
    """'s3://BUCKET' -> S3Store; anything else is a local folder."""
    text = str(location)
    if text.startswith("s3://"):
        bucket = text[len("s3://"):].strip("/")
        if "/" in bucket:
            raise ValueError(f"{text!r}: give the bucket only (s3://BUCKET); the layout below it is fixed")
        return S3Store(bucket, client)
    return LocalStore(text)


def download_prefix(store: Store, prefix: str, dest: Path, workers: int = 16) -> list[Path]:
    """Copy every object under ``prefix`` to dest/<key> in parallel; unsafe keys raise ValueError."""
    from concurrent.futures import ThreadPoolExecutor

    objects = list(store.list(prefix))
    targets = [dest.joinpath(*PurePosixPath(safe_key(o.key)).parts) for o in objects]
    with ThreadPoolExecutor(max(1, min(workers, DEFAULT_POOL))) as pool:
        list(pool.map(lambda ot: store.download(ot[0].key, ot[1]), zip(objects, targets)))
    return targets
