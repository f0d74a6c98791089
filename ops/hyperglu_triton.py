"""
HyperGLU / HyperMLP on CUDA as Triton kernels, forward and backward: nothing T x T in memory, and every lag term on
tensor cores.

The same rows as model.HyperGLU._rows in the lag layout, for one (batch, head) and query row t, keys i <= t, lag
l = t - i, the lag-indexed parameters read at l (row L-1-l of model.LagMix's U, column L-1-l of its Vt):
  z_e[i]  = q_e[t] . k_e[i]                                  e = gate (and scale for GLU) qk-head
  P_e     = sum_i z_e[i] U1_e[l]                  (r1,)      op1's row reduction, before its low-rank term
  z1_e[i] = z_e[i] S1_e[l] + (P_e * c1_e[t]) . V1_e[l]       S = shortcut + d  [R1 = I + diag(d) + U diag(c) Vt]
  a[i]    = softplus(z1_s[i]) relu(z1_g[i])                  (HyperMLP: relu(z1[i]))
  n       = ||z1_g||,  inv = 1 / max(n, eps)                 out_scale == l2 (ReLU is positively homogeneous)
  Q       = sum_i a[i] U2[l]                      (r2,)
  a2[i]   = a[i] S2[l] + (Q * c2[t]) . V2[l]
  out[t]  = inv sum_i a2[i] v[i]
Backward, with dy = dout inv and the row constant coef = -(dout . out) inv^2 (the norm's gradient, as the
FlashAttention Delta): da2 = dy . v, dQc = sum_i da2 V2[l], da = da2 S2 + (dQc c2) . U2[l], dz1 from the
activation (+ coef z1_g for the norm), dPc_e = sum_i dz1_e V1_e[l], dz_e = dz1_e S1_e[l] + (dPc_e c1_e) . U1_e[l].

How the kernels are built (scripts/kernel_cost.py counts them; docs/performance.md has the numbers):
- Tiles of BM query rows x BN keys in key order (BM = BN): q k^T, A V and their gradients are tensor-core dots
  over exact tiles, and each program computes a tile's chain once for all DVO value channels it owns.
- The lag terms live in the tile's lag window, the BM + BN - 1 lags it spans, as 2 BM columns: a rank-r term is
  one dot there, (BM x r).(r x 2BM), a row reduction against a lag parameter is (BM x 2BM).(2BM x r). The window
  and the key order meet through a skew: a round trip through the program's own scratch rows in global memory
  (written, a barrier, read back with row-shifted addresses), which stay in L2. The diagonal I + diag(d) is a
  load of the lag vector per element.
- The lag parameters' gradients come from a kernel over lag blocks, where a tile's columns are lags: its
  parameters are plain vectors there and their gradients column sums and dots, one partial per batch element,
  summed afterwards. No atomics: the same bits on every run.
- Every runtime loop runs over key, row or lag blocks, so the cost model's trip counts are exact.
Kernels: _fwd_stats (P, then n and Q), _fwd_out (a2 and A V), _bwd_rows (dQc, then dPc, then dq), _bwd_keys (dk),
_bwd_values (dv), _bwd_params (dU, dV, dS of both mixers).

Saved for backward: q, k, v, c1, c2, out, n, P (B,H1,T,r1) and Q (B,h,T,r2): O(T d) per head. Registered as the
custom ops hypergpt::hyperglu_fwd / hyperglu_bwd (torch.library), so torch.compile keeps them in its graph, and
autograd (hence DDP) sees one differentiable op. Runs on a GPU, and on the CPU under TRITON_INTERPRET=1 (the
tests). Supports glu/relu, out_scale/l2/none, op1 and op2 on or off, use_diag and the shortcut on or off, the lag
layout with causal masking (ops/hyperglu.py takes the rest).
"""

import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ops.launch import Launch, run

# per kernel: tiles BM x BN (BM == BN <= 64), value channels per program for out / dv (DVO) and per step of dy . v
# (DVC), warps; chosen with scripts/kernel_cost.py --tune. HYPERGLU_BLOCK="BM,DVO,DVC,num_warps" in the environment
# sets every kernel's.
BLOCK = dict(stats=dict(BM=64, DVO=128, DVC=64, num_warps=4), out=dict(BM=32, DVO=512, DVC=64, num_warps=4),
             rows=dict(BM=64, DVO=128, DVC=64, num_warps=4), keys=dict(BM=64, DVO=128, DVC=64, num_warps=4),
             values=dict(BM=64, DVO=512, DVC=64, num_warps=8), params=dict(BM=64, DVO=128, DVC=64, num_warps=4))
if os.environ.get("HYPERGLU_BLOCK"):
    BLOCK = {k: dict(zip(("BM", "DVO", "DVC", "num_warps"), map(int, os.environ["HYPERGLU_BLOCK"].split(","))))
             for k in BLOCK}
PAD = 128  # zero lags on either side of the lag parameters: a tile's window reaches 2 BM - 2 lags past the ends


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _rows(ptr, m, mmask, D, DP: tl.constexpr):
    """Rows m of a (T, D) matrix at ptr, as a (len(m), DP) block (columns >= D and rows outside mmask are 0)."""
    d = tl.arange(0, DP)
    return tl.load(ptr + m[:, None] * D + d[None, :], mask=mmask[:, None] & (d[None, :] < D), other=0.0)


@triton.jit
def _store_rows(ptr, x, m, mmask, D, DP: tl.constexpr):
    d = tl.arange(0, DP)
    tl.store(ptr + m[:, None] * D + d[None, :], x, mask=mmask[:, None] & (d[None, :] < D))


@triton.jit
def _softplus(x, FAST: tl.constexpr):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), accurate for very negative x too (the model's logaddexp(x, 0)).
    tl.log is a libdevice polynomial of about thirty instructions; FAST (on a GPU) takes log2 from the
    special-function unit instead, where log1p(e) >= 0.03 makes its absolute error (about 2^-22) a relative error
    near fp32's, and four terms of the series below (relative error under 2e-7). The interpreter has no
    fast_log2f: the tests run the exact form."""
    e = tl.exp(-tl.abs(x))
    if FAST:
        small = e * (1.0 - e * (0.5 - e * (0.3333333333333333 - 0.25 * e)))
        return tl.maximum(x, 0.0) + tl.where(e < 0.03125, small, libdevice.fast_log2f(1.0 + e) * 0.6931471805599453)
    return tl.maximum(x, 0.0) + tl.where(e < 1e-4, e * (1.0 - e * (0.5 - e / 3.0)), tl.log(1.0 + e))


@triton.jit
def _heads(bh, h, GLU: tl.constexpr):
    """(j, g, s) for program bh = b h + j: the output head j and the flat (batch, qk-head) indices of its gate and
    scale qk-heads (s = g for HyperMLP)."""
    b, j = bh // h, bh % h
    if GLU:
        return j, b * 2 * h + j, b * 2 * h + h + j
    return j, b * h + j, b * h + j


@triton.jit
def _scratch(SCR, BM: tl.constexpr):
    """This program's scratch (5 BM^2 elements): rows of 3 BM for _to_lag, zero but where a tile is written, then
    rows of 2 BM for _from_lag."""
    pid = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
    a = SCR + pid * (5 * BM * BM)
    m = tl.arange(0, BM)
    c = tl.arange(0, 2 * BM)
    tl.store(a + m[:, None] * (3 * BM) + c[None, :], tl.zeros((BM, 2 * BM), dtype=SCR.dtype.element_ty))
    tl.store(a + m[:, None] * (3 * BM) + 2 * BM + m[None, :], tl.zeros((BM, BM), dtype=SCR.dtype.element_ty))
    return a, a + 3 * BM * BM


@triton.jit
def _to_lag(x, scr, BM: tl.constexpr, BN: tl.constexpr):
    """(BM, BN) tile in key order -> its (BM, 2 BM) lag window, out[m, c] = x[m, m - c + BN - 1] (0 outside the
    tile): column c of row m is lag (t0 - i0 - BN + 1) + c. x goes to columns 2 BM - BN .. 2 BM of zeroed scratch
    rows 3 BM wide, so every read lands in the row."""
    m = tl.arange(0, BM)
    n = tl.arange(0, BN)
    c = tl.arange(0, 2 * BM)
    tl.debug_barrier()  # the last reader of the scratch is done
    tl.store(scr + m[:, None] * (3 * BM) + (2 * BM - BN) + n[None, :], x.to(scr.dtype.element_ty))
    tl.debug_barrier()
    return tl.load(scr + m[:, None] * (3 * BM) + m[:, None] - c[None, :] + (2 * BM - 1))


@triton.jit
def _from_lag(y, scr, BM: tl.constexpr, BN: tl.constexpr):
    """(BM, 2 BM) lag window -> (BM, BN) key order, out[m, n] = y[m, m - n + BN - 1] (the inverse of _to_lag); also a
    (BM, 2 BM) key window -> (BM, BN) lags, the same index map."""
    m = tl.arange(0, BM)
    n = tl.arange(0, BN)
    c = tl.arange(0, 2 * BM)
    tl.debug_barrier()
    tl.store(scr + m[:, None] * (2 * BM) + c[None, :], y.to(scr.dtype.element_ty))
    tl.debug_barrier()
    return tl.load(scr + m[:, None] * (2 * BM) + m[:, None] - n[None, :] + (BN - 1))


@triton.jit
def _win(par, l0, R: tl.constexpr, RP: tl.constexpr, NL: tl.constexpr):
    """(NL, RP) rows l0.. of a lag-major (lags, R) parameter, par pointing at lag 0 of a zero-padded copy (lags
    -PAD .. W + PAD - 1 exist, so a window needs no mask)."""
    lag = l0 + tl.arange(0, NL)
    r = tl.arange(0, RP)
    if R == RP:
        return tl.load(par + lag[:, None] * R + r[None, :])
    return tl.load(par + lag[:, None] * R + r[None, :], mask=r[None, :] < R, other=0.0)


@triton.jit
def _dav(dy, v, m, mmask, n, nmask, DV: tl.constexpr, DVC: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """(len(m), len(n)) dy[m] . v[n] over the DV channels, DVC at a time: the gradient of the map before the norm."""
    acc = tl.zeros((m.shape[0], n.shape[0]), dtype=ACC)
    for c in tl.static_range(0, DV, DVC):
        d = c + tl.arange(0, DVC)
        dyc = tl.load(dy + m[:, None] * DV + d[None, :], mask=mmask[:, None] & (d[None, :] < DV), other=0.0)
        vc = tl.load(v + n[:, None] * DV + d[None, :], mask=nmask[:, None] & (d[None, :] < DV), other=0.0)
        acc += tl.dot(dyc, tl.trans(vc), input_precision=PREC).to(ACC)
    return acc


@triton.jit
def _act_bwd(da, z1g, z1s, coef, GLU: tl.constexpr, FAST: tl.constexpr):
    """dz1 of the gate (and scale) heads from da = d(loss)/d a; coef z1_g is the norm's part."""
    if GLU:
        dz1g = tl.where(z1g > 0, da * _softplus(z1s, FAST), 0.0) + coef[:, None] * z1g
        dz1s = da * tl.maximum(z1g, 0.0) * tl.sigmoid(z1s)
    else:
        dz1g = tl.where(z1g > 0, da, 0.0) + coef[:, None] * z1g
        dz1s = dz1g
    return dz1g, dz1s


@triton.jit
def _row_block(q, g, s, rb, TQ, row0, DK: tl.constexpr, DKP: tl.constexpr, GLU: tl.constexpr, BM: tl.constexpr):
    """Row block rb of the new queries: m, its mask, the absolute positions t and the gate / scale query rows."""
    m = rb * BM + tl.arange(0, BM)
    mmask = m < TQ
    qg = _rows(q + g * TQ * DK, m, mmask, DK, DKP)
    qs = qg
    if GLU:
        qs = _rows(q + s * TQ * DK, m, mmask, DK, DKP)
    return m, mmask, row0 + m, qg, qs


@triton.jit
def _coefs(P, c, e, m, mmask, TQ, R: tl.constexpr, RP: tl.constexpr, DT: tl.constexpr):
    """(P * c)[rows m] of qk-head e, as a (BM, RP) dot operand in DT: a mixer's per-row low-rank coefficients."""
    return (_rows(P + e * TQ * R, m, mmask, R, RP) * _rows(c + e * TQ * R, m, mmask, R, RP)).to(DT)


@triton.jit
def _masked(x, valid, MASK: tl.constexpr):
    """x with the invalid pairs zeroed, on the tiles that have any (MASK); the others are all valid."""
    if MASK:
        return tl.where(valid, x, 0.0)
    return x


@triton.jit
def _lowrank_key(x, par, lw0, valid, R: tl.constexpr, RP: tl.constexpr, scr, BM: tl.constexpr, BN: tl.constexpr,
                 PREC: tl.constexpr, MASK: tl.constexpr):
    """(BM, BN): x[m] . par[l] for a per-row (BM, RP) x and a lag-major parameter, through the lag window."""
    y = tl.dot(x, tl.trans(_win(par, lw0, R, RP, 2 * BM)), input_precision=PREC)
    return _masked(_from_lag(y, scr, BM, BN), valid, MASK)


@triton.jit
def _chain(qg, qs, kg, ks, t, mmask, i0, TK, lw0, pcg, pcs, S1g, S1s, V1g, V1s, scr,
           DK: tl.constexpr, DKP: tl.constexpr, R1: tl.constexpr, R1P: tl.constexpr, GLU: tl.constexpr,
           OP1: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
           FAST: tl.constexpr, MASK: tl.constexpr):
    """The forward chain on the tile of rows t and keys i0..i0+BN (lag window from lw0): n, its mask, the lags, the
    valid pairs, the key blocks (BN, DKP), z, z1 and a. With MASK, entries outside `valid` (future or missing keys,
    rows past the end) are 0; without, the tile has none."""
    n = i0 + tl.arange(0, BN)
    nmask = n < TK
    lag = t[:, None] - n[None, :]
    valid = mmask[:, None] & nmask[None, :] & (lag >= 0)
    kgt = _rows(kg, n, nmask, DK, DKP)
    zg = _masked(tl.dot(qg, tl.trans(kgt), input_precision=PREC).to(ACC), valid, MASK)
    z1g = zg
    if OP1:  # z1 = z S1[l] + (P c1) . V1[l]
        z1g = zg * tl.load(S1g + lag) + _lowrank_key(pcg, V1g, lw0, valid, R1, R1P, scr, BM, BN, PREC, MASK)
    kst, zs, z1s = kgt, zg, z1g
    if GLU:
        kst = _rows(ks, n, nmask, DK, DKP)
        zs = _masked(tl.dot(qs, tl.trans(kst), input_precision=PREC).to(ACC), valid, MASK)
        z1s = zs
        if OP1:
            z1s = zs * tl.load(S1s + lag) + _lowrank_key(pcs, V1s, lw0, valid, R1, R1P, scr, BM, BN, PREC, MASK)
        a = _masked(_softplus(z1s, FAST) * tl.maximum(z1g, 0.0), valid, MASK)
    else:
        a = tl.maximum(z1g, 0.0)
    return n, nmask, lag, valid, kgt, kst, zg, zs, z1g, z1s, a


@triton.jit
def _grad_a(dy, vj, m, mmask, n, nmask, lag, valid, lw0, dQ, U2j, S2j, scr, DV: tl.constexpr, DVC: tl.constexpr,
            R2: tl.constexpr, R2P: tl.constexpr, OP2: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr, PREC: tl.constexpr, MASK: tl.constexpr):
    """(da2, da) on a tile: da2 = dy . v, da = da2 S2[l] + dQ . U2[l] (op2's backward), invalid pairs 0."""
    da2 = _masked(_dav(dy, vj, m, mmask, n, nmask, DV, DVC, ACC, PREC), valid, MASK)
    da = da2
    if OP2:
        da = da2 * tl.load(S2j + lag) + _lowrank_key(dQ, U2j, lw0, valid, R2, R2P, scr, BM, BN, PREC, MASK)
    return da2, da


@triton.jit
def _grad_z(dz1, S1e, lag, valid, lw0, dP, U1e, scr, R1: tl.constexpr, R1P: tl.constexpr, OP1: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, MASK: tl.constexpr):
    """dz = dz1 S1[l] + dP . U1[l] (op1's backward) on a tile."""
    if OP1:
        return dz1 * tl.load(S1e + lag) + _lowrank_key(dP, U1e, lw0, valid, R1, R1P, scr, BM, BN, PREC, MASK)
    return dz1


@triton.jit
def _params(S1, U1, V1, S2, U2, V2, eg, es, j, WP, R1: tl.constexpr, R2: tl.constexpr, PAD: tl.constexpr):
    """Pointers to lag 0 of the heads' padded lag parameters: S (H, WP), U and V (H, WP, R), PAD zero lags first."""
    return (S1 + eg * WP + PAD, S1 + es * WP + PAD, U1 + (eg * WP + PAD) * R1, U1 + (es * WP + PAD) * R1,
            V1 + (eg * WP + PAD) * R1, V1 + (es * WP + PAD) * R1, S2 + j * WP + PAD,
            U2 + (j * WP + PAD) * R2, V2 + (j * WP + PAD) * R2)


# ----------------------------------------------------------------------------- per-tile steps, with and without masks

@triton.jit
def _p_step(qg, qs, kg, ks, t, mmask, i0, TK, lw0, U1g, U1s, scr, Pg, Ps, DK: tl.constexpr, DKP: tl.constexpr,
            R1: tl.constexpr, R1P: tl.constexpr, GLU: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr, PREC: tl.constexpr, MASK: tl.constexpr):
    """P_e += sum over the tile's keys of z_e U1_e[l]: a dot in the lag window."""
    n = i0 + tl.arange(0, BN)
    nmask = n < TK
    valid = mmask[:, None] & nmask[None, :] & (t[:, None] >= n[None, :])
    zg = _masked(tl.dot(qg, tl.trans(_rows(kg, n, nmask, DK, DKP)), input_precision=PREC), valid, MASK)
    Pg += tl.dot(_to_lag(zg, scr, BM, BN), _win(U1g, lw0, R1, R1P, 2 * BM), input_precision=PREC).to(ACC)
    if GLU:
        zs = _masked(tl.dot(qs, tl.trans(_rows(ks, n, nmask, DK, DKP)), input_precision=PREC), valid, MASK)
        Ps += tl.dot(_to_lag(zs, scr, BM, BN), _win(U1s, lw0, R1, R1P, 2 * BM), input_precision=PREC).to(ACC)
    return Pg, Ps


@triton.jit
def _nq_step(qg, qs, kg, ks, t, mmask, i0, TK, lw0, pcg, pcs, S1g, S1s, V1g, V1s, U2j, scrA, scrB, nsq, Q,
             DK: tl.constexpr, DKP: tl.constexpr, R1: tl.constexpr, R1P: tl.constexpr, R2: tl.constexpr,
             R2P: tl.constexpr, GLU: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, NORM: tl.constexpr,
             ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr,
             MASK: tl.constexpr):
    """n^2 += sum z1_g^2 and Q += sum a U2[l] over the tile."""
    n, nmask, lag, valid, kgt, kst, zg, zs, z1g, z1s, a = _chain(
        qg, qs, kg, ks, t, mmask, i0, TK, lw0, pcg, pcs, S1g, S1s, V1g, V1s, scrB, DK, DKP, R1, R1P, GLU, OP1, ACC,
        BM, BN, PREC, FAST, MASK)
    if NORM:
        nsq += tl.sum(z1g * z1g, 1)
    if OP2:
        Q += tl.dot(_to_lag(a, scrA, BM, BN), _win(U2j, lw0, R2, R2P, 2 * BM), input_precision=PREC).to(ACC)
    return nsq, Q


@triton.jit
def _out_step(qg, qs, kg, ks, vj, t, mmask, i0, TK, lw0, pcg, pcs, qc, S1g, S1s, V1g, V1s, S2j, V2j, scr, d, dmask,
              acc, DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr, R1: tl.constexpr, R1P: tl.constexpr,
              R2: tl.constexpr, R2P: tl.constexpr, GLU: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr,
              ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr,
              MASK: tl.constexpr):
    """acc += a2 V over the tile, a2 = a S2[l] + qc . V2[l]."""
    n, nmask, lag, valid, kgt, kst, zg, zs, z1g, z1s, a = _chain(
        qg, qs, kg, ks, t, mmask, i0, TK, lw0, pcg, pcs, S1g, S1s, V1g, V1s, scr, DK, DKP, R1, R1P, GLU, OP1, ACC,
        BM, BN, PREC, FAST, MASK)
    a2 = a
    if OP2:
        a2 = a * tl.load(S2j + lag) + _lowrank_key(qc, V2j, lw0, valid, R2, R2P, scr, BM, BN, PREC, MASK)
    vt = tl.load(vj + n[:, None] * DV + d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
    return acc + tl.dot(a2.to(vt.dtype), vt, input_precision=PREC).to(ACC)


@triton.jit
def _dqc_step(dy, vj, m, mmask, t, i0, TK, lw0, V2j, scr, dQc, DV: tl.constexpr, DVC: tl.constexpr,
              R2: tl.constexpr, R2P: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              PREC: tl.constexpr, MASK: tl.constexpr):
    """dQc += sum over the tile of da2 V2[l], da2 = dy . v."""
    n = i0 + tl.arange(0, BN)
    nmask = n < TK
    valid = mmask[:, None] & nmask[None, :] & (t[:, None] >= n[None, :])
    da2 = _masked(_dav(dy, vj, m, mmask, n, nmask, DV, DVC, ACC, PREC), valid, MASK)
    return dQc + tl.dot(_to_lag(da2, scr, BM, BN), _win(V2j, lw0, R2, R2P, 2 * BM), input_precision=PREC).to(ACC)


@triton.jit
def _dpc_step(qg, qs, kg, ks, dy, vj, m, mmask, t, i0, TK, lw0, pcg, pcs, dQ, coef, S1g, S1s, V1g, V1s, S2j, U2j,
              scrA, scrB, dPcg, dPcs, DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr, DVC: tl.constexpr,
              R1: tl.constexpr, R1P: tl.constexpr, R2: tl.constexpr, R2P: tl.constexpr, GLU: tl.constexpr,
              OP1: tl.constexpr, OP2: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              PREC: tl.constexpr, FAST: tl.constexpr, MASK: tl.constexpr):
    """dPc_e += sum over the tile of dz1_e V1_e[l]."""
    n, nmask, lag, valid, kgt, kst, zg, zs, z1g, z1s, a = _chain(
        qg, qs, kg, ks, t, mmask, i0, TK, lw0, pcg, pcs, S1g, S1s, V1g, V1s, scrB, DK, DKP, R1, R1P, GLU, OP1, ACC,
        BM, BN, PREC, FAST, MASK)
    da2, da = _grad_a(dy, vj, m, mmask, n, nmask, lag, valid, lw0, dQ, U2j, S2j, scrB, DV, DVC, R2, R2P, OP2, ACC,
                      BM, BN, PREC, MASK)
    dz1g, dz1s = _act_bwd(da, z1g, z1s, coef, GLU, FAST)
    dPcg += tl.dot(_to_lag(dz1g, scrA, BM, BN), _win(V1g, lw0, R1, R1P, 2 * BM), input_precision=PREC).to(ACC)
    if GLU:
        dPcs += tl.dot(_to_lag(dz1s, scrA, BM, BN), _win(V1s, lw0, R1, R1P, 2 * BM), input_precision=PREC).to(ACC)
    return dPcg, dPcs


@triton.jit
def _dz_step(qg, qs, kg, ks, dy, vj, m, mmask, t, i0, TK, lw0, pcg, pcs, dQ, dPg, dPs, coef, S1g, S1s, U1g, U1s,
             V1g, V1s, S2j, U2j, scr, DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr, DVC: tl.constexpr,
             R1: tl.constexpr, R1P: tl.constexpr, R2: tl.constexpr, R2P: tl.constexpr, GLU: tl.constexpr,
             OP1: tl.constexpr, OP2: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             PREC: tl.constexpr, FAST: tl.constexpr, MASK: tl.constexpr):
    """The whole backward chain on a tile: the key blocks and dz of the gate and scale heads."""
    n, nmask, lag, valid, kgt, kst, zg, zs, z1g, z1s, a = _chain(
        qg, qs, kg, ks, t, mmask, i0, TK, lw0, pcg, pcs, S1g, S1s, V1g, V1s, scr, DK, DKP, R1, R1P, GLU, OP1, ACC,
        BM, BN, PREC, FAST, MASK)
    da2, da = _grad_a(dy, vj, m, mmask, n, nmask, lag, valid, lw0, dQ, U2j, S2j, scr, DV, DVC, R2, R2P, OP2, ACC,
                      BM, BN, PREC, MASK)
    dz1g, dz1s = _act_bwd(da, z1g, z1s, coef, GLU, FAST)
    dzg = _grad_z(dz1g, S1g, lag, valid, lw0, dPg, U1g, scr, R1, R1P, OP1, BM, BN, PREC, MASK)
    dzs = dzg
    if GLU:
        dzs = _grad_z(dz1s, S1s, lag, valid, lw0, dPs, U1s, scr, R1, R1P, OP1, BM, BN, PREC, MASK)
    return kgt, kst, dzg, dzs


@triton.jit
def _dv_step(qg, qs, kg, ks, t, mmask, i0, TK, lw0, pcg, pcs, qc, dyc, S1g, S1s, V1g, V1s, S2j, V2j, scr, dv,
             DK: tl.constexpr, DKP: tl.constexpr, R1: tl.constexpr, R1P: tl.constexpr, R2: tl.constexpr,
             R2P: tl.constexpr, GLU: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, ACC: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr, MASK: tl.constexpr):
    """dv += a2^T dy over the tile."""
    n, nmask, lag, valid, kgt, kst, zg, zs, z1g, z1s, a = _chain(
        qg, qs, kg, ks, t, mmask, i0, TK, lw0, pcg, pcs, S1g, S1s, V1g, V1s, scr, DK, DKP, R1, R1P, GLU, OP1, ACC,
        BM, BN, PREC, FAST, MASK)
    a2 = a
    if OP2:
        a2 = a * tl.load(S2j + lag) + _lowrank_key(qc, V2j, lw0, valid, R2, R2P, scr, BM, BN, PREC, MASK)
    return dv + tl.dot(tl.trans(a2.to(dyc.dtype)), dyc, input_precision=PREC).to(ACC)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _fwd_stats(q, k, c1, U1, V1, S1, U2, P1, Q2, NRM, SCR, h, TQ, TK, WP, row0,
               DK: tl.constexpr, DKP: tl.constexpr, R1: tl.constexpr, R1P: tl.constexpr, R2: tl.constexpr,
               R2P: tl.constexpr, GLU: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, NORM: tl.constexpr,
               ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr, PAD: tl.constexpr):
    rb, bh = tl.program_id(0), tl.program_id(1)
    j, g, s = _heads(bh, h, GLU)
    m, mmask, t, qg, qs = _row_block(q, g, s, rb, TQ, row0, DK, DKP, GLU, BM)
    scrA, scrB = _scratch(SCR, BM)
    DT = q.dtype.element_ty
    H1 = 2 * h if GLU else h
    eg, es = g % H1, s % H1  # qk-head indices into the parameters
    S1g, S1s, U1g, U1s, V1g, V1s, _, U2j, _ = _params(S1, U1, V1, S1, U2, U2, eg, es, j, WP, R1, R2, PAD)
    kg, ks = k + g * TK * DK, k + s * TK * DK
    t0 = row0 + rb * BM
    lo = t0 // BN * BN            # keys below lo are seen by every row of the block: no masks
    hi = tl.minimum(TK, t0 + BM)  # keys a row of this block can see
    pcg = tl.zeros((BM, R1P), dtype=DT)
    pcs = pcg
    if OP1:  # sweep 1: P_e = sum_i z_e[i] U1_e[l]
        Pg = tl.zeros((BM, R1P), dtype=ACC)
        Ps = Pg
        for i0 in range(0, lo, BN):
            Pg, Ps = _p_step(qg, qs, kg, ks, t, mmask, i0, TK, t0 - i0 - BN + 1, U1g, U1s, scrA, Pg, Ps, DK, DKP,
                             R1, R1P, GLU, ACC, BM, BN, PREC, False)
        for i0 in range(lo, hi, BN):
            Pg, Ps = _p_step(qg, qs, kg, ks, t, mmask, i0, TK, t0 - i0 - BN + 1, U1g, U1s, scrA, Pg, Ps, DK, DKP,
                             R1, R1P, GLU, ACC, BM, BN, PREC, True)
        _store_rows(P1 + g * TQ * R1, Pg, m, mmask, R1, R1P)
        pcg = (Pg * _rows(c1 + g * TQ * R1, m, mmask, R1, R1P)).to(DT)
        if GLU:
            _store_rows(P1 + s * TQ * R1, Ps, m, mmask, R1, R1P)
            pcs = (Ps * _rows(c1 + s * TQ * R1, m, mmask, R1, R1P)).to(DT)
    if NORM or OP2:  # sweep 2: the norm and Q = sum_i a[i] U2[l]
        nsq = tl.zeros((BM,), dtype=ACC)
        Q = tl.zeros((BM, R2P), dtype=ACC)
        for i0 in range(0, lo, BN):
            nsq, Q = _nq_step(qg, qs, kg, ks, t, mmask, i0, TK, t0 - i0 - BN + 1, pcg, pcs, S1g, S1s, V1g, V1s, U2j,
                              scrA, scrB, nsq, Q, DK, DKP, R1, R1P, R2, R2P, GLU, OP1, OP2, NORM, ACC, BM, BN, PREC,
                              FAST, False)
        for i0 in range(lo, hi, BN):
            nsq, Q = _nq_step(qg, qs, kg, ks, t, mmask, i0, TK, t0 - i0 - BN + 1, pcg, pcs, S1g, S1s, V1g, V1s, U2j,
                              scrA, scrB, nsq, Q, DK, DKP, R1, R1P, R2, R2P, GLU, OP1, OP2, NORM, ACC, BM, BN, PREC,
                              FAST, True)
        if NORM:
            tl.store(NRM + bh * TQ + m, tl.sqrt(nsq), mask=mmask)
        if OP2:
            _store_rows(Q2 + bh * TQ * R2, Q, m, mmask, R2, R2P)


@triton.jit
def _fwd_out(q, k, v, c1, c2, V1, S1, V2, S2, P1, Q2, NRM, OUT, SCR, h, TQ, TK, WP, row0, eps,
             DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr, DVO: tl.constexpr, R1: tl.constexpr,
             R1P: tl.constexpr, R2: tl.constexpr, R2P: tl.constexpr, GLU: tl.constexpr, OP1: tl.constexpr,
             OP2: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             PREC: tl.constexpr, FAST: tl.constexpr, PAD: tl.constexpr):
    rb, bh, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    j, g, s = _heads(bh, h, GLU)
    m, mmask, t, qg, qs = _row_block(q, g, s, rb, TQ, row0, DK, DKP, GLU, BM)
    scrA, scrB = _scratch(SCR, BM)
    DT = q.dtype.element_ty
    H1 = 2 * h if GLU else h
    eg, es = g % H1, s % H1
    S1g, S1s, _, _, V1g, V1s, S2j, _, V2j = _params(S1, V1, V1, S2, V2, V2, eg, es, j, WP, R1, R2, PAD)
    kg, ks, vj = k + g * TK * DK, k + s * TK * DK, v + bh * TK * DV
    t0 = row0 + rb * BM
    lo = t0 // BN * BN
    hi = tl.minimum(TK, t0 + BM)
    pcg = tl.zeros((BM, R1P), dtype=DT)
    pcs = pcg
    if OP1:
        pcg = _coefs(P1, c1, g, m, mmask, TQ, R1, R1P, DT)
        pcs = _coefs(P1, c1, s, m, mmask, TQ, R1, R1P, DT)
    qc = tl.zeros((BM, R2P), dtype=DT)
    if OP2:
        qc = _coefs(Q2, c2, bh, m, mmask, TQ, R2, R2P, DT)
    d = cb * DVO + tl.arange(0, DVO)
    dmask = d < DV
    acc = tl.zeros((BM, DVO), dtype=ACC)
    for i0 in range(0, lo, BN):
        acc = _out_step(qg, qs, kg, ks, vj, t, mmask, i0, TK, t0 - i0 - BN + 1, pcg, pcs, qc, S1g, S1s, V1g, V1s,
                        S2j, V2j, scrB, d, dmask, acc, DK, DKP, DV, R1, R1P, R2, R2P, GLU, OP1, OP2, ACC, BM, BN,
                        PREC, FAST, False)
    for i0 in range(lo, hi, BN):
        acc = _out_step(qg, qs, kg, ks, vj, t, mmask, i0, TK, t0 - i0 - BN + 1, pcg, pcs, qc, S1g, S1s, V1g, V1s,
                        S2j, V2j, scrB, d, dmask, acc, DK, DKP, DV, R1, R1P, R2, R2P, GLU, OP1, OP2, ACC, BM, BN,
                        PREC, FAST, True)
    if NORM:
        acc = acc / tl.maximum(tl.load(NRM + bh * TQ + m, mask=mmask, other=1.0), eps)[:, None]
    tl.store(OUT + bh * TQ * DV + m[:, None] * DV + d[None, :], acc, mask=mmask[:, None] & dmask[None, :])


@triton.jit
def _bwd_rows(q, k, v, c1, c2, U1, V1, S1, U2, V2, S2, P1, Q2, DY, COEF, DQ, DC1, DC2, DP1, DQ2, SCR,
              h, TQ, TK, WP, row0, DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr, DVC: tl.constexpr,
              R1: tl.constexpr, R1P: tl.constexpr, R2: tl.constexpr, R2P: tl.constexpr, GLU: tl.constexpr,
              OP1: tl.constexpr, OP2: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              PREC: tl.constexpr, FAST: tl.constexpr, PAD: tl.constexpr):
    rb, bh = tl.program_id(0), tl.program_id(1)
    j, g, s = _heads(bh, h, GLU)
    m, mmask, t, qg, qs = _row_block(q, g, s, rb, TQ, row0, DK, DKP, GLU, BM)
    scrA, scrB = _scratch(SCR, BM)
    DT = q.dtype.element_ty
    H1 = 2 * h if GLU else h
    eg, es = g % H1, s % H1
    S1g, S1s, U1g, U1s, V1g, V1s, S2j, U2j, V2j = _params(S1, U1, V1, S2, U2, V2, eg, es, j, WP, R1, R2, PAD)
    kg, ks, vj, dy = k + g * TK * DK, k + s * TK * DK, v + bh * TK * DV, DY + bh * TQ * DV
    t0 = row0 + rb * BM
    lo = t0 // BN * BN
    hi = tl.minimum(TK, t0 + BM)
    coef = tl.load(COEF + bh * TQ + m, mask=mmask, other=0.0)
    pcg = tl.zeros((BM, R1P), dtype=DT)
    pcs = pcg
    if OP1:
        pcg = _coefs(P1, c1, g, m, mmask, TQ, R1, R1P, DT)
        pcs = _coefs(P1, c1, s, m, mmask, TQ, R1, R1P, DT)
    dQ = tl.zeros((BM, R2P), dtype=DT)
    if OP2:  # sweep 1: dQc = sum_i da2[i] V2[l], da2 = dy . v[i]
        dQc = tl.zeros((BM, R2P), dtype=ACC)
        for i0 in range(0, lo, BN):
            dQc = _dqc_step(dy, vj, m, mmask, t, i0, TK, t0 - i0 - BN + 1, V2j, scrA, dQc, DV, DVC, R2, R2P, ACC,
                            BM, BN, PREC, False)
        for i0 in range(lo, hi, BN):
            dQc = _dqc_step(dy, vj, m, mmask, t, i0, TK, t0 - i0 - BN + 1, V2j, scrA, dQc, DV, DVC, R2, R2P, ACC,
                            BM, BN, PREC, True)
        c2r = _rows(c2 + bh * TQ * R2, m, mmask, R2, R2P).to(ACC)
        _store_rows(DC2 + bh * TQ * R2, dQc * _rows(Q2 + bh * TQ * R2, m, mmask, R2, R2P), m, mmask, R2, R2P)
        _store_rows(DQ2 + bh * TQ * R2, dQc * c2r, m, mmask, R2, R2P)
        dQ = (dQc * c2r).to(DT)
    dPg = tl.zeros((BM, R1P), dtype=DT)
    dPs = dPg
    if OP1:  # sweep 2: dPc_e = sum_i dz1_e[i] V1_e[l]
        dPcg = tl.zeros((BM, R1P), dtype=ACC)
        dPcs = dPcg
        for i0 in range(0, lo, BN):
            dPcg, dPcs = _dpc_step(qg, qs, kg, ks, dy, vj, m, mmask, t, i0, TK, t0 - i0 - BN + 1, pcg, pcs, dQ, coef,
                                   S1g, S1s, V1g, V1s, S2j, U2j, scrA, scrB, dPcg, dPcs, DK, DKP, DV, DVC, R1, R1P,
                                   R2, R2P, GLU, OP1, OP2, ACC, BM, BN, PREC, FAST, False)
        for i0 in range(lo, hi, BN):
            dPcg, dPcs = _dpc_step(qg, qs, kg, ks, dy, vj, m, mmask, t, i0, TK, t0 - i0 - BN + 1, pcg, pcs, dQ, coef,
                                   S1g, S1s, V1g, V1s, S2j, U2j, scrA, scrB, dPcg, dPcs, DK, DKP, DV, DVC, R1, R1P,
                                   R2, R2P, GLU, OP1, OP2, ACC, BM, BN, PREC, FAST, True)
        c1g = _rows(c1 + g * TQ * R1, m, mmask, R1, R1P).to(ACC)
        _store_rows(DC1 + g * TQ * R1, dPcg * _rows(P1 + g * TQ * R1, m, mmask, R1, R1P), m, mmask, R1, R1P)
        _store_rows(DP1 + g * TQ * R1, dPcg * c1g, m, mmask, R1, R1P)
        dPg = (dPcg * c1g).to(DT)
        if GLU:
            c1s = _rows(c1 + s * TQ * R1, m, mmask, R1, R1P).to(ACC)
            _store_rows(DC1 + s * TQ * R1, dPcs * _rows(P1 + s * TQ * R1, m, mmask, R1, R1P), m, mmask, R1, R1P)
            _store_rows(DP1 + s * TQ * R1, dPcs * c1s, m, mmask, R1, R1P)
            dPs = (dPcs * c1s).to(DT)
    dqg = tl.zeros((BM, DKP), dtype=ACC)
    dqs = dqg
    for i0 in range(0, lo, BN):  # sweep 3: dz_e and dq_e = sum_i dz_e[i] k_e[i]
        kgt, kst, dzg, dzs = _dz_step(qg, qs, kg, ks, dy, vj, m, mmask, t, i0, TK, t0 - i0 - BN + 1, pcg, pcs, dQ,
                                      dPg, dPs, coef, S1g, S1s, U1g, U1s, V1g, V1s, S2j, U2j, scrB, DK, DKP, DV, DVC,
                                      R1, R1P, R2, R2P, GLU, OP1, OP2, ACC, BM, BN, PREC, FAST, False)
        dqg += tl.dot(dzg.to(DT), kgt, input_precision=PREC).to(ACC)
        if GLU:
            dqs += tl.dot(dzs.to(DT), kst, input_precision=PREC).to(ACC)
    for i0 in range(lo, hi, BN):
        kgt, kst, dzg, dzs = _dz_step(qg, qs, kg, ks, dy, vj, m, mmask, t, i0, TK, t0 - i0 - BN + 1, pcg, pcs, dQ,
                                      dPg, dPs, coef, S1g, S1s, U1g, U1s, V1g, V1s, S2j, U2j, scrB, DK, DKP, DV, DVC,
                                      R1, R1P, R2, R2P, GLU, OP1, OP2, ACC, BM, BN, PREC, FAST, True)
        dqg += tl.dot(dzg.to(DT), kgt, input_precision=PREC).to(ACC)
        if GLU:
            dqs += tl.dot(dzs.to(DT), kst, input_precision=PREC).to(ACC)
    _store_rows(DQ + g * TQ * DK, dqg, m, mmask, DK, DKP)
    if GLU:
        _store_rows(DQ + s * TQ * DK, dqs, m, mmask, DK, DKP)


@triton.jit
def _dk_step(q, c1, P1, DQ2, DP1, COEF, kg, ks, dy, vj, g, s, bh, rb, TQ, TK, row0, i0, S1g, S1s, U1g, U1s, V1g, V1s,
             S2j, U2j, scr, dkg, dks, DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr, DVC: tl.constexpr,
             R1: tl.constexpr, R1P: tl.constexpr, R2: tl.constexpr, R2P: tl.constexpr, GLU: tl.constexpr,
             OP1: tl.constexpr, OP2: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             PREC: tl.constexpr, FAST: tl.constexpr, MASK: tl.constexpr):
    """dk_e += dz_e^T q_e over the tile of row block rb and this program's keys."""
    DT = q.dtype.element_ty
    m, mmask, t, qg, qs = _row_block(q, g, s, rb, TQ, row0, DK, DKP, GLU, BM)
    coef = tl.load(COEF + bh * TQ + m, mask=mmask, other=0.0)
    pcg = tl.zeros((BM, R1P), dtype=DT)
    pcs, dPg, dPs = pcg, pcg, pcg
    if OP1:
        pcg = _coefs(P1, c1, g, m, mmask, TQ, R1, R1P, DT)
        pcs = _coefs(P1, c1, s, m, mmask, TQ, R1, R1P, DT)
        dPg = _rows(DP1 + g * TQ * R1, m, mmask, R1, R1P).to(DT)
        dPs = _rows(DP1 + s * TQ * R1, m, mmask, R1, R1P).to(DT)
    dQ = tl.zeros((BM, R2P), dtype=DT)
    if OP2:
        dQ = _rows(DQ2 + bh * TQ * R2, m, mmask, R2, R2P).to(DT)
    kgt, kst, dzg, dzs = _dz_step(qg, qs, kg, ks, dy, vj, m, mmask, t, i0, TK, row0 + rb * BM - i0 - BN + 1, pcg,
                                  pcs, dQ, dPg, dPs, coef, S1g, S1s, U1g, U1s, V1g, V1s, S2j, U2j, scr, DK, DKP, DV,
                                  DVC, R1, R1P, R2, R2P, GLU, OP1, OP2, ACC, BM, BN, PREC, FAST, MASK)
    dkg += tl.dot(tl.trans(dzg.to(DT)), qg, input_precision=PREC).to(ACC)
    if GLU:
        dks += tl.dot(tl.trans(dzs.to(DT)), qs, input_precision=PREC).to(ACC)
    return dkg, dks


@triton.jit
def _bwd_keys(q, k, v, c1, U1, V1, S1, U2, S2, P1, DY, COEF, DP1, DQ2, DK_, SCR, h, TQ, TK, WP, row0,
              DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr, DVC: tl.constexpr, R1: tl.constexpr,
              R1P: tl.constexpr, R2: tl.constexpr, R2P: tl.constexpr, GLU: tl.constexpr, OP1: tl.constexpr,
              OP2: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
              FAST: tl.constexpr, PAD: tl.constexpr):
    kb, bh = tl.program_id(0), tl.program_id(1)
    j, g, s = _heads(bh, h, GLU)
    scrA, scrB = _scratch(SCR, BM)
    H1 = 2 * h if GLU else h
    eg, es = g % H1, s % H1
    S1g, S1s, U1g, U1s, V1g, V1s, S2j, U2j, _ = _params(S1, U1, V1, S2, U2, U2, eg, es, j, WP, R1, R2, PAD)
    i0 = kb * BN
    kg, ks, vj, dy = k + g * TK * DK, k + s * TK * DK, v + bh * TK * DV, DY + bh * TQ * DV
    nrb = tl.cdiv(TQ, BM)
    rb0 = tl.maximum(i0 - row0, 0) // BM                           # the first row block with a row t >= i0
    rbm = tl.minimum(tl.cdiv(tl.maximum(i0 + BN - row0, 0), BM), nrb)  # from here on every row sees every key
    dkg = tl.zeros((BN, DKP), dtype=ACC)
    dks = dkg
    for rb in range(rb0, rbm):
        dkg, dks = _dk_step(q, c1, P1, DQ2, DP1, COEF, kg, ks, dy, vj, g, s, bh, rb, TQ, TK, row0, i0, S1g, S1s, U1g,
                            U1s, V1g, V1s, S2j, U2j, scrB, dkg, dks, DK, DKP, DV, DVC, R1, R1P, R2, R2P, GLU, OP1,
                            OP2, ACC, BM, BN, PREC, FAST, True)
    for rb in range(rbm, nrb):
        dkg, dks = _dk_step(q, c1, P1, DQ2, DP1, COEF, kg, ks, dy, vj, g, s, bh, rb, TQ, TK, row0, i0, S1g, S1s, U1g,
                            U1s, V1g, V1s, S2j, U2j, scrB, dkg, dks, DK, DKP, DV, DVC, R1, R1P, R2, R2P, GLU, OP1,
                            OP2, ACC, BM, BN, PREC, FAST, False)
    n = i0 + tl.arange(0, BN)
    _store_rows(DK_ + g * TK * DK, dkg, n, n < TK, DK, DKP)
    if GLU:
        _store_rows(DK_ + s * TK * DK, dks, n, n < TK, DK, DKP)


@triton.jit
def _dvv_step(q, c1, c2, P1, Q2, DY, kg, ks, g, s, bh, rb, TQ, TK, row0, i0, d, dmask, S1g, S1s, V1g, V1s, S2j, V2j,
              scr, dv, DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr, R1: tl.constexpr, R1P: tl.constexpr,
              R2: tl.constexpr, R2P: tl.constexpr, GLU: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr,
              ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr,
              MASK: tl.constexpr):
    """dv += a2^T dy over the tile of row block rb and this program's keys and value channels d."""
    DT = q.dtype.element_ty
    m, mmask, t, qg, qs = _row_block(q, g, s, rb, TQ, row0, DK, DKP, GLU, BM)
    pcg = tl.zeros((BM, R1P), dtype=DT)
    pcs = pcg
    if OP1:
        pcg = _coefs(P1, c1, g, m, mmask, TQ, R1, R1P, DT)
        pcs = _coefs(P1, c1, s, m, mmask, TQ, R1, R1P, DT)
    qc = tl.zeros((BM, R2P), dtype=DT)
    if OP2:
        qc = _coefs(Q2, c2, bh, m, mmask, TQ, R2, R2P, DT)
    dyc = tl.load(DY + bh * TQ * DV + m[:, None] * DV + d[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
    return _dv_step(qg, qs, kg, ks, t, mmask, i0, TK, row0 + rb * BM - i0 - BN + 1, pcg, pcs, qc, dyc, S1g, S1s, V1g,
                    V1s, S2j, V2j, scr, dv, DK, DKP, R1, R1P, R2, R2P, GLU, OP1, OP2, ACC, BM, BN, PREC, FAST, MASK)


@triton.jit
def _bwd_values(q, k, c1, c2, V1, S1, V2, S2, P1, Q2, DY, DV_, SCR, h, TQ, TK, WP, row0,
                DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr, DVO: tl.constexpr, R1: tl.constexpr,
                R1P: tl.constexpr, R2: tl.constexpr, R2P: tl.constexpr, GLU: tl.constexpr, OP1: tl.constexpr,
                OP2: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
                FAST: tl.constexpr, PAD: tl.constexpr):
    kb, bh, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    j, g, s = _heads(bh, h, GLU)
    scrA, scrB = _scratch(SCR, BM)
    H1 = 2 * h if GLU else h
    eg, es = g % H1, s % H1
    S1g, S1s, _, _, V1g, V1s, S2j, _, V2j = _params(S1, V1, V1, S2, V2, V2, eg, es, j, WP, R1, R2, PAD)
    i0 = kb * BN
    kg, ks = k + g * TK * DK, k + s * TK * DK
    d = cb * DVO + tl.arange(0, DVO)
    dmask = d < DV
    nrb = tl.cdiv(TQ, BM)
    rb0 = tl.maximum(i0 - row0, 0) // BM
    rbm = tl.minimum(tl.cdiv(tl.maximum(i0 + BN - row0, 0), BM), nrb)
    dv = tl.zeros((BN, DVO), dtype=ACC)
    for rb in range(rb0, rbm):
        dv = _dvv_step(q, c1, c2, P1, Q2, DY, kg, ks, g, s, bh, rb, TQ, TK, row0, i0, d, dmask, S1g, S1s, V1g, V1s,
                       S2j, V2j, scrB, dv, DK, DKP, DV, R1, R1P, R2, R2P, GLU, OP1, OP2, ACC, BM, BN, PREC, FAST, True)
    for rb in range(rbm, nrb):
        dv = _dvv_step(q, c1, c2, P1, Q2, DY, kg, ks, g, s, bh, rb, TQ, TK, row0, i0, d, dmask, S1g, S1s, V1g, V1s,
                       S2j, V2j, scrB, dv, DK, DKP, DV, R1, R1P, R2, R2P, GLU, OP1, OP2, ACC, BM, BN, PREC, FAST, False)
    n = i0 + tl.arange(0, BN)
    tl.store(DV_ + bh * TK * DV + n[:, None] * DV + d[None, :], dv, mask=(n < TK)[:, None] & dmask[None, :])


@triton.jit
def _par_step(q, c1, c2, P1, Q2, DY, COEF, DP1, DQ2, kg, ks, vj, g, s, bh, rb, TQ, TK, row0, l0, lg, lmask,
              S1g, S1s, V1g, V1s, S2j, U2j, scr, gS1g, gS1s, gU1g, gU1s, gV1g, gV1s, gS2, gU2, gV2, DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr,
              DVC: tl.constexpr, R1: tl.constexpr, R1P: tl.constexpr, R2: tl.constexpr, R2P: tl.constexpr,
              GLU: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr, MASK: tl.constexpr):
    """The lag parameters' gradients over the tile of row block rb and this program's lags: z and da2 from the
    2 BN keys the rows meet at those lags, skewed into lag columns; S, U and V are plain vectors here."""
    DT = q.dtype.element_ty
    m, mmask, t, qg, qs = _row_block(q, g, s, rb, TQ, row0, DK, DKP, GLU, BM)
    coef = tl.load(COEF + bh * TQ + m, mask=mmask, other=0.0)
    valid = mmask[:, None] & lmask[None, :] & (t[:, None] >= lg[None, :])
    w = row0 + rb * BM - l0 - BN + 1 + tl.arange(0, 2 * BM)  # the keys of the window
    wmask = (w >= 0) & (w < TK)
    zg = _masked(_from_lag(tl.dot(qg, tl.trans(_rows(kg, w, wmask, DK, DKP)), input_precision=PREC), scr, BM, BN)
                 .to(ACC), valid, MASK)
    pcg = tl.zeros((BM, R1P), dtype=DT)
    pcs = pcg
    z1g = zg
    if OP1:
        pcg = _coefs(P1, c1, g, m, mmask, TQ, R1, R1P, DT)
        z1g = _masked(zg * S1g[None, :] + tl.dot(pcg, tl.trans(V1g), input_precision=PREC), valid, MASK)
    zs, z1s = zg, z1g
    if GLU:
        zs = _masked(_from_lag(tl.dot(qs, tl.trans(_rows(ks, w, wmask, DK, DKP)), input_precision=PREC), scr, BM, BN)
                     .to(ACC), valid, MASK)
        z1s = zs
        if OP1:
            pcs = _coefs(P1, c1, s, m, mmask, TQ, R1, R1P, DT)
            z1s = _masked(zs * S1s[None, :] + tl.dot(pcs, tl.trans(V1s), input_precision=PREC), valid, MASK)
        a = _masked(_softplus(z1s, FAST) * tl.maximum(z1g, 0.0), valid, MASK)
    else:
        a = tl.maximum(z1g, 0.0)
    da2 = _masked(_from_lag(_dav(DY + bh * TQ * DV, vj, m, mmask, w, wmask, DV, DVC, ACC, PREC), scr, BM, BN)
                  .to(ACC), valid, MASK)
    da = da2
    if OP2:
        qc = _coefs(Q2, c2, bh, m, mmask, TQ, R2, R2P, DT)
        dQ = _rows(DQ2 + bh * TQ * R2, m, mmask, R2, R2P).to(DT)
        da = _masked(da2 * S2j[None, :] + tl.dot(dQ, tl.trans(U2j), input_precision=PREC), valid, MASK)
        gS2 += tl.sum(a * da2, 0)
        gV2 += tl.dot(tl.trans(da2.to(DT)), qc, input_precision=PREC).to(ACC)
        gU2 += tl.dot(tl.trans(a.to(DT)), dQ, input_precision=PREC).to(ACC)
    if OP1:
        dz1g, dz1s = _act_bwd(da, z1g, z1s, coef, GLU, FAST)
        gS1g += tl.sum(zg * dz1g, 0)
        gV1g += tl.dot(tl.trans(dz1g.to(DT)), pcg, input_precision=PREC).to(ACC)
        gU1g += tl.dot(tl.trans(zg.to(DT)), _rows(DP1 + g * TQ * R1, m, mmask, R1, R1P).to(DT),
                       input_precision=PREC).to(ACC)
        if GLU:
            gS1s += tl.sum(zs * dz1s, 0)
            gV1s += tl.dot(tl.trans(dz1s.to(DT)), pcs, input_precision=PREC).to(ACC)
            gU1s += tl.dot(tl.trans(zs.to(DT)), _rows(DP1 + s * TQ * R1, m, mmask, R1, R1P).to(DT),
                           input_precision=PREC).to(ACC)
    return gS1g, gS1s, gU1g, gU1s, gV1g, gV1s, gS2, gU2, gV2


@triton.jit
def _bwd_params(q, k, v, c1, c2, U1, V1, S1, U2, V2, S2, P1, Q2, DY, COEF, DP1, DQ2, SCR,
                DU1, DV1, DS1, DU2, DV2, DS2, h, TQ, TK, W, WP, row0, DK: tl.constexpr, DKP: tl.constexpr,
                DV: tl.constexpr, DVC: tl.constexpr, R1: tl.constexpr, R1P: tl.constexpr, R2: tl.constexpr,
                R2P: tl.constexpr, GLU: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, ACC: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr, PAD: tl.constexpr):
    """Over tiles of BM rows x BN lags, where the lag parameters are plain vectors; one partial per batch element."""
    lb, bh = tl.program_id(0), tl.program_id(1)
    j, g, s = _heads(bh, h, GLU)
    scrA, scrB = _scratch(SCR, BM)
    DT = q.dtype.element_ty
    H1 = 2 * h if GLU else h
    eg, es = g % H1, s % H1
    b = bh // h
    l0 = lb * BN
    lg = l0 + tl.arange(0, BN)
    lmask = lg < W
    S1g, S1s, U1g, U1s, V1g, V1s, S2j, U2j, V2j = _params(S1, U1, V1, S2, U2, V2, eg, es, j, WP, R1, R2, PAD)
    kg, ks, vj = k + g * TK * DK, k + s * TK * DK, v + bh * TK * DV
    # the block's parameters, lag rows l0.. (padded: mixers that are off are zero-width, never read)
    S1gb = tl.zeros((BN,), dtype=ACC)
    S1sb = S1gb
    V1gb = tl.zeros((BN, R1P), dtype=DT)
    V1sb = V1gb
    if OP1:
        S1gb = tl.load(S1g + lg)
        S1sb = tl.load(S1s + lg)
        V1gb = _win(V1g, l0, R1, R1P, BN)
        V1sb = _win(V1s, l0, R1, R1P, BN)
    S2b = tl.zeros((BN,), dtype=ACC)
    U2b = tl.zeros((BN, R2P), dtype=DT)
    if OP2:
        S2b = tl.load(S2j + lg)
        U2b = _win(U2j, l0, R2, R2P, BN)
    gS1g = tl.zeros((BN,), dtype=ACC)
    gS1s, gS2 = gS1g, gS1g
    gU1g = tl.zeros((BN, R1P), dtype=ACC)
    gU1s, gV1g, gV1s = gU1g, gU1g, gU1g
    gU2 = tl.zeros((BN, R2P), dtype=ACC)
    gV2 = gU2
    nrb = tl.cdiv(TQ, BM)
    rb0 = tl.maximum(l0 - row0, 0) // BM
    rbm = tl.minimum(tl.cdiv(tl.maximum(l0 + BN - row0, 0), BM), nrb)
    for rb in range(rb0, rbm):
        gS1g, gS1s, gU1g, gU1s, gV1g, gV1s, gS2, gU2, gV2 = _par_step(
            q, c1, c2, P1, Q2, DY, COEF, DP1, DQ2, kg, ks, vj, g, s, bh, rb, TQ, TK, row0, l0, lg, lmask, S1gb, S1sb,
            V1gb, V1sb, S2b, U2b, scrB, gS1g, gS1s, gU1g, gU1s, gV1g, gV1s, gS2, gU2, gV2, DK, DKP, DV, DVC, R1, R1P,
            R2, R2P, GLU, OP1, OP2, ACC, BM, BN, PREC, FAST, True)
    for rb in range(rbm, nrb):
        gS1g, gS1s, gU1g, gU1s, gV1g, gV1s, gS2, gU2, gV2 = _par_step(
            q, c1, c2, P1, Q2, DY, COEF, DP1, DQ2, kg, ks, vj, g, s, bh, rb, TQ, TK, row0, l0, lg, lmask, S1gb, S1sb,
            V1gb, V1sb, S2b, U2b, scrB, gS1g, gS1s, gU1g, gU1s, gV1g, gV1s, gS2, gU2, gV2, DK, DKP, DV, DVC, R1, R1P,
            R2, R2P, GLU, OP1, OP2, ACC, BM, BN, PREC, FAST, False)
    if OP1:  # per batch element b: (B, H1, W, R1) and (B, H1, W)
        _store_rows(DU1 + (b * H1 + eg) * W * R1, gU1g, lg, lmask, R1, R1P)
        _store_rows(DV1 + (b * H1 + eg) * W * R1, gV1g, lg, lmask, R1, R1P)
        tl.store(DS1 + (b * H1 + eg) * W + lg, gS1g, mask=lmask)
        if GLU:
            _store_rows(DU1 + (b * H1 + es) * W * R1, gU1s, lg, lmask, R1, R1P)
            _store_rows(DV1 + (b * H1 + es) * W * R1, gV1s, lg, lmask, R1, R1P)
            tl.store(DS1 + (b * H1 + es) * W + lg, gS1s, mask=lmask)
    if OP2:
        _store_rows(DU2 + bh * W * R2, gU2, lg, lmask, R2, R2P)
        _store_rows(DV2 + bh * W * R2, gV2, lg, lmask, R2, R2P)
        tl.store(DS2 + bh * W + lg, gS2, mask=lmask)


# ----------------------------------------------------------------------------- the dispatcher's choices

def _pow2(x, lo=16):
    return max(lo, triton.next_power_of_2(x))


def _cdiv(a, b):
    return -(-a // b)


def choose(kernel, DV, block=None):
    """A kernel's tiles: BM (= BN), DVO and DVC (powers of two, at most DV's), warps (BLOCK, or block's)."""
    blk = (block or BLOCK)[kernel]
    assert blk["BM"] <= PAD // 2, "the lag parameters' zero padding covers windows of up to PAD lags"
    assert blk.get("BN", blk["BM"]) <= blk["BM"], "key (or lag) tiles no wider than the row tiles"
    return dict(BM=blk["BM"], BN=blk.get("BN", blk["BM"]), DVO=min(blk["DVO"], _pow2(DV)),
                DVC=min(blk["DVC"], _pow2(DV)), num_warps=blk["num_warps"])


def _row_loops(TQ, TK, row0, BM, BN):
    """Body runs of a row-block kernel's two sweeps over the key blocks, summed over its row blocks: the keys below
    (row0 + rb BM) // BN * BN unmasked, then the rest up to min(TK, row0 + (rb + 1) BM) masked."""
    lo = [(row0 + rb * BM) // BN for rb in range(_cdiv(TQ, BM))]
    hi = [_cdiv(min(TK, row0 + rb * BM + BM) - l * BN, BN) for rb, l in enumerate(lo)]
    return [sum(lo), sum(hi)]


def _col_loops(TQ, row0, n_blocks, BM, BN):
    """Body runs of a key- (or lag-) block kernel's two sweeps over the row blocks, summed over its blocks of BN:
    the row blocks that meet the diagonal, masked, then those below it."""
    nrb, masked, below = _cdiv(TQ, BM), 0, 0
    for kb in range(n_blocks):
        rb0 = max(kb * BN - row0, 0) // BM
        rbm = min(_cdiv(max(kb * BN + BN - row0, 0), BM), nrb)
        masked, below = masked + rbm - rb0, below + nrb - rbm
    return [masked, below]


def plan(B, h, TQ, TK, DK, DV, R1, R2, glu, op1, op2, norm, dtype, row0=0, block=None, prec=None):
    """(forward launches, backward launches) of one call: q (B,H1,TQ,DK), k (B,H1,TK,DK), v (B,h,TK,DV), ranks R1,
    R2 (1 where a mixer is off), lag parameters for W = TK lags, zero-padded by PAD on either side. Each kernel's
    tiles come from choose(). scripts/kernel_cost.py counts the same plan."""
    H1 = 2 * h if glu else h
    W = TK
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if prec is None:
        prec = "ieee" if dtype == torch.float64 else ("tf32" if dtype == torch.float32 else None)
    X, f = dtype, acc
    size, fsize = torch.tensor([], dtype=dtype).element_size(), torch.tensor([], dtype=acc).element_size()
    # compulsory bytes: the inputs read once, the outputs written once
    qkv = B * (H1 * (TQ + TK) * DK + h * TK * DV) * size
    rowvec = B * (H1 * TQ * R1 + h * TQ * R2) * fsize
    par = (H1 * W * (2 * R1 + 1) + h * W * (2 * R2 + 1)) * size
    sc = dict(h=h, TQ=TQ, TK=TK, WP=W + 2 * PAD, row0=row0)

    def launch(kernel, fn, tensors, over, loops, nbytes, **extra):
        """over: "rows", "keys" or "lags" (the grid's first axis and the loops' trip counts); extra constexprs."""
        c = choose(kernel, DV, block)
        BM, BN = c["BM"], c["BN"]
        nv = _cdiv(DV, c["DVO"]) if "DVO" in extra else 1
        n = _cdiv(TQ, BM) if over == "rows" else _cdiv(TK, BN)
        per = _row_loops(TQ, TK, row0, BM, BN) if over == "rows" else _col_loops(TQ, row0, n, BM, BN)
        consts = dict(DK=DK, DKP=_pow2(DK), R1=R1, R1P=_pow2(R1), R2=R2, R2P=_pow2(R2), GLU=glu, OP1=op1, OP2=op2,
                      ACC=tl.float64 if dtype == torch.float64 else tl.float32, BM=BM, BN=BN, PREC=prec,
                      FAST=os.environ.get("TRITON_INTERPRET", "0") != "1", PAD=PAD,
                      **{k: (c[k] if k in ("DVO", "DVC") else v) for k, v in extra.items()})
        return Launch(fn, (n, B * h) + ((nv,) if nv > 1 or "DVO" in extra else ()), tensors,
                      dict(sc, W=W) if kernel == "params" else dict(sc, eps=1e-12) if kernel == "out" else sc,
                      consts, c["num_warps"], int(os.environ.get("HG_STAGES", 2)), [B * h * nv * per[i] for i in loops], nbytes)

    fwd = []
    if op1 or op2 or norm:
        fwd.append(launch("stats", _fwd_stats, dict(q=X, k=X, c1=X, U1=X, V1=X, S1=f, U2=X, P1=f, Q2=f, NRM=f, SCR=X),
                          "rows", [0, 1] * int(op1) + [0, 1] * int(op2 or norm),
                          qkv + rowvec + par + B * h * TQ * fsize, NORM=norm))
    fwd.append(launch("out", _fwd_out, dict(q=X, k=X, v=X, c1=X, c2=X, V1=X, S1=f, V2=X, S2=f, P1=f, Q2=f, NRM=f,
                                            OUT=X, SCR=X), "rows", [0, 1],
                      qkv + rowvec + par + B * h * TQ * DV * size, DV=DV, DVO=0, NORM=norm))
    bwd = [launch("rows", _bwd_rows, dict(q=X, k=X, v=X, c1=X, c2=X, U1=X, V1=X, S1=f, U2=X, V2=X, S2=f, P1=f, Q2=f,
                                          DY=X, COEF=f, DQ=f, DC1=f, DC2=f, DP1=f, DQ2=f, SCR=X), "rows",
                  [0, 1] * (int(op2) + int(op1) + 1),
                  qkv + 3 * rowvec + par + B * h * TQ * (DV * size + fsize) + B * H1 * TQ * DK * fsize, DV=DV, DVC=0),
           launch("keys", _bwd_keys, dict(q=X, k=X, v=X, c1=X, U1=X, V1=X, S1=f, U2=X, S2=f, P1=f, DY=X, COEF=f,
                                          DP1=f, DQ2=f, DK_=f, SCR=X), "keys", [0, 1],
                  qkv + 2 * rowvec + par + B * h * TQ * DV * size + B * H1 * TK * DK * fsize, DV=DV, DVC=0),
           launch("values", _bwd_values, dict(q=X, k=X, c1=X, c2=X, V1=X, S1=f, V2=X, S2=f, P1=f, Q2=f, DY=X, DV_=f,
                                              SCR=X), "keys", [0, 1],
                  qkv + rowvec + par + B * h * TQ * DV * size + B * h * TK * DV * fsize, DV=DV, DVO=0)]
    if op1 or op2:
        bwd.append(launch("params", _bwd_params, dict(q=X, k=X, v=X, c1=X, c2=X, U1=X, V1=X, S1=f, U2=X, V2=X, S2=f,
                                                      P1=f, Q2=f, DY=X, COEF=f, DP1=f, DQ2=f, SCR=X, DU1=f, DV1=f,
                                                      DS1=f, DU2=f, DV2=f, DS2=f), "lags", [0, 1],
                          qkv + 3 * rowvec + par + B * (H1 * W * (2 * R1 + 1) + h * W * (2 * R2 + 1)) * fsize,
                          DV=DV, DVC=0))
    return fwd, bwd


def _scratch_for(launches, like):
    """One scratch buffer for the largest grid of these launches: 5 BM^2 elements per program."""
    n = max(L.programs() * 5 * L.consts["BM"] ** 2 for L in launches)
    return like.new_empty(n)


def _pad(x):
    """A lag parameter (H, W) or (H, W, r) with PAD zero lags before and after (an empty tensor stays empty)."""
    if x.numel() == 0:
        return x
    return F.pad(x, (PAD, PAD) if x.dim() == 2 else (0, 0, PAD, PAD))


# ----------------------------------------------------------------------------- launch and autograd

def _empty(x):
    return x.new_empty(0)


def _opt(x, like):
    return x.contiguous() if x is not None else _empty(like)


def _shape(q, v, c1, c2):
    B, H1, TQ, DK = q.shape
    return B, v.shape[1], TQ, v.shape[2], DK, v.shape[3], (c1.shape[-1] if c1 is not None else 1), \
        (c2.shape[-1] if c2 is not None else 1)


def _prec(q):
    """fp32 dots: TF32 on a GPU where torch allows it, else exact (the interpreter's are exact anyway)."""
    if q.dtype == torch.float32 and not (q.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return None


@torch.library.custom_op("hypergpt::hyperglu_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c1: Optional[torch.Tensor], c2: Optional[torch.Tensor],
         U1: Optional[torch.Tensor], V1: Optional[torch.Tensor], S1: Optional[torch.Tensor],
         U2: Optional[torch.Tensor], V2: Optional[torch.Tensor], S2: Optional[torch.Tensor], row0: int, glu: bool,
         norm: bool, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B,h,TQ,DV) in q's dtype, n (B,h,TQ), P1 (B,H1,TQ,r1), Q2 (B,h,TQ,r2)); see the module docstring.
    U, V: lag-major (H, W, r); S: (H, W)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    op1, op2 = c1 is not None, c2 is not None
    B, h, TQ, TK, DK, DV, R1, R2 = _shape(q, v, c1, c2)
    H1 = q.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    fwd, _ = plan(B, h, TQ, TK, DK, DV, R1, R2, glu, op1, op2, norm, q.dtype, row0, prec=_prec(q))
    c1, c2, U1, V1, U2, V2 = (_opt(x, q) for x in (c1, c2, U1, V1, U2, V2))
    S1, S2 = (_opt(x, q.new_empty(0, dtype=acc)) for x in (S1, S2))
    P1 = q.new_zeros(B, H1, TQ, R1, dtype=acc) if op1 else q.new_zeros(0, dtype=acc)
    Q2 = q.new_zeros(B, h, TQ, R2, dtype=acc) if op2 else q.new_zeros(0, dtype=acc)
    nrm = q.new_ones(B, h, TQ, dtype=acc)
    out = q.new_empty(B, h, TQ, DV)
    scr = _scratch_for(fwd, q)
    U1, V1, S1, U2, V2, S2 = (_pad(x) for x in (U1, V1, S1, U2, V2, S2))
    args = dict(q=q, k=k, v=v, c1=c1, c2=c2, U1=U1, V1=V1, S1=S1, U2=U2, V2=V2, S2=S2, P1=P1, Q2=Q2, NRM=nrm,
                OUT=out, SCR=scr)
    for L in fwd:
        run(L, **{name: args[name] for name in L.tensors})
    return out, nrm, P1, Q2


@_fwd.register_fake
def _(q, k, v, c1, c2, U1, V1, S1, U2, V2, S2, row0, glu, norm, eps):
    B, H1, TQ, _ = q.shape
    h, DV = v.shape[1], v.shape[3]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    P1 = q.new_empty(B, H1, TQ, c1.shape[-1], dtype=acc) if c1 is not None else q.new_empty(0, dtype=acc)
    Q2 = q.new_empty(B, h, TQ, c2.shape[-1], dtype=acc) if c2 is not None else q.new_empty(0, dtype=acc)
    return q.new_empty(B, h, TQ, DV), q.new_empty(B, h, TQ, dtype=acc), P1, Q2


@torch.library.custom_op("hypergpt::hyperglu_bwd", mutates_args=())
def _bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c1: Optional[torch.Tensor],
         c2: Optional[torch.Tensor], U1: Optional[torch.Tensor], V1: Optional[torch.Tensor],
         S1: Optional[torch.Tensor], U2: Optional[torch.Tensor], V2: Optional[torch.Tensor],
         S2: Optional[torch.Tensor], out: torch.Tensor, nrm: torch.Tensor, P1: torch.Tensor, Q2: torch.Tensor,
         row0: int, glu: bool, norm: bool, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor, torch.Tensor]:
    """Gradients of (q, k, v, c1, c2, U1, V1, S1, U2, V2, S2); empty tensors for the inputs that are None."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    op1, op2 = c1 is not None, c2 is not None
    B, h, TQ, TK, DK, DV, R1, R2 = _shape(q, v, c1, c2)
    H1, W = q.shape[1], TK
    acc = nrm.dtype
    _, bwd = plan(B, h, TQ, TK, DK, DV, R1, R2, glu, op1, op2, norm, q.dtype, row0, prec=_prec(q))
    # the norm's row constants: dy = dout inv, coef = -(dout . out) inv^2 (0 where the eps clamp bites)
    inv = 1.0 / nrm.clamp_min(eps) if norm else torch.ones_like(nrm)
    dy = (dout.to(acc) * inv[..., None]).to(q.dtype).contiguous()
    coef = -(dout.to(acc) * out.to(acc)).sum(-1) * inv * inv if norm else torch.zeros_like(nrm)
    coef = torch.where(nrm > eps, coef, torch.zeros_like(coef)).contiguous()
    c1, c2, U1, V1, U2, V2 = (_opt(x, q) for x in (c1, c2, U1, V1, U2, V2))
    S1, S2 = (_opt(x, nrm[:0]) for x in (S1, S2))
    z = lambda *shape: q.new_zeros(*shape, dtype=acc)  # noqa: E731 (distinct tensors: outputs may not alias)
    dq, dk, dv = torch.empty_like(q, dtype=acc), torch.empty_like(k, dtype=acc), torch.empty_like(v, dtype=acc)
    dc1, dP1 = (z(B, H1, TQ, R1), z(B, H1, TQ, R1)) if op1 else (z(0), z(0))
    dc2, dQ2 = (z(B, h, TQ, R2), z(B, h, TQ, R2)) if op2 else (z(0), z(0))
    # the lag parameters' gradients per batch element (summed below): no atomics, the same sum every run
    dU1, dV1, dS1 = (z(B, H1, W, R1), z(B, H1, W, R1), z(B, H1, W)) if op1 else (z(0), z(0), z(0))
    dU2, dV2, dS2 = (z(B, h, W, R2), z(B, h, W, R2), z(B, h, W)) if op2 else (z(0), z(0), z(0))
    scr = _scratch_for(bwd, q)
    pU1, pV1, pS1, pU2, pV2, pS2 = (_pad(x) for x in (U1, V1, S1, U2, V2, S2))
    args = dict(q=q, k=k, v=v, c1=c1, c2=c2, U1=U1, V1=V1, S1=S1, U2=U2, V2=V2, S2=S2, P1=P1, Q2=Q2, DY=dy,
                COEF=coef, DQ=dq, DC1=dc1, DC2=dc2, DP1=dP1, DQ2=dQ2, DK_=dk, DV_=dv, SCR=scr, DU1=dU1, DV1=dV1,
                DS1=dS1, DU2=dU2, DV2=dV2, DS2=dS2)
    args.update(U1=pU1, V1=pV1, S1=pS1, U2=pU2, V2=pV2, S2=pS2)
    for L in bwd:
        run(L, **{name: args[name] for name in L.tensors})
    if op1 or op2:
        dU1, dV1, dS1, dU2, dV2, dS2 = (x.sum(0) for x in (dU1, dV1, dS1, dU2, dV2, dS2))
    return dq, dk, dv, dc1, dc2, dU1, dV1, dS1, dU2, dV2, dS2


@_bwd.register_fake
def _(dout, q, k, v, c1, c2, U1, V1, S1, U2, V2, S2, out, nrm, P1, Q2, row0, glu, norm, eps):
    acc = nrm.dtype
    like = lambda x: q.new_empty(x.shape if x is not None else (0,), dtype=acc)  # contiguous, as the real ones
    return tuple(like(x) for x in (q, k, v, c1, c2, U1, V1, S1, U2, V2, S2))


def _setup(ctx, inputs, output):
    q, k, v, c1, c2, U1, V1, S1, U2, V2, S2, row0, glu, norm, eps = inputs
    out, nrm, P1, Q2 = output
    ctx.save_for_backward(q, k, v, c1, c2, U1, V1, S1, U2, V2, S2, out, nrm, P1, Q2)
    ctx.args = (row0, glu, norm, eps)


def _backward(ctx, dout, dnrm, dP1, dQ2):
    q, k, v, c1, c2, U1, V1, S1, U2, V2, S2, out, nrm, P1, Q2 = ctx.saved_tensors
    grads = _bwd(dout, q, k, v, c1, c2, U1, V1, S1, U2, V2, S2, out, nrm, P1, Q2, *ctx.args)
    inputs = (q, k, v, c1, c2, U1, V1, S1, U2, V2, S2)
    grads = [g.to(x.dtype) if x is not None else None for g, x in zip(grads, inputs)]
    return (*grads, None, None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup)


def lag_major(U, Vt, d, shortcut, W):
    """A mixer's parameters for the kernels, lag-major and cut to lags 0..W-1: U (H, L, r) -> (H, W, r) with row l =
    row L-1-l, Vt (H, r, L) -> (H, W, r) with row l = column L-1-l, and S = shortcut + d (H, W). Differentiable
    torch ops, so autograd maps the kernels' lag-major gradients back."""
    L = U.shape[1]
    UL = U[:, L - W:].flip(1)
    VL = Vt[:, :, L - W:].flip(2).transpose(1, 2)
    if d is None:
        S = U.new_full((U.shape[0], W), 1.0 if shortcut else 0.0)
    else:
        S = d[:, L - W:].flip(1) + 1.0 if shortcut else d[:, L - W:].flip(1)
    return UL, VL, S


def supports(cfg):
    """The variants the kernels cover: the causal lag layout with masked mixers (the rest runs ops/hyperglu.py)."""
    return (cfg.aligner_kind == "offset" and cfg.do_masking and (cfg.op1_do_masking or not cfg.use_op1)
            and (cfg.op2_do_masking or not cfg.use_op2))


def attend(cfg, q, k, v, c1, c2, params, n_past=0):
    """ops.hyperglu.attend's result through the kernels: q (B,H1,T,dqk), k (B,H1,n_past+T,dqk), v (B,h,n_past+T,dv),
    c1 (B,H1,T,r1), c2 (B,h,T,r2) (None when a mixer is off), params = (U1, Vt1, d1, U2, Vt2, d2) -> (B,h,T,dv).
    The mixers' U and V go in q's dtype (tensor-core operands), S in fp32 (fp64 for fp64)."""
    U1, Vt1, d1, U2, Vt2, d2 = params
    W = k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    cast = lambda m: (m[0].to(q.dtype), m[1].to(q.dtype), m[2].to(acc)) if m[0] is not None else m  # noqa: E731
    m1 = cast(lag_major(U1, Vt1, d1, cfg.op1_shortcut, W)) if cfg.use_op1 else (None,) * 3
    m2 = cast(lag_major(U2, Vt2, d2, cfg.op2_shortcut, W)) if cfg.use_op2 else (None,) * 3
    c1 = c1.to(q.dtype) if c1 is not None else None
    c2 = c2.to(q.dtype) if c2 is not None else None
    out, _, _, _ = torch.ops.hypergpt.hyperglu_fwd(q, k.to(q.dtype), v.to(q.dtype), c1, c2, *m1, *m2, n_past,
                                                   cfg.attn_kind == "glu", cfg.attn_norm != "none", cfg.norm_eps)
    return out
