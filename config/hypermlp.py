# Overlay: HyperMLP attention (R-cg-q-12o, ReLU instead of the GLU split) at the budget of the softmax
# model configured before it, with 2 heads; everything else stays as configured.
# python train.py config/shakespeare_char.py config/hypermlp.py
# Size overrides go before this file (--n_embd=128 config/hypermlp.py): after it, train.py refuses them.
from config.budget import match_budget
from model import GPTConfig

_base = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias, pos=pos,
                  mlp=mlp, norm=norm, use_kv_conv=use_kv_conv)
_cfg = match_budget(_base, attn="hypermlp", n_head=2)
attn, n_head = "hypermlp", 2
qk_rank, op1_rank, op2_rank = _cfg.qk_rank, _cfg.op1_rank, _cfg.op2_rank
out_dir = out_dir + "-hypermlp"
