"""What a training run shows of itself: the console and train.log lines, metrics.jsonl and the
experiment trackers that get the same rows, plots.png, text samples, and the measures behind them
(peak FLOP/s for MFU, memory).

Used by gpt_train.py, through one Monitor per run. Every process may call it; only the first one
(rank 0) prints and writes, since the others would repeat the same lines.
"""

import functools
import importlib
import json
import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
from loguru import logger

from wikigpt.cli import UsageError
from wikigpt.generation import generate_text

# ---- Measures ----

PEAK_BF16_TFLOPS = {  # dense bf16 tensor-core peaks from the vendors' data sheets, per GPU
    "H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0,
    "A100": 312.0, "A10G": 125.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0, "RTX 4090": 165.0,
    "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0,
}


def peak_flops(device, dtype=torch.bfloat16):
    """(FLOP/s that MFU is measured against, what that figure is), or (None, None) where unknown (no
    MFU is shown). A GPU: its data sheet's bf16 peak, by its name. A CPU: its own rate for square
    matrix products in the dtype the matmuls run in (bf16 under autocast, else float32), measured here
    (matmul_rate): data sheets give no dependable figure for a share of a server's cores."""
    if device.type == "cpu":
        rate = matmul_rate(dtype)
        return rate, f"this CPU's measured {str(dtype)[6:]} matmul rate, {rate / 1e9:,.0f} GFLOP/s"
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():  # longer names first where they share a prefix
        if key in name:
            return tflops * 1e12, f"the {key}'s bf16 peak, {tflops:,.0f} TFLOP/s"
    return None, None


@functools.cache  # once per process and dtype: every run and bench row of a process compares alike
def matmul_rate(dtype, sizes=(512, 1024, 2048), repeats=5):
    """The best FLOP/s of square (n x n) @ (n x n) products in `dtype` on this CPU, with the threads
    torch uses: what a training step's matrix products could reach (2 n^3 FLOPs each; the first
    product of each size, which warms the kernels up, is not counted). A shared VM's rate moves by
    10-20% from second to second, so the best of several is its peak. About 0.6 s on 2 cores."""
    best, generator = 0.0, torch.Generator().manual_seed(0)  # its own: the run's RNG state is left as it was
    for n in sizes:
        a, b = (torch.randn(n, n, generator=generator).to(dtype) for _ in range(2))
        torch.mm(a, b)
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - started))
    return best


def memory_in_use(device):
    """(label, GiB): peak CUDA memory allocated, else the process's peak resident memory."""
    if device.type == "cuda":
        return "cuda_peak", torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # Unix only; imported here so that the rest runs on Windows too

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return "rss_peak", rss / (2**30 if sys.platform == "darwin" else 2**20)


def describe_loss(result):
    """A validation result as the log shows it: bits per byte first (comparable across tokenizers),
    then nats per token and perplexity (e^loss: as unsure as a uniform choice among that many tokens),
    which compare only runs of one tokenizer."""
    return (f"{result.bits_per_byte:.3f} bits/byte | loss {result.loss:.4f} nats/token | "
            f"perplexity {math.exp(min(result.loss, 50)):.1f}")


def sample_text(model, tokenizer, *, max_new_tokens, seed, to_the_end=False):
    """A continuation of <|endoftext|> (the start of a new article), as text: what the model writes
    now, sampled as infer.py does by default, up to the next <|endoftext|>. `to_the_end` generates all
    max_new_tokens before cutting there: a sharded model's processes must make every pass together."""
    text = generate_text(model, tokenizer, [tokenizer.eot_token], max_new_tokens=max_new_tokens, seed=seed,
                         stop_at_eot=not to_the_end)
    return text.split("<|endoftext|>")[0]


# ---- metrics.jsonl and trackers ----


class MetricsLog:
    """metrics.jsonl of a run (one JSON row per step and per evaluation), and the experiment tracker
    that gets the same rows, if --tracker names one."""

    def __init__(self, path, tracker=None):
        self.path, self.tracker = path, tracker
        self.rows_appended = 0  # by this process

    def append(self, row):
        self.rows_appended += 1
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
        return importlib.import_module("torch.utils.tensorboard" if name == "tensorboard" else "wandb")
    except ImportError as e:
        raise UsageError(f"--tracker {name} needs the {name} package: pip install {name}") from e


def open_tracker(name, settings, run_dir):
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
                id=run_id, resume="allow", config=settings, dir=run_dir)
    return lambda metrics, step: module.log(metrics, step=step)


# Drawing the plots takes about a third of a second on a CPU: with evaluations every few seconds (a
# short --eval-interval, a fast GPU) they are redrawn at most this often, and always at the end.
PLOT_INTERVAL_S = 30


def plot_metrics(metrics_path, png_path):
    """Four panels against the step: train and validation loss in bits per byte (the training loss at
    its split's mean bytes per token), learning rate, tokens/s and memory."""
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
    ax.plot([r["step"] for r in train], [r["bits_per_byte"] for r in train], lw=0.8, alpha=0.7, label="train")
    if val:
        ax.plot([r["step"] for r in val], [r["val_bits_per_byte"] for r in val], "o-",
                label="validation (fixed batches)")
    whole = [r for r in val if "whole_val_loss" in r]
    if whole:
        ax.plot([r["step"] for r in whole], [r["whole_val_bits_per_byte"] for r in whole], "*", markersize=12,
                label="validation, whole split")
    ax.set(title="Loss", xlabel="step", ylabel="bits per byte of text (log scale)", yscale="log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
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


# ---- The run's lines ----


def start_console_log(master):
    """Log lines with the time of day, from the first process only (the others would repeat them)."""
    logger.remove()
    if master:
        logger.add(sys.stderr, format="{time:HH:mm:ss} | {message}", level="INFO")


class Monitor:
    """The log lines, metrics rows, samples and plots of one run. `config` is the run's TrainConfig
    (max_steps, tokens_per_step, sample_tokens, seed, out_dir, tracker), `run` its Runtime."""

    def __init__(self, config, run, tokenizer, *, flops_per_token, train_bytes_per_token):
        self.config, self.run, self.tokenizer = config, run, tokenizer
        self.flops_per_token = flops_per_token
        self.peak, self.peak_basis = peak_flops(run.device, run.autocast_dtype or torch.float32)
        self.train_bytes_per_token = train_bytes_per_token  # of the training split, from its manifest
        self.metrics = MetricsLog(os.path.join(config.out_dir, "metrics.jsonl"))
        self.plots = os.path.join(config.out_dir, "plots.png")
        self.plotted = None  # (rows appended, clock) at the last drawing of the plots
        self.step_times = []

    def open_tracker(self):
        if self.run.master:
            self.metrics.tracker = open_tracker(self.config.tracker, asdict(self.config), self.config.out_dir)

    def start(self, model, *, checkpoint, start_step, compiled, changed_settings):
        """What the run is: its settings, the model, the device and batch, where it resumes from and
        what changed since its checkpoint."""
        config, run, c = self.config, self.run, model.config
        origin = "resumed" if checkpoint else f"from {config.init_from}" if config.init_from else "new"
        logger.info(f"config: {json.dumps(asdict(config))}")
        logger.info(f"model ({origin}): {model.num_params():,} parameters ({model.num_params(embeddings=False):,} "
                    f"without embeddings), {c.n_layer} layers, {c.n_head} heads of {c.head_dim}, width {c.n_embd}, "
                    f"context {c.block_size}, {c.norm}, {c.positions} positions, {c.mlp} MLP, qk-norm {c.qk_norm}, "
                    f"tied head {c.tie_embeddings}, biases {c.bias}, dropout {c.dropout}"
                    + (" (--dropout to change)" if config.dropout is None else ""))
        logger.info(f"device {run.device}, {run.world_size} process(es), autocast "
                    f"{run.autocast_dtype or 'off (float32)'}, compile {compiled}; {config.tokens_per_step:,} tokens "
                    f"per step = {run.world_size} x {run.accumulation} micro-batch(es) x {config.batch_size} x "
                    f"{c.block_size}; {self.flops_per_token / 1e6:.1f} MFLOP per token"
                    + (f"; MFU against {self.peak_basis}" if self.peak else ""))
        logger.info(f"tokenizer {self.tokenizer.name}: {self.tokenizer.n_vocab:,} ids; run directory {config.out_dir}")
        if checkpoint:
            logger.info(f"resuming from {checkpoint} at step {start_step}")
        for change in changed_settings:
            logger.info(f"changed since the run began: {change}")

    def step(self, step, *, loss, lr, norm, elapsed):
        """One line per optimizer step on the console and in metrics.jsonl."""
        self.step_times.append(elapsed)
        if not self.run.master:
            return
        tokens_per_s = self.config.tokens_per_step / elapsed
        memory_label, memory = memory_in_use(self.run.device)
        eta = (self.config.max_steps - step) * float(np.median(self.step_times[-20:]))
        mfu = self.flops_per_token * tokens_per_s / self.run.world_size / self.peak if self.peak else None
        logger.info(f"step {step}/{self.config.max_steps} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.2f} | "
                    f"{elapsed * 1000:.0f} ms | {tokens_per_s:,.0f} tok/s"
                    + (f" | MFU {mfu:.1%}" if mfu is not None else "")
                    + f" | {memory_label} {memory:.2f} GiB | ETA {eta / 60:.1f} min")
        bits_per_byte = loss / math.log(2) / self.train_bytes_per_token  # at the split's mean bytes per token
        self.metrics.append({"step": step, "loss": loss, "bits_per_byte": bits_per_byte, "lr": lr, "grad_norm": norm,
                             "ms": elapsed * 1000, "tokens_per_s": tokens_per_s, "mfu": mfu, "mfu_of": self.peak_basis,
                             "memory": memory_label, "memory_gib": memory})

    def skipped_update_or_stop(self, step, bad_steps, loss, norm):
        """Warns of a skipped update; the run stops at --max-bad-steps of them in a row."""
        logger.warning(f"step {step}: non-finite loss {loss} or gradient norm {norm}; update skipped "
                       f"({bad_steps} in a row)")
        if bad_steps >= self.config.max_bad_steps:
            raise UsageError(f"{bad_steps} non-finite steps in a row at step {step}: training stopped, the last "
                             f"checkpoint in {self.config.out_dir} is intact; lower --lr or check the data")

    def evaluation(self, step, val, whole, model):
        """Logs the validation loss of the fixed batches (`val`) and, at the end, of the whole split
        (`whole`, or None), appends them to metrics.jsonl, prints a text sample and redraws the plots
        if PLOT_INTERVAL_S have passed since they were last drawn."""
        sample = None
        if self.config.sample_tokens and (self.run.master or self.run.sharded):
            model.eval()
            sample = sample_text(model, self.tokenizer, max_new_tokens=self.config.sample_tokens, seed=self.config.seed,
                                 to_the_end=self.run.sharded)
            model.train()
        if not self.run.master:
            return
        logger.info(f"step {step}: val {describe_loss(val)}")
        row = {"step": step, "val_loss": val.loss, "val_bits_per_byte": val.bits_per_byte}
        if whole:
            scope = ("the whole validation split" if whole.whole_split
                     else "the validation split's first windows (--final-eval-tokens)")
            logger.info(f"step {step}: val over {scope} ({whole.tokens:,} tokens) {describe_loss(whole)}")
            row.update(whole_val_loss=whole.loss, whole_val_tokens=whole.tokens,
                       whole_val_bits_per_byte=whole.bits_per_byte)
        self.metrics.append(row)
        if sample is not None:
            logger.info(f"sample: {sample!r}")
        if self.plotted is None or time.monotonic() - self.plotted[1] >= PLOT_INTERVAL_S:
            self.plot()

    def plot(self):
        plot_metrics(self.metrics.path, self.plots)
        self.plotted = (self.metrics.rows_appended, time.monotonic())

    def end(self, step, stopped_by, whole):
        if not self.run.master:
            return
        if self.plotted is None or self.plotted[0] != self.metrics.rows_appended:  # rows the plots lack
            self.plot()
        if stopped_by:
            logger.info(f"stopped by {stopped_by} at step {step}; continue with the same command and --resume")
            return
        if not whole:
            result = "not measured (--final-eval-tokens 0)"
        else:
            scope = "the whole validation split" if whole.whole_split else f"{whole.tokens:,} validation tokens"
            result = f"{whole.bits_per_byte:.3f} bits per byte ({whole.loss:.4f} nats per token) over {scope}"
        logger.info(f"done: {step} steps, validation {result}; plots in {self.plots}")
