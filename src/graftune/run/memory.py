"""The one peak-memory measure: resident memory sampled from /proc while a block runs (``PeakMemory``), so that
several runs in one process (a comparison, auto's candidates) each get their own peak; where /proc is missing,
the process-lifetime peak from ``getrusage``."""

from __future__ import annotations

import os
import resource
import sys
import threading


class PeakMemory:
    """Peak resident memory (MB) of this process while a block runs, sampled every 50 ms from /proc (falls back to
    the process-lifetime peak where /proc is missing). ``with PeakMemory() as mem: ...``, then ``mem.peak``."""

    def __enter__(self):
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())
        if self.peak <= 0:
            self.peak = lifetime_peak_mb()


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def lifetime_peak_mb() -> float:
    """Peak resident memory of this process, MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
