"""A measured process's GPU memory, for bench's worker: from NVML, nvidia-smi, or the devices' used-memory
growth. Standard library at import (NVML, where installed, is imported when asked for), as the worker's
other imports."""
from __future__ import annotations

import os
import subprocess
from typing import Optional


class DeviceMemory:
    """Device memory of this process (MiB, summed over GPUs) from NVML or nvidia-smi; where the
    process is not visible by its PID (a container's own PID namespace), the growth of the devices'
    used memory since this object was made (before the model was loaded)."""

    def __init__(self) -> None:
        self.method: Optional[str] = None
        self._nvml, self._handles, self._base = None, [], 0
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._base = sum(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles)
            self._nvml = pynvml
        except Exception:  # noqa: BLE001 - NVML is optional; nvidia-smi is tried next
            self._nvml = None

    def sample(self) -> Optional[float]:
        pid = os.getpid()
        if self._nvml is not None:
            try:
                used = sum(p.usedGpuMemory or 0 for h in self._handles
                           for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(h) if p.pid == pid)
                if used:
                    self.method = "process (NVML)"
                    return used / (1 << 20)
            except Exception:  # noqa: BLE001
                pass
        try:
            query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
            out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
            mine = [line.split(",")[1].strip() for line in out.splitlines()
                    if line.count(",") == 1 and line.split(",")[0].strip() == str(pid)]
            if mine and all(m.isdigit() for m in mine):
                self.method = "process (nvidia-smi)"
                return float(sum(int(m) for m in mine))
        except (OSError, subprocess.SubprocessError):
            pass
        if self._nvml is not None:
            try:
                used = sum(self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles)
                self.method = "device used-memory growth (NVML)"
                return max(0.0, (used - self._base) / (1 << 20))
            except Exception:  # noqa: BLE001
                pass
        return None
