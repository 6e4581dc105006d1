"""A failed or rejected night notifies a real HTTP webhook on 127.0.0.1, through Apprise, from a real Prefect
server's flow runs; a night with nothing new sends nothing; the URL comes from the environment or from a
block saved by `python3 -m flows.notify URL`. The URL (its path is a token) is a secret: masked in the saved block
as the server shows it, and never in a failed delivery's error, its traceback or the log."""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FAST, LENIENT, Receiver, grouped, put_local_faces

from flows import notify


@pytest.fixture()
def webhook() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture()
def missing() -> Iterator[Receiver]:
    """A webhook that answers 404 Not Found (a revoked Slack hook does)."""
    receiver = Receiver(404)
    yield receiver
    receiver.server.shutdown()


def token() -> str:
    return "T0K3N" + secrets.token_hex(12)


def shows(text: str, secret: str) -> bool:
    """Whether ``text`` shows any of ``secret`` worth hiding (the whole, or its first or last 8 characters)."""
    return any(part in text for part in (secret, secret[:8], secret[-8:]))


def test_the_saved_block_keeps_the_url_secret_and_a_failed_delivery_never_shows_it(
        prefect_api, webhook: Receiver, missing: Receiver, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from prefect.blocks.core import Block
    from prefect.client.orchestration import get_client

    caplog.set_level(logging.DEBUG)  # httpx names each request's URL at INFO, urllib3 and apprise at DEBUG
    monkeypatch.delenv(notify.URL_ENV, raising=False)
    secret = token()
    slug = notify.save_block(f"{webhook.http}/hooks/{secret}", name="faceclf-secret", allow_private_urls=True)
    assert slug == "custom-webhook/faceclf-secret"
    monkeypatch.setenv(notify.BLOCK_ENV, slug)

    # What the UI and the API show of the block: the URL masked, the url field a template.
    with get_client(sync_client=True) as client:
        shown = client.read_block_document_by_name("faceclf-secret", "custom-webhook", include_secrets=False)
    assert shown.data["url"] == "{{url}}" and not shows(json.dumps(shown.data, default=str), secret), shown.data
    loaded = Block.load(slug)
    assert not shows(json.dumps(loaded.model_dump(mode="json")), secret) and not shows(repr(loaded), secret)
    assert loaded.secrets.get_secret_value() == {"url": f"{webhook.http}/hooks/{secret}"}  # kept, as a secret

    # Delivered: the posted JSON holds the title and the message.
    assert notify.deliver("faceclf night failed: x", "body text")
    assert webhook.received == [{"path": f"/hooks/{secret}", "title": "faceclf night failed: x", "message": "body text"}]

    # A revoked webhook: 404. The error names the status, not the URL, in its message and its whole traceback.
    notify.save_block(f"{missing.http}/hooks/{secret}", name="faceclf-secret", allow_private_urls=True)
    with pytest.raises(notify.NotificationFailed) as failed:
        notify.deliver("faceclf night rejected: y", "body")
    assert str(failed.value) == "the notification webhook answered HTTP 404 Not Found"
    assert len(missing.received) == 1 and failed.value.__context__ is None and failed.value.__cause__ is None
    trace = "".join(traceback.format_exception(failed.value))
    assert not shows(trace, secret) and "127.0.0.1" not in trace, trace
    assert not notify.send("faceclf night crashed: z", "body")  # a state hook's: logged, not raised

    assert "HTTP Request: POST" in caplog.text and "answered HTTP 404" in caplog.text  # the lines are there, masked
    assert not shows(caplog.text, secret), caplog.text


def test_an_apprise_url_that_fails_is_an_error_without_the_url(missing: Receiver, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # apprise logs the URL it loads and posts to at DEBUG
    secret = token()
    monkeypatch.setenv(notify.URL_ENV, missing.url.replace("/night", f"/hooks/{secret}"))
    with pytest.raises(notify.NotificationFailed, match="did not take the message.*404") as failed:
        notify.deliver("faceclf night rejected: y", "body")
    assert len(missing.received) == 1 and missing.received[0]["title"] == "faceclf night rejected: y"
    assert not shows("".join(traceback.format_exception(failed.value)), secret)
    assert "JSON POST URL" in caplog.text and not shows(caplog.text, secret), caplog.text


def test_a_url_that_is_no_webhook_is_refused_without_repeating_it() -> None:
    secret = token()
    for url in (f"hooks.example.com/{secret}", f"ftp://hooks.example.com/{secret}", f"https:///{secret}"):
        with pytest.raises(ValueError, match="must be an http:// or https:// URL") as refused:
            notify.save_block(url)
        assert not shows(str(refused.value), secret)


def test_failed_rejected_and_nothing_new_nights(prefect_api, webhook: Receiver, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.train import train

    monkeypatch.setenv(notify.URL_ENV, webhook.url)
    bucket, kw = tmp_path / "bucket", {"face_dir": str(tmp_path / "face"), "runs_dir": str(tmp_path / "runs")}
    (bucket / "incoming").mkdir(parents=True)

    # Failed: nothing to train on (an empty incoming/) -> the flow run fails -> one notification.
    with pytest.raises(ValueError, match="no images to train on"):
        train(**grouped(bucket=str(bucket), **kw, **LENIENT, **FAST))
    assert len(webhook.received) == 1, webhook.received
    failed = webhook.received[0]
    assert failed["path"] == "/night" and failed["title"].startswith("faceclf night failed")
    assert "no images to train on" in failed["message"] and "champion is unchanged" in failed["message"]

    # Promoted: nothing sent. Then the same data again: nothing new, nothing sent.
    put_local_faces(bucket, tmp_path / "gen", 60, 1)
    first = train(**grouped(bucket=str(bucket), **kw, **LENIENT, **FAST))
    assert first["promoted"], first["reasons"]
    assert train(**grouped(bucket=str(bucket), **kw, **LENIENT, **FAST))["skipped"]
    assert len(webhook.received) == 1

    # Rejected: new images, but a candidate that must be significantly better than a champion that clears the bars
    # -> one notification with the decision's sentence.
    put_local_faces(bucket, tmp_path / "gen2", 5, 4)
    night = train(**grouped(bucket=str(bucket), **kw, **FAST, **LENIENT, require_improvement=True))
    assert not night["promoted"] and len(webhook.received) == 2
    rejected = webhook.received[1]
    assert rejected["title"] == f"faceclf night rejected: {night['version']}"
    assert rejected["message"].startswith("Rejected because")

    # Rejected again: two in a row is a stuck pipeline, said in the subject and first in the report.
    put_local_faces(bucket, tmp_path / "gen3", 5, 5)
    again = train(**grouped(bucket=str(bucket), **kw, **FAST, **LENIENT, require_improvement=True))
    assert not again["promoted"] and len(webhook.received) == 3
    stuck = webhook.received[2]
    assert stuck["title"] == f"faceclf pipeline stuck: night {again['version']} rejected"
    assert stuck["message"].startswith(f"The pipeline is stuck: 2 nights rejected in a row ({night['version']} to "
                                       f"{again['version']}); champion {first['version']} stays")
    report = (bucket / "models" / "face" / again["version"] / "report.md").read_text().splitlines()
    assert report[2] == "> **The pipeline is stuck:**" and report[3].startswith("> - 2 nights rejected in a row")


def test_the_block_saved_by_the_documented_command_is_used(prefect_api, webhook: Receiver,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL

    monkeypatch.delenv(notify.URL_ENV, raising=False)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the test server, as a worker would have it
    http_url = webhook.url.replace("json://", "http://")
    out = subprocess.run([sys.executable, "-m", "flows.notify", http_url, "--allow-private-urls"], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1], env=env, timeout=120)
    assert out.returncode == 0 and "saved notification block 'custom-webhook/faceclf-notify'" in out.stdout, out.stderr
    assert "/night" not in out.stdout + out.stderr  # the block's slug only, never the URL
    assert notify.send("faceclf night failed: test", "body text")
    assert webhook.received[-1]["title"] == "faceclf night failed: test" and webhook.received[-1]["message"] == "body text"
    # The URL from stdin ("-"): out of the shell history and the process list.
    secret = token()
    out = subprocess.run([sys.executable, "-m", "flows.notify", "-", "--name", "from-stdin", "--allow-private-urls"],
                         input=f"{webhook.http}/hooks/{secret}\n", capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], env=env, timeout=120)
    assert out.returncode == 0 and "saved notification block 'custom-webhook/from-stdin'" in out.stdout, out.stderr
    assert not shows(out.stdout + out.stderr, secret)
    monkeypatch.setenv(notify.BLOCK_ENV, "custom-webhook/from-stdin")
    assert notify.deliver("via stdin", "b") and webhook.received[-1]["path"] == f"/hooks/{secret}"
    monkeypatch.setenv(notify.BLOCK_ENV, "custom-webhook/no-such-block")
    assert notify.notifier() is None and not notify.send("x", "y")  # nothing configured: logged, not raised
