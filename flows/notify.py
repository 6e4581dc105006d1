"""Notifications of a night that failed, crashed or was rejected, and of a champion whose label-free estimate
degrades between nights: through a Prefect notification block (Apprise covers Slack, e-mail, Teams, Discord,
plain webhooks), never a URL in code. The champion's degraded events (flows/score.py) reach the block through
an automation the Prefect server runs (``save_degraded_automation``, made with the block by `python3 -m
flows.notify`); a night's outcome is sent by the night itself.

Where the message goes, first found wins:
  $FACECLF_NOTIFY_URL     an Apprise URL: slack://..., mailto://..., json://host/path (JSON to http://host/path)
  the block $FACECLF_NOTIFY_BLOCK names, as "block-type/name" (default "custom-webhook/faceclf-notify"): any
      notification block saved on the Prefect server (a Slack Webhook made in the UI, ...), or the webhook that
      python3 -m flows.notify https://hooks.example.com/faceclf       (deployments/prefect.yaml names it)
      saves: a Custom Webhook block posting {"title": ..., "message": ...} as JSON.
Neither set: the night says so in its log and goes on. A night with nothing new, or a promoted one, sends
nothing. A notification that cannot be delivered never fails the night: a rejected night's becomes a warning at
the top of its report.md, a failed night's is logged.

A notification URL is a secret (a webhook's path is its token): the saved block keeps it in its `secrets` (the
Prefect UI and API show it masked; its `url` is the template "{{url}}"), and no error or log line of a delivery
holds it: a failed delivery raises ``NotificationFailed`` naming the problem (an HTTP status, Apprise's
complaint) without the URL, and the log lines of apprise, httpx and urllib3 during a delivery have it masked.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote, unquote, urlsplit

URL_ENV = "FACECLF_NOTIFY_URL"
BLOCK_ENV = "FACECLF_NOTIFY_BLOCK"
BLOCK_NAME = "faceclf-notify"
DEFAULT_BLOCK = f"custom-webhook/{BLOCK_NAME}"

log = logging.getLogger("faceclf.notify")

MASK = "***"
# The loggers that name a URL while a notification is sent (apprise at DEBUG, httpx at INFO, urllib3 at DEBUG).
SENDER_LOGGERS = ("apprise", "httpx", "urllib3.connectionpool")


class NotificationFailed(Exception):
    """A notification that could not be delivered; its message never holds the notification URL."""


def secret_fragments(values: Iterable[str]) -> list[str]:
    """What must never be shown of these secret values (URLs or tokens), longest first: each value, and each
    part of a URL that can hold a token (user, password, path, path segments, query, fragment; the host too where
    it is no host name but a service token, as in slack://TokenA/TokenB/TokenC), plain and %-encoded."""
    out: set[str] = set()
    for value in values:
        if not value or len(value) < 4:
            continue
        out.add(value)
        try:
            parts = urlsplit(value)
        except ValueError:
            continue
        if not parts.scheme:
            continue
        host = parts.netloc.rpartition("@")[2].rsplit(":", 1)[0]  # as written (hostname lowercases it)
        pieces = [parts.username or "", parts.password or "", parts.path, parts.query, parts.fragment,
                  parts.path + ("?" + parts.query if parts.query else ""),
                  *re.split(r"[/?&=#;,]", f"{parts.path}?{parts.query}#{parts.fragment}")]
        if host and "." not in host and ":" not in host:
            pieces.append(host)
        for piece in pieces:
            piece = piece.strip("/")
            if len(piece) >= 4:
                out.update({piece, unquote(piece), quote(piece, safe="")})
    return sorted((f for f in out if len(f) >= 4), key=len, reverse=True)


def redact(text: str, fragments: Iterable[str]) -> str:
    """``text`` with every secret fragment replaced by ***."""
    for fragment in fragments:
        text = text.replace(fragment, MASK)
    return text


def block_secrets(block: Any) -> list[str]:
    """The secret values of a notification block: its SecretStr fields, the strings in its SecretDict fields, and
    a plain ``url``/``webhook_url`` field that is no template (a Custom Webhook block saved before the URL became
    a secret)."""
    from pydantic import SecretStr

    from prefect.types import SecretDict

    def strings(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from strings(v)

    found: list[str] = []
    for name in getattr(type(block), "model_fields", {}):
        value = getattr(block, name, None)
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
        elif isinstance(value, SecretDict):
            found.extend(strings(value.get_secret_value()))
        elif name in ("url", "webhook_url") and isinstance(value, str) and "{{" not in value:
            found.append(value)
    return found


class _Redact(logging.Filter):
    def __init__(self, fragments: list[str]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot be formatted: leave it to its handler
            return True
        clean = redact(text, self.fragments)
        if record.exc_info:  # a traceback that names the URL: masked, as text in the message
            trace = "".join(traceback.format_exception(*record.exc_info)).rstrip()
            if redact(trace, self.fragments) != trace:
                clean = f"{clean}\n{redact(trace, self.fragments)}"
                record.exc_info, record.exc_text = None, None
        if clean != text:
            record.msg, record.args = clean, ()
        return True


@contextlib.contextmanager
def masked(fragments: list[str]) -> Iterator[None]:
    """While it is open, the log lines of the senders' loggers (SENDER_LOGGERS) have these fragments masked."""
    if not fragments:
        yield
        return
    flt = _Redact(fragments)
    loggers = [logging.getLogger(name) for name in SENDER_LOGGERS]
    for logger in loggers:
        logger.addFilter(flt)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(flt)


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def problem(err: Exception, fragments: list[str]) -> str | None:
    """What went wrong, without the URL; None when ``err`` (and every error it chains) names none of the secret
    fragments, so it can be raised as it is."""
    import httpx

    from prefect.blocks.abstract import NotificationError

    if isinstance(err, httpx.HTTPStatusError):
        return f"the notification webhook answered HTTP {err.response.status_code} {err.response.reason_phrase}".strip()
    if isinstance(err, NotificationError):  # Apprise's: its log of the attempt, complaints only
        said = [line.partition(": ")[2] for line in err.log.splitlines()
                if line.startswith(("[WARNING]", "[ERROR]", "[CRITICAL]"))]
        said = [redact(line, fragments) for line in said if line]
        return "the notification service did not take the message" + (f": {' '.join(said)}" if said else "")
    if any(redact(str(e), fragments) != str(e) or redact(repr(e), fragments) != repr(e) for e in _chain(err)):
        return f"{type(err).__name__}: {redact(str(err), fragments)}"
    return None


def notifier() -> Any | None:
    """The notification block to send with: from $FACECLF_NOTIFY_URL (Apprise), else the saved block
    $FACECLF_NOTIFY_BLOCK names (default custom-webhook/faceclf-notify); None when neither exists."""
    from prefect.blocks.core import Block
    from prefect.blocks.notifications import AppriseNotificationBlock

    url = os.environ.get(URL_ENV)
    if url:
        with masked(secret_fragments([url])):  # apprise logs the URL it loads
            return AppriseNotificationBlock(url=url)
    try:
        return Block.load(os.environ.get(BLOCK_ENV, DEFAULT_BLOCK))
    except ValueError:  # no block of that name (or type) on this server
        return None


def deliver(subject: str, body: str) -> bool:
    """Send one notification; True if it was handed to a notifier, False when none is configured (logged). A
    notifier that fails raises: the night's informing steps turn that into a warning in its report. The error
    never holds the notification URL: one that would (an HTTP status error, Apprise's failure, any error whose
    text names the URL or a piece of it) is raised as ``NotificationFailed`` naming the problem only, with no
    chained error (its traceback would print the URL); any other error is raised as it is."""
    block = notifier()
    if block is None:
        log.info("no notifier (set %s, or save the block %r with `python3 -m flows.notify URL`): %s",
                 URL_ENV, os.environ.get(BLOCK_ENV, DEFAULT_BLOCK), subject)
        return False
    fragments = secret_fragments(block_secrets(block))
    failed: str | None = None
    try:
        raising = getattr(block, "raise_on_failure", None)  # Apprise blocks only report a failure when asked
        with masked(fragments), (raising() if raising else contextlib.nullcontext()):
            block.notify(body, subject=subject)
    except Exception as err:
        failed = problem(err, fragments)
        if failed is None:
            raise
    if failed is not None:  # raised here, outside the handler: no __context__ holds the original error
        raise NotificationFailed(failed) from None
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
    as JSON to ``url``; its slug, as $FACECLF_NOTIFY_BLOCK takes it. The URL is kept in the block's secrets
    (masked in the UI and API) and its ``url`` field is the template "{{url}}" filled from them when it sends.
    The automation that sends the champion's degraded events through it is (re)created too."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok:  # the URL itself is not repeated: it is a secret
        raise ValueError("the webhook URL must be an http:// or https:// URL with a host")
    block = CustomWebhookNotificationBlock(name=name, url="{{url}}", secrets={"url": url},
                                           json_data={"title": "{{subject}}", "message": "{{body}}"},
                                           allow_private_urls=allow_private_urls)
    block_id = block.save(name, overwrite=True)
    save_degraded_automation(block_id)
    return f"custom-webhook/{name}"


DEGRADED_AUTOMATION = "faceclf: champion degraded"


def save_degraded_automation(block_document_id: Any) -> Any:
    """(Re)create the automation that sends every faceclf.champion.degraded event (flows/score.py: the champion's
    label-free estimate fell, or its class shares moved, on a scoring run) through the notification block
    ``block_document_id``; the Prefect server's actions service sends it. Returns the automation."""
    from prefect.automations import Automation, EventTrigger, Posture, SendNotification

    from flows.common import DEGRADED

    with contextlib.suppress(ValueError):  # none of that name yet
        Automation.read(name=DEGRADED_AUTOMATION).delete()
    return Automation(
        name=DEGRADED_AUTOMATION,
        description="faceclf: notify when a scoring run's label-free estimate says the champion is degrading",
        trigger=EventTrigger(expect={DEGRADED}, match={"prefect.resource.id": "faceclf.model.*"},
                             posture=Posture.Reactive, threshold=1, within=0),
        actions=[SendNotification(block_document_id=block_document_id, subject="{{ event.payload.subject }}",
                                  body="{{ event.payload.message }}")],
    ).create()


def main(argv: list[str] | None = None) -> None:
    """python3 -m flows.notify URL|- [--name NAME] [--allow-private-urls]"""
    p = argparse.ArgumentParser(prog="python3 -m flows.notify", description="Save the webhook a failed, crashed "
                                "or rejected night, and a champion whose estimate degrades between nights, posts to "
                                "(a Prefect Custom Webhook block, and the automation that sends the champion's "
                                "degraded events through it; the URL is kept as a secret and never printed).")
    p.add_argument("url", help="http(s) URL that receives {\"title\": ..., \"message\": ...} as JSON; - reads it "
                   "from the first line of stdin (out of the shell history and the process list)")
    p.add_argument("--name", default=BLOCK_NAME, help=f"block name (default {BLOCK_NAME}; any other: set ${BLOCK_ENV})")
    p.add_argument("--allow-private-urls", action="store_true", help="allow a private or loopback address")
    a = p.parse_args(argv)
    url = sys.stdin.readline().strip() if a.url == "-" else a.url
    try:
        slug = save_block(url, a.name, a.allow_private_urls)
    except ValueError as e:
        p.error(str(e))
    print(f"saved notification block {slug!r}")


if __name__ == "__main__":
    main()
