"""Pipeline files: declarative run configs (TOML) that flags override.

A pipeline has a ``[recipe]`` table (views, shared by both stages), a ``[cache]`` table
(``cache-teachers``; ``verify`` and ``inspect`` read its ``out``), a ``[student]`` table
(``train-student``; ``eval`` reads its model, run and validation manifest), ``[teachers.NAME]``
tables (``train-teacher --name NAME``, ``eval --name NAME``) and a ``[data]`` table
(``make-shards``). Unknown keys of a command's own table are refused, so a typo never silently
falls back to a default.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from civt_cache.data.remote import CACHE_SCHEMES, REMOTE_SCHEMES
from civt_cache.errors import ConfigError
from civt_cache.fsutil import is_url, refuse_url
from civt_cache.views.recipe import Recipe

T = TypeVar("T")

#: Upper bounds of counts a run can ask for: far beyond any real run (the paper trains 300
#: epochs at batch 1,024), so that a typo is refused before anything is allocated or created.
MAX_EPOCHS = 10_000
MAX_BATCH = 1 << 16
MAX_WORKERS = 256


#: A pipeline's tables (``[teachers.NAME]`` one per teacher). Anything else is a typo that would
#: otherwise be ignored: ``[studnet] lr = 1.0`` trained at the default lr.
PIPELINE_TABLES = ("data", "recipe", "cache", "student", "teachers")


def load_pipeline(path: Path | None) -> dict[str, Any]:
    """A pipeline TOML's tables, refused whole when it holds anything this tool would ignore or
    cannot read (an unknown table or top-level key, a URL where none may be)."""
    if path is None:
        return {}
    try:
        cfg = tomllib.loads(Path(path).read_text())
        _refuse_urls(cfg, str(path), ())
    except FileNotFoundError:
        raise ConfigError(f"{path}: pipeline file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a pipeline (tables hold settings, "
                          "two levels at most)") from None
    for key, value in cfg.items():
        if key not in PIPELINE_TABLES or not isinstance(value, dict):
            raise ConfigError(f"{path}: {f'[{key}]' if isinstance(value, dict) else repr(key)} is not a pipeline "
                              f"table; the tables are {', '.join(f'[{t}]' for t in PIPELINE_TABLES)}")
    for name, table in cfg.get("teachers", {}).items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [teachers] {name} is not a table; a teacher is [teachers.NAME]")
    return cfg


#: Pipeline keys that may hold a URL: a cache or shards being written (s3://, gs://), a manifest
#: (read from those or https://; written to s3://, gs://).
_WRITABLE_KEYS = {("cache", "out"), ("student", "cache"), ("data", "shards")}
_MANIFEST_KEYS = {"manifest", "val_manifest"}


def _url_schemes(keys: tuple[str, ...]) -> tuple[str, ...]:
    if keys[-2:] in _WRITABLE_KEYS:
        return CACHE_SCHEMES
    return REMOTE_SCHEMES if keys and keys[-1] in _MANIFEST_KEYS else ()


def _refuse_urls(node: Any, source: str, keys: tuple[str, ...]) -> None:
    """Refuse a URL anywhere in a pipeline but where one may be, naming its table and key."""
    if isinstance(node, str):
        where = f"[{'.'.join(keys[:-1])}] {keys[-1]}" if len(keys) > 1 else ".".join(keys)
        refuse_url(node, f"{source}: {where}", _url_schemes(keys))
    elif isinstance(node, dict):
        for key, value in node.items():
            _refuse_urls(value, source, (*keys, key))
    elif isinstance(node, list):
        for value in node:
            _refuse_urls(value, source, keys)


def refuse_misplaced_urls(args: list[str]) -> None:
    """Refuse a URL in every path-like argument, before typer makes a Path of it (``s3:/b``),
    except where one may be: scan-shards' shard pattern and any --manifest / --val-manifest
    (read-only schemes too), a cache (cache-teachers --out, train-student --cache, verify /
    inspect CACHE, bench requests CACHE) and make-shards' output folder (s3:// and gs://)."""
    command = args[0] if args else ""
    cache_option = {"cache-teachers": "--out", "train-student": "--cache"}.get(command)
    for i, arg in enumerate(args):
        # a positional: not an option, nor an option's value (every option here takes one)
        positional = i > 0 and not arg.startswith("-") and (
            i == 1 or not args[i - 1].startswith("-") or "=" in args[i - 1])
        named = arg.split("=", 1)[0] if arg.startswith("--") else (args[i - 1] if i else "")
        allowed: tuple[str, ...] = ()
        if (command == "scan-shards" and positional) or named in ("--manifest", "--val-manifest"):
            allowed = REMOTE_SCHEMES
        elif (positional and (command in ("verify", "inspect", "make-shards") or args[:2] == ["bench", "requests"])
              or (cache_option and named == cache_option)):
            allowed = CACHE_SCHEMES
        refuse_url(arg.split("=", 1)[-1] if arg.startswith("--") else arg,
                   named if named.startswith("--") else "argument", allowed)


def build_config(cls: type[T], pipeline: dict[str, Any], section: str, flags: dict[str, Any],
                 source: Path | None = None) -> T:
    """``cls(**{defaults, pipeline[section], non-None flags})`` with paths and the recipe typed."""
    table = dict(pipeline.get(section, {}))
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(table) - set(known)
    if unknown:
        raise ConfigError(f"{source or 'pipeline'}: [{section}] has unknown keys {sorted(unknown)}; "
                          f"known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for name, value in table.items():
        check_type(f"{source or 'pipeline'}: [{section}] {name}", value, hints[name])
    values = {**table, **{k: v for k, v in flags.items() if v is not None and v != []}}
    for name, value in values.items():
        refuse_non_finite(f"--{name.replace('_', '-')}" if name in flags and flags[name] is not None
                          else f"{source or 'pipeline'}: [{section}] {name}", value)
    if "recipe" in known:
        recipe = dict(pipeline.get("recipe", {}))
        recipe_hints = typing.get_type_hints(Recipe)
        for name, value in recipe.items():
            refuse_non_finite(f"{source or 'pipeline'}: [recipe] {name}", value)
            if name in recipe_hints:  # unknown keys: Recipe.from_json names them
                check_type(f"{source or 'pipeline'}: [recipe] {name}", value, recipe_hints[name])
        if values.get("img_size") is not None:
            recipe["img_size"] = values["img_size"]
        values["recipe"] = Recipe.from_json(recipe)
    if "img_size" not in known:
        values.pop("img_size", None)
    for name, f in known.items():
        if name in values and "Path" in str(f.type) and values[name] is not None and not is_url(values[name]):
            values[name] = Path(values[name])
    missing = [n for n, f in known.items() if n not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required setting(s) {missing} (give them as flags or in "
                          f"[{section}] of the pipeline file)")
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"[{section}]: {e}") from None


def refuse_non_finite(where: str, value: Any) -> None:
    """Refuse NaN or infinity in a number setting (or a list of them) at start-up: an infinite
    learning rate or temperature would otherwise run until the loss turns NaN."""
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{where} {item}: must be a finite number")


def setting(pipeline: dict[str, Any], path: str, flag: Any, hint: Any, source: Path | None = None,
            default: Any = None) -> Any:
    """One setting of a command that reads a pipeline table it does not own (``make-shards``
    reads [data], ``verify`` [cache], ``eval`` [student]...): the flag if given, else
    ``pipeline[table][key]`` (``path`` "table.key", type-checked), else ``default``."""
    if flag is not None and flag != []:
        return flag
    *tables, key = path.split(".")
    node: Any = pipeline
    for t in tables:
        node = node.get(t, {}) if isinstance(node, dict) else {}
    if not isinstance(node, dict) or key not in node:
        return default
    check_type(f"{source or 'pipeline'}: [{'.'.join(tables)}] {key}", node[key], hint)
    return Path(node[key]) if hint is Path else node[key]


def need(value: Any, what: str, path: str) -> Any:
    """Refuse a missing required setting, saying where it may come from."""
    if value is None:
        raise ConfigError(f"missing {what}: give it as a flag or as {path} in the pipeline file")
    return value


def check_type(where: str, value: Any, hint: Any) -> None:
    """Refuse a pipeline value of the wrong type (``img_size = "32"``), naming the key, instead of
    failing later in arithmetic. TOML integers count as floats; paths are strings."""
    if _fits(value, hint):
        return
    shown = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    raise ConfigError(f"{where} = {value!r}: must be {shown}")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path:
        return isinstance(value, (str, Path))
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is tuple:
        return (isinstance(value, (list, tuple)) and len(value) == len(args)
                and all(_fits(v, a) for v, a in zip(value, args)))
    return True  # composite settings (a Recipe) are checked by their own constructor


def require(source: str, **checks: tuple[object, bool, str]) -> None:
    """Refuse settings that cannot work, before anything is created: each check is
    ``name=(value, ok, what it must be)``; the first failing one becomes a ConfigError."""
    for name, (value, ok, must) in checks.items():
        if not ok:
            raise ConfigError(f"{source}: --{name.replace('_', '-')} {value!r}: must be {must}")
