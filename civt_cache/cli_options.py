"""What the command modules share: the --pipeline option, help texts, and the pipeline
lookups and help defaults every command uses the same way."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

PIPELINE_OPT = typer.Option(None, "--pipeline", help="Pipeline TOML; flags override it, and it overrides the [defaults] shown.")
THREADS_HELP = ("Intra-op threads [0: OMP_NUM_THREADS if set (torchrun sets 1 per rank), "
                "else the rank's cores less one per worker].")


def need_table(cfg: dict, group: str, name: str, pipeline: Optional[Path]) -> dict:
    """The pipeline's [GROUP.NAME] table, or a refusal naming the ones it has."""
    from civt_cache.errors import ConfigError

    tables = cfg.get(group, {})
    if name not in tables:
        raise ConfigError(f"{pipeline or 'no --pipeline'}: no [{group}.{name}] table "
                          f"(has {sorted(tables) or 'none'})")
    return tables[name]


def defaults_in_help(command: object, job: type) -> None:
    """Show each setting's default (the job dataclass's) in ``--help``: the options default to
    None so that a pipeline file can set them, which would otherwise hide the real default."""
    import dataclasses
    import inspect

    fields = {f.name: f for f in dataclasses.fields(job)}  # type: ignore[arg-type]
    for name, param in inspect.signature(command).parameters.items():  # type: ignore[arg-type]
        info, f = param.default, fields.get(name)
        if not isinstance(info, typer.models.OptionInfo) or f is None or not info.help or "[" in info.help:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING and \
            f.default_factory is not dataclasses.MISSING else f.default
        if default is not dataclasses.MISSING and default not in (None, [], ""):
            info.help = f"{info.help} [{default}]"


def class_names(path: Optional[Path]) -> list[str] | None:
    """A class names file (``--classes``): one name per line, blank lines ignored; a name twice is
    refused, as it would make two labels of one class."""
    from collections import Counter

    from civt_cache.errors import ConfigError

    if path is None:
        return None
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the class names ({e.strerror or e})") from None
    twice = sorted(n for n, count in Counter(names).items() if count > 1)  # one pass: 21k classes are many
    if not names or twice:
        raise ConfigError(f"{path}: " + (f"names {twice[:3]} more than once" if twice else "holds no class names"))
    return names
