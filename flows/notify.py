"""Notifications of a night that failed, crashed or was rejected: through a Prefect notification block
(Apprise covers Slack, e-mail, Teams, Discord, plain webhooks), never a URL in code.

Where the message goes, first found wins:
  $FACECLF_NOTIFY_URL     an Apprise URL: slack://..., mailto://..., json://host/path (JSON to http://host/path)
  the block $FACECLF_NOTIFY_BLOCK names, as "block-type/name" (default "custom-webhook/faceclf-notify"): any
      notification block saved on the Prefect server (a Slack Webhook made in the UI, ...), or the webhook that
      python3 -m flows.notify https://hooks.example.com/faceclf       (deployments/prefect.yaml names it)
      saves: a Custom Webhook block posting {"title": ..., "message": ...} as JSON.
Neither set: the night says so in its log and goes on. A night with nothing new, or a promoted one, sends
nothing. A notification that cannot be delivered never fails the night: a rejected night's becomes a warning at
the top of its report.md, a failed night's is logged.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

URL_ENV = "FACECLF_NOTIFY_URL"
BLOCK_ENV = "FACECLF_NOTIFY_BLOCK"
BLOCK_NAME = "faceclf-notify"
DEFAULT_BLOCK = f"custom-webhook/{BLOCK_NAME}"

log = logging.getLogger("faceclf.notify")


def notifier() -> Any | None:
    """The notification block to send with: from $FACECLF_NOTIFY_URL (Apprise), else the saved block
    $FACECLF_NOTIFY_BLOCK names (default custom-webhook/faceclf-notify); None when neither exists."""
    from prefect.blocks.core import Block
    from prefect.blocks.notifications import AppriseNotificationBlock

    url = os.environ.get(URL_ENV)
    if url:
        return AppriseNotificationBlock(url=url)
    try:
        return Block.load(os.environ.get(BLOCK_ENV, DEFAULT_BLOCK))
    except ValueError:  # no block of that name (or type) on this server
        return None


def deliver(subject: str, body: str) -> bool:
    """Send one notification; True if it was handed to a notifier, False when none is configured (logged). A
    notifier that fails raises: the night's informing steps turn that into a warning in its report."""
    block = notifier()
    if block is None:
        log.info("no notifier (set %s, or save the block %r with `python3 -m flows.notify URL`): %s",
                 URL_ENV, os.environ.get(BLOCK_ENV, DEFAULT_BLOCK), subject)
        return False
    block.notify(body, subject=subject)
    return True


def send(subject: str, body: str) -> bool:
    """``deliver``, for a flow state hook (nothing to report to): failures are logged, never raised."""
    try:
        return deliver(subject, body)
    except Exception as e:  # noqa: BLE001 - a notification must never turn a night's outcome into another
        log.warning("could not send the notification %r: %s", subject, e)
        return False


def on_night_failed(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow state hook (on_failure, on_crashed): the run, its state and the error, to the notifier."""
    params = getattr(flow_run, "parameters", {}) or {}
    send(f"faceclf night {state.name.lower()}: {flow_run.name}",
         f"Flow run {flow_run.name} ({flow_run.id}) of flow {flow.name} ended {state.name}: {state.message}\n"
         f"bucket: {params.get('bucket') or os.environ.get('FACECLF_BUCKET')}. The champion is unchanged.")


def night_rejected(version: str, why: str, bucket: str, stuck: list[str] | None = None) -> bool:
    """A night that trained a candidate and did not promote it (a failed delivery raises: see ``deliver``); with
    ``stuck`` (why the pipeline is stuck: faceclf.nightly.stuck) the subject says so first."""
    subject = f"faceclf pipeline stuck: night {version} rejected" if stuck else f"faceclf night rejected: {version}"
    lines = [f"The pipeline is stuck: {s}" for s in stuck or []]
    return deliver(subject, "\n".join([*lines, why, f"bucket: {bucket}. The champion is unchanged."]))


def save_block(url: str, name: str = BLOCK_NAME, allow_private_urls: bool = False) -> str:
    """Save a Custom Webhook block on the Prefect server (PREFECT_API_URL) that posts {"title", "message"}
    as JSON to ``url``; its slug, as $FACECLF_NOTIFY_BLOCK takes it."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(name=name, url=url, json_data={"title": "{{subject}}", "message": "{{body}}"},
                                           allow_private_urls=allow_private_urls)
    block.save(name, overwrite=True)
    return f"custom-webhook/{name}"


def main(argv: list[str] | None = None) -> None:
    """python3 -m flows.notify URL [--name NAME] [--allow-private-urls]"""
    p = argparse.ArgumentParser(prog="python3 -m flows.notify", description="Save the webhook a failed, crashed "
                                "or rejected night posts to (a Prefect Custom Webhook block).")
    p.add_argument("url", help="http(s) URL that receives {\"title\": ..., \"message\": ...} as JSON")
    p.add_argument("--name", default=BLOCK_NAME, help=f"block name (default {BLOCK_NAME}; any other: set ${BLOCK_ENV})")
    p.add_argument("--allow-private-urls", action="store_true", help="allow a private or loopback address")
    a = p.parse_args(argv)
    print(f"saved notification block {save_block(a.url, a.name, a.allow_private_urls)!r}")


if __name__ == "__main__":
    main()
