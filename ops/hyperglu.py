"""
HyperGLU's fast path: the same score rows as model.HyperGLU._rows, chunk by chunk, with the backward written by hand.

attend() is the entry point; it takes tensors and plain numbers and flags only (nothing here imports model.py).
Per chunk of M query rows it keeps nothing T x T: forward saves q, k, v, c1, c2 (O(T d)); backward recomputes the
chunk's maps and differentiates them directly. Three things make it cheaper than autograd over the reference rows:
  - no skew copies: QK^T is written by its GEMM straight into lag order (the output is a skewed view of a buffer
    W + base wide, base = W-1-row_start), and A V reads the final map through the inverse view;
  - the mixers are one elementwise pass (the diagonal) and one accumulating GEMM (the low rank) each;
  - backward reuses the forward's small tensors and needs no T x T autograd graph.
form="fused" (CPU, fp32/fp64, the lag layout) runs the middle of each chunk (QK^T through op2, and its backward) in
the fused C++ kernel of ops/hyperglu_cpu.py; form="triton" hands the call to ops/hyperglu_triton.py. ops.dispatch
picks the form.
Maps are (B, H, M, W): H heads (H1 = 2h qk-heads for GLU), M rows, W keys/lags.
"""

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ops import hyperglu_cpu


class Spec(NamedTuple):
    """What the maps depend on besides the tensors (attend's flags and numbers, carried through the chunks)."""
    glu: bool        # GLU: 2h qk-heads, gate heads 0..h-1 then scale heads h..2h-1; else ReLU (HyperMLP), h heads
    norm: bool       # scale each output row by 1 / max(||gate row||, eps) (attn_norm "out_scale" or "l2")
    eps: float
    lag: bool        # the lag layout (aligner_kind "offset"); else key order ("identity")
    mask: bool       # zero the scores of keys a row must not see (do_masking)
    mask1: bool      # and op1's output (mask and op1_do_masking)
    mask2: bool      # and op2's output (mask and op2_do_masking)
    shortcut1: bool  # the I in op1's R = I + diag(d) + U diag(c) Vt
    shortcut2: bool
    fused: bool      # the middle of each chunk in ops/hyperglu_cpu.py's C++ kernel


def attend(q, k, v, c1, c2, mix1, mix2, n_past=0, *, glu, norm, eps, lag=True, masks=(True, True, True), chunk=None,
           form="rows"):
    """The attention output before the VO gate for the new query rows (B,h,T,dv), as model.HyperGLU computes it.
    q (B,H1,T,dqk), k (B,H1,n_past+T,dqk), v (B,h,n_past+T,dv), c1 (B,H1,T,r1), c2 (B,h,T,r2) (None when a mixer
    is off); mix1, mix2 = (U (H,L,r), Vt (H,r,L), d (H,L) or None, shortcut) of op1 and op2, or None when off;
    glu, norm, eps, lag as Spec; masks = (do_masking, op1_do_masking, op2_do_masking); chunk rows per chunk
    (None: default_chunk); form "rows", "fused" or "triton" (ops.dispatch.hyperglu)."""
    if form == "triton":
        from ops import hyperglu_triton
        return hyperglu_triton.attend(q, k, v, c1, c2, mix1, mix2, n_past, glu, norm, eps)
    spec = Spec(glu, norm, eps, lag, masks[0], masks[0] and masks[1], masks[0] and masks[2],
                mix1 is not None and mix1[3], mix2 is not None and mix2[3], form == "fused")
    params = tuple(m[i] if m is not None else None for m in (mix1, mix2) for i in range(3))  # (U1, Vt1, d1, U2, ..)
    step = chunk or default_chunk(q.device)
    prune = lag and spec.mask  # a row only needs keys up to itself
    # contiguous per head: every chunk's k[:, :, :W] and v[:, :, :W] then fold (B, heads) into one GEMM batch
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if torch.is_grad_enabled():
        return RecomputeRows.apply(spec, n_past, step, prune, q, k, v, c1, c2, *params)
    outs = [rows_forward(spec, *args, row_start, params) for _, row_start, args in chunks(step, n_past, prune, q, k,
                                                                                          v, c1, c2)]
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def invalid_mask(M, W, row_start, lag, device):
    """(M, W) bool, True where query row r = row_start + m must not use column c (model.HyperGLU._rows uses it too).
    Lag layout: the key r + c - (W-1) does not exist (c + r < W-1). Key order: a future key (c > r)."""
    r = torch.arange(row_start, row_start + M, device=device)[:, None]
    c = torch.arange(W, device=device)[None, :]
    return (c + r < W - 1) if lag else (c > r)


def key_view(buf, W, base):
    """buf (..., M, W + base) holds lag-layout rows; return its key-order view (..., M, W):
    K[m, i] = buf[m, i + base - m]. Row m of a chunk is query r = row_start + m, and base = W-1-row_start,
    so key i sits at lag column i + W-1-r (to_lag's map), and keys i > r land in the columns >= W."""
    st = buf.stride()
    return buf.as_strided((*buf.shape[:-1], W), (*st[:-2], st[-2] - 1, st[-1]), buf.storage_offset() + base)


def invalid_cols(M, W, row_start, lag, device):
    """(c0, c1, mask (M, c1-c0)): invalid_mask cut to the only columns of a chunk that can be invalid.
    Lag layout: keys < 0, all left of column W-1-row_start. Key order: future keys, all right of row_start."""
    c0, c1 = (0, W - 1 - row_start) if lag else (row_start + 1, W)
    return c0, c1, invalid_mask(M, W, row_start, lag, device)[:, c0:c1]


def mask_(Y, region, on=True):
    """Zero Y's invalid entries in place (an invalid_cols region, None for none); also masked_fill's backward."""
    if on and region is not None:
        Y[..., region[0]:region[1]].masked_fill_(region[2], 0.0)
    return Y


def scaled(X, scale, tail=0):
    """X * scale (a per-lag (H, 1, W) scale or a number) in a buffer (..., W + tail) whose last `tail`
    columns are 0, so key_view can read it. Returns the buffer; [..., :W] is the product."""
    if torch.compiler.is_compiling():  # functional form for torch.compile
        return F.pad(X * scale, (0, tail))
    buf = X.new_empty(*X.shape[:-1], X.shape[-1] + tail)
    buf[..., X.shape[-1]:].zero_()
    torch.mul(X, scale, out=buf[..., :X.shape[-1]])
    return buf


def lag_scale(d, shortcut, s):
    """The full-rank part of a mixer R, I + diag(d), as a per-lag (H, 1, W) scale (a number without d)."""
    if d is None:
        return 1.0 if shortcut else 0.0
    return d[:, None, s:] + 1.0 if shortcut else d[:, None, s:]


def low_rank_add_(Y, Pc, Vt):
    """Y (B,H,M,W) += Pc (B,H,M,r) @ Vt (H,r,W) in place, one batched GEMM: R's low-rank part U diag(c) Vt."""
    B, H, M, W = Y.shape
    Y.view(B * H, M, W).baddbmm_(Pc.reshape(B * H, M, -1), Vt.expand(B, -1, -1, -1).reshape(B * H, -1, W))
    return Y


def act_forward(Z1, h, glu, use_norm, eps, scale2, tail, keep):
    """The activation on op1's output Z1 (B,H1,M,W), the paper's GLU softplus(scale) relu(gate) / ||gate||,
    and the full-rank start of op2.
    Returns n and inv = 1/max(n, eps) (B,h,M,1, fp32; None for attn_norm="none"), softplus(Sc) and relu(G)
    (GLU; backward reuses them), a (B,h,M,W), and a * scale2 in a buffer with `tail` zero columns (op2's
    low-rank GEMM then accumulates into it)."""
    G = Z1[:, :h] if glu else Z1  # GLU: gate heads 0..h-1, scale heads h..2h-1
    n = inv = sp = rG = None
    if use_norm:  # l2 and out_scale are the same function (ReLU is positively homogeneous): scale the output
        n = torch.linalg.vector_norm(G, dim=-1, keepdim=True, dtype=torch.promote_types(G.dtype, torch.float32))
        inv = 1.0 / n.clamp_min(eps)
    rG = G.clamp_min(0.0)
    if glu:
        sp = torch.logaddexp(Z1[:, h:], Z1.new_zeros(()))  # softplus
        a = sp * rG if keep else sp.mul_(rG)
    else:
        a = rG
    return n, inv, sp, rG, a, scaled(a, scale2, tail)


def no_autocast(fn):
    """Run fn with autocast off: rows_forward/rows_backward cast everything to q's dtype themselves."""
    @functools.wraps(fn)
    def run(spec, q, *args, **kw):
        with torch.autocast(q.device.type, enabled=False):
            return fn(spec, q, *args, **kw)
    return run


@no_autocast
def rows_forward(spec, q, k, v, c1, c2, row_start, params, keep=False):
    """model.HyperGLU._rows without autograd: output rows row_start..row_start+M-1 (B,h,M,dv).
    keep=True returns the chunk's maps and small tensors for rows_backward instead of the output."""
    B, H1, M, _ = q.shape
    W, h, glu, lag = k.shape[2], v.shape[1], spec.glu, spec.lag
    s = lag_start(params, W)
    dt = q.dtype
    k, v = k.to(dt), v.to(dt)
    U1, Vt1, d1, U2, Vt2, d2 = (p.to(dt) if p is not None else None for p in params)
    base = W - 1 - row_start if lag else 0
    if spec.fused and not keep:  # QK^T, op1, the GLU and op2 fused per row block
        c1, c2 = (c.to(dt) if c is not None else None for c in (c1, c2))
        f = fused_middle(spec, q, k, c1, c2, (U1, Vt1, d1, U2, Vt2, d2), s, W, base)
        out = key_view(f["Ab"], W, base) @ v
        return out * f["inv"][..., None] if f["inv"] is not None else out
    region = invalid_cols(M, W, row_start, lag, q.device) if spec.mask else None

    # z_j = <q_t, k_{t-j}>, in lag order
    Z = lag_scores(q, k, base) if lag else mask_(q @ k.transpose(-1, -2), region)
    # op1: Z1 = Z (I + diag(d1) + U1 diag(c1) Vt1), then masked
    P = Pc = None
    if U1 is not None:
        P = Z @ U1[:, s:]  # (B,H1,M,r1)
        Pc = P * c1.to(dt)
        Z1 = low_rank_add_(Z * lag_scale(d1, spec.shortcut1, s), Pc, Vt1[:, :, s:])
        mask_(Z1, region, spec.mask1)
    else:
        Z1 = Z
    # a = softplus(Sc) relu(G) / ||G||  (the 1/||G|| is applied to the output), then op2 on a
    scale2 = lag_scale(d2, spec.shortcut2, s) if U2 is not None else 1.0
    n, inv, sp, rG, a, Ab = act_forward(Z1, h, glu, spec.norm, spec.eps, scale2, base, keep)
    Q = Qc = None
    if U2 is not None:
        Q = a @ U2[:, s:]  # (B,h,M,r2)
        Qc = Q * c2.to(dt)
        mask_(low_rank_add_(Ab[..., :W], Qc, Vt2[:, :, s:]), region, spec.mask2)
    A2 = Ab[..., :W]                                # op2's output, lag order
    A = key_view(Ab, W, base) if lag else A2        # the same map in key order, no copy
    if keep:
        return dict(Z=Z, P=P, Pc=Pc, Z1=Z1, n=n, inv=inv, sp=sp, rG=rG, a=a, Q=Q, Qc=Qc, A2=A2, A=A,
                    region=region, base=base, params=(U1, Vt1, d1, U2, Vt2, d2))
    out = A @ v  # (B,h,M,dv)
    return (out * inv).to(dt) if inv is not None else out


@no_autocast
def rows_backward(spec, q, k, v, c1, c2, row_start, params, gout):
    """Gradients of rows_forward's output for q, k, v, c1, c2 and (U1, Vt1, d1, U2, Vt2, d2) (full L rows),
    from gout (B,h,M,dv): the chunk's maps are recomputed, then each step of rows_forward is undone in reverse."""
    if spec.fused:
        return rows_backward_fused(spec, q, k, v, c1, c2, row_start, params, gout)
    f = rows_forward(spec, q, k, v, c1, c2, row_start, params, keep=True)
    B, H1, M, _ = q.shape
    W, h, glu, lag = k.shape[2], v.shape[1], spec.glu, spec.lag
    s = lag_start(params, W)
    dt = q.dtype
    k, v, gout = k.to(dt), v.to(dt), gout.to(dt)
    base, region = f["base"], f["region"]
    U1, Vt1, d1, U2, Vt2, d2 = f["params"]
    Z, Z1, a, inv = f["Z"], f["Z1"], f["a"], f["inv"]

    # out = (A v) inv: dv = A^T dy, dA = dy v^T with dy = gout inv
    gy = (gout * inv).to(dt) if inv is not None else gout
    if lag:  # dA is written straight into lag order; lags of keys < 0 were never read, so they get 0
        gA2 = lag_scores(gy, v, base)
    else:
        gA2 = mask_(gy @ v.transpose(-1, -2), region, U2 is not None and spec.mask2)
    gv = f["A"].transpose(-1, -2) @ gy
    # the norm: d inv/dn = -1/n^2 (n > eps) and sum(gout * A v) = rowdot(A, dA) / inv, so dn = -rowdot(A, dA) inv;
    # with dn/dG = G/n, dG gets coef * G, coef = -rowdot(A, dA) inv^2
    coef = None
    if inv is not None:
        dot = (f["A2"] * gA2).sum(-1, keepdim=True, dtype=inv.dtype)
        coef = torch.where(f["n"] > spec.eps, -dot * inv * inv, torch.zeros_like(dot)).to(dt)
    # op2: A2 = a (I + diag(d2)) + (a U2 * c2) Vt2
    gc2 = gU2 = gVt2 = gd2 = None
    if U2 is not None:
        ga = gA2 * lag_scale(d2, spec.shortcut2, s)
        gc2, gU2, gVt2, gd2 = mix_backward(gA2, a, f["Q"], f["Qc"], c2.to(dt), U2, Vt2, d2, s, ga)
    else:
        ga = gA2
    # the activation: a = softplus(Sc) relu(G), or relu(G)
    G = Z1[:, :h] if glu else Z1
    gG = torch.ops.aten.threshold_backward(ga, G, 0)  # ga [G > 0]
    if glu:
        Sc = Z1[:, h:]
        gZ1 = Z1.new_empty(Z1.shape)
        gG = torch.mul(gG, f["sp"], out=gZ1[:, :h])                          # ga [G > 0] softplus(Sc)
        torch.mul(ga * f["rG"], torch.sigmoid(Sc), out=gZ1[:, h:])          # ga relu(G) sigmoid(Sc)
    else:
        gZ1 = gG
    if coef is not None:
        gG.addcmul_(coef, G)
    # (op1's mask needs no backward step here: where it zeroed Z1, G = 0, so relu' and G itself zero dZ1)
    # op1: Z1 = Z (I + diag(d1)) + (Z U1 * c1) Vt1; dZ goes into a buffer whose key view is dS
    gc1 = gU1 = gVt1 = gd1 = None
    gZb = scaled(gZ1, lag_scale(d1, spec.shortcut1, s) if U1 is not None else 1.0, base)  # future keys get 0
    if U1 is not None:
        gc1, gU1, gVt1, gd1 = mix_backward(gZ1, Z, f["P"], f["Pc"], c1.to(dt), U1, Vt1, d1, s, gZb[..., :W])
    # z = q k^T: dq = dS k, dk = dS^T q
    gS = key_view(gZb, W, base) if lag else mask_(gZb, region)
    return gS @ k, gS.transpose(-1, -2) @ q, gv, gc1, gc2, gU1, gVt1, gd1, gU2, gVt2, gd2


def lag_scores(q, k, base):
    """q k^T in lag order, (B,H,M,W) (also dA = dy v^T): the GEMM writes a skewed view of a W + base wide buffer
    whose pad (lags of keys < 0, left of column base - m in row m) is zero. Returns the buffer's first W columns."""
    B, H, M, _ = q.shape
    W = k.shape[2]
    Sb = q.new_empty(B, H, M, W + base)
    Sb[..., :base].zero_()
    torch.matmul(q, k.transpose(-1, -2), out=key_view(Sb, W, base))
    return Sb[..., :W]


def fused_middle(spec, q, k, c1, c2, params, s, W, base, gA2=None):
    """hyperglu_cpu.middle for a chunk: its mixers cut to the chunk's W lags (fused_mixers), spec's flags."""
    mix1, mix2 = fused_mixers(spec, params, s, W)
    return hyperglu_cpu.middle(q, k, c1, c2, mix1, mix2, base, spec.glu, spec.norm, spec.eps, spec.mask1, spec.mask2,
                               gA2=gA2)


def fused_mixers(spec, params, s, W):
    """(U (H,W,r), Vt (H,r,W), scale (H,W)) of op1 and op2 cut to a chunk's W lags, for hyperglu_cpu.middle; None
    for a mixer that is off. The scale is the full-rank part I + diag(d) (lag_scale) as a vector per head."""
    U1, Vt1, d1, U2, Vt2, d2 = params
    out = []
    for U, Vt, d, shortcut in ((U1, Vt1, d1, spec.shortcut1), (U2, Vt2, d2, spec.shortcut2)):
        if U is None:
            out.append(None)
            continue
        scale = lag_scale(d.to(U.dtype) if d is not None else None, shortcut, s)
        scale = scale.reshape(U.shape[0], W) if torch.is_tensor(scale) else U.new_full((U.shape[0], W), scale)
        out.append((U.contiguous()[:, s:], Vt.contiguous()[:, :, s:], scale.contiguous()))  # no copies: params
    return out


@no_autocast
def rows_backward_fused(spec, q, k, v, c1, c2, row_start, params, gout):
    """rows_backward with hyperglu_cpu.middle: QK^T, the maps after it and their gradients down to dq and dk fused per
    row block; dA = dout v^T and dv = A^T dy here."""
    W = k.shape[2]
    s, base, dt = lag_start(params, W), W - 1 - row_start, q.dtype
    k, v, gout = k.to(dt), v.to(dt), gout.to(dt)
    params = tuple(p.to(dt) if p is not None else None for p in params)
    c1, c2 = (c.to(dt) if c is not None else None for c in (c1, c2))
    gA2 = lag_scores(gout, v, base)  # dout v^T in lag order; the kernel scales its rows by inv
    f = fused_middle(spec, q, k, c1, c2, params, s, W, base, gA2=gA2)
    gy = gout * f["inv"][..., None] if f["inv"] is not None else gout
    gv = key_view(f["Ab"], W, base).transpose(-1, -2) @ gy
    U1, Vt1, d1, U2, Vt2, d2 = params
    g1, g2 = f["mix1"] or (None,) * 3, f["mix2"] or (None,) * 3
    full = lambda p, g, dim: _full(p, g, dim, s) if p is not None else None
    return (f["gq"], f["gk"], gv, f["gc1"], f["gc2"], full(U1, g1[0], 1), full(Vt1, g1[1], 2),
            full(d1, g1[2], 1), full(U2, g2[0], 1), full(Vt2, g2[1], 2), full(d2, g2[2], 1))


def mix_backward(gY, X, P, Pc, ctrl, U, Vt, d, s, gX):
    """Gradients through a mixer, Y = X (I + diag(d)) + (P * ctrl) Vt with P = X U (lag rows s.. of U, Vt, d),
    given gY (B,H,M,W): adds dP U^T to gX, which the caller filled with gY (I + diag(d)), and returns
    (dctrl (B,H,M,r), dU, dVt, dd) with the parameters' full L rows."""
    gPc = gY @ Vt[:, :, s:].transpose(-1, -2)  # (B,H,M,r)
    gP = gPc * ctrl
    gd = _full(d, (gY * X).sum(2).sum(0), 1, s) if d is not None else None
    low_rank_add_(gX, gP, U[:, s:].transpose(-1, -2))
    return (gPc * P, _full(U, (X.transpose(-1, -2) @ gP).sum(0), 1, s),
            _full(Vt, (Pc.transpose(-1, -2) @ gY).sum(0), 2, s), gd)


def lag_start(params, W):
    """s = L - W: a width-W row uses the last W rows of the lag-indexed parameters (L rows; 0 without a mixer)."""
    U = params[0] if params[0] is not None else params[3]
    return U.shape[1] - W if U is not None else 0


def _full(p, g, dim, s):
    """The gradient of a lag-indexed parameter (L rows along dim) from that of its last L-s rows."""
    out = torch.zeros(p.shape, dtype=g.dtype, device=g.device)
    out.narrow(dim, s, g.shape[dim]).copy_(g)
    return out


def default_chunk(device):
    """Query rows per chunk when chunk_T is None: small chunks keep a chunk's maps in cache on a CPU; on a GPU
    every chunk costs a few hundred kernel launches, so fewer, larger chunks (docs/performance.md)."""
    return 128 if torch.device(device).type == "cpu" else 1024


def chunks(step, n_past, prune, q, k, v, c1, c2):
    """Yield (sl, row_start, the chunk's (q, k, v, c1, c2)) for each block of `step` query rows; with prune (the
    causal lag layout) a chunk keeps only the keys its rows can see, the first n_past + its last row + 1."""
    T, W_all = q.shape[2], k.shape[2]
    for i0 in range(0, T, step):
        sl = slice(i0, min(i0 + step, T))
        W = n_past + sl.stop if prune else W_all
        yield sl, n_past + i0, (q[:, :, sl], k[:, :, :W], v[:, :, :W], c1[:, :, sl] if c1 is not None else None,
                                c2[:, :, sl] if c2 is not None else None)


class RecomputeRows(torch.autograd.Function):
    """Score rows, chunk by chunk, without keeping them: forward saves only its inputs (O(T d)); backward
    recomputes each chunk's maps (rows_forward, keep=True) and differentiates them by hand (rows_backward).
    The T x T intermediates live only while one chunk is being differentiated. One op for all chunks, so the
    chunks' dk and dv accumulate into one buffer (with one op per chunk, autograd would zero-fill a full-size
    gradient for every chunk's slices and add them up)."""

    @staticmethod
    def forward(ctx, spec, n_past, step, prune, q, k, v, c1, c2, *params):
        ctx.spec, ctx.n_past, ctx.step, ctx.prune = spec, n_past, step, prune
        ctx.save_for_backward(q, k, v, c1, c2, *params)
        return torch.cat([rows_forward(spec, *args, row_start, params)
                          for _, row_start, args in chunks(step, n_past, prune, q, k, v, c1, c2)], dim=2)

    @staticmethod
    def backward(ctx, g):
        q, k, v, c1, c2, *params = ctx.saved_tensors
        gq, gk, gv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        gc = [torch.empty_like(c) if c is not None else None for c in (c1, c2)]
        gp = [None] * len(params)
        for sl, row_start, args in chunks(ctx.step, ctx.n_past, ctx.prune, q, k, v, c1, c2):
            dq, dk, dv, *dc_dp = rows_backward(ctx.spec, *args, row_start, params, g[:, :, sl])
            W = dk.shape[2]
            gq[:, :, sl] = dq
            gk[:, :, :W] += dk
            gv[:, :, :W] += dv
            for dst, d in zip(gc, dc_dp[:2]):
                if dst is not None:
                    dst[:, :, sl] = d
            gp = [a if b is None else b if a is None else a.add_(b) for a, b in zip(gp, dc_dp[2:])]
        return (None,) * 4 + (gq, gk, gv, *gc, *gp)

