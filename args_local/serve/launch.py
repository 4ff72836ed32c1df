"""Start ``args-local serve`` as a child process and stop it again: for tests and the load
script, which must never leave a server behind.

The child gets its own process group (so that everything it starts goes with it), listens
on 127.0.0.1 at a port the system picks (``--port 0``), and announces the port on stderr.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

READY = re.compile(rb"serving \S+ on (http://127\.0\.0\.1:(\d+)/v1)")


class ServerProcess:
    """A running ``args-local serve --host 127.0.0.1 --port 0 ARGS``; use it as a context
    manager, or call :meth:`stop`."""

    def __init__(self, args: Sequence[str] = (), env: dict[str, str] | None = None, timeout: float = 300) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="args-local-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "args_local", "serve", "--host", "127.0.0.1", "--port", "0", *args],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        deadline = time.monotonic() + timeout
        while (found := READY.search(self.output())) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                output = self.output().decode(errors="replace")
                self.__exit__()
                raise RuntimeError(f"args-local serve did not start:\n{output}")
            time.sleep(0.2)
        self.url, self.port = found.group(1).decode(), int(found.group(2))

    def output(self) -> bytes:
        """What the server has written to stdout and stderr so far."""
        return Path(self.log.name).read_bytes()

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to the server's process group, SIGKILL if it is still there after ``timeout``."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
            except ProcessLookupError:
                pass
        self.log.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        os.unlink(self.log.name)
