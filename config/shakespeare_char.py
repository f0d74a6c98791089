# nanoGPT's "baby GPT" on tiny Shakespeare characters: the softmax baseline (val 1.4697 in nanoGPT,
# about 3 minutes on an A100). Prepare: python data/shakespeare_char/prepare.py
# Variants are overlays: python train.py config/shakespeare_char.py config/hyperglu.py config/mhc.py
# CPU: python train.py config/shakespeare_char.py --device=cpu --n_layer=4 --n_head=4 --n_embd=128 \
#      --block_size=64 --batch_size=12 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
out_dir = "out/shakespeare_char"
dataset = "shakespeare_char"
eval_interval = 250
eval_iters = 200            # the whole val split (435 windows of 256)
log_interval = 10
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
bias = False
learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
