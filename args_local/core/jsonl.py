"""Resumable JSON-lines result files (batch and eval output).

A result file is written by one run at a time: :func:`open_results` locks it (``flock``,
released by the kernel when the process ends, however it ends) before reading a byte, so two
runs given the same ``-o`` cannot interleave their lines. On resume, every complete line must
be a result of this very run's work (the caller's ``is_result`` says so) or nothing is
touched; a last line without its newline (a run killed mid-write) is cut only once the file is
known to be ours: some complete line checked out, or the torn text is the start of a line this
run would write (``torn_ok``). A wrong ``-o`` never loses a byte.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import IO, Any, Callable, Sequence

from .errors import ArgsLocalError, UsageError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; results are still flushed line by line
    fcntl = None  # type: ignore[assignment]


def read_finished(
    path: Path,
    is_result: Callable[[dict[str, Any]], bool],
    what: str,
    torn_ok: Callable[[bytes], bool] = lambda torn: False,
) -> list[dict[str, Any]]:
    """The complete result lines of ``path`` (none when it does not exist), its torn last line
    cut as the module docstring says. A line that is not a JSON object accepted by ``is_result``
    is an error naming the line, and the file is left as it was."""
    if not path.exists():
        return []
    if not path.is_file():
        raise ArgsLocalError(f"{path} is not a regular file; choose another -o")
    rows, cut = _check_lines(path.read_bytes(), path, is_result, what, torn_ok)
    if cut is not None:
        os.truncate(path, cut)
    return rows


def open_results(
    path: Path,
    inputs: Sequence[Path],
    resume: bool,
    is_result: Callable[[dict[str, Any]], bool],
    what: str,
    torn_ok: Callable[[bytes], bool] = lambda torn: False,
) -> tuple[IO[str], list[dict[str, Any]]]:
    """``path`` opened for appending and locked for this run, with the results it already holds
    (resuming) -- or one sentence saying why not: it is one of the ``inputs``, it cannot be
    written, another run holds it, it holds results and this is not a resume, or it holds
    lines that are not this run's results. Meant to be called before any model loads."""
    for source in inputs:
        if path.exists() and source.exists() and os.path.samefile(path, source):
            raise UsageError(f"-o {path} is the input file itself; choose another output file")
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise ArgsLocalError(f"cannot write the output file {path}: {e.strerror}") from None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        if regular and fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ArgsLocalError(f"another run is writing {path} right now; wait for it to finish or choose another -o") from None
        if resume and not regular:
            raise ArgsLocalError(f"{path} is not a regular file, so it cannot be resumed; choose another -o")
        rows: list[dict[str, Any]] = []
        if regular and os.fstat(fd).st_size:
            if not resume:
                raise UsageError(f"{path} already holds results: pass --resume to continue it, or choose another -o")
            data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
            rows, cut = _check_lines(data, path, is_result, what, torn_ok)
            if cut is not None:
                os.ftruncate(fd, cut)
        return os.fdopen(fd, "a", encoding="utf-8"), rows  # closing it releases the lock
    except BaseException:
        os.close(fd)
        raise


def _check_lines(
    data: bytes, path: Path, is_result: Callable[[dict[str, Any]], bool], what: str, torn_ok: Callable[[bytes], bool]
) -> tuple[list[dict[str, Any]], int | None]:
    """The result rows of a file's complete lines, and where to cut it (None: nothing torn)."""
    keep = data.rfind(b"\n") + 1
    rows = []
    for number, line in enumerate(data[:keep].split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and is_result(row)
        except (ValueError, KeyError, TypeError, RecursionError):
            ok = False
        if not ok:
            raise ArgsLocalError(f"{path}:{number} is not {what}; refusing to resume into it (choose another -o)")
        rows.append(row)
    if keep == len(data):
        return rows, None
    if not (rows or torn_ok(data[keep:])):
        raise ArgsLocalError(f"{path} ends with a partial line that is not {what}; refusing to touch it (choose another -o)")
    return rows, keep
