"""The errors a user can cause (bad data, wrong config, a cache that does not fit).

They all derive from ``CivtError`` so that the CLI prints them as one clear line instead of a
traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


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


class CacheMismatchError(CivtError):
    """A cache that was built for other data, views, teachers or settings than asked for."""


USER_ERRORS: tuple[type[BaseException], ...] = (CivtError, FileNotFoundError, NotADirectoryError)
