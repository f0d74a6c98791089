"""model.py's reference: every attention x residual combination, HyperGLU exactness, HC/mHC at init, decoding,
budgets. The fast paths of ops/ against this reference are tests/test_ops.py."""
import dataclasses
import itertools
import shutil

import pytest
import torch

from checkpoint import load_checkpoint, upgrade
from conftest import ATTNS, RESIDUALS, layer_cfg, randomize, run_layer, tiny
from model import GPT, GPTConfig, HyperGLU, HyperGLUConfig, KVCache, apply_rope, match_budget, param_report, sinkhorn

# ---------------------------------------------------------------- every combination


@pytest.mark.parametrize("attn,residual", list(itertools.product(ATTNS, RESIDUALS)))
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_combination_trains_and_is_causal(attn, residual, impl):
    torch.manual_seed(0)
    model = GPT(tiny(attn=attn, residual=residual, impl=impl))
    idx = torch.randint(0, 61, (2, 24))
    logits, loss = model(idx, idx)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == [], f"parameters without a gradient (DDP would fail): {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # causality probe on a trained-looking model: changing token t leaves every output before t unchanged
    randomize(model, 0.05)
    model.eval()
    with torch.no_grad():
        a, _ = model(idx, idx)
        idx2 = idx.clone()
        idx2[:, 13] = (idx2[:, 13] + 7) % 61
        b, _ = model(idx2, idx2)
    assert (a[:, :13] - b[:, :13]).abs().max() < 1e-6
    assert (a[:, 13:] - b[:, 13:]).abs().max() > 1e-4  # and the change does reach later positions


# ---------------------------------------------------------------- HyperGLU numerics (float64)


@pytest.mark.parametrize("kind,norm,layout", list(itertools.product(["glu", "relu"], ["l2", "out_scale", "none"],
                                                                    ["offset", "identity"])))
def test_dense_equals_chunked(kind, norm, layout):
    """The reference rows all at once and chunk by chunk (each chunk with only the keys it can see), float64."""
    torch.manual_seed(0)
    layer = randomize(HyperGLU(layer_cfg(attn_kind=kind, attn_norm=norm, aligner_kind=layout, qk_rank=8))).double()
    x = torch.randn(2, 17, 24, dtype=torch.float64)
    y0, g0 = run_layer(layer, x, impl="dense")
    for chunk in (1, 5, 16):
        y1, g1 = run_layer(layer, x, impl="chunked", chunk_T=chunk)
        assert (y0 - y1).abs().max() < 1e-12
        for n in g0:
            assert (g0[n] - g1[n]).abs().max() < 1e-12, (chunk, n)


@pytest.mark.parametrize("kind", ["glu", "relu"])
def test_l2_equals_out_scale(kind):
    torch.manual_seed(0)
    a = randomize(HyperGLU(layer_cfg(attn_kind=kind, attn_norm="out_scale"))).double()
    b = HyperGLU(layer_cfg(attn_kind=kind, attn_norm="l2")).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 19, 24, dtype=torch.float64)
    ya, ga = run_layer(a, x)
    yb, gb = run_layer(b, x)
    assert (ya - yb).abs().max() < 1e-10
    for n in ga:
        assert (ga[n] - gb[n]).abs().max() < 1e-9, n
    c = HyperGLU(layer_cfg(attn_kind=kind, attn_norm="none")).double()
    c.load_state_dict(a.state_dict())
    assert (c(x) - ya).abs().max() > 1e-3  # the norm is not a no-op
def test_offset_layout_is_extension_consistent_and_identity_is_not():
    torch.manual_seed(0)
    x = torch.randn(2, 20, 24, dtype=torch.float64)
    for layout, consistent in (("offset", True), ("identity", False)):
        layer = randomize(HyperGLU(layer_cfg(aligner_kind=layout))).double()
        full = layer(x)
        for n in (5, 12):
            diff = (layer(x[:, :n]) - full[:, :n]).abs().max()
            assert (diff < 1e-12) if consistent else (diff > 1e-6), (layout, n, diff)


@pytest.mark.parametrize("kind,rope", list(itertools.product(["glu", "relu"], [False, True])))
def test_incremental_decoding_equals_full_forward(kind, rope):
    torch.manual_seed(0)
    layer = randomize(HyperGLU(layer_cfg(attn_kind=kind, use_rope=rope))).double()
    x = torch.randn(2, 20, 24, dtype=torch.float64)
    full = layer(x)
    cache = {}
    steps = [layer(x[:, :6], cache=cache)]  # prefill 6, then one token at a time
    for t in range(6, 20):
        steps.append(layer(x[:, t:t + 1], cache=cache))
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-12
def test_rope_is_a_rotation_of_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    rot = lambda t, p: apply_rope(t, torch.tensor([p]), 10000.0)
    assert abs(rot(q, 37).norm() - q.norm()) < 1e-12
    dots = [(rot(q, p + 3) * rot(k, p)).sum().item() for p in (0, 5, 40)]
    assert max(dots) - min(dots) < 1e-12
    assert abs((rot(q, 3) * rot(k, 0)).sum() - (rot(q, 4) * rot(k, 0)).sum()) > 1e-3


@pytest.mark.parametrize("backward_inside", [False, True])
def test_bf16_autocast_with_fp32_params(backward_inside):
    """Backward outside autocast, as train.py and the PyTorch docs do, and inside it, as many scripts do (the
    hand-written backwards keep their fp32 math there)."""
    torch.manual_seed(0)
    for attn, res in (("hyperglu", "mhc"), ("hypermlp", "hc"), ("softmax", "mhc")):
        model = GPT(tiny(attn=attn, residual=res))
        idx = torch.randint(0, 61, (2, 24))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, idx)
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        assert torch.isfinite(loss)
        assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile on CPU needs a C compiler")
@pytest.mark.parametrize("residual", ["mhc", "hc"])
def test_torch_compile_matches_eager(residual):
    """The training path (hand-written backward, strided GEMM outputs) under torch.compile, HyperGLU + mHC / HC,
    away from init. Compiled HC/mHC run their autograd form, so this also checks StreamPre against it."""
    torch.manual_seed(0)
    model = randomize(GPT(tiny(attn="hyperglu", residual=residual, n_layer=1, block_size=16, chunk_T=5)), 0.1)
    idx = torch.randint(0, 61, (2, 16))
    _, loss0 = model(idx, idx)
    loss0.backward()
    g0 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _, loss1 = torch.compile(model)(idx, idx)
    loss1.backward()
    assert abs(loss0.item() - loss1.item()) < 1e-5
    for n, p in model.named_parameters():
        assert (p.grad - g0[n]).abs().max() < 1e-5 * max(1.0, g0[n].abs().max().item()), n
def test_out_scale_has_no_nan_in_half_precision():
    layer = HyperGLU(layer_cfg()).to(torch.bfloat16)
    x = torch.zeros(1, 8, 24, dtype=torch.bfloat16)  # all-zero rows: the norm clamp bites
    assert torch.isfinite(layer(x)).all()


def test_import_leaves_matmul_precision_alone():
    assert torch.get_float32_matmul_precision() == "highest"


OFFICIAL_KEYS = [
    ("q.weight", (64, 256)), ("k.weight", (64, 256)), ("v.weight", (256, 256)), ("c_proj.weight", (256, 256)),
    ("conv1.conv.weight", (256, 1, 4)), ("conv2.conv.weight", (256, 1, 4)),
    ("op.mix.U", (4, 128, 16)), ("op.mix.Vt", (4, 16, 128)), ("op.mix.d", (4, 128)),
    ("control1.weight", (64, 256)), ("control1.bias", (64,)),
    ("op2.mix.U", (2, 128, 16)), ("op2.mix.Vt", (2, 16, 128)), ("op2.mix.d", (2, 128)),
    ("control2.weight", (32, 256)), ("control2.bias", (32,)),
    ("left_gate.weight", (64, 256)), ("left_gate.bias", (64,)),
    ("right_gate.weight", (256, 256)), ("right_gate.bias", (256,)),
]


def test_state_dict_matches_official_layout():
    layer = HyperGLU(HyperGLUConfig(n_embd=256, n_head=2, block_size=128))
    assert [(k, tuple(v.shape)) for k, v in layer.state_dict().items()] == OFFICIAL_KEYS
    other = HyperGLU(HyperGLUConfig(n_embd=256, n_head=2, block_size=128))
    other.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(1, 10, 256)
    assert torch.equal(layer(x), other(x))


@pytest.mark.parametrize("kw,field", [
    (dict(attn_kind="gelu"), "attn_kind"), (dict(attn_norm="rms"), "attn_norm"), (dict(gate_act="tanh"), "gate_act"),
    (dict(impl_default="fast"), "impl_default"), (dict(aligner_kind="left"), "aligner_kind"),
    (dict(aligner_impl_train="gather"), "aligner_impl_train"), (dict(qk_rank=6), "qk_rank"),
    (dict(vo_rank=7), "vo_rank"), (dict(chunk_T=0), "chunk_T"), (dict(op1_rank=0), "op1_rank"),
    (dict(conv_kernel_size=0), "conv_kernel_size"), (dict(use_rope=True, qk_rank=12), "use_rope"),
    (dict(op2_per_head=False), "op2_per_head"),
])
def test_hyperglu_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        layer_cfg(**kw)


@pytest.mark.parametrize("kw,field", [
    (dict(attn="linear"), "attn"), (dict(residual="post"), "residual"), (dict(pos="alibi"), "pos"),
    (dict(mlp="relu"), "mlp"), (dict(norm="batch"), "norm"), (dict(n_embd=30, n_head=4), "n_embd"),
    (dict(attn="hyperglu", qk_rank=6), "qk_rank"), (dict(hc_streams=0), "hc_streams"), (dict(dropout=1.5), "dropout"),
])
def test_gpt_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        tiny(**kw)


def test_too_long_sequence_is_a_value_error():
    for attn in ATTNS:
        with pytest.raises(ValueError, match="block_size"):
            GPT(tiny(attn=attn))(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        HyperGLU(layer_cfg())(torch.zeros(1, 21, 24))


# ---------------------------------------------------------------- residuals


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
    opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
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
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
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


def test_config_from_older_checkpoints_drops_retired_fields():
    args = dict(vars(tiny(attn="hyperglu")), impl_default="recompute", aligner_impl_train="padview",
                aligner_impl_eval="padview", op1_per_head=True, op2_per_head=True)
    assert GPTConfig(**upgrade(args)) == tiny(attn="hyperglu")
    with pytest.raises(TypeError):
        GPTConfig(**upgrade(dict(args, not_a_field=1)))


@pytest.mark.parametrize("residual", ["hc", "mhc"])
def test_hyper_connection_params_are_not_decayed(residual):
    model = GPT(tiny(residual=residual, attn="hyperglu"))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    static = ("static_alpha", "static_beta", "s_alpha", "s_beta", "alpha_pre", "alpha_post", "alpha_res",
              "b_pre", "b_post", "b_res", "mix.d", "bias", "ln_")
    for i in decayed:
        assert not any(s in names[i] for s in static), names[i]
    dynamic = [n for n in names.values() if n.endswith(("W_alpha", "W_beta", "phi", "c_attn.weight", "q.weight"))]
    assert dynamic and all(id(dict(model.named_parameters())[n]) in decayed for n in dynamic)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


# ---------------------------------------------------------------- generation, surgery, accounting


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_kv_cache_logits_equal_full_forward(attn, pos):
    torch.manual_seed(0)
    model = randomize(GPT(tiny(attn=attn, pos=pos, residual="mhc", use_kv_conv=True)), 0.05).double().eval()
    idx = torch.randint(0, 61, (2, 24))
    with torch.no_grad():
        full, _ = model(idx, idx)
        cache = KVCache(2)
        steps = [model(idx[:, :9], cache=cache)[0]]
        for t in range(9, 24):
            steps.append(model(idx[:, t:t + 1], cache=cache)[0])
    assert (full[:, 8] - steps[0][:, 0]).abs().max() < 1e-10
    assert (full[:, 9:] - torch.cat(steps[1:], 1)).abs().max() < 1e-10


@pytest.mark.parametrize("attn,layout", [("softmax", "offset"), ("hyperglu", "offset"), ("hypermlp", "offset"),
                                         ("hyperglu", "identity")])
def test_generate_with_cache_equals_without(attn, layout):
    torch.manual_seed(0)
    model = randomize(GPT(tiny(attn=attn, aligner_kind=layout)), 0.05).double().eval()
    idx = torch.randint(0, 61, (2, 5))
    a = model.generate(idx, 30, temperature=0, use_cache=True)  # runs past block_size=24
    b = model.generate(idx, 30, temperature=0, use_cache=False)
    assert torch.equal(a, b)
    assert a.shape == (2, 35)


def test_generate_respects_vocab_limit():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    out = model.generate(torch.zeros(3, 1, dtype=torch.long), 40, temperature=2.0, vocab_limit=10)
    assert out.max() < 10


def test_crop_block_size_keeps_newest_lags():
    torch.manual_seed(0)
    model = randomize(GPT(tiny(attn="hyperglu", pos="none")), 0.05).double().eval()
    idx = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        before, _ = model(idx, idx)
        model.crop_block_size(12)
        after, _ = model(idx, idx)
    assert model.transformer.h[0].attn.op["mix"].U.shape[1] == 12
    assert (before - after).abs().max() < 1e-12


def test_match_budget_matches_attention_parameters():
    base = GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128)
    S = param_report(base)["attention"]
    for changes in (dict(attn="hyperglu", n_head=2), dict(attn="hypermlp", n_head=2),
                    dict(use_qk_gate=True, use_vo_gate=True), dict(fit="vo_rank", use_kv_conv=True, qk_rank=32)):
        cfg = match_budget(base, **changes)
        assert abs(param_report(cfg)["attention"] / S - 1) <= 0.06, changes
        assert param_report(cfg)["total"] == sum(p.numel() for p in GPT(cfg).parameters())
        assert cfg.qk_rank < 128
    assert cfg.vo_rank > 128  # S-c-q: the Q/K width saved goes to V/O


def test_softmax_options_decode_exactly_and_stay_causal():
    """Softmax with RoPE, conv, both gates and Q/K, V/O widths apart from n_embd: the KV cache gives the full
    forward's logits, and a changed token leaves earlier outputs alone. Without options it is nanoGPT's layer."""
    plain = GPT(tiny(attn="softmax", qk_rank=None)).state_dict()
    assert not any("gate" in k for k in plain) and plain["transformer.h.0.attn.c_attn.weight"].shape == (96, 32)
    torch.manual_seed(0)
    cfg = tiny(attn="softmax", pos="rope", use_kv_conv=True, use_qk_gate=True, use_vo_gate=True, qk_rank=8, vo_rank=16)
    model = randomize(GPT(cfg), 0.05).double().eval()
    assert model.transformer.h[0].attn.c_proj.weight.shape == (32, 16)
    idx = torch.randint(0, 61, (2, 24))
    with torch.no_grad():
        full, _ = model(idx, idx)
        cache = KVCache(2)
        steps = [model(idx[:, :9], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(9, 24)]
        idx2 = idx.clone()
        idx2[:, 13] = (idx2[:, 13] + 7) % 61
        moved, _ = model(idx2, idx2)
    assert (full[:, 8] - steps[0][:, 0]).abs().max() < 1e-10
    assert (full[:, 9:] - torch.cat(steps[1:], 1)).abs().max() < 1e-10
    assert (full[:, :13] - moved[:, :13]).abs().max() == 0 and (full[:, 13] - moved[:, 13]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="qk_rank=12"):
        tiny(attn="softmax", qk_rank=12, n_head=8)


def test_softmax_gate_flags_of_older_files_read_as_off(tmp_path):
    """Before softmax had gates, its configs and checkpoints said use_qk_gate/use_vo_gate=True to no effect."""
    old = dict(dataclasses.asdict(tiny(attn="softmax")), use_qk_gate=True, use_vo_gate=True, impl_default="chunked")
    cfg = GPTConfig(**upgrade(old))
    assert not cfg.auto("use_qk_gate") and not cfg.auto("use_vo_gate")
    del old["impl_default"]  # written after the ops/ split, before softmax gates: the weights tell
    assert GPTConfig(**upgrade(old)).auto("use_qk_gate")  # a config dict alone cannot tell
    torch.save({"model": GPT(tiny(attn="softmax")).state_dict(), "model_args": old}, tmp_path / "ckpt.pt")
    cfg = GPTConfig(**load_checkpoint(str(tmp_path / "ckpt.pt"))["model_args"])
    assert not cfg.auto("use_qk_gate") and not cfg.auto("use_vo_gate")
    GPT(cfg).load_state_dict(GPT(tiny(attn="softmax")).state_dict())  # loads: no gate weights expected
    gated = tiny(attn="softmax", use_qk_gate=True, use_vo_gate=True)  # today's gated softmax keeps its gates
    torch.save({"model": GPT(gated).state_dict(), "model_args": dataclasses.asdict(gated)}, tmp_path / "ckpt.pt")
    assert GPTConfig(**load_checkpoint(str(tmp_path / "ckpt.pt"))["model_args"]) == gated


def test_flops_and_mfu():
    cfg = tiny(attn="hyperglu")
    model = GPT(cfg)
    assert model.estimate_mfu(1, 0.1) is None  # CPU: n/a, never a made-up number
    soft = GPT(tiny(qk_rank=None))  # nanoGPT's layer: Q/K width n_embd
    N = sum(p.numel() for n, p in soft.named_parameters() if "wpe" not in n)
    assert soft.flops_per_token(24) == 6 * N + 12 * 2 * 32 * 24  # nanoGPT's 6N + 12 L C T
    N = sum(p.numel() for n, p in model.named_parameters() if "wpe" not in n and ".mix." not in n)
    maps = 24 * (2 * 8 + 4 * 4 * 4 + 4 * 2 * 4 + 2 * 32)  # QK^T, op1 (4 qk-heads, rank 4), op2 (2 heads), AV
    assert model.flops_per_token(24) == 6 * N + 3 * 2 * maps


def run_bench(*args, timeout=300):
    """bench.py with tiny sizes in a subprocess; returns its stdout after checking it exited 0."""
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "bench.py", "--n_embd=32", "--model_layers=1", "--model_embd=32",
                        "--model_heads=2", "--model_T=16", "--repeats=1", "--warmup=0", "--batch_size=1", *args],
                       cwd=repo, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_bench_runs_end_to_end():
    out = run_bench("--T_list=16,32", "--n_layer=1", "--decode_T=32", "--decode_tokens=2")
    for title in ("one attention layer", "training step of the whole model", "decoding at a 32-token context"):
        assert title in out
    assert out.count("| 32 | hyperglu |") == 1 and "| hypermlp | mhc |" in out and "| softmax | plain |" in out
    assert "| softmax | plain |" in out and "1.00x" in out


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile on CPU needs a C compiler")
def test_bench_compile_runs():
    """--compile=True times compiled layers and models (warm-up rounds absorb the compiles)."""
    out = run_bench("--sections=layer,model", "--attns=softmax", "--residuals=plain,hc", "--T_list=16",
                    "--compile=True", timeout=600)
    assert ", torch.compile" in out.splitlines()[0]
    assert "| 16 | softmax |" in out and "| softmax | hc |" in out
