"""Real local services for the demo and the tests, each a subprocess on 127.0.0.1: a moto S3 server,
and a Prefect server, work pool worker and deployments driven through the prefect CLI and REST API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import psutil

# Dummy credentials for the local endpoint only: moto accepts any, and they are not secrets.
LOCAL_S3_ENV = {"AWS_ACCESS_KEY_ID": "faceclf-local", "AWS_SECRET_ACCESS_KEY": "faceclf-local",
                "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None,
                  require_ok: bool = False) -> None:
    """Poll ``url`` until it answers (any HTTP status, or 200 with ``require_ok``).

    Raises RuntimeError if ``proc`` exits first, TimeoutError after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server process for {url} exited with code {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200 or not require_ok:
                    return
        except urllib.error.HTTPError:
            if not require_ok:
                return  # it answered
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer{' 200' if require_ok else ''} within {timeout:.0f}s")


@contextlib.contextmanager
def moto_s3_server(log_path: Path | None = None) -> Iterator[str]:
    """Run moto's S3 server on 127.0.0.1:<free port> in a subprocess; yield its endpoint URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with _popen_group(argv, {**os.environ, **LOCAL_S3_ENV}, None, log_path) as proc:
        wait_for_http(url, 60, proc)
        yield url


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


# --- Prefect: a real local server, work pool, worker and deployments, driven from outside ---------
# faceclf knows nothing of Prefect (design rule 1), so these helpers never import it: they start the
# `prefect` CLI in subprocesses and talk to the server's REST API over plain HTTP.

TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})

# Keep local runs quiet, offline and non-interactive: no analytics/telemetry, no prompts, plain output.
PREFECT_QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_CLI_PROMPT": "false",
    "PREFECT_CLI_COLORS": "false",
    "PREFECT_CLI_WRAP_LINES": "false",
}


def prefect_command(*args: str) -> list[str]:
    """The argv for ``prefect ARGS`` run by this interpreter (so the installed prefect is the one used)."""
    return [sys.executable, "-m", "prefect", *args]


def prefect_env(api_url: str, home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a Prefect child process that talks to ``api_url`` and keeps its state in ``home``.

    Every inherited PREFECT_* variable is dropped first, so the user's own profile, API key or
    database can neither leak in nor be touched; PREFECT_HOME holds the profiles file and the SQLite DB.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_QUIET_ENV)
    env.update({"PREFECT_API_URL": api_url, "PREFECT_HOME": str(home)})
    env.update(extra or {})
    return env


def _descendants(pid: int) -> list[psutil.Process]:
    """Every live descendant of ``pid`` (empty if it is gone). A psutil.Process remembers its create
    time, so signalling it later cannot hit an unrelated process that reused the pid."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill_survivors(processes: list[psutil.Process]) -> None:
    """SIGKILL each of ``processes`` that is still running (is_running() also rules out pid reuse)."""
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running():
                p.kill()


def stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a process started with ``start_new_session=True``, its process group and its descendants.

    SIGTERM to the group lets the server/worker shut down cleanly (a worker stops its flow runs);
    whatever is still alive after ``timeout`` gets SIGKILL. Descendants are listed first and swept
    too, because Prefect starts each flow-run process in a process group of its own.
    """
    descendants = _descendants(proc.pid)

    def signal_group(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass  # the whole group is already gone

    signal_group(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    signal_group(signal.SIGKILL)  # stragglers: children that ignored SIGTERM or outlived the leader
    proc.wait()
    _kill_survivors(descendants)


# The server answers 503 to errors a client may retry (e.g. SQLite busy); Prefect's own client
# retries these three codes, so we do too.
RETRY_STATUSES = frozenset({429, 502, 503})


def api_request(api_url: str, method: str, path: str, body: object | None = None, timeout: float = 30.0,
                retries: int = 5) -> Any:
    """One JSON call to the Prefect REST API (``path`` relative to ``api_url``); raise with the server's reply.

    429/502/503 answers are retried ``retries`` times with a growing pause (0.5 s, 1 s, 2 s...).
    """
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{api_url.rstrip('/')}/{path.lstrip('/')}", data=data, method=method,
                                 headers={"Content-Type": "application/json", "Accept": "application/json"})
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
            return json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            reply = exc.read().decode(errors="replace")
            if exc.code not in RETRY_STATUSES or attempt == retries:
                raise RuntimeError(f"{method} {path} -> HTTP {exc.code}: {reply}") from exc
        time.sleep(min(0.5 * 2 ** attempt, 5.0))


def wait_for_prefect_api(api_url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``GET {api_url}/health`` until it answers 200 (the server has migrated its DB and serves)."""
    wait_for_http(f"{api_url}/health", timeout, proc, require_ok=True)


@contextlib.contextmanager
def _popen_group(argv: list[str], env: dict[str, str], cwd: Path | None,
                 log_path: Path | None) -> Iterator[subprocess.Popen]:
    """Start ``argv`` in its own process group (output to ``log_path`` or discarded); stop the group on exit."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True)
        try:
            yield proc
        finally:
            stop_group(proc)
    finally:
        if log_path:
            out.close()


@contextlib.contextmanager
def prefect_server(home: Path, log_path: Path | None = None, ui: bool = False,
                   env: dict[str, str] | None = None, timeout: float = 90.0) -> Iterator[str]:
    """Run ``prefect server start`` on 127.0.0.1:<free port> with SQLite in ``home``; yield the API URL.

    The UI is off by default (it adds about a second to start and the tests do not need it); the
    scheduler and the other services run, so schedules create their runs as in production.
    ``env`` adds server settings (e.g. a shorter PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS).
    """
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = prefect_env(api_url, home, {
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_UI_ENABLED": "true" if ui else "false",
        "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true",  # log what is behind a 503 (e.g. SQLite busy)
        **(env or {}),
    })
    argv = prefect_command("server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off",
                           "--ui" if ui else "--no-ui")
    with _popen_group(argv, env, home, log_path) as proc:
        wait_for_prefect_api(api_url, timeout, proc)
        yield api_url


@contextlib.contextmanager
def prefect_worker(pool: str, api_url: str, home: Path, cwd: Path, env: dict[str, str] | None = None,
                   log_path: Path | None = None, poll_seconds: float = 1.0) -> Iterator[subprocess.Popen]:
    """Run a process-type worker for work pool ``pool`` in ``cwd``; stop it (and its flow runs) on exit.

    Flow runs are child processes of the worker and inherit its environment (``env`` is added to it).
    ``poll_seconds`` shortens the default 10 s wait between polls so a manual run starts promptly.
    """
    child_env = prefect_env(api_url, home, {"PREFECT_WORKER_QUERY_SECONDS": str(poll_seconds),
                                            **(env or {})})
    argv = prefect_command("worker", "start", "--pool", pool, "--type", "process",
                           "--no-create-pool-if-not-found", "--install-policy", "never")
    with _popen_group(argv, child_env, cwd, log_path) as proc:
        yield proc


def prefect_cli(args: list[str], api_url: str, home: Path, cwd: Path | None = None,
                env: dict[str, str] | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run one ``prefect --no-prompt ARGS`` command against ``api_url``; raise RuntimeError with its output if it fails.

    ``cwd`` matters for ``deploy``: prefect.yaml entrypoints are resolved relative to it (the project root).
    Past ``timeout`` seconds subprocess.TimeoutExpired propagates.
    """
    argv = prefect_command("--no-prompt", *args)
    proc = subprocess.run(argv, cwd=cwd, env=prefect_env(api_url, home, env), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"`prefect {' '.join(args)}` exited with code {proc.returncode}:\n"
                           f"{proc.stdout}\n{proc.stderr}")
    return proc


def read_deployment(api_url: str, name: str) -> dict:
    """The deployment ``FLOW/DEPLOYMENT`` as the server holds it: schedules, pull_steps, parameters...

    Its concurrency limit reads back as ``global_concurrency_limit.limit`` (with ``concurrency_options``);
    the top-level ``concurrency_limit`` field is deprecated and always None in Prefect 3.
    """
    flow, sep, deployment = name.partition("/")
    if not sep or not flow or not deployment:
        raise ValueError(f"deployment name must be FLOW/DEPLOYMENT, e.g. 'train/face'; got {name!r}")
    return api_request(api_url, "GET", f"deployments/name/{urllib.parse.quote(flow)}/{urllib.parse.quote(deployment)}")


def run_deployment(api_url: str, name: str = "train/face", parameters: dict | None = None) -> str:
    """Create a flow run of deployment ``FLOW/DEPLOYMENT`` now; return its id.

    Goes through the REST API (the same two calls `prefect deployment run` makes) rather than the CLI:
    parameters travel as typed JSON and the id comes back as data, not parsed from console output.
    Parameters not given keep the deployment's defaults (the server merges them).
    """
    deployment = read_deployment(api_url, name)
    run = api_request(api_url, "POST", f"deployments/{deployment['id']}/create_flow_run",
                      {"parameters": parameters or {}})
    return run["id"]


def set_deployment_parameters(api_url: str, name: str, parameters: dict) -> None:
    """Make ``parameters`` the default parameters of deployment ``FLOW/DEPLOYMENT``: what its scheduled and
    triggered runs get (a run started by hand may still override them)."""
    deployment = read_deployment(api_url, name)
    api_request(api_url, "PATCH", f"deployments/{deployment['id']}", {"parameters": parameters})


def deployment_runs(api_url: str, name: str) -> list[dict]:
    """Every flow run of deployment ``FLOW/DEPLOYMENT`` (any state, the cron's future ones included), oldest
    first by creation."""
    deployment = read_deployment(api_url, name)
    return api_request(api_url, "POST", "flow_runs/filter", {
        "deployments": {"id": {"any_": [deployment["id"]]}}, "sort": "START_TIME_ASC", "limit": 200}) or []


def started_runs(api_url: str, name: str) -> list[dict]:
    """The runs of ``FLOW/DEPLOYMENT`` that are not merely waiting for their scheduled time: started by hand,
    by a trigger, or a schedule whose time came (the cron's future nights left out), oldest first."""
    runs = [r for r in deployment_runs(api_url, name)
            if not (r.get("state_type") == "SCHEDULED" and r.get("auto_scheduled")
                    and (r.get("expected_start_time") or "") > time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()))]
    return sorted(runs, key=lambda r: r["created"])


def wait_for_new_run(api_url: str, name: str, known: set[str], timeout: float = 60.0, poll: float = 0.5) -> dict:
    """The first run of ``FLOW/DEPLOYMENT`` whose id is not in ``known`` (a run an automation creates appears a
    few seconds after its event); TimeoutError naming the deployment if none appears within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [r for r in started_runs(api_url, name) if r["id"] not in known]
        if new:
            return new[0]
        time.sleep(poll)
    raise TimeoutError(f"no new flow run of {name} within {timeout:.0f}s")


def pause_deployment(api_url: str, name: str) -> None:
    """Pause the schedules of deployment ``FLOW/DEPLOYMENT``; the server deletes its runs already scheduled.
    Runs started by hand (`prefect deployment run`, the UI's Run button) still run."""
    deployment = read_deployment(api_url, name)
    api_request(api_url, "POST", f"deployments/{deployment['id']}/pause_deployment")


def prefect_ui_url(api_url: str) -> str:
    """The home page of the Prefect UI that the server at ``api_url`` opens by default, from its /ui-settings:
    Prefect 3.9 serves its V2 UI under /v2/ (the default) and the V1 UI at / (where Prefect's own links, as
    in the worker's log, point). Where the UI is off, or the answer is not understood: the root, /."""
    root = api_url.rstrip("/").removesuffix("/api")
    try:
        with urllib.request.urlopen(f"{root}/ui-settings", timeout=10) as resp:
            settings = json.loads(resp.read())
        base = settings[f"{settings['default_ui']}_base_url"] or "/"
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        base = "/"
    base = base.strip("/")
    return f"{root}/{base}/" if base else f"{root}/"


def flow_run_ui_url(ui_url: str, flow_run_id: str) -> str:
    """The page of one flow run (graph, logs, artifacts) in the UI whose home is ``ui_url``: both of Prefect
    3.9's UIs route it as runs/flow-run/<id> (V1 also redirects its older flow-runs/flow-run/<id>)."""
    return f"{ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}"


def wait_for_flow_run(api_url: str, flow_run_id: str, timeout: float = 300.0, poll: float = 0.5) -> dict:
    """Poll the flow run until its state is terminal (COMPLETED, FAILED, CRASHED, CANCELLED); return its JSON."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        run = api_request(api_url, "GET", f"flow_runs/{flow_run_id}")
        state = run.get("state_type") or (run.get("state") or {}).get("type")
        if state in TERMINAL_STATES:
            return run
        time.sleep(poll)
    raise TimeoutError(f"flow run {flow_run_id} still {state} after {timeout:.0f}s")
