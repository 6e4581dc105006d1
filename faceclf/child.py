"""One function call in a fresh Python process: its result or its exception back here, or how it died.

A process keeps most of the heap a step grew (glibc does not hand all of it back). Steps whose heap grows
with the face set (the night's ingest, decoding a large set) run through ``run_in_child``: their heap
leaves with the child, and the night's process stays the size it was.

The child is a new interpreter started as ``python -c _BOOT`` (POSIX). It never imports the caller's
``__main__``: multiprocessing's "spawn" re-runs a main script in the child, so a script without an
``if __name__ == "__main__":`` guard started a second night there, and a script read from standard input
could not start a child at all ('<stdin>' is no file). Two pipes join the two processes:

    call pipe (parent -> child): frame 1, the parent's sys.path and sys.argv; frame 2, (fn, args)
    message pipe (child -> parent): ("log", LogRecord) ..., then ("ok", result) or ("raised", exception)

A frame is an 8-byte big-endian length and that many bytes of pickle. End of file on the message pipe
before the answer means the child died: its exit code then says how.
"""

from __future__ import annotations

import copy
import ctypes
import logging
import os
import pickle
import signal
import struct
import sys
import threading
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import subprocess

# Run by a fresh interpreter (see python_command): argv is [-c, name, faceclf's parent folder, *the entry's
# arguments]; here [..., parent pid, call fd, message fd]. faceclf's own folder goes first on sys.path so the
# child imports the very faceclf the parent runs (installed or not); the entry (_child_main) then puts the
# parent's sys.path in place.
_BOOT = "import sys; sys.path.insert(0, sys.argv[2]); from {module} import {function}; {function}()"
_HEADER = struct.Struct(">Q")  # the length of one frame's pickle
_FACECLF_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ChildDied(RuntimeError):
    """The child process ended without a result (killed by a signal, or it exited)."""

    def __init__(self, exitcode: int | None):
        self.exitcode = exitcode
        super().__init__(describe_exit(exitcode))


def describe_exit(exitcode: int | None) -> str:
    """'was killed by SIGKILL' / 'exited with code 3', from a process exit code (negative: the signal)."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def run_in_child(fn: Callable[..., Any], *args: Any, name: str = "faceclf-child") -> Any:
    """``fn(*args)`` in a fresh Python process; its return value, or the exception it raised, raised here.

    ``fn`` and ``args`` must pickle and come from importable modules (a module-level function of faceclf or
    of a module on this process's sys.path, plain values, a FaceSet), never from ``__main__``: the child
    does not run the caller's script, so it works the same from a script with or without the
    ``__main__`` guard, ``python -c``, a script on standard input, or a notebook. The child starts with
    this process's sys.path, sys.argv, working folder and environment; its stdout and stderr are this
    process's. Its log records (faceclf's loggers, INFO and up) are handled here by the same loggers, so
    they reach this process's handlers (a Prefect task's log, the command line's stderr). A child that
    dies without answering (SIGKILL, the OOM killer, os._exit) is ``ChildDied`` with its exit code. The
    child is killed with its parent (Linux), so a killed night leaves no worker process behind.
    """
    if getattr(fn, "__module__", None) == "__main__":
        raise ValueError(f"run_in_child cannot run {getattr(fn, '__qualname__', fn)!r} of __main__: the child "
                         "never imports the caller's script; move it to an importable module")
    setup = pickle.dumps({"sys_path": list(sys.path), "sys_argv": list(sys.argv)})
    call = pickle.dumps((fn, args))  # a function or value that does not pickle fails here, before a child
    child, call_w, msg_r = _start_child(name)
    answered = False
    try:
        with open(msg_r, "rb") as messages:
            _send_call(call_w, setup, call)
            kind, value = _receive_answer(messages)
        answered = True
    finally:
        if not answered and child.poll() is None:
            child.kill()  # this call was abandoned here (KeyboardInterrupt, a bad answer): end the child too
        child.wait()  # reaped either way: no zombie
    if kind == "ok":
        return value
    if kind == "raised":
        raise value
    raise ChildDied(child.returncode)


def _start_child(name: str) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start ``python -c _BOOT`` with this interpreter's flags (-S, -I, -X ..., as multiprocessing passes
    them); the child, and this side's ends of the two pipes: the call's write end, the messages' read end."""
    import subprocess  # here, not at the top: the child imports this module and never needs it

    call_r, call_w = os.pipe()
    msg_r, msg_w = os.pipe()
    try:
        argv = python_command("faceclf.child:_child_main", name, str(os.getpid()), str(call_r), str(msg_w))
        _flush_std_streams()  # what the caller printed comes before what the child prints
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=(call_r, msg_w))
    except BaseException:
        os.close(call_w)
        os.close(msg_r)
        raise
    finally:
        os.close(call_r)
        os.close(msg_w)  # only the child writes: a read here then sees end of file when it dies
    return child, call_w, msg_r


def python_command(entry: str, name: str, *args: str) -> list[str]:
    """The command line of a fresh interpreter that calls ``entry`` ("package.module:function", no arguments)
    and never imports the caller's ``__main__``: this Python with its flags (-S, -I, -X ..., as
    multiprocessing passes them), ``-c`` and the boot code, then ``name``, faceclf's parent folder and
    ``args``, which the entry reads from sys.argv[3:]."""
    import subprocess

    module, function = entry.split(":")
    return [_python(), *subprocess._args_from_interpreter_flags(),  # type: ignore[attr-defined]
            "-c", _BOOT.format(module=module, function=function), name, _FACECLF_PARENT, *args]


def _python() -> str:
    """The interpreter to start: this one (an embedded Python without sys.executable cannot start a child)."""
    if not sys.executable:
        raise RuntimeError("run_in_child needs sys.executable to start a child Python, and it is empty here")
    return sys.executable


def _flush_std_streams() -> None:
    """Flush this process's sys.stdout and sys.stderr (they may be None or closed: then nothing to flush)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass


def _send_call(fd: int, setup: bytes, call: bytes) -> None:
    """Write the two call frames to the child and close the pipe; a child that died already is no error
    here (its exit code is reported once the message pipe ends)."""
    try:
        with open(fd, "wb") as pipe:
            _write_frame(pipe, setup)
            _write_frame(pipe, call)
    except BrokenPipeError:
        pass


def _receive_answer(messages: BinaryIO) -> tuple[str, Any]:
    """Relay the child's log records until its answer: ("ok", result), ("raised", exception), or
    ("died", None) when the pipe ends (or breaks off inside a frame) before an answer."""
    while (frame := _read_frame(messages)) is not None:
        kind, value = pickle.loads(frame)
        if kind != "log":
            return kind, value
        _relay(value)
    return "died", None


def _relay(record: logging.LogRecord) -> None:
    """Hand a record from the child to the logger of the same name here (its handlers, its propagation)."""
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


def _write_frame(pipe: BinaryIO, data: bytes) -> None:
    """One frame: the length of ``data`` (8 bytes, big-endian), then ``data``; flushed."""
    pipe.write(_HEADER.pack(len(data)))
    pipe.write(data)
    pipe.flush()


def _read_frame(pipe: BinaryIO) -> bytes | None:
    """The next frame's bytes, or None at end of file (also inside a frame: the writer died mid-way)."""
    header = pipe.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = pipe.read(size)
    return data if len(data) == size else None


# ---- in the child ----------------------------------------------------------------------------------------

class _Answers:
    """The child's end of the message pipe: whole frames, one writer at a time (fn's threads log too)."""

    def __init__(self, fd: int):
        os.set_inheritable(fd, False)  # a program the call starts does not hold the pipe open
        self._pipe = open(fd, "wb")
        self._lock = threading.Lock()

    def send(self, kind: str, value: Any) -> None:
        """Pickle (kind, value) and write it as one frame."""
        self.send_pickled(pickle.dumps((kind, value)))

    def send_pickled(self, data: bytes) -> None:
        """Write one frame of pickled (kind, value)."""
        with self._lock:
            _write_frame(self._pipe, data)


class _SendRecords(logging.Handler):
    """Sends each record home as ("log", record), its message formatted here (as QueueHandler.prepare
    does: arguments and exception objects need not pickle) and its processName the child's name."""

    def __init__(self, answers: _Answers, name: str):
        super().__init__()
        self._answers = answers
        self._name = name

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)  # with the traceback text, when there is one
            record = copy.copy(record)
            record.message = record.msg = msg
            record.args = record.exc_info = record.exc_text = record.stack_info = None
            record.processName = self._name
            self._answers.send("log", record)
        except Exception:  # noqa: BLE001 - logging never fails the call (logging prints the error)
            self.handleError(record)


def _child_main() -> None:
    """The child's whole life: die with the parent, take its sys.path, read the call, send faceclf's log
    records home while it runs, then send its answer."""
    name, _, parent_pid, call_fd, msg_fd = sys.argv[1:6]
    die_with_parent(int(parent_pid))
    answers = _Answers(int(msg_fd))
    os.set_inheritable(int(call_fd), False)
    with open(int(call_fd), "rb") as calls:
        setup, call = _read_frame(calls), _read_frame(calls)
    if setup is None or call is None:
        sys.exit(f"faceclf child {name}: the parent closed the call pipe before sending the call")
    parent = pickle.loads(setup)
    sys.path[:] = parent["sys_path"]
    sys.argv[:] = parent["sys_argv"]
    try:
        fn, args = pickle.loads(call)
    except Exception as err:  # noqa: BLE001 - tell the caller why its call cannot run here
        answers.send("raised", RuntimeError(
            f"run_in_child: the call does not unpickle in the child ({type(err).__name__}: {err}); its function "
            "and arguments must come from modules importable on sys.path, not from the caller's __main__"))
        return
    _send_faceclf_logs(answers, name)
    try:
        kind, value = "ok", fn(*args)
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the parent, which raises it
        kind, value = "raised", err
    _send_answer(answers, kind, value)


def _send_faceclf_logs(answers: _Answers, name: str) -> None:
    """faceclf's records, INFO and up, go to the parent (and only there: its handlers print them, once)."""
    root = logging.getLogger("faceclf")
    root.addHandler(_SendRecords(answers, name))
    root.setLevel(logging.INFO)
    root.propagate = False


def _send_answer(answers: _Answers, kind: str, value: Any) -> None:
    """Send ("ok", result) or ("raised", exception), pickled once. A result that does not pickle, or an
    exception that does not pickle or unpickle (one whose __init__ wants other arguments), goes as a
    RuntimeError with the traceback text instead."""
    try:
        data = pickle.dumps((kind, value))
        if kind == "raised":
            pickle.loads(data)  # an exception is small; a result (a FaceSet) is not checked twice
    except Exception:  # noqa: BLE001 - any failure means "send the traceback text instead"
        text = ("".join(traceback.format_exception(value)) if kind == "raised"
                else f"the result of the call does not pickle:\n{traceback.format_exc()}")
        data = pickle.dumps(("raised", RuntimeError(text)))
    answers.send_pickled(data)


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG; no-op elsewhere), and
    exit now if the parent died before that was asked (this process was then handed to another parent)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os._exit(1)
