"""A person in the loop: with approval=true a night whose candidate passed the gate pauses on a real Prefect
server before champion.json moves; an approval (flows.approve, as the UI's resume form) promotes it, a
rejection or no answer in time keeps the champion."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from conftest import FAST, grouped, LENIENT, put_local_faces

from faceclf.store import registry
from faceclf.store.objects import LocalStore


def paused_run_id(timeout: float = 180) -> str:
    """The id of the flow run that is paused now (waits for it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            paused = [r for r in client.read_flow_runs() if r.state and r.state.type == StateType.PAUSED]
        if paused:
            return str(paused[0].id)
        time.sleep(0.5)
    raise AssertionError("no flow run paused")


def night_in_thread(**params: Any) -> tuple[threading.Thread, dict]:
    """Run the train flow in a thread (it blocks while paused); its result lands in the returned dict."""
    from flows.train import train

    out: dict = {}

    def run() -> None:
        try:
            out["result"] = train(**grouped(**params))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_a_night_waits_for_a_person_and_a_timeout_rejects(prefect_api, tmp_path: Path) -> None:
    from flows.approve import main as approve

    bucket = tmp_path / "bucket"
    store = LocalStore(bucket)
    kw = {"bucket": str(bucket), "face_dir": str(tmp_path / "face"), "runs_dir": str(tmp_path / "runs"),
          **LENIENT, **FAST, "approval": True, "approval_timeout": 300}
    put_local_faces(bucket, tmp_path / "gen", 60, 1)

    # Night 1 passes the gate, then waits; champion.json does not exist until a person approves.
    thread, out = night_in_thread(**kw)
    run_id = paused_run_id()
    assert registry.read_champion(store) is None
    approve([run_id, "--approve", "--comment", "checked the confusion matrix"])
    thread.join(timeout=300)
    night1 = out["result"]
    assert night1["promoted"] and registry.read_champion(store)["version"] == night1["version"]
    decision = json.loads(store.get_bytes(registry.version_key(night1["version"], "decision.json")))
    assert decision["approval"] == {"approved": True, "comment": "checked the confusion matrix", "timed_out": False}
    assert decision["why"].endswith("Approved by a person: checked the confusion matrix.")

    # Night 2 (new images, force a candidate): a person rejects it with a reason; the champion stays.
    put_local_faces(bucket, tmp_path / "gen2", 4, 2)
    thread, out = night_in_thread(**kw)
    approve([paused_run_id(), "--reject", "--comment", "without_mask looks worse on the new camera"])
    thread.join(timeout=300)
    night2 = out["result"]
    assert not night2["promoted"] and night2["reasons"][-1] == "rejected by a person: without_mask looks worse on the new camera"
    assert registry.read_champion(store)["version"] == night1["version"]

    # Night 3: nobody answers within the timeout: rejected, champion unchanged.
    put_local_faces(bucket, tmp_path / "gen3", 4, 3)
    night3 = night_in_thread(**{**kw, "approval_timeout": 3})
    night3[0].join(timeout=300)
    result = night3[1]["result"]
    assert not result["promoted"] and result["reasons"][-1] == "no approval within 3 s", result["reasons"]
    assert registry.read_champion(store)["version"] == night1["version"]
