"""The default thread count follows the cores that other processes leave free.

Why (docs/RELIABILITY.md, section Contention): the llama-cpp-python wheel's ggml CPU backend runs its graphs on
an OpenMP team; every graph node ends in a team barrier, and every node the engine observes starts a new
parallel region. When another process holds one of the cores, a thread of the team is descheduled and its
peers wait for it at each of several hundred barriers per token, spinning (libgomp's default) through the
time slice it needs. With a team no larger than the free cores nobody waits: one thread beside one busy
process keeps about the speed of an idle single thread. ggml's own threadpool and its `poll` setting are not
used by an OpenMP build, so the thread count is the knob that remains.

Free cores are measured, not guessed: between two readings at least PERIOD seconds apart, the busy time of
the CPUs this process may run on (/proc/stat) minus this process's own CPU time (/proc/self/stat) is what
others used, niced processes included (busy_ticks says why). A given n_threads (Session(n_threads=...),
`tova -t`) is never changed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

PERIOD = 0.25  # seconds between readings: /proc/stat counts in 10 ms ticks
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def allowed_cpus() -> set[int]:
    return (
        set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    )


def busy_ticks(stat: str, cpus: set[int]) -> int:
    """Busy ticks of the given CPUs in a /proc/stat text: user, nice, system, irq, softirq, steal. Niced
    processes count in full: a team that spins at its barriers collapses beside them too (a nice-5 process
    still has a third of a normal one's CFS weight), and /proc/stat does not say how niced they are."""
    busy = 0
    for line in stat.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        if int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
            busy += user + nice + system + irq + softirq + steal
    return busy


def read_cpu_ticks(cpus: set[int]) -> tuple[int, int]:
    """(busy ticks of the given CPUs, this process's user+system ticks), in CLK_TCK units."""
    with open("/proc/stat") as f:
        busy = busy_ticks(f.read(), cpus)
    with open("/proc/self/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 onwards
    own = int(fields[11]) + int(fields[12])  # utime, stime
    return busy, own


class FreeCores:
    """Chooses 1..max_threads threads from the cores other processes left free since the last reading.

    poll() is cheap (a clock read) except every PERIOD seconds, when it reads /proc. Rounds the free cores to
    the nearest integer, but grows only once the extra core is 3/4 free, so a load hovering at half a core
    does not flip the team size at every reading. Where /proc cannot be read it keeps max_threads."""

    def __init__(
        self,
        max_threads: int,
        cpus: set[int] | None = None,
        reader: Callable[[set[int]], tuple[int, int]] = read_cpu_ticks,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_threads = max(1, max_threads)
        self.cpus = cpus if cpus is not None else allowed_cpus()
        self.reader, self.clock = reader, clock
        self.threads = self.max_threads
        self.others = 0.0  # cores other processes used over the last period
        try:
            self.last = (self.clock(), *self.reader(self.cpus))
        except (OSError, ValueError, IndexError):
            self.last = None

    def poll(self) -> int:
        """The thread count to use for the next decode."""
        if self.last is None:
            return self.threads
        now = self.clock()
        t0, busy0, own0 = self.last
        if now - t0 < PERIOD:
            return self.threads
        try:
            busy, own = self.reader(self.cpus)
        except (OSError, ValueError, IndexError):
            return self.threads
        self.last = (now, busy, own)
        self.others = max(0.0, (busy - busy0) - (own - own0)) / CLK_TCK / (now - t0)
        free = min(len(self.cpus), self.max_threads) - self.others
        want = max(1, min(self.max_threads, int(free + 0.5)))
        if want < self.threads or free >= self.threads + 0.75:
            self.threads = want
        return self.threads
