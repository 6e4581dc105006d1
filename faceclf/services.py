"""Real local services for the demo and the tests: a moto S3 server on 127.0.0.1 (a subprocess)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

# Dummy credentials for the local endpoint only: moto accepts any, and they are not secrets.
LOCAL_S3_ENV = {"AWS_ACCESS_KEY_ID": "faceclf-local", "AWS_SECRET_ACCESS_KEY": "faceclf-local",
                "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers (any HTTP status) or raise TimeoutError / RuntimeError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server process for {url} exited with code {proc.returncode} before answering")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Terminate a server subprocess (and wait), killing it if it does not stop in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def moto_s3_server(log_path: Path | None = None) -> Iterator[str]:
    """Run moto's S3 server on 127.0.0.1:<free port> in a subprocess; yield its endpoint URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **LOCAL_S3_ENV})
    try:
        wait_for_http(url, 60, proc)
        yield url
    finally:
        stop(proc)
        if log_path:
            out.close()


@contextlib.contextmanager
def local_s3_env(endpoint: str) -> Iterator[None]:
    """Point boto3 in this process (and child processes) at ``endpoint`` with the dummy credentials."""
    keys = {**LOCAL_S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
