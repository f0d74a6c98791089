"""model.py's attention layers: HyperGLU / HyperMLP exactness (dense, chunked, l2 = out_scale, the lag layout,
decoding, RoPE), the official drop-in (config, state_dict layout), and softmax's options."""
import itertools

import pytest
import torch

from conftest import ATTNS, layer_cfg, randomize, run_layer, tiny
from hyperglu import HyperGLUConfig
from model import GPT, HyperGLU, KVCache, apply_rope


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


def test_out_scale_has_no_nan_in_half_precision():
    layer = HyperGLU(layer_cfg()).to(torch.bfloat16)
    x = torch.zeros(1, 8, 24, dtype=torch.bfloat16)  # all-zero rows: the norm clamp bites
    assert torch.isfinite(layer(x)).all()


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


def test_too_long_sequence_is_a_value_error():
    for attn in ATTNS:
        with pytest.raises(ValueError, match="block_size"):
            GPT(tiny(attn=attn))(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        HyperGLU(layer_cfg())(torch.zeros(1, 21, 24))


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
