"""ops/conv.py against model.CausalConv1d's reference (F.conv1d)."""
import torch
import torch.nn.functional as F

import ops.conv


def test_shift_conv_equals_conv1d_and_passes_gradcheck():
    torch.manual_seed(0)
    xp = torch.randn(2, 9 + 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 1, 4, dtype=torch.float64, requires_grad=True)
    ref = F.conv1d(xp.transpose(1, 2), w, groups=5).transpose(1, 2)  # model.CausalConv1d's reference
    out = ops.conv.shift_conv(xp, w[:, 0])
    assert (out - ref).abs().max() < 1e-12
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, [xp, w], g), torch.autograd.grad(ref, [xp, w], g)):
        assert (a - b).abs().max() < 1e-12
    assert torch.autograd.gradcheck(ops.conv.shift_conv, (xp, w[:, 0]), atol=1e-9, rtol=1e-7)
