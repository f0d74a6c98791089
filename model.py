"""
A GPT language model, nanoGPT style, with two swappable parts:

  attention (GPTConfig.attn)     "softmax"  : causal multi-head attention through SDPA (nanoGPT baseline)
                                 "hyperglu" : HyperGLU   (Lu & Yang, "HyperMLP", arXiv 2602.12601)
                                 "hypermlp" : HyperMLP   (the same module with ReLU instead of the GLU split)
  residual  (GPTConfig.residual) "plain"    : pre-norm residual, x = x + f(ln(x))
                                 "hc"       : hyper-connections (Zhu et al., ICLR 2025)
                                 "mhc"      : manifold-constrained hyper-connections (DeepSeek, arXiv 2512.24880)

Every equation of the papers is here in plain torch, top to bottom: small pieces, softmax attention, HyperGLU,
the residual connections, the GPT. GPTConfig.impl="fast" (default) swaps in the fast forms of ops/ (ops.dispatch
picks them), each tested against its reference here (tests/ops/); impl="reference" runs this file alone.
Shapes: B batch, T sequence, C (= D) width, h heads, L block_size.
"""

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import ops.conv
import ops.dispatch
import ops.hyperglu
import ops.streams
from optim import MuonAdamW


def _choice(owner, name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{owner}.{name}={value!r} is not valid; expected one of {list(allowed)}")


def _positive(owner, *names):
    for name in names:
        value = getattr(owner, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(owner).__name__}.{name}={value!r} is not valid; expected a positive int")


def _up(t):
    """At least fp32 (bf16/fp16 go up, fp64 stays): for norms, clamps and inverses that fp16 cannot hold."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# -----------------------------------------------------------------------------
# small pieces

def make_norm(config):
    """The one dispatch point for GPTConfig.norm: LayerNorm (with GPTConfig.bias, as nanoGPT) or RMSNorm."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-6)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time, no bias: y_t = sum_j w_j x_{t-k+1+j}. forward takes the input already
    left-padded with its k-1 previous rows (conv_pad): the two KV convs share one padded copy."""

    def __init__(self, config):
        super().__init__()
        C, self.config = config.n_embd, config
        self.conv = nn.Conv1d(C, C, config.conv_kernel_size, groups=C, bias=False)
        nn.init.normal_(self.conv.weight, std=0.02)

    def forward(self, xp):  # (B, T+k-1, C) -> (B, T, C)
        w = self.conv.weight  # (C, 1, k)
        if ops.dispatch.conv(self.config.impl) == "shift":  # shifted multiply-adds, a hand-written backward
            return ops.conv.shift_conv(xp, w[:, 0, :])
        return F.conv1d(xp.transpose(1, 2), w, groups=w.shape[0]).transpose(1, 2)


def conv_pad(x, cache, k):
    """x (B, T, C) with the previous k-1 rows in front (zeros at the start of a sequence, else the decoding
    cache's conv tail): returns the padded (B, T+k-1, C) input and its last k-1 rows, the next call's tail."""
    state = cache.get("conv") if cache is not None else None
    if state is None:
        state = x.new_zeros(x.shape[0], k - 1, x.shape[2])
    xp = torch.cat([state, x], dim=1)
    return xp, xp[:, xp.shape[1] - (k - 1):]


def extend(cache, k, v, conv_tail):
    """Decoding: all keys and values (B, H, n_past+T, d) so far, kept in the layer's cache dict with the conv tail."""
    if cache is None:
        return k, v
    if "k" in cache:
        k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
    cache.update(k=k, v=v, conv=conv_tail)
    return k, v


def apply_rope(x, pos, base):
    """Rotary embedding, a true rotation of the channel pairs (i, i + d/2) by angle pos * base^(-2i/d).
    x: (B, H, T, d) with d even; pos: (T,) absolute positions. Computed in fp32, returned in x's dtype."""
    d = x.shape[-1]
    ft = torch.promote_types(x.dtype, torch.float32)
    inv_freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=ft) / d)  # (d/2,)
    ang = pos.to(ft)[:, None] * inv_freq[None, :]  # (T, d/2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x.to(ft).chunk(2, dim=-1)
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
            return self.c_proj(F.silu(g) * a)
        return self.c_proj(F.gelu(h))


# -----------------------------------------------------------------------------
# softmax attention (the baseline): S, S-p (RoPE), S-c (KV conv), S-pc

class CausalSelfAttention(nn.Module):
    """nanoGPT's attention (names c_attn, c_proj) plus the paper's softmax options, placed as in HyperGLU: RoPE
    ("p", GPTConfig.pos), a depthwise causal conv in front of K and V ("c": k = W_k conv1(x), v = W_v conv2(x)),
    the sigmoid gates on q and on the readout ("g": use_qk_gate, use_vo_gate) and Q/K or V/O widths below
    n_embd ("q": qk_rank, "v": vo_rank). With none of them it is nanoGPT's layer, parameter for parameter."""

    def __init__(self, config):
        super().__init__()
        C, h = config.n_embd, config.n_head
        self.n_head, self.dropout = h, config.dropout
        self.rope_base = config.rope_base if config.pos == "rope" else None
        qk, vo = config.widths()
        self.widths = (qk, qk, vo)  # q, k, v (summed over heads)
        self.c_attn = nn.Linear(C, sum(self.widths), bias=config.bias)
        self.c_proj = nn.Linear(self.widths[2], C, bias=config.bias)
        self.act = torch.sigmoid if config.gate_act == "sigmoid" else (lambda t: t)
        self.use_conv, self.qk_gate, self.vo_gate = map(config.auto, ("use_kv_conv", "use_qk_gate", "use_vo_gate"))
        if self.use_conv:
            self.conv1 = CausalConv1d(config)
            self.conv2 = CausalConv1d(config)
        if self.qk_gate:
            self.left_gate = nn.Linear(C, self.widths[0], bias=True)
        if self.vo_gate:
            self.right_gate = nn.Linear(C, self.widths[2], bias=True)

    cacheable = True  # the KV cache gives the full forward's outputs

    def crop_block_size(self, block_size):  # nothing here depends on block_size
        pass

    def flops_per_token(self, T):
        """Forward FLOPs per token at context T: 2 per weight, and QK^T and AV over T keys (nanoGPT's count)."""
        qk, _, vo = self.widths
        return 2 * sum(p.numel() for p in self.parameters()) + 2 * T * (qk + vo)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        h = self.n_head
        tail = None
        if self.use_conv:
            xp, tail = conv_pad(x, cache, self.conv1.conv.kernel_size[0])
            xk, xv = self.conv1(xp), self.conv2(xp)
            bias = self.c_attn.bias.split(self.widths) if self.c_attn.bias is not None else (None,) * 3
            q, k, v = (F.linear(t, W, b) for t, W, b in zip((x, xk, xv), self.c_attn.weight.split(self.widths), bias))
        else:
            q, k, v = self.c_attn(x).split(self.widths, dim=2)
        if self.qk_gate:
            q = q * self.act(self.left_gate(x))
        q, k, v = (t.view(B, T, h, -1).transpose(1, 2) for t in (q, k, v))  # (B, h, T, head dim)
        n_past = cache["k"].shape[2] if cache is not None and "k" in cache else 0
        if self.rope_base:
            pos = torch.arange(n_past, n_past + T, device=x.device)
            q, k = apply_rope(q, pos, self.rope_base), apply_rope(k, pos, self.rope_base)
        k, v = extend(cache, k, v, tail)
        mask, causal = None, n_past == 0
        if n_past and T > 1:  # a chunk of new queries against a cache: query m sees keys <= n_past + m
            mask = torch.ones(T, n_past + T, dtype=torch.bool, device=x.device).tril(n_past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, vo width)
        if self.vo_gate:
            y = y * self.act(self.right_gate(x))
        return self.c_proj(y)


# -----------------------------------------------------------------------------
# HyperGLU / HyperMLP  (Lu & Yang, arXiv 2602.12601; official code LJC-FVNR/HyperMLP)
#
# A head is a two-layer MLP whose weights the context makes, h_t = x_t W1(X), o_t = s(h_t) W2(X) [slides p.15];
# HyperMLP mixes both along the history in lag order [p.19-20]: W1 = L1(x_t) X_{t:1}^T R1(x_t), W2 = R2(x_t)^T X_{t:1}
# L2(x_t)^T, R = D + A S(x_t) B^T. One head, row t, lags j = 0..t, numbered [G1]-[G5] here (not the paper's numbers):
#   [G1] z_j = < q_t * g_qk(x_t), k_{t-j} >                        score row, k from conv1(x)
#   [G2] z  <- z (I + diag(d1) + U1 diag(c1(x_t)) Vt1)              R1 "op1", before the nonlinearity
#   [G3] a   = softplus(z_scale) * relu(z_gate) / ||z_gate||        GLU; HyperMLP: relu(z) / ||z||
#   [G4] a  <- a (I + diag(d2) + U2 diag(c2(x_t)) Vt2)              R2 "op2", after it
#   [G5] o_t = W_o [ (sum_j a_j v_{t-j}) * g_vo(x_t) ]              v from conv2(x)
# The mixers act along the lag axis of one row, so the layer is causal by construction and a token's output does
# not depend on how many older tokens follow (extension consistency) [slides p.21].


def to_lag(S, row_start):
    """Key order -> lag layout (the official code's reverse-offset "padview"). S (..., M, W): scores of query rows
    r = row_start..row_start+M-1 against keys 0..W-1. Returns Y (..., M, W), Y[m, c] = S[m, r + c - (W-1)]:
    column c holds lag W-1-c, so lag 0 (the token itself) is the last column; keys < 0 read 0 from the pad.
    Future keys (index > r) are never read. Needs row_start + M <= W."""
    M, W = S.shape[-2:]
    P = F.pad(S, (W - 1, 0))  # (..., M, 2W-1): W-1 zeros, then S; row m starts one column further right
    return P.as_strided(S.shape, (*P.stride()[:-2], P.stride(-2) + 1, 1), row_start)


def from_lag(Y, row_start):
    """Inverse of to_lag: A[m, i] = Y[m, i + W-1-r] for keys i <= r, 0 for i > r (read from the pad)."""
    M, W = Y.shape[-2:]
    P = F.pad(Y, (0, W - 1))  # (..., M, 2W-1): Y, then W-1 zeros; row m starts one column further left
    return P.as_strided(Y.shape, (*P.stride()[:-2], P.stride(-2) - 1, 1), W - 1 - row_start)


def lag_mix(X, ctrl, U, Vt, d, shortcut, invalid=None):
    """R = I + diag(d) + U diag(ctrl) Vt on the right of each row of X (B, H, M, W), then masked [G2, G4]: the paper's
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


class HyperGLU(nn.Module):
    """HyperGLU / HyperMLP attention (GPTConfig.attn "hyperglu" / "hypermlp"); HyperGLU(HyperGLUConfig(...)) is a
    drop-in for the official module: its state_dict keys and shapes, forward(x, *, impl, chunk_T, attention_mask).
    forward's impl: None runs GPTConfig.impl's form (ops.dispatch: "fast" is ops.hyperglu.attend, the same rows with
    O(T d) saved activations); "dense" and "chunked" run the reference rows, _rows, all at once or chunk_T query rows
    at a time. `cache` (GPT.generate) keeps K (ungated), V and the conv tail and computes only the new rows."""

    def __init__(self, config):
        super().__init__()
        cfg = self.config = config
        D, h, L = cfg.n_embd, cfg.n_head, cfg.block_size
        self.glu = cfg.attn == "hyperglu"
        self.H1 = cfg.qk_heads()  # GLU: the gate heads, then the scale heads
        self.qk_rank, self.vo_rank = cfg.widths()
        self.use_conv, self.qk_gate, self.vo_gate = map(cfg.auto, ("use_kv_conv", "use_qk_gate", "use_vo_gate"))
        # the KV cache gives the full forward's outputs in the causal lag layout (extension consistent); the identity
        # layout is not (a token's output depends on the sequence length), so generate recomputes it
        self.cacheable = cfg.aligner_kind == "offset" and cfg.do_masking
        self.q = nn.Linear(D, self.qk_rank, bias=cfg.bias)
        self.k = nn.Linear(D, self.qk_rank, bias=cfg.bias)
        self.v = nn.Linear(D, self.vo_rank, bias=cfg.bias)
        self.c_proj = nn.Linear(self.vo_rank, D, bias=cfg.bias)
        if self.use_conv:
            self.conv1 = CausalConv1d(cfg)
            self.conv2 = CausalConv1d(cfg)
        if cfg.use_op1:
            self.op = nn.ModuleDict({"mix": LagMix(self.H1, L, cfg.op1_rank, cfg.op1_init_std, cfg.op1_use_diag)})
            self.control1 = nn.Linear(D, self.H1 * cfg.op1_rank, bias=True)
        if cfg.use_op2:
            self.op2 = nn.ModuleDict({"mix": LagMix(h, L, cfg.op2_rank, cfg.op2_init_std, cfg.op2_use_diag)})
            self.control2 = nn.Linear(D, h * cfg.op2_rank, bias=True)
        if self.qk_gate:
            self.left_gate = nn.Linear(D, self.qk_rank, bias=True)
        if self.vo_gate:
            self.right_gate = nn.Linear(D, self.vo_rank, bias=True)

    def forward(self, x, *, impl=None, chunk_T=None, attention_mask=None, cache=None):
        cfg = self.config
        B, T, D = x.shape
        h, H1 = cfg.n_head, self.H1
        n_past = cache["k"].shape[2] if cache is not None and "k" in cache else 0
        if n_past + T > cfg.block_size:
            raise ValueError(f"sequence length {n_past + T} exceeds block_size={cfg.block_size}")
        _choice("HyperGLU.forward", "impl", impl, (None, "dense", "chunked"))
        act = torch.sigmoid if cfg.gate_act == "sigmoid" else (lambda t: t)
        heads = lambda t, n: t.view(B, T, n, -1).transpose(1, 2)  # (B, T, n*d) -> (B, n, T, d)

        # keys from conv1(x), values from conv2(x); queries, gates and controls from x itself
        xk, xv, tail = x, x, None
        if self.use_conv:
            xp, tail = conv_pad(x, cache, cfg.conv_kernel_size)
            xk, xv = self.conv1(xp), self.conv2(xp)
        q, k, v = heads(self.q(x), H1), heads(self.k(xk), H1), heads(self.v(xv), h)
        if cfg.pos == "rope":
            pos = torch.arange(n_past, n_past + T, device=x.device)
            q, k = apply_rope(q, pos, cfg.rope_base), apply_rope(k, pos, cfg.rope_base)
        if self.qk_gate:
            q = q * heads(act(self.left_gate(x)), H1)  # [G1] q_t * g_qk(x_t)
        if attention_mask is not None:  # padded keys contribute nothing (they still take a lag slot)
            m = attention_mask[:, None, :, None].to(k.dtype)
            k, v = k * m, v * m
        k, v = extend(cache, k, v, tail)
        c1 = heads(act(self.control1(x)), H1) if cfg.use_op1 else None  # (B, H1, T, r1)
        c2 = heads(act(self.control2(x)), h) if cfg.use_op2 else None   # (B, h, T, r2)
        m1, m2 = (self.op["mix"] if cfg.use_op1 else None), (self.op2["mix"] if cfg.use_op2 else None)
        mix1 = (m1.U, m1.Vt, m1.d, cfg.op1_shortcut) if m1 else None  # what lag_mix and ops.hyperglu take
        mix2 = (m2.U, m2.Vt, m2.d, cfg.op2_shortcut) if m2 else None

        # score rows, chunk by chunk over the new query rows
        step = T if impl == "dense" else (chunk_T or cfg.chunk_T or ops.hyperglu.default_chunk(x.device))
        lag, masks = cfg.aligner_kind == "offset", (cfg.do_masking, cfg.op1_do_masking, cfg.op2_do_masking)
        form = ops.dispatch.hyperglu(cfg.impl, q, mix1, mix2, lag, masks) if impl is None else "reference"
        if form != "reference":
            y = ops.hyperglu.attend(q, k, v, c1, c2, mix1, mix2, n_past, glu=self.glu, norm=cfg.attn_norm != "none",
                                    eps=cfg.norm_eps, lag=lag, masks=masks, chunk=step, form=form)
        else:
            prune = lag and cfg.do_masking  # a row only needs the keys up to itself
            y = torch.cat([self._rows(*args, row_start, mix1, mix2)
                           for _, row_start, args in ops.hyperglu.chunks(step, n_past, prune, q, k, v, c1, c2)], 2)
        y = y.transpose(1, 2)  # (B, T, h, dv)
        if self.vo_gate:
            y = y * act(self.right_gate(x)).view(B, T, h, -1)  # [G5] * g_vo(x_t)
        return self.c_proj(y.reshape(B, T, self.vo_rank))

    def crop_block_size(self, block_size):
        """The mixers are indexed by lag, row L-1 = lag 0: they keep their *last* block_size rows (the newest lags)."""
        for mix in (m for m in self.modules() if isinstance(m, LagMix)):
            mix.U = nn.Parameter(mix.U[:, -block_size:])
            mix.Vt = nn.Parameter(mix.Vt[:, :, -block_size:])
            if mix.d is not None:
                mix.d = nn.Parameter(mix.d[:, -block_size:])

    def flops_per_token(self, T):
        """Forward FLOPs per token at context T: 2 per weight used once per token (not the per-lag U, Vt, d), and the
        score maps over T keys: QK^T, op1 per qk-head and op2 per head (rank-r products both ways), AV."""
        per_lag = {id(p) for m in self.modules() if isinstance(m, LagMix) for p in m.parameters()}
        N = sum(p.numel() for p in self.parameters() if id(p) not in per_lag)
        r1, r2 = self.config.op1_rank * self.config.use_op1, self.config.op2_rank * self.config.use_op2
        return 2 * N + T * (2 * self.qk_rank + 4 * self.H1 * r1 + 4 * self.config.n_head * r2 + 2 * self.vo_rank)

    def _rows(self, q, k, v, c1, c2, row_start, mix1, mix2):
        """The reference rows row_start..row_start+M-1, step by step as the official module: q (B,H1,M,dqk),
        k (B,H1,W,dqk), v (B,h,W,dv), c1 (B,H1,M,r1), c2 (B,h,M,r2), the mixers (U, Vt, d, shortcut) -> (B,h,M,dv)."""
        cfg = self.config
        M, W = q.shape[2], k.shape[2]
        lag = cfg.aligner_kind == "offset"
        S = q @ k.transpose(-1, -2)  # (B,H1,M,W) [G1] z_j = <q_t, k_{t-j}>, in key order
        invalid = ops.hyperglu.invalid_mask(M, W, row_start, lag, q.device) if cfg.do_masking else None
        if lag:
            Z = to_lag(S, row_start)  # lag layout: column c holds lag W-1-c
        else:
            Z = S.masked_fill(invalid, 0.0) if invalid is not None else S
        if cfg.use_op1:  # [G2] R1: z <- z (I + diag(d1) + U1 diag(c1) Vt1), before the nonlinearity
            Z = lag_mix(Z, c1, *mix1, invalid if cfg.op1_do_masking else None)
        h = cfg.n_head
        gate = Z[:, :h] if self.glu else Z  # GLU: qk-heads 0..h-1 gate, h..2h-1 scale (head j pairs j, h+j)
        inv = None
        if cfg.attn_norm == "l2":
            gate = F.normalize(_up(gate), dim=-1, eps=cfg.norm_eps).to(gate.dtype)
        elif cfg.attn_norm == "out_scale":  # fp32: eps=1e-12 and its inverse are not representable in fp16
            inv = 1.0 / _up(gate).norm(dim=-1, keepdim=True).clamp_min(cfg.norm_eps)  # (B,h,M,1)
        a = F.relu(gate)  # [G3] a = softplus(z_scale) relu(z_gate) / ||z_gate||  (HyperMLP: relu(z) / ||z||)
        if self.glu:
            a = torch.logaddexp(Z[:, h:], Z.new_zeros(())) * a  # softplus, without F.softplus's x > 20 cut-off
        if cfg.use_op2:  # [G4] R2: a <- a (I + diag(d2) + U2 diag(c2) Vt2), after it
            a = lag_mix(a, c2, *mix2, invalid if cfg.op2_do_masking else None)
        A = from_lag(a, row_start) if lag else a  # (B,h,M,W) back in key order
        out = A @ v  # [G5] o_t = sum_j a_j v_{t-j}
        if inv is not None:  # l2 and out_scale are the same function: ReLU is positively homogeneous
            out = (_up(out) * inv).to(out.dtype)
        return out


# -----------------------------------------------------------------------------
# residual connections: x_next = conn(x, f), f the pre-norm sublayer (B,T,C) -> (B,T,C). plain works on (B,T,C); hc
# and mhc on n streams (B,T,n,C), made after the embedding, summed before ln_f. Site k = 2*layer + (0 attn, 1 MLP).

class Plain(nn.Module):
    """Pre-norm residual: x + f(x), bit-identical to nanoGPT's x = x + attn(ln_1(x))."""

    def forward(self, x, f):
        return x + f(x)


class Streams(nn.Module):
    """A stream connection: streams(H) gives the sublayer input u, the mixed streams res and the write weights post,
    then H' = res + post^T f(u) [HC Eq. 2, mHC Eq. 3], all in fp32 outside autocast."""

    def forward(self, x, f):
        form = ops.dispatch.streams(self.config.impl, x, self.kind)
        if form != "reference":  # the same equations: Triton kernels on CUDA, else StreamPre and an in-place update
            return ops.streams.connect(x, f, self.kind, form=form, **self.fast_args())
        with torch.autocast(x.device.type, enabled=False):
            u, res, post = self.streams(_up(x))
        y = f(u.to(x.dtype))
        with torch.autocast(x.device.type, enabled=False):
            return (res + post[..., None] * _up(y)[..., None, :]).to(x.dtype)


class HyperConnection(Streams):
    """Hyper-connections [HC Eq. 2]: H' = B^T f(H^T A_m) + A_r^T H, with the static matrix [A_m | A_r] and B,
    plus, when dynamic, s * tanh(norm(H) W) corrections [HC Eqs. 8-13]. Init [e_{k mod n} | I], B = 1 and
    W = 0 make the network equal the pre-norm network [HC §2.3]. Coefficients and mixing run in fp32."""

    no_decay = ("static_alpha", "static_beta", "s_alpha", "s_beta")  # static parts and scales [HC §4]
    kind = "hc"

    def __init__(self, config, site):
        super().__init__()
        self.config = config
        n, C = config.hc_streams, config.n_embd
        alpha = torch.zeros(n, n + 1)
        alpha[site % n, 0] = 1.0
        alpha[:, 1:] = torch.eye(n)
        self.static_alpha = nn.Parameter(alpha)          # [A_m | A_r]  (n, n+1)
        self.static_beta = nn.Parameter(torch.ones(n))   # B            (n,)
        self.dynamic, self.tanh = config.hc_dynamic, config.hc_tanh
        if self.dynamic:
            self.norm = make_norm(config)
            self.W_alpha = nn.Parameter(torch.zeros(C, n + 1))  # [W_m | W_r]
            self.W_beta = nn.Parameter(torch.zeros(C, 1))
            self.s_alpha = nn.Parameter(torch.tensor(0.01))
            self.s_beta = nn.Parameter(torch.tensor(0.01))

    def coefficients(self, x):
        """x (B,T,n,C) fp32 -> (w_in, w_res, post) = (A_m, A_r^T (row i builds stream i), B): per token (B,T,n),
        (B,T,n,n), (B,T,n) when dynamic [HC Eqs. 8-13], alpha = [A_m | A_r] + s_alpha tanh(d_alpha), beta = B +
        s_beta tanh(d_beta) with d = norm(H) [W_alpha | W_beta] (B,T,n,n+2); else shared (n,), (n,n), (n,)."""
        if not self.dynamic:
            return self.static_alpha[:, 0], self.static_alpha[:, 1:].T, self.static_beta
        d = self.norm(x) @ torch.cat([self.W_alpha, self.W_beta], 1)
        if self.tanh:
            d = torch.tanh(d)
        alpha, beta = self.static_alpha + self.s_alpha * d[..., :-1], self.static_beta + self.s_beta * d[..., -1]
        return alpha[..., 0], alpha[..., 1:].transpose(-1, -2), beta

    def fast_args(self):
        """What ops.streams.connect takes for this site (see there), passed explicitly."""
        if not self.dynamic:
            return dict(static=self.coefficients(None))
        norm = (self.norm.weight, getattr(self.norm, "bias", None), isinstance(self.norm, nn.RMSNorm), self.norm.eps)
        return dict(params=(self.static_alpha, self.static_beta, self.s_alpha, self.s_beta), tanh=self.tanh,
                    W=torch.cat([self.W_alpha, self.W_beta], 1), norm=norm)

    def streams(self, H):
        w_in, w_res, post = self.coefficients(H)
        u = torch.einsum("...j,...jc->...c", w_in, H)     # H^T A_m, the sublayer input (B,T,C)
        res = torch.einsum("...ij,...jc->...ic", w_res, H)  # A_r^T H (B,T,n,C)
        return u, res, post


def sinkhorn(logits, iters=20):
    """Sinkhorn-Knopp [mHC Eq. 9] on (..., n, n) logits, in fp32: M = exp(logits) (shifted by the max, which cancels),
    then `iters` rounds of column then row normalisation. Rows end exact (forward gain 1), columns approximate."""
    M = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        M = M / M.sum(dim=-2, keepdim=True)  # columns
        M = M / M.sum(dim=-1, keepdim=True)  # rows
    return M


class ManifoldHC(Streams):
    """mHC [mHC Eq. 3]: x' = H_res x + H_post^T f(H_pre x), coefficients from the RMS-normalised flattened streams
    [Eqs. 7-9]: H_pre = sigmoid, H_post = 2 sigmoid, H_res = Sinkhorn. Gates alpha = 0.01, phi = 0, b_post = 0,
    b_pre favouring stream k mod n and b_res = c_r (2I - 1) make it equal the pre-norm network at init."""

    no_decay = ("alpha_pre", "alpha_post", "alpha_res", "b_pre", "b_post", "b_res")
    kind = "mhc"

    def __init__(self, config, site):
        super().__init__()
        self.config = config
        n, C = config.hc_streams, config.n_embd
        self.n, self.iters, self.eps = n, config.mhc_iters, 1e-6
        self.phi = nn.Parameter(torch.zeros(n * C, n * n + 2 * n))  # [phi_pre | phi_post | phi_res]
        self.alpha_pre = nn.Parameter(torch.tensor(0.01))
        self.alpha_post = nn.Parameter(torch.tensor(0.01))
        self.alpha_res = nn.Parameter(torch.tensor(0.01))
        b_pre = torch.full((n,), -config.mhc_pre_init)
        b_pre[site % n] = config.mhc_pre_init
        self.b_pre = nn.Parameter(b_pre)
        self.b_post = nn.Parameter(torch.zeros(n))
        self.b_res = nn.Parameter(config.mhc_res_init * (2 * torch.eye(n) - 1))

    def coefficients(self, x):
        """x (B,T,n,C) fp32 -> H_pre (B,T,n), H_res (B,T,n,n), H_post (B,T,n) [Eqs. 7-9], from RMSNorm(x) phi."""
        n = self.n
        flat = x.flatten(-2)  # (B,T,nC): every coefficient sees all streams
        h = (flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + self.eps)) @ self.phi  # RMSNorm (gain in phi)
        pre = torch.sigmoid(self.alpha_pre * h[..., :n] + self.b_pre)
        post = 2 * torch.sigmoid(self.alpha_post * h[..., n:2 * n] + self.b_post)
        res = sinkhorn(self.alpha_res * h[..., 2 * n:].unflatten(-1, (n, n)) + self.b_res, self.iters)
        return pre, res, post

    def fast_args(self):
        """What ops.streams.connect takes for this site (see there), passed explicitly."""
        return dict(params=(self.alpha_pre, self.alpha_post, self.alpha_res, self.b_pre, self.b_post, self.b_res),
                    W=self.phi, norm=(None, None, True, self.eps), iters=self.iters)

    def streams(self, H):
        pre, res, post = self.coefficients(H)
        return torch.einsum("...j,...jc->...c", pre, H), res @ H, post  # H_pre x (B,T,C), H_res x (B,T,n,C)


def make_residual(config, site):
    """The one dispatch point for GPTConfig.residual."""
    kind = {"hc": HyperConnection, "mhc": ManifoldHC}.get(config.residual)
    return kind(config, site) if kind else Plain()


# -----------------------------------------------------------------------------
# the GPT

@dataclass
class GPTConfig:
    """The one configuration of the model, every field a train.py setting; the attention options have the official
    HyperGLU names and defaults. None in use_kv_conv, use_qk_gate, use_vo_gate: on for hyperglu/hypermlp, off for
    softmax (auto(); kept None, so replace(cfg, attn=...) re-resolves it)."""
    vocab_size: int = 50304            # GPT-2's 50257 padded up to a multiple of 64
    block_size: int = 1024             # L, the longest sequence; HyperGLU's lag-indexed mixers have L rows
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True                  # bias in Linears and LayerNorms (nanoGPT); HyperGLU: q, k, v, c_proj only
    attn: str = "softmax"              # "softmax" | "hyperglu" | "hypermlp"
    residual: str = "plain"            # "plain" | "hc" | "mhc"
    impl: str = "fast"                 # "fast": ops/ where it applies | "reference": the plain forms in this file
    hc_streams: int = 4                # n, residual streams for hc/mhc
    hc_dynamic: bool = True            # hc only: dynamic (DHC) or static (SHC)
    hc_tanh: bool = True               # hc only: tanh on the dynamic part
    mhc_iters: int = 20                # mhc: Sinkhorn-Knopp iterations
    mhc_pre_init: float = 3.0          # mhc: b_pre = +c on the home stream, -c elsewhere
    mhc_res_init: float = 2.0          # mhc: b_res = c (2I - 1)
    pos: str = "learned"               # "learned" (wpe) | "rope" (in attention) | "none"
    mlp: str = "gelu"                  # "gelu" | "swiglu"
    norm: str = "layernorm"            # "layernorm" | "rmsnorm"
    # attention options (softmax takes the widths, the conv, the gates, gate_act and rope_base)
    qk_rank: int = None                # total Q/K width; None -> n_embd (softmax), n_embd // 4 (hyperglu/hypermlp)
    vo_rank: int = None                # total V/O width; None -> n_embd
    use_kv_conv: bool = None           # depthwise causal conv in front of K and V
    conv_kernel_size: int = 4
    use_qk_gate: bool = None           # dtqk: sigmoid gate on q (softmax "g" turns both gates on)
    use_vo_gate: bool = None           # dtvo: sigmoid gate on the readout
    gate_act: str = "sigmoid"          # "sigmoid" | "none", for both gates and both controls
    rope_base: float = 10000.0
    # HyperGLU / HyperMLP only
    attn_norm: str = "out_scale"       # "out_scale" | "l2" | "none" (l2 == out_scale exactly)
    norm_eps: float = 1e-12
    chunk_T: int = None                # query rows per chunk; None -> 128 on a CPU, 1024 on a GPU
    use_op1: bool = True               # R1, before the nonlinearity
    op1_rank: int = 16
    op1_use_diag: bool = True
    op1_init_std: float = 0.02
    op1_shortcut: bool = True          # the I in R = I + diag(d) + U diag(c) Vt
    op1_do_masking: bool = True
    use_op2: bool = True               # R2, after it
    op2_rank: int = 16
    op2_use_diag: bool = True
    op2_init_std: float = 0.02
    op2_shortcut: bool = True
    op2_do_masking: bool = True
    do_masking: bool = True            # causal; False is only truly bidirectional with "identity"
    aligner_kind: str = "offset"       # "offset" (lag layout) | "identity" (left layout)

    def __post_init__(self):
        o = "GPTConfig"
        _positive(self, "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "hc_streams", "mhc_iters",
                  "conv_kernel_size", "op1_rank", "op2_rank", *(("chunk_T",) if self.chunk_T is not None else ()))
        for name, allowed in (("attn", ("softmax", "hyperglu", "hypermlp")), ("residual", ("plain", "hc", "mhc")),
                              ("impl", ("fast", "reference")), ("pos", ("learned", "rope", "none")),
                              ("mlp", ("gelu", "swiglu")), ("norm", ("layernorm", "rmsnorm")),
                              ("gate_act", ("sigmoid", "none")), ("attn_norm", ("out_scale", "l2", "none")),
                              ("aligner_kind", ("offset", "identity"))):
            _choice(o, name, getattr(self, name), allowed)
        unused = {"plain": ("hc_streams", "hc_dynamic", "hc_tanh", "mhc_iters", "mhc_pre_init", "mhc_res_init"),
                  "hc": ("mhc_iters", "mhc_pre_init", "mhc_res_init"), "mhc": ("hc_dynamic", "hc_tanh")}
        moved = [f"{k}={getattr(self, k)!r}" for k in unused[self.residual]
                 if getattr(self, k) != self.__dataclass_fields__[k].default]
        if moved:  # silently ignored otherwise
            raise ValueError(f"{o}.{', '.join(moved)} {'does' if len(moved) == 1 else 'do'} nothing with residual="
                             f"{self.residual!r}{' (always dynamic, without tanh)' * (self.residual == 'mhc')}; "
                             f"expected the default, or residual='hc' (hc_*) or 'mhc' (mhc_*)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{o}.dropout={self.dropout!r} is not valid; expected 0 <= dropout < 1")
        H1 = self.qk_heads()
        for name, width, heads in zip(("qk_rank", "vo_rank"), self.widths(), (H1, self.n_head)):
            if width <= 0 or width % heads:
                what = f"{name}={width}" if getattr(self, name) is not None else f"n_embd={self.n_embd} ({width})"
                raise ValueError(f"{o}.{what} is not valid for attn={self.attn!r}; expected a positive multiple of "
                                 f"{heads} ({'n_head' if heads == self.n_head else '2 n_head: gate and scale heads'})")
        if self.pos == "rope" and (self.widths()[0] // H1) % 2:
            raise ValueError(f"{o}.pos='rope' needs an even per-head Q/K dim; qk_rank={self.widths()[0]} over {H1} "
                             f"heads gives {self.widths()[0] // H1}")
        if self.attn != "softmax" and not self.do_masking and self.aligner_kind == "offset":
            warnings.warn(f"{o}: do_masking=False with aligner_kind='offset' is not bidirectional (the lag layout "
                          f"never reads future keys); use aligner_kind='identity'", RuntimeWarning)

    def qk_heads(self):  # HyperGLU: a gate and a scale head per output head
        return 2 * self.n_head if self.attn == "hyperglu" else self.n_head

    def widths(self):
        """(qk, vo): the total Q/K and V/O widths, summed over heads, with None resolved."""
        qk = self.qk_rank if self.qk_rank is not None else self.n_embd if self.attn == "softmax" else self.n_embd // 4
        return qk, self.vo_rank if self.vo_rank is not None else self.n_embd

    def auto(self, name):
        """use_kv_conv, use_qk_gate or use_vo_gate with None resolved: on for HyperGLU/HyperMLP, off for softmax."""
        return self.attn != "softmax" if getattr(self, name) is None else getattr(self, name)


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config) if config.attn == "softmax" else HyperGLU(config)
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
        return n - self.transformer.wpe.weight.numel() if non_embedding and "wpe" in self.transformer else n

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
        """Model surgery to a smaller block size: wpe keeps its first rows, each attention crops its own."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"crop_block_size: block_size={block_size} is not valid; "
                             f"expected 1..{self.config.block_size}")
        self.config.block_size = block_size  # the one block_size: every module reads this config
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        for block in self.transformer.h:
            block.attn.crop_block_size(block_size)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer="adamw",
                             muon_lr=0.02, muon_momentum=0.95):
        """(optimizer, summary), the summary the lines that describe its groups (train.py prints them).
        "adamw": AdamW with two groups. No decay: biases, norm weights, HC/mHC static parameters and gate scalars,
        the op1/op2 diagonals (each module lists these in `no_decay`) and anything below 2-D; decay: the rest.
        "muon": torch.optim.Muon (its defaults) takes the weight of every nn.Linear inside a Block, maps from one
        activation to another (the split of nanochat and modded-nanogpt); AdamW's two groups keep the rest: lookup
        tables, norms, biases, the HC/mHC coefficients, the lag-indexed mixers and the 3-D convs. Every group
        carries lr_scale: train.py sets lr = schedule(step) * lr_scale (AdamW's 1, Muon's muon_lr / learning_rate)."""
        skip = {id(getattr(m, name)) for m in self.modules() for name in getattr(m, "no_decay", ())
                if getattr(m, name, None) is not None}  # (static HC has no s_alpha, s_beta)
        hidden = set()
        if optimizer == "muon":
            hidden = {id(m.weight) for m in self.transformer.h.modules() if isinstance(m, nn.Linear)}
        params = {id(p): (n, p) for n, p in self.named_parameters() if p.requires_grad}
        matrices = [p for i, (n, p) in params.items() if i in hidden]
        decay = [p for i, (n, p) in params.items() if p.dim() >= 2 and i not in skip and i not in hidden]
        no_decay = [p for i, (n, p) in params.items() if (p.dim() < 2 or i in skip) and i not in hidden]
        groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
                  {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
        summary = [f"num {what} parameter tensors: {len(ps)}, with {sum(p.numel() for p in ps):,} parameters"
                   for what, ps in (("Muon", matrices), ("decayed", decay), ("non-decayed", no_decay))
                   if what != "Muon" or ps]
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")
        if optimizer == "adamw":
            return adamw, "\n".join(summary)
        muon = torch.optim.Muon([{"params": matrices, "lr_scale": muon_lr / learning_rate}], lr=muon_lr,
                                weight_decay=weight_decay, momentum=muon_momentum)
        return MuonAdamW(muon, adamw), "\n".join(summary)

    def flops_per_token(self, T=None):
        """Training FLOPs per token (forward + backward = 3x forward) at context T (default block_size): 6 N for
        every parameter outside attention used once per token (1 MAC = 2 FLOPs, elementwise ignored), 3x each
        attention's forward FLOPs (its own count: weights and score maps) and the HC/mHC stream mixing."""
        cfg, T = self.config, T or self.config.block_size
        attn = {id(p) for block in self.transformer.h for p in block.attn.parameters()}
        N = sum(p.numel() for n, p in self.named_parameters() if id(p) not in attn and not n.endswith("wpe.weight"))
        flops = 6 * N + 3 * sum(block.attn.flops_per_token(T) for block in self.transformer.h)
        n, C = cfg.hc_streams, cfg.n_embd
        if cfg.residual == "hc":
            flops += 3 * 2 * cfg.n_layer * (2 * n * (n + 1) * C + 2 * n * C)
        elif cfg.residual == "mhc":
            flops += 3 * 2 * cfg.n_layer * (2 * n * C + 2 * n * n * C + 2 * n * C)
        return flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, vocab_limit=None):
        """Sample max_new_tokens after idx (B, T); temperature=0 is greedy, vocab_limit masks padded ids. With the
        cache, the prompt is prefilled once and each step feeds one token; past block_size the window slides over the
        newest block_size tokens as nanoGPT's crop does, so each of those steps recomputes it (every position moves)."""
        cfg, L = self.config, self.config.block_size
        use_cache = use_cache and all(block.attn.cacheable for block in self.transformer.h)
        cache = KVCache(cfg.n_layer) if use_cache else None
        for _ in range(max_new_tokens):
            if cache is None:
                logits, _ = self(idx[:, -L:])
            elif 0 < cache.n < L:
                logits, _ = self(idx[:, -1:], cache=cache)
            else:  # first call, or the window is full: (re)fill the cache from the newest L tokens
                cache = KVCache(cfg.n_layer)
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
