"""What more than one script needs, defined once: the vocabulary, the errors, the command line, the
device, and the layout of a checkpoint directory.

Why a module of its own: each of gpt_dataset.py, gpt_train.py and infer.py stands alone and does one
job, but all three parse a dataclass into flags and report bad input in one line, training and
inference pick a device the same way, and the trainer writes the checkpoint directories that
inference finds. Kept here, each script imports only this and what its job needs (the dataset does
not import torch; training does not import inference).
"""

import argparse
import dataclasses
import glob
import inspect
import json
import os
import re
import sys
import types

# ---- GPT-2's vocabulary ----

VOCAB_SIZE = 50257  # BPE tokens of GPT-2, the last one being <|endoftext|>
EOT_TOKEN = 50256  # <|endoftext|>: starts every training article and ends a generated text


# ---- Errors: bad input is reported as one line, without a traceback ----


class UsageError(Exception):
    """Bad input from the user (flags, files, network); the message says what is wrong and what to do."""


class DataError(UsageError):
    """A shard, manifest or source that cannot be used."""


class CheckpointError(UsageError):
    """A model or checkpoint directory that cannot be used."""


# ---- Command lines: one dataclass per script, one --flag per field ----


def field_comments(cls):
    """{field: comment} from the `name: type = default  # comment` lines of a dataclass's source."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2)
    return comments


def parse_config(cls, argv=None, description=None):
    """An instance of dataclass `cls` from the command line: one --flag per field, help from comments."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = f.type
        if isinstance(kind, types.UnionType):  # `int | None`: parse as int
            kind = next(t for t in kind.__args__ if t is not type(None))
        help_text = comments.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=help_text,
                                metavar=kind.__name__.upper())
    return cls(**vars(parser.parse_args(argv)))


def run_cli(main):
    """Runs main(); bad input ends in one line on stderr and a non-zero exit instead of a traceback."""
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue", file=sys.stderr)
        sys.exit(130)


# ---- Devices ----

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def check_dtype_name(name):
    """Refuses a --dtype that is neither 'auto' nor one of DTYPE_NAMES."""
    if name != "auto" and name not in DTYPE_NAMES:
        raise UsageError(f"--dtype must be auto, {', '.join(DTYPE_NAMES)}, got {name!r}")


def pick_device(requested):
    """A torch.device from 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', refusing what this machine lacks."""
    import torch

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


# ---- Checkpoint directories ----
# A run directory holds checkpoints `ckpt_NNNNNNN/` (the optimizer step, seven digits). Each holds the
# model as Hugging Face's GPT-2 (config.json, model.safetensors) and the training state: TRAINER_STATE
# (JSON: step, data position, VAL_LOSS_KEY, ...), OPTIMIZER_FILE and RNG_FILE (safetensors).
# gpt_train.py writes them under a temporary name and renames them when complete.

CHECKPOINT_NAME = re.compile(r"^ckpt_(\d{7})$")
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
VAL_LOSS_KEY = "val_loss"  # validation loss at the checkpoint's step, or null if none was measured there


def checkpoint_dir(run_dir, step):
    return os.path.join(run_dir, f"ckpt_{step:07d}")


def checkpoints_in(run_dir):
    """Complete checkpoint directories of a run, oldest first. Partial ones (a crash mid-write) are
    still under a temporary name and never match."""
    found = [p for p in glob.glob(os.path.join(run_dir, "ckpt_*")) if CHECKPOINT_NAME.match(os.path.basename(p))]
    return sorted(p for p in found if os.path.isfile(os.path.join(p, "model.safetensors")))


def checkpoint_val_loss(checkpoint):
    """The validation loss recorded with a checkpoint, or None."""
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE)) as f:
            return json.load(f).get(VAL_LOSS_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def best_checkpoint(run_dir):
    """The run's checkpoint with the lowest validation loss, else its newest; None if it has none."""
    checkpoints = checkpoints_in(run_dir)
    scored = [(loss, path) for path in checkpoints if (loss := checkpoint_val_loss(path)) is not None]
    if scored:
        return min(scored)[1]
    return checkpoints[-1] if checkpoints else None


def newest_run(run_dirs):
    """Of the directories `run_dirs`, the one whose newest checkpoint is the most recent, or None."""
    runs = [d for d in run_dirs if checkpoints_in(d)]
    return max(runs, key=lambda d: os.path.getmtime(checkpoints_in(d)[-1])) if runs else None
