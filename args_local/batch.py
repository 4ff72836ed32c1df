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

import click

from .core.errors import ArgsLocalError, PromptError, SettingsError
from .core.jsonl import read_finished
from .core.settings import ALIASES, Settings

ROW_SETTINGS = set(ALIASES) - {"use_cache"}


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
    """Indices already in an output file (see :func:`read_finished`)."""
    rows = read_finished(path, lambda row: isinstance(row["index"], int), "a batch result")
    return {row["index"] for row in rows}


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


def report(request, result, engine) -> dict[str, Any]:
    """One result as ``--json`` and batch rows show it."""
    return {
        "prompt": request.prompt,
        **result.as_dict(),
        "settings": request.settings.as_dict(),
        "model": str(engine.policy.path),
        "reward_model": str(engine.reward.path) if engine.reward else None,
    }


def run_batch(batch: Path, out_path: Path | None, resume: bool, settings: Settings, models) -> None:
    """Every row of ``batch``, in order, each result written as soon as it is finished."""
    from .runtime.load import load_engine
    from .runtime.memory import rss_mb

    rows = read_rows(batch)
    done = finished_indices(out_path) if resume and out_path else set()
    if out_path and out_path.exists() and out_path.stat().st_size and not resume:
        raise click.UsageError(f"{out_path} already holds results: pass --resume to continue it, or choose another -o")
    todo = list(pending(rows, done))
    click.echo(f"args-local: {len(rows)} rows, {len(done)} already done, {len(todo)} to run", err=True)
    if not todo:
        return
    engine = load_engine(models)
    failed = 0
    with (out_path.open("a", encoding="utf-8") if out_path else _stdout()) as out:
        writer = ResultWriter(out)
        for n, row in enumerate(todo, 1):
            try:
                request = engine.request(row.prompt, settings.update(row.overrides))
                record = {"index": row.index, **report(request, engine.generate(request), engine)}
            except (SettingsError, PromptError, ArgsLocalError) as e:
                failed += 1
                record = {"index": row.index, "prompt": row.prompt, "error": str(e)}
            writer.write(record)
            done_what = "failed" if "error" in record else f"{record['tokens']} tokens, {record['elapsed_s']:.1f} s"
            click.echo(f"args-local: [{n}/{len(todo)}] row {row.index}: {done_what}, RSS {rss_mb():.0f} MB", err=True)
    if failed:
        raise ArgsLocalError(f"{failed} of {len(todo)} rows failed; their errors are in the output")


def _stdout():
    """stdout as a context manager that is not closed on exit."""
    import contextlib
    import sys

    return contextlib.nullcontext(sys.stdout)
