"""Memory per process of DDP and FSDP training, with and without activation checkpointing.

    python bench/bench_memory.py                                    # CPU: the small preset at 2 x 512
    python bench/bench_memory.py --device cuda --preset gpt2-medium --batch-size 4 --block-size 1024

Each row runs a few training steps (AdamW unless --optimizer says otherwise, random tokens) of the
real wrapping that gpt_train.py uses (wikigpt/runtime.py: DDP, or FSDP2's fully_shard per block),
under torchrun with 1 or 2 processes,
and reports for the first process the bytes of its parameters, gradients and optimizer state (local
shards under FSDP), its peak memory (on CUDA the allocator's peak; on a CPU the growth of the
process's peak resident memory over what it held before the model was built: Python, torch) and the
mean time of a step after the first. `--optimizer muon` measures what Muon costs under FSDP, where
each Newton-Schulz product gathers the rows it needs from the other processes.

    python bench/bench_memory.py --optimizer muon --processes 2 --modes fsdp --no-ac
"""

import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def local_bytes(tensors):
    """Bytes held by this process: a DTensor's local shard, or the whole tensor."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def child(args):
    """One measured run, in each torchrun process; the first prints a JSON row."""
    import torch

    from gpt_train import make_optimizers
    from transformer import GPT, config_from_preset
    from wikigpt.runtime import (Runtime, end_process, join_process_group, leave_process_group, process_device,
                                 torchrun_ranks, training_autocast_dtype, wrap_for_training)

    rank, local_rank, world_size = torchrun_ranks()
    device = process_device(args.device, local_rank, world_size)
    join_process_group(device, world_size, sharded=args.mode == "fsdp")
    run = Runtime(device, rank, world_size, training_autocast_dtype("auto", device), sharded=args.mode == "fsdp")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)
    model = GPT(config_from_preset(args.preset, args.arch, block_size=args.block_size)).to(device)
    model.fused_loss = device.type == "cpu"
    train_model, _ = wrap_for_training(model, run, compiled=False, activation_checkpointing=args.ac)
    optimizers = make_optimizers(model, name=args.optimizer, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95),
                                 device_type=device.type)
    x = torch.randint(0, 50257, (args.batch_size, args.block_size), device=device)
    grads, seconds = 0, []
    for _ in range(args.steps):
        started = run.clock()
        with run.autocast():
            loss = train_model(x, x)[1]
        loss.backward()
        grads = local_bytes(p.grad for p in model.parameters() if p.grad is not None)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds.append(run.clock() - started)
    state = local_bytes(v for o in optimizers for s in o.state.values() for v in s.values() if torch.is_tensor(v))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    if rank == 0:
        print(json.dumps({"params": local_bytes(model.parameters()), "grads": grads, "optimizer": state,
                          "peak_mib": peak,
                          "step_ms": 1000 * sum(seconds[1:]) / max(1, len(seconds) - 1)}))
    leave_process_group()
    end_process(0)  # as gpt_train.py ends: the group's threads must not meet Python's shutdown


def measure(args, mode, processes, ac):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               os.path.abspath(__file__), "--child", "--mode", mode, "--preset", args.preset, "--arch", args.arch,
               "--device", args.device, "--batch-size", str(args.batch_size), "--block-size", str(args.block_size),
               "--steps", str(args.steps),
               "--optimizer", args.optimizer]
    command += ["--ac"] if ac else []
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes))}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--arch", default="gpt2", help="the block: gpt2, qwen3, llama or arcee")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    parser.add_argument("--modes", default="ddp,fsdp", help="wrappings to measure: ddp, fsdp or both")
    parser.add_argument("--no-ac", action="store_true", help="leave out the rows with activation checkpointing")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--ac", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    mib = 2**20
    print(f"preset {args.preset}, block {args.arch}, batch {args.batch_size} x {args.block_size} per process, "
          f"{args.optimizer}, "
          f"device {args.device}")
    print("| wrapping | processes | activation checkpointing | parameters | gradients | optimizer state | "
          "peak (growth on CPU) | step |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        for processes in map(int, args.processes.split(",")):
            for ac in (False,) if args.no_ac else (False, True):
                row = measure(args, mode, processes, ac)
                print(f"| {mode.upper()} | {processes} | {'on' if ac else 'off'} | {row['params'] / mib:,.0f} MiB | "
                      f"{row['grads'] / mib:,.0f} MiB | {row['optimizer'] / mib:,.0f} MiB | {row['peak_mib']:,.0f} MiB | "
                      f"{row['step_ms']:,.0f} ms |",
                      flush=True)


if __name__ == "__main__":
    main()
