"""How many CPUs this process may use: one fact that data loading, the planner, the bench and ONNX
Runtime sessions all size their threads and workers by."""
from __future__ import annotations

import os


def usable_cores() -> int:
    """The CPUs this process may run on (``taskset``, cgroups' cpusets), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
