"""Where training runs: device, precision, channels_last, and the process group under ``torchrun``."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import random
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import UserError


@dataclasses.dataclass
class Runtime:
    device: torch.device
    amp_dtype: Optional[torch.dtype]  # autocast dtype, None for fp32
    channels_last: bool
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def precision_text(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 AMP"}[self.amp_dtype]

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_pixels(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float RGB in [0,1] on the device (what teachers take)."""
        x = x_uint8.to(self.device, non_blocking=True).float().div_(255)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @staticmethod
    def normalize(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """[0,1] pixels -> the student's input (elementwise: the memory format is kept)."""
        return (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)

    def prepare(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def mean_over_ranks(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def sync_from_main(self, model: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers. DistributedDataParallel keeps parameters in
        step, but each rank's last forward updates its own BatchNorm statistics."""
        if self.world > 1:
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)

    def from_main(self, obj):
        """Rank 0's ``obj`` (picklable), on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (a write) on rank 0 only. Every rank learns whether it worked, so when rank 0 fails
        (a full disk, say) the others stop too instead of waiting for it in a collective forever."""
        self.on_every_rank(fn if self.is_main else lambda: None,
                           "rank 0 failed to write the run's files (its message says why); this rank stops too")

    def on_every_rank(self, fn: Callable[[], None],
                      others_say: str = "another rank failed (its message says why); this rank stops too") -> None:
        """Run ``fn`` on every rank; when any rank fails, every rank stops (the failing one with its own
        error, the others with a line saying so), instead of the others waiting in a collective forever."""
        err: Optional[BaseException] = None
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks are told
            err = e
        if self.world > 1:
            ok = torch.tensor([0 if err is not None else 1], dtype=torch.int32, device=self._collective_device())
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if err is None and int(ok.item()) == 0:
                raise UserError(others_say)
        if err is not None:
            raise err

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _cpu_bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=6)


def _autocast_dtype(precision: str, use_cuda: bool) -> Optional[torch.dtype]:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if not use_cuda:
            raise UserError("precision: fp16 autocast needs a CUDA GPU; on CPU use bf16, auto or fp32")
        return torch.float16
    if use_cuda:  # bf16 where the GPU has it in hardware (Ampere on); emulated bf16 (T4, V100) is far slower
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if _cpu_bf16_supported() else None


def setup_runtime(device: str, precision: str, channels_last: bool) -> Runtime:
    """The runtime a recipe's ``device``, ``precision`` and ``channels_last`` ask for; joins the process
    group when started by ``torchrun`` (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: '{device}' asked for, but no CUDA GPU is available (use device: auto or cpu)")
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda and world > 1 and ":" in device:  # every process would land on the one GPU named
        raise UserError(f"device: '{device}' names one GPU, but torchrun started {world} processes: use device: cuda "
                        "(each process takes the GPU of its LOCAL_RANK), and CUDA_VISIBLE_DEVICES to choose GPUs")
    if use_cuda:
        dev = torch.device(device if ":" in device else f"cuda:{local_rank if world > 1 else 0}")
        if dev.index >= torch.cuda.device_count():
            raise UserError(f"device {dev} asked for (process {local_rank} on this node), but this machine has "
                            f"{torch.cuda.device_count()} GPU(s): start at most that many processes a node "
                            "(torchrun --nproc_per_node), or set device: cpu")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    amp = _autocast_dtype(precision, use_cuda)
    if world > 1 and not dist.is_initialized():
        # some steps run on rank 0 alone while the others wait at a collective (planning a student by timing
        # candidates, building the teacher-output cache): NCCL's default 10-minute watchdog would kill them
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return Runtime(dev, amp, channels_last, rank, world)


def leave_process_group() -> None:
    """Leave the process group ``setup_runtime`` joined, at the end of a command. A gloo group left to the
    interpreter's exit is torn down while a peer may already have closed its sockets, which can abort
    that process (SIGABRT) after its work is done and fail the whole ``torchrun``."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
