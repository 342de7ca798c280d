"""Trains the model of transformer.py (today's block, or GPT-2's) on the token shards of gpt_dataset.py.

    python gpt_train.py --time-limit 10                                         # the CPU quickstart, ~9 min
    python gpt_train.py --data data/wikipedia_en_20231101_gpt2 --preset gpt2    # one GPU
    torchrun --nproc_per_node=8 gpt_train.py --data ... --preset gpt2           # eight GPUs
    python gpt_train.py ... --resume                                            # continue a run
    python gpt_train.py --data ... --init-from gpt2 --lr 1e-4                   # fine-tune OpenAI's GPT-2

Read main() first: set-up, then for each step, maybe evaluate and save a checkpoint, then the
training section (micro-batches with gradient accumulation, clipping, the learning rate of this
step, the optimizer, the guard against non-finite losses), then one log line. There is no Trainer
class to look inside. Above it: the settings, the learning-rate schedule, the optimizers and the
evaluation. The machinery is in the package: the device and processes (wikigpt/runtime.py),
checkpoints and run directories (wikigpt/checkpoint.py, wikigpt/runs.py), the log lines, metrics,
trackers and plots (wikigpt/monitor.py), the shards and their batches (wikigpt/shards.py).

A run directory (--out-dir; by default runs/<preset>, or runs/<preset>-2, ... beside an earlier run)
holds train_config.json, metrics.jsonl, train.log, plots.png and checkpoints `ckpt_NNNNNNN/`: the
model in Hugging Face's GPT-2 layout with its tokenizer and generation config (so `transformers`,
its pipeline and infer.py load it) plus everything needed to continue bit for bit: optimizer
moments, step, data position and every RNG state, in safetensors and JSON (no pickle). A crash never
leaves a half checkpoint that looks whole. SIGTERM or Ctrl-C saves one at the next step boundary and
exits.

What to expect: the defaults (today's block at the `mini` size, heads of 64, on the English sample with
its own BPE of 16,384 ids; 2,000 steps of 2,048 tokens, Muon, a warmup-stable-decay schedule) take 9.1-9.6
minutes on 2 cores of a Zen 4 (AVX512-BF16) for 1.378 bits per byte over the whole validation split;
--time-limit 10 trains fewer steps where those do not fit (wikigpt/budget.py): 970-1,078 on an AVX2-only
EPYC, for 1.449-1.454. How the defaults were chosen, and speeds, are in docs/benchmarks.md.
"""

import math
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch
from loguru import logger

from transformer import GPT, GPTConfig, config_from_preset
from wikigpt import convert
from wikigpt.budget import TimeBudget
from wikigpt.checkpoint import TrainingState, gather_rng_states, prune_checkpoints, restore_checkpoint, save_checkpoint
from wikigpt.cli import CheckpointError, UsageError, flag, parse_config, run_cli
from wikigpt.monitor import TRACKERS, Monitor, import_tracker, start_console_log
from wikigpt.muon import Muon
from wikigpt.runs import checkpoint_to_resume, choose_run_dir, prepare_run_dir, recorded_setting
from wikigpt.runtime import (Runtime, StopSignal, check_dtype_name, end_process, join_process_group,
                             leave_process_group, process_device, reuse_freed_memory, torchrun_ranks,
                             training_autocast_dtype, wrap_for_training)
from wikigpt.shards import TokenWindows, bytes_per_token, load_manifest, open_split, shard_checksums
from wikigpt.tokenizer import (dataset_tokenizer, dataset_tokenizer_files, describe, model_tokenizer,
                               token_byte_lengths, vocabulary_digest)

@dataclass
class TrainConfig:
    data: str = "data/sample_en_bpe16384"  # dataset directory written by gpt_dataset.py
    out_dir: str | None = None  # run directory for checkpoints, logs and plots; default runs/<preset>
    preset: str = "mini"  # model size: tiny, mini, small, gpt2, gpt2-medium, gpt2-large, gpt2-xl
    arch: str = "qwen3"  # the block: qwen3 (rotary, RMSNorm, query/key norms, SwiGLU), llama, arcee, or gpt2 (2019)
    n_layer: int | None = None  # override the preset's number of blocks
    n_head: int | None = None  # override the preset's attention heads
    n_embd: int | None = None  # override the preset's width
    block_size: int | None = None  # override the preset's context length (tokens)
    dropout: float | None = None  # override the preset's dropout (0 for pretraining)
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); default one per query head
    head_dim: int | None = None  # override the width of each head (default n_embd / n_head)
    mlp_hidden: int | None = None  # override the MLP's inner width
    norm: str | None = None  # override the architecture's norm: layernorm or rmsnorm
    positions: str | None = None  # override the architecture's positions: learned or rotary
    qk_norm: bool | None = None  # override whether queries and keys are normalised per head
    mlp: str | None = None  # override the architecture's MLP: gelu, relu2 or swiglu
    bias: bool | None = None  # override whether linear layers and norms have biases
    tie_embeddings: bool | None = None  # override whether the head shares the token embedding's weight
    rope_theta: float | None = None  # override the rotary base
    init_from: str | None = None  # start from a Hugging Face GPT-2 directory or hub name instead of random weights
    max_steps: int = 2000  # optimizer steps in the whole run
    time_limit: float = 0.0  # minutes for the whole run: fewer steps if the measured pace needs it (0: no limit)
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
    eval_interval: int = 250  # steps between validation runs (and text samples)
    eval_steps: int = 20  # validation batches per evaluation (fixed batches, the same every time)
    final_eval_tokens: int = 10_000_000  # the last evaluation reads the whole validation split, up to this
    mask_documents: bool = False  # training attends within each article of a window only; evaluation never masks
    z_loss: float = 0.0  # training adds this x log(Z)^2 per token (Z: softmax normaliser) to the logged loss; 0 off
    ckpt_interval: int = 500  # steps between checkpoints; the last step always gets one
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
    fsdp: bool = False  # shard weights, gradients and optimizer state (FSDP2); Muon then gathers rows: ~35% slower steps
    activation_checkpointing: bool = False  # recompute each block's activations in the backward: less memory, more compute


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


def make_optimizers(model, *, name, lr, weight_decay, betas, device_type, matmul_dtype=torch.bfloat16):
    """The optimizers of a run, as a list: AdamW for every parameter, or with name "muon", Muon for
    the 2-D weights inside the blocks and AdamW for the rest.

    Muon (Jordan et al., 2024) orthogonalises each matrix's momentum with a few Newton-Schulz
    iterations, so that an update moves every direction of the matrix alike instead of a few
    dominant ones. It suits hidden matrices only: the embedding (also the head, as they are tied)
    and the vectors stay with AdamW. adjust_lr_fn="match_rms_adamw" scales Muon's step to AdamW's
    typical size, so that one --lr and schedule serve both. Its iteration runs in bf16 unless the run's
    matrix products (matmul_dtype) are float32: a CPU without bf16 instructions (wikigpt/muon.py).
    Weight decay applies to matrices only, not to biases and norm gains, which set scales and offsets
    rather than store features. AdamW uses its fused kernel on CUDA and CPU: one pass over each
    tensor instead of a dozen elementwise ops (11 ms instead of 99 for `small` on 2 cores)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if name == "muon" and p.dim() == 2 and n.startswith("transformer.h.")]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in hidden_ids]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    optimizers = [torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cuda", "cpu"))]
    if hidden:
        optimizers.append(Muon(hidden, lr=lr, weight_decay=weight_decay, momentum=0.95, adjust_lr_fn="match_rms_adamw",
                               ns_dtype=torch.float32 if matmul_dtype == torch.float32 else torch.bfloat16))
    return optimizers


# ---- Settings that follow from the flags ----


class Settings(NamedTuple):
    config: TrainConfig  # with its derived defaults filled in
    model: GPTConfig
    accumulation: int  # micro-batches per optimizer step in each process


def resolve_config(config, world_size):
    """Checks the knobs and derives what follows from them: min_lr, tokens_per_step, the model's
    config and the gradient accumulation of `world_size` processes."""
    positive = ("max_steps", "batch_size", "eval_interval", "eval_steps", "ckpt_interval", "max_bad_steps")
    for name in positive:
        if getattr(config, name) < 1:
            raise UsageError(f"{flag(name)} must be at least 1, got {getattr(config, name)}")
    if config.lr <= 0 or config.warmup_steps < 0 or config.weight_decay < 0 or config.grad_clip < 0:
        raise UsageError("--lr must be positive; --warmup-steps, --weight-decay and --grad-clip >= 0")
    if config.keep_last < 1 or config.sample_tokens < 0:
        raise UsageError("--keep-last must be at least 1 and --sample-tokens >= 0")
    check_dtype_name(config.dtype)
    if config.optimizer not in ("adamw", "muon") or config.schedule not in ("cosine", "wsd"):
        raise UsageError(f"--optimizer must be adamw or muon and --schedule cosine or wsd, got "
                         f"{config.optimizer!r} and {config.schedule!r}")
    if not (0 <= config.cooldown_frac <= 1 and config.final_eval_tokens >= 0 and config.z_loss >= 0
            and config.time_limit >= 0):  # written so that NaN fails too
        raise UsageError("--cooldown-frac must be between 0 and 1; --final-eval-tokens, --z-loss and --time-limit >= 0")
    if config.tracker not in TRACKERS:
        raise UsageError(f"--tracker must be one of {', '.join(TRACKERS)}, got {config.tracker!r}")
    import_tracker(config.tracker)  # a missing package fails now, not after the model is built
    if config.fsdp and (config.device == "mps" or config.dtype == "float16"):
        raise UsageError("--fsdp shards over CUDA GPUs (NCCL) or CPUs (gloo) in bfloat16 or float32; "
                         "drop --fsdp, or use --device cuda / cpu and --dtype bfloat16")
    config.min_lr = config.lr / 10 if config.min_lr is None else config.min_lr
    if not 0 <= config.min_lr <= config.lr:
        raise UsageError(f"--min-lr must be between 0 and --lr, got {config.min_lr}")
    model_config = model_config_of(config)
    tokens_per_micro = config.batch_size * model_config.block_size * world_size
    config.tokens_per_step = config.tokens_per_step or tokens_per_micro
    if config.tokens_per_step % tokens_per_micro:
        raise UsageError(f"--tokens-per-step ({config.tokens_per_step}) must be a multiple of batch size x block "
                         f"size x processes ({tokens_per_micro})")
    return Settings(config, model_config, config.tokens_per_step // tokens_per_micro)


MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "n_kv_head", "head_dim", "mlp_hidden", "norm", "positions",
                "qk_norm", "mlp", "bias", "tie_embeddings", "rope_theta")


def model_config_of(config):
    """The model's config: the preset and architecture with the overrides, or with --init-from the
    pretrained model's own. Its dropout is 0 unless --dropout says otherwise (GPT-2's config.json says
    0.1, a fine-tuning setting; pretraining on this much text does not overfit)."""
    overrides = {name: getattr(config, name) for name in MODEL_FIELDS}
    if config.init_from:
        if any(v is not None for v in overrides.values()):
            raise UsageError("--init-from takes the pretrained model's shape and pieces: drop "
                             f"{', '.join(flag(k) for k, v in overrides.items() if v is not None)}")
        return GPTConfig.from_pretrained(config.init_from, dropout=config.dropout or 0.0)
    try:
        return config_from_preset(config.preset, config.arch, **overrides, dropout=config.dropout)
    except ValueError as e:  # an unknown preset or architecture, or sizes that do not fit together
        raise UsageError(f"--preset {config.preset} --arch {config.arch} with the sizes given: {e}") from e


# ---- Evaluation ----


class ValidationLoss(NamedTuple):
    loss: float  # mean cross-entropy per token, in nats
    tokens: int  # tokens it was measured on
    whole_split: bool  # whether those were every window of the validation split
    bits_per_byte: float  # the same loss in bits per byte of the text predicted: comparable across tokenizers


class ValidationSplit(NamedTuple):
    windows: TokenWindows  # the split's non-overlapping windows, in order
    token_bytes: torch.Tensor  # (V,) UTF-8 bytes of each id's text, 0 for <|endoftext|>


def fixed_batches(windows, batch_size, eval_steps, run):
    """The windows of every periodic evaluation, the same each time, so that the curve compares over
    steps and across runs: the first eval_steps micro-batches of the validation split, where process
    r of N takes micro-batches r, r + N, ..."""
    steps = min(eval_steps, windows.batches_per_epoch // run.world_size)  # a small split has fewer
    return [range(b * batch_size, (b + 1) * batch_size) for b in range(run.rank, steps * run.world_size, run.world_size)]


def whole_split_batches(windows, batch_size, max_tokens, run):
    """Every non-overlapping window of the validation split, up to max_tokens: the run's result.
    Process r of N takes windows r, r + N, ..., batch_size at a time. Sharded, each forward pass needs
    every process, so those with fewer batches get empty ones (a pass whose loss is not counted)."""
    count = min(windows.n_windows, max(1, max_tokens // windows.T))
    mine = range(run.rank, count, run.world_size)
    batches = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
    return batches + [range(0)] * ((run.max_over_processes(len(batches)) - len(batches)) if run.sharded else 0)


@torch.no_grad()
def evaluate(model, split, batches, run):
    """The loss over `batches` (lists of window indices of the validation split) of every process: per
    token, and per byte of the text that the targets spell. A tokenizer with longer tokens has a
    higher loss per token for the same model of the text; bits per byte do not depend on it."""
    windows, token_bytes = split
    model.eval()
    total = torch.zeros(3, dtype=torch.float64, device=run.device)  # summed loss, tokens, bytes
    for batch in batches:
        x, y = run.inputs_and_targets(windows.stack(batch or [0]))
        with run.autocast():
            loss = model(x, y)[1].double()
        if not batch:
            continue  # a pass that only keeps the other processes company (whole_split_batches)
        count = torch.tensor(float(y.numel()), dtype=torch.float64, device=run.device)
        total += torch.stack([loss * y.numel(), count, token_bytes[y].sum().double()])
    run.sum_over_processes(total)
    model.train()
    loss, tokens, text_bytes = (total[0] / total[1]).item(), int(total[1].item()), total[2].item()
    bits_per_byte = loss * tokens / math.log(2) / text_bytes
    return ValidationLoss(loss, tokens, tokens == windows.n_windows * windows.T, bits_per_byte)


# ---- Set-up ----


def build_model(config, model_config, checkpoint):
    """The model to train: a checkpoint's, a pretrained GPT-2, or a new one, each of model_config's shape."""
    if not (checkpoint or config.init_from):
        return GPT(model_config)
    model = GPT.from_pretrained(checkpoint or config.init_from, dropout=model_config.dropout,
                                attention=model_config.attention)  # the path to the same values is the run's choice
    if model.config != model_config:
        raise CheckpointError(f"{checkpoint or config.init_from} holds a model of {model.config}, not the "
                              f"{model_config} that the settings give")
    return model


def sized_for_tokenizer(model_config, tokenizer, config):
    """The model's config for the dataset's tokenizer. A new model gets one row per id, padded to a
    multiple of 64 (GPT-2's 50,257 become 50,304; the padding logits are masked), and the tokenizer's
    end-of-text id; a pretrained one (--init-from) must have learned the same vocabulary."""
    if not config.init_from:
        rows = math.ceil(tokenizer.n_vocab / 64) * 64
        return replace(model_config, vocab_size=tokenizer.n_vocab, padded_vocab_size=rows, eot_token=tokenizer.eot_token)
    pretrained = model_tokenizer(convert.model_directory(config.init_from))
    if vocabulary_digest(pretrained) != vocabulary_digest(tokenizer):
        raise UsageError(f"--init-from {config.init_from} learned the ids of {describe(pretrained)}, the shards in "
                         f"{config.data} hold those of {describe(tokenizer)}; make the data with the model's tokenizer "
                         "(gpt_dataset.py --tokenizer gpt2 for GPT-2's)")
    return model_config


def set_up(config):
    """Everything the loop needs, in an order that refuses bad input before anything is written: the
    settings, the run directory and the checkpoint to resume, the processes and the device, the
    shards, then the model, optimizers and data position (restored from the checkpoint) and the
    run's monitor. Returns (runtime, training state, the models to train and to evaluate, validation
    split, monitor)."""
    rank, local_rank, world_size = torchrun_ranks()
    config.out_dir = choose_run_dir(config)
    derived_batch = config.tokens_per_step is None
    config, model_config, accumulation = resolve_config(config, world_size)
    recorded = recorded_setting(config.out_dir, "tokens_per_step") if config.resume and derived_batch else None
    micro_batches = config.tokens_per_step // accumulation  # tokens of one micro-batch in all processes
    if recorded and recorded % micro_batches == 0:  # the run's own global batch, with any number of processes
        config.tokens_per_step, accumulation = recorded, recorded // micro_batches
    data_shards = shard_checksums(config.data)  # what identifies the data: recorded in every checkpoint
    tokenizer_spec = load_manifest(config.data)["tokenizer"]
    tokenizer = dataset_tokenizer(config.data, tokenizer_spec)  # its file checked against the manifest's sha256
    model_config = sized_for_tokenizer(model_config, tokenizer, config)
    checkpoint, changed_settings = checkpoint_to_resume(config.out_dir, config, data_shards, tokenizer_spec,
                                                        world_size)
    device = process_device(config.device, local_rank, world_size)
    join_process_group(device, world_size, sharded=config.fsdp)
    if device.type == "cpu" and config.reuse_memory:
        reuse_freed_memory()
    run = Runtime(device, rank, world_size, training_autocast_dtype(config.dtype, device), accumulation, config.fsdp)
    compiled = config.compile if config.compile is not None else device.type == "cuda"
    start_console_log(run.master)
    # Shards are checked first (headers and sizes; sha256 with --verify-data), so bad data fails fast.
    train_shards = open_split(config.data, "train", verify=config.verify_data)
    val_shards = open_split(config.data, "val", verify=config.verify_data)

    torch.manual_seed(config.seed + rank)  # different dropout masks per rank; DDP copies rank 0's weights
    model = build_model(config, model_config, checkpoint).to(device)
    # On a CPU the head and the loss run as one pass (wikigpt/fused_loss.py); torch.compile and CUDA
    # have fused kernels of their own for the plain path.
    model.fused_loss = device.type == "cpu" and not compiled
    T, B = model.config.block_size, config.batch_size  # the model's context, which a checkpoint sets
    # Sharding replaces the weights by their shards, which the optimizers must be given: it comes first.
    train_model, eval_model = wrap_for_training(model, run, compiled=compiled,
                                                activation_checkpointing=config.activation_checkpointing)
    optimizers = make_optimizers(model, name=config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
                                 betas=(config.beta1, config.beta2), device_type=device.type,
                                 matmul_dtype=run.autocast_dtype or torch.float32)
    state = TrainingState(model, optimizers, torch.amp.GradScaler("cuda", enabled=run.autocast_dtype == torch.float16),
                          TokenWindows(train_shards, T, B, seed=config.seed, rank=rank, world_size=world_size),
                          settings=asdict(config), data_shards=data_shards, tokenizer=tokenizer_spec,
                          tokenizer_files=dataset_tokenizer_files(config.data, tokenizer_spec, T))
    val = ValidationSplit(TokenWindows(val_shards, T, B, seed=config.seed, rank=rank, world_size=world_size,
                                       shuffle=False), torch.tensor(token_byte_lengths(tokenizer), device=device))
    if checkpoint:
        saved = restore_checkpoint(checkpoint, state, run)["train_config"]
        if state.planned_steps and config.time_limit == saved.get("time_limit"):  # the steps that limit chose
            config.max_steps = min(config.max_steps, state.planned_steps)
        else:
            state.planned_steps = None  # no limit now, or another: --max-steps holds
    monitor = Monitor(config, run, tokenizer, flops_per_token=model.flops_per_token(T),
                      train_bytes_per_token=bytes_per_token(config.data, "train"))
    if run.master:
        prepare_run_dir(config.out_dir, config, model.config, state.step if checkpoint else None)
        monitor.open_tracker()
    monitor.start(model, checkpoint=checkpoint, start_step=state.step, compiled=compiled,
                  changed_settings=changed_settings)
    return run, state, (train_model, eval_model), val, monitor


# ---- The loop ----


def clip_and_step(state, loss, lr, grad_clip):
    """After the backward passes of a step: clips the gradients, sets the learning rate and updates
    the weights, unless the loss or the gradient norm is not finite, which would poison them. Returns
    (loss, gradient norm before clipping, whether the update was applied)."""
    for optimizer in state.optimizers:
        state.scaler.unscale_(optimizer)
    max_norm = grad_clip if grad_clip > 0 else float("inf")  # inf: measure, never clip
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_norm)
    for group in (group for optimizer in state.optimizers for group in optimizer.param_groups):
        group["lr"] = lr
    if hasattr(grad_norm, "full_tensor"):  # sharded: the norm over every process's shards, as one value
        grad_norm = grad_norm.full_tensor()
    loss_value, norm_value = loss.item(), grad_norm.item()
    # fp16 overflows are the gradient scaler's business (it skips and lowers the scale).
    applied = math.isfinite(loss_value) and (state.scaler.is_enabled() or math.isfinite(norm_value))
    if applied:
        for optimizer in state.optimizers:
            state.scaler.step(optimizer)
    state.scaler.update()
    for optimizer in state.optimizers:
        optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value, applied


def main(argv=None):
    config = parse_config(TrainConfig, argv, description=__doc__.split("\n\n")[0])
    budget = TimeBudget(config.time_limit, config.max_steps)  # --time-limit counts from here
    run, state, (model, eval_model), val_split, monitor = set_up(config)
    eval_batches = fixed_batches(val_split.windows, config.batch_size, config.eval_steps, run)
    final_batches = whole_split_batches(val_split.windows, config.batch_size, config.final_eval_tokens, run)
    final_share = len(final_batches) / max(1, len(eval_batches)) if config.final_eval_tokens else 0  # in evaluations
    stop, start_step, bad_steps, whole = StopSignal(), state.step, 0, None
    try:
        model.train()
        while True:
            if budget.due(state.step, config, start_step):  # --time-limit: as many steps as the pace allows
                config.max_steps = budget.plan(state.step, config, monitor.step_times, final_share, run)
                # recorded in checkpoints, for a resumed run to keep; None where --max-steps holds
                state.planned_steps = config.max_steps if config.max_steps < budget.max_steps else None
            last, val = state.step == config.max_steps, None
            stopping = run.any_process(stop.received is not None)  # every process stops at the same step
            if (state.step % config.eval_interval == 0 or last) and not stopping:
                eval_started = run.clock()
                val = evaluate(eval_model, val_split, eval_batches, run)
                state.best_val_loss = val.loss if state.best_val_loss is None else min(state.best_val_loss, val.loss)
                if last and config.final_eval_tokens:  # the run's result: every window of the split
                    whole = evaluate(eval_model, val_split, final_batches, run)
                monitor.evaluation(state.step, val, whole, state.model)
                budget.evaluated(run.clock() - eval_started)
            if (state.step % config.ckpt_interval == 0 and state.step > start_step) or last or stopping:
                rng = gather_rng_states(run)  # every process takes part in gathering them
                path = save_checkpoint(config.out_dir, state, val_loss=val.loss if val else None, rng=rng, run=run)
                if run.master:
                    prune_checkpoints(config.out_dir, config.keep_last)
                    logger.info(f"saved {path}")
            if last or stopping:
                break

            started = run.clock()
            lr = lr_at(state.step, max_lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
                       max_steps=config.max_steps, schedule=config.schedule, cooldown_frac=config.cooldown_frac)
            loss_sum = torch.zeros((), device=run.device)
            for micro in range(run.accumulation):
                x, y = run.inputs_and_targets(state.train_windows.next_batch())
                # Gradients are all-reduced across processes only on the last micro-batch.
                with run.gradient_sync(model, micro == run.accumulation - 1), run.autocast():
                    _, loss = model(x, y, mask_documents=config.mask_documents, z_loss=config.z_loss)
                    # The loss is a mean over tokens; dividing by the micro-batch count makes the summed
                    # gradients the mean over the whole step, as if it were one large batch.
                    loss = loss / run.accumulation
                loss_sum += loss.detach().float()
                state.scaler.scale(loss).backward()
            loss, norm, applied = clip_and_step(state, run.mean_over_processes(loss_sum), lr, config.grad_clip)
            elapsed = run.clock() - started
            state.step += 1
            bad_steps = 0 if applied else bad_steps + 1
            if applied:
                monitor.step(state.step, loss=loss, lr=lr, norm=norm, elapsed=elapsed)
            else:
                monitor.skipped_update_or_stop(state.step, bad_steps, loss, norm)  # stops the run at --max-bad-steps
        monitor.end(state.step, stop.received if stopping else None, whole)
        run.barrier()  # the processes leave their group together, with no collective still in flight
    finally:
        stop.restore()
        leave_process_group()


if __name__ == "__main__":
    end_process(run_cli(main))  # not sys.exit: see end_process
