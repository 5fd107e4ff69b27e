"""The errors a user can cause (bad data, wrong config, a cache that does not fit).

They all derive from ``CivtError`` so that the CLI prints them as one clear line instead of a
traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import re


class CivtError(ValueError):
    """Base of every user-facing error; its message names the file and the problem."""


class ManifestError(CivtError):
    """A manifest file is missing, malformed, or disagrees with the shards on disk."""


class ShardError(CivtError):
    """A shard is truncated, corrupt, or holds an incomplete sample."""


class BadImageError(CivtError):
    """An input file that PIL cannot decode into an image."""


class ConfigError(CivtError):
    """A pipeline file or flag combination that cannot work."""


class CheckpointError(CivtError):
    """A checkpoint that is missing, damaged, of another run, or would run code to load."""


class NonFiniteError(CivtError):
    """NaN or infinity where numbers must be finite: a teacher's logits, a training loss. Named
    at the place it appears (teacher, unit, view; step, shard, rows), never stored or trained on."""


class OutOfMemoryError(CivtError):
    """The device or host ran out of memory: said as such, never blamed on an input file."""


class RankError(CivtError):
    """Ranks of one job that no longer run in step: one ran fewer steps than planned, or stopped
    answering (died, or hung). Raised within a bounded time instead of an endless wait, naming
    the rank, the epoch and the step."""


class CacheMismatchError(CivtError):
    """A cache that was built for other data, views, teachers or settings than asked for."""


class CorruptUnitError(CacheMismatchError):
    """A committed unit of a cache whose chunks are missing, do not decode, or do not match the
    checksums of its commit record: damage after the commit (disk, a person, another tool).
    ``where`` names the unit, array, file and problem; the message adds how to repair."""

    def __init__(self, where: str, hint: str = "") -> None:
        super().__init__(f"{where}. {hint}" if hint else where)
        self.where = where


_DISK_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EIO: "I/O error",
                errno.ELOOP: "symbolic link loop", errno.ENOENT: "no such file or directory",
                errno.ENOTDIR: "not a directory", errno.EISDIR: "is a directory"}


#: torch's DataLoader, when one of its worker processes dies (SIGKILL from the OOM killer, a
#: segfault): "DataLoader worker (pid 123) is killed by signal: Killed." or "DataLoader worker
#: (pid(s) 123, 124) exited unexpectedly".
_LOST_WORKER = re.compile(r"DataLoader worker \(pid\(?s?\)? ?([\d, ]+)\) (?:is killed by signal: ([\w ]+?)\.|exited unexpectedly)")


def one_line_error(e: BaseException) -> str | None:
    """The one line the CLI prints for an error a user can cause or fix (bad input, wrong
    config, a full or failing disk), or None for a bug, which keeps its traceback.

    Errors raised in DataLoader workers reach the main process re-raised with the worker's
    traceback in the message; the line is the original message, the last line of that text."""
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
        where = e.filename or "a file it was writing"
        return f"{where}: {_DISK_ERRNOS[e.errno]} ({e.strerror or e})"
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch's (CUDA)
        first = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
        return (f"out of memory ({first[:200]}): lower --batch-size, the decode budget "
                "(--decode-budget) or --workers")
    lost = _LOST_WORKER.search(str(e)) if isinstance(e, RuntimeError) else None
    if lost is not None:
        how = f"killed by signal {lost.group(2)}" if lost.group(2) else "lost (it exited unexpectedly)"
        return (f"a data loader worker (pid {lost.group(1)}) was {how}, most often by the kernel's "
                "out-of-memory killer (see `dmesg`): lower --workers, --batch-size or the decode budget "
                "(--decode-budget), then run the same command again to continue (train-student: with "
                "--resume; cache-teachers keeps every committed unit)")
    if not isinstance(e, ValueError):  # CivtError is a ValueError, as are library config errors
        return None
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text or type(e).__name__
