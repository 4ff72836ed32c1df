"""Batch generation: one JSONL result per input row, in input order, never lost.

Each result is written and flushed (and fsync'ed) as soon as it is finished, so an
interrupted run keeps every finished row; ``--resume`` skips the rows already in
the output file and drops a last line that was cut in the middle of writing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import ArgsLocalError, PromptError

ROW_SETTINGS = {"top_k", "weight", "mode", "temperature", "seed", "max_tokens", "system", "stop"}


@dataclass
class Row:
    """One prompt of a batch, with the settings it overrides."""

    index: int
    prompt: str
    overrides: dict[str, Any] = field(default_factory=dict)


def read_rows(path: Path) -> list[Row]:
    """Rows of a batch file: JSON objects with a "prompt" field, or one plain prompt per line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArgsLocalError(f"cannot read the batch file {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"{path} is not UTF-8 text (byte {e.start})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(obj.get("prompt"), str):
                raise PromptError(f'{path}:{number}: a JSON row needs a "prompt" string')
            unknown = set(obj) - ROW_SETTINGS - {"prompt", "id"}
            if unknown:
                raise PromptError(f"{path}:{number}: unknown field(s) {', '.join(sorted(unknown))}; rows may set {', '.join(sorted(ROW_SETTINGS))}")
            overrides = {k: v for k, v in obj.items() if k in ROW_SETTINGS}
            rows.append(Row(len(rows), obj["prompt"], overrides))
        else:
            rows.append(Row(len(rows), line))
    return rows


def finished_indices(path: Path) -> set[int]:
    """Indices already in an output file; a torn last line (killed mid-write) is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with path.open("r+b") as f:
            f.truncate(keep)
    done = set()
    for line in data[:keep].splitlines():
        try:
            done.add(int(json.loads(line)["index"]))
        except (ValueError, KeyError, TypeError):
            raise ArgsLocalError(f"{path} holds a line that is not a batch result; refusing to resume into it") from None
    return done


class ResultWriter:
    """Appends one JSON line per result and makes it durable before the next row starts."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def write(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()
        try:
            os.fsync(self.out.fileno())
        except (OSError, ValueError):  # a pipe or terminal: flushed is all there is
            pass


def pending(rows: list[Row], done: set[int]) -> Iterator[Row]:
    return (r for r in rows if r.index not in done)
