"""A failed or rejected night notifies a real HTTP webhook on 127.0.0.1, through Apprise, from a real Prefect
server's flow runs; a night with nothing new sends nothing; the URL comes from the environment or from a
block saved by `python3 -m flows.notify URL`."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FAST, LENIENT, put_local_faces

from flows import notify


class Receiver:
    """A webhook on 127.0.0.1: every POST's JSON body, in order."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append({"path": self.path, **json.loads(body or b"{}")})
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"json://127.0.0.1:{self.server.server_address[1]}/night"


@pytest.fixture()
def webhook() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


def test_failed_rejected_and_nothing_new_nights(prefect_api, webhook: Receiver, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.train import train

    monkeypatch.setenv(notify.URL_ENV, webhook.url)
    bucket, kw = tmp_path / "bucket", {"face_dir": str(tmp_path / "face"), "runs_dir": str(tmp_path / "runs")}
    (bucket / "incoming").mkdir(parents=True)

    # Failed: nothing to train on (an empty incoming/) -> the flow run fails -> one notification.
    with pytest.raises(ValueError, match="no images to train on"):
        train(bucket=str(bucket), **kw, **LENIENT, **FAST)
    assert len(webhook.received) == 1, webhook.received
    failed = webhook.received[0]
    assert failed["path"] == "/night" and failed["title"].startswith("faceclf night failed")
    assert "no images to train on" in failed["message"] and "champion is unchanged" in failed["message"]

    # Promoted: nothing sent. Then the same data again: nothing new, nothing sent.
    put_local_faces(bucket, tmp_path / "gen", 60, 1)
    first = train(bucket=str(bucket), **kw, **LENIENT, **FAST)
    assert first["promoted"], first["reasons"]
    assert train(bucket=str(bucket), **kw, **LENIENT, **FAST)["skipped"]
    assert len(webhook.received) == 1

    # Rejected: new images, but a candidate that must be significantly better than a champion that clears the bars
    # -> one notification with the decision's sentence.
    put_local_faces(bucket, tmp_path / "gen2", 5, 4)
    night = train(bucket=str(bucket), **kw, **FAST, **LENIENT, require_improvement=True)
    assert not night["promoted"] and len(webhook.received) == 2
    rejected = webhook.received[1]
    assert rejected["title"] == f"faceclf night rejected: {night['version']}"
    assert rejected["message"].startswith("Rejected because")

    # Rejected again: two in a row is a stuck pipeline, said in the subject and first in the report.
    put_local_faces(bucket, tmp_path / "gen3", 5, 5)
    again = train(bucket=str(bucket), **kw, **FAST, **LENIENT, require_improvement=True)
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
    assert notify.send("faceclf night failed: test", "body text")
    assert webhook.received[-1]["title"] == "faceclf night failed: test" and webhook.received[-1]["message"] == "body text"
    monkeypatch.setenv(notify.BLOCK_ENV, "custom-webhook/no-such-block")
    assert notify.notifier() is None and not notify.send("x", "y")  # nothing configured: logged, not raised
