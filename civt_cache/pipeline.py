"""Pipeline files: declarative run configs (TOML) that flags override.

A pipeline has a ``[recipe]`` table (views, shared by both stages), a ``[cache]`` table
(``cache-teachers``) and a ``[student]`` table (``train-student``); the demo adds
``[teachers.NAME]`` tables for ``train-teacher``. Unknown keys are refused, so a typo never
silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError
from .recipe import Recipe

T = TypeVar("T")


def load_pipeline(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: pipeline file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None


def build_config(cls: type[T], pipeline: dict[str, Any], section: str, flags: dict[str, Any],
                 source: Path | None = None) -> T:
    """``cls(**{defaults, pipeline[section], non-None flags})`` with paths and the recipe typed."""
    table = dict(pipeline.get(section, {}))
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(table) - set(known)
    if unknown:
        raise ConfigError(f"{source or 'pipeline'}: [{section}] has unknown keys {sorted(unknown)}; "
                          f"known: {sorted(known)}")
    values = {**table, **{k: v for k, v in flags.items() if v is not None and v != []}}
    if "recipe" in known:
        recipe = dict(pipeline.get("recipe", {}))
        if values.get("img_size") is not None:
            recipe["img_size"] = values["img_size"]
        values["recipe"] = Recipe.from_json(recipe)
    if "img_size" not in known:
        values.pop("img_size", None)
    for name, f in known.items():
        if name in values and "Path" in str(f.type) and values[name] is not None:
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


def require(source: str, **checks: tuple[object, bool, str]) -> None:
    """Refuse settings that cannot work, before anything is created: each check is
    ``name=(value, ok, what it must be)``; the first failing one becomes a ConfigError."""
    for name, (value, ok, must) in checks.items():
        if not ok:
            raise ConfigError(f"{source}: --{name.replace('_', '-')} {value!r}: must be {must}")
