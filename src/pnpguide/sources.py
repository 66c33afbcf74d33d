"""Where training data comes from: the user's prompts (and, in time, images) for the two distillation stages."""

from __future__ import annotations

import json
from pathlib import Path


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or a JSONL file (objects with a 'prompt', 'text' or 'caption')."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as error:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({error.reason} at byte {error.start}); re-save it as UTF-8") from error
    lines = [line for line in lines if line]
    if path.suffix == ".jsonl":
        lines = [_prompt_from_json(line, path, number) for number, line in enumerate(lines, 1)]
    if not lines:
        raise ValueError(f"prompt file {path} has no prompts; write one prompt per line")
    return lines


def _prompt_from_json(line: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
        return next(str(record[k]) for k in ("prompt", "text", "caption") if k in record)
    except (json.JSONDecodeError, TypeError, StopIteration) as error:
        raise ValueError(f"{path}:{number}: expected a JSON object with a 'prompt', 'text' or 'caption' field") from error
