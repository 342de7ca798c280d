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
    sharded/               of an FSDP run, instead of optimizer.safetensors: the model and optimizer
                           state in torch.distributed.checkpoint's format, one file per process and a
                           .metadata index; it loads into any number of processes
Nothing is pickled. A checkpoint is written under a temporary name and renamed when every file is on
disk, and renamed away before it is deleted, so a name `ckpt_N` always means a complete checkpoint.
"""

import errno
import glob
import json
import os
import re
import shutil
from dataclasses import dataclass, field

import torch

from wikigpt import convert
from wikigpt.cli import CheckpointError, UsageError

CHECKPOINT_NAME = re.compile(r"^ckpt_(\d{7})$")
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
SHARDED_DIR = "sharded"  # torch.distributed.checkpoint's files of an FSDP run
VAL_LOSS_KEY = "val_loss"  # validation loss at the checkpoint's step, or null if none was measured there


def checkpoint_dir(run_dir, step):
    return os.path.join(run_dir, f"ckpt_{step:07d}")


def hidden_checkpoint_dir(checkpoint, state):
    """The name a checkpoint has while it is written (state "tmp") or deleted ("deleted"): hidden, and
    never matched by checkpoints_in."""
    return os.path.join(os.path.dirname(checkpoint), f".{state}_{os.path.basename(checkpoint)}")


def checkpoints_in(run_dir):
    """Complete checkpoint directories of a run, oldest first. Partial ones (a crash mid-write) are
    still under a temporary name and never match."""
    found = [p for p in glob.glob(os.path.join(run_dir, "ckpt_*")) if CHECKPOINT_NAME.match(os.path.basename(p))]
    return sorted(p for p in found if os.path.isfile(os.path.join(p, "model.safetensors")) and
                  (not os.path.isdir(os.path.join(p, SHARDED_DIR)) or
                   os.path.isfile(os.path.join(p, SHARDED_DIR, ".metadata"))))


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
    """Deletes all but the newest `keep_last` checkpoints and the best by validation loss. Each is
    first renamed to a hidden name, so that a crash during the deletion never leaves a part of a
    checkpoint under a checkpoint's name. Called once a save is complete, it also deletes what killed
    runs left: partial writes and partial deletions."""
    checkpoints = checkpoints_in(run_dir)
    keep = set(checkpoints[-keep_last:]) if keep_last > 0 else set()
    keep.add(best_checkpoint(run_dir))
    keep.add(checkpoints[-1])
    for path in checkpoints:
        if path not in keep:
            os.rename(path, hidden_checkpoint_dir(path, "deleted"))
    for state in ("deleted", "tmp"):
        for leftover in glob.glob(hidden_checkpoint_dir(os.path.join(run_dir, "ckpt_*"), state)):
            shutil.rmtree(leftover, ignore_errors=True)


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
    planned_steps: int | None = None  # the steps that --time-limit chose, where fewer than --max-steps


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


def save_checkpoint(run_dir, state, *, val_loss, rng, run):
    """Writes ckpt_<step> atomically: everything goes into a temporary directory, which is renamed only
    once every file is on disk. `rng` holds the RNG states of every process. Unsharded, the first
    process writes it all; sharded, every process writes its part of the training state (DCP), which
    is never gathered in one process, while the first writes the rest. Returns the path."""
    final = checkpoint_dir(run_dir, state.step)
    if not (run.master or run.sharded) or os.path.isdir(final):
        return final  # not this process's to write, or saved already (a stop right after resuming): keep it
    tmp = hidden_checkpoint_dir(final, "tmp")
    error = None
    try:
        if run.master:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        if run.sharded:
            run.barrier()  # the directory exists before any process writes into it
        model_state = write_sharded_state(tmp, state) if run.sharded else state.model.state_dict()
        if run.master:
            write_checkpoint_files(tmp, state, model_state, val_loss=val_loss, rng=rng, run=run)
    except OSError as e:
        error = e
    if run.any_process(error is not None) if run.sharded else error is not None:
        if run.master:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(error, "strerror", None) or ("in another process" if error is None else type(error).__name__)
        raise UsageError(f"could not write checkpoint {final} ({reason}); earlier checkpoints are intact, "
                         "free disk space and resume with --resume") from error
    if run.master:
        os.rename(tmp, final)
    if run.sharded:
        run.barrier()  # no process goes on before the checkpoint has its name
    return final


def write_checkpoint_files(directory, state, model_state, *, val_loss, rng, run):
    """Everything of a checkpoint but the sharded training state: the model as Hugging Face's GPT-2
    (from `model_state`, a full state dict), its tokenizer, the optimizer state of an unsharded run,
    the RNG states and trainer_state.json; each file synced before the directory is renamed."""
    from safetensors.torch import save_file

    convert.write_hf_model(directory, model_state, state.model.config)  # config.json, model.safetensors, ...
    for name, data in state.tokenizer_files.items():  # so that AutoTokenizer and pipeline load it too
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    optimizer_meta = [None]
    if not run.sharded:
        tensors, optimizer_meta = flatten_optimizer_states(state.optimizers)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, os.path.join(directory, OPTIMIZER_FILE))
    save_file({f"rank{r}.{k}": v.cpu() for r, states in enumerate(rng) for k, v in states.items()},
              os.path.join(directory, RNG_FILE))
    trainer_state = {"step": state.step, "data": state.train_windows.state(), "optimizer": optimizer_meta[0],
                     "other_optimizers": optimizer_meta[1:], "sharded": run.sharded, "world_size": run.world_size,
                     "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else None,
                     VAL_LOSS_KEY: val_loss, "best_val_loss": state.best_val_loss, "planned_steps": state.planned_steps,
                     "train_config": state.settings, "data_shards": state.data_shards, "tokenizer": state.tokenizer}
    with open(os.path.join(directory, TRAINER_STATE), "w") as f:
        json.dump(trainer_state, f, indent=1)
    for name in os.listdir(directory):  # flush to disk before the rename makes the checkpoint visible
        if os.path.isfile(os.path.join(directory, name)):
            with open(os.path.join(directory, name), "rb") as f:
                os.fsync(f.fileno())


def restore_checkpoint(checkpoint, state, run):
    """The counterpart of save_checkpoint for everything but the model (GPT.from_pretrained reads that):
    puts back the optimizers, the gradient scaler, the data position, the step, best validation
    loss and planned steps, and this process's RNG states. Returns the checkpoint's trainer state."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    trainer_state = read_trainer_state(checkpoint)
    try:
        rng = load_file(os.path.join(checkpoint, RNG_FILE))
        state.train_windows.load_state(trainer_state["data"])
        if trainer_state.get("sharded"):
            read_sharded_state(os.path.join(checkpoint, SHARDED_DIR), state)
        else:
            restore_optimizers(checkpoint, trainer_state, state.optimizers)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise CheckpointError(f"{checkpoint} cannot be resumed: its training state is missing or damaged ({e}); "
                              "delete that directory to resume from the one before") from e
    if trainer_state.get("scaler") and state.scaler.is_enabled():
        state.scaler.load_state_dict(trainer_state["scaler"])
    state.step, state.best_val_loss = trainer_state["step"], trainer_state.get("best_val_loss")
    state.planned_steps = trainer_state.get("planned_steps")
    if f"rank{run.rank}.torch_cpu" in rng:
        torch.set_rng_state(rng[f"rank{run.rank}.torch_cpu"])
    if run.device.type == "cuda" and f"rank{run.rank}.torch_cuda" in rng:
        torch.cuda.set_rng_state(rng[f"rank{run.rank}.torch_cuda"], run.device)
    return trainer_state


def restore_optimizers(checkpoint, trainer_state, optimizers):
    """The optimizers' state of an unsharded checkpoint, from optimizer.safetensors and the JSON."""
    from safetensors.torch import load_file

    optimizer_tensors = load_file(os.path.join(checkpoint, OPTIMIZER_FILE))
    metas = [trainer_state["optimizer"], *trainer_state.get("other_optimizers", [])]
    if len(metas) != len(optimizers):
        raise CheckpointError(f"{checkpoint} was trained with --optimizer "
                              f"{trainer_state.get('train_config', {}).get('optimizer')}; resume it with the same optimizer")
    try:
        for index, (optimizer, meta) in enumerate(zip(optimizers, metas)):
            optimizer.load_state_dict(unflatten_optimizer_state(optimizer_tensors, meta, index))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{checkpoint} cannot be resumed: its optimizer state does not fit this model ({e})") from e


# ---- The sharded training state of an FSDP run ----


def write_sharded_state(directory, state):
    """Writes the model and optimizer state of a sharded run into directory/sharded, every process its
    own part, through torch.distributed.checkpoint (DCP). Returns the model's full state dict, gathered
    for the first process only (other processes get an empty one), for the Hugging Face copy."""
    # Imported here, as DCP is only needed by sharded runs and takes a second to import.
    from torch.distributed.checkpoint import FileSystemWriter, save
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    model_state, optimizer_state = get_state_dict(state.model, state.optimizers)
    try:
        save({"model": model_state, "optimizers": optimizer_state},
             storage_writer=FileSystemWriter(os.path.join(directory, SHARDED_DIR)))
    except CheckpointException as e:  # DCP's wrapper of a failed write (a full disk) in any process
        cause = next((exc for exc, _ in e.failures.values() if isinstance(exc, OSError)), None)
        raise cause or OSError(errno.EIO, str(e).splitlines()[0][:200]) from e
    return get_model_state_dict(state.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def read_sharded_state(directory, state):
    """Loads what write_sharded_state wrote into the sharded model and its optimizers, whatever the
    number of processes that wrote it: DCP reads each process's rows from whichever files hold them.
    Every file is checked first, so a missing or cut one is named before anything is read."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    reader = FileSystemReader(directory)
    try:
        needed = {}
        for item in reader.read_metadata().storage_data.values():
            needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    except (OSError, ValueError, EOFError, AttributeError) as e:
        raise CheckpointError(f"{directory}/.metadata is missing or damaged ({type(e).__name__}); delete that "
                              "checkpoint to resume from the one before") from e
    for name, size in sorted(needed.items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path) or os.path.getsize(path) < size:
            raise CheckpointError(f"{path} is missing or cut short (it must hold {size:,} bytes); copy it again, "
                                  "or delete that checkpoint to resume from the one before")
    model_state, optimizer_state = get_state_dict(state.model, state.optimizers)
    try:
        load({"model": model_state, "optimizers": optimizer_state}, storage_reader=reader)
    except CheckpointException as e:
        raise CheckpointError(f"{directory} cannot be read ({str(e).splitlines()[0][:200]}); delete that "
                              "checkpoint to resume from the one before") from e
    set_state_dict(state.model, state.optimizers, model_state_dict=model_state, optim_state_dict=optimizer_state)
