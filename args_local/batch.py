"""Batch generation: one JSONL result per input row, in input order, never lost, never mixed.

Each result is written and flushed (and fsync'ed) as soon as it is finished, so an
interrupted run keeps every finished row. Every result carries the batch's stamp
(:func:`stamp`: digests of the input rows, and of the settings and models), so ``--resume``
continues only the output of the same input under the same settings, and refuses any other
file without touching it; the output file is locked while a run writes it
(:func:`args_local.core.jsonl.open_results`). A row that cannot run (not JSON, wrong types,
not UTF-8) gets an error record and the batch goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from .core.errors import ArgsLocalError
from .core.jsonl import open_results
from .core.settings import ALIASES, Settings
from .core.text import text_problem

ROW_SETTINGS = set(ALIASES) - {"use_cache"}


@dataclass
class Row:
    """One prompt of a batch, with the settings it overrides, or why it cannot run."""

    index: int
    prompt: str
    overrides: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def read_rows(path: Path) -> list[Row]:
    """Rows of a batch file: JSON objects with a "prompt" field, or one plain prompt per line.
    Lines end at "\\n" only (JSON strings may hold other line separators). A line that cannot
    be a row becomes a row with an error, so that one bad line never stops the batch."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArgsLocalError(f"cannot read the batch file {path}: {e.strerror}") from None
    rows: list[Row] = []
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append(Row(len(rows), raw.decode("utf-8", errors="replace"), error=f"line {number} is not UTF-8 text (byte {e.start})"))
            continue
        if line.strip():
            rows.append(parse_row(len(rows), number, line))
    return rows


def parse_row(index: int, number: int, line: str) -> Row:
    """One non-empty line: a JSON object row, or a plain prompt."""
    text = line.strip()
    if not text.startswith(("{", "[")):
        return Row(index, line.rstrip("\r"))
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        if text.startswith("["):  # "[INST] ..." and the like: a plain prompt
            return Row(index, line.rstrip("\r"))
        return Row(index, line, error=f"line {number} is not valid JSON ({getattr(e, 'msg', type(e).__name__)})")
    if not isinstance(obj, dict):
        return Row(index, line, error=f'line {number} is a JSON {type(obj).__name__}; a JSON row is an object with a "prompt" string')
    if not isinstance(obj.get("prompt"), str):
        return Row(index, line, error=f'line {number}: a JSON row needs a "prompt" string')
    problem = text_problem(obj["prompt"])
    if problem:
        return Row(index, obj["prompt"], error=f"line {number}: the prompt {problem}")
    unknown = set(obj) - ROW_SETTINGS - {"prompt", "id"}
    if unknown:
        shown = ", ".join(sorted(repr(k)[:40] for k in unknown))
        return Row(index, obj["prompt"], error=f"line {number}: unknown field(s) {shown}; rows may set {', '.join(sorted(ROW_SETTINGS))}")
    return Row(index, obj["prompt"], {k: v for k, v in obj.items() if k in ROW_SETTINGS})


def _digest(value: Any) -> str:
    """A short SHA-256 of a JSON-able value (ASCII-escaped: lone surrogates are fine)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=True).encode()).hexdigest()[:16]


def stamp(rows: list[Row], settings: Settings, models: Any) -> dict[str, str]:
    """What a batch output belongs to: the input rows, and the settings and models they ran
    under. Every result line starts with it. The reward models given with ``-r`` (and their
    weights) and a policy server are in it only when given, so the outputs of runs without
    them keep the stamp they had. A policy server is asked which model it serves (its URL alone
    could serve another one after a restart); the API it is spoken to with is not in it (the
    same server computes the same numbers either way)."""
    chosen = {"settings": settings.as_dict(), "model": _path(models.model), "reward_model": _path(models.reward_model), "ctx_size": models.ctx_size}
    if models.rewards:
        chosen["rewards"] = [[_path(s.path) if s.path.exists() else str(s.path), s.weight] for s in models.rewards]
    if models.policy_url:
        from .runtime.remote import served_model

        chosen["policy_server"] = served_model(models.policy_url, models.policy_api_key, models.policy_timeout)
    return {"input": _digest([[r.prompt, r.overrides, r.error] for r in rows]), "settings": _digest(chosen)}


def _path(path: Path | None) -> str | None:
    return os.path.abspath(path) if path is not None else None


class ResultWriter:
    """Appends one JSON line per result and makes it durable before the next row starts."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (from JSON input): escaped, still exact
            line = json.dumps(record, ensure_ascii=True)
        try:
            self.out.write(line + "\n")
            self.out.flush()
        except OSError as e:
            raise ArgsLocalError(f"cannot write the results: {e.strerror}") from None
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
    from .runtime.load import load_engine, set_log_levels
    from .runtime.memory import rss_mb

    rows = read_rows(batch)
    set_log_levels(models.verbose)  # the stamp may ask a policy server already
    mark = stamp(rows, settings, models)
    prefix = json.dumps({"batch": mark}, ensure_ascii=False)[:-1].encode()

    def ours(row: dict[str, Any]) -> bool:
        theirs = row.get("batch")
        if isinstance(theirs, dict) and theirs != mark:
            other = "another batch file" if theirs.get("input") != mark["input"] else "other settings or models"
            raise ArgsLocalError(
                f"{out_path} holds results of {other}; refusing to mix them "
                "(choose another -o, or resume with the same batch file and flags)"
            )
        return theirs == mark and isinstance(row["index"], int) and 0 <= row["index"] < len(rows)

    if out_path is None:
        out, finished = contextlib.nullcontext(sys.stdout), []
    else:
        out, finished = open_results(out_path, [batch], resume, ours, "a batch result", lambda torn: prefix.startswith(torn) or torn.startswith(prefix))
    with out as stream:
        done = {row["index"] for row in finished}
        todo = list(pending(rows, done))
        echo(f"{len(rows)} rows, {len(done)} already done, {len(todo)} to run")
        if not todo:
            return
        engine = load_engine(models) if any(r.error is None for r in todo) else None
        writer = ResultWriter(stream)
        failed = 0
        for n, row in enumerate(todo, 1):
            record = {"batch": mark, "index": row.index, **run_row(row, settings, engine)}
            failed += "error" in record
            writer.write(record)
            done_what = "failed" if "error" in record else f"{record['tokens']} tokens, {record['elapsed_s']:.1f} s"
            echo(f"[{n}/{len(todo)}] row {row.index}: {done_what}, RSS {rss_mb():.0f} MB")
    if failed:
        raise ArgsLocalError(f"{failed} of {len(todo)} rows failed; their errors are in the output")


def run_row(row: Row, settings: Settings, engine) -> dict[str, Any]:
    """One row's result, or its error: whatever goes wrong in a row stays in that row."""
    if row.error is not None:
        return {"prompt": row.prompt, "error": row.error}
    try:
        request = engine.request(row.prompt, settings.update(row.overrides))
        return report(request, engine.generate(request), engine)
    except ArgsLocalError as e:
        return {"prompt": row.prompt, "error": str(e)}
    except Exception as e:  # a bug of ours: the row says so, and the batch goes on
        return {"prompt": row.prompt, "error": f"internal error: {type(e).__name__}: {e}"}


def echo(message: str) -> None:
    """Progress on stderr."""
    print(f"args-local: {message}", file=sys.stderr, flush=True)
