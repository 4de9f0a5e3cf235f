"""Peak memory of the current process, for the benches that measure each variant in a child.

VmHWM (/proc/self/status) belongs to the process's own address space, which exec replaces, so a
child started by subprocess reports its own peak. ru_maxrss does not: Linux carries it across
exec from the forked copy of the parent, so every child of a large parent reports at least the
parent's resident size (bench_step.py once printed 2578 MB for K = 1 and K = 1000 that way).
"""

from __future__ import annotations


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (VmHWM; Linux only)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
