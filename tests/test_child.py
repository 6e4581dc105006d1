"""faceclf.child: one call in a fresh spawned process, its result or its error back here, a dead child
named by how it died (the decoded cache's big decode runs this way: tests/test_cache.py)."""

from __future__ import annotations

import os
import signal

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
