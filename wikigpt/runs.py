"""Run directories: which one a command trains in, which of them is the newest, and whether a
--resume may continue the run it holds.

Used by gpt_train.py (choose_run_dir, checkpoint_to_resume, prepare_run_dir) and infer.py
(newest_run). A run directory holds train_config.json, metrics.jsonl, train.log, plots.png and the
checkpoints of wikigpt/checkpoint.py.
"""

import glob
import itertools
import json
import os
import re
from dataclasses import asdict

from loguru import logger

from wikigpt.checkpoint import checkpoints_in, read_trainer_state
from wikigpt.cli import CheckpointError, UsageError, flag


def newest_run(run_dirs):
    """Of the directories `run_dirs`, the one whose newest checkpoint is the most recent, or None."""
    runs = [d for d in run_dirs if checkpoints_in(d)]
    return max(runs, key=lambda d: os.path.getmtime(checkpoints_in(d)[-1])) if runs else None


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
# directory may move (another machine, another mount), as long as it holds the same shards. The number
# of processes may change too: the global batch and the data position do not depend on it. --fsdp may
# not: a sharded checkpoint holds its training state in another format than an unsharded one.
MAY_CHANGE_ON_RESUME = ("data", "out_dir", "resume", "max_steps", "time_limit", "eval_interval", "eval_steps",
                        "final_eval_tokens", "ckpt_interval", "keep_last", "sample_tokens", "compile", "reuse_memory",
                        "dtype", "device", "max_bad_steps", "verify_data", "activation_checkpointing")


def recorded_setting(run_dir, name):
    """A setting as the newest checkpoint of a run recorded it, or None (no checkpoint, or unreadable:
    checkpoint_to_resume then says why)."""
    found = checkpoints_in(run_dir)
    try:
        return read_trainer_state(found[-1])["train_config"][name] if found else None
    except (CheckpointError, KeyError, TypeError):
        return None


def checkpoint_to_resume(run_dir, config, data_shards, tokenizer, world_size):
    """(the newest complete checkpoint with --resume, else None; the settings changed since that
    checkpoint was written, which recorded them, as "--flag old -> new", and the number of processes).
    Refuses to start a new run over an old one, and to resume with settings that would make it another
    run: other flags, shards of another tokenizer (`tokenizer`: the manifest's block), other shards."""
    found = checkpoints_in(run_dir)
    if config.resume and not found:
        raise UsageError(f"--resume: {run_dir} holds no complete checkpoint; start without --resume")
    if not config.resume and found:
        raise UsageError(f"{run_dir} already holds checkpoints; pass --resume to continue that run, "
                         "or choose another --out-dir")
    if not config.resume:
        return None, []
    state = read_trainer_state(found[-1])
    path = os.path.join(found[-1], "trainer_state.json")
    saved = state.get("train_config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} is damaged (it records no settings); resume from an older checkpoint "
                              "(move this one away) or start a new run")
    saved_tokenizer = state.get("tokenizer", tokenizer)
    if (saved_tokenizer.get("kind"), saved_tokenizer.get("sha256")) != (tokenizer["kind"], tokenizer["sha256"]):
        raise UsageError(f"--resume: the shards in {config.data} hold ids of a {tokenizer['kind']} tokenizer of "
                         f"{tokenizer['vocab_size']:,} ids, the run was trained on a {saved_tokenizer.get('kind')} "
                         f"tokenizer of {saved_tokenizer.get('vocab_size', 0):,} ids ({path}); resume with the run's "
                         "dataset, or start a new run")
    if state.get("data_shards", data_shards) != data_shards:
        raise UsageError(f"--resume: {config.data} holds other shards than the run was trained on (their sha256 "
                         f"differ from {path}); resume with the run's dataset, or start a new run")
    now = asdict(config)
    changes = {k: f"{flag(k)} {saved[k]} -> {now[k]}" for k in now if k in saved and saved[k] != now[k]}
    refused = [text for k, text in changes.items() if k not in MAY_CHANGE_ON_RESUME]
    if refused:
        raise UsageError(f"--resume: {'; '.join(refused)} differ(s) from {path}; resume with the run's settings, "
                         "or start a new run in another --out-dir")
    changed = [text for k, text in changes.items() if k != "resume"]
    if state.get("world_size", world_size) != world_size:
        changed.append(f"processes {state['world_size']} -> {world_size} (the same global batch, micro-batches "
                       "per process rescaled; the data position follows)")
    return found[-1], changed


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
