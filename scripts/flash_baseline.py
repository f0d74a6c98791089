"""
Causal softmax flash attention, forward and backward, as Triton kernels: the baseline that the static cost model
(scripts/kernel_cost.py) counts HyperGLU's kernels against, instruction for instruction at the same shapes. A
measuring stick, not a model path: model.py's softmax runs SDPA.

The algorithm is FlashAttention-2's (Dao, 2023). Forward: one program per block of BM query rows sweeps the key
blocks, keeping a running max and sum per row, and saves the output and the log-sum-exp. Backward: Delta =
rowsum(dO * O); one program per key block accumulates dK and dV over the rows that see it, one program per row
block accumulates dQ; both recompute P = exp(S - LSE). Each sweep runs the blocks below the diagonal unmasked,
then the diagonal blocks masked. Scores are in log2 units (exp2), as FlashAttention does.

q, k, v: (B, H, T, D), contiguous; D a power of two >= 16. Tested against SDPA under TRITON_INTERPRET=1
(tests/test_kernel_cost.py).
"""
import math

import torch
import triton
import triton.language as tl

from ops.launch import Launch, run

LOG2E = 1.4426950408889634
# tiles (rows x keys, warps, stages) per kernel; scripts/kernel_cost.py picks among CONFIGS by its estimate
CONFIGS = [dict(fwd=(128, 64, 8, 3), kv=(32, 128, 4, 3), q=(128, 32, 4, 3)),
           dict(fwd=(128, 64, 4, 3), kv=(64, 64, 4, 3), q=(64, 64, 4, 3)),
           dict(fwd=(64, 64, 4, 3), kv=(32, 64, 4, 3), q=(64, 32, 4, 3))]


@triton.jit
def _fwd(Q, K, V, O, LSE, T, qk_scale, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    rb, bh = tl.program_id(0), tl.program_id(1)
    m = rb * BM + tl.arange(0, BM)
    d = tl.arange(0, D)
    base = bh * T * D
    q = tl.load(Q + base + m[:, None] * D + d[None, :], mask=m[:, None] < T, other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for n0 in range(0, rb * BM, BN):  # below the diagonal: every key is visible
        n = n0 + tl.arange(0, BN)
        k = tl.load(K + base + n[:, None] * D + d[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + base + n[:, None] * D + d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    for n0 in range(rb * BM, tl.minimum(rb * BM + BM, T), BN):  # the diagonal blocks: causal mask
        n = n0 + tl.arange(0, BN)
        k = tl.load(K + base + n[:, None] * D + d[None, :], mask=n[:, None] < T, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where((m[:, None] >= n[None, :]) & (n[None, :] < T), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + base + n[:, None] * D + d[None, :], mask=n[:, None] < T, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + base + m[:, None] * D + d[None, :], acc.to(O.dtype.element_ty), mask=m[:, None] < T)
    tl.store(LSE + bh * T + m, m_i + tl.log2(l_i), mask=m < T)


@triton.jit
def _bwd_pre(O, DO, DELTA, T, D: tl.constexpr, BM: tl.constexpr):
    rb, bh = tl.program_id(0), tl.program_id(1)
    m = rb * BM + tl.arange(0, BM)
    d = tl.arange(0, D)
    at = bh * T * D + m[:, None] * D + d[None, :]
    o = tl.load(O + at, mask=m[:, None] < T, other=0.0).to(tl.float32)
    do = tl.load(DO + at, mask=m[:, None] < T, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * T + m, tl.sum(o * do, 1), mask=m < T)


@triton.jit
def _bwd_kv(Q, K, V, DO, LSE, DELTA, DK, DV, T, sm_scale, qk_scale, D: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr):
    kb, bh = tl.program_id(0), tl.program_id(1)
    n = kb * BN + tl.arange(0, BN)
    d = tl.arange(0, D)
    base = bh * T * D
    k = tl.load(K + base + n[:, None] * D + d[None, :], mask=n[:, None] < T, other=0.0)
    v = tl.load(V + base + n[:, None] * D + d[None, :], mask=n[:, None] < T, other=0.0)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    for m0 in range(kb * BN, tl.minimum(kb * BN + BN, T), BM):  # the diagonal row blocks: causal mask
        m = m0 + tl.arange(0, BM)
        q = tl.load(Q + base + m[:, None] * D + d[None, :], mask=m[:, None] < T, other=0.0)
        do = tl.load(DO + base + m[:, None] * D + d[None, :], mask=m[:, None] < T, other=0.0)
        lse = tl.load(LSE + bh * T + m, mask=m < T, other=0.0)
        delta = tl.load(DELTA + bh * T + m, mask=m < T, other=0.0)
        pT = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (BN, BM)
        pT = tl.where(m[None, :] >= n[:, None], pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do)
        dsT = pT * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q)
    for m0 in range(kb * BN + BN, T, BM):  # rows below: every pair is visible (rows past T load as 0)
        m = m0 + tl.arange(0, BM)
        q = tl.load(Q + base + m[:, None] * D + d[None, :], mask=m[:, None] < T, other=0.0)
        do = tl.load(DO + base + m[:, None] * D + d[None, :], mask=m[:, None] < T, other=0.0)
        lse = tl.load(LSE + bh * T + m, mask=m < T, other=0.0)
        delta = tl.load(DELTA + bh * T + m, mask=m < T, other=0.0)
        pT = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        dv += tl.dot(pT.to(do.dtype), do)
        dsT = pT * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q)
    tl.store(DK + base + n[:, None] * D + d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=n[:, None] < T)
    tl.store(DV + base + n[:, None] * D + d[None, :], dv.to(DV.dtype.element_ty), mask=n[:, None] < T)


@triton.jit
def _bwd_q(Q, K, V, DO, LSE, DELTA, DQ, T, sm_scale, qk_scale, D: tl.constexpr, BM: tl.constexpr,
           BN: tl.constexpr):
    rb, bh = tl.program_id(0), tl.program_id(1)
    m = rb * BM + tl.arange(0, BM)
    d = tl.arange(0, D)
    base = bh * T * D
    q = tl.load(Q + base + m[:, None] * D + d[None, :], mask=m[:, None] < T, other=0.0)
    do = tl.load(DO + base + m[:, None] * D + d[None, :], mask=m[:, None] < T, other=0.0)
    lse = tl.load(LSE + bh * T + m, mask=m < T, other=0.0)
    delta = tl.load(DELTA + bh * T + m, mask=m < T, other=0.0)
    dq = tl.zeros([BM, D], tl.float32)
    for n0 in range(0, rb * BM, BN):  # below the diagonal
        n = n0 + tl.arange(0, BN)
        k = tl.load(K + base + n[:, None] * D + d[None, :])
        v = tl.load(V + base + n[:, None] * D + d[None, :])
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    for n0 in range(rb * BM, tl.minimum(rb * BM + BM, T), BN):  # the diagonal blocks: causal mask
        n = n0 + tl.arange(0, BN)
        k = tl.load(K + base + n[:, None] * D + d[None, :], mask=n[:, None] < T, other=0.0)
        v = tl.load(V + base + n[:, None] * D + d[None, :], mask=n[:, None] < T, other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        p = tl.where((m[:, None] >= n[None, :]) & (n[None, :] < T), p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + base + m[:, None] * D + d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=m[:, None] < T)


def _blocks(T, B):
    return -(-T // B)


def _below(T, BM, BN):
    """Body runs of the unmasked sweep of a row-block program summed over the row blocks: block rb sweeps rb*BM/BN
    key blocks."""
    return sum(rb * BM // BN for rb in range(_blocks(T, BM)))


def _diagonal(T, BM, BN):
    return sum(_blocks(min(rb * BM + BM, T) - rb * BM, BN) for rb in range(_blocks(T, BM)))


def plan(B, H, T, D, dtype, cfg=None):
    """(forward launches, backward launches) for q, k, v of shape (B, H, T, D) in dtype."""
    cfg = cfg or CONFIGS[0]
    scale = 1.0 / math.sqrt(D)
    f32, size = torch.float32, torch.tensor([], dtype=dtype).element_size()
    io = B * H * T * D * size   # one (B, H, T, D) tensor
    row = B * H * T * 4         # one fp32 value per row
    BM, BN, warps, stages = cfg["fwd"]
    fwd = [Launch(_fwd, (_blocks(T, BM), B * H), dict(Q=dtype, K=dtype, V=dtype, O=dtype, LSE=f32),
                  dict(T=T, qk_scale=scale * LOG2E), dict(D=D, BM=BM, BN=BN), warps, stages,
                  [B * H * _below(T, BM, BN), B * H * _diagonal(T, BM, BN)], 4 * io + row)]
    bwd = [Launch(_bwd_pre, (_blocks(T, 64), B * H), dict(O=dtype, DO=dtype, DELTA=f32), dict(T=T),
                  dict(D=D, BM=64), 4, 1, [], 2 * io + row)]
    BM, BN, warps, stages = cfg["kv"]  # a key-block program: rows on the diagonal, then every row below
    diag = sum(_blocks(min(kb * BN + BN, T) - kb * BN, BM) for kb in range(_blocks(T, BN)))
    below = sum(_blocks(max(T - kb * BN - BN, 0), BM) for kb in range(_blocks(T, BN)))
    sc = dict(T=T, sm_scale=scale, qk_scale=scale * LOG2E)
    bwd.append(Launch(_bwd_kv, (_blocks(T, BN), B * H),
                      dict(Q=dtype, K=dtype, V=dtype, DO=dtype, LSE=f32, DELTA=f32, DK=dtype, DV=dtype), sc,
                      dict(D=D, BM=BM, BN=BN), warps, stages, [B * H * diag, B * H * below], 6 * io + 2 * row))
    BM, BN, warps, stages = cfg["q"]
    bwd.append(Launch(_bwd_q, (_blocks(T, BM), B * H),
                      dict(Q=dtype, K=dtype, V=dtype, DO=dtype, LSE=f32, DELTA=f32, DQ=dtype), sc,
                      dict(D=D, BM=BM, BN=BN), warps, stages,
                      [B * H * _below(T, BM, BN), B * H * _diagonal(T, BM, BN)], 5 * io + 2 * row))
    return fwd, bwd


class FlashAttention(torch.autograd.Function):
    """Causal softmax attention of q, k, v (B, H, T, D) through the kernels above."""

    @staticmethod
    def forward(ctx, q, k, v, cfg=None):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, T, D = q.shape
        fwd, _ = plan(B, H, T, D, q.dtype, cfg)
        o = torch.empty_like(q)
        lse = q.new_empty(B, H, T, dtype=torch.float32)
        run(fwd[0], Q=q, K=k, V=v, O=o, LSE=lse)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.cfg = cfg
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous()
        B, H, T, D = q.shape
        _, (pre, kv, dq_launch) = plan(B, H, T, D, q.dtype, ctx.cfg)
        delta = torch.empty_like(lse)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        run(pre, O=o, DO=do, DELTA=delta)
        run(kv, Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, DK=dk, DV=dv)
        run(dq_launch, Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, DQ=dq)
        return dq, dk, dv, None


def attention(q, k, v, cfg=None):
    return FlashAttention.apply(q, k, v, cfg)
