"""The causal depthwise KV conv as shifted multiply-adds with a hand-written backward (model.CausalConv1d's
reference is F.conv1d). On a CPU this is much faster than conv1d, and autograd over the shifted slices would
zero-fill a full-size gradient for every tap (docs/log.md)."""

import torch


def shift_conv(xp, w):
    """y (B,T,C) = sum_j xp[:, j:j+T] * w[:, j] for xp (B,T+k-1,C), the input left-padded with its k-1 previous rows,
    and w (C,k)."""
    return ShiftConv.apply(xp, w)


class ShiftConv(torch.autograd.Function):

    @staticmethod
    def forward(ctx, xp, w):
        ctx.save_for_backward(xp, w)
        T = xp.shape[1] - w.shape[1] + 1
        y = xp[:, :T] * w[:, 0]
        for j in range(1, w.shape[1]):
            y.addcmul_(xp[:, j:j + T], w[:, j])
        return y

    @staticmethod
    def backward(ctx, gy):
        xp, w = ctx.saved_tensors
        T = gy.shape[1]
        gx = torch.zeros_like(xp)
        for j in range(w.shape[1]):
            gx[:, j:j + T].addcmul_(gy, w[:, j])  # tap j read rows j..j+T-1
        gw = torch.stack([(gy * xp[:, j:j + T]).sum((0, 1)) for j in range(w.shape[1])], 1)
        return gx, gw.to(w.dtype)
