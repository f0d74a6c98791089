"""The whole model: impl="fast" (ops/) equals impl="reference" (model.py alone) for all 9 attention x residual
combinations, loss and every gradient, float64."""
import itertools

import pytest
import torch

from conftest import ATTNS, RESIDUALS, assert_close, randomize, tiny
from model import GPT


@pytest.mark.parametrize("attn,residual", list(itertools.product(ATTNS, RESIDUALS)))
def test_gpt_fast_equals_reference(attn, residual):
    """impl="fast" against impl="reference": the same weights give the same loss and every gradient, float64."""
    torch.manual_seed(0)
    ref = randomize(GPT(tiny(attn=attn, residual=residual, use_kv_conv=True, impl="reference")), 0.05).double()
    fast = GPT(tiny(attn=attn, residual=residual, use_kv_conv=True, impl="fast")).double()
    fast.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 61, (2, 24))
    losses, grads = [], []
    for model in (ref, fast):
        _, loss = model(idx, idx)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert abs(losses[0] - losses[1]) < 1e-12
    assert grads[0].keys() == grads[1].keys()
    assert_close(grads[1], grads[0], 1e-10)
