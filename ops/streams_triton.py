"""
Fused Triton kernels for one HC / mHC residual site on CUDA (model.HyperConnection and model.ManifoldHC hold the
reference equations; ops.streams.connect chooses these kernels). Per site, with N = B*T tokens, n streams, C width:

  pre   one launch over blocks of tokens: x (N,n,C) -> the sublayer input u = sum_j w_in[j] x_j (N,C) and the
        per-token coefficients w_res (N,n,n), post (N,n). It reads the streams twice: first the projection with
        the norm applied after the matmul [mHC Eqs. 14-16; HC Eqs. 8-13 per stream], then, once the coefficient
        maps have run in registers (tanh, or sigmoid, 2 sigmoid and the Sinkhorn iterations [mHC Eqs. 17-19]), u.
  post  one launch: H'_i = sum_j w_res[i,j] x_j + post_i y (N,n,C) [HC Eq. 2, mHC Eq. 3], reading x and the
        sublayer output y once and writing H' once (the mHC paper's fused post + res + merge [mHC §4.3.1]).

Backward, one launch each: post's gives dx = w_res^T dH', dy = sum_i post_i dH'_i and the per-token d w_res,
d post; pre's recomputes the coefficients from the saved projection (mHC: z = x phi (N,K) and r = 1/rms (N,);
HC: d = norm(x_i) W (N,n,n+2) and the norm's (r, mu) (N,n,2)), reruns Sinkhorn from the logits, writing each
step's input to a scratch (N, 2 iters, n, n) allocated for that launch alone, walks back through every iteration,
and writes dx; the gradients of the shared weights (phi or W, the gates, the biases and static parts) are sums over tokens
of small per-token gradients, taken by torch (a sum, one GEMM x^T dz), so no kernel uses atomics and every
result is deterministic. Autograd adds post's and pre's dx (both read the same x).

Everything runs in fp32 (fp64 for fp64 inputs, which only the TRITON_INTERPRET=1 tests use): x and y are loaded
in their own dtype and upcast, u and H' are stored in x's dtype. The projections use tl.dot in fp32, TF32 when
torch.backends.cuda.matmul.allow_tf32 is set (as the mHC paper's Eq. 14), IEEE otherwise.

Each kernel is a torch.library custom op with a fake (meta) form and an autograd formula, so torch.compile keeps
them in its graph (no graph break) and CUDA graphs capture them; the parameters' gradients reach them through
autograd (DDP sees them as usual). Importing this module imports triton; set TRITON_INTERPRET=1 before that to run
the kernels on CPU tensors (tests/test_streams_triton.py).
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ops.launch import Launch, run

# Tile sizes: compiled for sm_90 with triton 3.9 they run without register spills (not yet timed on a GPU).
MHC_TOKENS = 32   # tokens per program in mHC's pre kernels: the M of x (32, 32) @ phi (32, n^2 + 2n padded)
HC_ROWS = 64      # (token, stream) rows per program in HC's pre kernels
POST_ROWS = 32    # (token, stream) rows per program in the post kernels
CHUNK = 32        # channels per inner step
WARPS = 8


def _acc(dtype):
    """Compute dtype: fp64 stays fp64 (interpreter tests), everything else runs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _prec(x):
    return "tf32" if x.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _chunk(C):
    return max(16, min(CHUNK, triton.next_power_of_2(C)))


def _pad(n):
    return triton.next_power_of_2(n)


def _link(x):
    """The pre ops' link output: x's shape, one zero in memory (an expanded scalar), so it costs nothing; autograd
    hands its gradient, dH' from post, to the pre op's backward."""
    return x.new_zeros(()).expand(x.shape)


def _groups(n):
    """mHC's projection in groups of NP columns: 0 pre, 1 post, 2 + i row i of res, padded so that G NP >= 16."""
    return max(triton.next_power_of_2(n + 2), 16 // _pad(n))


# ----------------------------------------------------------------------------- small helpers (in registers)

@triton.jit
def _col(A, j, NP: tl.constexpr):
    """A (BT, NP) -> column j (BT,)."""
    return tl.sum(tl.where(tl.arange(0, NP)[None, :] == j, A, 0.0), axis=1)


@triton.jit
def _col3(A, j, NP: tl.constexpr):
    """A (BT, NP, NP) -> A[:, :, j] (BT, NP)."""
    return tl.sum(tl.where(tl.arange(0, NP)[None, None, :] == j, A, 0.0), axis=2)


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _normalise(M, AXIS: tl.constexpr):
    """M / M.sum(AXIS) and that sum (broadcastable); all-zero padding lines (n < NP) keep a sum of 1 and stay 0."""
    s = tl.sum(M, axis=AXIS)
    s = tl.expand_dims(tl.where(s == 0.0, 1.0, s), AXIS)
    return M / s, s


@triton.jit
def _sinkhorn_start(L, n: tl.constexpr, NP: tl.constexpr):
    """exp(L - max over the n x n entries), 0 on the padding: L (BT, NP, NP) logits [mHC Eq. 19]."""
    i = tl.arange(0, NP)[None, :, None]
    j = tl.arange(0, NP)[None, None, :]
    valid = (i < n) & (j < n)
    mx = tl.max(tl.max(tl.where(valid, L, float("-inf")), axis=2), axis=1)
    return tl.where(valid, tl.exp(L - mx[:, None, None]), 0.0)


@triton.jit
def _sinkhorn(L, iters, n: tl.constexpr, NP: tl.constexpr):
    """Sinkhorn-Knopp on (BT, NP, NP) logits: `iters` rounds of column then row normalisation (model.sinkhorn)."""
    M = _sinkhorn_start(L, n, NP)
    for _ in range(iters):
        M, _ = _normalise(M, 1)
        M, _ = _normalise(M, 2)
    return M


@triton.jit
def _sinkhorn_bwd(L, g, ws_ptr, t64, tm, iters, n: tl.constexpr, NP: tl.constexpr):
    """d logits (BT, NP, NP) from d H_res = g: the forward is rerun from the logits with each step's input kept in
    this program's rows of the scratch ws (N, 2 iters, NP, NP), then walked back; for Y = X / s, s = X.sum(axis):
    dX = (dY - sum(dY Y, axis)) / s, and d logits = dM0 M0 (the max shift cancels)."""
    i = tl.arange(0, NP)[None, :, None]
    j = tl.arange(0, NP)[None, None, :]
    step = ws_ptr + t64[:, None, None] * (2 * iters * NP * NP) + i * NP + j
    m = tm[:, None, None]
    M0 = _sinkhorn_start(L, n, NP)
    M = M0
    for it in range(iters):
        tl.store(step + (2 * it) * (NP * NP), M, mask=m)
        M, _ = _normalise(M, 1)
        tl.store(step + (2 * it + 1) * (NP * NP), M, mask=m)
        M, _ = _normalise(M, 2)
    tl.debug_barrier()  # other threads of this program read these rows back
    for k in range(iters):
        it = iters - 1 - k
        Y, s = _normalise(tl.load(step + (2 * it + 1) * (NP * NP), mask=m, other=0.0), 2)  # the row step
        g = (g - tl.sum(g * Y, axis=2)[:, :, None]) / s
        Y, s = _normalise(tl.load(step + (2 * it) * (NP * NP), mask=m, other=0.0), 1)      # the column step
        g = (g - tl.sum(g * Y, axis=1)[:, None, :]) / s
    return g * M0


@triton.jit
def _mhc_act(Z, r, a_ptr, b_ptr, n: tl.constexpr, NP: tl.constexpr, G: tl.constexpr, ACC: tl.constexpr):
    """alpha r z + b [mHC Eq. 16] in the group layout (BT, G, NP) (group 0 pre, 1 post, 2 + i row i of res), and
    the gates alpha by group (1, G, 1)."""
    g = tl.arange(0, G)[None, :, None]
    j = tl.arange(0, NP)[None, None, :]
    a = tl.load(a_ptr + tl.minimum(g, 2)).to(ACC)
    b = tl.load(b_ptr + g * n + j, mask=(g < n + 2) & (j < n), other=0.0).to(ACC)
    return a * r[:, None, None] * Z + b, a


@triton.jit
def _group(A, g, G: tl.constexpr):
    """A (BT, G, NP) -> group g (BT, NP)."""
    return tl.sum(tl.where(tl.arange(0, G)[None, :, None] == g, A, 0.0), axis=1)


@triton.jit
def _res_of(A, G: tl.constexpr, NP: tl.constexpr):
    """A (BT, G, NP) -> (BT, NP, NP) with [t, i, j] = A[t, 2 + i, j]: the H_res block."""
    g = tl.arange(0, G)[None, :, None, None]
    i = tl.arange(0, NP)[None, None, :, None]
    return tl.sum(tl.where(g == i + 2, A[:, :, None, :], 0.0), axis=1)


@triton.jit
def _to_groups(P, Q, R, G: tl.constexpr, NP: tl.constexpr):
    """The group layout (BT, G, NP) of P (BT, NP) in group 0, Q (BT, NP) in group 1, R (BT, NP, NP) in 2 + i."""
    g = tl.arange(0, G)[None, :, None, None]
    i = tl.arange(0, NP)[None, None, :, None]
    A = tl.sum(tl.where(g == i + 2, R[:, None, :, :], 0.0), axis=2)
    g3 = tl.arange(0, G)[None, :, None]
    return A + tl.where(g3 == 0, P[:, None, :], 0.0) + tl.where(g3 == 1, Q[:, None, :], 0.0)


# ----------------------------------------------------------------------------- mHC pre

@triton.jit
def _mhc_pre_fwd(x_ptr, phi_ptr, a_ptr, b_ptr, u_ptr, res_ptr, post_ptr, z_ptr, r_ptr, N, C, eps, iters,
                 n: tl.constexpr, NP: tl.constexpr, G: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                 ACC: tl.constexpr, PREC: tl.constexpr):
    """Per BT tokens: z = vec(x) phi (BT, K) and r = 1/rms(vec(x)) [Eqs. 14-15], the maps [Eqs. 16-19], u."""
    K = n * n + 2 * n
    D = n * C
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    tm = t < N
    t64 = t.to(tl.int64)
    c = tl.arange(0, BC)
    p = tl.arange(0, G * NP)                       # column g NP + j of the padded projection = phi's g n + j
    pk = (p // NP) * n + p % NP
    pm = (p % NP < n) & (p // NP < n + 2)
    z = tl.zeros((BT, G * NP), dtype=ACC)
    ss = tl.zeros((BT,), dtype=ACC)
    for d0 in range(0, D, BC):
        d = d0 + c
        dm = d < D
        xt = tl.load(x_ptr + t64[:, None] * D + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0).to(ACC)
        ph = tl.load(phi_ptr + d[:, None] * K + pk[None, :], mask=dm[:, None] & pm[None, :], other=0.0).to(ACC)
        z += tl.dot(xt, ph, input_precision=PREC)
        ss += tl.sum(xt * xt, axis=1)
    r = 1.0 / tl.sqrt(ss / D + eps)
    tl.store(z_ptr + t64[:, None] * K + pk[None, :], z, mask=tm[:, None] & pm[None, :])
    tl.store(r_ptr + t64, r, mask=tm)
    act, _ = _mhc_act(tl.reshape(z, (BT, G, NP)), r, a_ptr, b_ptr, n, NP, G, ACC)
    pre = tl.sigmoid(_group(act, 0, G))
    post = 2.0 * tl.sigmoid(_group(act, 1, G))
    res = _sinkhorn(_res_of(act, G, NP), iters, n, NP)
    i2 = tl.arange(0, NP)[None, :]
    tl.store(post_ptr + t64[:, None] * n + i2, post, mask=tm[:, None] & (i2 < n))
    i3 = tl.arange(0, NP)[None, :, None]
    j3 = tl.arange(0, NP)[None, None, :]
    tl.store(res_ptr + t64[:, None, None] * (n * n) + i3 * n + j3, res, mask=tm[:, None, None] & (i3 < n) & (j3 < n))
    for c0 in range(0, C, BC):                     # u = H_pre x
        cc = c0 + c
        m = tm[:, None] & (cc < C)[None, :]
        u = tl.zeros((BT, BC), dtype=ACC)
        for j in tl.static_range(n):
            xj = tl.load(x_ptr + t64[:, None] * D + j * C + cc[None, :], mask=m, other=0.0).to(ACC)
            u += _col(pre, j, NP)[:, None] * xj
        tl.store(u_ptr + t64[:, None] * C + cc[None, :], u.to(u_ptr.dtype.element_ty), mask=m)


@triton.jit
def _mhc_pre_bwd(x_ptr, phi_ptr, a_ptr, b_ptr, z_ptr, r_ptr, gu_ptr, gres_ptr, gpost_ptr, res_ptr, go_ptr, gx_ptr,
                 gact_ptr, ws_ptr, N, C, iters, n: tl.constexpr, NP: tl.constexpr, G: tl.constexpr, BT: tl.constexpr,
                 BC: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Per BT tokens: d act (BT, K) (the gradient of alpha r z + b, written for the weights' sums) and the whole
    dx_j = sum_i H_res[i, j] dH'_i (post's part, from go = dH') + pre_j du + (r d h) phi^T - (r^3 / D)(d h . z) x_j,
    with d h = alpha d act: x's two gradients summed here, in one pass, rather than by autograd."""
    K = n * n + 2 * n
    D = n * C
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    tm = t < N
    t64 = t.to(tl.int64)
    c = tl.arange(0, BC)
    g3 = tl.arange(0, G)[None, :, None]
    j3 = tl.arange(0, NP)[None, None, :]
    gm = tm[:, None, None] & (g3 < n + 2) & (j3 < n)
    Z = tl.load(z_ptr + t64[:, None, None] * K + g3 * n + j3, mask=gm, other=0.0).to(ACC)
    r = tl.load(r_ptr + t64, mask=tm, other=1.0).to(ACC)
    act, a = _mhc_act(Z, r, a_ptr, b_ptr, n, NP, G, ACC)
    pre = tl.sigmoid(_group(act, 0, G))
    sp = tl.sigmoid(_group(act, 1, G))
    i2 = tl.arange(0, NP)[None, :]
    gpre = tl.zeros((BT, NP), dtype=ACC)           # d H_pre[t, j] = du_t . x_tj
    for c0 in range(0, C, BC):
        cc = c0 + c
        m = tm[:, None] & (cc < C)[None, :]
        gu = tl.load(gu_ptr + t64[:, None] * C + cc[None, :], mask=m, other=0.0).to(ACC)
        for j in tl.static_range(n):
            xj = tl.load(x_ptr + t64[:, None] * D + j * C + cc[None, :], mask=m, other=0.0).to(ACC)
            gpre += tl.where(i2 == j, tl.sum(gu * xj, axis=1)[:, None], 0.0)
    gpost = tl.load(gpost_ptr + t64[:, None] * n + i2, mask=tm[:, None] & (i2 < n), other=0.0).to(ACC)
    i3 = tl.arange(0, NP)[None, :, None]
    gres = tl.load(gres_ptr + t64[:, None, None] * (n * n) + i3 * n + j3,
                   mask=tm[:, None, None] & (i3 < n) & (j3 < n), other=0.0).to(ACC)
    gL = _sinkhorn_bwd(_res_of(act, G, NP), gres, ws_ptr, t64, tm, iters, n, NP)
    gact = _to_groups(gpre * pre * (1.0 - pre), gpost * 2.0 * sp * (1.0 - sp), gL, G, NP)
    tl.store(gact_ptr + t64[:, None, None] * K + g3 * n + j3, gact, mask=gm)
    gh = a * gact
    gz = tl.reshape(r[:, None, None] * gh, (BT, G * NP))
    xr = r * r * r * tl.sum(tl.sum(gh * Z, axis=2), axis=1) / D
    p = tl.arange(0, G * NP)
    pk = (p // NP) * n + p % NP
    pm = (p % NP < n) & (p // NP < n + 2)
    W = tl.load(res_ptr + t64[:, None, None] * (n * n) + i3 * n + j3, mask=tm[:, None, None] & (i3 < n) & (j3 < n),
                other=0.0).to(ACC)
    for c0 in range(0, C, BC):
        cc = c0 + c
        cm = cc < C
        m = tm[:, None] & cm[None, :]
        c3 = cc[None, None, :]
        gu = tl.load(gu_ptr + t64[:, None] * C + cc[None, :], mask=m, other=0.0).to(ACC)
        go = tl.load(go_ptr + t64[:, None, None] * D + i3 * C + c3, mask=tm[:, None, None] & (i3 < n) & (c3 < C),
                     other=0.0).to(ACC)
        for j in tl.static_range(n):
            xj = tl.load(x_ptr + t64[:, None] * D + j * C + cc[None, :], mask=m, other=0.0).to(ACC)
            phT = tl.load(phi_ptr + (j * C + cc)[None, :] * K + pk[:, None], mask=pm[:, None] & cm[None, :],
                          other=0.0).to(ACC)
            gx = tl.dot(gz, phT, input_precision=PREC) - xr[:, None] * xj + _col(pre, j, NP)[:, None] * gu
            gx += tl.sum(_col3(W, j, NP)[:, :, None] * go, axis=1)
            tl.store(gx_ptr + t64[:, None] * D + j * C + cc[None, :], gx.to(gx_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------- HC pre (dynamic and static)

@triton.jit
def _hc_pre_fwd(x_ptr, gw_ptr, cw_ptr, bw_ptr, s_ptr, sc_ptr, u_ptr, res_ptr, post_ptr, d_ptr, st_ptr, N, C, eps,
                n: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                DYNAMIC: tl.constexpr, LN: tl.constexpr, HAS_B: tl.constexpr, TANH: tl.constexpr,
                ACC: tl.constexpr, PREC: tl.constexpr):
    """Per BT tokens, rows (token, stream): d = norm(x_i) W (rows, n+2) with the norm after the matmul, the
    coefficients [A_m | A_r | B] = static + s tanh(d) [HC Eqs. 8-13], then u = sum_i A_m[i] x_i. Static HC
    (DYNAMIC False): s_ptr holds A_m (n,) and only u is computed."""
    K = n + 2
    rows = tl.arange(0, BT * NP)
    t = tl.program_id(0) * BT + rows // NP        # rows (token, stream)
    i = rows % NP
    rm = (t < N) & (i < n)
    t64 = t.to(tl.int64)
    tb = tl.program_id(0) * BT + tl.arange(0, BT)  # tokens
    tbm = tb < N
    tb64 = tb.to(tl.int64)
    c = tl.arange(0, BC)
    k = tl.arange(0, KP)
    km = k < K
    i2 = tl.arange(0, NP)[None, :]
    i3 = tl.arange(0, NP)[None, :, None]
    if DYNAMIC:
        xrow = x_ptr + t64 * (n * C) + i * C
        z = tl.zeros((BT * NP, KP), dtype=ACC)
        s1 = tl.zeros((BT * NP,), dtype=ACC)
        s2 = tl.zeros((BT * NP,), dtype=ACC)
        for c0 in range(0, C, BC):
            cc = c0 + c
            cm = cc < C
            xt = tl.load(xrow[:, None] + cc[None, :], mask=rm[:, None] & cm[None, :], other=0.0).to(ACC)
            w = tl.load(gw_ptr + cc[:, None] * K + k[None, :], mask=cm[:, None] & km[None, :], other=0.0).to(ACC)
            z += tl.dot(xt, w, input_precision=PREC)
            s1 += tl.sum(xt, axis=1)
            s2 += tl.sum(xt * xt, axis=1)
        mu = s1 / C
        if LN:   # LayerNorm(x) W = r (x gW - mu colsum(gW)) + b W
            r = 1.0 / tl.sqrt(tl.maximum(s2 / C - mu * mu, 0.0) + eps)
            z -= mu[:, None] * tl.load(cw_ptr + k, mask=km, other=0.0).to(ACC)[None, :]
        else:    # RMSNorm(x) W = r x gW
            r = 1.0 / tl.sqrt(s2 / C + eps)
        d = r[:, None] * z
        if HAS_B:
            d += tl.load(bw_ptr + k, mask=km, other=0.0).to(ACC)[None, :]
        row = t64 * n + i
        tl.store(d_ptr + row[:, None] * K + k[None, :], d, mask=rm[:, None] & km[None, :])
        tl.store(st_ptr + row * 2, r, mask=rm)
        tl.store(st_ptr + row * 2 + 1, mu, mask=rm)
        if TANH:
            d = _tanh(d)
        coef = tl.load(s_ptr + i[:, None] * K + k[None, :], mask=(i < n)[:, None] & km[None, :], other=0.0).to(ACC)
        coef += tl.load(sc_ptr + k, mask=km, other=0.0).to(ACC)[None, :] * d
        C3 = tl.reshape(coef, (BT, NP, KP))        # [t, i, k]: row i of [A_m | A_r | B]
        k3 = tl.arange(0, KP)[None, None, :]
        w_in = tl.sum(tl.where(k3 == 0, C3, 0.0), axis=2)
        w_post = tl.sum(tl.where(k3 == n + 1, C3, 0.0), axis=2)
        a4 = tl.arange(0, NP)[None, :, None, None]
        k4 = tl.arange(0, KP)[None, None, None, :]
        w_res = tl.sum(tl.where(k4 == a4 + 1, C3[:, None, :, :], 0.0), axis=3)  # [t, a, b] = A_r[b, a]: A_r^T
        tl.store(post_ptr + tb64[:, None] * n + i2, w_post, mask=tbm[:, None] & (i2 < n))
        j3 = tl.arange(0, NP)[None, None, :]
        tl.store(res_ptr + tb64[:, None, None] * (n * n) + i3 * n + j3, w_res,
                 mask=tbm[:, None, None] & (i3 < n) & (j3 < n))
    else:
        w_in = tl.load(s_ptr + i2, mask=i2 < n, other=0.0).to(ACC)   # A_m (1, NP), shared
    for c0 in range(0, C, BC):                     # u = sum_i A_m[i] x_i
        cc = c0 + c
        c3 = cc[None, None, :]
        X = tl.load(x_ptr + tb64[:, None, None] * (n * C) + i3 * C + c3,
                    mask=tbm[:, None, None] & (i3 < n) & (c3 < C), other=0.0).to(ACC)
        u = tl.sum(w_in[:, :, None] * X, axis=1)
        tl.store(u_ptr + tb64[:, None] * C + cc[None, :], u.to(u_ptr.dtype.element_ty),
                 mask=tbm[:, None] & (cc < C)[None, :])


@triton.jit
def _hc_pre_bwd(x_ptr, gw_ptr, cw_ptr, bw_ptr, s_ptr, sc_ptr, d_ptr, st_ptr, gu_ptr, gres_ptr, gpost_ptr, res_ptr,
                go_ptr, gx_ptr, gcoef_ptr, gd_ptr, N, C, w_stride, n: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr,
                BT: tl.constexpr, BC: tl.constexpr, DYNAMIC: tl.constexpr, LN: tl.constexpr, HAS_B: tl.constexpr,
                TANH: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Per rows (token, stream): d A_m = du . x_i, the gradient of the coefficients d coef (rows, n+2) and of d,
    written for the weights' sums (static HC: d A_m (N, n)), and the whole dx_i = sum_a A_r^T[a, i] dH'_a (post's
    part, from go = dH'; w_stride 0 for the shared static A_r^T) + A_m[i] du + the norm-projection backward
    (ops.streams.np_backward's formula): (r dd) gW^T - r m1 + r^2 m2 (mu - x), m1 = dd . colsum(gW) / C,
    m2 = dd . (d - bW) / C."""
    K = n + 2
    rows = tl.arange(0, BT * NP)
    t = tl.program_id(0) * BT + rows // NP
    i = rows % NP
    rm = (t < N) & (i < n)
    t64 = t.to(tl.int64)
    row = t64 * n + i
    c = tl.arange(0, BC)
    k = tl.arange(0, KP)
    km = k < K
    xrow = x_ptr + t64 * (n * C) + i * C
    gwin = tl.zeros((BT * NP,), dtype=ACC)
    for c0 in range(0, C, BC):
        cc = c0 + c
        m = rm[:, None] & (cc < C)[None, :]
        xt = tl.load(xrow[:, None] + cc[None, :], mask=m, other=0.0).to(ACC)
        gu = tl.load(gu_ptr + t64[:, None] * C + cc[None, :], mask=m, other=0.0).to(ACC)
        gwin += tl.sum(xt * gu, axis=1)
    if DYNAMIC:
        km2 = rm[:, None] & km[None, :]
        d = tl.load(d_ptr + row[:, None] * K + k[None, :], mask=km2, other=0.0).to(ACC)
        r = tl.load(st_ptr + row * 2, mask=rm, other=0.0).to(ACC)
        mu = tl.load(st_ptr + row * 2 + 1, mask=rm, other=0.0).to(ACC)
        sc = tl.load(sc_ptr + k, mask=km, other=0.0).to(ACC)[None, :]
        tt = d
        if TANH:
            tt = _tanh(d)
        coef = tl.load(s_ptr + i[:, None] * K + k[None, :], mask=(i < n)[:, None] & km[None, :], other=0.0).to(ACC)
        w_in = tl.sum(tl.where(k[None, :] == 0, coef + sc * tt, 0.0), axis=1)
        # d coef[t, i, k]: k = 0 from d A_m, k = 1 + a from d A_r^T[t, a, i], k = n + 1 from d B[t, i]
        kk = k[None, :]
        gc = tl.load(gres_ptr + t64[:, None] * (n * n) + (kk - 1) * n + i[:, None],
                     mask=rm[:, None] & (kk >= 1) & (kk <= n), other=0.0).to(ACC)
        gc += tl.where(kk == n + 1, tl.load(gpost_ptr + row, mask=rm, other=0.0).to(ACC)[:, None], 0.0)
        gc = tl.where(kk == 0, gwin[:, None], gc)
        tl.store(gcoef_ptr + row[:, None] * K + k[None, :], gc, mask=km2)
        gd = gc * sc
        if TANH:
            gd = gd * (1.0 - tt * tt)
        tl.store(gd_ptr + row[:, None] * K + k[None, :], gd, mask=km2)
        y = d
        if HAS_B:
            y -= tl.load(bw_ptr + k, mask=km, other=0.0).to(ACC)[None, :]
        m2 = tl.sum(gd * y, axis=1) / C
        if LN:   # the per-row constant - r m1 + r^2 m2 mu
            cw = tl.load(cw_ptr + k, mask=km, other=0.0).to(ACC)[None, :]
            const = r * (r * m2 * mu - tl.sum(gd * cw, axis=1) / C)
        else:
            const = tl.zeros_like(r)
        rgd = r[:, None] * gd
    else:
        w_in = tl.load(s_ptr + i, mask=i < n, other=0.0).to(ACC)
        tl.store(gcoef_ptr + row, gwin, mask=rm)
    a2 = tl.arange(0, NP)[None, :]
    wcol = tl.load(res_ptr + t64[:, None] * w_stride + a2 * n + i[:, None], mask=rm[:, None] & (a2 < n),
                   other=0.0).to(ACC)  # A_r^T[t, a, i] over a: what row (t, i) receives from each dH'_a
    for c0 in range(0, C, BC):
        cc = c0 + c
        cm = cc < C
        m = rm[:, None] & cm[None, :]
        c3 = cc[None, None, :]
        go = tl.load(go_ptr + t64[:, None, None] * (n * C) + a2[:, :, None] * C + c3,
                     mask=rm[:, None, None] & (a2[:, :, None] < n) & (c3 < C), other=0.0).to(ACC)
        gx = w_in[:, None] * tl.load(gu_ptr + t64[:, None] * C + cc[None, :], mask=m, other=0.0).to(ACC)
        gx += tl.sum(wcol[:, :, None] * go, axis=1)
        if DYNAMIC:
            xt = tl.load(xrow[:, None] + cc[None, :], mask=m, other=0.0).to(ACC)
            wT = tl.load(gw_ptr + cc[None, :] * K + k[:, None], mask=km[:, None] & cm[None, :], other=0.0).to(ACC)
            gx += tl.dot(rgd, wT, input_precision=PREC) + const[:, None] - (r * r * m2)[:, None] * xt
        tl.store(gx_ptr + row[:, None] * C + cc[None, :], gx.to(gx_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------- post: H' = w_res x + post^T y

@triton.jit
def _post_fwd(x_ptr, w_ptr, p_ptr, y_ptr, o_ptr, N, C, w_stride, p_stride, n: tl.constexpr, NP: tl.constexpr,
              BT: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """H'[t, i] = sum_j w_res[t, i, j] x[t, j] + post[t, i] y[t]; w_stride = p_stride = 0 for shared weights."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    tm = t < N
    t64 = t.to(tl.int64)
    c = tl.arange(0, BC)
    i2 = tl.arange(0, NP)[None, :]
    i3 = tl.arange(0, NP)[None, :, None]
    j3 = tl.arange(0, NP)[None, None, :]
    W = tl.load(w_ptr + t64[:, None, None] * w_stride + i3 * n + j3, mask=tm[:, None, None] & (i3 < n) & (j3 < n),
                other=0.0).to(ACC)
    P = tl.load(p_ptr + t64[:, None] * p_stride + i2, mask=tm[:, None] & (i2 < n), other=0.0).to(ACC)
    for c0 in range(0, C, BC):
        cc = c0 + c
        m = tm[:, None] & (cc < C)[None, :]
        y = tl.load(y_ptr + t64[:, None] * C + cc[None, :], mask=m, other=0.0).to(ACC)
        out = P[:, :, None] * y[:, None, :]
        for j in tl.static_range(n):
            xj = tl.load(x_ptr + t64[:, None] * (n * C) + j * C + cc[None, :], mask=m, other=0.0).to(ACC)
            out += _col3(W, j, NP)[:, :, None] * xj[:, None, :]
        c3 = cc[None, None, :]
        tl.store(o_ptr + t64[:, None, None] * (n * C) + i3 * C + c3, out.to(o_ptr.dtype.element_ty),
                 mask=tm[:, None, None] & (i3 < n) & (c3 < C))


@triton.jit
def _post_bwd(x_ptr, p_ptr, y_ptr, go_ptr, gw_ptr, gp_ptr, gy_ptr, N, C, p_stride,
              n: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """dy = sum_i post_i dH'_i, and per token d w_res[i, j] = dH'_i . x_j, d post_i = dH'_i . y. (dx_j = sum_i
    w_res[i, j] dH'_i is added by the pre kernel's backward, which writes x's whole gradient.)"""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    tm = t < N
    t64 = t.to(tl.int64)
    c = tl.arange(0, BC)
    i2 = tl.arange(0, NP)[None, :]
    i3 = tl.arange(0, NP)[None, :, None]
    j3 = tl.arange(0, NP)[None, None, :]
    wm = tm[:, None, None] & (i3 < n) & (j3 < n)
    P = tl.load(p_ptr + t64[:, None] * p_stride + i2, mask=tm[:, None] & (i2 < n), other=0.0).to(ACC)
    gW = tl.zeros((BT, NP, NP), dtype=ACC)
    gP = tl.zeros((BT, NP), dtype=ACC)
    for c0 in range(0, C, BC):
        cc = c0 + c
        m = tm[:, None] & (cc < C)[None, :]
        c3 = cc[None, None, :]
        G = tl.load(go_ptr + t64[:, None, None] * (n * C) + i3 * C + c3, mask=tm[:, None, None] & (i3 < n) & (c3 < C),
                    other=0.0).to(ACC)
        y = tl.load(y_ptr + t64[:, None] * C + cc[None, :], mask=m, other=0.0).to(ACC)
        gP += tl.sum(G * y[:, None, :], axis=2)
        tl.store(gy_ptr + t64[:, None] * C + cc[None, :], tl.sum(P[:, :, None] * G, axis=1).to(gy_ptr.dtype.element_ty),
                 mask=m)
        for j in tl.static_range(n):
            xj = tl.load(x_ptr + t64[:, None] * (n * C) + j * C + cc[None, :], mask=m, other=0.0).to(ACC)
            gW += tl.where(j3 == j, tl.sum(G * xj[:, None, :], axis=2)[:, :, None], 0.0)
    tl.store(gw_ptr + t64[:, None, None] * (n * n) + i3 * n + j3, gW, mask=wm)
    tl.store(gp_ptr + t64[:, None] * n + i2, gP, mask=tm[:, None] & (i2 < n))


# ----------------------------------------------------------------------------- launches (the ops and scripts/kernel_cost.py)

_PTR = {"mhc_pre": ("x_ptr", "phi_ptr", "a_ptr", "b_ptr", "u_ptr", "res_ptr", "post_ptr", "z_ptr", "r_ptr"),
        "mhc_pre_bwd": ("x_ptr", "phi_ptr", "a_ptr", "b_ptr", "z_ptr", "r_ptr", "gu_ptr", "gres_ptr", "gpost_ptr",
                        "res_ptr", "go_ptr", "gx_ptr", "gact_ptr", "ws_ptr"),
        "hc_pre": ("x_ptr", "gw_ptr", "cw_ptr", "bw_ptr", "s_ptr", "sc_ptr", "u_ptr", "res_ptr", "post_ptr", "d_ptr",
                   "st_ptr"),
        "hc_pre_bwd": ("x_ptr", "gw_ptr", "cw_ptr", "bw_ptr", "s_ptr", "sc_ptr", "d_ptr", "st_ptr", "gu_ptr",
                       "gres_ptr", "gpost_ptr", "res_ptr", "go_ptr", "gx_ptr", "gcoef_ptr", "gd_ptr"),
        "post": ("x_ptr", "w_ptr", "p_ptr", "y_ptr", "o_ptr"),
        "post_bwd": ("x_ptr", "p_ptr", "y_ptr", "go_ptr", "gw_ptr", "gp_ptr", "gy_ptr")}


def launch(op, N, n, C, dtype, prec="ieee", iters=20, eps=1e-6, dynamic=True, ln=False, has_b=False, tanh=True,
           shared=False):
    """The Launch of one kernel for N tokens of n streams of width C in dtype: its grid, tiles and loops (their trip
    counts over the grid) and the bytes it moves of per-token tensors (the streams, u or y and their gradients,
    the per-token coefficients). op: mhc_pre, mhc_pre_bwd, hc_pre, hc_pre_bwd (dynamic or static), post,
    post_bwd (shared: static HC's weights)."""
    NP, BC, ACC = _pad(n), _chunk(C), _tl(dtype)
    e, f = torch.tensor([], dtype=dtype).element_size(), torch.tensor([], dtype=_acc(dtype)).element_size()
    X, U = N * n * C * e, N * C * e                 # one pass over the streams; over u, y or their gradients
    kc = -(-C // BC)
    tensors = {name: (dtype if name in ("x_ptr", "u_ptr", "y_ptr", "o_ptr", "gu_ptr", "go_ptr", "gx_ptr", "gy_ptr")
                      else _acc(dtype)) for name in _PTR[op]}
    if op.startswith("mhc_pre"):
        K, G, nb = n * n + 2 * n, _groups(n), -(-N // MHC_TOKENS)
        consts = dict(n=n, NP=NP, G=G, BT=MHC_TOKENS, BC=BC, ACC=ACC, PREC=prec)
        if op == "mhc_pre":   # x twice (the projection, then u); u, H_res, H_post, z, r out
            return Launch(_mhc_pre_fwd, (nb,), tensors, dict(N=N, C=C, eps=eps, iters=iters), consts, WARPS, 2,
                          [nb * -(-n * C // BC), nb * iters, nb * kc], 2 * X + U + N * (n * n + n + K + 1) * f)
        # x twice (d H_pre, then dx), du twice, dH', dx out; z, r, the coefficients' gradients; the Sinkhorn rows
        ws = N * 2 * iters * NP * NP * f
        return Launch(_mhc_pre_bwd, (nb,), tensors, dict(N=N, C=C, iters=iters), consts, WARPS, 2,
                      [nb * kc, nb * iters, nb * iters, nb * kc], 3 * X + 2 * U + X + N * (2 * K + 1 + 2 * n * n + n) * f
                      + 2 * ws)
    if op.startswith("hc_pre"):
        BT = max(1, HC_ROWS // NP)
        nb = -(-N // BT)
        consts = dict(n=n, NP=NP, KP=max(16, triton.next_power_of_2(n + 2)) if dynamic else 16, BT=BT, BC=BC,
                      DYNAMIC=dynamic, LN=ln, HAS_B=has_b, TANH=tanh, ACC=ACC, PREC=prec)
        coef = N * n * (n + 2 + 2) * f if dynamic else 0
        if op == "hc_pre":
            return Launch(_hc_pre_fwd, (nb,), tensors, dict(N=N, C=C, eps=eps), consts, WARPS, 2,
                          [nb * kc] * (2 if dynamic else 1), (2 if dynamic else 1) * X + U + coef + N * n * (n + 1) * f)
        return Launch(_hc_pre_bwd, (nb,), tensors, dict(N=N, C=C, w_stride=0 if not dynamic else n * n), consts,
                      WARPS, 2, [nb * kc] * 2, (3 if dynamic else 2) * X + 2 * U + X + 2 * coef + N * n * n * f)
    BT = max(1, POST_ROWS // NP)
    nb = -(-N // BT)
    consts = dict(n=n, NP=NP, BT=BT, BC=BC, ACC=ACC)
    w = 0 if shared else N * (n * n + n) * f
    if op == "post":   # x and y in, H' out
        return Launch(_post_fwd, (nb,), tensors, dict(N=N, C=C, w_stride=0 if shared else n * n,
                                                      p_stride=0 if shared else n), consts, WARPS, 2, [nb * kc],
                      2 * X + U + w)
    return Launch(_post_bwd, (nb,), tensors, dict(N=N, C=C, p_stride=0 if shared else n), consts, WARPS, 2,
                  [nb * kc], 2 * X + 2 * U + w + N * (n * n + n) * f)


def site_plan(kind, N, n, C, dtype=torch.float32, **kw):
    """The launches of one site, forward and backward, and the bytes the backward's torch ops move of per-token
    tensors: the projection's weight gradient, one GEMM that reads x (dynamic HC, mHC)."""
    if kind == "mhc":
        names = ("mhc_pre", "post", "post_bwd", "mhc_pre_bwd")
    else:
        names = ("hc_pre", "post", "post_bwd", "hc_pre_bwd")
    launches = [launch(op, N, n, C, dtype, shared=kind == "static", dynamic=kind != "static", **kw) for op in names]
    e = torch.tensor([], dtype=dtype).element_size()
    torch_bytes = 0 if kind == "static" else N * n * C * e  # x^T dz for phi or W
    return launches, torch_bytes


# ----------------------------------------------------------------------------- custom ops (launch, fake, autograd)


@torch.library.custom_op("hc_streams::mhc_pre", mutates_args=())
def mhc_pre(x: Tensor, phi: Tensor, a: Tensor, b: Tensor, iters: int, eps: float
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """mHC before the sublayer: x (N,n,C), phi (nC, n^2+2n), a = (alpha_pre, alpha_post, alpha_res), b = [b_pre |
    b_post | vec(b_res)] -> u (N,C), H_res (N,n,n), H_post (N,n), z (N,K), r (N,) for the backward, and link, an
    unwritten (N,n,C) tensor for post: its gradient is post's dH', with which this op's backward writes all of dx."""
    x = x.contiguous()
    N, n, C = x.shape
    acc = _acc(x.dtype)
    u = x.new_empty(N, C)
    res, post = x.new_empty(N, n, n, dtype=acc), x.new_empty(N, n, dtype=acc)
    z, r = x.new_empty(N, n * n + 2 * n, dtype=acc), x.new_empty(N, dtype=acc)
    run(launch("mhc_pre", N, n, C, x.dtype, _prec(x), iters, eps), x_ptr=x, phi_ptr=phi.contiguous(), a_ptr=a,
        b_ptr=b, u_ptr=u, res_ptr=res, post_ptr=post, z_ptr=z, r_ptr=r)
    return u, res, post, z, r, _link(x)


@mhc_pre.register_fake
def _(x, phi, a, b, iters, eps):
    N, n, C = x.shape
    acc = _acc(x.dtype)
    return (x.new_empty(N, C), x.new_empty(N, n, n, dtype=acc), x.new_empty(N, n, dtype=acc),
            x.new_empty(N, n * n + 2 * n, dtype=acc), x.new_empty(N, dtype=acc), _link(x))


@torch.library.custom_op("hc_streams::mhc_pre_bwd", mutates_args=())
def mhc_pre_bwd(x: Tensor, phi: Tensor, a: Tensor, b: Tensor, z: Tensor, r: Tensor, gu: Tensor, gres: Tensor,
                gpost: Tensor, res: Tensor, go: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """-> dx (N,n,C), through pre (u and the coefficients) and through post (H_res^T go, go = dH'), and d act (N,K),
    the gradient of alpha r z + b."""
    x = x.contiguous()
    N, n, C = x.shape
    NP = _pad(n)
    gx = torch.empty_like(x)
    gact = torch.empty_like(z)
    ws = x.new_empty(N, 2 * iters, NP, NP, dtype=z.dtype)
    run(launch("mhc_pre_bwd", N, n, C, x.dtype, _prec(x), iters), x_ptr=x, phi_ptr=phi.contiguous(), a_ptr=a,
        b_ptr=b, z_ptr=z, r_ptr=r, gu_ptr=gu.contiguous(), gres_ptr=gres.contiguous(), gpost_ptr=gpost.contiguous(),
        res_ptr=res.contiguous(), go_ptr=go.contiguous(), gx_ptr=gx, gact_ptr=gact, ws_ptr=ws)
    return gx, gact


@mhc_pre_bwd.register_fake
def _(x, phi, a, b, z, r, gu, gres, gpost, res, go, iters):
    return torch.empty_like(x), torch.empty_like(z)


def _mhc_pre_setup(ctx, inputs, output):
    x, phi, a, b, iters, _ = inputs
    ctx.save_for_backward(x, phi, a, b, output[3], output[4], output[1])
    ctx.iters = iters


def _mhc_pre_backward(ctx, gu, gres, gpost, _gz, _gr, glink):
    x, phi, a, b, z, r, res = ctx.saved_tensors
    N, n, C = x.shape
    glink = torch.zeros_like(x) if glink is None else glink
    with torch.autocast(x.device.type, enabled=False):
        gx, gact = mhc_pre_bwd(x, phi, a, b, z, r, gu, gres, gpost, res, glink, ctx.iters)
        ah = (gact * (r[:, None] * z)).sum(0)                       # d alpha: per group sums of d act . h
        ga = torch.stack([ah[:n].sum(), ah[n:2 * n].sum(), ah[2 * n:].sum()])
        acol = torch.cat([a[0].expand(n), a[1].expand(n), a[2].expand(n * n)])
        gphi = x.reshape(N, n * C).T.to(gact.dtype) @ (gact * acol * r[:, None])   # one GEMM over the tokens
    return gx, gphi.to(phi.dtype), ga.to(a.dtype), gact.sum(0).to(b.dtype), None, None


mhc_pre.register_autograd(_mhc_pre_backward, setup_context=_mhc_pre_setup)


@torch.library.custom_op("hc_streams::hc_pre", mutates_args=())
def hc_pre(x: Tensor, gw: Tensor, cw: Optional[Tensor], bw: Optional[Tensor], s: Tensor, sc: Tensor, tanh: bool,
           eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Dynamic HC before the sublayer: x (N,n,C), gW = diag(g) [W_alpha | W_beta] (C, n+2), cW = colsum(gW)
    (LayerNorm; None for RMSNorm), bW = b W (None without a norm bias), s = [static_alpha | static_beta] (n, n+2),
    sc = (s_alpha x (n+1), s_beta) -> u (N,C), A_r^T (N,n,n), B (N,n), d (N,n,n+2), (r, mu) (N,n,2), and link
    (see mhc_pre)."""
    x = x.contiguous()
    N, n, C = x.shape
    acc = _acc(x.dtype)
    u = x.new_empty(N, C)
    res, post = x.new_empty(N, n, n, dtype=acc), x.new_empty(N, n, dtype=acc)
    d, st = x.new_empty(N, n, n + 2, dtype=acc), x.new_empty(N, n, 2, dtype=acc)
    run(launch("hc_pre", N, n, C, x.dtype, _prec(x), eps=eps, ln=cw is not None, has_b=bw is not None, tanh=tanh),
        x_ptr=x, gw_ptr=gw.contiguous(), cw_ptr=x if cw is None else cw, bw_ptr=x if bw is None else bw,
        s_ptr=s.contiguous(), sc_ptr=sc, u_ptr=u, res_ptr=res, post_ptr=post, d_ptr=d, st_ptr=st)
    return u, res, post, d, st, _link(x)


@hc_pre.register_fake
def _(x, gw, cw, bw, s, sc, tanh, eps):
    N, n, C = x.shape
    acc = _acc(x.dtype)
    return (x.new_empty(N, C), x.new_empty(N, n, n, dtype=acc), x.new_empty(N, n, dtype=acc),
            x.new_empty(N, n, n + 2, dtype=acc), x.new_empty(N, n, 2, dtype=acc), _link(x))


@torch.library.custom_op("hc_streams::hc_pre_bwd", mutates_args=())
def hc_pre_bwd(x: Tensor, gw: Tensor, cw: Optional[Tensor], bw: Optional[Tensor], s: Tensor, sc: Tensor, d: Tensor,
               st: Tensor, gu: Tensor, gres: Tensor, gpost: Tensor, res: Tensor, go: Tensor, tanh: bool
               ) -> tuple[Tensor, Tensor, Tensor]:
    """-> dx (N,n,C) through pre and post (A_r go, go = dH'), d coef and d d (N,n,n+2) for the weights' sums."""
    x = x.contiguous()
    N, n, C = x.shape
    gx, gcoef, gd = torch.empty_like(x), torch.empty_like(d), torch.empty_like(d)
    run(launch("hc_pre_bwd", N, n, C, x.dtype, _prec(x), ln=cw is not None, has_b=bw is not None, tanh=tanh),
        x_ptr=x, gw_ptr=gw.contiguous(), cw_ptr=x if cw is None else cw, bw_ptr=x if bw is None else bw,
        s_ptr=s.contiguous(), sc_ptr=sc, d_ptr=d, st_ptr=st, gu_ptr=gu.contiguous(), gres_ptr=gres.contiguous(),
        gpost_ptr=gpost.contiguous(), res_ptr=res.contiguous(), go_ptr=go.contiguous(), gx_ptr=gx, gcoef_ptr=gcoef,
        gd_ptr=gd)
    return gx, gcoef, gd


@hc_pre_bwd.register_fake
def _(x, gw, cw, bw, s, sc, d, st, gu, gres, gpost, res, go, tanh):
    return torch.empty_like(x), torch.empty_like(d), torch.empty_like(d)


def _hc_pre_setup(ctx, inputs, output):
    x, gw, cw, bw, s, sc, tanh, _ = inputs
    ctx.save_for_backward(x, gw, cw, bw, s, sc, output[3], output[4], output[1])
    ctx.tanh = tanh


def _hc_pre_backward(ctx, gu, gres, gpost, _gd, _gst, glink):
    x, gw, cw, bw, s, sc, d, st, res = ctx.saved_tensors
    N, n, C = x.shape
    glink = torch.zeros_like(x) if glink is None else glink
    with torch.autocast(x.device.type, enabled=False):
        gx, gcoef, gd = hc_pre_bwd(x, gw, cw, bw, s, sc, d, st, gu, gres, gpost, res, glink, ctx.tanh)
        tt = torch.tanh(d) if ctx.tanh else d
        r, mu = st[..., 0:1], st[..., 1:2]
        ggw = x.reshape(N * n, C).T.to(gd.dtype) @ (r * gd).reshape(N * n, n + 2)   # one GEMM over the rows
        gcw = None if cw is None else -(r * mu * gd).sum((0, 1)).to(cw.dtype)
        gbw = None if bw is None else gd.sum((0, 1)).to(bw.dtype)
    return (gx, ggw.to(gw.dtype), gcw, gbw, gcoef.sum(0).to(s.dtype), (gcoef * tt).sum((0, 1)).to(sc.dtype),
            None, None)


hc_pre.register_autograd(_hc_pre_backward, setup_context=_hc_pre_setup)


@torch.library.custom_op("hc_streams::static_pre", mutates_args=())
def static_pre(x: Tensor, w_in: Tensor, w_res: Tensor) -> tuple[Tensor, Tensor]:
    """Static HC before the sublayer: u = sum_i A_m[i] x_i for x (N,n,C), A_m (n,), and link (see mhc_pre); A_r^T
    (n,n) is taken for the backward, which writes post's part of dx too."""
    x = x.contiguous()
    N, n, C = x.shape
    u = x.new_empty(N, C)
    run(launch("hc_pre", N, n, C, x.dtype, _prec(x), eps=0.0, dynamic=False, tanh=False), x_ptr=x, gw_ptr=x,
        cw_ptr=x, bw_ptr=x, s_ptr=w_in.contiguous(), sc_ptr=x, u_ptr=u, res_ptr=x, post_ptr=x, d_ptr=x, st_ptr=x)
    return u, _link(x)


@static_pre.register_fake
def _(x, w_in, w_res):
    return x.new_empty(x.shape[0], x.shape[2]), _link(x)


@torch.library.custom_op("hc_streams::static_pre_bwd", mutates_args=())
def static_pre_bwd(x: Tensor, w_in: Tensor, w_res: Tensor, gu: Tensor, go: Tensor) -> tuple[Tensor, Tensor]:
    """-> dx_i = A_m[i] du + sum_a A_r^T[a, i] dH'_a (N,n,C) and the per-token d A_m (N,n)."""
    x = x.contiguous()
    N, n, C = x.shape
    gx, gw = torch.empty_like(x), x.new_empty(N, n, dtype=_acc(x.dtype))
    run(launch("hc_pre_bwd", N, n, C, x.dtype, _prec(x), dynamic=False, tanh=False), x_ptr=x, gw_ptr=x, cw_ptr=x,
        bw_ptr=x, s_ptr=w_in.contiguous(), sc_ptr=x, d_ptr=x, st_ptr=x, gu_ptr=gu.contiguous(), gres_ptr=x,
        gpost_ptr=x, res_ptr=w_res.contiguous(), go_ptr=go.contiguous(), gx_ptr=gx, gcoef_ptr=gw, gd_ptr=x)
    return gx, gw


@static_pre_bwd.register_fake
def _(x, w_in, w_res, gu, go):
    return torch.empty_like(x), x.new_empty(x.shape[0], x.shape[1], dtype=_acc(x.dtype))


def _static_pre_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _static_pre_backward(ctx, gu, glink):
    x, w_in, w_res = ctx.saved_tensors
    glink = torch.zeros_like(x) if glink is None else glink
    gx, gw = static_pre_bwd(x, w_in, w_res, gu, glink)
    return gx, gw.sum(0).to(w_in.dtype), None  # A_r's gradient is post's


static_pre.register_autograd(_static_pre_backward, setup_context=_static_pre_setup)


@torch.library.custom_op("hc_streams::post", mutates_args=())
def post(x: Tensor, w_res: Tensor, w_post: Tensor, y: Tensor, link: Tensor) -> Tensor:
    """After the sublayer: H' = w_res x + w_post^T y for x (N,n,C), y (N,C), w_res (N,n,n) and w_post (N,n) per
    token, or (1,n,n), (1,n) shared (static HC). link is the pre op's: x's gradient through here, w_res^T dH', is
    written by that op's backward, which receives dH' as link's gradient (this op gives x none)."""
    x = x.contiguous()
    N, n, C = x.shape
    w_res, w_post = w_res.contiguous(), w_post.contiguous()
    out = torch.empty_like(x)
    run(launch("post", N, n, C, x.dtype, shared=w_res.shape[0] == 1), x_ptr=x, w_ptr=w_res, p_ptr=w_post,
        y_ptr=y.contiguous(), o_ptr=out)
    return out


@post.register_fake
def _(x, w_res, w_post, y, link):
    return torch.empty_like(x)


@torch.library.custom_op("hc_streams::post_bwd", mutates_args=())
def post_bwd(x: Tensor, w_post: Tensor, y: Tensor, go: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> per-token d w_res (N,n,n), d w_post (N,n), and dy (N,C) in y's dtype."""
    x, y = x.contiguous(), y.contiguous()
    N, n, C = x.shape
    w_post = w_post.contiguous()
    acc = _acc(x.dtype)
    gy = torch.empty_like(y)
    gw, gp = x.new_empty(N, n, n, dtype=acc), x.new_empty(N, n, dtype=acc)
    run(launch("post_bwd", N, n, C, x.dtype, shared=w_post.shape[0] == 1), x_ptr=x, p_ptr=w_post, y_ptr=y,
        go_ptr=go.contiguous(), gw_ptr=gw, gp_ptr=gp, gy_ptr=gy)
    return gw, gp, gy


@post_bwd.register_fake
def _(x, w_post, y, go):
    N, n, _ = x.shape
    acc = _acc(x.dtype)
    return x.new_empty(N, n, n, dtype=acc), x.new_empty(N, n, dtype=acc), torch.empty_like(y)


def _post_setup(ctx, inputs, output):
    x, w_res, w_post, y, _ = inputs
    ctx.save_for_backward(x, w_post, y)
    ctx.shared = w_res.shape[0] == 1
    ctx.dtypes = (w_res.dtype, w_post.dtype)


def _post_backward(ctx, go):
    x, w_post, y = ctx.saved_tensors
    gw, gp, gy = post_bwd(x, w_post, y, go)
    if ctx.shared:  # shared (static HC): the sum over tokens
        gw, gp = gw.sum(0, keepdim=True), gp.sum(0, keepdim=True)
    return None, gw.to(ctx.dtypes[0]), gp.to(ctx.dtypes[1]), gy, go


post.register_autograd(_post_backward, setup_context=_post_setup)


# ----------------------------------------------------------------------------- one site

def connect(x, f, kind, params=(), W=None, norm=None, tanh=True, iters=20, static=None):
    """One residual site with these kernels, H' = res + post^T f(u) for x (B,T,n,C): ops.streams.connect's
    arguments (it chooses this form on CUDA; the tests call it on CPU tensors under TRITON_INTERPRET=1)."""
    B, T, n, C = x.shape
    N = B * T
    xs = x.reshape(N, n, C)
    with torch.autocast(x.device.type, enabled=False):  # the coefficients and the stream update in fp32
        if static is not None:
            w_in, w_res, w_post = static
            u, link = static_pre(xs, w_in, w_res)
            w_res, w_post = w_res[None], w_post[None]
        elif kind == "mhc":
            a_pre, a_post, a_res, b_pre, b_post, b_res = params
            u, w_res, w_post, _, _, link = mhc_pre(xs, W, torch.stack([a_pre, a_post, a_res]),
                                                   torch.cat([b_pre, b_post, b_res.flatten()]), iters, norm[3])
        else:
            g, b, rms, eps = norm
            static_alpha, static_beta, s_alpha, s_beta = params
            gw = W if g is None else g[:, None] * W
            u, w_res, w_post, _, _, link = hc_pre(xs, gw, None if rms else gw.sum(0), None if b is None else b @ W,
                                                  torch.cat([static_alpha, static_beta[:, None]], 1),
                                                  torch.cat([s_alpha.expand(n + 1), s_beta.expand(1)]), tanh, eps)
    y = f(u.view(B, T, C))
    with torch.autocast(x.device.type, enabled=False):
        return post(xs, w_res, w_post, y.reshape(N, C), link).view(B, T, n, C)
