"""Stopping a long command (Ctrl-C, or SIGTERM from a scheduler): one line that says what is
kept and which command continues, never a traceback, and within a second or two.

Why: Python turns SIGINT into KeyboardInterrupt, which click (under typer) prints as
"Aborted!", and SIGTERM ends the process with no word at all. A user stopping a four-day run
needs to know whether epoch 37 was saved and what to type next. So the main thread raises
``Stopped`` (a BaseException: no ``except Exception`` on the way swallows it, and click does not
catch it) and each command says, through ``say_kept``, what a stop at this moment keeps.
Child processes (loader workers, encoding processes) leave a terminal's SIGINT to their parent,
which ends them as it stops, and end quietly on SIGTERM.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable

_describe: list[Callable[[], str]] = []


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived in the main thread."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_pending: list[int] = []
_main_pid: list[int] = []  # the process that caught the signals (a forked child inherits the handler)


def _raise(signum: int, frame: object) -> None:
    if _main_pid and os.getpid() != _main_pid[0]:  # a child forked before it could ignore them
        ignore_stop_signals()
        if signum == signal.SIGTERM:
            _exit_quietly(signum, frame)
        return
    _pending.append(signum)
    raise Stopped(signum)


def check_stop() -> None:
    """Raise ``Stopped`` if a stop signal came and its exception was lost: a handler's exception
    raised inside a finalizer or ``__del__`` (tqdm's, a DataLoader's) is printed as "Exception
    ignored" and dropped, and the command would run on. Long loops call this once per step."""
    if _pending:
        raise Stopped(_pending[-1])


def catch_stop_signals() -> None:
    """In the command's main process: SIGINT and SIGTERM raise ``Stopped`` in its main thread.
    A child forked from it that meets them before it could ignore them (a loader worker between
    its fork and its ``worker_init_fn``: a stop as an epoch's workers start) does as
    ``ignore_stop_signals`` says. One raised where Python can only drop it (a finalizer) is not
    printed as "Exception ignored": ``check_stop`` raises it again at the next step; nor is what
    finalizers raise while the stop unwinds (a DataLoader iterator cut short in its constructor)."""
    _main_pid[:] = [os.getpid()]
    signal.signal(signal.SIGINT, _raise)
    signal.signal(signal.SIGTERM, _raise)
    default_hook = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _pending:  # once stopping, a finalizer's error is the stop's echo (an object torn mid-build)
            default_hook(unraisable)
    sys.unraisablehook = hook


def ignore_stop_signals(*_: object) -> None:
    """In a child process: SIGINT, which a terminal sends the whole process group, is its
    parent's to handle (the parent ends it as it stops, or the kernel does:
    ``processes.die_with_parent``); SIGTERM ends it at once but quietly, with exit code 0. A
    worker killed by the signal would make its parent's DataLoader report a lost worker as it
    shuts down; one that ignored SIGTERM would hang its parent's exit, which terminates and
    then joins its daemon children."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)


def _exit_quietly(_signum: int, _frame: object) -> None:
    os._exit(0)


def say_kept(describe: Callable[[], str]) -> None:
    """What a stop now keeps, asked only when the stop comes: the command's current state (an
    empty string: say nothing, e.g. on a rank other than 0)."""
    _describe[:] = [describe]


def kept_line() -> str:
    """What the last ``say_kept`` says now (nothing written yet, when none was said)."""
    return _describe[0]() if _describe else "it had written nothing yet; the same command starts again"
