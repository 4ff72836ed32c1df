"""Resumable JSON-lines result files (batch and eval output): read what is finished, and cut
a last line that a killed run left half-written, but only once the file is known to hold
results (a wrong ``-o`` must never lose a byte)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .errors import ArgsLocalError


def read_finished(path: Path, is_result: Callable[[dict[str, Any]], bool], what: str) -> list[dict[str, Any]]:
    """The complete result lines of ``path`` (none when it does not exist). A line that is not
    a JSON object accepted by ``is_result`` is an error naming the line: the file is not ours
    and nothing is touched. After every complete line checks out, a torn last line (no newline
    at the end of the file) is cut off, since the run that wrote it died mid-write."""
    if not path.exists():
        return []
    if not path.is_file():
        raise ArgsLocalError(f"{path} is not a regular file; choose another -o")
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    rows = []
    for number, line in enumerate(data[:keep].splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and is_result(row)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ArgsLocalError(f"{path}:{number} is not {what}; refusing to resume into it (choose another -o)")
        rows.append(row)
    if keep < len(data):
        with path.open("r+b") as f:
            f.truncate(keep)
    return rows
