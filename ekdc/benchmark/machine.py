"""Where a bench ran: the CPU, cores, runtime versions, and the GPU where one is used."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Optional

import onnxruntime as ort

from ..cores import usable_cores


def machine_info(provider: str, threads: int) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "usable_cores": usable_cores(),
        "onnxruntime": ort.__version__, "provider": provider, "threads": threads,
        "python": platform.python_version(), "platform": platform.platform(),
    }
    if provider != "cpu":
        info["gpu"] = _gpu_name()
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# the instruction sets int8 and bf16 speed depends on (ONNX Runtime's and oneDNN's kernels pick by them)
FLAGS_THAT_MATTER = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
                     "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "bf16")


def cpu_flags() -> list[str]:
    """The CPU's instruction-set flags among ``FLAGS_THAT_MATTER`` (Linux's /proc/cpuinfo; [] elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("flags", "features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in FLAGS_THAT_MATTER if f in have]
    except OSError:
        pass
    return []


def _gpu_name() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None
