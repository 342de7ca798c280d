"""Checkpoints: one directory per saved step, whole or absent, that both continues a run bit for bit
and loads as a Hugging Face GPT-2.

Used by gpt_train.py (save, restore, prune) and, for finding checkpoints, by infer.py and
wikigpt/runs.py. A run directory holds checkpoints `ckpt_NNNNNNN/` (the optimizer step, seven digits),
each with
    config.json, model.safetensors, generation_config.json    the model (GPT.save_pretrained)
    tokenizer.json or vocab.json, merges.txt; ...            the tokenizer, as AutoTokenizer loads it
    trainer_state.json     step, data position, validation loss, the run's settings, its tokenizer and
                           the sha256 of its shards
    optimizer.safetensors  every optimizer's moments (their step counts and settings are in the JSON)
    rng.safetensors        the RNG states of every process
Nothing is pickled. A checkpoint is written under a temporary name and renamed when every file is on
disk, so a name `ckpt_N` always means a complete checkpoint.
"""

import glob
import json
import os
import re
import shutil
from dataclasses import dataclass, field

import torch

from wikigpt.cli import CheckpointError, UsageError

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


def read_trainer_state(checkpoint):
    """The trainer_state.json of a checkpoint, as a dict; a CheckpointError if it is missing or damaged."""
    path = os.path.join(checkpoint, TRAINER_STATE)
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is missing or damaged ({type(e).__name__}); resume from an older "
                              "checkpoint (move this one away) or start a new run") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; the checkpoint is damaged")
    return state


def checkpoint_val_loss(checkpoint):
    """The validation loss recorded with a checkpoint, or None (also where its state cannot be read)."""
    try:
        return read_trainer_state(checkpoint).get(VAL_LOSS_KEY)
    except CheckpointError:
        return None


def best_checkpoint(run_dir):
    """The run's checkpoint with the lowest validation loss, else its newest; None if it has none."""
    checkpoints = checkpoints_in(run_dir)
    scored = [(loss, path) for path in checkpoints if (loss := checkpoint_val_loss(path)) is not None]
    if scored:
        return min(scored)[1]
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(run_dir, keep_last):
    """Deletes all but the newest `keep_last` checkpoints and the best by validation loss."""
    checkpoints = checkpoints_in(run_dir)
    keep = set(checkpoints[-keep_last:]) if keep_last > 0 else set()
    keep.add(best_checkpoint(run_dir))
    keep.add(checkpoints[-1])
    for path in checkpoints:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


# ---- The training state ----


@dataclass
class TrainingState:
    """What a checkpoint holds of a run in progress, so that the loop passes one value around."""

    model: torch.nn.Module  # the plain GPT: not DDP's or torch.compile's wrapper
    optimizers: list
    scaler: torch.amp.GradScaler  # fp16's loss scale; disabled (and not saved) otherwise
    train_windows: object  # shards.TokenWindows: the data position
    settings: dict = field(default_factory=dict)  # the run's TrainConfig, recorded to compare on resume
    data_shards: list = field(default_factory=list)  # sha256 of every shard: what identifies the data
    tokenizer: dict = field(default_factory=dict)  # the dataset manifest's tokenizer block
    tokenizer_files: dict = field(default_factory=dict)  # {name: bytes} of its Hugging Face files
    step: int = 0  # optimizer steps done
    best_val_loss: float | None = None


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


def gather_rng_states(run):
    """The RNG states of every process, gathered in each, so that the writer saves them all. Every
    process must call it at the same point."""
    return run.gather_objects(rng_states(run.device))


# ---- Save and restore ----


def save_checkpoint(run_dir, state, *, val_loss, rng):
    """Writes ckpt_<step> atomically: everything goes into a temporary directory, which is renamed only
    once every file is on disk. `rng` holds the RNG states of every process. Returns the path."""
    from safetensors.torch import save_file

    final = checkpoint_dir(run_dir, state.step)
    if os.path.isdir(final):
        return final  # this step was saved already (a stop right after resuming): same state, keep it
    tmp = os.path.join(run_dir, "." + os.path.basename(final).replace("ckpt_", "tmp_ckpt_"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        state.model.save_pretrained(tmp)  # model.safetensors, config.json, generation_config.json
        for name, data in state.tokenizer_files.items():  # so that AutoTokenizer and pipeline load it too
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        tensors, optimizer_meta = flatten_optimizer_states(state.optimizers)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, os.path.join(tmp, OPTIMIZER_FILE))
        save_file({f"rank{r}.{k}": v.cpu() for r, states in enumerate(rng) for k, v in states.items()},
                  os.path.join(tmp, RNG_FILE))
        trainer_state = {"step": state.step, "data": state.train_windows.state(), "optimizer": optimizer_meta[0],
                         "other_optimizers": optimizer_meta[1:],
                         "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else None,
                         VAL_LOSS_KEY: val_loss, "best_val_loss": state.best_val_loss,
                         "train_config": state.settings, "data_shards": state.data_shards,
                         "tokenizer": state.tokenizer}
        with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
            json.dump(trainer_state, f, indent=1)
        for name in os.listdir(tmp):  # flush to disk before the rename makes the checkpoint visible
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"could not write checkpoint {final} ({e.strerror}); earlier checkpoints are intact, "
                         "free disk space and resume with --resume") from e
    return final


def restore_checkpoint(checkpoint, state, run):
    """The counterpart of save_checkpoint for everything but the model (GPT.from_pretrained reads that):
    puts back the optimizers, the gradient scaler, the data position, the step and best validation
    loss, and this process's RNG states. Returns the checkpoint's trainer state."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    trainer_state = read_trainer_state(checkpoint)
    try:
        optimizer_tensors = load_file(os.path.join(checkpoint, OPTIMIZER_FILE))
        rng = load_file(os.path.join(checkpoint, RNG_FILE))
        metas = [trainer_state["optimizer"], *trainer_state.get("other_optimizers", [])]
        state.train_windows.load_state(trainer_state["data"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise CheckpointError(f"{checkpoint} cannot be resumed: its training state is missing or damaged ({e}); "
                              "delete that directory to resume from the one before") from e
    if len(metas) != len(state.optimizers):
        raise CheckpointError(f"{checkpoint} was trained with --optimizer "
                              f"{trainer_state.get('train_config', {}).get('optimizer')}; resume it with the same optimizer")
    try:
        for index, (optimizer, meta) in enumerate(zip(state.optimizers, metas)):
            optimizer.load_state_dict(unflatten_optimizer_state(optimizer_tensors, meta, index))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{checkpoint} cannot be resumed: its optimizer state does not fit this model ({e})") from e
    if trainer_state.get("scaler") and state.scaler.is_enabled():
        state.scaler.load_state_dict(trainer_state["scaler"])
    state.step, state.best_val_loss = trainer_state["step"], trainer_state.get("best_val_loss")
    if f"rank{run.rank}.torch_cpu" in rng:
        torch.set_rng_state(rng[f"rank{run.rank}.torch_cpu"])
    if run.device.type == "cuda" and f"rank{run.rank}.torch_cuda" in rng:
        torch.cuda.set_rng_state(rng[f"rank{run.rank}.torch_cuda"], run.device)
    return trainer_state
