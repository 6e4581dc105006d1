"""Prefect flow `watch`: poll incoming/ and, when enough new images have arrived, emit the event that starts a night.

    count what ingest has not taken (faceclf.nightly.arrivals.poll) -> announce once -> event faceclf.incoming.arrived

Deployed as `watch/incoming` on an interval schedule (deployments/prefect.yaml); train/face's deployment trigger
runs a night on the event, its concurrency limit keeping one night at a time and its 02:00 cron the fallback. The
event's resource is ``faceclf.bucket.<bucket>`` (its name: the bucket's URI), its payload the counts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.events import emit_event

from faceclf.config import WatchConfig
from faceclf.nightly import arrivals
from faceclf.store.objects import open_store, resolve_location
from flows.common import ARRIVED, IO_RETRIES, check_local_paths
from flows.params import WatchParams, config_of

def bucket_resource(location: str) -> dict[str, str]:
    """The event's resource: ``faceclf.bucket.<name>`` (an S3 bucket's name, a local folder's path) and its URI."""
    name = location.removeprefix("s3://").rstrip("/")
    return {"prefect.resource.id": f"faceclf.bucket.{name}", "prefect.resource.name": location}


@task(cache_policy=NONE, **IO_RETRIES)
def poll_incoming(location: str, cache_dir: str, cfg: WatchConfig) -> arrivals.Arrivals:
    """Count the objects in incoming/ that no ingest has taken (stopping at min_new_images)."""
    return arrivals.poll(open_store(location), cfg, Path(cache_dir))


@task(cache_policy=NONE, **IO_RETRIES)
def announce(location: str, found: arrivals.Arrivals, cfg: WatchConfig) -> str | None:
    """Emit ``ARRIVED`` once for these arrivals (claimed in arrivals.json first, so two polls at once announce
    once); why it was emitted, or None when it was not due."""
    store, now = open_store(location), time.time()
    state, etag = arrivals.read_state(store)
    reason = arrivals.announcement(found, state, cfg, now)
    if reason is None or not arrivals.claim(store, found, reason, etag, now):
        return None
    try:
        emit_event(ARRIVED, resource=bucket_resource(location), payload={**found.to_dict(), "reason": reason,
                                                                          "min_new_images": cfg.min_new_images})
    except Exception:
        arrivals.release(store, state)  # not sent: the next poll announces again
        raise
    return reason


@flow(name="watch", log_prints=True)
def watch(bucket: str | None = None, cache_dir: str = "runs/.arrivals",
          watch: WatchParams = WatchParams()) -> dict[str, Any]:
    """Poll ``bucket``'s incoming/ (default $FACECLF_BUCKET) and emit faceclf.incoming.arrived when at least
    ``watch.min_new_images`` objects are new to ingest, once per state of the ingest logs (again after
    ``watch.renotify_after`` seconds if no night took them). ``cache_dir``: where the worker keeps the hashes of
    what ingest holds between polls (inside its folder or FACECLF_ALLOW_PATHS)."""
    location = resolve_location(bucket)
    check_local_paths(location, cache_dir=cache_dir)
    cfg = config_of(watch, WatchConfig)
    found = poll_incoming(location, cache_dir, cfg)
    reason = announce(location, found, cfg)
    logger = get_run_logger()
    if reason:
        logger.info("announced %s: %s", ARRIVED, reason)
    else:
        logger.info("no night to start: %d new in incoming/ (min_new_images %d)%s", found.new, cfg.min_new_images,
                    "; already announced" if found.new >= cfg.min_new_images else "")
    return {**found.to_dict(), "announced": reason is not None, "reason": reason}


if __name__ == "__main__":
    watch()
