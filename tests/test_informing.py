"""A night publishes what it earned: each step that only informs (plots, artifacts, presigned links, the drift
check and section, the rejection notification) is broken in turn; the night still promotes (or publishes its
rejection), and the failure is a warning at the top of report.md and in the log."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from conftest import FAST, grouped, upload_faces

from faceclf.inform import Warnings, with_warnings
from faceclf.store import registry
from faceclf.store.objects import open_store

# A first night (no champion) that any trained candidate passes: the point is what breaks after training.
NIGHT = {**FAST, "epochs": 2, "min_accuracy": 0.0, "min_class_accuracy": 0.0}

BROKEN = {  # informing step -> (the attribute that raises, the start of the warning it must leave)
    "learning curves": ("faceclf.training.run.plot_history", "learning curves plot (history.png) failed"),
    "confusion matrix": ("faceclf.training.run.plot_confusion", "confusion matrix plot (confusion_matrix.png) failed"),
    "versions plot": ("faceclf.nightly.night.plot_versions", "versions plot (versions.png) failed"),
    "drift check": ("faceclf.nightly.night.measure", "drift check failed"),
    "drift section": ("faceclf.nightly.night.drift_markdown", "drift section of the report failed"),
    "progress artifact": ("flows.train.create_progress_artifact", "training progress artifact failed"),
    "progress update": ("flows.train.update_progress_artifact", "training progress artifact failed"),
    "table artifact": ("flows.train.create_table_artifact", "per-class accuracy table artifact failed"),
    "link artifact": ("flows.train.create_link_artifact", "model link artifact failed"),
    "image artifacts": ("flows.train.create_image_artifact", "learning curves image artifact failed"),
    "presigned links": ("faceclf.store.s3.S3Store.link", "presigned link to history.png failed"),
    "report artifact": ("flows.train.create_markdown_artifact", "night report artifact failed"),
}


def break_it(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """Replace ``target`` (module.attr or module.Class.attr) with a function that raises."""
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("broken on purpose")

    module, _, attr = target.rpartition(".")
    try:
        owner: object = importlib.import_module(module)
    except ModuleNotFoundError:
        module, _, cls = module.rpartition(".")
        owner = getattr(importlib.import_module(module), cls)
    assert hasattr(owner, attr), target
    monkeypatch.setattr(owner, attr, broken)


def report_md(store, version: str) -> str:  # noqa: ANN001 - a Store
    return store.get_bytes(registry.version_key(version, "report.md")).decode()


def flow_log(flow_run_id: object) -> str:
    """The flow run's log lines, as the Prefect UI shows them, read back from the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # log records reach the API in batches: send what is still queued
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


@pytest.mark.parametrize("step", list(BROKEN))
def test_a_broken_informing_step_is_a_warning_and_the_champion_still_moves(
        step: str, prefect_api, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.train import train

    target, warning = BROKEN[step]
    break_it(monkeypatch, target)
    upload_faces(bucket, tmp_path / "faces", per_class=30, seed=5)
    state = train(**grouped(bucket=bucket, face_dir=str(tmp_path / "face"), runs_dir=str(tmp_path / "runs"), **NIGHT,
                  return_state=True))
    result = state.result()
    store = open_store(f"s3://{bucket}")
    assert result["promoted"], result["reasons"]
    assert registry.read_champion(store)["version"] == result["version"]
    assert registry.read_latest(store)["version"] == result["version"]
    assert [w for w in result["warnings"] if w.startswith(warning)], result["warnings"]
    report = report_md(store, result["version"])
    title, blank, head = report.splitlines()[:3]
    assert title == f"# faceclf night: model {result['version']}" and blank == ""
    assert head.startswith("> **Warning:**") and f"> - {warning}: RuntimeError: broken on purpose" in report
    assert "**Decision: PROMOTED**" in report
    assert "failed informing step(s): " + warning in flow_log(state.state_details.flow_run_id)


def test_a_rejection_notification_that_fails_is_a_warning_in_the_report(
        prefect_api, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.notify
    from flows.train import train

    class Unreachable:
        def notify(self, body: str, subject: str) -> None:
            raise ConnectionError("webhook unreachable")

    monkeypatch.setattr(flows.notify, "notifier", Unreachable)
    upload_faces(bucket, tmp_path / "faces", per_class=30, seed=5)
    result = train(**grouped(bucket=bucket, face_dir=str(tmp_path / "face"), runs_dir=str(tmp_path / "runs"),
                   **{**NIGHT, "min_accuracy": 1.0, "epochs": 1, "learning_rate": 1e-7}))
    store = open_store(f"s3://{bucket}")
    assert not result["promoted"] and registry.read_champion(store) is None
    decision = json.loads(store.get_bytes(registry.version_key(result["version"], "decision.json")))
    assert decision["promote"] is False
    assert "> - rejection notification failed: ConnectionError: webhook unreachable" in report_md(store, result["version"])
    assert registry.read_latest(store)["version"] == result["version"]


def test_warnings_keep_each_message_once_and_never_catch_an_interrupt() -> None:
    w = Warnings(["a failed: X"])
    assert w.attempt("b", lambda: 1 / 0) is None and w.attempt("b", lambda: 1 / 0) is None
    assert w.attempt("c", lambda x: x + 1, 1) == 2
    assert w.items == ["a failed: X", "b failed: ZeroDivisionError: division by zero"]
    with pytest.raises(KeyboardInterrupt):
        w.attempt("d", lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert with_warnings("# title\n\nbody", []) == "# title\n\nbody"
    assert with_warnings("# title\n\nbody", w.items).splitlines()[:4] == [
        "# title", "", "> **Warning:** 2 step(s) that only inform failed; the night went on without them.",
        "> - a failed: X"]
