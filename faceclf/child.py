"""One function call in a fresh spawned process: its result or its exception back here, or how it died.

A process keeps most of the heap a step grew (glibc does not hand all of it back). Steps whose heap grows
with the face set (the night's ingest, decoding a large set) run through ``run_in_child``: their heap
leaves with the child, and the night's process stays the size it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import logging.handlers
import multiprocessing
import pickle
import signal
import traceback
from collections.abc import Callable
from typing import Any


class ChildDied(RuntimeError):
    """The child process ended without a result (killed by a signal, or it exited)."""

    def __init__(self, exitcode: int | None):
        self.exitcode = exitcode
        super().__init__(describe_exit(exitcode))


def describe_exit(exitcode: int | None) -> str:
    """'was killed by SIGKILL' / 'exited with code 3', from a multiprocessing exit code."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def run_in_child(fn: Callable[..., Any], *args: Any, name: str = "faceclf-child") -> Any:
    """``fn(*args)`` in a spawned process; its return value, or the exception it raised, raised here.

    ``fn`` and ``args`` must pickle (a module-level function, plain values, a FaceSet). The child's log
    records (faceclf's loggers, INFO and up) are handled here by the same loggers, so they reach this
    process's handlers (a Prefect task's log, the command line's stderr). A child that dies without
    answering (SIGKILL, the OOM killer, os._exit) is ``ChildDied`` with its exit code. The child is killed
    with its parent (Linux), so a killed night leaves no worker process behind.
    """
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    records = ctx.Queue()
    listener = logging.handlers.QueueListener(records, _Relay(), respect_handler_level=False)
    listener.start()
    child = ctx.Process(target=_child_entry, args=(send, records, fn, args), name=name)
    child.start()
    send.close()  # only the child writes: recv() then sees EOF when it dies
    try:
        ok, value = receive.recv()
    except EOFError:
        child.join()
        raise ChildDied(child.exitcode) from None
    finally:
        receive.close()
        child.join()
        listener.stop()  # every record the child sent has been handled
        records.close()
    if ok:
        return value
    raise value


class _Relay(logging.Handler):
    """Hands a record from the child to the logger of the same name here (its handlers, its propagation)."""

    def emit(self, record: logging.LogRecord) -> None:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


def _child_entry(send: Any, records: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """In the child: die with the parent, send faceclf's log records home, call ``fn``, send (True, result)
    or (False, exception)."""
    _die_with_parent()
    root = logging.getLogger("faceclf")
    root.addHandler(logging.handlers.QueueHandler(records))
    root.setLevel(logging.INFO)
    root.propagate = False  # the parent's handlers print them, once
    try:
        out: tuple[bool, Any] = (True, fn(*args))
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the parent, which raises it
        out = (False, err if _pickles(err) else RuntimeError(traceback.format_exc()))
    send.send(out)
    send.close()


def _pickles(obj: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(obj))
        return True
    except Exception:  # noqa: BLE001 - any failure means "send the traceback text instead"
        return False


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG); no-op elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
