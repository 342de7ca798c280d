"""Draws assets/gpt2_vs_today.png: GPT-2's block beside today's (--arch qwen3), each piece that differs
outlined, with the names transformer.py gives them.

    python assets/draw_blocks.py
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
COLORS = {"embed": "#cfe2f3", "norm": "#fff2cc", "attn": "#f4cccc", "mlp": "#d9ead3", "head": "#d9d2e9",
          "io": "#eeeeee"}
CHANGED = "#c0392b"

# Bottom to top: (y, height, text, color, note, changed in today's block)
GPT2 = [
    (0.6, 0.6, "token ids", "io", "", False),
    (1.7, 0.8, "token embedding wte\n+ position table wpe", "embed", "learned, one row per position", False),
    (3.2, 0.6, "LayerNorm  ln_1", "norm", "(x - mean) / std * g + b", False),
    (4.6, 1.4, "causal self-attention\nq, k, v = c_attn(x): nh heads each\nsoftmax(q k^T / sqrt(hs)) v\nc_proj",
     "attn", "", False),
    (6.2, 0.6, "LayerNorm  ln_2", "norm", "", False),
    (7.4, 1.0, "MLP\nC -> 4C -> GELU -> C", "mlp", "c_fc, c_proj, with biases", False),
    (8.9, 0.6, "LayerNorm  ln_f", "norm", "", False),
    (10.0, 0.8, "head = wte (tied)\nlogits (B, T, V)", "head", "", False),
]
TODAY = [
    (0.6, 0.6, "token ids", "io", "", False),
    (1.7, 0.8, "token embedding wte\n(no position table)", "embed", "positions enter in attention", True),
    (3.2, 0.6, "RMSNorm  ln_1", "norm", "x / rms(x) * g, in float32", True),
    (4.6, 1.4, "causal self-attention\nq: nh heads, k, v: nkv <= nh heads\nRMSNorm q, k per head; rotate\n"
     "q, k by position; softmax; c_proj", "attn", "GQA, QK-norm, rotary", True),
    (6.2, 0.6, "RMSNorm  ln_2", "norm", "", True),
    (7.4, 1.0, "gated MLP (SwiGLU)\nSiLU(gate) * up -> down", "mlp", "c_fc = [gate; up], no biases", True),
    (8.9, 0.6, "RMSNorm  ln_f", "norm", "", True),
    (10.0, 0.8, "head: tied to wte\nor its own (untied)", "head", "", True),
]


def arrow(ax, start, end):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=11, lw=1.1, color="#333333"))


def column(ax, cx, rows, title):
    w = 3.3
    ax.text(cx, 11.1, title, ha="center", fontsize=12, weight="bold")
    ax.add_patch(FancyBboxPatch((cx - w / 2 - 0.25, 2.6), w + 0.5, 5.55, boxstyle="round,pad=0.05", fc="none",
                                ec="#777777", lw=1.1, ls="--"))
    ax.text(cx - w / 2 - 0.15, 8.0, "block x n_layer", fontsize=8.5, color="#555555")
    previous = None
    for y, h, text, color, note, changed in rows:
        ax.add_patch(FancyBboxPatch((cx - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    fc=COLORS[color], ec=CHANGED if changed else "#333333", lw=2.4 if changed else 1.1))
        ax.text(cx, y, text, ha="center", va="center", fontsize=8.3)
        if note:  # beside the arrow that enters the box
            ax.text(cx + 0.12, y - h / 2 - 0.08, note, ha="left", va="top", fontsize=7.2, style="italic",
                    color=CHANGED if changed else "#555555")
        if previous is not None:
            arrow(ax, (cx, previous), (cx, y - h / 2))
        previous = y + h / 2
    for y in (5.6, 8.1):  # the residual additions after each branch
        ax.text(cx - w / 2 - 0.1, y, "x + branch(x)", fontsize=7.5, color="#1f4e79", ha="right")


def main():
    fig, ax = plt.subplots(figsize=(10.5, 8.4))
    ax.set_xlim(-0.5, 10)
    ax.set_ylim(0, 11.5)
    ax.axis("off")
    column(ax, 2.4, GPT2, "GPT-2 (2019): --arch gpt2")
    column(ax, 7.4, TODAY, "today's block: --arch qwen3")
    ax.text(5.0, 0.05, "outlined in red: the pieces that differ (transformer.py: RMSNorm, RotaryPositions, q_norm/k_norm, "
            "GatedMLP, n_kv_head, bias=False, tie_embeddings)", ha="center", fontsize=7.5, color=CHANGED)
    fig.savefig(os.path.join(HERE, "gpt2_vs_today.png"), dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
