"""Memory readings for progress lines and timings: current and peak resident set size."""

from __future__ import annotations

import os
import resource
import sys


def rss_mb() -> float:
    """Resident memory now (Linux), to show that a long batch stays flat; the peak elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def available_bytes() -> int | None:
    """Memory that can be allocated without swapping (Linux's MemAvailable); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process.

    On Linux this is VmHWM: getrusage's ru_maxrss also counts, in a process started by
    another, the parent's memory at the fork, which made a 400 MB child look as big as its
    parent. Elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
