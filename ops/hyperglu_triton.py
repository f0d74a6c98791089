"""
HyperGLU / HyperMLP on CUDA as Triton kernels: forward and backward, nothing T x T in memory.

The same rows as model.HyperGLU._rows in the lag layout, for one (batch, head) and query row t, keys i <= t, lag
l = t - i, the lag-indexed parameters read at l (U[l] is the row L-1-l of model.LagMix.U):
  z_e[i]  = q_e[t] . k_e[i]                                  e = gate (and scale for GLU) qk-head
  P_e     = sum_i z_e[i] U1_e[l]                  (r1,)      op1's row reduction, before its low-rank term
  z1_e[i] = z_e[i] S1_e[l] + (P_e * c1_e[t]) . Vt1_e[:, l]   S = shortcut + d  [R1 = I + diag(d) + U diag(c) Vt]
  a[i]    = softplus(z1_s[i]) relu(z1_g[i])                  (HyperMLP: relu(z1[i]))
  n       = ||z1_g||,  inv = 1 / max(n, eps)                 out_scale == l2 (ReLU is positively homogeneous)
  Q       = sum_i a[i] U2[l]                      (r2,)
  a2[i]   = a[i] S2[l] + (Q * c2[t]) . Vt2[:, l]
  out[t]  = inv sum_i a2[i] v[i]
Every row needs its whole row of z before op1's low-rank term and its whole row of a before op2's, so the kernels
sweep the key tiles more than once, recomputing the scores, and keep only per-row vectors between the sweeps.
Kernels, over tiles of BM query rows x BN keys in key order (tensor-core dots for q k^T, A V and their gradients;
the lag-indexed parameters gathered per element from the L1/L2-resident parameter vectors):
  _fwd_stats  per row block: sweep 1 P_e (op1), sweep 2 n and Q (op2)             -> P1, Q2, n     (saved)
  _fwd_out    per row block and block of DV value channels: a2 and A V            -> out           (saved)
  _bwd_rows   per row block: dQc (op2), dPc_e (op1), then dq                       -> dq, dc1, dc2, dP1, dQ2
  _bwd_keys   per key block: dk
  _bwd_values per key block and block of DV channels: dv = A2^T dy
and one over tiles of BM rows x BN lags, where a column is one lag, so the lag-indexed parameters are plain
vectors and their gradients column sums and small dots (the tile's scores come from a 2 BN-key window, skewed
through a per-program scratch tile):
  _bwd_params per lag block: dU, dVt, dd of both mixers, one partial per batch element, summed afterwards.
No atomics anywhere: the results are the same bits on every run.
Saved for backward: q, k, v, c1, c2 (the inputs), out, n, P1 (B,H1,T,r1) and Q2 (B,h,T,r2): O(T d) per head.
Backward with dy = dout inv and the row constant coef = -(dout . out) inv^2 (the norm's gradient, as the
FlashAttention Delta): da2 = dy v^T, dQc = sum_i da2 Vt2, da = da2 S2 + (dQc c2) . U2, dz1 from the activation
(+ coef z1_g for the norm), dPc_e = sum_i dz1_e Vt1_e, dz_e = dz1_e S1_e + (dPc_e c1_e) . U1_e.

Registered as the custom ops hypergpt::hyperglu_fwd / hyperglu_bwd (torch.library), so torch.compile keeps them in
its graph without a break, and autograd (hence DDP) sees one differentiable op. Runs wherever Triton runs: on a
GPU, and on the CPU under TRITON_INTERPRET=1 (the tests). Supports glu/relu, out_scale/l2/none, op1 and op2 on or
off, use_diag and the shortcut on or off, the lag layout with causal masking (ops/hyperglu.py takes the rest).
"""

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# tile sizes, BM == BN (the tests use 16 x 16); HYPERGLU_BLOCK="BM,BN,DVB,num_warps" in the environment overrides
# them. 32 x 32 with 4 warps spills least on sm_90 (scripts/kernel_report.py); not yet timed on a GPU.
BLOCK = dict(BM=32, BN=32, DVB=32, num_warps=4)
if os.environ.get("HYPERGLU_BLOCK"):
    BLOCK.update(zip(("BM", "BN", "DVB", "num_warps"), map(int, os.environ["HYPERGLU_BLOCK"].split(","))))


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _rows(ptr, m, mmask, D, DP: tl.constexpr):
    """Rows m of a (T, D) matrix at ptr, as a (BM, DP) block (columns >= D and rows outside mmask are 0)."""
    d = tl.arange(0, DP)
    return tl.load(ptr + m[:, None] * D + d[None, :], mask=mmask[:, None] & (d[None, :] < D), other=0.0)


@triton.jit
def _store_rows(ptr, x, m, mmask, D, DP: tl.constexpr):
    d = tl.arange(0, DP)
    tl.store(ptr + m[:, None] * D + d[None, :], x, mask=mmask[:, None] & (d[None, :] < D))


@triton.jit
def _softplus(x):
    """log(1 + e^x), accurate for very negative x too (the model's logaddexp(x, 0))."""
    e = tl.exp(-tl.abs(x))
    return tl.maximum(x, 0.0) + tl.where(e < 1e-4, e * (1.0 - e * (0.5 - e / 3.0)), tl.log(1.0 + e))


@triton.jit
def _lowrank(x, par, lag, valid, W, R, RP: tl.constexpr):
    """(BM, BN): sum_r x[m, r] par[r, lag[m, n]] for a per-row (BM, RP) x and a lag-major (R, W) parameter."""
    cols = tl.arange(0, RP)
    acc = tl.zeros(lag.shape, dtype=x.dtype)
    for r in range(R):
        xr = tl.sum(tl.where(cols[None, :] == r, x, 0.0), 1)
        acc += xr[:, None] * tl.load(par + r * W + lag, mask=valid, other=0.0)
    return acc


@triton.jit
def _rowsum(y, par, lag, valid, W, R, RP: tl.constexpr):
    """(BM, RP): column r = sum_n y[m, n] par[r, lag[m, n]], a row reduction against a lag-major parameter."""
    cols = tl.arange(0, RP)
    out = tl.zeros((y.shape[0], RP), dtype=y.dtype)
    for r in range(R):
        s = tl.sum(y * tl.load(par + r * W + lag, mask=valid, other=0.0), 1)
        out += tl.where(cols[None, :] == r, s[:, None], 0.0)
    return out


@triton.jit
def _heads(bh, h, GLU: tl.constexpr):
    """(j, g, s) for program bh = b h + j: the output head j and the flat (batch, qk-head) indices of its gate and
    scale qk-heads (s unused for HyperMLP)."""
    b, j = bh // h, bh % h
    H1 = 2 * h if GLU else h
    return j, b * H1 + j, b * H1 + h + j


@triton.jit
def _row_block(q, g, s, rb, TQ, row0, DK, DKP: tl.constexpr, GLU: tl.constexpr, BM: tl.constexpr):
    """Row block rb of the new queries: m, its mask, the absolute positions t and the gate / scale query rows."""
    m = rb * BM + tl.arange(0, BM)
    mmask = m < TQ
    qg = _rows(q + g * TQ * DK, m, mmask, DK, DKP)
    qs = qg
    if GLU:
        qs = _rows(q + s * TQ * DK, m, mmask, DK, DKP)
    return m, mmask, row0 + m, qg, qs


@triton.jit
def _controlled(P1, c1, g, s, m, mmask, TQ, R1, R1P: tl.constexpr, GLU: tl.constexpr, OP1: tl.constexpr,
                ACC: tl.constexpr, BM: tl.constexpr):
    """P_e c1_e (BM, R1P) of the gate and scale heads: op1's per-row low-rank coefficients (0 with op1 off)."""
    pcg = tl.zeros((BM, R1P), dtype=ACC)
    pcs = pcg
    if OP1:
        pcg = _rows(P1 + g * TQ * R1, m, mmask, R1, R1P) * _rows(c1 + g * TQ * R1, m, mmask, R1, R1P).to(ACC)
        if GLU:
            pcs = _rows(P1 + s * TQ * R1, m, mmask, R1, R1P) * _rows(c1 + s * TQ * R1, m, mmask, R1, R1P).to(ACC)
    return pcg, pcs


@triton.jit
def _tile(qg, qs, kg, ks, t, mmask, i0, TK, pcg, pcs, S1g, S1s, Vt1g, Vt1s, W,
          DK, DKP: tl.constexpr, R1, R1P: tl.constexpr,
          GLU: tl.constexpr, OP1: tl.constexpr, ACC: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """The forward chain on the tile (rows t, keys i0..i0+BN): lag, valid, the key blocks (BN, DKP), z, z1 and a.
    Entries outside `valid` (future or missing keys, rows past the end) are 0."""
    n = i0 + tl.arange(0, BN)
    nmask = n < TK
    lag = t[:, None] - n[None, :]
    valid = mmask[:, None] & nmask[None, :] & (lag >= 0)
    lag = tl.where(valid, lag, 0)
    kgt = _rows(kg, n, nmask, DK, DKP)
    zg = tl.where(valid, tl.dot(qg, tl.trans(kgt), input_precision=PREC).to(ACC), 0.0)
    z1g = zg
    if OP1:
        z1g = zg * tl.load(S1g + lag, mask=valid, other=0.0) + _lowrank(pcg, Vt1g, lag, valid, W, R1, R1P)
    kst, zs, z1s = kgt, zg, z1g
    if GLU:
        kst = _rows(ks, n, nmask, DK, DKP)
        zs = tl.where(valid, tl.dot(qs, tl.trans(kst), input_precision=PREC).to(ACC), 0.0)
        z1s = zs
        if OP1:
            z1s = zs * tl.load(S1s + lag, mask=valid, other=0.0) + _lowrank(pcs, Vt1s, lag, valid, W, R1, R1P)
        a = tl.where(valid, _softplus(z1s) * tl.maximum(z1g, 0.0), 0.0)
    else:
        a = tl.maximum(z1g, 0.0)
    return n, nmask, lag, valid, kgt, kst, zg, zs, z1g, z1s, a


@triton.jit
def _dav(dy, v, m, mmask, n, nmask, DV, DVB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
         ACC: tl.constexpr, PREC: tl.constexpr):
    """(BM, BN) dy[m] . v[n] over all DV channels, DVB at a time: the gradient of the map before the norm."""
    acc = tl.zeros((BM, BN), dtype=ACC)
    for c in range(0, DV, DVB):
        d = c + tl.arange(0, DVB)
        dyc = tl.load(dy + m[:, None] * DV + d[None, :], mask=mmask[:, None] & (d[None, :] < DV), other=0.0)
        vc = tl.load(v + n[:, None] * DV + d[None, :], mask=nmask[:, None] & (d[None, :] < DV), other=0.0)
        acc += tl.dot(dyc, tl.trans(vc), input_precision=PREC).to(ACC)
    return acc


@triton.jit
def _act_bwd(da, z1g, z1s, coef, GLU: tl.constexpr):
    """dz1 of the gate (and scale) heads from da = d(loss)/d a; coef z1_g is the norm's part."""
    if GLU:
        dz1g = tl.where(z1g > 0, da * _softplus(z1s), 0.0) + coef[:, None] * z1g
        dz1s = da * tl.maximum(z1g, 0.0) * tl.sigmoid(z1s)
    else:
        dz1g = tl.where(z1g > 0, da, 0.0) + coef[:, None] * z1g
        dz1s = dz1g
    return dz1g, dz1s


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _fwd_stats(q, k, c1, c2, U1T, Vt1T, S1, U2T, P1, Q2, NRM, h, TQ, TK, W, row0,
               DK, DKP: tl.constexpr, R1, R1P: tl.constexpr, R2,
               R2P: tl.constexpr, GLU: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, NORM: tl.constexpr,
               ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    rb, bh = tl.program_id(0), tl.program_id(1)
    j, g, s = _heads(bh, h, GLU)
    m, mmask, t, qg, qs = _row_block(q, g, s, rb, TQ, row0, DK, DKP, GLU, BM)
    hi = tl.minimum(TK, row0 + rb * BM + BM)  # keys a row of this block can see
    kg, ks = k + g * TK * DK, k + s * TK * DK
    U1g, U1s, Vt1g, Vt1s = U1T + j * R1 * W, U1T + (h + j) * R1 * W, Vt1T + j * R1 * W, Vt1T + (h + j) * R1 * W
    S1g, S1s = S1 + j * W, S1 + (h + j) * W
    pcg = tl.zeros((BM, R1P), dtype=ACC)
    pcs = pcg
    if OP1:  # sweep 1: P_e = sum_i z_e[i] U1_e[l]
        Pg = tl.zeros((BM, R1P), dtype=ACC)
        Ps = Pg
        for i0 in range(0, hi, BN):
            n, nmask, lag, valid, kgt, kst, zg, zs, z1g, z1s, a = _tile(
                qg, qs, kg, ks, t, mmask, i0, TK, pcg, pcs, S1g, S1s, Vt1g, Vt1s, W, DK, DKP, R1, R1P, GLU, False,
                ACC, BN, PREC)
            Pg += _rowsum(zg, U1g, lag, valid, W, R1, R1P)
            if GLU:
                Ps += _rowsum(zs, U1s, lag, valid, W, R1, R1P)
        _store_rows(P1 + g * TQ * R1, Pg, m, mmask, R1, R1P)
        pcg = Pg * _rows(c1 + g * TQ * R1, m, mmask, R1, R1P).to(ACC)
        if GLU:
            _store_rows(P1 + s * TQ * R1, Ps, m, mmask, R1, R1P)
            pcs = Ps * _rows(c1 + s * TQ * R1, m, mmask, R1, R1P).to(ACC)
    nsq = tl.zeros((BM,), dtype=ACC)
    Q = tl.zeros((BM, R2P), dtype=ACC)
    for i0 in range(0, hi, BN):  # sweep 2: the norm and Q = sum_i a[i] U2[l]
        n, nmask, lag, valid, kgt, kst, zg, zs, z1g, z1s, a = _tile(
            qg, qs, kg, ks, t, mmask, i0, TK, pcg, pcs, S1g, S1s, Vt1g, Vt1s, W, DK, DKP, R1, R1P, GLU, OP1, ACC,
            BN, PREC)
        if NORM:
            nsq += tl.sum(z1g * z1g, 1)
        if OP2:
            Q += _rowsum(a, U2T + j * R2 * W, lag, valid, W, R2, R2P)
    if NORM:
        tl.store(NRM + bh * TQ + m, tl.sqrt(nsq), mask=mmask)
    if OP2:
        _store_rows(Q2 + bh * TQ * R2, Q, m, mmask, R2, R2P)


@triton.jit
def _fwd_out(q, k, v, c1, c2, Vt1T, S1, Vt2T, S2, P1, Q2, NRM, OUT, h, TQ, TK, W, row0, eps,
             DK, DKP: tl.constexpr, DV, DVB: tl.constexpr, R1,
             R1P: tl.constexpr, R2, R2P: tl.constexpr, GLU: tl.constexpr, OP1: tl.constexpr,
             OP2: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             PREC: tl.constexpr):
    rb, bh, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    j, g, s = _heads(bh, h, GLU)
    m, mmask, t, qg, qs = _row_block(q, g, s, rb, TQ, row0, DK, DKP, GLU, BM)
    hi = tl.minimum(TK, row0 + rb * BM + BM)
    pcg, pcs = _controlled(P1, c1, g, s, m, mmask, TQ, R1, R1P, GLU, OP1, ACC, BM)
    qc = tl.zeros((BM, R2P), dtype=ACC)
    if OP2:
        qc = _rows(Q2 + bh * TQ * R2, m, mmask, R2, R2P) * _rows(c2 + bh * TQ * R2, m, mmask, R2, R2P).to(ACC)
    d = cb * DVB + tl.arange(0, DVB)
    dmask = d < DV
    vj = v + bh * TK * DV
    acc = tl.zeros((BM, DVB), dtype=ACC)
    for i0 in range(0, hi, BN):
        n, nmask, lag, valid, kgt, kst, zg, zs, z1g, z1s, a = _tile(
            qg, qs, k + g * TK * DK, k + s * TK * DK, t, mmask, i0, TK, pcg, pcs, S1 + j * W, S1 + (h + j) * W,
            Vt1T + j * R1 * W, Vt1T + (h + j) * R1 * W, W, DK, DKP, R1, R1P, GLU, OP1, ACC, BN, PREC)
        a2 = a
        if OP2:
            a2 = a * tl.load(S2 + j * W + lag, mask=valid, other=0.0) + _lowrank(qc, Vt2T + j * R2 * W, lag, valid,
                                                                                  W, R2, R2P)
        vt = tl.load(vj + n[:, None] * DV + d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
        acc += tl.dot(a2.to(vt.dtype), vt, input_precision=PREC).to(ACC)
    if NORM:
        acc = acc / tl.maximum(tl.load(NRM + bh * TQ + m, mask=mmask, other=1.0), eps)[:, None]
    tl.store(OUT + bh * TQ * DV + m[:, None] * DV + d[None, :], acc, mask=mmask[:, None] & dmask[None, :])


@triton.jit
def _bwd_rows(q, k, v, c1, c2, U1T, Vt1T, S1, U2T, Vt2T, S2, P1, Q2, DY, COEF, DQ, DC1, DC2, DP1, DQ2,
              h, TQ, TK, W, row0,
              DK, DKP: tl.constexpr, DV, DVB: tl.constexpr, R1,
              R1P: tl.constexpr, R2, R2P: tl.constexpr, GLU: tl.constexpr, OP1: tl.constexpr,
              OP2: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    rb, bh = tl.program_id(0), tl.program_id(1)
    j, g, s = _heads(bh, h, GLU)
    m, mmask, t, qg, qs = _row_block(q, g, s, rb, TQ, row0, DK, DKP, GLU, BM)
    hi = tl.minimum(TK, row0 + rb * BM + BM)
    kg, ks, vj, dy = k + g * TK * DK, k + s * TK * DK, v + bh * TK * DV, DY + bh * TQ * DV
    U1g, U1s, Vt1g, Vt1s = U1T + j * R1 * W, U1T + (h + j) * R1 * W, Vt1T + j * R1 * W, Vt1T + (h + j) * R1 * W
    S1g, S1s, U2j, Vt2j, S2j = S1 + j * W, S1 + (h + j) * W, U2T + j * R2 * W, Vt2T + j * R2 * W, S2 + j * W
    coef = tl.load(COEF + bh * TQ + m, mask=mmask, other=0.0)
    pcg = tl.zeros((BM, R1P), dtype=ACC)
    pcs, Pg, Ps, c1g, c1s = pcg, pcg, pcg, pcg, pcg
    if OP1:
        Pg = _rows(P1 + g * TQ * R1, m, mmask, R1, R1P)
        c1g = _rows(c1 + g * TQ * R1, m, mmask, R1, R1P).to(ACC)
        pcg = Pg * c1g
        if GLU:
            Ps = _rows(P1 + s * TQ * R1, m, mmask, R1, R1P)
            c1s = _rows(c1 + s * TQ * R1, m, mmask, R1, R1P).to(ACC)
            pcs = Ps * c1s
    dQ = tl.zeros((BM, R2P), dtype=ACC)
    if OP2:  # sweep 1: dQc = sum_i da2[i] Vt2[:, l], da2 = dy . v[i]
        dQc = tl.zeros((BM, R2P), dtype=ACC)
        for i0 in range(0, hi, BN):
            n = i0 + tl.arange(0, BN)
            nmask = n < TK
            lag = t[:, None] - n[None, :]
            valid = mmask[:, None] & nmask[None, :] & (lag >= 0)
            lag = tl.where(valid, lag, 0)
            da2 = tl.where(valid, _dav(dy, vj, m, mmask, n, nmask, DV, DVB, BM, BN, ACC, PREC), 0.0)
            dQc += _rowsum(da2, Vt2j, lag, valid, W, R2, R2P)
        Qr = _rows(Q2 + bh * TQ * R2, m, mmask, R2, R2P)
        c2r = _rows(c2 + bh * TQ * R2, m, mmask, R2, R2P).to(ACC)
        dQ = dQc * c2r
        _store_rows(DC2 + bh * TQ * R2, dQc * Qr, m, mmask, R2, R2P)
        _store_rows(DQ2 + bh * TQ * R2, dQ, m, mmask, R2, R2P)
    dPg = tl.zeros((BM, R1P), dtype=ACC)
    dPs = dPg
    if OP1:  # sweep 2: dPc_e = sum_i dz1_e[i] Vt1_e[:, l]
        dPcg = tl.zeros((BM, R1P), dtype=ACC)
        dPcs = dPcg
        for i0 in range(0, hi, BN):
            n, nmask, lag, valid, kgt, kst, zg, zs, z1g, z1s, a = _tile(
                qg, qs, kg, ks, t, mmask, i0, TK, pcg, pcs, S1g, S1s, Vt1g, Vt1s, W, DK, DKP, R1, R1P, GLU, OP1,
                ACC, BN, PREC)
            da = tl.where(valid, _dav(dy, vj, m, mmask, n, nmask, DV, DVB, BM, BN, ACC, PREC), 0.0)
            if OP2:
                da = da * tl.load(S2j + lag, mask=valid, other=0.0) + _lowrank(dQ, U2j, lag, valid, W, R2, R2P)
            dz1g, dz1s = _act_bwd(da, z1g, z1s, coef, GLU)
            dPcg += _rowsum(dz1g, Vt1g, lag, valid, W, R1, R1P)
            if GLU:
                dPcs += _rowsum(dz1s, Vt1s, lag, valid, W, R1, R1P)
        dPg = dPcg * c1g
        _store_rows(DC1 + g * TQ * R1, dPcg * Pg, m, mmask, R1, R1P)
        _store_rows(DP1 + g * TQ * R1, dPg, m, mmask, R1, R1P)
        if GLU:
            dPs = dPcs * c1s
            _store_rows(DC1 + s * TQ * R1, dPcs * Ps, m, mmask, R1, R1P)
            _store_rows(DP1 + s * TQ * R1, dPs, m, mmask, R1, R1P)
    dqg = tl.zeros((BM, DKP), dtype=ACC)
    dqs = dqg
    for i0 in range(0, hi, BN):  # sweep 3: dz_e and dq_e = sum_i dz_e[i] k_e[i]
        n, nmask, lag, valid, kgt, kst, zg, zs, z1g, z1s, a = _tile(
            qg, qs, kg, ks, t, mmask, i0, TK, pcg, pcs, S1g, S1s, Vt1g, Vt1s, W, DK, DKP, R1, R1P, GLU, OP1, ACC,
            BN, PREC)
        da = tl.where(valid, _dav(dy, vj, m, mmask, n, nmask, DV, DVB, BM, BN, ACC, PREC), 0.0)
        if OP2:
            da = da * tl.load(S2j + lag, mask=valid, other=0.0) + _lowrank(dQ, U2j, lag, valid, W, R2, R2P)
        dz1g, dz1s = _act_bwd(da, z1g, z1s, coef, GLU)
        dzg = dz1g
        if OP1:
            dzg = dz1g * tl.load(S1g + lag, mask=valid, other=0.0) + _lowrank(dPg, U1g, lag, valid, W, R1, R1P)
        dqg += tl.dot(dzg.to(kgt.dtype), kgt, input_precision=PREC).to(ACC)
        if GLU:
            dzs = dz1s
            if OP1:
                dzs = dz1s * tl.load(S1s + lag, mask=valid, other=0.0) + _lowrank(dPs, U1s, lag, valid, W, R1, R1P)
            dqs += tl.dot(dzs.to(kst.dtype), kst, input_precision=PREC).to(ACC)
    _store_rows(DQ + g * TQ * DK, dqg, m, mmask, DK, DKP)
    if GLU:
        _store_rows(DQ + s * TQ * DK, dqs, m, mmask, DK, DKP)


@triton.jit
def _bwd_keys(q, k, v, c1, c2, U1T, Vt1T, S1, U2T, S2, P1, DY, COEF, DP1, DQ2, DK_, h, TQ, TK, W, row0,
              DK, DKP: tl.constexpr, DV, DVB: tl.constexpr, R1, R1P: tl.constexpr, R2, R2P: tl.constexpr,
              GLU: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr, PREC: tl.constexpr):
    kb, bh = tl.program_id(0), tl.program_id(1)
    j, g, s = _heads(bh, h, GLU)
    i0 = kb * BN
    kg, ks, vj, dy = k + g * TK * DK, k + s * TK * DK, v + bh * TK * DV, DY + bh * TQ * DV
    U1g, U1s, Vt1g, Vt1s = U1T + j * R1 * W, U1T + (h + j) * R1 * W, Vt1T + j * R1 * W, Vt1T + (h + j) * R1 * W
    S1g, S1s, U2j, S2j = S1 + j * W, S1 + (h + j) * W, U2T + j * R2 * W, S2 + j * W
    dkg = tl.zeros((BN, DKP), dtype=ACC)
    dks = dkg
    for rb in range(tl.maximum(i0 - row0, 0) // BM, tl.cdiv(TQ, BM)):  # the row blocks with a row t >= i0
        m, mmask, t, qg, qs = _row_block(q, g, s, rb, TQ, row0, DK, DKP, GLU, BM)
        coef = tl.load(COEF + bh * TQ + m, mask=mmask, other=0.0)
        pcg, pcs = _controlled(P1, c1, g, s, m, mmask, TQ, R1, R1P, GLU, OP1, ACC, BM)
        dPg = tl.zeros((BM, R1P), dtype=ACC)
        dPs = dPg
        if OP1:
            dPg = _rows(DP1 + g * TQ * R1, m, mmask, R1, R1P)
            if GLU:
                dPs = _rows(DP1 + s * TQ * R1, m, mmask, R1, R1P)
        n, nmask, lag, valid, kgt, kst, zg, zs, z1g, z1s, a = _tile(
            qg, qs, kg, ks, t, mmask, i0, TK, pcg, pcs, S1g, S1s, Vt1g, Vt1s, W, DK, DKP, R1, R1P, GLU, OP1, ACC,
            BN, PREC)
        da = tl.where(valid, _dav(dy, vj, m, mmask, n, nmask, DV, DVB, BM, BN, ACC, PREC), 0.0)
        if OP2:
            dQ = _rows(DQ2 + bh * TQ * R2, m, mmask, R2, R2P)
            da = da * tl.load(S2j + lag, mask=valid, other=0.0) + _lowrank(dQ, U2j, lag, valid, W, R2, R2P)
        dz1g, dz1s = _act_bwd(da, z1g, z1s, coef, GLU)
        dzg = dz1g
        if OP1:
            dzg = dz1g * tl.load(S1g + lag, mask=valid, other=0.0) + _lowrank(dPg, U1g, lag, valid, W, R1, R1P)
        dkg += tl.dot(tl.trans(dzg).to(qg.dtype), qg, input_precision=PREC).to(ACC)
        if GLU:
            dzs = dz1s
            if OP1:
                dzs = dz1s * tl.load(S1s + lag, mask=valid, other=0.0) + _lowrank(dPs, U1s, lag, valid, W, R1, R1P)
            dks += tl.dot(tl.trans(dzs).to(qs.dtype), qs, input_precision=PREC).to(ACC)
    n = i0 + tl.arange(0, BN)
    _store_rows(DK_ + g * TK * DK, dkg, n, n < TK, DK, DKP)
    if GLU:
        _store_rows(DK_ + s * TK * DK, dks, n, n < TK, DK, DKP)


@triton.jit
def _lag_block(par, l, lmask, W, R, RP: tl.constexpr):
    """(RP, BN) block of a lag-major (R, W) parameter at lags l."""
    r = tl.arange(0, RP)
    return tl.load(par + r[:, None] * W + l[None, :], mask=(r[:, None] < R) & lmask[None, :], other=0.0)


@triton.jit
def _window_dot(x, y, m, mmask, w, wmask, D, DP: tl.constexpr, BM: tl.constexpr, ACC: tl.constexpr,
                PREC: tl.constexpr):
    """(BM, len(w)) x[m] . y[w] over D channels (DP at a time): rows m of x against a window w of y's rows."""
    acc = tl.zeros((BM, w.shape[0]), dtype=ACC)
    for c in range(0, D, DP):
        d = c + tl.arange(0, DP)
        xc = tl.load(x + m[:, None] * D + d[None, :], mask=mmask[:, None] & (d[None, :] < D), other=0.0)
        yc = tl.load(y + w[:, None] * D + d[None, :], mask=wmask[:, None] & (d[None, :] < D), other=0.0)
        acc += tl.dot(xc, tl.trans(yc), input_precision=PREC).to(ACC)
    return acc


@triton.jit
def _to_lag(win, scr, BM: tl.constexpr, BN: tl.constexpr):
    """(BM, BN) lag tile y[m, n] = win[m, m + BN-1 - n] of a (BM, 2 BN) key window whose column w holds key
    t0 + w - (l0 + BN-1), t0 the first row and l0 the first lag: row m's key at lag l0 + n. Through a per-program
    scratch tile; the barriers keep the program's threads from reading before all have written."""
    mm = tl.arange(0, BM)
    ww = tl.arange(0, 2 * BN)
    tl.debug_barrier()
    tl.store(scr + mm[:, None] * (2 * BN) + ww[None, :], win)
    tl.debug_barrier()
    nn = tl.arange(0, BN)
    return tl.load(scr + mm[:, None] * (2 * BN) + mm[:, None] + (BN - 1) - nn[None, :])


@triton.jit
def _bwd_params(q, k, v, c1, c2, U1T, Vt1T, S1, U2T, Vt2T, S2, P1, Q2, DY, COEF, DP1, DQ2, SCR,
                DU1T, DVT1T, DS1, DU2T, DVT2T, DS2, h, TQ, TK, W, row0,
                DK, DKP: tl.constexpr, DV, DVB: tl.constexpr, R1, R1P: tl.constexpr, R2, R2P: tl.constexpr,
                GLU: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, PREC: tl.constexpr):
    """The lag-indexed parameters' gradients, per (block of BN lags, batch, head), in lag tiles: a tile's columns
    share one lag, so each gradient is a column sum or a small dot, kept in registers over all row blocks and
    written once per batch element (summed over the batch afterwards): deterministic, no atomics."""
    lb, bh = tl.program_id(0), tl.program_id(1)
    j, g, s = _heads(bh, h, GLU)
    l0 = lb * BN
    lg = l0 + tl.arange(0, BN)
    lmask = lg < W
    scr = SCR + (lb * tl.num_programs(1) + bh) * BM * 2 * BN
    U1g, U1s, Vt1g, Vt1s = U1T + j * R1 * W, U1T + (h + j) * R1 * W, Vt1T + j * R1 * W, Vt1T + (h + j) * R1 * W
    S1g = tl.zeros((BN,), dtype=ACC)
    S1s, S2j = S1g, S1g
    if OP1:
        S1g = tl.load(S1 + j * W + lg, mask=lmask, other=0.0)
        if GLU:
            S1s = tl.load(S1 + (h + j) * W + lg, mask=lmask, other=0.0)
    if OP2:
        S2j = tl.load(S2 + j * W + lg, mask=lmask, other=0.0)
    gVt1g = tl.zeros((R1P, BN), dtype=ACC)
    gU1g, gVt1s, gU1s = gVt1g, gVt1g, gVt1g
    gS1g = tl.zeros((BN,), dtype=ACC)
    gS1s, gS2 = gS1g, gS1g
    gVt2 = tl.zeros((R2P, BN), dtype=ACC)
    gU2 = gVt2
    for rb in range(tl.maximum(l0 - row0, 0) // BM, tl.cdiv(TQ, BM)):  # the row blocks with a row t >= l0
        m = rb * BM + tl.arange(0, BM)
        mmask = m < TQ
        t = row0 + m
        valid = mmask[:, None] & lmask[None, :] & (lg[None, :] <= t[:, None])
        w = row0 + rb * BM - l0 - (BN - 1) + tl.arange(0, 2 * BN)  # the keys of the tile's rows at these lags
        wmask = (w >= 0) & (w < TK)
        zg = tl.where(valid, _to_lag(_window_dot(q + g * TQ * DK, k + g * TK * DK, m, mmask, w, wmask, DK, DKP,
                                                  BM, ACC, PREC), scr, BM, BN), 0.0)
        z1g = zg
        coef = tl.load(COEF + bh * TQ + m, mask=mmask, other=0.0)
        pcg, pcs = _controlled(P1, c1, g, s, m, mmask, TQ, R1, R1P, GLU, OP1, ACC, BM)
        if OP1:
            z1g = zg * S1g[None, :] + tl.dot(pcg, _lag_block(Vt1g, lg, lmask, W, R1, R1P), input_precision="ieee")
        zs, z1s = zg, z1g
        if GLU:
            zs = tl.where(valid, _to_lag(_window_dot(q + s * TQ * DK, k + s * TK * DK, m, mmask, w, wmask, DK,
                                                      DKP, BM, ACC, PREC), scr, BM, BN), 0.0)
            z1s = zs
            if OP1:
                z1s = zs * S1s[None, :] + tl.dot(pcs, _lag_block(Vt1s, lg, lmask, W, R1, R1P), input_precision="ieee")
            a = tl.where(valid, _softplus(z1s) * tl.maximum(z1g, 0.0), 0.0)
        else:
            a = tl.where(valid, tl.maximum(z1g, 0.0), 0.0)
        z1g = tl.where(valid, z1g, 0.0)
        da2 = tl.where(valid, _to_lag(_window_dot(DY + bh * TQ * DV, v + bh * TK * DV, m, mmask, w, wmask, DV,
                                                   DVB, BM, ACC, PREC), scr, BM, BN), 0.0)
        da = da2
        if OP2:
            qc = _rows(Q2 + bh * TQ * R2, m, mmask, R2, R2P) * _rows(c2 + bh * TQ * R2, m, mmask, R2, R2P).to(ACC)
            dQ = _rows(DQ2 + bh * TQ * R2, m, mmask, R2, R2P)
            da = tl.where(valid, da2 * S2j[None, :] + tl.dot(dQ, _lag_block(U2T + j * R2 * W, lg, lmask, W, R2, R2P),
                                                             input_precision="ieee"), 0.0)
            gVt2 += tl.dot(tl.trans(qc), da2, input_precision="ieee")
            gU2 += tl.dot(tl.trans(dQ), a, input_precision="ieee")
            gS2 += tl.sum(a * da2, 0)
        if OP1:
            dz1g, dz1s = _act_bwd(da, z1g, z1s, coef, GLU)
            gVt1g += tl.dot(tl.trans(pcg), dz1g, input_precision="ieee")
            gU1g += tl.dot(tl.trans(_rows(DP1 + g * TQ * R1, m, mmask, R1, R1P)), zg, input_precision="ieee")
            gS1g += tl.sum(zg * dz1g, 0)
            if GLU:
                gVt1s += tl.dot(tl.trans(pcs), dz1s, input_precision="ieee")
                gU1s += tl.dot(tl.trans(_rows(DP1 + s * TQ * R1, m, mmask, R1, R1P)), zs, input_precision="ieee")
                gS1s += tl.sum(zs * dz1s, 0)
    r1 = tl.arange(0, R1P)
    r2 = tl.arange(0, R2P)
    ok1 = (r1[:, None] < R1) & lmask[None, :]
    ok2 = (r2[:, None] < R2) & lmask[None, :]
    if OP1:
        at = r1[:, None] * W + lg[None, :]
        tl.store(DVT1T + g * R1 * W + at, gVt1g, mask=ok1)
        tl.store(DU1T + g * R1 * W + at, gU1g, mask=ok1)
        tl.store(DS1 + g * W + lg, gS1g, mask=lmask)
        if GLU:
            tl.store(DVT1T + s * R1 * W + at, gVt1s, mask=ok1)
            tl.store(DU1T + s * R1 * W + at, gU1s, mask=ok1)
            tl.store(DS1 + s * W + lg, gS1s, mask=lmask)
    if OP2:
        tl.store(DVT2T + bh * R2 * W + r2[:, None] * W + lg[None, :], gVt2, mask=ok2)
        tl.store(DU2T + bh * R2 * W + r2[:, None] * W + lg[None, :], gU2, mask=ok2)
        tl.store(DS2 + bh * W + lg, gS2, mask=lmask)


@triton.jit
def _bwd_values(q, k, c1, c2, Vt1T, S1, Vt2T, S2, P1, Q2, DY, DV_, h, TQ, TK, W, row0,
                DK, DKP: tl.constexpr, DV, DVB: tl.constexpr, R1,
                R1P: tl.constexpr, R2, R2P: tl.constexpr, GLU: tl.constexpr, OP1: tl.constexpr,
                OP2: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    kb, bh, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    j, g, s = _heads(bh, h, GLU)
    i0 = kb * BN
    d = cb * DVB + tl.arange(0, DVB)
    dmask = d < DV
    dv = tl.zeros((BN, DVB), dtype=ACC)
    nb = tl.cdiv(TQ, BM)
    for rb in range(tl.maximum(i0 - row0, 0) // BM, nb):
        m, mmask, t, qg, qs = _row_block(q, g, s, rb, TQ, row0, DK, DKP, GLU, BM)
        pcg, pcs = _controlled(P1, c1, g, s, m, mmask, TQ, R1, R1P, GLU, OP1, ACC, BM)
        n, nmask, lag, valid, kgt, kst, zg, zs, z1g, z1s, a = _tile(
            qg, qs, k + g * TK * DK, k + s * TK * DK, t, mmask, i0, TK, pcg, pcs, S1 + j * W, S1 + (h + j) * W,
            Vt1T + j * R1 * W, Vt1T + (h + j) * R1 * W, W, DK, DKP, R1, R1P, GLU, OP1, ACC, BN, PREC)
        a2 = a
        if OP2:
            qc = _rows(Q2 + bh * TQ * R2, m, mmask, R2, R2P) * _rows(c2 + bh * TQ * R2, m, mmask, R2, R2P).to(ACC)
            a2 = a * tl.load(S2 + j * W + lag, mask=valid, other=0.0) + _lowrank(qc, Vt2T + j * R2 * W, lag, valid,
                                                                                  W, R2, R2P)
        dyc = tl.load(DY + bh * TQ * DV + m[:, None] * DV + d[None, :], mask=mmask[:, None] & dmask[None, :],
                      other=0.0)
        dv += tl.dot(tl.trans(a2).to(dyc.dtype), dyc, input_precision=PREC).to(ACC)
    n = i0 + tl.arange(0, BN)
    tl.store(DV_ + bh * TK * DV + n[:, None] * DV + d[None, :], dv, mask=(n < TK)[:, None] & dmask[None, :])


# ----------------------------------------------------------------------------- launch and autograd

def _pow2(x, lo=16):
    return max(lo, triton.next_power_of_2(x))


def _meta(q, v, c1, c2, glu):
    """Shapes and constexprs shared by the launches."""
    B, H1, TQ, DK = q.shape
    h, TK, DV = v.shape[1], v.shape[2], v.shape[3]
    R1 = c1.shape[-1] if c1 is not None else 1
    R2 = c2.shape[-1] if c2 is not None else 1
    acc = {torch.float64: tl.float64}.get(q.dtype, tl.float32)
    fp32_dots = "tf32" if torch.backends.cuda.matmul.allow_tf32 and q.is_cuda else "ieee"
    prec = fp32_dots if q.dtype in (torch.float32, torch.float64) else None
    BM, BN = BLOCK["BM"], BLOCK["BN"]
    DVB = min(BLOCK["DVB"], _pow2(DV))
    return dict(B=B, h=h, TQ=TQ, TK=TK, DV=DV, H1=H1, shapes=dict(
        DK=DK, DKP=_pow2(DK), R1=R1, R1P=_pow2(R1), R2=R2, R2P=_pow2(R2), GLU=glu, ACC=acc, BM=BM, BN=BN,
        PREC=prec), DVB=DVB)


def _empty(x):
    return x.new_empty(0)


@torch.library.custom_op("hypergpt::hyperglu_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c1: Optional[torch.Tensor], c2: Optional[torch.Tensor],
         U1T: Optional[torch.Tensor], Vt1T: Optional[torch.Tensor], S1: Optional[torch.Tensor],
         U2T: Optional[torch.Tensor], Vt2T: Optional[torch.Tensor], S2: Optional[torch.Tensor], row0: int, glu: bool,
         norm: bool, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B,h,TQ,DV) in q's dtype, n (B,h,TQ), P1 (B,H1,TQ,r1), Q2 (B,h,TQ,r2)); see the module docstring."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    op1, op2 = c1 is not None, c2 is not None
    md = _meta(q, v, c1, c2, glu)
    B, h, TQ, TK, DV, H1, sh = md["B"], md["h"], md["TQ"], md["TK"], md["DV"], md["H1"], md["shapes"]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    W = (U1T if op1 else U2T).shape[-1] if (op1 or op2) else TK
    c1, c2 = (c.contiguous() if c is not None else _empty(q) for c in (c1, c2))
    U1T, Vt1T, S1, U2T, Vt2T, S2 = (p.contiguous() if p is not None else _empty(q)
                                    for p in (U1T, Vt1T, S1, U2T, Vt2T, S2))
    P1 = q.new_zeros(B, H1, TQ, sh["R1"], dtype=acc) if op1 else q.new_zeros(0, dtype=acc)
    Q2 = q.new_zeros(B, h, TQ, sh["R2"], dtype=acc) if op2 else q.new_zeros(0, dtype=acc)
    nrm = q.new_ones(B, h, TQ, dtype=acc)
    out = q.new_empty(B, h, TQ, DV)
    grid = (triton.cdiv(TQ, sh["BM"]), B * h)
    flags = dict(OP1=op1, OP2=op2, NORM=norm, num_warps=BLOCK["num_warps"])
    if op1 or op2 or norm:
        _fwd_stats[grid](q, k, c1, c2, U1T, Vt1T, S1, U2T, P1, Q2, nrm, h, TQ, TK, W, row0, **sh, **flags)
    _fwd_out[grid + (triton.cdiv(DV, md["DVB"]),)](
        q, k, v, c1, c2, Vt1T, S1, Vt2T, S2, P1, Q2, nrm, out, h, TQ, TK, W, row0, eps, DV=DV, DVB=md["DVB"], **sh,
        **flags)
    return out, nrm, P1, Q2


@_fwd.register_fake
def _(q, k, v, c1, c2, U1T, Vt1T, S1, U2T, Vt2T, S2, row0, glu, norm, eps):
    B, H1, TQ, _ = q.shape
    h, DV = v.shape[1], v.shape[3]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    P1 = q.new_empty(B, H1, TQ, c1.shape[-1], dtype=acc) if c1 is not None else q.new_empty(0, dtype=acc)
    Q2 = q.new_empty(B, h, TQ, c2.shape[-1], dtype=acc) if c2 is not None else q.new_empty(0, dtype=acc)
    return q.new_empty(B, h, TQ, DV), q.new_empty(B, h, TQ, dtype=acc), P1, Q2


@torch.library.custom_op("hypergpt::hyperglu_bwd", mutates_args=())
def _bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c1: Optional[torch.Tensor],
         c2: Optional[torch.Tensor], U1T: Optional[torch.Tensor], Vt1T: Optional[torch.Tensor],
         S1: Optional[torch.Tensor], U2T: Optional[torch.Tensor], Vt2T: Optional[torch.Tensor],
         S2: Optional[torch.Tensor], out: torch.Tensor, nrm: torch.Tensor, P1: torch.Tensor, Q2: torch.Tensor,
         row0: int, glu: bool, norm: bool, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor, torch.Tensor]:
    """Gradients of (q, k, v, c1, c2, U1T, Vt1T, S1, U2T, Vt2T, S2); empty tensors for the inputs that are None."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    op1, op2 = c1 is not None, c2 is not None
    md = _meta(q, v, c1, c2, glu)
    B, h, TQ, TK, DV, H1, sh = md["B"], md["h"], md["TQ"], md["TK"], md["DV"], md["H1"], md["shapes"]
    acc = nrm.dtype
    W = (U1T if op1 else U2T).shape[-1] if (op1 or op2) else TK
    # the norm's row constants: dy = dout inv, coef = -(dout . out) inv^2 (0 where the eps clamp bites)
    inv = 1.0 / nrm.clamp_min(eps) if norm else torch.ones_like(nrm)
    dy = (dout.to(acc) * inv[..., None]).to(q.dtype).contiguous()
    coef = -(dout.to(acc) * out.to(acc)).sum(-1) * inv * inv if norm else torch.zeros_like(nrm)
    coef = torch.where(nrm > eps, coef, torch.zeros_like(coef)).contiguous()
    c1, c2 = (c.contiguous() if c is not None else _empty(q) for c in (c1, c2))
    U1T, Vt1T, S1, U2T, Vt2T, S2 = (p.contiguous() if p is not None else _empty(q)
                                    for p in (U1T, Vt1T, S1, U2T, Vt2T, S2))
    z = lambda *shape: q.new_zeros(*shape, dtype=acc)
    dq, dk, dv = torch.empty_like(q, dtype=acc), torch.empty_like(k, dtype=acc), torch.empty_like(v, dtype=acc)
    dc1, dP1 = (z(B, H1, TQ, sh["R1"]), z(B, H1, TQ, sh["R1"])) if op1 else (z(0), z(0))
    dc2, dQ2 = (z(B, h, TQ, sh["R2"]), z(B, h, TQ, sh["R2"])) if op2 else (z(0), z(0))
    # the lag parameters' gradients per batch element (summed below): no atomics, the same sum every run
    none = lambda: (z(0), z(0), z(0))  # noqa: E731 (distinct tensors: outputs of a custom op may not alias)
    dU1T, dVt1T, dS1 = (z(B, H1, sh["R1"], W), z(B, H1, sh["R1"], W), z(B, H1, W)) if op1 else none()
    dU2T, dVt2T, dS2 = (z(B, h, sh["R2"], W), z(B, h, sh["R2"], W), z(B, h, W)) if op2 else none()
    flags = dict(OP1=op1, OP2=op2, num_warps=BLOCK["num_warps"])
    rows, keys = (triton.cdiv(TQ, sh["BM"]), B * h), (triton.cdiv(TK, sh["BN"]), B * h)
    _bwd_rows[rows](q, k, v, c1, c2, U1T, Vt1T, S1, U2T, Vt2T, S2, P1, Q2, dy, coef, dq, dc1, dc2, dP1, dQ2,
                    h, TQ, TK, W, row0, DV=DV, DVB=md["DVB"], **sh, **flags)
    _bwd_keys[keys](q, k, v, c1, c2, U1T, Vt1T, S1, U2T, S2, P1, dy, coef, dP1, dQ2, dk, h, TQ, TK, W, row0,
                    DV=DV, DVB=md["DVB"], **sh, **flags)
    if op1 or op2:
        lags = (triton.cdiv(W, sh["BN"]), B * h)
        scratch = q.new_empty(lags[0] * lags[1] * sh["BM"] * 2 * sh["BN"], dtype=acc)
        _bwd_params[lags](q, k, v, c1, c2, U1T, Vt1T, S1, U2T, Vt2T, S2, P1, Q2, dy, coef, dP1, dQ2, scratch,
                          dU1T, dVt1T, dS1, dU2T, dVt2T, dS2, h, TQ, TK, W, row0, DV=DV, DVB=md["DVB"], **sh, **flags)
        dU1T, dVt1T, dS1, dU2T, dVt2T, dS2 = (x.sum(0) for x in (dU1T, dVt1T, dS1, dU2T, dVt2T, dS2))
    _bwd_values[keys + (triton.cdiv(DV, md["DVB"]),)](
        q, k, c1, c2, Vt1T, S1, Vt2T, S2, P1, Q2, dy, dv, h, TQ, TK, W, row0, DV=DV, DVB=md["DVB"], **sh, **flags)
    return dq, dk, dv, dc1, dc2, dU1T, dVt1T, dS1, dU2T, dVt2T, dS2


@_bwd.register_fake
def _(dout, q, k, v, c1, c2, U1T, Vt1T, S1, U2T, Vt2T, S2, out, nrm, P1, Q2, row0, glu, norm, eps):
    acc = nrm.dtype
    like = lambda x: q.new_empty(x.shape if x is not None else (0,), dtype=acc)  # contiguous, as the real ones
    return tuple(like(x) for x in (q, k, v, c1, c2, U1T, Vt1T, S1, U2T, Vt2T, S2))


def _setup(ctx, inputs, output):
    q, k, v, c1, c2, U1T, Vt1T, S1, U2T, Vt2T, S2, row0, glu, norm, eps = inputs
    out, nrm, P1, Q2 = output
    ctx.save_for_backward(q, k, v, c1, c2, U1T, Vt1T, S1, U2T, Vt2T, S2, out, nrm, P1, Q2)
    ctx.args = (row0, glu, norm, eps)


def _backward(ctx, dout, dnrm, dP1, dQ2):
    q, k, v, c1, c2, U1T, Vt1T, S1, U2T, Vt2T, S2, out, nrm, P1, Q2 = ctx.saved_tensors
    grads = _bwd(dout, q, k, v, c1, c2, U1T, Vt1T, S1, U2T, Vt2T, S2, out, nrm, P1, Q2, *ctx.args)
    inputs = (q, k, v, c1, c2, U1T, Vt1T, S1, U2T, Vt2T, S2)
    grads = [g.to(x.dtype) if x is not None else None for g, x in zip(grads, inputs)]
    return (*grads, None, None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup)


def lag_major(U, Vt, d, shortcut, W):
    """A mixer's parameters for the kernels, lag-major and cut to lags 0..W-1: U (H, L, r) -> (H, r, W) with column
    l = row L-1-l, Vt (H, r, L) -> (H, r, W), and S = shortcut + d (H, W). Differentiable torch ops, so autograd
    maps the kernels' lag-major gradients back."""
    L = U.shape[1]
    UT = U[:, L - W:].flip(1).transpose(1, 2)
    VtT = Vt[:, :, L - W:].flip(2)
    if d is None:
        S = U.new_full((U.shape[0], W), 1.0 if shortcut else 0.0)
    else:
        S = d[:, L - W:].flip(1) + 1.0 if shortcut else d[:, L - W:].flip(1)
    return UT, VtT, S


def supports(cfg):
    """The variants the kernels cover: the causal lag layout with masked mixers (the rest runs ops/hyperglu.py)."""
    return (cfg.aligner_kind == "offset" and cfg.do_masking and (cfg.op1_do_masking or not cfg.use_op1)
            and (cfg.op2_do_masking or not cfg.use_op2))


def attend(cfg, q, k, v, c1, c2, params, n_past=0):
    """ops.hyperglu.attend's result through the kernels: q (B,H1,T,dqk), k (B,H1,n_past+T,dqk), v (B,h,n_past+T,dv),
    c1 (B,H1,T,r1), c2 (B,h,T,r2) (None when a mixer is off), params = (U1, Vt1, d1, U2, Vt2, d2) -> (B,h,T,dv)."""
    U1, Vt1, d1, U2, Vt2, d2 = params
    W = k.shape[2]
    m1 = lag_major(U1, Vt1, d1, cfg.op1_shortcut, W) if cfg.use_op1 else (None,) * 3
    m2 = lag_major(U2, Vt2, d2, cfg.op2_shortcut, W) if cfg.use_op2 else (None,) * 3
    out, _, _, _ = torch.ops.hypergpt.hyperglu_fwd(q, k, v, c1, c2, *m1, *m2, n_past, cfg.attn_kind == "glu",
                                                   cfg.attn_norm != "none", cfg.norm_eps)
    return out
