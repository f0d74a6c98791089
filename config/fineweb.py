# GPT-2 124M on FineWeb, the nanoGPT / llm.c recipe with softmax attention: 12 x 768, 12 heads, T=1024,
# 524,288 tokens per step (16 x 1024 x 32 micro-steps), lr 6e-4 -> 6e-5 cosine, 18,865 steps (~10B tokens).
# gradient_accumulation_steps is global, so the same file trains the same model on 1 or 8 GPUs:
#   python train.py config/fineweb.py                                  # 1 GPU: 32 micro-steps per step
#   torchrun --standalone --nproc_per_node=8 train.py config/fineweb.py  # 8 GPUs: 4 micro-steps each
# Variants are overlays: config/fineweb.py config/hyperglu.py [config/mhc.py], config/fineweb.py config/mhc.py
# Prepare: python data/fineweb/prepare.py --num_shards=104  (all 10B tokens; 9 shards = 900M for a quick look)
# llm.c's 124M reaches about 3.29 val loss here; OpenAI's GPT-2 124M checkpoint scores 3.425 on this val set.
out_dir = "out/fineweb"
dataset = "fineweb"
data_order = "sequential"   # one pass over the token stream, as llm.c / modded-nanogpt
batch_size = 16
block_size = 1024
gradient_accumulation_steps = 32
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False
learning_rate = 6e-4
min_lr = 6e-5
max_iters = 18865
lr_decay_iters = 18865
warmup_iters = 700
weight_decay = 0.1
beta2 = 0.95
eval_interval = 250
eval_iters = 40             # the first 40 x 16 x 1024 = 655k val tokens, split over the ranks
log_interval = 10
