"""Real local services: a moto S3 server, and a Prefect server + process worker running deployments
from a prefect.yaml laid out like ours (flows/ + deployments/prefect.yaml, deployed from the root)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pytest

from faceclf.devtools.services import (
    api_request,
    moto_s3_server,
    prefect_cli,
    prefect_server,
    prefect_worker,
    read_deployment,
    run_deployment,
    stop_group,
    wait_for_flow_run,
)

# The toy flows: `train` writes what it saw (greeting, working directory, start/end) to `out`.
TOY_FLOWS = '''
import json
import os
import time
from pathlib import Path

from prefect import flow, task


@task
def greet(name: str) -> str:
    return f"hello {name}"


@flow(name="train")
def train(name: str = "world", out: str = "", sleep: float = 0.0) -> str:
    started = time.time()
    message = greet(name)
    time.sleep(sleep)
    if out:
        Path(out).write_text(json.dumps({"message": message, "cwd": os.getcwd(),
                                         "started": started, "ended": time.time()}))
    return message


@flow(name="score")
def score(source: str = "face") -> str:
    return f"scored {source}"
'''

# Mirrors deployments/prefect.yaml: entrypoints are relative to the directory `prefect deploy` runs in
# (the project root), the pull step points the worker's flow-run process at the checkout it was given.
TOY_PREFECT_YAML = '''
name: faceclf-toy
prefect-version: 3.9.1

build: null
push: null
pull:
  - prefect.deployments.steps.set_working_directory:
      directory: "{{ $FACECLF_ROOT }}"

deployments:
  - name: face
    entrypoint: flows/hello.py:train
    parameters:
      name: nightly
    work_pool:
      name: faceclf
    concurrency_limit:
      limit: 1
      collision_strategy: ENQUEUE
    schedules:
      - cron: "0 2 * * *"
        timezone: UTC
        active: true
  - name: face
    entrypoint: flows/hello.py:score
    work_pool:
      name: faceclf
'''


def test_moto_s3_server_answers_and_stops(tmp_path: Path) -> None:
    with moto_s3_server(tmp_path / "moto.log") as url:
        with urllib.request.urlopen(url, timeout=5) as resp:  # S3 ListBuckets
            assert resp.status == 200 and b"ListAllMyBucketsResult" in resp.read()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


def test_stop_group_kills_a_stubborn_leader_and_its_detached_children(tmp_path: Path) -> None:
    # A leader that ignores SIGTERM and a child in a session of its own (as Prefect starts flow runs).
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(60)
    """)
    leader = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    stop_group(leader, timeout=0.5)
    assert leader.returncode == -signal.SIGKILL
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split(")")[1][:3]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("project")
    (root / "flows").mkdir()
    (root / "deployments").mkdir()
    (root / "flows" / "hello.py").write_text(TOY_FLOWS)
    (root / "deployments" / "prefect.yaml").write_text(textwrap.dedent(TOY_PREFECT_YAML))
    return root


@pytest.fixture(scope="module")
def deployed(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A Prefect server with the `faceclf` process pool and the toy deployments, plus a worker on it."""
    state = tmp_path_factory.mktemp("prefect")
    home = state / "home"
    # An enqueued run is retried after this wait (default 30 s); short, so the concurrency test is quick.
    fast_retry = {"PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2"}
    with prefect_server(home, state / "server.log", env=fast_retry) as api:
        prefect_cli(["work-pool", "create", "faceclf", "--type", "process"], api, home)
        prefect_cli(["deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], api, home, cwd=project)
        with prefect_worker("faceclf", api, home, cwd=state, env={"FACECLF_ROOT": str(project)},
                            log_path=state / "worker.log") as worker:
            yield {"api": api, "home": home, "state": state, "worker": worker}


def test_deploy_reads_back_schedule_concurrency_and_pull_step(deployed: dict) -> None:
    train = read_deployment(deployed["api"], "train/face")
    [schedule] = train["schedules"]
    assert schedule["active"] and schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == "UTC"
    # 3.x keeps a deployment's limit in a global concurrency limit; `concurrency_limit` reads back None.
    assert train["global_concurrency_limit"]["limit"] == 1
    assert train["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert train["work_pool_name"] == "faceclf" and train["parameters"] == {"name": "nightly"}
    # The env placeholder is stored as written and resolved by the flow-run process, not at deploy time.
    assert train["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $FACECLF_ROOT }}"}}]

    score = read_deployment(deployed["api"], "score/face")
    assert score["schedules"] == [] and score["global_concurrency_limit"] is None


def test_scheduler_creates_the_nightly_runs(deployed: dict) -> None:
    """The scheduler fills in the coming 02:00 UTC runs (the run tests below then show they do not
    hold up manual runs: they are SCHEDULED, not holding the concurrency slot)."""
    train = read_deployment(deployed["api"], "train/face")
    query = {"deployments": {"id": {"any_": [train["id"]]}},
             "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}
    deadline = time.monotonic() + 20
    scheduled: list = []
    while time.monotonic() < deadline and not scheduled:
        scheduled = [r for r in api_request(deployed["api"], "POST", "flow_runs/filter", query)
                     if r.get("auto_scheduled")]
        time.sleep(0.5)
    log = (deployed["state"] / "server.log").read_text(errors="replace")
    assert scheduled, "no scheduled runs were created; server errors:\n" + "\n".join(
        line for line in log.splitlines() if "Error" in line or "ERROR" in line)[-3000:]
    times = {datetime.fromisoformat(r["expected_start_time"].replace("Z", "+00:00")) for r in scheduled}
    assert all((t.hour, t.minute, t.utcoffset().total_seconds()) == (2, 0, 0) for t in times)


def test_deployment_run_completes_on_the_worker_in_the_checkout(deployed: dict, project: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    run_id = run_deployment(deployed["api"], "train/face", {"name": "x", "out": str(out)})
    run = wait_for_flow_run(deployed["api"], run_id, timeout=60)
    assert run["state_type"] == "COMPLETED", _worker_log(deployed)
    assert run["parameters"] == {"name": "x", "out": str(out)}
    seen = json.loads(out.read_text())
    assert seen["message"] == "hello x"
    assert Path(seen["cwd"]).resolve() == project.resolve()  # the pull step ran it from the checkout


def test_cli_deployment_run_with_param(deployed: dict, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    cli = prefect_cli(["deployment", "run", "train/face", "--param", f"out={json.dumps(str(out))}"],
                      deployed["api"], deployed["home"])
    [run_id] = [line.split("UUID:")[1].strip() for line in cli.stdout.splitlines() if "UUID:" in line]
    run = wait_for_flow_run(deployed["api"], run_id, timeout=60)
    assert run["state_type"] == "COMPLETED", _worker_log(deployed)
    assert json.loads(out.read_text())["message"] == "hello nightly"  # the deployment's default


def test_concurrency_limit_serialises_runs(deployed: dict, tmp_path: Path) -> None:
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    ids = [run_deployment(deployed["api"], "train/face", {"out": str(o), "sleep": 2}) for o in outs]
    runs = [wait_for_flow_run(deployed["api"], i, timeout=60) for i in ids]
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"], _worker_log(deployed)
    a, b = sorted((json.loads(o.read_text()) for o in outs), key=lambda s: s["started"])
    assert b["started"] >= a["ended"], "two runs of train/face overlapped despite concurrency_limit 1"


def _worker_log(deployed: dict) -> str:
    """The worker's log tail, for assertion messages."""
    proc: subprocess.Popen = deployed["worker"]
    alive = "alive" if proc.poll() is None else f"exited {proc.returncode}"
    return f"worker {alive}; log tail:\n" + (deployed["state"] / "worker.log").read_text(errors="replace")[-4000:]
