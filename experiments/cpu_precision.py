#!/usr/bin/env python3
"""Which precision does ``precision: auto`` pick on a CPU? One training step (forward, backward, SGD) of a
CIFAR teacher, fp32 against bf16 autocast, channels_last, timed in the same process, rounds interleaved.

    python experiments/cpu_precision.py            # resnet20 and wrn_16_2, batch 128, 5 rounds

Prints each precision's median step time and the ratio bf16 / fp32, with the CPU's bf16 features.
``precision: auto`` takes bf16 wherever oneDNN supports it (ekdc/training/runtime.py), which is not
always the faster choice: where this prints a ratio above 1, set ``precision: fp32``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ekdc.models import create_model  # noqa: E402


def step_seconds(net, x, y, bf16: bool) -> float:
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet20,wrn_16_2")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"avx512_bf16 {torch.cpu._is_avx512_bf16_supported()}, amx {torch.cpu._is_amx_tile_supported()}")
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    for arch in args.arch.split(","):
        net = create_model(arch, num_classes=10).to(memory_format=torch.channels_last).train()
        for bf16 in (False, True):  # warm-up: oneDNN builds its kernels on the first call
            step_seconds(net, x, y, bf16)
        times = {False: [], True: []}
        for _ in range(args.rounds):
            for bf16 in (False, True):
                times[bf16].append(step_seconds(net, x, y, bf16))
        f32, b16 = statistics.median(times[False]), statistics.median(times[True])
        print(f"{arch}: fp32 {1e3 * f32:.0f} ms/step, bf16 autocast {1e3 * b16:.0f} ms/step, bf16/fp32 {b16 / f32:.2f}x")


if __name__ == "__main__":
    main()
