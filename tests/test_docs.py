"""The README and docs as a user reads them: every command in them is one the CLI accepts as written, the cheap ones run,
the benchmark scripts they name exist, and nothing in the repository speaks of how the project was made."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from pnpguide.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDERS = ("/path/to", "GUIDE_DIR", "...", "runs/")  # a user's own folders, or runs made by an earlier command
PROCESS_WORDS = re.compile(r"stop [0-9]+|issue [0-9]+|this session|session [0-9]+|\blent\b", re.IGNORECASE)


def shell_blocks(text: str) -> list[str]:
    """The bodies of a markdown text's ```bash (or unlabelled) code blocks."""
    blocks, body, language = [], None, None
    for line in text.splitlines():
        if line.startswith("```"):
            if body is None:
                body, language = [], line[3:].strip()
            else:
                if language in ("", "bash", "sh", "shell"):
                    blocks.append("\n".join(body))
                body = None
        elif body is not None:
            body.append(line)
    return blocks


def commands(path: Path) -> list[str]:
    """The shell commands in a markdown file's code blocks, continuation lines joined, comments left out."""
    found = []
    for block in shell_blocks(path.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("pnpguide ", "python benchmarks/", "accelerate launch")):
                found.append(line)
    return found


ALL = [(path.relative_to(ROOT).as_posix(), command) for path in DOCS for command in commands(path)
       if "..." not in command]  # an elided line ("pnpguide eval ... --json") shows one flag, not a command


def cli_words(command: str) -> list[str]:
    words = shlex.split(command)
    if words[0] == "accelerate":
        words = words[words.index("pnpguide.cli") + 1:]
    else:
        words = words[1:]
    return words


def test_the_docs_hold_commands():
    assert len([c for _, c in ALL if c.startswith("pnpguide ")]) >= 20


@pytest.mark.parametrize("where, command", [case for case in ALL if not case[1].startswith("python ")], ids=lambda v: v[:60] if isinstance(v, str) else v)
def test_every_pnpguide_command_in_the_docs_parses(where, command):
    build_parser(cli_words(command)).parse_args(cli_words(command))


@pytest.mark.parametrize("where, command", [case for case in ALL if case[1].startswith("python ")], ids=lambda v: v[:60] if isinstance(v, str) else v)
def test_every_benchmark_the_docs_name_exists(where, command):
    assert (ROOT / shlex.split(command)[1]).is_file()


CHEAP = ("pnpguide generate", "pnpguide doctor", "pnpguide fit-carry")  # seconds each on the embedded model


@pytest.mark.integration
@pytest.mark.parametrize("path", [p for p in DOCS if any(c.startswith(CHEAP) for c in commands(p))], ids=lambda p: p.name)
def test_the_cheap_commands_run_as_written(path, tmp_path, monkeypatch):
    """In the order the page gives them, in one folder: a command may read what an earlier one wrote (fit-carry's carry)."""
    monkeypatch.chdir(tmp_path)
    for command in commands(path):
        if command.startswith(CHEAP) and not any(p in command for p in PLACEHOLDERS):
            assert main(["--threads", "1", *cli_words(command)]) == 0, command


def test_no_file_speaks_of_how_the_project_was_made():
    tracked = subprocess.run(["git", "ls-files", "README.md", "docs", "src", "tests", "scripts", "benchmarks"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in tracked:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".sh", ".txt", ".json", ".toml") and path.is_file() and name != "tests/test_docs.py":
            hits += [f"{name}:{number}" for number, line in enumerate(path.read_text(errors="ignore").splitlines(), 1) if PROCESS_WORDS.search(line)]
    assert not hits, hits[:20]


def test_the_readme_is_a_users_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
