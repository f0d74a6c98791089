# Overlay: HyperGLU attention (the paper's G-cg-q-12o: GLU, KV conv, gates, QK compression, op1+op2, lag
# layout) at the parameter budget of the softmax model configured before it, with 2 heads as the paper.
# Everything else, position encoding included, stays as the base config has it.
# python train.py config/shakespeare_char.py config/hyperglu.py
# Size overrides go before this file (--n_embd=128 config/hyperglu.py): after it, train.py refuses them.
from config.budget import match_budget
from model import GPTConfig

_base = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias, pos=pos,
                  mlp=mlp, norm=norm, use_kv_conv=use_kv_conv)
_cfg = match_budget(_base, attn="hyperglu", n_head=2)
attn, n_head = "hyperglu", 2
qk_rank, op1_rank, op2_rank = _cfg.qk_rank, _cfg.op1_rank, _cfg.op2_rank
out_dir = out_dir + "-hyperglu"
