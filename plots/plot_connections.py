"""
The learned HC / mHC connections of a checkpoint, on one batch of its validation data.

$ python plots/plot_connections.py out/cpu/G-cg-q-12o_mHC-s1337/ckpt_last.pt --out=plots/results/cpu/connections

Left: one heatmap per residual site (attention, MLP, attention, ...), the token-averaged (n+1) x (n+1) matrix
[[0, H_post], [H_pre^T, H_res]] as in the HC paper's Eq. 1 (for HC: [[0, B], [A_m, A_r^T]]).
Right: the composite Amax gain of H_res over depth [mHC §3.1]: the max absolute row sum (forward) and column
sum (backward) of H_res_k ... H_res_1. mHC keeps both near 1; unconstrained HC can grow.
"""
import argparse
import math
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from checkpoint import load_checkpoint, load_model  # noqa: E402
from data.shards import val_batches  # noqa: E402
from diagnostics import amax_gain, connection_matrices  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--dataset", default="", help="data folder (default: the one the run trained on)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--out", default=os.path.join(REPO, "plots", "connections"))
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="load a checkpoint older than safe loading (a full unpickle: your own files only)")
    args = p.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.isfile(args.ckpt):
        sys.exit(f"error: checkpoint '{args.ckpt}' not found")
    try:
        state = load_checkpoint(args.ckpt, args.trust_checkpoint)
        model = load_model(state, args.ckpt).eval()
    except ValueError as e:
        sys.exit(f"error: {e}")
    if model.config.residual == "plain":
        sys.exit(f"error: {args.ckpt} uses the plain residual: there are no connection matrices to plot")
    cfg = model.config
    data = args.dataset or state["config"]["dataset"]
    if not os.path.isdir(data):
        data = os.path.join(REPO, "data", data)
    x, _ = next(val_batches(data, args.batch_size, cfg.block_size, 1))
    mats = connection_matrices(model, x)
    n = cfg.hc_streams
    fwd, bwd = amax_gain([res for _, _, res in mats])

    cols = min(8, len(mats))
    rows = math.ceil(len(mats) / cols)
    fig = plt.figure(figsize=(1.9 * cols + 4.5, 2.0 * rows + 0.6))
    grid = fig.add_gridspec(rows, cols + 3)
    vmax = max(max(t.abs().max().item() for t in m) for m in mats)
    for k, (pre, post, res) in enumerate(mats):
        full = torch.zeros(n + 1, n + 1)
        full[0, 1:], full[1:, 0], full[1:, 1:] = post, pre, res
        ax = fig.add_subplot(grid[k // cols, k % cols])
        im = ax.imshow(full.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(f"L{k // 2} {'attn' if k % 2 == 0 else 'mlp'}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=fig.axes, fraction=0.02, pad=0.01)
    ax = fig.add_subplot(grid[:, cols + 1:])
    ax.plot(range(1, len(fwd) + 1), fwd, marker="o", label="forward (max row sum)")
    ax.plot(range(1, len(bwd) + 1), bwd, marker="s", label="backward (max column sum)")
    ax.set_xlabel("residual site")
    ax.set_title("composite Amax gain")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"{dict(hc='HC', mhc='mHC')[cfg.residual]} x{n} connections, {os.path.basename(args.ckpt)} (step {state['step']})")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out + ".png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {args.out}.png: final composite Amax forward {fwd[-1]:.4f}, backward {bwd[-1]:.4f}")
    return fwd, bwd


if __name__ == "__main__":
    main()
