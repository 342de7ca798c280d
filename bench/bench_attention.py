"""Where each attention path is faster: PyTorch's fused kernel against the explicit softmax, forward
and backward, for the shapes that training and decoding give.

    python bench/bench_attention.py                     # the CPU table in bf16 and float32
    python bench/bench_attention.py --device cuda --dtypes bfloat16

Each row times one causal self-attention call with its backward (training: queries, keys and values
of T tokens) or one new query against T cached keys (decoding, no backward), as transformer.py's
CausalSelfAttention computes them, best of --repeats after a warm-up call. What it measured decides
transformer.explicit_is_faster, the rule that attention="auto" follows on a CPU
(docs/benchmarks.md has the table and the machine).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench_infer import best_time  # noqa: E402
from transformer import attend  # noqa: E402

# (batch, heads, tokens, head width): the quickstart (heads of 64; of 32 before), `small`, gpt2, and longer
# contexts of `small`
TRAINING_SHAPES = [(16, 4, 128, 64), (16, 4, 128, 32), (8, 6, 256, 64), (16, 4, 256, 32), (8, 6, 512, 64),
                   (4, 6, 1024, 64), (1, 12, 1024, 64), (2, 12, 2048, 64)]
DECODING_SHAPES = [(1, 12, 64, 64), (1, 12, 512, 64), (1, 12, 1024, 64), (1, 16, 4096, 128)]


def time_attention(path, shape, dtype, device, decoding, repeats):
    """Seconds of one call of `path` ("sdpa" or "manual"), with its backward unless decoding."""
    B, nh, T, hs = shape
    generator = torch.Generator(device=device).manual_seed(0)
    queries = 1 if decoding else T
    q = torch.randn(B, nh, queries, hs, device=device, dtype=dtype, generator=generator, requires_grad=not decoding)
    k, v = (torch.randn(B, nh, T, hs, device=device, dtype=dtype, generator=generator, requires_grad=not decoding)
            for _ in range(2))
    past = T - queries

    def call():
        y = attend(q, k, v, past, None, 0.0, explicit=path == "manual")
        if not decoding:
            y.sum().backward()

    with torch.no_grad() if decoding else torch.enable_grad():
        call()  # warms the kernels up
        return best_time(call, repeats, device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| call | B x nh x T x hs | dtype | fused kernel ms | explicit ms | explicit / fused |")
    print("|---|---|---|---|---|---|")
    for decoding, shapes in ((False, TRAINING_SHAPES), (True, DECODING_SHAPES)):
        for shape in shapes:
            for name in args.dtypes.split(","):
                dtype = getattr(torch, name)
                fused, explicit = (time_attention(p, shape, dtype, device, decoding, args.repeats)
                                   for p in ("sdpa", "manual"))
                kind = "decode 1 token" if decoding else "train fwd+bwd"
                print(f"| {kind} | {' x '.join(map(str, shape))} | {name} | {fused * 1e3:.2f} | {explicit * 1e3:.2f} "
                      f"| {explicit / fused:.2f} |", flush=True)


if __name__ == "__main__":
    main()
