"""How many threads fit this machine, read from its CPU topology rather than guessed.

llama.cpp decodes fastest with one thread per physical core: a second hyper-thread on a core
only competes for the same units. ``os.cpu_count() // 2`` assumes two threads per core and
halves the cores of machines that have one (many AMD and ARM servers, virtual machines).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable

SYSFS_CPU = Path("/sys/devices/system/cpu")


def usable_cpus() -> list[int]:
    """The logical CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores(cpus: Iterable[int] | None = None, sysfs: Path = SYSFS_CPU) -> int:
    """Physical cores among ``cpus`` (default: :func:`usable_cpus`), each counted once however
    many hardware threads it has: the distinct sibling sets of Linux's
    ``cpuN/topology/thread_siblings_list``, as llama.cpp counts them. Where those files do not
    exist: macOS's performance cores from sysctl, else llama.cpp's own guess from the count."""
    cpus = usable_cpus() if cpus is None else list(cpus)
    cores: set[str] = set()
    for cpu in cpus:
        try:
            cores.add((sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip())
        except OSError:
            cores.clear()
            break
    if cores:
        return len(cores)
    if sys.platform == "darwin":
        for key in ("hw.perflevel0.physicalcpu", "hw.physicalcpu"):
            found = _sysctl(key)
            if found:
                return found
    n = len(cpus) or 1
    return n if n <= 4 else n // 2


def _sysctl(key: str) -> int | None:
    """An integer from macOS's sysctl, or None when the key does not exist."""
    try:
        out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return int(out) if out.isdigit() and int(out) > 0 else None

