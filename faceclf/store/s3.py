"""The S3 backend of ``Store`` (boto3), and S3 failures translated into one-line ``StoreError``s.

The S3 endpoint and credentials come from boto3's own configuration (AWS_ENDPOINT_URL, profiles,
the credential chain): nothing here reads or prints them. S3 failures surface as ``StoreError`` with a
one-line message naming the problem, the bucket and the endpoint (never a key id or secret);
a missing object is a FileNotFoundError, as for a folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

from faceclf.config import LINK_SECONDS, S3_BODY_ATTEMPTS, S3_CONNECT_TIMEOUT, S3_POOL, S3_RETRIES
from faceclf.store.atomic import write_atomic
from faceclf.store.objects import ObjectInfo, PreconditionFailed, Store

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """An object store failure, as one line: what went wrong, the bucket and the endpoint.

    ``code`` is the S3 error code or the botocore exception name (e.g. "NoSuchBucket", "AccessDenied",
    "NoCredentialsError", "EndpointConnectionError"). Messages never hold credentials.
    """

    def __init__(self, message: str, code: str = "", bucket: str = "", endpoint: str = ""):
        super().__init__(message)
        self.code, self.bucket, self.endpoint = code, bucket, endpoint


class StoreUnavailable(StoreError, ConnectionError):
    """A StoreError that may pass by itself (endpoint unreachable, timeouts, dropped connections, 5xx or
    throttling after botocore's retries). A ConnectionError too, so that callers retrying transient I/O
    (flows/common.py retries OSError) still do; a refusal (bucket, credentials, permission) is not one."""


def s3_client(max_pool_connections: int = S3_POOL):
    """A boto3 S3 client: standard retry mode, a pool sized for threads, a short connect timeout.

    Standard mode retries with jittered exponential backoff on 500/502/503/504, throttling codes
    (SlowDown) and connection errors (refused, reset, timed out); it does not retry 403/404.
    AWS_MAX_ATTEMPTS and AWS_RETRY_MODE, where set, replace our defaults (botocore reads them).
    """
    import boto3
    from botocore.config import Config

    retries: dict[str, Any] = {}
    if not os.environ.get("AWS_RETRY_MODE"):
        retries["mode"] = "standard"
    if not os.environ.get("AWS_MAX_ATTEMPTS"):
        retries["max_attempts"] = S3_RETRIES
    config = Config(retries=retries, max_pool_connections=max_pool_connections, connect_timeout=S3_CONNECT_TIMEOUT)
    return boto3.client("s3", config=config)


def _display_endpoint(url: str | None) -> str:
    """The endpoint URL for messages, without any user:password part."""
    if not url:
        return "the default AWS endpoint"
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


# S3 error code -> what it means for the user; {where} is s3://bucket/key.
_CLIENT_ERRORS = {
    "NoSuchBucket": "S3 bucket {bucket!r} does not exist",
    "InvalidAccessKeyId": "S3 does not know the access key id (wrong or missing credentials: "
                          "check AWS_ACCESS_KEY_ID / AWS_PROFILE)",
    "SignatureDoesNotMatch": "S3 refused the request signature: the secret access key does not match the "
                             "access key id (wrong credentials: check AWS_SECRET_ACCESS_KEY / AWS_PROFILE)",
    "InvalidToken": "S3 refused the session token (check AWS_SESSION_TOKEN / AWS_PROFILE)",
    "ExpiredToken": "S3 credentials have expired (renew the session / AWS_SESSION_TOKEN)",
    "AccessDenied": "S3 access denied to {where}: the credentials lack permission for it",
    "AllAccessDisabled": "S3 access denied to {where}: all access to it is disabled",
    "AccountProblem": "S3 access denied to {where}: the account has a problem",
    "403": "S3 access denied to {where} (wrong credentials or no permission)",
    "Forbidden": "S3 access denied to {where} (wrong credentials or no permission)",
    "PermanentRedirect": "S3 bucket {bucket!r} is in another region than the client uses (set AWS_DEFAULT_REGION)",
    "AuthorizationHeaderMalformed": "S3 refused the request's region (set AWS_DEFAULT_REGION)",
}


def store_error(e: BaseException, bucket: str, endpoint: str | None, key: str = "") -> StoreError:
    """Translate a botocore/boto3 exception into a one-line StoreError naming problem, bucket and endpoint.

    Known failures get our own wording, never the server's text (which may echo the access key id).
    """
    from botocore import exceptions as be

    where, at = f"s3://{bucket}/{key}", _display_endpoint(endpoint)
    if not isinstance(e, (be.ClientError, be.BotoCoreError)) and isinstance(e.__context__, be.ClientError):
        e = e.__context__  # boto3's S3UploadFailedError wraps the ClientError
    if isinstance(e, be.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code") or "Unknown")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        cls: type[StoreError] = StoreError
        if code in _CLIENT_ERRORS:
            what = _CLIENT_ERRORS[code].format(bucket=bucket, where=where)
        elif status in (500, 502, 503, 504) or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
            what, cls = f"S3 kept failing for {where} after retries", StoreUnavailable
        else:
            what = f"S3 refused the request for {where}: {str(err.get('Message') or '')[:200]}"
        return cls(f"{what} ({code}, HTTP {status}); bucket {bucket!r}, endpoint {at}", code, bucket, at)
    name, cls = type(e).__name__, StoreError
    if isinstance(e, (be.NoCredentialsError, be.PartialCredentialsError, be.CredentialRetrievalError)):
        what = ("no usable AWS credentials were found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE, or run where an instance role is available)")
    elif isinstance(e, be.SSLError):
        what = "TLS handshake with the S3 endpoint failed (check AWS_ENDPOINT_URL's scheme and certificate)"
    elif isinstance(e, (be.EndpointConnectionError, be.ConnectTimeoutError, be.ProxyConnectionError)):
        what = "cannot connect to the S3 endpoint after retries (is AWS_ENDPOINT_URL right and the server up?)"
        cls = StoreUnavailable
    elif isinstance(e, (be.ReadTimeoutError, be.ConnectionClosedError, be.HTTPClientError, be.IncompleteReadError)):
        what, cls = f"the S3 endpoint dropped or timed out the request for {where} after retries", StoreUnavailable
    else:
        what = f"S3 request for {where} failed: {str(e)[:200]}"
    return cls(f"{what} ({name}); bucket {bucket!r}, endpoint {at}", name, bucket, at)


class S3Store(Store):
    """An S3 bucket (AWS or any S3-compatible endpoint boto3 is configured for)."""

    def __init__(self, bucket: str, client=None):  # noqa: ANN001 - a boto3 client
        if not bucket:
            raise ValueError("no bucket given (set FACECLF_BUCKET or pass s3://BUCKET)")
        self.bucket = bucket
        self.client = client or s3_client()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its client (Ray tasks, spawned processes): the other side builds its own from
        boto3's configuration there (AWS_ENDPOINT_URL, credentials)."""
        return {"bucket": self.bucket}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.bucket, self.client = state["bucket"], s3_client()

    @contextlib.contextmanager
    def _errors(self, key: str = "") -> Iterator[None]:
        """Turn botocore/boto3 exceptions raised inside into StoreError (FileNotFoundError passes)."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (ClientError, BotoCoreError, Boto3Error) as e:
            raise store_error(e, self.bucket, self.client.meta.endpoint_url, key) from e

    def list(self, prefix: str = "", start_after: str = "") -> Iterator[ObjectInfo]:
        with self._errors(prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, StartAfter=start_after):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"], obj["ETag"].strip('"'), int(obj["Size"]))

    def get_bytes(self, key: str) -> bytes:
        return self.get_versioned(key)[0]

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The object's content and ETag. A body that breaks off mid-download is fetched again (S3_BODY_ATTEMPTS
        in all): botocore retries a request only until its response headers have arrived."""
        from botocore.exceptions import HTTPClientError, IncompleteReadError

        for attempt in range(1, S3_BODY_ATTEMPTS + 1):
            with self._errors(key):
                try:
                    response = self.client.get_object(Bucket=self.bucket, Key=key)
                except self.client.exceptions.NoSuchKey:
                    raise FileNotFoundError(f"s3://{self.bucket}/{key} does not exist") from None
                try:
                    return response["Body"].read(), response["ETag"].strip('"')
                except (HTTPClientError, IncompleteReadError) as e:  # reset or short body after the headers
                    if attempt == S3_BODY_ATTEMPTS:
                        raise
                    log.warning("download of s3://%s/%s broke off (%s); attempt %d of %d", self.bucket, key,
                                type(e).__name__, attempt + 1, S3_BODY_ATTEMPTS)
            time.sleep(random.uniform(0, 2 ** (attempt - 1)))  # jittered exponential backoff, as botocore's
        raise AssertionError("unreachable: the last attempt returns or raises")

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def _put_conditional(self, key: str, data: bytes, etag: str | None) -> str:
        """PutObject with If-None-Match: * (create) or If-Match: "<etag>" (replace what was read)."""
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": f'"{etag}"'}
        with self._errors(key):
            try:
                response = self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **condition)
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code")
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                    raise PreconditionFailed(f"s3://{self.bucket}/{key} changed since it was read "
                                             f"({code}, HTTP {status}; expected ETag {etag or 'none'})") from None
                raise
        return response["ETag"].strip('"')

    def put_file(self, key: str, path: Path) -> None:
        with self._errors(key):
            self.client.upload_file(str(path), self.bucket, key)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        with self._errors(key):
            try:
                self.client.head_object(Bucket=self.bucket, Key=key)
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

    def download(self, key: str, path: Path) -> None:
        """Streamed to disk in chunks (boto3's transfer manager), never the whole object in memory."""
        if not self.exists(key):
            raise FileNotFoundError(f"s3://{self.bucket}/{key} does not exist")
        with self._errors(key):
            write_atomic(path, lambda p: self.client.download_file(self.bucket, key, str(p)))

    def delete(self, key: str) -> None:
        with self._errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def link(self, key: str, expires_s: int = LINK_SECONDS) -> str | None:
        """A presigned GET URL of ``key`` (on boto3's endpoint, AWS_ENDPOINT_URL included), valid ``expires_s``."""
        with self._errors(key):
            return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                      ExpiresIn=expires_s)
