"""An exponential moving average of a network's weights (Polyak averaging; airbench and timm use it).

The average of the last few hundred steps' weights sits nearer the middle of the valley SGD bounces
across, so it scores better than the last step's weights, most of all while the learning rate is still
high: it is what a stage with ``ema_decay`` evaluates, saves, folds and exports. BatchNorm's running
statistics are averaged the same way, so they stay those of weights close to the averaged ones.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class WeightEMA:
    """``decay`` per optimiser step, ramped in as ``min(decay, (1 + t) / (10 + t))`` so that the first
    steps' random weights fade out fast instead of lingering for 1 / (1 - decay) steps."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.steps = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        live = model.state_dict()
        floats = [k for k, v in self.state.items() if v.is_floating_point()]
        torch._foreach_lerp_([self.state[k] for k in floats], [live[k].detach() for k in floats], 1.0 - d)
        for k, v in self.state.items():
            if not v.is_floating_point():  # counters (num_batches_tracked) and flags: the live value
                v.copy_(live[k])

    def copy_to(self, model: nn.Module) -> None:
        """The averaged weights into ``model`` (what the stage hands on when it ends)."""
        model.load_state_dict(self.state)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "steps": self.steps, "state": self.state}

    def load_state_dict(self, saved: dict) -> None:
        self.steps = int(saved["steps"])
        for k, v in saved["state"].items():
            self.state[k].copy_(v)
