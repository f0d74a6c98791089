"""Sinkhorn-Knopp [mHC Eq. 9] with an exact hand-written backward through every iteration, like the paper's kernel
[mHC §4.3.1] (model.sinkhorn is the reference: the same iterations under autograd). Forward keeps only exp(logits);
backward recomputes the iterates and their normalisers and walks back through the normalisations: for Y = X / s,
s = X.sum(dim), dX = (dY - sum(dY * Y, dim)) / s. It works on (n, n, N) with the N tokens last, so every sum over
n is a vectorised add of token rows instead of a reduction over tiny inner dims (~240 small ops per call)."""

import torch


def sinkhorn(logits, iters=20):
    """(..., n, n) logits -> exp(logits - max), then `iters` rounds of column then row normalisation. Run it in fp32."""
    return Sinkhorn.apply(logits, iters)


def iterates(M, iters):
    """M (n, n, N) -> the 2 iters + 1 iterates (M first) and the 2 iters normalisers (columns, then rows)."""
    steps, sums = [M], []
    for _ in range(iters):
        for dim in (0, 1):
            sums.append(M.sum(dim=dim, keepdim=True))
            M = M / sums[-1]
            steps.append(M)
    return steps, sums


class Sinkhorn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, iters):
        n = logits.shape[-1]
        L = logits.reshape(-1, n, n).permute(1, 2, 0).contiguous()  # (n, n, N)
        M = torch.exp(L - L.amax(dim=(0, 1), keepdim=True))
        ctx.save_for_backward(M)
        ctx.shape, ctx.iters = logits.shape, iters
        M = iterates(M, iters)[0][-1]
        return M.permute(2, 0, 1).contiguous().view(logits.shape)  # contiguous: bmm on strided operands is slow

    @staticmethod
    def backward(ctx, g):
        steps, sums = iterates(ctx.saved_tensors[0], ctx.iters)
        n = ctx.shape[-1]
        g = g.reshape(-1, n, n).permute(1, 2, 0).contiguous()
        for i in range(len(sums), 0, -1):
            dim = 0 if i % 2 else 1
            g = (g - (g * steps[i]).sum(dim=dim, keepdim=True)) / sums[i - 1]
        return (g * steps[0]).permute(2, 0, 1).contiguous().view(ctx.shape), None  # exp; the max shift cancels
