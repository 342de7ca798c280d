"""Where and how a process computes: the device, the dtypes, torchrun's process group, DDP or FSDP2
around the model, activation checkpointing, signals, memory reuse and a clock that waits for the device.

Used by gpt_train.py (all of it, through one Runtime object that the loop passes around instead of
a device, ranks and an autocast setting) and infer.py (the device and the weight dtype).
"""

import atexit
import ctypes
import ctypes.util
import functools
import os
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from wikigpt.cli import UsageError
from wikigpt.quantize import half_kernel_error

# ---- Devices and dtypes ----

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def check_dtype_name(name):
    """Refuses a --dtype that is neither 'auto' nor one of DTYPE_NAMES."""
    if name != "auto" and name not in DTYPE_NAMES:
        raise UsageError(f"--dtype must be auto, {', '.join(DTYPE_NAMES)}, got {name!r}")


def pick_device(requested):
    """A torch.device from 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', refusing what this machine lacks."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", requested):
        raise UsageError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: this machine has no CUDA GPU visible to PyTorch; use --device cpu")
    if requested.startswith("cuda:") and int(requested[5:]) >= torch.cuda.device_count():
        raise UsageError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: Apple's Metal backend is not available here; use --device cpu")
    return torch.device(requested)


def cpu_has_fast_bf16():
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and
    slower than float32. Linux reports it in /proc/cpuinfo; other systems get float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


# Two dtype decisions, side by side because they answer different questions. Training keeps float32
# weights and optimizer state and chooses only the dtype of the matrix products (autocast); inference
# stores the weights themselves in the chosen dtype, since decoding one token reads every weight once.


def training_autocast_dtype(requested, device):
    """The autocast dtype of training, or None for plain float32. auto: bf16 on CUDA where supported,
    else fp16; bf16 on CPUs with bf16 instructions, where a step runs about 1.8x faster than fp32
    (docs/benchmarks.md); fp32 on other CPUs and on MPS."""
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None
    if requested == "float16" and device.type != "cuda":
        raise UsageError("--dtype float16 needs a CUDA GPU (it relies on a gradient scaler); use bfloat16")
    return None if requested == "float32" else getattr(torch, requested)


def inference_weight_dtype(requested, device, quantize="none"):
    """The dtype of the weights for inference (with quantize="int8", of the activations and of all
    but the int8 matrices). Decoding is bound by how fast the weights are read, so 16-bit weights, half
    the bytes, should be twice as fast as float32; on CUDA bf16 is. On a CPU, PyTorch's bf16 kernel
    reads slowly (GPT-2 124M on a Zen 4 with AVX512-BF16: 15.7 GB/s where the memory gives 32; on a
    Sapphire Rapids 18 GB/s; without bf16 instructions bf16 is emulated), while fbgemm's float16
    kernel reads at the memory's own rate (28.8 GB/s on that Zen 4), so auto takes float16 weights
    there (float32 activations, wikigpt/quantize.py), and float32 where fbgemm is missing (ARM).
    PyTorch's int8 kernel is fast with bf16 activations only (GPT-2's int8 head in 4.1 ms with bf16
    ones, 24.8 with float32 ones on an AVX2 EPYC), so auto gives int8 bf16 activations.
    docs/benchmarks.md has the tables."""
    if requested == "auto":
        if quantize == "int8" or device.type == "cuda":
            return torch.bfloat16
        return torch.float16 if device.type == "cpu" and half_kernel_error() is None else torch.float32
    return getattr(torch, requested)


# ---- Processes: torchrun ----


def torchrun_ranks():
    """(rank, local rank, world size): from the variables torchrun sets, else a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def process_device(requested, local_rank, world_size):
    """This process's device: --device, where under torchrun each process takes the GPU of its local
    rank. CUDA's float32 matmuls may use TF32 tensor cores (what autocast leaves in float32)."""
    device = pick_device(requested)
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


joined_a_group = False  # by this process, at any time: see end_process


def join_process_group(device, world_size, sharded=False):
    """Joins the group of torchrun's processes (NCCL on CUDA, else gloo). A single process has none,
    unless its model is sharded: FSDP needs a group, here one of a single member."""
    global joined_a_group
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world_size > 1:
        dist.init_process_group(backend=backend)
    elif sharded:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    joined_a_group = joined_a_group or dist.is_initialized()  # stays True after leaving: the threads stay


def leave_process_group():
    if dist.is_initialized():
        dist.destroy_process_group()


def end_process(code):
    """Exits with status `code`. A process that was in a group runs Python's exit handlers, then leaves
    by os._exit, skipping the interpreter's own shutdown. The group's worker threads outlive
    destroy_process_group (DDP's reducer and DTensor's caches keep the group alive), and one that frees
    a tensor once that shutdown has begun is stopped mid-call, which aborts the process: a finished
    run's worker ended in SIGABRT after its last checkpoint this way, one time in many."""
    if not joined_a_group:
        sys.exit(code)
    atexit._run_exitfuncs()  # what exit would run first: trackers finishing, log handlers closing
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def wrap_for_training(model, run, *, compiled, activation_checkpointing):
    """(the model to train, the model to evaluate) around the plain GPT `model`.

    Unsharded: torch.compile if asked, then with several processes DDP, which averages gradients in
    the backward pass; evaluation needs no DDP. Sharded (--fsdp): FSDP2's fully_shard on each block,
    then on the whole model: each process keeps 1/N of every weight, gradient and optimizer state, and
    a block's weights are gathered just before it computes (forward and backward) and freed after.
    On GPUs the gathered weights are bf16 and gradients are reduced in float32. Every process must
    then take part in every forward pass, evaluation and samples included.
    """
    if activation_checkpointing:
        checkpoint_activations(model)
    if not run.sharded:
        compiled_model = torch.compile(model) if compiled else model
        if run.world_size == 1:
            return compiled_model, compiled_model
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(compiled_model, device_ids=device_ids), compiled_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for tensor in model.state_dict().values():  # rank 0's initial weights everywhere, as DDP starts
        dist.broadcast(tensor, src=0)
    mesh = init_device_mesh(run.device.type, (run.world_size,))
    on_gpu = run.device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if on_gpu else None, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        if compiled:
            block.compile()  # each block on its own: FSDP's hooks sit between them
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the rest: embeddings (tied to the head), ln_f
    return model, model


def checkpoint_activations(model):
    """Makes each block keep only its input in the forward pass and compute its activations again in
    the backward pass (non-reentrant torch.utils.checkpoint, dropout masks replayed): activation
    memory falls from all of every block's intermediates to one block's, for one more forward pass."""
    from torch.utils.checkpoint import checkpoint

    for block in model.transformer.h:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


@dataclass
class Runtime:
    """What the training loop needs to know about where it runs, as one value."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    autocast_dtype: torch.dtype | None = None  # None: plain float32
    accumulation: int = 1  # micro-batches per optimizer step, in each process
    sharded: bool = False  # FSDP: weights, gradients and optimizer state split over the processes

    @property
    def master(self):
        """The process that logs (and, without sharding, the only one that writes)."""
        return self.rank == 0

    @property
    def distributed(self):
        """Whether a process group exists: several processes, or a sharded model in one."""
        return self.world_size > 1 or self.sharded

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def inputs_and_targets(self, batch):
        """(inputs, targets) of a (B, T + 1) array of windows, on the device; through pinned memory on
        CUDA, so that the copy overlaps the computation."""
        tensor = torch.from_numpy(batch)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        else:
            tensor = tensor.to(self.device)
        return tensor[:, :-1], tensor[:, 1:]

    def gradient_sync(self, model, sync):
        """The context of a backward pass: gradients are reduced across processes only where `sync` is
        true (the last micro-batch of a step); the others accumulate locally. FSDP also keeps the
        gathered weights between those micro-batches instead of gathering them again."""
        if self.sharded:
            model.set_requires_gradient_sync(sync)
            model.set_reshard_after_backward(sync)
            return nullcontext()
        return nullcontext() if sync or self.world_size == 1 else model.no_sync()

    def clock(self):
        """perf_counter after the device has finished its queued work, so that a step's time is all of it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def sum_over_processes(self, tensor):
        """The tensor summed over all processes, in place (a no-op for one process)."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def max_over_processes(self, value):
        """The largest of an integer over all processes."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor(value, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def mean_over_processes(self, tensor):
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.AVG)
        return tensor

    def any_process(self, flag):
        """Whether `flag` is true in this process or any other: what every process must agree on."""
        if self.world_size == 1:
            return flag
        value = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value.item() > 0

    def gather_objects(self, value):
        """[value of rank 0, value of rank 1, ...], gathered in every process."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered


# ---- Signals, memory ----


class StopSignal:
    """Turns SIGTERM and SIGINT into a flag checked at step boundaries, so a pre-empted job saves a
    checkpoint and exits cleanly. Further signals only set the flag again: the save is not cut short."""

    def __init__(self):
        self.received = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def reuse_freed_memory():
    """Makes glibc's malloc keep large freed blocks for reuse instead of returning them to the kernel.

    By default every block over 32 MB gets its own mmap and is unmapped when freed, so each training
    step's big tensors (logits and their gradient, bf16 copies of the embedding, its gradient) start
    on fresh pages that the kernel must fault in and zero, about a gigabyte per step for gpt2.
    Served from the heap and never trimmed, the blocks freed by one step are reused by the next: the
    CPU step runs 6-30% faster in the runs of docs/benchmarks.md. The price is resident memory, which
    keeps what each phase of a run (steps, evaluation, checkpoints) has freed: 1.68 GiB instead of
    1.33 at the peak of a 560-step run of a width-256 model. --no-reuse-memory turns it off. Linux
    with glibc only; elsewhere nothing changes.
    """
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h
    if not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallopt", None)  # musl has none
    if mallopt is not None:
        mallopt(M_MMAP_MAX, 0)  # no block gets its own mapping...
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # ...and the heap's free top is not handed back
