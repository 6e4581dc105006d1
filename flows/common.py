"""What the flows share: the retry policy of tasks that do I/O with the bucket, and the events faceclf emits.

Events (Prefect's, on its own server; deployments/prefect.yaml's triggers and flows/notify.py's automation act on
them):
  faceclf.incoming.arrived    resource faceclf.bucket.<bucket>: enough new images to start a night (flows/watch.py)
  faceclf.champion.degraded   resource faceclf.model.<version>: a scoring run's label-free estimate of the champion
                              fell below its test accuracy, or its predicted class shares moved (flows/score.py)
"""

from __future__ import annotations

from typing import Any

from faceclf.store.local_paths import allowed_roots, confine


def retry_io_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed task only for transient I/O faults (network, connection, OS-level errors).

    Bad data (ValueError), missing objects (FileNotFoundError), a refused night and bugs fail at
    once: retrying cannot fix them. boto3 already retries throttling and 5xx inside each call.
    """
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    if isinstance(exc, FileNotFoundError):
        return False
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        BotoCoreError = OSError  # noqa: N806
    return isinstance(exc, (OSError, ConnectionError, TimeoutError, BotoCoreError))


IO_RETRIES = {"retries": 3, "retry_delay_seconds": [5, 20, 60], "retry_condition_fn": retry_io_only}


ARRIVED = "faceclf.incoming.arrived"
DEGRADED = "faceclf.champion.degraded"


def check_local_paths(location: str, **paths: str) -> None:
    """ValueError unless each parameter in ``paths`` (name -> value) that becomes a local path, and a local bucket
    folder ``location``, lies inside the worker's folder or FACECLF_ALLOW_PATHS: the Prefect server has no login,
    so they are input."""
    roots = allowed_roots()
    for name, value in paths.items():
        confine(value, roots, name)
    if not location.startswith("s3://"):  # a local bucket folder (open_store's rule)
        confine(location, roots, "bucket")
