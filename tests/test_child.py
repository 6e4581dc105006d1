"""faceclf.child: one call in a fresh spawned process, its result or its error back here, a dead child
named by how it died (the decoded cache's big decode runs this way: tests/test_cache.py)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from faceclf.child import ChildDied, describe_exit, run_in_child


def test_a_child_returns_its_result_and_raises_its_errors_here() -> None:
    assert run_in_child(sorted, [3, 1, 2]) == [1, 2, 3]
    with pytest.raises(ValueError, match="invalid literal for int"):
        run_in_child(int, "not a number")


def test_a_child_that_dies_is_named_by_its_exit() -> None:
    with pytest.raises(ChildDied, match="exited with code 3") as died:
        run_in_child(os._exit, 3)
    assert died.value.exitcode == 3
    with pytest.raises(ChildDied, match="was killed by SIGABRT"):
        run_in_child(os.abort)
    assert describe_exit(-signal.SIGTERM) == "was killed by SIGTERM"


# ---- the caller's __main__ never runs in the child, however Python was started ------------------------------

REPO = Path(__file__).resolve().parents[1]

# A caller without the __main__ guard: each run of this module adds a line to the counter file. Under
# multiprocessing's "spawn" the child re-ran it (two lines, and a child that started a child of its own);
# from standard input the child could not start at all (FileNotFoundError: '<stdin>').
GUARDLESS = """\
import os
with open(os.environ["COUNTER"], "a") as counter:
    counter.write("ran\\n")
from faceclf.child import describe_exit, run_in_child
print("result:", run_in_child(sorted, [3, 1, 2]), run_in_child(describe_exit, -9), flush=True)
run_in_child(print, "printed by the child")  # flushed when the child exits
"""


def run_python(flags: list[str], tmp_path: Path, stdin: str | None = None,
               cwd: Path | None = None) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """``python3 FLAGS`` with a fresh counter file; the finished process and the counter's lines."""
    counter = tmp_path / "counter.txt"
    counter.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, *flags], input=stdin, capture_output=True, text=True, timeout=120,
                          cwd=cwd or tmp_path, env={**os.environ, "COUNTER": str(counter)})
    return done, counter.read_text().splitlines() if counter.exists() else []


@pytest.mark.parametrize("how", ["script", "stdin", "-c", "no site, faceclf on sys.path by hand"])
def test_a_caller_without_the_main_guard_runs_once(how: str, tmp_path: Path) -> None:
    script = tmp_path / "night.py"
    script.write_text(GUARDLESS)
    if how == "script":
        done, lines = run_python([str(script)], tmp_path)
    elif how == "stdin":
        done, lines = run_python(["-"], tmp_path, stdin=GUARDLESS)
    elif how == "-c":
        done, lines = run_python(["-c", GUARDLESS], tmp_path)
    else:  # -S: faceclf is found only through the sys.path the caller built (and the child is -S too)
        done, lines = run_python(["-S", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r})\n" + GUARDLESS],
                                 tmp_path)
    assert done.returncode == 0, done.stderr
    assert "result: [1, 2, 3] was killed by SIGKILL" in done.stdout
    assert "printed by the child" in done.stdout  # the child's stdout is the caller's
    assert lines == ["ran"], done.stderr


def test_a_notebook_like_caller_runs_once_and_its_own_functions_are_refused(tmp_path: Path) -> None:
    # python3 -i reading standard input: statements run one by one in a __main__ without __file__, as in a
    # notebook; a function defined there cannot run in the child, and says so.
    session = GUARDLESS.replace('"ran\\n")\n', '"ran\\n")\n\n') + (  # a blank line ends a block here
        "import __main__; print('has __file__:', hasattr(__main__, '__file__'))\n"
        "def mine(x):\n"
        "    return x\n"
        "\n"
        "try:\n"
        "    run_in_child(mine, 1)\n"
        "except ValueError as err:\n"
        "    print('refused:', err)\n"
        "\n"
        "import functools\n"
        "try:\n"
        "    run_in_child(functools.partial(mine), 1)\n"  # __main__ deeper in the call: found in the child
        "except RuntimeError as err:\n"
        "    print('not rebuilt:', err)\n"
        "\n")
    done, lines = run_python(["-i"], tmp_path, stdin=session)
    assert "has __file__: False" in done.stdout, done.stderr
    assert "result: [1, 2, 3] was killed by SIGKILL" in done.stdout, done.stderr
    assert "refused: run_in_child cannot run 'mine' of __main__" in done.stdout, done.stderr
    assert "not rebuilt: run_in_child: the call does not unpickle in the child (AttributeError" in done.stdout
    assert lines == ["ran"]
    assert "Traceback" not in done.stderr, done.stderr


def test_the_child_imports_what_the_caller_could_import(tmp_path: Path) -> None:
    # A module beside the script is on the caller's sys.path (its folder), not on the child's by itself:
    # the child is started elsewhere (cwd) and still finds it.
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "mysteps.py").write_text("def double(x):\n    return 2 * x\n")
    script = tmp_path / "steps" / "night.py"
    script.write_text(GUARDLESS + "import mysteps\nprint('doubled:', run_in_child(mysteps.double, 21))\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done, lines = run_python([str(script)], tmp_path, cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert "doubled: 42" in done.stdout and lines == ["ran"]


# ---- logs, deaths, errors that do not pickle --------------------------------------------------------------

CHILD_LOG = logging.getLogger("faceclf.test_child")  # a Logger pickles by name: its bound methods travel


def test_a_childs_faceclf_log_records_reach_this_processs_loggers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="faceclf")
    run_in_child(CHILD_LOG.info, "decoded %d images", 7, name="faceclf-decode")
    run_in_child(CHILD_LOG.debug, "below INFO: stays in the child")
    records = [r for r in caplog.records if r.name == "faceclf.test_child"]
    assert [(r.levelno, r.getMessage(), r.processName) for r in records] == [
        (logging.INFO, "decoded 7 images", "faceclf-decode")]
    assert records[0].process != os.getpid()


def kill_myself() -> None:
    """In the child: die as the OOM killer would kill it."""
    os.kill(os.getpid(), signal.SIGKILL)


class NeedsTwo(Exception):
    """An exception that pickles but does not unpickle (its __init__ wants two arguments)."""

    def __init__(self, a: int, b: int):
        super().__init__(f"{a} and {b}")


def raise_needs_two() -> None:
    raise NeedsTwo(1, 2)


def a_lock() -> object:
    return threading.Lock()


def test_a_child_dies_with_its_parent_and_a_finished_one_leaves_no_zombie(tmp_path: Path) -> None:
    before = {p.pid for p in psutil.Process().children()}  # a session's servers (moto) may be children already
    assert run_in_child(sorted, [2, 1]) == [1, 2]
    assert {p.pid for p in psutil.Process().children()} == before  # the child was reaped: no zombie left
    parent = subprocess.Popen([sys.executable, "-c", "import time\nfrom faceclf.child import run_in_child\n"
                               "run_in_child(time.sleep, 60)"], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not (children := psutil.Process(parent.pid).children()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert children, "the parent started no child"
        parent.kill()  # as the OOM killer would: no cleanup runs in the parent
        parent.wait()
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], f"the child outlived its parent: {alive}"
    finally:
        parent.kill()
        parent.wait()


def test_a_killed_child_is_childdied_naming_sigkill() -> None:
    with pytest.raises(ChildDied, match="was killed by SIGKILL") as died:
        run_in_child(kill_myself)
    assert died.value.exitcode == -signal.SIGKILL


def test_what_does_not_pickle_comes_back_as_text() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)Traceback.*raise_needs_two.*NeedsTwo: 1 and 2"):
        run_in_child(raise_needs_two)
    with pytest.raises(RuntimeError, match=r"(?s)the result of the call does not pickle.*lock"):
        run_in_child(a_lock)
    with pytest.raises(ValueError, match="of __main__"):
        run_in_child(type("Main", (), {"__module__": "__main__", "__call__": lambda self: 1})())
