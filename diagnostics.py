"""
What train.py and bench.py measure besides the loss: model FLOPs utilisation against the GPU's peak (mfu), and the
HC / mHC mixing matrices with their composite Amax gain (train.py's amax_fwd, amax_bwd; plots/plot_connections.py
draws them).
"""
from contextlib import nullcontext

import torch


# bf16 dense tensor-core peak FLOPs by GPU name (substring match, most specific first)
PEAK_FLOPS = [("H200", 989e12), ("GH200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),
              ("H20", 148e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
              ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("A6000", 155e12),
              ("4090", 165e12), ("3090", 71e12), ("V100", 125e12), ("T4", 65e12)]


def peak_flops(device=None):
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_FLOPS if key in name), None)


def mfu(model, fwdbwd_per_iter, dt, device=None):
    """Model FLOPs utilisation of a GPT (model.flops_per_token at its block_size) against the GPU's bf16 dense peak;
    None (print "n/a") on CPU, MPS or an unknown GPU, never a guessed number."""
    peak, T = peak_flops(device), model.config.block_size
    if peak is None or dt <= 0:
        return None
    return model.flops_per_token(T) * T * fwdbwd_per_iter / dt / peak


@torch.no_grad()
def connection_matrices(model, idx):
    """HC/mHC coefficients at every residual site (attention, MLP, attention, ...) for a batch idx (B, T), averaged
    over its tokens: a list of (pre (n,), post (n,), res (n,n)), in mHC's orientation (for HC: A_m, B and A_r^T;
    row i of res builds stream i). Empty for the plain residual."""
    sites = [m for b in model.transformer.h for m in (b.res_attn, b.res_mlp) if hasattr(m, "coefficients")]
    out = []

    def record(m, args):
        x = args[0]
        with torch.autocast(x.device.type, enabled=False):
            pre, res, post = m.coefficients(x.to(torch.promote_types(x.dtype, torch.float32)))
        mean = lambda t, k: t.reshape(-1, *t.shape[t.dim() - k:]).mean(0)  # over tokens (static HC: none)
        out.append((mean(pre, 1), mean(post, 1), mean(res, 2)))
    hooks = [m.register_forward_pre_hook(record) for m in sites]
    try:
        model(idx)
    finally:
        for h in hooks:
            h.remove()
    return out


def amax_gain(res_list):
    """Composite gain of the residual mixing across sites [mHC §3.1]: C_k = H_res_k ... H_res_1; returns, per
    depth k, the forward gain (max absolute row sum of C_k) and the backward gain (max absolute column sum)."""
    C, fwd, bwd = None, [], []
    for H in res_list:
        C = H.double() if C is None else H.double() @ C
        fwd.append(C.abs().sum(-1).max().item())
        bwd.append(C.abs().sum(-2).max().item())
    return fwd, bwd


def amax(model, idx, ctx=nullcontext()):
    """(forward, backward) composite Amax gain over all of a model's HC/mHC sites on the batch idx (B, T), the
    matrices taken in eval mode under ctx (train.py's autocast)."""
    model.eval()
    with ctx:
        mats = connection_matrices(model, idx)
    model.train()
    fwd, bwd = amax_gain([res for _, _, res in mats])
    return fwd[-1], bwd[-1]
