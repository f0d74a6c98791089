"""
Speed and memory of every attention x residual, as ratios against the softmax / plain baseline of the same run.

$ python bench.py                                           # small CPU defaults, under 3 minutes on 2 cores
$ python bench.py --sections=layer --T_list=1024,2048       # one layer at longer contexts
$ HYPERGLU_FUSED=0 python bench.py --sections=layer         # HyperGLU's fast path without its C++ CPU kernel
$ python bench.py --impl=reference                          # model.py's reference forms instead of ops/
$ python bench.py --device=cuda --dtype=bfloat16 --compile=True --batch_size=8 --T_list=1024,2048 \\
      --n_embd=768 --n_head=12 --n_layer=12 --decode_T=1024 \\
      --model_layers=12 --model_embd=768 --model_heads=12 --model_T=1024  # 124M scale on a GPU

Sections:
  core    the attention core (everything between the projections and c_proj), forward + backward: SDPA (flash on a
          GPU) with n_head heads, and on a GPU the cost model's flash baseline (scripts/flash_baseline.py), against
          HyperGLU's op (ops.hyperglu.attend) with hyper_heads heads at the ranks match_budget gives a model of this
          width, in the form ops.dispatch picks (the Triton kernels on a GPU) and in the chunked torch form;
          ms, peak memory, TFLOP/s.
  layer   one attention layer, forward + backward: ms, and memory. Memory is the bytes of the unique storages
          autograd saves for backward on CPU (saved_tensors_hooks), torch.cuda.max_memory_allocated on GPU.
          Softmax is causal SDPA with n_head heads; HyperGLU / HyperMLP use hyper_heads heads.
  model   a whole training step (forward, backward, AdamW) of the GPT for every attn x residual: ms per step,
          ms per layer, tokens/s, memory, MFU on GPU. HyperGLU / HyperMLP are budget matched to softmax.
  decode  ms per generated token at a decode_T-token context, with the KV cache and with full recompute.
compile=True runs the layers and models through torch.compile (as train.py does on CUDA) for the timings and the GPU
memory; CPU memory is counted on the eager modules (saved-tensor hooks do not see inside compiled graphs), and
decoding stays eager. Each time is the median of `repeats` rounds after `warmup` rounds (at least two with
compile); in each round every variant of a table runs once in turn, and a ratio is the median of the per-round
ratios. On a GPU, CUDA events time the work, and SDPA is pinned to flash (--sdpa=any lets torch choose).
--json and --md files are rewritten as each row is measured (earlier rounds' medians stand in until a row is final),
so a run that is killed keeps what it measured. Absolute times on a shared machine are noise;
read the ratio columns, which compare measurements taken side by side.
"""

import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import replace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import ops.dispatch
import ops.hyperglu_cpu
from config.budget import match_budget
from configurator import configure, pick_device
from diagnostics import peak_flops
from model import GPT, CausalSelfAttention, GPTConfig, HyperGLU, KVCache

# -----------------------------------------------------------------------------
sections = "layer,model,decode"  # and "core" (the attention core alone)
device = None                # None = cuda, else mps, else cpu
dtype = "float32"            # "float32" | "bfloat16" (autocast, fp32 parameters)
threads = 2                  # torch threads on CPU (0 = leave as is)
batch_size = 4
n_embd = 256                 # layer and decode width
n_head = 4                   # softmax heads
hyper_heads = 2              # HyperGLU / HyperMLP heads, as the paper
T_list = "256,1024"          # layer section sequence lengths
attns = "softmax,hyperglu,hypermlp"
residuals = "plain,hc,mhc"
model_layers = 6             # model section: a small model at which HC/mHC overheads show (6 x 384, T=256)
model_embd = 384
model_heads = 6
model_T = 256
n_layer = 6                  # decode section model depth
decode_T = 1024              # context length for decode timing
decode_tokens = 8            # tokens timed per decode measurement
warmup = 1
compile = False              # torch.compile layers and models (timings, GPU memory)
compile_mode = "default"     # torch.compile's mode: "reduce-overhead" adds CUDA graphs
impl = "fast"                # "fast" (ops/) | "reference" (model.py alone), as GPTConfig.impl
repeats = 7
json = ""                    # also write the tables to this JSON file, rewritten after every measured row
md = ""                      # and as markdown to this file, likewise (a run cut short keeps what it measured)
sdpa = "flash"               # on CUDA: "flash" pins SDPA to FlashAttention (bf16/fp16), "any" lets torch choose
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))]
dev = ctx = gpu = mem_name = backend = None  # set by main(): device type, autocast, device name, SDPA backend
tables = []


def matched(base, attn):
    """base with attn, budget matched when possible (tiny test shapes cannot be: then it says so)."""
    if attn == "softmax":
        return base
    try:
        return match_budget(base, attn=attn, n_head=hyper_heads)
    except ValueError as e:
        print(f"note: {attn} is not budget matched at this size: {str(e).split(';')[0]}")
        return replace(base, attn=attn, n_head=hyper_heads)


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


def clock():
    """Start timing GPU work: a recorded CUDA event on a GPU (the time the GPU took, without the launch latency of
    a host timer), the host clock elsewhere. elapsed(clock()) gives seconds."""
    if dev == "cuda":
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e
    return time.perf_counter()


def elapsed(t0):
    if dev == "cuda":
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        e.synchronize()
        return t0.elapsed_time(e) / 1e3
    return time.perf_counter() - t0


def timed(fns, report=None):
    """Median seconds of each fn, and the median of its per-round ratio to fns[0]. The fns take turns
    (`warmup` rounds, then `repeats` timed rounds), so a slow spell on a shared machine hits all of them.
    report(secs, ratios, rounds) after every timed round: the medians so far, for rows written as they come."""
    for _ in range(max(warmup, 2 if compile else 0)):  # the first calls compile (and may recompile once)
        for fn in fns:
            fn()
    ts = [[] for _ in fns]
    for i in range(repeats):
        for fn, t in zip(fns, ts):
            sync()
            t0 = clock()
            fn()
            t.append(elapsed(t0))
        ratios = [statistics.median(a / b for a, b in zip(t, ts[0])) for t in ts]
        if report and i + 1 < repeats:
            report([statistics.median(t) for t in ts], ratios, i + 1)
    return [statistics.median(t) for t in ts], ratios


def saved_bytes(fn):
    """Bytes of the unique storages autograd saves for backward while fn runs (saved_tensors_hooks)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def memory(fn):
    """Bytes: saved-for-backward storages on CPU, peak allocated on GPU."""
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - base
    return saved_bytes(fn)


def table(title, cols):
    """A new table, printed and saved row by row with put()."""
    t = dict(title=title, columns=cols, rows=[], partial=[])
    tables.append(t)
    print(f"\n### {title}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    sys.stdout.flush()
    return t


def put(t, rows, rounds=None):
    """rows measured for table t: final ones (rounds None) are printed and kept; partial ones (the medians after
    `rounds` of `repeats` timed rounds) replace the table's earlier partial rows. Either way the json and md files
    are rewritten at once, so a run that is killed keeps every row measured so far."""
    if rounds is None:
        t["rows"] += rows
        t["partial"] = []
        for r in rows:
            print("| " + " | ".join(r) + " |")
        sys.stdout.flush()
    else:
        t["partial"] = [r + [f"({rounds} of {repeats} rounds)"] for r in rows]
    if json:
        import json as json_
        write(json, lambda f: json_.dump(dict(device=gpu, dtype=dtype, torch=torch.__version__, impl=impl,
                                              compile=compile, sdpa=backend, argv=sys.argv[1:], tables=tables), f,
                                         indent=1))
    if md:
        def markdown(f):
            f.write(f"bench on {gpu}, {dtype}, torch {torch.__version__}, impl={impl}, SDPA {backend}\n")
            for t in tables:
                f.write(f"\n### {t['title']}\n\n| " + " | ".join(t["columns"]) + " |\n|" + "---|" * len(t["columns"])
                        + "\n")
                f.writelines("| " + " | ".join(r) + " |\n" for r in t["rows"] + t["partial"])
        write(md, markdown)


def write(path, fill):
    """fill(f) into path through a temp file and a rename: a reader (or a kill) never sees half a file."""
    with open(f"{path}.tmp", "w") as f:
        fill(f)
    os.replace(f"{path}.tmp", path)


def core():
    """The attention core, forward + backward: SDPA, the cost model's flash baseline (scripts/flash_baseline.py, on
    CUDA), and ops.hyperglu.attend in the form ops.dispatch picks (the Triton kernels on a GPU) and in the chunked
    torch form ("rows", what HYPERGLU_TRITON=0 runs)."""
    import torch.nn.functional as F

    import ops.hyperglu
    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    peak = peak_flops(device)
    t = table(f"attention core, forward + backward (B={batch_size}, width {n_embd}, {dtype}; softmax {n_head} heads, "
              f"hyperglu {hyper_heads} heads, budget matched)",
              ["T", "attn", "ms", "time vs softmax", mem_name, "memory vs softmax", "TFLOP/s", "MFU"])
    for T in [int(t) for t in T_list.split(",")]:
        base = GPTConfig(n_layer=model_layers, n_head=n_head, n_embd=n_embd, block_size=T, bias=False)
        hcfg = matched(base, "hyperglu")
        H1, h, r1, r2, qk = 2 * hyper_heads, hyper_heads, hcfg.op1_rank, hcfg.op2_rank, hcfg.widths()[0]
        rnd = lambda *shape, scale=1.0: (torch.randn(*shape, device=device) * scale).to(dt).requires_grad_()
        hd = n_embd // n_head
        soft = [rnd(batch_size, n_head, T, hd) for _ in range(3)]
        hyper = [rnd(batch_size, H1, T, qk // H1), rnd(batch_size, H1, T, qk // H1),
                 rnd(batch_size, h, T, n_embd // h), torch.rand(batch_size, H1, T, r1, device=device).to(dt),
                 torch.rand(batch_size, h, T, r2, device=device).to(dt)]
        params = [torch.randn(H1, T, r1, device=device) * 0.02, torch.randn(H1, r1, T, device=device) * 0.02,
                  torch.zeros(H1, T, device=device), torch.randn(h, T, r2, device=device) * 0.02,
                  torch.randn(h, r2, T, device=device) * 0.02, torch.zeros(h, T, device=device)]
        params = [p.requires_grad_() for p in params]
        mixers = (*params[:3], True), (*params[3:], True)  # (U, Vt, d, shortcut) of op1 and op2

        def sdpa():
            y = F.scaled_dot_product_attention(*soft, is_causal=True)
            y.backward(torch.ones_like(y))

        def flash():
            y = flash_baseline.attention(*soft)
            y.backward(torch.ones_like(y))

        def hyperglu(form):
            y = ops.hyperglu.attend(*hyper, *mixers, glu=True, norm=True, eps=hcfg.norm_eps, form=form)
            y.backward(torch.ones_like(y))
        form = ops.dispatch.hyperglu("fast", hyper[0], *mixers, True, (True, True, True))
        names, fns = [f"softmax (SDPA, {backend})"], [sdpa]
        if dev == "cuda" and ops.dispatch.triton_module("hyperglu_triton") is not None:
            from scripts import flash_baseline
            names.append("softmax (flash_baseline.py)")
            fns.append(flash)
        names.append(f"hyperglu ({form})")
        fns.append(lambda: hyperglu(form))
        if form != "rows":
            names.append("hyperglu (rows: chunked torch)")
            fns.append(lambda: hyperglu("rows"))
        # forward FLOPs of the score maps as GPT.flops_per_token counts them (full rows), times 3 for fwd + bwd
        flops = [4 * T * n_embd if n.startswith("softmax") else T * (2 * qk + 4 * H1 * r1 + 4 * h * r2 + 2 * n_embd)
                 for n in names]

        def rows(secs, ratios, mbs):
            out = []
            for name, s, r, mb, f in zip(names, secs, ratios, mbs, flops):
                tflops = 3 * f * batch_size * T / s / 1e12
                out.append([str(T), name, f"{s * 1e3:.2f}", f"{r:.2f}x", "" if mb is None else f"{mb:.0f}",
                            "" if mb is None else f"{mb / mbs[0]:.2f}x", f"{tflops:.1f}",
                            f"{tflops * 1e12 / peak * 100:.1f}%" if peak else "n/a"])
            return out
        secs, ratios = timed(fns, lambda s, r, n: put(t, rows(s, r, [None] * len(fns)), n))
        put(t, rows(secs, ratios, [memory(fn) / 2 ** 20 for fn in fns]))
        soft = hyper = params = None  # freed before the next T


def layer():
    """One attention layer of each kind, forward + backward."""
    t = table(f"one attention layer, forward + backward (B={batch_size}, n_embd={n_embd}; softmax {n_head} heads, "
              f"hyper {hyper_heads} heads)", ["T", "attn", "ms", "time vs softmax", mem_name, "memory vs softmax"])
    for T in [int(t) for t in T_list.split(",")]:
        x = torch.randn(batch_size, T, n_embd, device=device, requires_grad=True)
        layers = []
        for attn in attns.split(","):
            if attn == "softmax":
                layer = CausalSelfAttention(GPTConfig(n_embd=n_embd, n_head=n_head, block_size=T, bias=False,
                                                      impl=impl))
            else:
                layer = HyperGLU(GPTConfig(attn=attn, n_embd=n_embd, n_head=hyper_heads, block_size=T, bias=False,
                                           impl=impl))
            layers.append(layer.to(device))

        def fwd(layer):
            with ctx:
                return layer(x)

        def step(layer):
            fwd(layer).float().sum().backward()

        def rows(secs, ratios, mbs):
            return [[str(T), attn, f"{s * 1e3:.1f}", f"{r:.2f}x", "" if mb is None else f"{mb:.1f}",
                     "" if mb is None else f"{mb / mbs[0]:.2f}x"]
                    for attn, s, r, mb in zip(attns.split(","), secs, ratios, mbs)]
        runs = [torch.compile(layer, mode=compile_mode) if compile else layer for layer in layers]
        secs, ratios = timed([lambda r=r: step(r) for r in runs], lambda s, r, n: put(t, rows(s, r, [None] * 9), n))
        mbs = [(memory(lambda: fwd(layer)) if dev != "cuda" else memory(lambda: step(r))) / 2 ** 20
               for layer, r in zip(layers, runs)]
        put(t, rows(secs, ratios, mbs))
        del layers


def model():
    """A training step (forward, backward, AdamW) of the whole GPT for every attn x residual."""
    t = table(f"training step of the whole model ({model_layers} x {model_embd}, T={model_T}, B={batch_size}; "
              f"HyperGLU/HyperMLP budget matched)",
              ["attn", "residual", "ms/step", "ms/layer", "tok/s", "time vs softmax/plain", mem_name,
               "memory vs softmax/plain", "MFU"])
    soft = GPTConfig(vocab_size=50304 if dev == "cuda" else 8192, block_size=model_T, n_layer=model_layers,
                     n_head=model_heads, n_embd=model_embd, bias=False, impl=impl)
    idx = torch.randint(0, soft.vocab_size, (batch_size, model_T), device=device)
    runs = []
    for attn in attns.split(","):
        for res in residuals.split(","):
            cfg = matched(soft, attn)
            model = GPT(replace(cfg, residual=res)).to(device)
            runs.append((attn, res, model, torch.optim.AdamW(model.parameters(), lr=1e-4)))
    runners = [torch.compile(model, mode=compile_mode) if compile else model for _, _, model, _ in runs]

    def step(model, opt):
        with ctx:
            _, loss = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fwd(model):
        with ctx:
            model(idx, idx)
    peak = peak_flops(device)

    def rows(secs, ratios, mbs):
        out = []
        for (attn, res, model, _), s, r, mb in zip(runs, secs, ratios, mbs):
            mfu = f"{model.flops_per_token(model_T) * batch_size * model_T / s / peak * 100:.1f}%" if peak else "n/a"
            out.append([attn, res, f"{s * 1e3:.0f}", f"{s * 1e3 / model_layers:.1f}",
                        f"{batch_size * model_T / s:,.0f}", f"{r:.2f}x", "" if mb is None else f"{mb:.0f}",
                        "" if mb is None else f"{mb / mbs[0]:.2f}x", mfu])
        return out
    secs, ratios = timed([lambda m=r, o=run[3]: step(m, o) for run, r in zip(runs, runners)],
                         lambda s, r, n: put(t, rows(s, r, [None] * len(runs)), n))
    mbs = [memory(lambda: fwd(model) if dev != "cuda" else step(r, opt)) / 2 ** 20
           for (_, _, model, opt), r in zip(runs, runners)]
    put(t, rows(secs, ratios, mbs))


def decode():
    """ms per generated token with the KV cache and with full recompute."""
    t = table(f"decoding at a {decode_T}-token context ({n_layer} x {n_embd}, batch 1)",
              ["attn", "ms/token, KV cache", "ms/token, full recompute", "speed-up"])
    base_cfg = GPTConfig(vocab_size=8192, block_size=decode_T, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                         bias=False, impl=impl)
    for attn in attns.split(","):
        cfg = matched(base_cfg, attn)
        model = GPT(cfg).to(device).eval()
        prompt = torch.randint(0, cfg.vocab_size, (1, decode_T - decode_tokens), device=device)

        @torch.no_grad()
        def cached():
            cache = KVCache(cfg.n_layer)
            with ctx:
                model(prompt, cache=cache)  # prefill, not timed below
                sync()
                t0 = clock()
                tok = prompt[:, -1:]
                for _ in range(decode_tokens):
                    logits, _ = model(tok, cache=cache)
                    tok = logits[:, -1].argmax(-1, keepdim=True)
                return elapsed(t0)

        @torch.no_grad()
        def full():
            seq = prompt
            sync()
            with ctx:
                t0 = clock()
                for _ in range(decode_tokens):
                    logits, _ = model(seq)
                    seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
                return elapsed(t0)
        cached()
        with_cache = statistics.median(cached() for _ in range(repeats)) / decode_tokens * 1e3
        without = statistics.median(full() for _ in range(repeats)) / decode_tokens * 1e3
        put(t, [[attn, f"{with_cache:.2f}", f"{without:.1f}", f"{without / with_cache:.1f}x"]])
        del model


SECTIONS = {"core": core, "layer": layer, "model": model, "decode": decode}


def main():
    global device, dev, ctx, gpu, mem_name, backend
    try:
        configure(globals(), config_keys, sys.argv[1:], {"device": str})
        device, dev = pick_device(device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    wanted = sections.split(",")
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        sys.exit(f"error: sections={sections!r}: unknown {sorted(unknown)}; expected core, layer, model, decode")
    if impl not in ("fast", "reference"):
        sys.exit(f"error: impl={impl!r} is not valid; expected 'fast' or 'reference'")
    if sdpa not in ("flash", "any"):
        sys.exit(f"error: sdpa={sdpa!r} is not valid; expected 'flash' or 'any'")
    pin = dev == "cuda" and sdpa == "flash"
    if pin and dtype not in ("bfloat16", "float16"):
        sys.exit(f"error: sdpa='flash' needs dtype bfloat16 or float16 on CUDA (got {dtype!r}); pass --sdpa=any")
    if dev == "cpu" and threads:
        torch.set_num_threads(threads)
    ctx = nullcontext() if dtype == "float32" else torch.autocast(dev, dtype=getattr(torch, dtype))
    torch.manual_seed(0)
    mem_name = "peak MiB" if dev == "cuda" else "saved MiB"
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    fused = dev == "cpu" and impl == "fast" and "HYPERGLU_FUSED" not in ops.dispatch.OFF and ops.hyperglu_cpu.load()
    backend = "flash, pinned" if pin else f"{dev}, torch's choice"
    print(f"bench on {gpu}, {dtype}, torch {torch.__version__}, impl={impl}, SDPA {backend}"
          + (f", {torch.get_num_threads()} threads, HyperGLU fused CPU kernel {'on' if fused else 'off'}"
             if dev == "cpu" else "") + (f", torch.compile (mode {compile_mode})" if compile else ""))
    for name in SECTIONS:  # in this order, whatever the order asked
        if name in wanted:
            # pinned, SDPA fails loudly where flash cannot run, instead of timing another kernel; decoding's prefill
            # against a cache needs a mask, which flash does not take
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if pin and name != "decode" else nullcontext():
                SECTIONS[name]()


if __name__ == "__main__":
    main()
