"""Trains the GPT-2 of transformer.py on the token shards of gpt_dataset.py.

    python gpt_train.py                                                         # the CPU quickstart, ~9 min
    python gpt_train.py --data data/wikipedia_en_20231101 --preset gpt2         # one GPU
    torchrun --nproc_per_node=8 gpt_train.py --data ... --preset gpt2           # eight GPUs
    python gpt_train.py ... --resume                                            # continue a run
    python gpt_train.py --data ... --init-from gpt2 --lr 1e-4                   # fine-tune OpenAI's GPT-2

main() reads as a table of contents: set-up, restore, then for each step maybe evaluate and save
a checkpoint, then one optimisation step (train_step: micro-batches with gradient accumulation,
clipping, the learning rate of this step, the optimizer, the guard against non-finite losses), then
one log line. There is no Trainer class to look inside.

A run directory (--out-dir; by default runs/<preset>, or runs/<preset>-2, ... beside an earlier run)
holds train_config.json, metrics.jsonl, train.log, plots.png and checkpoints `ckpt_NNNNNNN/`: the
model in Hugging Face's GPT-2 layout with its tokenizer and generation config (so `transformers`,
its pipeline and infer.py load it) plus everything needed to continue bit for bit: optimizer
moments, step, data position and every RNG state, in safetensors and JSON (no pickle; the layout is
described in common.py). Checkpoints are written under a temporary name and renamed when complete,
so a crash never leaves a half checkpoint that looks whole. SIGTERM or Ctrl-C saves one at the next
step boundary and exits.

What to expect: the defaults (the `mini` preset on the English sample, 1,100 steps of 2,048 tokens,
Muon and a warmup-stable-decay schedule) take 9 min 16 s on 2 cores of an AVX512-BF16 CPU and reach
4.83 nats per token over the whole validation split. How those defaults were chosen, and measured
speeds of the training step, are in docs/benchmarks.md.
"""

import ctypes
import ctypes.util
import glob
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from loguru import logger

from common import (EOT_TOKEN, OPTIMIZER_FILE, RNG_FILE, TRAINER_STATE, VAL_LOSS_KEY, CheckpointError, DataError,
                    UsageError, best_checkpoint, check_dtype_name, checkpoint_dir, checkpoints_in, cpu_has_fast_bf16,
                    newest_run, parse_config, pick_device, run_cli)
from gpt_dataset import gpt2_tokenizer, load_manifest, open_split, write_hf_tokenizer
from transformer import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, GPT, config_from_preset, pretrained_config

@dataclass
class TrainConfig:
    data: str = "data/sample_en"  # dataset directory written by gpt_dataset.py
    out_dir: str | None = None  # run directory for checkpoints, logs and plots; default runs/<preset>
    preset: str = "mini"  # model size: tiny, mini, small, gpt2, gpt2-medium, gpt2-large, gpt2-xl
    n_layer: int | None = None  # override the preset's number of blocks
    n_head: int | None = None  # override the preset's attention heads
    n_embd: int | None = None  # override the preset's width
    block_size: int | None = None  # override the preset's context length (tokens)
    dropout: float | None = None  # override the preset's dropout (0 for pretraining)
    init_from: str | None = None  # start from a Hugging Face GPT-2 directory or hub name instead of random weights
    max_steps: int = 1100  # optimizer steps in the whole run
    batch_size: int = 16  # sequences per micro-batch per process
    tokens_per_step: int | None = None  # tokens per optimizer step over all processes; sets accumulation
    optimizer: str = "muon"  # muon: Muon for the blocks' matrices and AdamW for the rest; or adamw for all
    lr: float = 8e-3  # peak learning rate, reached after warmup (Muon's is scaled to match AdamW's update size)
    min_lr: float | None = None  # final learning rate of the decay; default lr / 10
    schedule: str = "wsd"  # after warmup: wsd (constant, then a linear decay) or cosine (decay all along)
    cooldown_frac: float = 0.3  # wsd: share of the steps spent decaying to min_lr
    warmup_steps: int = 30  # linear warmup from lr / warmup_steps to lr
    weight_decay: float = 0.1  # decay on matrices (decoupled, as in AdamW)
    beta1: float = 0.9  # AdamW momentum
    beta2: float = 0.99  # AdamW second-moment decay: 0.99 averages more batches, which small batches need
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables
    eval_interval: int = 275  # steps between validation runs (and text samples)
    eval_steps: int = 20  # validation batches per evaluation (fixed batches, the same every time)
    final_eval_tokens: int = 10_000_000  # the last evaluation reads the whole validation split, up to this
    mask_documents: bool = False  # training attends within each article of a window only; evaluation never masks
    z_loss: float = 0.0  # training adds this x log(Z)^2 per token (Z: softmax normaliser) to the logged loss; 0 off
    ckpt_interval: int = 550  # steps between checkpoints; the last step always gets one
    keep_last: int = 2  # newest checkpoints kept, besides the best by validation loss
    tracker: str = "none"  # also send metrics.jsonl's rows to tensorboard (run_dir/tensorboard) or wandb
    sample_tokens: int = 48  # tokens in the text sample printed at each evaluation; 0 disables
    compile: bool | None = None  # torch.compile the model; default on for CUDA
    reuse_memory: bool = True  # CPU: keep freed memory for the next step: 6-30% faster, more resident memory
    dtype: str = "auto"  # auto, float32, bfloat16 or float16 (autocast; weights stay float32)
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    seed: int = 1337  # seeds weights, data order and dropout
    resume: bool = False  # continue from the newest complete checkpoint in --out-dir
    max_bad_steps: int = 5  # consecutive non-finite losses or gradients before the run stops
    verify_data: bool = False  # check every shard's sha256 before training (reads the whole dataset)



# ---- Pure functions of the schedule ----


def lr_at(step, *, max_lr, min_lr, warmup_steps, max_steps, schedule="cosine", cooldown_frac=0.3):
    """Learning rate of optimizer step `step` (0-based): linear warmup to max_lr over warmup_steps, then
    down to min_lr at max_steps, and min_lr after that. The way down is half a cosine ("cosine"), or
    ("wsd": warmup, stable, decay) max_lr held until the last cooldown_frac of the steps, then a
    straight line: more steps at the full rate, and a decay that still ends at min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    if schedule == "wsd":
        decay_start = max(warmup_steps, max_steps - round(cooldown_frac * max_steps))
        progress = max(0, step - decay_start) / max(1, max_steps - decay_start)
        return max_lr - progress * (max_lr - min_lr)
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


# ---- Optimizers ----


def make_optimizers(model, *, name, lr, weight_decay, betas, device_type):
    """The optimizers of a run, as a list: AdamW for every parameter, or with name "muon", Muon for
    the 2-D weights inside the blocks and AdamW for the rest.

    Muon (Jordan et al., 2024) orthogonalises each matrix's momentum with a few Newton-Schulz
    iterations, so that an update moves every direction of the matrix alike instead of a few
    dominant ones. It suits hidden matrices only: the embedding (also the head, as they are tied)
    and the vectors stay with AdamW. adjust_lr_fn="match_rms_adamw" scales Muon's step to AdamW's
    typical size, so that one --lr and schedule serve both.

    Weight decay applies to matrices only, not to biases and LayerNorm gains, which set scales and
    offsets rather than store features. AdamW uses its fused kernel on CUDA and CPU: one pass over
    each tensor instead of a dozen elementwise ops (on a 2-core CPU the step takes 11 ms instead of
    99 ms for the `small` preset).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if name == "muon" and p.dim() == 2 and n.startswith("transformer.h.")]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in hidden_ids]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    optimizers = [torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cuda", "cpu"))]
    if hidden:
        optimizers.append(torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, momentum=0.95,
                                           adjust_lr_fn="match_rms_adamw"))
    return optimizers


# ---- Data ----


class TokenWindows:
    """Batches of (T + 1)-token windows from memory-mapped shards, for inputs and next-token targets.

    The split is cut into non-overlapping windows, grouped into blocks of B windows (one micro-batch);
    each epoch visits every block in an order shuffled by (seed, epoch). The position is one integer,
    the number of blocks consumed, saved in checkpoints: a resumed run reads exactly the batches the
    uninterrupted run would have read. Rank r of N takes blocks r, r + N, r + 2N, ..., so N processes
    read the same data as one process accumulating N micro-batches.
    """

    def __init__(self, shards, block_size, batch_size, *, seed, rank=0, world_size=1, shuffle=True):
        self.shards, self.T, self.B = shards, block_size, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.offsets = np.cumsum([0] + [len(s) for s in shards])  # where each shard starts in the split
        n_windows = int((self.offsets[-1] - 1) // block_size)
        self.blocks_per_epoch = n_windows // batch_size
        if self.blocks_per_epoch < world_size:
            raise DataError(f"the split holds {self.offsets[-1]:,} tokens, fewer than one batch of "
                            f"{batch_size * world_size} x {block_size + 1}; use a smaller --batch-size or --block-size")
        self.blocks_done = 0
        self.epoch_order = (None, None)  # (epoch, its shuffled window order), computed once per epoch

    def order(self, epoch):
        if self.epoch_order[0] != epoch:
            n = self.blocks_per_epoch * self.B
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self.epoch_order = (epoch, order)
        return self.epoch_order[1]

    def window(self, index):
        """Tokens [index * T, index * T + T + 1) of the split, which may span two shards."""
        start, end = index * self.T, index * self.T + self.T + 1
        shard = int(np.searchsorted(self.offsets, start, side="right") - 1)
        pieces = []
        while start < end:
            local = start - self.offsets[shard]
            take = min(end - start, len(self.shards[shard]) - local)
            pieces.append(self.shards[shard][local : local + take])
            start, shard = start + take, shard + 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def next_batch(self):
        """(B, T + 1) int64 array: this rank's block of the next global micro-batch."""
        epoch, block = divmod(self.blocks_done + self.rank, self.blocks_per_epoch)
        mine = self.order(epoch)[block * self.B : (block + 1) * self.B]
        self.blocks_done += self.world_size
        return np.stack([self.window(i) for i in mine]).astype(np.int64)

    def state(self):
        return {"blocks_done": self.blocks_done}

    def load_state(self, state):
        self.blocks_done = int(state["blocks_done"])


def to_device(batch, device):
    """(inputs, targets) on the device; through pinned memory on CUDA, so the copy overlaps compute."""
    tensor = torch.from_numpy(batch)
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    else:
        tensor = tensor.to(device)
    return tensor[:, :-1], tensor[:, 1:]



# ---- Checkpoints: the training state besides the model (the layout is in common.py) ----


def flatten_optimizer_states(optimizers):
    """(tensors, json) of the optimizers' state_dicts, so they can be stored without pickle. The first
    optimizer's entries are named "<param index>.<key>", the i-th's after it "opt<i>.<param index>.<key>"."""
    tensors, meta = {}, []
    for i, optimizer in enumerate(optimizers):
        prefix = f"opt{i}." if i else ""
        state = optimizer.state_dict()
        entries = [(f"{prefix}{index}.{key}", value) for index, entry in state["state"].items()
                   for key, value in entry.items()]
        tensors.update((name, value) for name, value in entries if torch.is_tensor(value))
        scalars = {name: value for name, value in entries if not torch.is_tensor(value)}
        meta.append({"param_groups": state["param_groups"], "scalars": scalars})
    return tensors, meta


def unflatten_optimizer_state(tensors, meta, index):
    """The state_dict of optimizer `index` from what flatten_optimizer_states wrote."""
    prefix = f"opt{index}." if index else ""
    state = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        if index == 0 and name.startswith("opt") or not name.startswith(prefix):
            continue
        param, key = name[len(prefix):].split(".", 1)
        state.setdefault(int(param), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_states(device):
    """Every RNG that training draws from (dropout uses torch's; data order is seeded per epoch)."""
    states = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["torch_cuda"] = torch.cuda.get_rng_state(device)
    return states




def save_checkpoint(run_dir, step, *, model, optimizers, scaler, train_windows, rng, val_loss, best_val_loss,
                    config, data_shards):
    """Writes ckpt_<step> atomically: everything goes into a temporary directory, which is renamed only
    once every file is on disk. `rng` holds the RNG states of every process. Returns the path."""
    from safetensors.torch import save_file

    final = checkpoint_dir(run_dir, step)
    if os.path.isdir(final):
        return final  # this step was saved already (a stop right after resuming): same state, keep it
    tmp = os.path.join(run_dir, "." + os.path.basename(final).replace("ckpt_", "tmp_ckpt_"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)  # model.safetensors, config.json, generation_config.json: loadable by transformers
        write_hf_tokenizer(tmp, model.config.block_size)  # so that AutoTokenizer and pipeline load it too
        tensors, optimizer_meta = flatten_optimizer_states(optimizers)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, os.path.join(tmp, OPTIMIZER_FILE))
        save_file({f"rank{r}.{k}": v.cpu() for r, states in enumerate(rng) for k, v in states.items()},
                  os.path.join(tmp, RNG_FILE))
        state = {"step": step, "data": train_windows.state(), "optimizer": optimizer_meta[0],
                 "other_optimizers": optimizer_meta[1:],
                 "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                 VAL_LOSS_KEY: val_loss, "best_val_loss": best_val_loss, "train_config": asdict(config),
                 "data_shards": data_shards}
        with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
            json.dump(state, f, indent=1)
        for name in os.listdir(tmp):  # flush to disk before the rename makes the checkpoint visible
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"could not write checkpoint {final} ({e.strerror}); earlier checkpoints are intact, "
                         "free disk space and resume with --resume") from e
    return final


def restore_checkpoint(checkpoint, *, optimizers, scaler, train_windows, rank, device):
    """The counterpart of save_checkpoint for everything but the model (GPT.from_pretrained reads that):
    puts back the optimizers, the gradient scaler, the data position and this process's RNG states.
    Returns the checkpoint's trainer state (step, best validation loss, ...)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        with open(os.path.join(checkpoint, TRAINER_STATE)) as f:
            state = json.load(f)
        optimizer_tensors = load_file(os.path.join(checkpoint, OPTIMIZER_FILE))
        rng = load_file(os.path.join(checkpoint, RNG_FILE))
        metas = [state["optimizer"], *state.get("other_optimizers", [])]
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"{checkpoint} cannot be resumed: its training state is missing or damaged ({e}); "
                              "delete that directory to resume from the one before") from e
    if len(metas) != len(optimizers):
        raise CheckpointError(f"{checkpoint} was trained with --optimizer "
                              f"{state.get('train_config', {}).get('optimizer')}; resume it with the same optimizer")
    try:
        for index, (optimizer, meta) in enumerate(zip(optimizers, metas)):
            optimizer.load_state_dict(unflatten_optimizer_state(optimizer_tensors, meta, index))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{checkpoint} cannot be resumed: its optimizer state does not fit this model ({e})") from e
    if state.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    train_windows.load_state(state["data"])
    if f"rank{rank}.torch_cpu" in rng:
        torch.set_rng_state(rng[f"rank{rank}.torch_cpu"])
    if device.type == "cuda" and f"rank{rank}.torch_cuda" in rng:
        torch.cuda.set_rng_state(rng[f"rank{rank}.torch_cuda"], device)
    return state


def prune_checkpoints(run_dir, keep_last):
    """Deletes all but the newest `keep_last` checkpoints and the best by validation loss."""
    checkpoints = checkpoints_in(run_dir)
    keep = set(checkpoints[-keep_last:]) if keep_last > 0 else set()
    keep.add(best_checkpoint(run_dir))
    keep.add(checkpoints[-1])
    for path in checkpoints:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)



# ---- Monitoring ----

PEAK_BF16_TFLOPS = {  # dense bf16 tensor-core peaks from the vendors' data sheets, per GPU
    "H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0,
    "A100": 312.0, "A10G": 125.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0, "RTX 4090": 165.0,
    "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0,
}


def peak_flops(device):
    """Peak bf16 FLOP/s of the CUDA device, from its name; None where unknown (no MFU is shown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():  # longer names first where they share a prefix
        if key in name:
            return tflops * 1e12
    return None


def memory_in_use(device):
    """(label, GiB): peak CUDA memory allocated, else the process's peak resident memory."""
    if device.type == "cuda":
        return "cuda_peak", torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # Unix only; imported here so that the rest runs on Windows too

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return "rss_peak", rss / (2**30 if sys.platform == "darwin" else 2**20)


def plot_metrics(metrics_path, png_path):
    """Four panels: train and validation loss, learning rate, tokens/s and memory, against the step."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed on servers
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    if not train:
        return
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0, 0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.7, label="train")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation (fixed batches)")
    whole = [r for r in val if "whole_val_loss" in r]
    if whole:
        ax.plot([r["step"] for r in whole], [r["whole_val_loss"] for r in whole], "*", markersize=12,
                label="validation, whole split")
    ax.set(title="Loss", xlabel="step", ylabel="cross-entropy (nats/token, log scale)", yscale="log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.legend()
    panels = [(axes[0, 1], "lr", "Learning rate", "learning rate"),
              (axes[1, 0], "tokens_per_s", "Throughput", "tokens / s"),
              (axes[1, 1], "memory_gib", "Memory", "GiB (" + train[-1].get("memory", "") + ")")]
    for ax, key, title, label in panels:
        points = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), lw=0.8)
        ax.set(title=title, xlabel="step", ylabel=label)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)



def sample_text(model, *, max_new_tokens, seed):
    """A continuation of <|endoftext|> (the start of a new article), as text: what the model writes
    now. Sampled as infer.py does by default."""
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    start = torch.tensor([[EOT_TOKEN]], device=model.lm_head.weight.device)
    tokens = model.generate(start, max_new_tokens, temperature=DEFAULT_TEMPERATURE, top_k=DEFAULT_TOP_K,
                            generator=generator)
    ids = [t.item() for t in itertools.takewhile(lambda t: t.item() != EOT_TOKEN, tokens)]
    return gpt2_tokenizer().decode(ids, errors="replace")


# ---- Set-up ----


def resolve_config(config, world_size):
    """Checks the knobs and derives what follows from them; returns (config, model config, accumulation)."""
    positive = ("max_steps", "batch_size", "eval_interval", "eval_steps", "ckpt_interval", "max_bad_steps")
    for name in positive:
        if getattr(config, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if config.lr <= 0 or config.warmup_steps < 0 or config.weight_decay < 0 or config.grad_clip < 0:
        raise UsageError("--lr must be positive; --warmup-steps, --weight-decay and --grad-clip >= 0")
    if config.keep_last < 1 or config.sample_tokens < 0:
        raise UsageError("--keep-last must be at least 1 and --sample-tokens >= 0")
    check_dtype_name(config.dtype)
    if config.optimizer not in ("adamw", "muon") or config.schedule not in ("cosine", "wsd"):
        raise UsageError(f"--optimizer must be adamw or muon and --schedule cosine or wsd, got "
                         f"{config.optimizer!r} and {config.schedule!r}")
    if not 0 <= config.cooldown_frac <= 1 or config.final_eval_tokens < 0 or config.z_loss < 0:
        raise UsageError("--cooldown-frac must be between 0 and 1; --final-eval-tokens and --z-loss >= 0")
    if config.tracker not in TRACKERS:
        raise UsageError(f"--tracker must be one of {', '.join(TRACKERS)}, got {config.tracker!r}")
    import_tracker(config.tracker)  # a missing package fails now, not after the model is built
    config.min_lr = config.lr / 10 if config.min_lr is None else config.min_lr
    if not 0 <= config.min_lr <= config.lr:
        raise UsageError(f"--min-lr must be between 0 and --lr, got {config.min_lr}")
    model_config = model_config_of(config)
    tokens_per_micro = config.batch_size * model_config.block_size * world_size
    config.tokens_per_step = config.tokens_per_step or tokens_per_micro
    if config.tokens_per_step % tokens_per_micro:
        raise UsageError(f"--tokens-per-step ({config.tokens_per_step}) must be a multiple of batch size x block "
                         f"size x processes ({tokens_per_micro})")
    return config, model_config, config.tokens_per_step // tokens_per_micro



def model_config_of(config):
    """The model's config: the preset with the size overrides, or with --init-from the pretrained model's
    own shape. Its dropout is 0 unless --dropout says otherwise (GPT-2's config.json says 0.1, a
    fine-tuning setting; pretraining on this much text does not overfit)."""
    sizes = dict(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd, block_size=config.block_size)
    if config.init_from:
        if any(v is not None for v in sizes.values()):
            raise UsageError("--init-from takes the pretrained model's size: drop --n-layer, --n-head, "
                             "--n-embd and --block-size")
        return pretrained_config(config.init_from, dropout=config.dropout or 0.0)
    try:
        return config_from_preset(config.preset, **sizes, dropout=config.dropout)
    except ValueError as e:  # an unknown preset, or sizes that do not fit together
        raise UsageError(f"--preset {config.preset} with the sizes given: {e}") from e


def autocast_dtype(requested, device):
    """The autocast dtype, or None for plain float32. auto: bf16 on CUDA where supported, else fp16;
    bf16 on CPUs with bf16 instructions, where a step runs about 1.8x faster than fp32
    (docs/benchmarks.md); fp32 on other CPUs and on MPS."""
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None
    if requested == "float16" and device.type != "cuda":
        raise UsageError("--dtype float16 needs a CUDA GPU (it relies on a gradient scaler); use bfloat16")
    return None if requested == "float32" else getattr(torch, requested)



def shard_checksums(data_dir):
    """The sha256 of every shard of a dataset, from its manifest: what identifies the data of a run."""
    return [shard["sha256"] for shard in load_manifest(data_dir)["shards"]]


def val_bytes_per_token(data_dir):
    """UTF-8 bytes per token of the validation split: bits per byte = loss / ln 2 / this, a measure
    that does not depend on the tokenizer."""
    val = load_manifest(data_dir)["val"]
    return val["bytes"] / val["tokens"]



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



def torchrun_ranks():
    """(rank, local rank, world size): from the variables torchrun sets, else a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def start_device(requested, local_rank, world_size):
    """The device of this process; with several processes, joins their group (NCCL on CUDA, else gloo)."""
    device = pick_device(requested)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for any float32 matmul left
        torch.backends.cudnn.allow_tf32 = True
    return device


def configure_speed(config, device):
    """(autocast dtype or None, whether to compile); on a CPU, also keeps freed memory for reuse."""
    if device.type == "cpu" and config.reuse_memory:
        reuse_freed_memory()
    use_compile = config.compile if config.compile is not None else device.type == "cuda"
    return autocast_dtype(config.dtype, device), use_compile


def choose_run_dir(config):
    """--out-dir as given. By default runs/<preset> (runs/<model>-finetune with --init-from); when that
    already holds a run, a new run goes beside it to the first of runs/<name>-2, -3, ... without
    checkpoints, so a command run twice trains twice, and --resume continues the newest of them.
    Decided before any process writes, so that every process of a torchrun decides the same."""
    if config.out_dir:
        return config.out_dir
    name = f"{os.path.basename(config.init_from.rstrip('/'))}-finetune" if config.init_from else config.preset
    base = os.path.join("runs", name)
    if config.resume:
        numbered = [d for d in glob.glob(glob.escape(base) + "-*") if re.fullmatch(r"-\d+", d[len(base) :])]
        return newest_run([base, *numbered]) or base
    return next(d for d in (f"{base}-{n}" if n > 1 else base for n in itertools.count(1)) if not checkpoints_in(d))


# Settings that a resumed run may change (logged); any other difference from the settings the
# checkpoint recorded would make the continued run a different run from the one checkpointed. The data
# directory may move (another machine, another mount), as long as it holds the same shards.
MAY_CHANGE_ON_RESUME = ("data", "out_dir", "resume", "max_steps", "eval_interval", "eval_steps", "final_eval_tokens",
                        "ckpt_interval", "keep_last", "sample_tokens", "compile", "reuse_memory", "dtype", "device",
                        "max_bad_steps", "verify_data")


def checkpoint_to_resume(run_dir, config, data_shards):
    """(the newest complete checkpoint with --resume, else None; the settings changed since that
    checkpoint was written, which recorded them). Refuses to start a new run over an old one, and to
    resume with settings that would make it another run."""
    found = checkpoints_in(run_dir)
    if config.resume and not found:
        raise UsageError(f"--resume: {run_dir} holds no complete checkpoint; start without --resume")
    if not config.resume and found:
        raise UsageError(f"{run_dir} already holds checkpoints; pass --resume to continue that run, "
                         "or choose another --out-dir")
    if not config.resume:
        return None, []
    path = os.path.join(found[-1], TRAINER_STATE)
    try:
        with open(path) as f:
            state = json.load(f)
        saved = dict(state["train_config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}); resume from an older checkpoint "
                              "(move this one away) or start a new run") from e
    if state.get("data_shards", data_shards) != data_shards:
        raise UsageError(f"--resume: {config.data} holds other shards than the run was trained on (their sha256 "
                         f"differ from {path}); resume with the run's dataset, or start a new run")
    now = asdict(config)
    changed = [k for k in now if k in saved and saved[k] != now[k]]
    refused = [f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}" for k in changed if k not in MAY_CHANGE_ON_RESUME]
    if refused:
        raise UsageError(f"--resume: {'; '.join(refused)} differ(s) from {path}; resume with the run's settings, "
                         "or start a new run in another --out-dir")
    return found[-1], [f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}" for k in changed if k != "resume"]


def build_model(config, model_config, checkpoint):
    """The model to train: a checkpoint's, a pretrained GPT-2, or a new one, each of model_config's shape."""
    if not (checkpoint or config.init_from):
        return GPT(model_config)
    model = GPT.from_pretrained(checkpoint or config.init_from, dropout=model_config.dropout)
    if model.config != model_config:
        raise CheckpointError(f"{checkpoint or config.init_from} holds a model of {model.config}, not the "
                              f"{model_config} that the settings give")
    return model


def wrap_for_training(model, device, world_size):
    """With several processes, DDP around the model: it averages the gradients across processes."""
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def prepare_run_dir(run_dir, config, model_config, resumed_step):
    """Writes train_config.json; of metrics.jsonl, keeps only what led to the checkpoint resumed from;
    from now on, every console line also goes to train.log there, with its date (appended on resume)."""
    os.makedirs(run_dir, exist_ok=True)
    logger.add(os.path.join(run_dir, "train.log"), format="{time:YYYY-MM-DD HH:mm:ss} | {message}", level="INFO")
    with open(os.path.join(run_dir, "train_config.json"), "w") as f:
        json.dump({"train": asdict(config), "model": asdict(model_config)}, f, indent=2)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics_path):
        rows = [line for line in open(metrics_path) if resumed_step is not None and line.strip()
                and json.loads(line)["step"] <= resumed_step]
        with open(metrics_path, "w") as f:
            f.writelines(rows)
    return metrics_path


# ---- The loop's parts ----


@torch.no_grad()
def evaluate_whole_split(model, val_shards, *, block_size, batch_size, max_tokens, autocast, device, rank,
                         world_size):
    """(mean loss per token, tokens, whether that was the whole split) over every non-overlapping
    window of the validation split, up to max_tokens: the run's result. Each process reads every
    world_size-th window; the sums are all-reduced. The periodic evaluations read fixed batches only,
    a sample that can differ from this by a tenth of a nat on a small split."""
    windows = TokenWindows(val_shards, block_size, 1, seed=0, shuffle=False)
    count = min(windows.blocks_per_epoch, max(1, max_tokens // block_size))
    mine = list(range(rank, count, world_size))
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, tokens
    for start in range(0, len(mine), batch_size):
        batch = np.stack([windows.window(i) for i in mine[start : start + batch_size]]).astype(np.int64)
        x, y = to_device(batch, device)
        with autocast:
            loss = model(x, y)[1].double()
        total += torch.stack([loss * y.numel(), torch.tensor(float(y.numel()), dtype=torch.float64, device=device)])
    if world_size > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item(), int(total[1].item()), count == windows.blocks_per_epoch


@torch.no_grad()
def evaluate(model, val_windows, eval_steps, autocast, device, world_size):
    """Mean loss over the first `eval_steps` validation batches (the same every time), averaged over
    all processes."""
    model.eval()
    val_windows.load_state({"blocks_done": 0})
    eval_steps = min(eval_steps, val_windows.blocks_per_epoch // world_size)  # a small split has fewer
    total = torch.zeros((), device=device)
    for _ in range(eval_steps):
        x, y = to_device(val_windows.next_batch(), device)
        with autocast:
            total += model(x, y)[1].float()
    if world_size > 1:
        dist.all_reduce(total)
    model.train()
    return total.item() / (eval_steps * world_size)


def train_step(model, raw_model, optimizers, scaler, train_windows, *, accumulation, autocast, lr, grad_clip,
               device, world_size, mask_documents, z_loss):
    """One optimizer step; returns (mean loss, gradient norm before clipping, whether it was applied)."""
    loss_sum = torch.zeros((), device=device)
    for micro in range(accumulation):
        x, y = to_device(train_windows.next_batch(), device)
        # Gradients are all-reduced across processes only on the last micro-batch.
        sync = world_size == 1 or micro == accumulation - 1
        with (nullcontext() if sync else model.no_sync()), autocast:
            _, loss = model(x, y, mask_documents=mask_documents, z_loss=z_loss)
            # The loss is a mean over tokens; dividing by the micro-batch count makes the summed
            # gradients the mean over the whole step, as if it were one large batch.
            loss = loss / accumulation
        loss_sum += loss.detach().float()
        scaler.scale(loss).backward()
    if world_size > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    for optimizer in optimizers:
        scaler.unscale_(optimizer)
    max_norm = grad_clip if grad_clip > 0 else float("inf")  # inf: measure, never clip
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
    for group in (group for optimizer in optimizers for group in optimizer.param_groups):
        group["lr"] = lr
    loss_value, norm_value = loss_sum.item(), grad_norm.item()
    # fp16 overflows are the gradient scaler's business (it skips and lowers the scale);
    # anything else non-finite means this update would poison the weights, so it is skipped.
    applied = math.isfinite(loss_value) and (scaler.is_enabled() or math.isfinite(norm_value))
    if applied:
        for optimizer in optimizers:
            scaler.step(optimizer)
    scaler.update()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value, applied


def any_process_stops(received, device, world_size):
    """Whether this process or any other got a stop signal: every process must stop at the same step."""
    if world_size == 1:
        return received
    flag = torch.tensor(float(received), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def all_rng_states(device, world_size):
    """The RNG states of every process, gathered so that rank 0 can save them all."""
    if world_size == 1:
        return [rng_states(device)]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, rng_states(device))
    return gathered


def report_evaluation(step, val_loss, whole, *, bytes_per_token, metrics, model, config):
    """Logs the validation loss (and `whole`, the (loss, tokens) of the whole split, at the end), appends
    them to metrics.jsonl, prints a text sample and redraws the plots."""
    bits_per_byte = val_loss / math.log(2) / bytes_per_token
    logger.info(f"step {step}: val loss {val_loss:.4f} | perplexity {math.exp(min(val_loss, 50)):.1f} "
                f"| bits/byte {bits_per_byte:.3f}")
    row = {"step": step, "val_loss": val_loss, "val_bits_per_byte": bits_per_byte}
    if whole:
        whole_bits_per_byte = whole[0] / math.log(2) / bytes_per_token
        scope = ("the whole validation split" if whole[2]
                 else "the validation split's first windows (--final-eval-tokens)")
        logger.info(f"step {step}: val loss over {scope} ({whole[1]:,} tokens) {whole[0]:.4f} "
                    f"| perplexity {math.exp(min(whole[0], 50)):.1f} | bits/byte {whole_bits_per_byte:.3f}")
        row.update(whole_val_loss=whole[0], whole_val_tokens=whole[1], whole_val_bits_per_byte=whole_bits_per_byte)
    metrics.append(row)
    if config.sample_tokens:
        model.eval()
        logger.info(f"sample: {sample_text(model, max_new_tokens=config.sample_tokens, seed=config.seed)!r}")
        model.train()
    plot_metrics(metrics.path, os.path.join(config.out_dir, "plots.png"))


class MetricsLog:
    """metrics.jsonl of a run (one JSON row per step and per evaluation), and the experiment tracker
    that gets the same rows, if --tracker names one."""

    def __init__(self, path, tracker=None):
        self.path, self.tracker = path, tracker

    def append(self, row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tracker:
            self.tracker({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, row["step"])


TRACKERS = ("none", "tensorboard", "wandb")  # each named as the package it needs


def import_tracker(name):
    """The module of --tracker, imported only when asked for; None for none."""
    if name == "none":
        return None
    try:
        import importlib

        return importlib.import_module("torch.utils.tensorboard" if name == "tensorboard" else "wandb")
    except ImportError as e:
        raise UsageError(f"--tracker {name} needs the {name} package: pip install {name}") from e


def open_tracker(name, config, run_dir):
    """A function (metrics, step) that sends a row to TensorBoard or Weights & Biases, or None.
    A resumed run continues the same wandb run: its id is kept in the run directory."""
    module = import_tracker(name)
    if module is None:
        return None
    if name == "tensorboard":
        writer = module.SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))

        def send(metrics, step):
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)
            writer.flush()

        return send
    id_path = os.path.join(run_dir, "wandb_run_id")
    if not os.path.isfile(id_path):
        with open(id_path, "w") as f:
            f.write(os.urandom(6).hex())
    with open(id_path) as f:
        run_id = f.read().strip()
    module.init(project=os.environ.get("WANDB_PROJECT", "wikigpt"), name=os.path.basename(os.path.abspath(run_dir)),
                id=run_id, resume="allow", config=asdict(config), dir=run_dir)
    return lambda metrics, step: module.log(metrics, step=step)


def log_start(config, model, accumulation, device, amp_dtype, use_compile, world_size, checkpoint, start_step,
              changed_settings):
    c = model.config
    logger.info(f"config: {json.dumps(asdict(config))}")
    origin = "resumed" if checkpoint else f"from {config.init_from}" if config.init_from else "new"
    logger.info(f"model ({origin}): {model.num_params():,} parameters ({model.num_params(embeddings=False):,} "
                f"without embeddings), {c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, context "
                f"{c.block_size}, dropout {c.dropout}" + (" (--dropout to change)" if config.dropout is None else ""))
    logger.info(f"device {device}, {world_size} process(es), autocast {amp_dtype or 'off (float32)'}, "
                f"compile {use_compile}; {config.tokens_per_step:,} tokens per step = {world_size} x "
                f"{accumulation} micro-batch(es) x {config.batch_size} x {c.block_size}; "
                f"{model.flops_per_token(c.block_size) / 1e6:.1f} MFLOP per token")
    logger.info(f"run directory {config.out_dir}")
    if checkpoint:
        logger.info(f"resuming from {checkpoint} at step {start_step}")
    for change in changed_settings:
        logger.info(f"changed since the run began: {change}")


def log_step(step, config, *, loss, lr, norm, elapsed, step_times, flops_per_token, peak, device, world_size,
             metrics):
    """One line per step on the console and in metrics.jsonl."""
    tokens_per_s = config.tokens_per_step / elapsed
    memory_label, memory = memory_in_use(device)
    eta = (config.max_steps - step) * float(np.median(step_times[-20:]))
    mfu = flops_per_token * tokens_per_s / world_size / peak if peak else None
    logger.info(f"step {step}/{config.max_steps} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.2f} | "
                f"{elapsed * 1000:.0f} ms | {tokens_per_s:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu is not None else "")
                + f" | {memory_label} {memory:.2f} GiB | ETA {eta / 60:.1f} min")
    metrics.append({"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "ms": elapsed * 1000,
                    "tokens_per_s": tokens_per_s, "mfu": mfu, "memory": memory_label, "memory_gib": memory})


def start_logging(master):
    """Log lines with the time of day, from the first process only (the others would repeat them)."""
    logger.remove()
    if master:
        logger.add(sys.stderr, format="{time:HH:mm:ss} | {message}", level="INFO")


def refuse_more_bad_steps(step, bad_steps, loss, norm, config):
    """Warns of a skipped update and returns the count of them in a row; at --max-bad-steps, stops the run."""
    logger.warning(f"step {step}: non-finite loss {loss} or gradient norm {norm}; update skipped ({bad_steps} in a row)")
    if bad_steps >= config.max_bad_steps:
        raise UsageError(f"{bad_steps} non-finite steps in a row at step {step}: training stopped, the last "
                         f"checkpoint in {config.out_dir} is intact; lower --lr or check the data")
    return bad_steps


def save_and_prune(run_dir, step, **state):
    """A checkpoint of this step, then only the newest --keep-last and the best are kept."""
    path = save_checkpoint(run_dir, step, **state)
    prune_checkpoints(run_dir, state["config"].keep_last)
    logger.info(f"saved {path}")


def log_end(step, stopped_by, whole, metrics, run_dir):
    plot_metrics(metrics.path, os.path.join(run_dir, "plots.png"))
    if stopped_by:
        logger.info(f"stopped by {stopped_by} at step {step}; continue with the same command and --resume")
        return
    if not whole:
        result = "not measured (--final-eval-tokens 0)"
    else:
        scope = "the whole validation split" if whole[2] else f"{whole[1]:,} validation tokens"
        result = f"{whole[0]:.4f} over {scope}"
    logger.info(f"done: {step} steps, val loss {result}; plots in {run_dir}/plots.png")


def synchronized_clock(device):
    """perf_counter after the device has finished its queued work, so that a step's time is all of it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def main(argv=None):
    config = parse_config(TrainConfig, argv, description=__doc__.split("\n\n")[0])
    rank, local_rank, world_size = torchrun_ranks()
    config, model_config, accumulation = resolve_config(config, world_size)
    config.out_dir = choose_run_dir(config)
    data_shards = shard_checksums(config.data)  # what identifies the data: recorded in every checkpoint
    checkpoint, changed_settings = checkpoint_to_resume(config.out_dir, config, data_shards)
    device = start_device(config.device, local_rank, world_size)
    master, run_dir = rank == 0, config.out_dir
    amp_dtype, use_compile = configure_speed(config, device)
    start_logging(master)
    # Shards are checked first (headers and sizes; sha256 with --verify-data), so bad data fails fast.
    train_shards = open_split(config.data, "train", verify=config.verify_data)
    val_shards = open_split(config.data, "val", verify=config.verify_data)
    bytes_per_token = val_bytes_per_token(config.data)

    # ---- Model, optimizer, data, and the checkpoint to continue from ----
    torch.manual_seed(config.seed + rank)  # different dropout masks per rank; DDP copies rank 0's weights
    raw_model = build_model(config, model_config, checkpoint).to(device)
    # On a CPU the head and the loss run as one pass (transformer.LinearCrossEntropy); torch.compile and
    # CUDA have fused kernels of their own for the plain path.
    raw_model.fused_loss = device.type == "cpu" and not use_compile
    T, B = raw_model.config.block_size, config.batch_size  # the model's context, which a checkpoint sets
    optimizers = make_optimizers(raw_model, name=config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
                                 betas=(config.beta1, config.beta2), device_type=device.type)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    train_windows = TokenWindows(train_shards, T, B, seed=config.seed, rank=rank, world_size=world_size)
    val_windows = TokenWindows(val_shards, T, B, seed=config.seed, rank=rank, world_size=world_size, shuffle=False)
    start_step, best_val = 0, None
    if checkpoint:
        state = restore_checkpoint(checkpoint, optimizers=optimizers, scaler=scaler, train_windows=train_windows,
                                   rank=rank, device=device)
        start_step, best_val = state["step"], state.get("best_val_loss")
    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"))
    if master:
        prepare_run_dir(run_dir, config, raw_model.config, start_step if checkpoint else None)
        metrics.tracker = open_tracker(config.tracker, config, run_dir)
    eval_model = torch.compile(raw_model) if use_compile else raw_model  # DDP is not needed to evaluate
    model = wrap_for_training(eval_model, device, world_size)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    flops_per_token, peak = raw_model.flops_per_token(T), peak_flops(device)
    log_start(config, raw_model, accumulation, device, amp_dtype, use_compile, world_size, checkpoint, start_step,
              changed_settings)

    stop = StopSignal()
    try:
        model.train()
        step, bad_steps, last_val, val_step, whole, step_times = start_step, 0, None, None, None, []
        while True:
            last = step == config.max_steps
            stop_now = any_process_stops(stop.received is not None, device, world_size)
            if (step % config.eval_interval == 0 or last) and not stop_now:
                last_val, val_step = evaluate(model, val_windows, config.eval_steps, autocast, device, world_size), step
                best_val = last_val if best_val is None else min(best_val, last_val)
                if last and config.final_eval_tokens:  # the run's result: every window of the split
                    whole = evaluate_whole_split(eval_model, val_shards, block_size=T, batch_size=B, autocast=autocast,
                                                 max_tokens=config.final_eval_tokens, device=device, rank=rank,
                                                 world_size=world_size)
                if master:
                    report_evaluation(step, last_val, whole, bytes_per_token=bytes_per_token,
                                      metrics=metrics, model=raw_model, config=config)
            if (step % config.ckpt_interval == 0 and step > start_step) or last or stop_now:
                rng = all_rng_states(device, world_size)  # every process takes part in gathering them
                if master:
                    save_and_prune(run_dir, step, model=raw_model, optimizers=optimizers, scaler=scaler, rng=rng,
                                   train_windows=train_windows, config=config, best_val_loss=best_val,
                                   data_shards=data_shards, val_loss=last_val if val_step == step else None)
            if last or stop_now:
                break

            started = synchronized_clock(device)
            lr = lr_at(step, max_lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
                       max_steps=config.max_steps, schedule=config.schedule, cooldown_frac=config.cooldown_frac)
            loss, norm, applied = train_step(model, raw_model, optimizers, scaler, train_windows, lr=lr,
                                             accumulation=accumulation, autocast=autocast,
                                             grad_clip=config.grad_clip, device=device, world_size=world_size,
                                             mask_documents=config.mask_documents, z_loss=config.z_loss)
            elapsed = synchronized_clock(device) - started
            step += 1
            bad_steps = 0 if applied else refuse_more_bad_steps(step, bad_steps + 1, loss, norm, config)
            step_times += [elapsed] if applied else []
            if master and applied:
                log_step(step, config, loss=loss, lr=lr, norm=norm, elapsed=elapsed, step_times=step_times,
                         flops_per_token=flops_per_token, peak=peak, device=device, world_size=world_size,
                         metrics=metrics)

        if master:
            log_end(step, stop.received if stop_now else None, whole, metrics, run_dir)
    finally:
        stop.restore()
        if world_size > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
