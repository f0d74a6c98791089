"""
A GPT language model, nanoGPT style, with two swappable parts:

  attention (GPTConfig.attn)   "softmax"  : causal multi-head attention through SDPA (nanoGPT baseline)
                               "hyperglu" : HyperGLU   (Lu & Yang, "HyperMLP", arXiv 2602.12601)
                               "hypermlp" : HyperMLP   (the same module with ReLU instead of the GLU split)
  residual  (GPTConfig.residual) "plain"  : pre-norm residual, x = x + f(ln(x))
                               "hc"       : hyper-connections (Zhu et al., ICLR 2025)
                               "mhc"      : manifold-constrained hyper-connections (DeepSeek, arXiv 2512.24880)

Read top to bottom: small pieces (norms, conv, RoPE, MLP), softmax attention, HyperGLU, the three
residual connections, the Block and the GPT, then parameter accounting and budget matching.
Shapes: B batch, T sequence, C (= D) width, h heads, L block_size.
"""

import functools
import math
import warnings
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import kernels


def _choice(owner, name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{owner}.{name}={value!r} is not valid; expected one of {list(allowed)}")


def _up(t):
    """At least fp32 (bf16/fp16 go up, fp64 stays): for norms, clamps and inverses that fp16 cannot hold."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _positive(owner, name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}.{name}={value!r} is not valid; expected a positive int")


# -----------------------------------------------------------------------------
# small pieces

class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot turn the bias off)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class RMSNorm(nn.Module):
    def __init__(self, ndim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, 1e-6)


def make_norm(config):
    """The one dispatch point for GPTConfig.norm."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return LayerNorm(config.n_embd, bias=config.bias)


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time, no bias: y_t = sum_j w_j * x_{t-k+1+j}.

    forward takes the input already left-padded with its k-1 previous rows (conv_pad), so the two KV convs
    share one padded copy, and decoding continues a sequence exactly from the kept tail."""

    def __init__(self, channels, kernel_size):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)
        nn.init.normal_(self.conv.weight, std=0.02)

    def forward(self, xp):
        return ShiftConv.apply(xp, self.conv.weight[:, 0, :])  # (B, T+k-1, C) -> (B, T, C)


class ShiftConv(torch.autograd.Function):
    """y = sum_j xp[:, j:j+T] * w[:, j] for xp (B, T+k-1, C) and w (C, k): one multiply-add pass per tap (much
    faster than conv1d on CPU), with a hand-written backward. Autograd over the shifted slices zero-filled a
    full-size gradient for every tap and added them up; this is 1.7x faster forward + backward (B=4, T=1024,
    C=256, both KV convs: 20.7 -> 11.9 ms)."""

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


def conv_pad(x, state, k):
    """x (B, T, C) with the previous k-1 rows in front (zeros at the start of a sequence, else the cached
    `state`): returns the padded (B, T+k-1, C) input and its last k-1 rows, the next call's state."""
    if state is None:
        state = x.new_zeros(x.shape[0], k - 1, x.shape[2])
    xp = torch.cat([state, x], dim=1)
    return xp, xp[:, xp.shape[1] - (k - 1):]


def apply_rope(x, pos, base):
    """Rotary embedding, a true rotation of the channel pairs (i, i + d/2) by angle pos * base^(-2i/d).

    x: (B, H, T, d) with d even; pos: (T,) absolute positions. Computed in fp32, returned in x's dtype."""
    d = x.shape[-1]
    ft = torch.promote_types(x.dtype, torch.float32)
    inv_freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=ft) / d)  # (d/2,)
    ang = pos.to(ft)[:, None] * inv_freq[None, :]  # (T, d/2)
    cos, sin = ang.cos(), ang.sin()
    xf = _up(x)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class MLP(nn.Module):
    """GELU MLP (nanoGPT, 4C hidden) or SwiGLU (hidden 8C/3 rounded up to a multiple of 16)."""

    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.swiglu = config.mlp == "swiglu"
        hidden = -(-8 * C // 3 // 16) * 16 if self.swiglu else 4 * C
        self.c_fc = nn.Linear(C, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, C, bias=config.bias)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            a, g = h.chunk(2, dim=-1)
            h = F.silu(g) * a
        else:
            h = F.gelu(h)
        return self.c_proj(h)


# -----------------------------------------------------------------------------
# softmax attention (the baseline): S, S-p (RoPE), S-c (KV conv), S-pc

class CausalSelfAttention(nn.Module):
    """nanoGPT's attention (names c_attn, c_proj) plus the paper's softmax options: RoPE ("p", from
    GPTConfig.pos) and a depthwise causal conv in front of K and V ("c", GPTConfig.use_kv_conv),
    placed exactly as in HyperGLU: k = W_k conv1(x), v = W_v conv2(x)."""

    def __init__(self, config):
        super().__init__()
        C, h = config.n_embd, config.n_head
        self.n_head, self.dropout = h, config.dropout
        self.rope = config.pos == "rope"
        self.rope_base = config.rope_base
        self.c_attn = nn.Linear(C, 3 * C, bias=config.bias)
        self.c_proj = nn.Linear(C, C, bias=config.bias)
        self.use_conv = config.kv_conv()
        if self.use_conv:
            self.conv1 = CausalConv1d(C, config.conv_kernel_size)
            self.conv2 = CausalConv1d(C, config.conv_kernel_size)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        h = self.n_head
        if self.use_conv:
            xp, new_state = conv_pad(x, cache.get("conv") if cache is not None else None, self.conv1.conv.kernel_size[0])
            xk, xv = self.conv1(xp), self.conv2(xp)
            Wq, Wk, Wv = self.c_attn.weight.split(C)
            bq, bk, bv = self.c_attn.bias.split(C) if self.c_attn.bias is not None else (None,) * 3
            q, k, v = F.linear(x, Wq, bq), F.linear(xk, Wk, bk), F.linear(xv, Wv, bv)
        else:
            q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, h, C // h).transpose(1, 2) for t in (q, k, v))  # (B, h, T, hd)
        n_past = cache["k"].shape[2] if cache is not None and "k" in cache else 0
        if self.rope:
            pos = torch.arange(n_past, n_past + T, device=x.device)
            q, k = apply_rope(q, pos, self.rope_base), apply_rope(k, pos, self.rope_base)
        if cache is not None:
            if n_past:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
            if self.use_conv:
                cache["conv"] = new_state
        mask, causal = None, n_past == 0
        if n_past and T > 1:  # a chunk of new queries against a cache: query m sees keys <= n_past + m
            mask = torch.ones(T, n_past + T, dtype=torch.bool, device=x.device).tril(n_past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def flops_per_token(self, T):
        """Forward FLOPs of the score maps per token at context T (QK^T and AV), as nanoGPT counts them."""
        C = self.c_proj.out_features
        return 4 * T * C


# -----------------------------------------------------------------------------
# HyperGLU / HyperMLP  (Lu & Yang, arXiv 2602.12601; official code LJC-FVNR/HyperMLP)
#
# One head, query row t, lags j = 0..t (most recent first), paper notation:
#   z_j   = < q_t * g_qk(x_t), k_{t-j} >                              score row, k from conv1(x)
#   z    <- z (I + diag(d1) + U1 diag(c1(x_t)) Vt1)                   R1 "op1", before the nonlinearity
#   a     = softplus(z_scale) * relu(z_gate) / ||z_gate||             GLU; ReLU variant: relu(z) / ||z||
#   a    <- a (I + diag(d2) + U2 diag(c2(x_t)) Vt2)                   R2 "op2", after it
#   o_t   = W_o [ (sum_j a_j v_{t-j}) * g_vo(x_t) ]                   v from conv2(x)
# The sequence mixers act along the lag axis of one row, so the layer is causal by construction and
# its per-token output does not depend on how many older tokens follow (extension consistency).

@dataclass
class HyperGLUConfig:
    """Field names, defaults and checks follow the official HyperGLUConfig (LJC-FVNR/HyperMLP)."""
    n_embd: int
    n_head: int
    block_size: int
    bias: bool = False                 # bias on q/k/v/c_proj (gates and controls always have one)
    n_layer: int = 24                  # unused inside the layer; sets GPT's scaled c_proj init
    qk_rank: int = None                # total Q/K width; None -> n_embd // 4
    vo_rank: int = None                # total V/O width; None -> n_embd
    conv_kernel_size: int = 4
    use_kv_conv: bool = True           # depthwise causal conv in front of K and V
    use_rope: bool = False
    rope_base: float = 10000.0
    attn_kind: str = "glu"             # "glu" (HyperGLU) | "relu" (HyperMLP)
    attn_norm: str = "out_scale"       # "out_scale" | "l2" | "none" (l2 == out_scale exactly)
    gate_act: str = "sigmoid"          # "sigmoid" | "none", for both gates and both controls
    norm_eps: float = 1e-12
    use_qk_gate: bool = True           # dtqk: sigmoid gate on q
    use_vo_gate: bool = True           # dtvo: sigmoid gate on the readout
    impl_default: str = "chunked"      # "dense" | "chunked" | "recompute" (chunked, rows recomputed in backward)
    chunk_T: int = 1024                # query rows per chunk; None: default_chunk(device)
    use_op1: bool = True
    op1_rank: int = 16
    op1_per_head: bool = True
    op1_use_diag: bool = True
    op1_init_std: float = 0.02
    op1_shortcut: bool = True
    op1_do_masking: bool = True
    use_op2: bool = True
    op2_rank: int = 16
    op2_per_head: bool = True
    op2_use_diag: bool = True
    op2_init_std: float = 0.02
    op2_shortcut: bool = True
    op2_do_masking: bool = True
    do_masking: bool = True            # causal; False is only truly bidirectional with "identity"
    aligner_kind: str = "offset"       # "offset" (lag layout) | "identity" (left layout)
    aligner_impl_train: str = "padview"
    aligner_impl_eval: str = "padview"

    def __post_init__(self):
        o = "HyperGLUConfig"
        for name in ("n_embd", "n_head", "block_size", "conv_kernel_size", "op1_rank", "op2_rank"):
            _positive(o, name, getattr(self, name))
        if self.chunk_T is not None:
            _positive(o, "chunk_T", self.chunk_T)
        _choice(o, "attn_kind", self.attn_kind, ("glu", "relu"))
        _choice(o, "attn_norm", self.attn_norm, ("out_scale", "l2", "none"))
        _choice(o, "gate_act", self.gate_act, ("sigmoid", "none"))
        _choice(o, "impl_default", self.impl_default, ("dense", "chunked", "recompute"))
        _choice(o, "aligner_kind", self.aligner_kind, ("offset", "identity"))
        _choice(o, "aligner_impl_train", self.aligner_impl_train, ("padview",))
        _choice(o, "aligner_impl_eval", self.aligner_impl_eval, ("padview",))
        H1 = 2 * self.n_head if self.attn_kind == "glu" else self.n_head
        qk = self.qk_rank if self.qk_rank is not None else self.n_embd // 4
        vo = self.vo_rank if self.vo_rank is not None else self.n_embd
        if qk <= 0 or qk % H1:
            raise ValueError(f"{o}.qk_rank={qk} is not valid; expected a positive multiple of "
                             f"{H1} ({'2*n_head for glu' if self.attn_kind == 'glu' else 'n_head for relu'})")
        if vo <= 0 or vo % self.n_head:
            raise ValueError(f"{o}.vo_rank={vo} is not valid; expected a positive multiple of n_head={self.n_head}")
        if self.use_rope and (qk // H1) % 2:
            raise ValueError(f"{o}.use_rope=True needs an even per-head q/k dim; qk_rank={qk} gives {qk // H1}")
        for op in ("op1", "op2"):
            if getattr(self, f"use_{op}") and not getattr(self, f"{op}_per_head"):
                raise ValueError(f"{o}.{op}_per_head=False is not implemented (the official code fails at forward); "
                                 f"expected True")
        if not self.do_masking and self.aligner_kind == "offset":
            warnings.warn("HyperGLUConfig: do_masking=False with aligner_kind='offset' is not bidirectional "
                          "(the lag layout never reads future keys); use aligner_kind='identity'", RuntimeWarning)


def to_lag(S, row_start):
    """Key order -> lag layout (the official code's reverse-offset "padview").

    S: (..., M, W) scores of query rows r = row_start..row_start+M-1 against keys 0..W-1.
    Returns Y (..., M, W) with Y[m, c] = S[m, r + c - (W-1)]: column c holds lag W-1-c, so lag 0 (the
    token itself) is the last column; entries whose key index would be < 0 are 0 (read from the pad).
    Future keys (index > r) are never read. Needs row_start + M <= W."""
    M, W = S.shape[-2:]
    P = S.new_empty(*S.shape[:-1], 2 * W - 1)  # (..., M, 2W-1): W-1 zeros, then S
    P[..., : W - 1].zero_()
    P[..., W - 1:].copy_(S)
    st = P.stride()
    return P.as_strided(S.shape, (*st[:-2], st[-2] + 1, 1), P.storage_offset() + row_start)


def from_lag(Y, row_start):
    """Inverse of to_lag: A[m, i] = Y[m, i + W-1-r] for keys i <= r, 0 for i > r (read from the pad)."""
    M, W = Y.shape[-2:]
    P = Y.new_empty(*Y.shape[:-1], 2 * W - 1)  # (..., M, 2W-1): Y, then W-1 zeros
    P[..., :W].copy_(Y)
    P[..., W:].zero_()
    st = P.stride()
    return P.as_strided(Y.shape, (*st[:-2], st[-2] - 1, 1), P.storage_offset() + W - 1 - row_start)


def invalid_mask(M, W, row_start, lag, device):
    """(M, W) bool, True where query row r = row_start + m must NOT use column c.
    Lag layout: the key r + c - (W-1) does not exist (c + r < W-1). Key order: a future key (c > r)."""
    r = torch.arange(row_start, row_start + M, device=device)[:, None]
    c = torch.arange(W, device=device)[None, :]
    return (c + r < W - 1) if lag else (c > r)


class Skew(torch.autograd.Function):
    """to_lag / from_lag, materialised. The two maps are each other's adjoint (to_lag reads S[r, i] into
    column i + W-1-r, from_lag reads it back), so each one's backward is the other: no as_strided backward."""

    @staticmethod
    def forward(ctx, t, row_start, to):
        ctx.row_start, ctx.to = row_start, to
        return (to_lag if to else from_lag)(t, row_start).contiguous()

    @staticmethod
    def backward(ctx, g):
        return (from_lag if ctx.to else to_lag)(g.contiguous(), ctx.row_start), None, None


def lag_mix(X, ctrl, U, Vt, d, shortcut, invalid=None):
    """R = I + diag(d) + U diag(ctrl) Vt on the right of each row of X (B, H, M, W), then masked: the paper's
    DPLR mixer R = D + A S(x) B^T.
    U (H, L, r), Vt (H, r, L), d (H, L) or None: a row of width W uses their last W rows (lag L-1-p <-> row p)."""
    s = U.shape[1] - X.shape[-1]
    Y = ((X @ U[:, s:]) * ctrl) @ Vt[:, :, s:]  # (B,H,M,r) -> (B,H,M,W)
    if d is not None:  # out of place: under autocast Y is bf16 and d fp32, and the sum promotes to fp32
        Y = torch.addcmul(Y, X, d[:, None, s:] + 1.0 if shortcut else d[:, None, s:])
    elif shortcut:
        Y = Y + X
    if invalid is not None:
        Y = Y.masked_fill_(invalid, 0.0)  # low-rank mass must not leak into invalid lags
    return Y


class LagMix(nn.Module):
    """The parameters of one diagonal-plus-low-rank sequence mixer (paper: R = D + A S(x) B^T), for lag_mix.
    U (H, L, r) and Vt (H, r, L) ~ N(0, init_std), d (H, L) = 0, so R = I at init up to O(init_std^2)."""

    no_decay = ("d",)

    def __init__(self, heads, L, rank, init_std, use_diag):
        super().__init__()
        self.U = nn.Parameter(torch.randn(heads, L, rank) * init_std)
        self.Vt = nn.Parameter(torch.randn(heads, rank, L) * init_std)
        self.d = nn.Parameter(torch.zeros(heads, L)) if use_diag else None
        self.init_std = init_std

    def params(self):
        return self.U, self.Vt, self.d


# -----------------------------------------------------------------------------
# HyperGLU's training path: the same rows as HyperGLU._rows, with the backward written out by hand.
# Per chunk of M query rows it keeps nothing T x T: forward saves q, k, v, c1, c2 (O(T d)); backward recomputes
# the chunk's maps and differentiates them directly. Three things make it cheaper than autograd over _rows:
#  - no skew copies: QK^T is written by its GEMM straight into lag order (the output is a skewed view of a
#    buffer W + base wide, base = W-1-row_start), and A V reads the final map through the inverse view;
#  - the mixers are one elementwise pass (the diagonal) and one accumulating GEMM (the low rank) each;
#  - backward reuses the forward's small tensors and needs no T x T autograd graph.
# Maps are (B, H, M, W): H heads (H1 = 2h qk-heads for GLU), M rows, W keys/lags.

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
    def run(cfg, glu, q, *args, **kw):
        with torch.autocast(q.device.type, enabled=False):
            return fn(cfg, glu, q, *args, **kw)
    return run


@no_autocast
def rows_forward(cfg, glu, q, k, v, c1, c2, row_start, params, keep=False):
    """HyperGLU._rows without autograd: output rows row_start..row_start+M-1 (B,h,M,dv).
    keep=True returns the chunk's maps and small tensors for rows_backward instead of the output."""
    B, H1, M, _ = q.shape
    W, h, L = k.shape[2], cfg.n_head, cfg.block_size
    s = L - W  # lag-indexed parameters: a width-W row uses their last W rows
    lag = cfg.aligner_kind == "offset"
    dt = q.dtype
    k, v = k.to(dt), v.to(dt)
    U1, Vt1, d1, U2, Vt2, d2 = (p.to(dt) if p is not None else None for p in params)
    base = W - 1 - row_start if lag else 0
    if lag and not keep and kernels.usable(cfg, q):  # QK^T, op1, the GLU and op2 fused per row block (kernels.py)
        c1, c2 = (c.to(dt) if c is not None else None for c in (c1, c2))
        f = kernels.middle(cfg, glu, q, k, c1, c2, *fused_mixers(cfg, (U1, Vt1, d1, U2, Vt2, d2), s, W), base)
        out = key_view(f["Ab"], W, base) @ v
        return out * f["inv"][..., None] if f["inv"] is not None else out
    region = invalid_cols(M, W, row_start, lag, q.device) if cfg.do_masking else None

    # z_j = <q_t, k_{t-j}>, in lag order
    Z = lag_scores(q, k, base) if lag else mask_(q @ k.transpose(-1, -2), region)
    # op1: Z1 = Z (I + diag(d1) + U1 diag(c1) Vt1), then masked
    P = Pc = None
    if cfg.use_op1:
        P = Z @ U1[:, s:]  # (B,H1,M,r1)
        Pc = P * c1.to(dt)
        Z1 = low_rank_add_(Z * lag_scale(d1, cfg.op1_shortcut, s), Pc, Vt1[:, :, s:])
        mask_(Z1, region, cfg.op1_do_masking)
    else:
        Z1 = Z
    # a = softplus(Sc) relu(G) / ||G||  (the 1/||G|| is applied to the output), then op2 on a
    scale2 = lag_scale(d2, cfg.op2_shortcut, s) if cfg.use_op2 else 1.0
    n, inv, sp, rG, a, Ab = act_forward(Z1, h, glu, cfg.attn_norm != "none", cfg.norm_eps, scale2, base, keep)
    Q = Qc = None
    if cfg.use_op2:
        Q = a @ U2[:, s:]  # (B,h,M,r2)
        Qc = Q * c2.to(dt)
        mask_(low_rank_add_(Ab[..., :W], Qc, Vt2[:, :, s:]), region, cfg.op2_do_masking)
    A2 = Ab[..., :W]                                # op2's output, lag order
    A = key_view(Ab, W, base) if lag else A2        # the same map in key order, no copy
    if keep:
        return dict(Z=Z, P=P, Pc=Pc, Z1=Z1, n=n, inv=inv, sp=sp, rG=rG, a=a, Q=Q, Qc=Qc, A2=A2, A=A,
                    region=region, base=base, params=(U1, Vt1, d1, U2, Vt2, d2))
    out = A @ v  # (B,h,M,dv)
    return (out * inv).to(dt) if inv is not None else out


@no_autocast
def rows_backward(cfg, glu, q, k, v, c1, c2, row_start, params, gout):
    """Gradients of rows_forward's output for q, k, v, c1, c2 and (U1, Vt1, d1, U2, Vt2, d2) (full L rows),
    from gout (B,h,M,dv): the chunk's maps are recomputed, then each step of rows_forward is undone in reverse."""
    if cfg.aligner_kind == "offset" and kernels.usable(cfg, q):
        return rows_backward_fused(cfg, glu, q, k, v, c1, c2, row_start, params, gout)
    f = rows_forward(cfg, glu, q, k, v, c1, c2, row_start, params, keep=True)
    B, H1, M, _ = q.shape
    W, h, L = k.shape[2], cfg.n_head, cfg.block_size
    s = L - W
    lag = cfg.aligner_kind == "offset"
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
        gA2 = mask_(gy @ v.transpose(-1, -2), region, cfg.use_op2 and cfg.op2_do_masking)
    gv = f["A"].transpose(-1, -2) @ gy
    # the norm: d inv/dn = -1/n^2 (n > eps) and sum(gout * A v) = rowdot(A, dA) / inv, so dn = -rowdot(A, dA) inv;
    # with dn/dG = G/n, dG gets coef * G, coef = -rowdot(A, dA) inv^2
    coef = None
    if inv is not None:
        dot = (f["A2"] * gA2).sum(-1, keepdim=True, dtype=inv.dtype)
        coef = torch.where(f["n"] > cfg.norm_eps, -dot * inv * inv, torch.zeros_like(dot)).to(dt)
    # op2: A2 = a (I + diag(d2)) + (a U2 * c2) Vt2
    gc2 = gU2 = gVt2 = gd2 = None
    if cfg.use_op2:
        ga = gA2 * lag_scale(d2, cfg.op2_shortcut, s)
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
    gZb = scaled(gZ1, lag_scale(d1, cfg.op1_shortcut, s) if cfg.use_op1 else 1.0, base)  # future keys get 0
    if cfg.use_op1:
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


def fused_mixers(cfg, params, s, W):
    """(U (H,W,r), Vt (H,r,W), scale (H,W)) of op1 and op2 cut to a chunk's W lags, for kernels.middle; None
    for a mixer that is off. The scale is the full-rank part I + diag(d) (lag_scale) as a vector per head."""
    U1, Vt1, d1, U2, Vt2, d2 = params
    out = []
    for on, U, Vt, d, shortcut in ((cfg.use_op1, U1, Vt1, d1, cfg.op1_shortcut),
                                   (cfg.use_op2, U2, Vt2, d2, cfg.op2_shortcut)):
        if not on:
            out.append(None)
            continue
        scale = lag_scale(d.to(U.dtype) if d is not None else None, shortcut, s)
        scale = scale.reshape(U.shape[0], W) if torch.is_tensor(scale) else U.new_full((U.shape[0], W), scale)
        out.append((U.contiguous()[:, s:], Vt.contiguous()[:, :, s:], scale.contiguous()))  # no copies: params
    return out


@no_autocast
def rows_backward_fused(cfg, glu, q, k, v, c1, c2, row_start, params, gout):
    """rows_backward with kernels.middle: QK^T, the maps after it and their gradients down to dq and dk fused per
    row block; dA = dout v^T and dv = A^T dy here."""
    B, H1, M, _ = q.shape
    W, h, L = k.shape[2], cfg.n_head, cfg.block_size
    s, base, dt = L - W, W - 1 - row_start, q.dtype
    k, v, gout = k.to(dt), v.to(dt), gout.to(dt)
    params = tuple(p.to(dt) if p is not None else None for p in params)
    c1, c2 = (c.to(dt) if c is not None else None for c in (c1, c2))
    gA2 = lag_scores(gout, v, base)  # dout v^T in lag order; the kernel scales its rows by inv
    f = kernels.middle(cfg, glu, q, k, c1, c2, *fused_mixers(cfg, params, s, W), base, gA2=gA2)
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


def _full(p, g, dim, s):
    """The gradient of a lag-indexed parameter (L rows along dim) from that of its last L-s rows."""
    out = torch.zeros(p.shape, dtype=g.dtype, device=g.device)
    out.narrow(dim, s, g.shape[dim]).copy_(g)
    return out


def default_chunk(device):
    """Query rows per chunk when chunk_T is None. On CPU 128 beat 256 and 512 at T=1024 and 2048 (bench.py). On a
    GPU each chunk costs a few hundred kernel launches, which bound the layer: one 124M-scale layer (B=8, T=1024,
    width 768, bf16) took 30.4 ms at 128 rows and 9.0 ms at 1024 on an H200, while its kernels ran 7.2 ms."""
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
    chunks' dk and dv accumulate into one buffer (one op per chunk made autograd zero-fill a full-size gradient
    for every chunk's slices and add them up: T^2 / chunk_T of memory traffic)."""

    @staticmethod
    def forward(ctx, cfg, glu, n_past, step, prune, q, k, v, c1, c2, *params):
        ctx.cfg, ctx.glu, ctx.n_past, ctx.step, ctx.prune = cfg, glu, n_past, step, prune
        ctx.save_for_backward(q, k, v, c1, c2, *params)
        return torch.cat([rows_forward(cfg, glu, *args, row_start, params)
                          for _, row_start, args in chunks(step, n_past, prune, q, k, v, c1, c2)], dim=2)

    @staticmethod
    def backward(ctx, g):
        q, k, v, c1, c2, *params = ctx.saved_tensors
        gq, gk, gv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        gc = [torch.empty_like(c) if c is not None else None for c in (c1, c2)]
        gp = [None] * len(params)
        for sl, row_start, args in chunks(ctx.step, ctx.n_past, ctx.prune, q, k, v, c1, c2):
            dq, dk, dv, *dc_dp = rows_backward(ctx.cfg, ctx.glu, *args, row_start, params, g[:, :, sl])
            W = dk.shape[2]
            gq[:, :, sl] = dq
            gk[:, :, :W] += dk
            gv[:, :, :W] += dv
            for dst, d in zip(gc, dc_dp[:2]):
                if dst is not None:
                    dst[:, :, sl] = d
            gp = [a if b is None else b if a is None else a.add_(b) for a, b in zip(gp, dc_dp[2:])]
        return (None,) * 5 + (gq, gk, gv, *gc, *gp)


class HyperGLU(nn.Module):
    """HyperGLU / HyperMLP attention layer, a drop-in for the official module: same config, same
    state_dict keys and shapes, same forward(x, *, impl, chunk_T, attention_mask), (B, T, n_embd) in and out.

    impl: "dense" (all rows at once) and "chunked" (chunk_T query rows at a time, each with only the keys it
    can see) run the reference rows, _rows, under autograd; "recompute" (the GPT default) runs the training
    path above: chunked, O(T d) saved activations, maps recomputed in backward and differentiated by hand.
    All three agree exactly (float64 tests).
    `cache` (a dict, used by GPT.generate) makes forward continue a sequence: it keeps K (after conv1, W_k,
    RoPE; ungated), V and the conv tail, and computes only the new rows (exact: the lag layout is extension
    consistent)."""

    def __init__(self, config):
        super().__init__()
        cfg = self.config = config
        D, h, L = cfg.n_embd, cfg.n_head, cfg.block_size
        self.glu = cfg.attn_kind == "glu"
        self.H1 = 2 * h if self.glu else h  # qk heads: the GLU gate heads then the scale heads
        self.qk_rank = cfg.qk_rank if cfg.qk_rank is not None else D // 4
        self.vo_rank = cfg.vo_rank if cfg.vo_rank is not None else D
        self.q = nn.Linear(D, self.qk_rank, bias=cfg.bias)
        self.k = nn.Linear(D, self.qk_rank, bias=cfg.bias)
        self.v = nn.Linear(D, self.vo_rank, bias=cfg.bias)
        self.c_proj = nn.Linear(self.vo_rank, D, bias=cfg.bias)
        if cfg.use_kv_conv:
            self.conv1 = CausalConv1d(D, cfg.conv_kernel_size)
            self.conv2 = CausalConv1d(D, cfg.conv_kernel_size)
        if cfg.use_op1:
            self.op = nn.ModuleDict({"mix": LagMix(self.H1, L, cfg.op1_rank, cfg.op1_init_std, cfg.op1_use_diag)})
            self.control1 = nn.Linear(D, self.H1 * cfg.op1_rank, bias=True)
        if cfg.use_op2:
            self.op2 = nn.ModuleDict({"mix": LagMix(h, L, cfg.op2_rank, cfg.op2_init_std, cfg.op2_use_diag)})
            self.control2 = nn.Linear(D, h * cfg.op2_rank, bias=True)
        if cfg.use_qk_gate:
            self.left_gate = nn.Linear(D, self.qk_rank, bias=True)
        if cfg.use_vo_gate:
            self.right_gate = nn.Linear(D, self.vo_rank, bias=True)

    def reset_parameters(self):
        """Re-draw the mixers' U/Vt (after an outer init that touched them) and zero their diagonals."""
        with torch.no_grad():
            for name in ("op", "op2"):
                if hasattr(self, name):
                    mix = getattr(self, name)["mix"]
                    mix.U.normal_(0.0, mix.init_std)
                    mix.Vt.normal_(0.0, mix.init_std)
                    if mix.d is not None:
                        mix.d.zero_()

    def forward(self, x, *, impl=None, chunk_T=None, attention_mask=None, cache=None):
        cfg = self.config
        B, T, D = x.shape
        h, H1 = cfg.n_head, self.H1
        n_past = cache["k"].shape[2] if cache is not None and "k" in cache else 0
        if n_past + T > cfg.block_size:
            raise ValueError(f"sequence length {n_past + T} exceeds block_size={cfg.block_size}")
        act = torch.sigmoid if cfg.gate_act == "sigmoid" else (lambda t: t)
        heads = lambda t, n: t.view(B, T, n, -1).transpose(1, 2)  # (B, T, n*d) -> (B, n, T, d)

        # keys from conv1(x), values from conv2(x); queries, gates and controls from x itself
        xk = xv = x
        if cfg.use_kv_conv:
            xp, new_state = conv_pad(x, cache.get("conv") if cache is not None else None, cfg.conv_kernel_size)
            xk, xv = self.conv1(xp), self.conv2(xp)
        # contiguous per head: every chunk's k[:, :, :W] and v[:, :, :W] then fold (B, heads) into one GEMM batch;
        # as strided views of (B, T, heads, d), matmul copied each chunk's slice (T^2 / chunk_T copying in all)
        q, k, v = (heads(p, n).contiguous() for p, n in ((self.q(x), H1), (self.k(xk), H1), (self.v(xv), h)))
        if cfg.use_rope:
            pos = torch.arange(n_past, n_past + T, device=x.device)
            q, k = apply_rope(q, pos, cfg.rope_base), apply_rope(k, pos, cfg.rope_base)
        if cfg.use_qk_gate:
            q = q * heads(act(self.left_gate(x)), H1)
        if attention_mask is not None:  # padded keys contribute nothing (they still take a lag slot)
            m = attention_mask[:, None, :, None].to(k.dtype)
            k, v = k * m, v * m
        if cache is not None:
            if n_past:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
            if cfg.use_kv_conv:
                cache["conv"] = new_state
        c1 = heads(act(self.control1(x)), H1) if cfg.use_op1 else None  # (B, H1, T, r1)
        c2 = heads(act(self.control2(x)), h) if cfg.use_op2 else None   # (B, h, T, r2)

        # score rows, chunk by chunk over the new query rows
        impl = impl or cfg.impl_default
        _choice("HyperGLU.forward", "impl", impl, ("dense", "chunked", "recompute"))
        step = T if impl == "dense" else (chunk_T or cfg.chunk_T or default_chunk(x.device))
        prune = cfg.aligner_kind == "offset" and cfg.do_masking  # a row only needs keys up to itself
        params = self._mix_params()
        if impl == "recompute" and torch.is_grad_enabled():
            y = RecomputeRows.apply(cfg, self.glu, n_past, step, prune, q, k, v, c1, c2, *params)
        else:
            rows = self._rows if impl != "recompute" else functools.partial(rows_forward, cfg, self.glu)
            outs = [rows(*args, row_start, params)
                    for _, row_start, args in chunks(step, n_past, prune, q, k, v, c1, c2)]
            y = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # (B, h, T, dv)
        y = y.transpose(1, 2)  # (B, T, h, dv)
        if cfg.use_vo_gate:
            y = y * act(self.right_gate(x)).view(B, T, h, -1)
        return self.c_proj(y.reshape(B, T, self.vo_rank))

    def _mix_params(self):
        """(U1, Vt1, d1, U2, Vt2, d2), None where a mixer or its diagonal is off."""
        p1 = self.op["mix"].params() if self.config.use_op1 else (None,) * 3
        p2 = self.op2["mix"].params() if self.config.use_op2 else (None,) * 3
        return (*p1, *p2)

    def _rows(self, q, k, v, c1, c2, row_start, params):
        """The reference: output rows row_start..row_start+M-1 under plain autograd, step by step as the official
        module.
        rows_forward computes the same rows for the training path; params = (U1, Vt1, d1, U2, Vt2, d2).
        q (B,H1,M,dqk), k (B,H1,W,dqk), v (B,h,W,dv), c1 (B,H1,M,r1), c2 (B,h,M,r2) -> (B,h,M,dv)."""
        cfg = self.config
        M, W = q.shape[2], k.shape[2]
        lag = cfg.aligner_kind == "offset"
        U1, Vt1, d1, U2, Vt2, d2 = params
        S = q @ k.transpose(-1, -2)  # (B,H1,M,W) raw scores in key order
        invalid = invalid_mask(M, W, row_start, lag, q.device) if cfg.do_masking else None
        if lag:
            Z = Skew.apply(S, row_start, True)  # lag layout: column c holds lag W-1-c
        else:
            Z = S.masked_fill(invalid, 0.0) if invalid is not None else S
        if cfg.use_op1:
            Z = lag_mix(Z, c1, U1, Vt1, d1, cfg.op1_shortcut, invalid if cfg.op1_do_masking else None)
        h = cfg.n_head
        gate = Z[:, :h] if self.glu else Z  # GLU: qk-heads 0..h-1 gate, h..2h-1 scale (head j pairs j, h+j)
        inv = None
        if cfg.attn_norm == "l2":
            gate = F.normalize(_up(gate), dim=-1, eps=cfg.norm_eps).to(gate.dtype)
        elif cfg.attn_norm == "out_scale":  # fp32: eps=1e-12 and its inverse are not representable in fp16
            inv = 1.0 / _up(gate).norm(dim=-1, keepdim=True).clamp_min(cfg.norm_eps)  # (B,h,M,1)
        a = F.relu(gate)
        if self.glu:
            a = torch.logaddexp(Z[:, h:], Z.new_zeros(())) * a  # softplus, without F.softplus's x > 20 cut-off
        if cfg.use_op2:
            a = lag_mix(a, c2, U2, Vt2, d2, cfg.op2_shortcut, invalid if cfg.op2_do_masking else None)
        A = Skew.apply(a, row_start, False) if lag else a  # (B,h,M,W) back in key order
        out = A @ v
        if inv is not None:
            out = (_up(out) * inv).to(out.dtype)
        return out

    def flops_per_token(self, T):
        """Forward FLOPs of the score-map work per token at context T (1 MAC = 2 FLOPs; elementwise ignored):
        QK^T, op1 (X U and (.)Vt per qk-head), op2 (per head) and A V, over a full row of T."""
        cfg = self.config
        r1 = cfg.op1_rank if cfg.use_op1 else 0
        r2 = cfg.op2_rank if cfg.use_op2 else 0
        return T * (2 * self.qk_rank + 4 * self.H1 * r1 + 4 * cfg.n_head * r2 + 2 * self.vo_rank)


# -----------------------------------------------------------------------------
# residual connections: x_next = conn(x, f), f the pre-norm sublayer (B,T,C) -> (B,T,C)
# plain works on (B,T,C); hc and mhc on n streams (B,T,n,C), expanded once after the embedding and
# summed once before ln_f. Site k = 2*layer + (0 attention, 1 MLP).

def add_outer(res, w, y):
    """res (B,T,n,C) + w (B,T,n) outer y (B,T,C) (w (n,) for static HC), added into res in place (callers pass
    the fresh mixed streams): one batched GEMM with K=1, so no (B,T,n,C) temporary and no copy of res (the
    out-of-place baddbmm copied it first: 13.5 ms of a 6 x 384 HC step). torch.compile gets the functional form."""
    B, T, n, C = res.shape
    if torch.compiler.is_compiling():
        w = w.expand(B, T, n).reshape(B * T, n, 1)
        return torch.baddbmm(res.reshape(B * T, n, C), w, y.reshape(B * T, 1, C)).view(B, T, n, C)
    return AddOuter.apply(res, w, y)


class AddOuter(torch.autograd.Function):
    """add_outer in place: d res = g, d w = g . y per stream, d y = sum_i w_i g_i (two batched matmuls)."""

    @staticmethod
    def forward(ctx, res, w, y):
        B, T, n, C = res.shape
        ctx.mark_dirty(res)
        ctx.save_for_backward(w, y)
        w3 = w.expand(B, T, n).reshape(B * T, n, 1)  # static HC: one B for every token
        res.view(B * T, n, C).baddbmm_(w3, y.reshape(B * T, 1, C))
        return res

    @staticmethod
    def backward(ctx, g):
        w, y = ctx.saved_tensors
        B, T, n, C = g.shape
        gs = g.reshape(B * T, n, C)
        with torch.autocast(g.device.type, enabled=False):  # as StreamPre: fp32 math inside autocast too
            gw = torch.bmm(gs, y.reshape(B * T, C, 1)).view(B, T, n)
            gy = torch.bmm(w.expand(B, T, n).reshape(B * T, 1, n).contiguous(), gs).view(B, T, C)
        return g, gw if w.dim() == 3 else gw.sum((0, 1)), gy


def stream_mix(x, w_in, w_res):
    """x (B,T,n,C) -> u = sum_j w_in[j] x_j (B,T,C) and res_i = sum_j w_res[i,j] x_j (B,T,n,C), weights per token
    or shared. The weights are made contiguous (HC's are strided slices of its alpha, or broadcast when static):
    CPU bmm runs a per-token loop on strided small operands."""
    B, T, n, C = x.shape
    u = torch.matmul(w_in.expand(B, T, n).reshape(B, T, 1, n).contiguous(), x).view(B, T, C)
    res = torch.matmul(w_res.expand(B, T, n, n).contiguous(), x)  # not a view: add_outer adds into it in place
    return u, res


def norm_proj(x, W, norm=None, eps=1e-6):
    """norm(x) @ W for x (..., D), W (D, K), with the norm applied after the matmul [mHC Eqs. 14-16]:
    LayerNorm(x) @ W = r (x @ gW - mu colsum(gW)) + b @ W with gW = diag(g) W, the row mean mu and
    r = 1/sqrt(var + eps); RMSNorm drops mu and b; norm=None is a weightless RMS norm (mHC's phi holds it).
    Neither the normalised (..., D) tensor nor its gradient is ever written: one GEMM against x, one row-norm,
    and the (..., K) result, instead of a norm pass, a GEMM and their backward passes."""
    return NormProj.apply(x, W, *norm_args(norm, eps))


def norm_args(norm, eps=1e-6):
    """(g, b, rms, eps) of a LayerNorm / RMSNorm module, or of a weightless RMS norm (norm=None)."""
    if norm is None:
        return None, None, True, eps
    if isinstance(norm, RMSNorm):
        return norm.weight, None, True, 1e-6
    return norm.weight, norm.bias, False, 1e-5


def np_forward(x, W, g, b, rms, eps):
    """norm_proj's forward: (out (..., K), saved) with saved = (x, W, g, b, gW, y, mu, r) for np_backward."""
    D, K = W.shape
    xf = x.reshape(-1, D)
    gW = W if g is None else g[:, None] * W                    # (D, K)
    if rms:
        z, mu = xf @ gW, None
    else:  # the row mean rides along as one more GEMM column
        zm = xf @ torch.cat([gW, gW.new_full((D, 1), 1.0 / D)], 1)
        z, mu = zm[:, :K], zm[:, K:]
    ms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(D)  # (N,1) mean of squares
    var = ms if rms else (ms - mu * mu).clamp_min_(0)
    r = torch.rsqrt(var + eps)
    y = r * (z if rms else z - mu * gW.sum(0))                  # (N,K) = norm(x) @ W without the bias
    out = y if b is None else y + b @ W
    return out.view(*x.shape[:-1], K), (x, W, g, b, gW, y, mu, r)


def np_backward(saved, go, need_W=True, need_g=True, need_b=True):
    """norm_proj's exact backward, as GEMMs against x (N rows of D). With y = r (z - mu colsum(gW)),
    z = x @ gW, and go the gradient of the output (N, K):
      dx  = (r go) @ gW^T - r m_1 + r^2 m_2 (mu - x), m_1 = mean(go @ gW^T) = go . colsum(gW) / D,
            m_2 = mean(xhat * (go @ gW^T)) = (go . y) / D      (the LayerNorm backward, never forming xhat)
      dgW = x^T (r go) - 1 (r mu go).sum(0),   dW = diag(g) dgW + b (go.sum(0))^T,
      dg = (dgW * W).sum(1),   db = W @ go.sum(0).
    Returns dx (x's shape, a fresh tensor callers may accumulate into), dW, dg, db (None where not needed)."""
    x, W, g, b, gW, y, mu, r = saved
    D, K = W.shape
    xf, go = x.reshape(-1, D), go.reshape(-1, K)
    rgo = r * go                                               # (N,K)
    m2 = (go * y).sum(-1, keepdim=True) / D                    # (N,1)
    if mu is None:
        dx = torch.mm(rgo, gW.T.contiguous())  # a contiguous (K, D) right factor: MKL runs it 1.6x faster
    else:  # fold the row constant -r m1 + r^2 m2 mu into the GEMM as one more column
        m1 = go @ gW.sum(0, keepdim=True).T / D
        dx = torch.mm(torch.cat([rgo, r * (r * m2 * mu - m1)], 1), torch.cat([gW.T, gW.new_ones(1, D)]))
    dx.addcmul_(r * r * m2, xf, value=-1.0)                    # - r^2 m2 x
    need_g = need_g and g is not None
    # (go^T x)^T: MKL runs this orientation 5x faster than x^T go for N >> D, K
    dgW = (rgo.T @ xf).T if need_W or need_g else None
    if dgW is not None and mu is not None:
        dgW -= (r * mu * go).sum(0)
    dW = dg = db = None
    gsum = go.sum(0)                                           # (K,)
    if need_W:
        dW = dgW if g is None else g[:, None] * dgW
        if b is not None:
            dW = dW + torch.outer(b, gsum)
    if need_g:
        dg = (dgW * W).sum(1)
    if need_b and b is not None:
        db = W @ gsum
    return dx.view(x.shape), dW, dg, db


class NormProj(torch.autograd.Function):
    """norm_proj as an autograd op: np_forward, and np_backward for its gradients."""

    @staticmethod
    def forward(ctx, x, W, g, b, rms, eps):
        out, saved = np_forward(x, W, g, b, rms, eps)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, go):
        need = ctx.needs_input_grad
        with torch.autocast(go.device.type, enabled=False):  # a backward run inside autocast keeps fp32 math
            return *np_backward(ctx.saved_tensors, go, need[1], need[2], need[3]), None, None


def fused_streams():
    """Use StreamPre: when a backward will follow (it exists for the backward's passes) and not under
    torch.compile (whose fusion works on the plain ops)."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


class StreamPre(torch.autograd.Function):
    """HC / mHC before the sublayer as one op: x (B,T,n,C) -> the sublayer input u = sum_j w_in[j] x_j (B,T,C),
    the mixed streams res_i = sum_j w_res[i,j] x_j (B,T,n,C) and the post weights (B,T,n), where
    (w_in, w_res, post) = mix(norm_proj(x), *params) and mix is the module's small coefficient map (tanh,
    sigmoid, Sinkhorn on (B,T,n,K) numbers; autograd differentiates it inside backward). Backward writes dx
    once and accumulates the stream-mixing paths into it in place; autograd over the same ops writes three
    (B,T,n,C) gradients and adds them (measured: HC step 1.30x -> 1.26x of plain, bench.py model section).
    flat: normalise each token's n*C streams as one row (mHC) instead of each stream (HC)."""

    @staticmethod
    def forward(ctx, mix, x, W, g, b, rms, eps, flat, *params):
        B, T, n, C = x.shape
        h, saved = np_forward(x.reshape(B, T, n * C) if flat else x, W, g, b, rms, eps)
        with torch.enable_grad():  # a graph over the small numbers only, replayed by backward
            h_ = h.detach().requires_grad_()
            ps = [p.detach().requires_grad_() for p in params]
            outs = mix(h_, *ps)  # w_in (B,T,n), w_res (B,T,n,n), post (B,T,n)
        w_in, w_res = outs[0].detach(), outs[1].detach()
        ctx.graph = (h_, ps, outs)
        ctx.save_for_backward(w_in, w_res, *saved)
        return *stream_mix(x, w_in, w_res), outs[2].detach()

    @staticmethod
    def backward(ctx, du, dres, dpost):
        with torch.autocast(du.device.type, enabled=False):  # as NormProj: fp32 math inside autocast too
            w_in, w_res, *saved = ctx.saved_tensors
            B, T, n, C = dres.shape
            N = B * T
            # per token, contiguous: CPU bmm runs a per-token loop on strided small operands (HC's are slices)
            w_in, w_res = w_in.reshape(N, 1, n).contiguous(), w_res.reshape(N, n, n).contiguous()
            xs, du, dres = saved[0].reshape(N, n, C), du.reshape(N, 1, C), dres.reshape(N, n, C)
            h_, ps, outs = ctx.graph
            dw = (torch.bmm(du, xs.transpose(1, 2)).view(outs[0].shape),    # du . x_j
                  torch.bmm(dres, xs.transpose(1, 2)).view(outs[1].shape),  # dres_i . x_j
                  dpost)
            dh, *dps = torch.autograd.grad(outs, [h_, *ps], dw, allow_unused=True)
            dx, dW, dg, db = np_backward(saved, dh, *ctx.needs_input_grad[2:5])
            dx = dx.view(N, n, C).baddbmm_(w_res.transpose(1, 2).contiguous(), dres).baddbmm_(w_in.transpose(1, 2), du)
            return (None, dx.view(B, T, n, C), dW, dg, db, None, None, None, *dps)


class Plain(nn.Module):
    """Pre-norm residual: x + f(x), bit-identical to nanoGPT's x = x + attn(ln_1(x))."""

    def forward(self, x, f):
        return x + f(x)


class HyperConnection(nn.Module):
    """Hyper-connections [HC Eq. 2]: H' = B^T f(H^T A_m) + A_r^T H, with the static matrix [A_m | A_r] and B,
    plus, when dynamic, s * tanh(norm(H) W) corrections [HC Eqs. 8-13]. Init [e_{k mod n} | I], B = 1 and
    W = 0 make the network equal the pre-norm network [HC §2.3]. Coefficients and mixing run in fp32."""

    no_decay = ("static_alpha", "static_beta", "s_alpha", "s_beta")

    def __init__(self, config, site):
        super().__init__()
        n, C = config.hc_streams, config.n_embd
        alpha = torch.zeros(n, n + 1)
        alpha[site % n, 0] = 1.0
        alpha[:, 1:] = torch.eye(n)
        self.static_alpha = nn.Parameter(alpha)          # [A_m | A_r]  (n, n+1)
        self.static_beta = nn.Parameter(torch.ones(n))   # B            (n,)
        self.dynamic, self.tanh = config.hc_dynamic, config.hc_tanh
        if self.dynamic:
            self.norm = make_norm(config)
            self.W_alpha = nn.Parameter(torch.zeros(C, n + 1))
            self.W_beta = nn.Parameter(torch.zeros(C, 1))
            self.s_alpha = nn.Parameter(torch.tensor(0.01))
            self.s_beta = nn.Parameter(torch.tensor(0.01))

    def mix_params(self):
        return self.static_alpha, self.static_beta, self.s_alpha, self.s_beta

    def mix(self, d, static_alpha, static_beta, s_alpha, s_beta):
        """d = norm(H) [W_a | W_b] (B,T,n,n+2) -> A_m (B,T,n), A_r^T (B,T,n,n), B (B,T,n) [HC Eqs. 8-13]:
        alpha = [A_m | A_r] + s_alpha tanh(d_alpha), beta = B + s_beta tanh(d_beta)."""
        if self.tanh:
            d = torch.tanh(d)
        alpha, beta = static_alpha + s_alpha * d[..., :-1], static_beta + s_beta * d[..., -1]
        return alpha[..., 0], alpha[..., 1:].transpose(-1, -2), beta

    def coefficients(self, x):
        """x (B,T,n,C) fp32 -> (w_in, w_res, post): the input weights A_m, the mixing A_r^T (row i builds stream
        i) and B; per token (B,T,n), (B,T,n,n), (B,T,n) when dynamic, else shared (n,), (n,n), (n,)."""
        if not self.dynamic:
            return self.static_alpha[:, 0], self.static_alpha[:, 1:].T, self.static_beta
        W = torch.cat([self.W_alpha, self.W_beta], 1)  # one matmul for both
        return self.mix(norm_proj(x, W, self.norm), *self.mix_params())

    def mean_coefficients(self, x):
        """Token-averaged (pre (n,), post (n,), res (n,n)) in mHC's orientation: res = A_r^T, row i builds stream i."""
        w_in, w_res, post = self.coefficients(_up(x))
        lead = x.shape[:-2]
        return (w_in.expand(*lead, -1).flatten(0, -2).mean(0), post.expand(*lead, -1).flatten(0, -2).mean(0),
                w_res.expand(*lead, -1, -1).flatten(0, -3).mean(0))

    def forward(self, x, f):
        with torch.autocast(x.device.type, enabled=False):
            xf = _up(x)
            if self.dynamic and fused_streams():
                W = torch.cat([self.W_alpha, self.W_beta], 1)
                u, res, beta = StreamPre.apply(self.mix, xf, W, *norm_args(self.norm), False, *self.mix_params())
            else:  # static HC, no-grad and torch.compile: the same math through plain ops
                w_in, w_res, beta = self.coefficients(xf)
                u, res = stream_mix(xf, w_in, w_res)  # A_m^T H (B,T,C), the sublayer input; A_r^T H (B,T,n,C)
        y = f(u.to(x.dtype))
        with torch.autocast(x.device.type, enabled=False):
            return add_outer(res, beta, _up(y)).to(x.dtype)  # A_r^T H + B^T f(.)


def sinkhorn(logits, iters=20):
    """Sinkhorn-Knopp [mHC Eq. 9] on (..., n, n) logits: exp(logits - max), then `iters` rounds of column then
    row normalisation. Rows end exact (forward gain 1), columns approximate. Run it in fp32."""
    return Sinkhorn.apply(logits, iters)


class Sinkhorn(torch.autograd.Function):
    """Sinkhorn-Knopp with an exact hand-written backward through every iteration, like the paper's kernel
    [mHC §4.3.1]: forward keeps only exp(logits), and backward recomputes the iterates and their normalisers and
    walks back through the normalisations: for Y = X / s, s = X.sum(dim), dX = (dY - sum(dY * Y, dim)) / s.
    It works on (n, n, N) with the N tokens last, so every sum over n is a vectorised add of token rows: 3.5x
    faster on CPU than reducing (N, n, n) over its tiny inner dims, where the ~240 small ops per call cost more
    than their arithmetic."""

    @staticmethod
    def iterates(M, iters):
        """M (n, n, N) -> the 2 iters + 1 iterates (M first) and the 2 iters normalisers (columns, then rows)."""
        steps, sums = [M], []
        for _ in range(iters):
            for dim in (0, 1):
                sums.append(M.sum(dim=dim, keepdim=True))
                M = M / sums[-1]
                steps.append(M)
        return steps, sums

    @staticmethod
    def forward(ctx, logits, iters):
        n = logits.shape[-1]
        L = logits.reshape(-1, n, n).permute(1, 2, 0).contiguous()  # (n, n, N)
        M = torch.exp(L - L.amax(dim=(0, 1), keepdim=True))
        ctx.save_for_backward(M)
        ctx.shape, ctx.iters = logits.shape, iters
        M = Sinkhorn.iterates(M, iters)[0][-1]
        return M.permute(2, 0, 1).contiguous().view(logits.shape)  # contiguous for bmm: see stream_mix

    @staticmethod
    def backward(ctx, g):
        steps, sums = Sinkhorn.iterates(ctx.saved_tensors[0], ctx.iters)
        n = ctx.shape[-1]
        g = g.reshape(-1, n, n).permute(1, 2, 0).contiguous()
        for i in range(len(sums), 0, -1):
            dim = 0 if i % 2 else 1
            g = (g - (g * steps[i]).sum(dim=dim, keepdim=True)) / sums[i - 1]
        return (g * steps[0]).permute(2, 0, 1).contiguous().view(ctx.shape), None  # exp; the max shift cancels


class ManifoldHC(nn.Module):
    """mHC [mHC Eq. 3]: x' = H_res x + H_post^T f(H_pre x), coefficients from the RMS-normalised flattened
    streams [Eqs. 7-9], the norm applied after the matmul [Eqs. 14-16]: H_pre = sigmoid, H_post = 2 sigmoid,
    H_res = Sinkhorn. Gates alpha = 0.01, phi = 0, b_post = 0, b_pre favouring stream k mod n and
    b_res = c_r (2I - 1) make it equal the pre-norm network at init."""

    no_decay = ("alpha_pre", "alpha_post", "alpha_res", "b_pre", "b_post", "b_res")

    def __init__(self, config, site):
        super().__init__()
        n, C = config.hc_streams, config.n_embd
        self.n, self.iters = n, config.mhc_iters
        self.phi = nn.Parameter(torch.zeros(n * C, n * n + 2 * n))
        self.alpha_pre = nn.Parameter(torch.tensor(0.01))
        self.alpha_post = nn.Parameter(torch.tensor(0.01))
        self.alpha_res = nn.Parameter(torch.tensor(0.01))
        b_pre = torch.full((n,), -config.mhc_pre_init)
        b_pre[site % n] = config.mhc_pre_init
        self.b_pre = nn.Parameter(b_pre)
        self.b_post = nn.Parameter(torch.zeros(n))
        self.b_res = nn.Parameter(config.mhc_res_init * (2 * torch.eye(n) - 1))

    def mix_params(self):
        return self.alpha_pre, self.alpha_post, self.alpha_res, self.b_pre, self.b_post, self.b_res

    def mix(self, h, alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res):
        """h = RMSnorm(flat streams) phi (B,T,n^2+2n) -> H_pre (B,T,n), H_res (B,T,n,n), H_post (B,T,n) [Eqs. 7-9]."""
        n = self.n
        pre = torch.sigmoid(alpha_pre * h[..., :n] + b_pre)
        post = 2 * torch.sigmoid(alpha_post * h[..., n:2 * n] + b_post)
        res = sinkhorn(alpha_res * h[..., 2 * n:].unflatten(-1, (n, n)) + b_res, self.iters)
        return pre, res, post

    def coefficients(self, x):
        """x (B,T,n,C) fp32 -> H_pre (B,T,n), H_res (B,T,n,n), H_post (B,T,n)."""
        h = norm_proj(x.flatten(-2), self.phi)  # RMS norm of the flattened streams, applied after phi
        return self.mix(h, *self.mix_params())

    def mean_coefficients(self, x):
        """Token-averaged (pre (n,), post (n,), res (n,n))."""
        pre, res, post = (t.flatten(0, 1).mean(0) for t in self.coefficients(_up(x)))
        return pre, post, res

    def forward(self, x, f):
        with torch.autocast(x.device.type, enabled=False):
            xf = _up(x)
            if fused_streams():
                u, mixed, post = StreamPre.apply(self.mix, xf, self.phi, *norm_args(None), True, *self.mix_params())
            else:  # no-grad and torch.compile: the same math through plain ops
                pre, res, post = self.coefficients(xf)
                u, mixed = stream_mix(xf, pre, res)
        y = f(u.to(x.dtype))  # f(H_pre x)
        with torch.autocast(x.device.type, enabled=False):
            return add_outer(mixed, post, _up(y)).to(x.dtype)  # H_res x + H_post^T f(.)


def make_residual(config, site):
    """The one dispatch point for GPTConfig.residual."""
    if config.residual == "hc":
        return HyperConnection(config, site)
    if config.residual == "mhc":
        return ManifoldHC(config, site)
    return Plain()


# -----------------------------------------------------------------------------
# the GPT

HYPERGLU_FIELDS = [f.name for f in fields(HyperGLUConfig)
                   if f.name not in ("n_embd", "n_head", "block_size", "bias", "n_layer", "use_rope", "attn_kind")]


@dataclass
class GPTConfig:
    vocab_size: int = 50304            # GPT-2's 50257 padded up to a multiple of 64
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True                  # bias in Linears and LayerNorms (nanoGPT)
    attn: str = "softmax"              # "softmax" | "hyperglu" | "hypermlp"
    residual: str = "plain"            # "plain" | "hc" | "mhc"
    hc_streams: int = 4                # n, residual streams for hc/mhc
    hc_dynamic: bool = True            # hc: dynamic (DHC) or static (SHC)
    hc_tanh: bool = True               # hc: tanh on the dynamic part
    mhc_iters: int = 20                # mhc: Sinkhorn-Knopp iterations
    mhc_pre_init: float = 3.0          # mhc: b_pre = +c on the home stream, -c elsewhere
    mhc_res_init: float = 2.0          # mhc: b_res = c (2I - 1)
    pos: str = "learned"               # "learned" (wpe) | "rope" (in attention) | "none"
    mlp: str = "gelu"                  # "gelu" | "swiglu"
    norm: str = "layernorm"            # "layernorm" | "rmsnorm"
    # HyperGLU / HyperMLP fields, as in HyperGLUConfig (use_kv_conv and conv_kernel_size also serve softmax)
    qk_rank: int = None                # None -> n_embd // 4
    vo_rank: int = None                # None -> n_embd
    conv_kernel_size: int = 4
    use_kv_conv: bool = None           # None -> on for hyperglu/hypermlp, off for softmax (see kv_conv())
    rope_base: float = 10000.0
    attn_norm: str = "out_scale"
    gate_act: str = "sigmoid"
    norm_eps: float = 1e-12
    use_qk_gate: bool = True
    use_vo_gate: bool = True
    impl_default: str = "recompute"    # training keeps O(T d) activations; see HyperGLUConfig for the others
    chunk_T: int = None                # query rows per chunk; None: default_chunk(device), 128 on CPU, 1024 on GPU
    use_op1: bool = True
    op1_rank: int = 16
    op1_per_head: bool = True
    op1_use_diag: bool = True
    op1_init_std: float = 0.02
    op1_shortcut: bool = True
    op1_do_masking: bool = True
    use_op2: bool = True
    op2_rank: int = 16
    op2_per_head: bool = True
    op2_use_diag: bool = True
    op2_init_std: float = 0.02
    op2_shortcut: bool = True
    op2_do_masking: bool = True
    do_masking: bool = True
    aligner_kind: str = "offset"
    aligner_impl_train: str = "padview"
    aligner_impl_eval: str = "padview"

    def __post_init__(self):
        o = "GPTConfig"
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "hc_streams", "mhc_iters"):
            _positive(o, name, getattr(self, name))
        _choice(o, "attn", self.attn, ("softmax", "hyperglu", "hypermlp"))
        _choice(o, "residual", self.residual, ("plain", "hc", "mhc"))
        _choice(o, "pos", self.pos, ("learned", "rope", "none"))
        _choice(o, "mlp", self.mlp, ("gelu", "swiglu"))
        _choice(o, "norm", self.norm, ("layernorm", "rmsnorm"))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{o}.dropout={self.dropout!r} is not valid; expected 0 <= dropout < 1")
        if self.attn == "softmax":
            if self.n_embd % self.n_head:
                raise ValueError(f"{o}.n_embd={self.n_embd} is not valid for softmax; expected a multiple of n_head={self.n_head}")
            if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
                raise ValueError(f"{o}.pos='rope' needs an even head dim; n_embd/n_head = {self.n_embd // self.n_head}")
            _positive(o, "conv_kernel_size", self.conv_kernel_size)
        else:
            self.hyperglu_config()  # validates the HyperGLU fields

    def hyperglu_config(self):
        return HyperGLUConfig(n_embd=self.n_embd, n_head=self.n_head, block_size=self.block_size, bias=self.bias,
                              n_layer=self.n_layer, use_rope=self.pos == "rope",
                              attn_kind="glu" if self.attn == "hyperglu" else "relu",
                              **dict({k: getattr(self, k) for k in HYPERGLU_FIELDS}, use_kv_conv=self.kv_conv()))

    def kv_conv(self):
        """use_kv_conv with None resolved: on for HyperGLU/HyperMLP, off for softmax (kept None in the config,
        so replace(cfg, attn=...) re-resolves it)."""
        return self.attn != "softmax" if self.use_kv_conv is None else self.use_kv_conv


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config) if config.attn == "softmax" else HyperGLU(config.hyperglu_config())
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)
        self.res_attn = make_residual(config, 2 * layer)
        self.res_mlp = make_residual(config, 2 * layer + 1)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, cache=None):
        x = self.res_attn(x, lambda u: self.drop(self.attn(self.ln_1(u), cache=cache)))
        x = self.res_mlp(x, lambda u: self.drop(self.mlp(self.ln_2(u))))
        return x


class KVCache:
    """Decoding state for GPT.generate: one dict per layer (keys, values, conv tail) and the token count."""

    def __init__(self, n_layer):
        self.layers = [{} for _ in range(n_layer)]
        self.n = 0


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if config.pos == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.grad_ckpt = False  # recompute each block in backward instead of keeping its activations
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # scaled init of the residual projections (GPT-2)
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @classmethod
    def from_checkpoint(cls, state):
        """The model saved in a train.py checkpoint dict (its model_args and weights; a stray torch.compile
        '_orig_mod.' prefix is stripped)."""
        model = cls(GPTConfig(**state["model_args"]))
        model.load_weights(state["model"])
        return model

    def load_weights(self, state_dict):
        self.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state_dict.items()})

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; by default without the position embedding (the token one is tied to lm_head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, cache=None):
        B, T = idx.shape
        t0 = cache.n if cache is not None else 0
        if t0 + T > self.config.block_size:
            raise ValueError(f"sequence length {t0 + T} exceeds block_size={self.config.block_size}")
        x = self.transformer.wte(idx)  # (B,T,C)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(t0, t0 + T, device=idx.device))
        x = self.transformer.drop(x)
        streams = self.config.residual != "plain"
        if streams:  # n copies of the embedding [HC Alg. 1]
            x = x.unsqueeze(2).expand(B, T, self.config.hc_streams, x.shape[-1]).contiguous()
        for i, block in enumerate(self.transformer.h):
            if self.grad_ckpt and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache.layers[i] if cache is not None else None)
        if streams:
            if x.requires_grad:  # the sum's gradient is one tensor broadcast over the streams (stride 0); densify
                x.register_hook(torch.Tensor.contiguous)  # it, or CPU bmm falls back to a per-token loop
            x = x.sum(2)  # summed before the final norm
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.n += T
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # inference: only the last position
            loss = None
        return logits, loss

    def crop_block_size(self, block_size):
        """Model surgery to a smaller block size. HyperGLU's mixers are indexed by lag with row L-1 = lag 0,
        so they keep their *last* block_size rows (the newest lags)."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"crop_block_size: block_size={block_size} is not valid; expected 1..{self.config.block_size}")
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        for block in self.transformer.h:
            if isinstance(block.attn, HyperGLU):
                block.attn.config.block_size = block_size
                for mix in (m for m in block.attn.modules() if isinstance(m, LagMix)):
                    mix.U = nn.Parameter(mix.U[:, -block_size:])
                    mix.Vt = nn.Parameter(mix.Vt[:, :, -block_size:])
                    if mix.d is not None:
                        mix.d = nn.Parameter(mix.d[:, -block_size:])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with two groups. No decay: biases, norm weights, HC/mHC static parameters and gate scalars,
        the op1/op2 diagonals (each module lists these in `no_decay`) and anything below 2-D.
        Decay: 2-D weights, embeddings, the HyperGLU U/Vt factors and convs, the dynamic HC/mHC projections."""
        skip = set()
        for m in self.modules():
            for name in getattr(m, "no_decay", ()):
                p = getattr(m, name)
                if p is not None:
                    skip.add(id(p))
        params = {id(p): (n, p) for n, p in self.named_parameters() if p.requires_grad}
        decay = [p for i, (n, p) in params.items() if p.dim() >= 2 and i not in skip]
        no_decay = [p for i, (n, p) in params.items() if p.dim() < 2 or i in skip]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        print(f"num decayed parameter tensors: {len(decay)}, with {sum(p.numel() for p in decay):,} parameters")
        print(f"num non-decayed parameter tensors: {len(no_decay)}, with {sum(p.numel() for p in no_decay):,} parameters")
        fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self, T=None):
        """Training FLOPs per token (forward + backward = 3x forward) at context T (default block_size):
        6 N for every parameter used once per token, plus 3x each attention's score-map FLOPs, plus the
        HC/mHC stream mixing. HyperGLU's U/Vt/d are not per-token weights; their work is in the score maps."""
        cfg = self.config
        T = T or cfg.block_size
        per_token = [p for n, p in self.named_parameters() if ".mix." not in n and not n.endswith("wpe.weight")]
        N = sum(p.numel() for p in per_token)
        flops = 6 * N + 3 * sum(b.attn.flops_per_token(T) for b in self.transformer.h)
        n, C = cfg.hc_streams, cfg.n_embd
        if cfg.residual == "hc":
            flops += 3 * 2 * cfg.n_layer * (2 * n * (n + 1) * C + 2 * n * C)
        elif cfg.residual == "mhc":
            flops += 3 * 2 * cfg.n_layer * (2 * n * C + 2 * n * n * C + 2 * n * C)
        return flops

    def estimate_mfu(self, fwdbwd_per_iter, dt, device=None):
        """Model FLOPs utilisation against the GPU's bf16 dense peak; None (print "n/a") on CPU, MPS or an
        unknown GPU, never a guessed number."""
        peak = peak_flops(device)
        if peak is None or dt <= 0:
            return None
        T = self.config.block_size
        return self.flops_per_token(T) * T * fwdbwd_per_iter / dt / peak

    @torch.no_grad()
    def connection_matrices(self, idx):
        """HC/mHC coefficients at every residual site (attention, MLP, attention, ...) for a batch idx (B, T),
        averaged over its tokens: a list of (pre (n,), post (n,), res (n,n)). Empty for the plain residual."""
        sites = [m for b in self.transformer.h for m in (b.res_attn, b.res_mlp) if hasattr(m, "mean_coefficients")]
        out = []
        hooks = [m.register_forward_pre_hook(lambda m, args: out.append(m.mean_coefficients(args[0]))) for m in sites]
        try:
            self(idx)
        finally:
            for h in hooks:
                h.remove()
        return out

    def can_cache(self):
        """KV-cache decoding is exact for softmax and for causal lag-layout HyperGLU. The identity layout
        is not extension consistent (a token's output depends on the sequence length), so it recomputes."""
        cfg = self.config
        return cfg.attn == "softmax" or (cfg.aligner_kind == "offset" and cfg.do_masking)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, vocab_limit=None):
        """Sample max_new_tokens after idx (B, T). temperature=0 is greedy. vocab_limit masks padded ids.

        With the cache, the prompt is prefilled once and each step feeds one token; its logits equal the
        full forward's. Past block_size the window slides over the newest block_size tokens, as nanoGPT's
        crop does: every position shifts, so each of those steps recomputes the window (exact, not cached)."""
        L = self.config.block_size
        cache = KVCache(self.config.n_layer) if use_cache and self.can_cache() else None
        for _ in range(max_new_tokens):
            if cache is None:
                logits, _ = self(idx[:, -L:])
            elif 0 < cache.n < L:
                logits, _ = self(idx[:, -1:], cache=cache)
            else:  # first call, or the window is full: (re)fill the cache from the newest L tokens
                cache = KVCache(self.config.n_layer)
                logits, _ = self(idx[:, -L:], cache=cache)
            logits = logits[:, -1, :].float()
            if vocab_limit is not None:
                logits[:, vocab_limit:] = -float("inf")
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def amax_gain(res_list):
    """Composite gain of the residual mixing across sites [mHC §3.1]: C_k = H_res_k ... H_res_1; returns, per
    depth k, the forward gain (max absolute row sum of C_k) and the backward gain (max absolute column sum)."""
    C, fwd, bwd = None, [], []
    for H in res_list:
        C = H.double() if C is None else H.double() @ C
        fwd.append(C.abs().sum(-1).max().item())
        bwd.append(C.abs().sum(-2).max().item())
    return fwd, bwd


# bf16 dense tensor-core peak FLOPs by GPU name (substring match, most specific first)
PEAK_FLOPS = [
    ("H200", 989e12), ("GH200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),
    ("H20", 148e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
    ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("A6000", 155e12),
    ("4090", 165e12), ("3090", 71e12), ("V100", 125e12), ("T4", 65e12),
]


def peak_flops(device=None):
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_FLOPS if key in name), None)


# -----------------------------------------------------------------------------
# parameter accounting and budget matching

def param_report(config):
    """Parameters per component of a GPTConfig, counted on a model built on the meta device (exact, no memory).
    Keys: embedding (wte, tied to lm_head), position (wpe), attention, mlp, norm, residual (HC/mHC),
    non_embedding (all but wte and wpe) and total."""
    with torch.device("meta"):
        model = GPT(config)
    rep = dict(embedding=0, position=0, attention=0, mlp=0, norm=0, residual=0)
    for n, p in model.named_parameters():
        key = ("embedding" if "wte" in n else "position" if "wpe" in n else "attention" if ".attn." in n
               else "mlp" if ".mlp." in n else "residual" if ".res_" in n else "norm")
        rep[key] += p.numel()
    rep["non_embedding"] = rep["attention"] + rep["mlp"] + rep["norm"] + rep["residual"]
    rep["total"] = rep["non_embedding"] + rep["embedding"] + rep["position"]
    return rep


def match_budget(base, tol=0.02, min_head_dim=8, **changes):
    """Return replace(base, **changes) with qk_rank (then op1/op2 ranks, halved together) shrunk so that its
    non-embedding parameter count is within `tol` of base's (so the total is too), as the paper matches
    budgets ("q" = QK compression). The embeddings are left out because at a 50k vocabulary they would
    make any attention look matched. qk_rank keeps at least min_head_dim per qk-head; below that the op
    ranks are halved instead. Example: match_budget(GPTConfig(n_layer=6, n_embd=256), attn="hyperglu", n_head=2)."""
    target = param_report(base)["non_embedding"]
    cfg = replace(base, **changes)
    if cfg.attn == "softmax":
        return cfg
    H1 = 2 * cfg.n_head if cfg.attn == "hyperglu" else cfg.n_head
    unit = 2 * H1 if cfg.pos == "rope" else H1  # qk_rank must split into H1 heads (of even dim with RoPE)
    lo = -(-min_head_dim * H1 // unit)          # smallest qk_rank allowed, in units
    r1, r2 = cfg.op1_rank, cfg.op2_rank
    best = None
    while True:
        count = lambda qk: param_report(replace(cfg, qk_rank=qk, op1_rank=r1, op2_rank=r2))["non_embedding"]
        t1 = count(unit * lo)
        slope = count(unit * (lo + 1)) - t1  # the count is linear in qk_rank
        k = max(lo, lo + round((target - t1) / slope))
        for qk in (unit * k, unit * max(lo, k - 1), unit * (k + 1)):
            err = abs(count(qk) - target) / target
            if best is None or err < best[0]:
                best = (err, replace(cfg, qk_rank=qk, op1_rank=r1, op2_rank=r2))
        if best[0] <= tol or (r1 == 1 and r2 == 1):
            break
        r1, r2 = max(1, r1 // 2), max(1, r2 // 2)
    if best[0] > tol:
        raise ValueError(f"match_budget: no qk_rank/op ranks bring {cfg.attn} within {tol:.0%} of {target:,} "
                         f"non-embedding parameters (closest is {best[0]:.1%} off); lower block_size, "
                         f"min_head_dim or the number of heads")
    return best[1]
