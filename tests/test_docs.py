"""What README.md and docs/ tell a user to run exists: every ``civt-cache`` command and each of
its flags named on the same line, every ``make`` target, every docs/ link; and the repository
speaks of the product, not of how it was made."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from civt_cache.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_COMMAND = re.compile(r"(?:civt-cache|civt_cache\.cli)\s+((?:bench\s+)?[a-z][a-z-]+)((?:[^`\n|]*))")
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _code(path: Path) -> list[str]:
    """The file's code: each line of a fenced block (shell continuations joined) and each
    inline `span` of the prose."""
    code, fenced = [], False
    for line in path.read_text().replace("\\\n", " ").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            code.append(line)
        else:
            code.extend(re.findall(r"`([^`]+)`", line))
    return code


def _named() -> dict[tuple[str, ...], set[str]]:
    """{command words: flags named with it} over the code of README.md and docs/."""
    found: dict[tuple[str, ...], set[str]] = {}
    for path in DOCS:
        for line in _code(path):
            for words, rest in _COMMAND.findall(line):
                command = tuple(words.split())
                flags = set(_FLAG.findall(rest.split(" # ")[0]))
                found.setdefault(command, set()).update(flags)
    return found


def test_the_docs_are_there() -> None:
    assert {p.name for p in DOCS} >= {"README.md", "workflow.md", "cache-format.md", "views.md",
                                      "fidelity.md", "benchmarks.md"}
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_every_command_and_flag_named_in_the_docs_exists() -> None:
    runner = CliRunner()
    named = _named()
    assert ("train-student",) in named and ("cache-teachers",) in named
    for command, flags in sorted(named.items()):
        result = runner.invoke(app, [*command, "--help"], terminal_width=200)
        assert result.exit_code == 0, (command, result.output[-500:])
        missing = sorted(f for f in flags if f not in result.output and f != "--help")
        assert not missing, f"civt-cache {' '.join(command)}: no {missing}"


def test_every_make_target_named_in_the_docs_exists() -> None:
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    for path in DOCS:
        for target in re.findall(r"(?:`|^)make ([a-z][a-z-]+)", path.read_text(), re.M):
            assert target in targets, (path.name, target)


def test_every_link_into_docs_resolves() -> None:
    for path in DOCS:
        for link in re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / link).exists(), (path.name, link)


@pytest.mark.parametrize("pattern", [r"\bsession\b", r"issue #?\d", r"#\d{2}\b", r"\bround(s)? of work",
                                     r"\.\./shared", r"DESIGN\.md"])
def test_the_repository_speaks_of_the_product_only(pattern) -> None:
    """No sentence about the making of the project (rounds of work, issue numbers, who had which
    machine) in the README, docs/ or the package, and nothing points outside the repository."""
    texts = [*DOCS, *sorted((ROOT / "civt_cache").rglob("*.py")), ROOT / "Makefile"]
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)!r}" for p in texts for m in re.finditer(pattern, p.read_text(), re.I)]
    assert not hits, hits
