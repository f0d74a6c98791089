"""model.py's residual connections: plain is nanoGPT's, HC and mHC equal pre-norm at init, Sinkhorn, and their
parameters' optimizer groups."""
import pytest
import torch

from conftest import ATTNS, randomize, tiny
from model import GPT, sinkhorn


def test_plain_is_nanogpt_bit_identical():
    torch.manual_seed(0)
    model = randomize(GPT(tiny()), 0.05).eval()
    block = model.transformer.h[0]
    x = torch.randn(2, 24, 32)
    y = x + block.attn(block.ln_1(x))
    y = y + block.mlp(block.ln_2(y))
    assert torch.equal(block(x), y)


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("residual,dynamic,n,tol", [
    ("hc", True, 4, 1e-6), ("hc", False, 4, 1e-6), ("mhc", True, 4, 1e-5),
    ("hc", True, 1, 1e-6), ("hc", False, 1, 1e-6), ("mhc", True, 1, 1e-5)])
def test_hyper_connections_equal_prenorm_at_init(attn, impl, residual, dynamic, n, tol):
    """Same sublayer weights: the residual state entering ln_f (streams summed, / n) equals pre-norm's, and
    the logits agree up to ln_f's eps acting on an n-times larger input (embedding at a trained scale)."""
    torch.manual_seed(0)
    plain = randomize(GPT(tiny(attn=attn)), 0.05).eval()
    with torch.no_grad():
        plain.transformer.wte.weight.normal_(0.0, 1.0)
    hyper = GPT(tiny(attn=attn, residual=residual, hc_dynamic=dynamic, hc_streams=n, impl=impl)).eval()
    missing, unexpected = hyper.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(".res_" in k for k in missing)
    seen = {}
    plain.transformer.ln_f.register_forward_pre_hook(lambda m, a: seen.setdefault("plain", a[0]))
    hyper.transformer.ln_f.register_forward_pre_hook(lambda m, a: seen.setdefault("hyper", a[0]))
    idx = torch.randint(0, 61, (2, 24))
    with torch.no_grad():
        a, _ = plain(idx, idx)
        b, _ = hyper(idx, idx)
    assert (seen["plain"] - seen["hyper"] / n).abs().max() < tol
    assert (a - b).abs().max() < 1e-5 * a.abs().max()


def test_streams_diverge_after_training():
    torch.manual_seed(0)
    model = GPT(tiny(residual="mhc"))
    opt, _ = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    idx = torch.randint(0, 61, (4, 24))
    for _ in range(5):
        _, loss = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seen = {}
    model.transformer.h[1].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(idx, idx)
    x = seen["x"]  # (B,T,n,C) streams entering layer 1
    assert (x - x.mean(2, keepdim=True)).abs().max() > 1e-6


@pytest.mark.parametrize("fast", [False, True])
def test_sinkhorn_sums(fast):
    """model.sinkhorn and ops.sinkhorn: rows sum to 1 within 1e-5 after 20 iterations, columns close to it."""
    import ops.sinkhorn
    sinkhorn_ = ops.sinkhorn.sinkhorn if fast else sinkhorn
    torch.manual_seed(0)
    # (c, noise, column tolerance): std-1 logits; mHC's init b_res = 2(2I - 1) exactly, and with noise
    # five times the dynamic part's size at init (alpha = 0.01). Near-permutation logits converge slowest.
    for c, noise, col_tol in ((0.0, 1.0, 1e-3), (2.0, 0.0, 1e-6), (2.0, 0.05, 2e-3)):
        logits = c * (2 * torch.eye(4) - 1) + noise * torch.randn(2000, 4, 4)
        P = sinkhorn_(logits, 20)
        assert P.dtype == torch.float32 and (P >= 0).all()
        assert (P.sum(-1) - 1).abs().max() < 1e-5  # rows: exact by construction (row step is last)
        assert (P.sum(-2) - 1).abs().max() < col_tol
    P = sinkhorn_(torch.randn(60, 4, 4), 20)
    composite = torch.linalg.multi_dot(list(P))
    assert (composite.sum(-1) - 1).abs().max() < 1e-5 and composite.sum(-2).max() < 1.001


def test_static_hc_trains_with_its_static_parameters_undecayed():
    """Static HC (hc_dynamic=False) has no dynamic scales: configure_optimizers must not look for them, and a few
    steps must train it (only its static [A_m | A_r] and B, no decay)."""
    torch.manual_seed(0)
    model = GPT(tiny(residual="hc", hc_dynamic=False))
    opt, _ = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    res = {n for n in names.values() if ".res_" in n}
    assert res and res <= no_decay and all(n.endswith(("static_alpha", "static_beta")) for n in res)
    idx = torch.randint(0, 61, (4, 24))
    before = model.transformer.h[0].res_attn.static_alpha.detach().clone()
    losses = []
    for _ in range(5):
        _, loss = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert (model.transformer.h[0].res_attn.static_alpha - before).abs().max() > 1e-4


def test_mhc_rejects_the_hc_only_switches():
    for kw in (dict(hc_dynamic=False), dict(hc_tanh=False)):
        with pytest.raises(ValueError, match="residual='mhc'"):
            tiny(residual="mhc", **kw)


@pytest.mark.parametrize("residual", ["hc", "mhc"])
def test_hyper_connection_params_are_not_decayed(residual):
    model = GPT(tiny(residual=residual, attn="hyperglu"))
    opt, _ = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    static = ("static_alpha", "static_beta", "s_alpha", "s_beta", "alpha_pre", "alpha_post", "alpha_res",
              "b_pre", "b_post", "b_res", "mix.d", "bias", "ln_")
    for i in decayed:
        assert not any(s in names[i] for s in static), names[i]
    dynamic = [n for n in names.values() if n.endswith(("W_alpha", "W_beta", "phi", "c_attn.weight", "q.weight"))]
    assert dynamic and all(id(dict(model.named_parameters())[n]) in decayed for n in dynamic)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
