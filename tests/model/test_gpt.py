"""model.py's GPT: every attention x residual combination trains and is causal, configs and their errors, older
files' model_args, mixed precision and torch.compile, decoding, surgery, budgets and FLOPs. The attention layers and
the residuals are test_attention.py and test_residuals.py; the fast paths of ops/ against this reference tests/ops/."""
import dataclasses
import itertools
import shutil

import pytest
import torch

import diagnostics
from checkpoint import load_checkpoint, upgrade
from config.budget import match_budget, param_report
from conftest import ATTNS, RESIDUALS, randomize, tiny
from model import GPT, GPTConfig, KVCache


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


def test_import_leaves_matmul_precision_alone():
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.parametrize("kw,field", [
    (dict(attn="linear"), "attn"), (dict(residual="post"), "residual"), (dict(pos="alibi"), "pos"),
    (dict(mlp="relu"), "mlp"), (dict(norm="batch"), "norm"), (dict(n_embd=30, n_head=4), "n_embd"),
    (dict(attn="hyperglu", qk_rank=6), "qk_rank"), (dict(hc_streams=0), "hc_streams"), (dict(dropout=1.5), "dropout"),
    (dict(hc_streams=8, hc_dynamic=False), "hc_streams=8, hc_dynamic=False"),
    (dict(residual="hc", mhc_iters=5), "mhc_iters"),
])
def test_gpt_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        tiny(**kw)


def test_config_from_older_checkpoints_drops_retired_fields():
    args = dict(vars(tiny(attn="hyperglu")), impl_default="recompute", aligner_impl_train="padview",
                aligner_impl_eval="padview", op1_per_head=True, op2_per_head=True)
    assert GPTConfig(**upgrade(args)) == tiny(attn="hyperglu")
    with pytest.raises(TypeError):
        GPTConfig(**upgrade(dict(args, not_a_field=1)))


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
    assert diagnostics.mfu(model, 1, 0.1) is None  # CPU: n/a, never a made-up number
    soft = GPT(tiny(qk_rank=None))  # nanoGPT's layer: Q/K width n_embd
    N = sum(p.numel() for n, p in soft.named_parameters() if "wpe" not in n)
    assert soft.flops_per_token(24) == 6 * N + 12 * 2 * 32 * 24  # nanoGPT's 6N + 12 L C T
    N = sum(p.numel() for n, p in model.named_parameters() if "wpe" not in n and ".mix." not in n)
    maps = 24 * (2 * 8 + 4 * 4 * 4 + 4 * 2 * 4 + 2 * 32)  # QK^T, op1 (4 qk-heads, rank 4), op2 (2 heads), AV
    assert model.flops_per_token(24) == 6 * N + 3 * 2 * maps
