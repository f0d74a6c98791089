# Quick start: a small HyperGLU + mHC model on the embedded corpus (the Python standard library's source,
# bytes), on a 2-core CPU in a few minutes. The data: python data/pystdlib/prepare.py (train.py runs it when missing)
out_dir = "out/quickstart"
dataset = "pystdlib"
attn = "hyperglu"
residual = "mhc"
n_layer = 4
n_head = 2
n_embd = 128
block_size = 128
qk_rank = 32
op1_rank = 8
op2_rank = 8
batch_size = 16
max_iters = 500
eval_interval = 100
eval_iters = 10
log_interval = 25
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
weight_decay = 0.1
beta2 = 0.99
device = "cpu"
