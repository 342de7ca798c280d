"""Draws assets/architecture.png: GPT-2 as transformer.py builds it, with the names of its modules.

    python assets/draw_architecture.py
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
COLORS = {"embed": "#cfe2f3", "norm": "#fff2cc", "attn": "#f4cccc", "mlp": "#d9ead3", "head": "#d9d2e9",
          "io": "#eeeeee"}


def box(ax, x, y, w, h, text, color, note=None, size=10):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=color, ec="#333333", lw=1.2))
    ax.text(x, y, text, ha="center", va="center", fontsize=size)
    if note:
        ax.text(x + w / 2 + 0.15, y, note, ha="left", va="center", fontsize=8.5, color="#444444", family="monospace")


def arrow(ax, start, end, **kwargs):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, lw=1.2, color="#333333", **kwargs))


def main():
    fig, ax = plt.subplots(figsize=(9, 12.5))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 15)
    ax.axis("off")
    cx, w = 3.6, 3.4

    box(ax, cx, 0.6, w, 0.6, "token ids  (B, T)", COLORS["io"], "tiktoken GPT-2 BPE, 50257 tokens")
    box(ax, cx - 0.95, 1.7, 1.5, 0.6, "token\nembedding", COLORS["embed"], None, 9)
    box(ax, cx + 0.95, 1.7, 1.5, 0.6, "position\nembedding", COLORS["embed"], None, 9)
    ax.text(cx + w / 2 + 0.15, 1.7, "transformer.wte (V x C), transformer.wpe (block_size x C)", fontsize=8.5,
            color="#444444", family="monospace", va="center")
    box(ax, cx, 2.7, 0.5, 0.5, "+", COLORS["io"], "sum, then dropout  (B, T, C)", 12)
    arrow(ax, (cx, 0.9), (cx - 0.95, 1.4))
    arrow(ax, (cx, 0.9), (cx + 0.95, 1.4))
    arrow(ax, (cx - 0.95, 2.0), (cx - 0.2, 2.55))
    arrow(ax, (cx + 0.95, 2.0), (cx + 0.2, 2.55))

    # One transformer block, drawn once and repeated n_layer times.
    top, bottom = 9.6, 3.3
    ax.add_patch(FancyBboxPatch((cx - 2.6, bottom), 12.3 - cx, top - bottom, boxstyle="round,pad=0.05",
                                fc="none", ec="#777777", lw=1.2, ls="--"))
    ax.text(cx - 2.5, top - 0.25, "Block  x n_layer  (transformer.h.N)", fontsize=10, weight="bold")
    stream = cx - 1.9  # the residual stream runs up the left side
    ax.plot([stream, stream], [2.7, top + 0.2], color="#1f4e79", lw=2.5)
    ax.plot([stream, cx - 0.25], [2.7, 2.7], color="#1f4e79", lw=2.5)  # the embeddings' sum enters it
    ax.text(stream - 0.15, 3.6, "residual stream", rotation=90, color="#1f4e79", fontsize=9, ha="right")

    box(ax, cx, 4.0, w - 0.6, 0.5, "LayerNorm", COLORS["norm"], "ln_1")
    box(ax, cx, 5.1, w - 0.6, 1.0, "causal multi-head\nself-attention", COLORS["attn"],
        "attn.c_attn: x -> q, k, v  (3C)\nsplit into nh heads of hs = C / nh\nsoftmax(q k^T / sqrt(hs) + causal mask) v\nattn.c_proj: heads -> C")
    box(ax, stream, 6.0, 0.45, 0.45, "+", COLORS["io"], None, 12)
    box(ax, cx, 7.0, w - 0.6, 0.5, "LayerNorm", COLORS["norm"], "ln_2")
    box(ax, cx, 8.2, w - 0.6, 1.0, "MLP\nC -> 4C -> GELU -> C", COLORS["mlp"], "mlp.c_fc, tanh-GELU, mlp.c_proj")
    box(ax, stream, 9.1, 0.45, 0.45, "+", COLORS["io"], None, 12)
    arrow(ax, (stream, 3.6), (cx - 1.4, 4.0))
    arrow(ax, (cx, 4.25), (cx, 4.6))
    arrow(ax, (cx - 1.4, 5.1), (stream + 0.23, 6.0))
    arrow(ax, (stream, 6.6), (cx - 1.4, 7.0))
    arrow(ax, (cx, 7.25), (cx, 7.7))
    arrow(ax, (cx - 1.4, 8.2), (stream + 0.23, 9.1))

    box(ax, cx, 10.5, w, 0.5, "LayerNorm", COLORS["norm"], "transformer.ln_f")
    box(ax, cx, 11.5, w, 0.6, "language-model head", COLORS["head"], "lm_head: C -> V, weight tied to wte")
    box(ax, cx, 12.5, w, 0.5, "logits  (B, T, V)", COLORS["io"], "softmax -> next-token probabilities")
    box(ax, cx, 13.4, w, 0.5, "cross-entropy with targets", COLORS["io"], "training: targets = ids shifted by one")
    arrow(ax, (stream, top + 0.2), (cx - 1.0, 10.25))
    arrow(ax, (cx, 10.75), (cx, 11.2))
    arrow(ax, (cx, 11.8), (cx, 12.25))
    arrow(ax, (cx, 12.75), (cx, 13.15))

    ax.text(0.1, 14.9, "GPT-2 as built by transformer.py", fontsize=14, weight="bold", va="top")
    ax.text(0.1, 14.4, "gpt2 preset: n_layer L = 12, n_head nh = 12, width C = 768, context T <= 1024, "
            "V = 50304 rows (50257 real tokens)", fontsize=9, va="top")
    fig.savefig(os.path.join(HERE, "architecture.png"), dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
