"""
Fast forms of the hyper-connection stream ops (model.HyperConnection and model.ManifoldHC hold the reference
equations). connect() runs one residual site from tensors and plain numbers (nothing here imports model.py), in the
form ops.dispatch picks: "triton", the fused kernels of ops/streams_triton.py; "pre", the coefficient projection with
the norm applied after the matmul [mHC Eqs. 14-16], everything before the sublayer as one autograd op with a
hand-written backward (StreamPre), and the update after it added in place (add_outer).
"""

import functools

import torch

import ops.sinkhorn


def connect(x, f, kind, params=(), W=None, norm=None, tanh=True, iters=20, static=None, form="pre"):
    """One HC / mHC site, H' = res + post^T f(u) [HC Eq. 2, mHC Eq. 3], for streams x (B,T,n,C) and the sublayer f
    (B,T,C) -> (B,T,C); kind "hc" or "mhc". Static HC: its shared coefficients static = (A_m (n,), A_r^T (n,n),
    B (n,)). Dynamic HC: the projection W (C, n+2) = [W_alpha | W_beta], the norm (weight, bias, rms, eps) applied
    after the matmul, params = (static_alpha, static_beta, s_alpha, s_beta) and tanh (hc_mix). mHC: W = phi, the
    weightless RMSNorm (None, None, True, eps), params = (alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res)
    and the Sinkhorn iterations (mhc_mix). The coefficients and the update run in fp32 outside autocast."""
    if form == "triton":
        from ops import streams_triton
        return streams_triton.connect(x, f, kind, params, W, norm, tanh, iters, static)
    dev = x.device.type
    with torch.autocast(dev, enabled=False):
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        if static is not None:
            w_in, w_res, post = static
            u = torch.einsum("...j,...jc->...c", w_in, h)       # H^T A_m (B,T,C)
            res = torch.einsum("...ij,...jc->...ic", w_res, h)  # A_r^T H (B,T,n,C), fresh: add_outer adds into it
        else:
            mix = functools.partial(mhc_mix, iters=iters) if kind == "mhc" else functools.partial(hc_mix, tanh=tanh)
            u, res, post = pre(mix, h, W, norm, kind == "mhc", params)
    y = f(u.to(x.dtype))
    with torch.autocast(dev, enabled=False):
        return add_outer(res, post, y.to(torch.promote_types(y.dtype, torch.float32))).to(x.dtype)


def hc_mix(d, static_alpha, static_beta, s_alpha, s_beta, tanh=True):
    """HC's coefficients [HC Eqs. 8-13] from d = norm(H) [W_alpha | W_beta] (B,T,n,n+2): A_m (B,T,n), A_r^T (B,T,n,n),
    B (B,T,n), with alpha = [A_m | A_r] + s_alpha tanh(d_alpha), beta = B + s_beta tanh(d_beta)."""
    if tanh:
        d = torch.tanh(d)
    alpha, beta = static_alpha + s_alpha * d[..., :-1], static_beta + s_beta * d[..., -1]
    return alpha[..., 0], alpha[..., 1:].transpose(-1, -2), beta


def mhc_mix(h, alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res, iters=20):
    """mHC's coefficients [mHC Eqs. 7-9] from h = RMSNorm(flat streams) phi (B,T,n^2+2n): H_pre (B,T,n), H_res
    (B,T,n,n) by Sinkhorn, H_post (B,T,n)."""
    n = b_pre.shape[0]
    pre = torch.sigmoid(alpha_pre * h[..., :n] + b_pre)
    post = 2 * torch.sigmoid(alpha_post * h[..., n:2 * n] + b_post)
    logits = alpha_res * h[..., 2 * n:].unflatten(-1, (n, n)) + b_res
    return pre, ops.sinkhorn.sinkhorn(logits, iters), post


def pre(mix, x, W, norm, flat, params):
    """HC / mHC before the sublayer: x (B,T,n,C) fp32 -> the sublayer input u = sum_j w_in[j] x_j (B,T,C), the mixed
    streams res_i = sum_j w_res[i,j] x_j (B,T,n,C) and the post weights (B,T,n), where
    (w_in, w_res, post) = mix(norm(x) @ W, *params). norm = (g, b, rms, eps) as norm_proj takes them; flat:
    normalise each token's n*C streams as one row (mHC) instead of each stream (HC).
    StreamPre when a backward will follow (it exists for the backward's passes) and not under torch.compile
    (whose fusion works on the plain ops); else the same math through plain ops."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return StreamPre.apply(mix, x, W, *norm, flat, *params)
    B, T, n, C = x.shape
    w_in, w_res, post = mix(norm_proj(x.reshape(B, T, n * C) if flat else x, W, *norm), *params)
    return *stream_mix(x, w_in, w_res), post


def add_outer(res, w, y):
    """res (B,T,n,C) + w (B,T,n) outer y (B,T,C) (w (n,) for static HC), added into res in place (callers pass
    the fresh mixed streams): one batched GEMM with K=1, so no (B,T,n,C) temporary and no copy of res.
    torch.compile gets the functional form."""
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
        g = g.contiguous()  # the final sum over streams sends a stride-0 gradient; CPU bmm loops per token on it
        gs = g.view(B * T, n, C)
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


def norm_proj(x, W, g=None, b=None, rms=True, eps=1e-6):
    """norm(x) @ W for x (..., D), W (D, K), with the norm applied after the matmul [mHC Eqs. 14-16]:
    LayerNorm(x) @ W = r (x @ gW - mu colsum(gW)) + b @ W with gW = diag(g) W, the row mean mu and
    r = 1/sqrt(var + eps); RMSNorm (rms=True) drops mu and b; g=None is a weightless norm (mHC's phi holds it).
    Neither the normalised (..., D) tensor nor its gradient is ever written: one GEMM against x, one row-norm,
    and the (..., K) result, instead of a norm pass, a GEMM and their backward passes."""
    return NormProj.apply(x, W, g, b, rms, eps)


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


class StreamPre(torch.autograd.Function):
    """HC / mHC before the sublayer as one op: x (B,T,n,C) -> the sublayer input u = sum_j w_in[j] x_j (B,T,C),
    the mixed streams res_i = sum_j w_res[i,j] x_j (B,T,n,C) and the post weights (B,T,n), where
    (w_in, w_res, post) = mix(norm_proj(x), *params) and mix is the small coefficient map (hc_mix or mhc_mix:
    tanh, sigmoid, Sinkhorn on (B,T,n,K) numbers; autograd differentiates it inside backward). Backward writes dx
    once and accumulates the stream-mixing paths into it in place; autograd over the same ops writes three
    (B,T,n,C) gradients and adds them. flat: normalise each token's n*C streams as one row (mHC) instead of each
    stream (HC)."""

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
