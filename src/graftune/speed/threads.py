"""How many CPU threads torch runs: no more than the cores other programs leave free.

torch splits every matrix product and many other operations across its threads and waits for the last of them.
When another program keeps a core busy, the thread that shares that core runs only when the scheduler lets it, and
every operation waits for it. With the small operations of few-shot work (a few dozen short texts) that wait is
most of the time: ``graftune demo`` took 129 s with torch's default 2 threads on 2 cores beside one busy process,
and 29 s with 1 thread (``bench/busy_machine_threads.py``; once the budget changed the pick too: bench/RESULTS.md,
"Session 12"). Alone on the machine, 2 threads are faster than 1 (22 s against 28 s).

So when nobody chose a thread count (``--threads``, ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, or a launcher such
as torchrun or Ray that sets them), the CLI's computing commands measure how busy the cores are for a moment
before they start (psutil) and use at most the free ones, never fewer than 1, and say so when that is fewer than
torch's default. The library leaves torch's setting alone unless asked (``RunConfig.threads``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import psutil
import torch

#: the variables a user or a launcher sets to fix the thread count; when any is set it is left as it is
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: how long the cores' load is sampled before a command starts (seconds)
SAMPLE_S = 0.1
#: a core counts as free when other programs use less than this much of it on average over the sample
FREE_BELOW = 0.5


def usable_cores() -> int:
    """The logical CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def free_cores(sample_s: float = SAMPLE_S) -> float:
    """Cores of those this process may use that other programs leave free, measured over ``sample_s`` seconds
    (this process is idle meanwhile): ``usable_cores()`` minus the busy share of the whole machine."""
    busy = psutil.cpu_percent(interval=sample_s) / 100 * (psutil.cpu_count() or 1)
    return max(usable_cores() - busy, 0.0)


def fit_to_free_cores(requested: int | None = None, *, say: Callable[[str], None] | None = None,
                      measure: Callable[[], float] | None = None, choose: str = "OMP_NUM_THREADS=N") -> int:
    """Set torch's CPU threads and return the count: ``requested`` when given; torch's current setting when a
    thread variable (``THREAD_VARIABLES``) is set; else torch's default capped by the free cores (``measure``,
    default ``free_cores``; rounded: a core counts as free when at least ``1 - FREE_BELOW`` of it is), at least 1.
    ``say`` gets one line when the cap lowers the count, naming ``choose``: how to choose instead."""
    if requested is not None:
        torch.set_num_threads(requested)
        return requested
    current = torch.get_num_threads()
    if current <= 1 or any(os.environ.get(v) for v in THREAD_VARIABLES):
        return current
    try:
        free = (measure or free_cores)()
    except (OSError, psutil.Error):  # the load cannot be read here (a sandbox, say): torch's default, as before
        return current
    threads = max(1, min(current, math.floor(free + FREE_BELOW)))
    if threads < current:
        torch.set_num_threads(threads)
        if say is not None:
            busy = usable_cores() - free
            say(f"note: other programs keep about {busy:.1f} of the {usable_cores()} CPU cores busy; torch runs "
                f"{threads} thread{'s' if threads > 1 else ''} instead of {current} (threads beyond the free cores "
                f"wait for each other: many times slower); to choose: {choose}")
    return threads
