"""The static cost model (scripts/kernel_cost.py) and its flash-attention baseline (scripts/flash_baseline.py).

The baseline's kernels run under TRITON_INTERPRET=1 against SDPA. The cost model compiles for sm_90 (ptxas and
cuobjdump ship with triton), so it runs in a subprocess whose environment has no TRITON_INTERPRET; its SASS reading
is checked on hand-written SASS lines."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # before Triton decorates the kernels
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from conftest import REPO  # noqa: E402
from scripts import flash_baseline, kernel_cost  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test")
@pytest.mark.parametrize("cfg", [dict(fwd=(16, 16, 4, 1), kv=(16, 16, 4, 1), q=(16, 16, 4, 1)),
                                 dict(fwd=(32, 16, 4, 1), kv=(16, 32, 4, 1), q=(32, 16, 4, 1))])
@pytest.mark.parametrize("T", [1, 37, 70])
def test_flash_baseline_matches_sdpa(cfg, T):
    """Output and the three gradients against causal SDPA, float32, T not a multiple of the tiles."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 16, requires_grad=True) for _ in range(3))
    out = flash_baseline.attention(q, k, v, cfg)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    g = torch.randn_like(ref)
    assert (out - ref).abs().max() < 1e-5
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert (a - b).abs().max() < 1e-5


def test_plan_trip_counts_cover_every_pair():
    """The baseline's loop trip counts: below-diagonal blocks plus diagonal blocks tile exactly the causal triangle
    (every key block at or left of each row block's end), for several T and tiles."""
    for T in (1, 63, 64, 65, 1000):
        for BM, BN in ((64, 64), (64, 32), (128, 64)):
            n_rows = -(-T // BM)
            want = sum(-(-min(rb * BM + BM, T) // BN) for rb in range(n_rows))
            assert flash_baseline._below(T, BM, BN) + flash_baseline._diagonal(T, BM, BN) == want


def test_sass_reading():
    """Classes, bytes, MMA FLOPs and loops from SASS lines as cuobjdump prints them."""
    assert kernel_cost.classify("HGMMA") == "tensor" and kernel_cost.classify("HMMA") == "tensor"
    assert kernel_cost.classify("MUFU") == "mufu" and kernel_cost.classify("FFMA") == "arith"
    assert kernel_cost.classify("LDG") == "global" and kernel_cost.classify("STL") == "global"
    assert kernel_cost.classify("LDSM") == "shared" and kernel_cost.classify("BAR") == "barrier"
    assert kernel_cost.classify("MOV") == "other" and kernel_cost.classify("S2R") == "other"
    assert kernel_cost.access_bytes("LDG.E.128 R4, desc[UR4][R2.64]") == 16
    assert kernel_cost.access_bytes("LDG.E.U16 R4, desc[UR4][R2.64]") == 2
    assert kernel_cost.access_bytes("STS [R3], R4") == 4
    # a warpgroup MMA runs once per warpgroup, mma.sync once per warp
    assert kernel_cost.mma_flops("HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], RZ", 8) == 2 * 64 * 64 * 16 * 2
    assert kernel_cost.mma_flops("HMMA.16816.F32.BF16 R4, R8, R12, R4", 4) == 2 * 16 * 8 * 16 * 4
    sass = [(0x00, "MOV R1, c[0x0][0x28]"), (0x10, "FFMA R2, R3, R4, R5"), (0x20, "@!P0 BRA 0x10"),
            (0x30, "FADD R2, R2, R3"), (0x40, "@P1 BRA 0x30"), (0x50, "EXIT"), (0x60, "BRA 0x60")]
    assert kernel_cost.loops_of(sass) == [(0x10, 0x20), (0x30, 0x40)]  # the trap after EXIT is not a loop


def test_bounds_pick_the_largest():
    n = dict(instr=4e6, mufu=0.0, l1_bytes=0.0, flops=1e9, hbm_bytes=1e6, store_bytes=0.0)
    t, bound = kernel_cost.estimate(n)
    assert bound == "issue" and t == pytest.approx(4e6 / (4 * 132 * 1.83e9))
    n["flops"] = 1e12
    assert kernel_cost.estimate(n) == (pytest.approx(1e12 / 989.4e12), "tensor")


def test_cost_model_writes_its_json(tmp_path):
    """The command line at one small shape: every HyperGLU and flash launch compiles for sm_90 with the plans'
    tiles, its loops match the plan's trip counts, and the JSON has the documented fields."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "cost.json"
    r = subprocess.run([sys.executable, "-m", "scripts.kernel_cost", "--T=128", "--B=1", f"--json={out}"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    (row,) = data["hyperglu"]
    assert row["T"] == 128 and row["B"] == 1 and row["bound"] in ("issue", "tensor", "memory")
    assert row["est_ms"] > 0 and row["flash_est_ms"] > 0
    assert row["ratio"] == pytest.approx(row["est_ms"] / row["flash_est_ms"])
    names = {k["name"] for k in data["kernels"]}
    assert {"_fwd_stats", "_fwd_out", "_bwd_keys", "_bwd_values", "_bwd_params", "_fwd", "_bwd_kv"} <= names
    for k in data["kernels"]:
        assert k["registers"] > 0 and k["stack_bytes"] >= 0 and k["shared_bytes"] > 0
    assert data["chunked"][0]["flops"] > 0 and data["chunked"][0]["bytes"] > 0
    assert [r["residual"] for r in data["streams"]] == ["hc", "mhc"]
    for site in data["streams"]:
        assert site["passes"] == pytest.approx(site["bytes_per_token_site"] / (site["n"] * site["C"] * 4))
        assert site["passes_beyond_plain"] < site["passes"] and site["est_step_overhead"] > 1
    assert "| 128 | 1 |" in r.stdout
