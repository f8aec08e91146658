"""Folding helpers every student family's ``fold`` uses: BatchNorm into the convolution before it, N
branches' convolutions into one (stacked filters for a shared input, a grouped convolution otherwise), and
channels padded with zeros to whole SIMD blocks."""
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


# ONNX Runtime's CPU convolutions run fastest in its NCHWc layout, whose blocks are 16 floats on AVX-512 (8 on
# AVX2). A grouped convolution whose groups are not whole blocks falls back to plain NCHW with reorders around
# it: a 3-branch FastNet student of widths [64,72,80] ran 1.186 ms at batch 1, padded 0.779, and one of
# [64,80,80], which has more MACs, 0.811 (`python experiments/padded_widths.py`, docs/PADDED-WIDTHS.md).
PAD_CHANNELS = 16


def padded(channels: int, to: int = PAD_CHANNELS) -> int:
    """``channels`` rounded up to a multiple of ``to``."""
    return -(-channels // to) * to


@torch.no_grad()
def pad_conv(conv: nn.Conv2d, out_channels: int, in_channels: int) -> nn.Conv2d:
    """A dense convolution (with a bias) widened with zeros: filters of zeros (bias 0) appended up to
    ``out_channels``, and zero weights for the input channels appended up to ``in_channels``. On the original
    channels it computes what ``conv`` does; whatever the appended input channels hold is multiplied by 0,
    so a chain of padded convolutions computes the unpadded chain's function exactly."""
    if conv.groups != 1:
        raise ValueError("pad_conv pads a dense convolution (pad each branch before merging)")
    if (out_channels, in_channels) == (conv.out_channels, conv.in_channels):
        return conv
    wide = nn.Conv2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding,
                     dilation=conv.dilation, bias=True, padding_mode=conv.padding_mode)
    wide.weight.zero_()
    wide.weight[: conv.out_channels, : conv.in_channels] = conv.weight
    wide.bias.zero_()
    wide.bias[: conv.out_channels] = conv.bias
    return wide


def _stack_shared(convs: list[nn.Conv2d]) -> tuple[nn.Conv2d, bool]:
    """N convolutions reading the same tensor as one; returns (conv, whether its input must be repeated N
    times first). Dense filters stack (N x out channels). A grouped or depthwise convolution cannot stack
    (each group would read the wrong input channels): it runs as a grouped convolution over N copies."""
    if convs[0].groups == 1:
        return merge_convs(convs, shared_input=True), False
    return merge_convs(convs, shared_input=False), True
