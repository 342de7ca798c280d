"""Tokens per second and MFU of the real training step: forward, backward, gradient clipping, optimizers.

    python bench/bench_train_step.py                         # CPU table: the quickstart's step, small, gpt2
    python bench/bench_train_step.py --preset mini --batch-size 16 --block-size 128 --vocab-size 16384 \
        --optimizer muon --dtypes bfloat16 --compile-modes eager --parts     # where the quickstart's step goes
    python bench/bench_train_step.py --device cuda --preset gpt2 --batch-size 16 --block-size 1024 \\
        --dtypes bfloat16 --compile-modes compiled           # one GPU, with MFU

Each row builds the model of transformer.py, runs --warmup steps (compilation happens there), then
times --steps steps with the device synchronised before each clock read. MFU is the achieved
FLOP/s (6N + 12LTC per token, transformer.GPT.flops_per_token) over the GPU's bf16 peak or, on a CPU,
over the rate of this CPU's own square matrix products in the row's dtype, measured once in the same
process (wikigpt/monitor.py, matmul_rate: the best of five products at each of 512, 1,024 and 2,048,
as gpt_train.py measures it for its log): how much of what the machine can multiply the step uses.
The CPU table's first row is the quickstart's step (mini, 16 x 128, its BPE of 16,384 ids, Muon);
--parts prints how long each phase of the timed steps took by the clock (forward with the loss,
backward, clipping, each optimizer; on CUDA the device is synchronised between phases, which costs
the row's tokens/s a little); --profile prints torch.profiler's operations instead. On a CPU
of few cores the profiler inflates some of PyTorch's parallel operations tenfold and more (the fused
loss's casts: 0.6-1.4 ms a call profiled, 0.06-0.12 by the clock on 2 cores of a Zen 4), so its
shares are a map, and the clock's phases the measure (docs/benchmarks.md).
"""

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from gpt_train import make_optimizers  # noqa: E402
from transformer import GPT, config_from_preset  # noqa: E402
from wikigpt.monitor import peak_flops  # noqa: E402
from wikigpt.runtime import pick_device, reuse_freed_memory  # noqa: E402

# (preset, batch, block, vocabulary, optimizer): the quickstart's step, then the sizes of the nanoGPT
# figures in docs/benchmarks.md (GPT-2's vocabulary, AdamW)
CPU_CASES = [("mini", 16, 128, 16384, "muon"), ("small", 8, 256, 50257, "adamw"), ("gpt2", 1, 1024, 50257, "adamw")]


def time_steps(preset, arch, batch_size, block_size, dtype, compiled, device, warmup, steps, optimizer="adamw",
               vocab_size=50257, profile=False, parts=False):
    """(tokens/s, MFU or None, peak memory GiB or None) of the training step; with `profile`, also prints
    torch.profiler's table of the timed steps, by operation (self CPU time); with `parts`, the median
    milliseconds of each phase of a step."""
    torch.manual_seed(0)
    rows = -(-vocab_size // 64) * 64  # one per id, padded to a multiple of 64 as gpt_train.py does
    config = config_from_preset(preset, arch, block_size=block_size, vocab_size=vocab_size, padded_vocab_size=rows,
                                eot_token=vocab_size - 1)
    model = GPT(config).to(device)
    model.fused_loss = device.type == "cpu" and not compiled  # as gpt_train.py chooses
    optimizers = make_optimizers(model, name=optimizer, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95),
                                 device_type=device.type, matmul_dtype=dtype)
    step_model = torch.compile(model) if compiled else model
    x = torch.randint(0, vocab_size, (batch_size, block_size), device=device)
    y = torch.randint(0, vocab_size, (batch_size, block_size), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    phases = {}  # phase -> seconds of each timed step, when `parts`

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def lap(phase, started):
        """With `parts`: records the time since `started` under `phase`; returns the clock now."""
        if not parts:
            return started
        sync()
        now = time.perf_counter()
        phases.setdefault(phase, []).append(now - started)
        return now

    def step():
        clock = time.perf_counter()  # the step before ended synchronised
        with autocast:
            _, loss = step_model(x, y)
        clock = lap("forward, head and loss", clock)
        loss.backward()
        clock = lap("backward", clock)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        clock = lap("gradient clipping", clock)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            clock = lap(type(optimizer).__name__, clock)

    for _ in range(warmup):
        step()
    sync()
    phases.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    profiler = torch.profiler.profile() if profile else contextlib.nullcontext()
    with profiler:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        seconds = time.perf_counter() - started
    if profile:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if parts:
        print(" | ".join(f"{phase} {sorted(times)[len(times) // 2] * 1e3:.1f} ms" for phase, times in phases.items()),
              "(medians)")
    tokens_per_s = batch_size * block_size * steps / seconds
    peak, _ = peak_flops(device, dtype)
    mfu = model.flops_per_token(block_size) * tokens_per_s / peak if peak else None
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return tokens_per_s, mfu, memory


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    parser.add_argument("--preset", help="one preset instead of the CPU table's cases")
    parser.add_argument("--archs", default="gpt2,qwen3", help="comma-separated blocks: gpt2, qwen3, llama, arcee")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=50257, help="with --preset: ids of the tokenizer")
    parser.add_argument("--optimizer", default="adamw", help="with --preset: adamw or muon")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table of each row's steps")
    parser.add_argument("--parts", action="store_true", help="print each phase's median time in each row's steps")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--compile-modes", default="eager,compiled", help="comma-separated: eager, compiled")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default malloc settings, which gpt_train.py changes on a CPU")
    args = parser.parse_args()

    device = pick_device(args.device)
    if device.type == "cpu" and not args.default_malloc:
        reuse_freed_memory()  # as gpt_train.py does
    cases = [(args.preset, args.batch_size, args.block_size, args.vocab_size, args.optimizer)] if args.preset else CPU_CASES
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"device: {name}, torch {torch.__version__}")
    print("| preset | block | batch x block | vocabulary, optimizer | dtype | mode | tokens/s | MFU | peak memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [(case, arch, dtype_name, mode) for case in cases for arch in args.archs.split(",")
            for dtype_name in args.dtypes.split(",") for mode in args.compile_modes.split(",")]
    for (preset, batch_size, block_size, vocab_size, optimizer), arch, dtype_name, mode in rows:
        tokens_per_s, mfu, memory = time_steps(preset, arch, batch_size, block_size, getattr(torch, dtype_name),
                                               mode == "compiled", device, args.warmup, args.steps, optimizer,
                                               vocab_size, args.profile, args.parts)
        print(f"| {preset} | {arch} | {batch_size} x {block_size} | {vocab_size:,}, {optimizer} | {dtype_name} | {mode} | "
              f"{tokens_per_s:,.0f} | "
              f"{f'{mfu:.1%}' if mfu is not None else '-'} | "
              f"{f'{memory:.1f} GiB' if memory is not None else '-'} |", flush=True)


if __name__ == "__main__":
    main()
