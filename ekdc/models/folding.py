"""Folding helpers every student family's ``fold`` uses: BatchNorm into the convolution before it, and N
branches' convolutions into one (stacked filters for a shared input, a grouped convolution otherwise)."""
from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def fuse_conv_bn(conv_bn: nn.Sequential) -> nn.Conv2d:
    """``Conv2d`` (no bias) + ``BatchNorm2d`` in eval mode -> one ``Conv2d`` with a bias."""
    conv, bn = conv_bn[0], conv_bn[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    # every attribute of the convolution carries over: only its weight and bias change
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode)
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_(bn.bias + (bias - bn.running_mean) * scale)
    return fused


@torch.no_grad()
def merge_convs(convs: list[nn.Conv2d], shared_input: bool) -> nn.Conv2d:
    """N convolutions of the same shape as one. ``shared_input``: they all read the same tensor, so
    their filters are stacked (N x out channels); that is only right for dense convolutions. Otherwise
    branch i reads channel slice i of a stacked tensor: a grouped convolution with N times the groups."""
    c = convs[0]
    if shared_input and c.groups != 1 and len(convs) > 1:
        raise ValueError("a grouped convolution reading a shared input cannot stack its filters: repeat the input")
    if len(convs) == 1:
        return c
    n = len(convs)
    groups = c.groups if shared_input else c.groups * n
    in_ch = c.in_channels if shared_input else c.in_channels * n
    merged = nn.Conv2d(in_ch, c.out_channels * n, c.kernel_size, c.stride, c.padding, dilation=c.dilation, groups=groups,
                       bias=True, padding_mode=c.padding_mode)
    merged.weight.copy_(torch.cat([k.weight for k in convs], 0))
    merged.bias.copy_(torch.cat([k.bias for k in convs], 0))
    return merged


def _stack_shared(convs: list[nn.Conv2d]) -> tuple[nn.Conv2d, bool]:
    """N convolutions reading the same tensor as one; returns (conv, whether its input must be repeated N
    times first). Dense filters stack (N x out channels). A grouped or depthwise convolution cannot stack
    (each group would read the wrong input channels): it runs as a grouped convolution over N copies."""
    if convs[0].groups == 1:
        return merge_convs(convs, shared_input=True), False
    return merge_convs(convs, shared_input=False), True
