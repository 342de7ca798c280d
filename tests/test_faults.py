"""Fault injection: kill -9, signals at bad moments, full disks. Nothing may be lost or silently wrong.

Figures from these tests are recorded in docs/reliability.md. They run in the default suite (about
three minutes on 2 cores).
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import gpt_dataset
import gpt_train
from wikigpt.checkpoint import TrainingState, checkpoints_in, prune_checkpoints, restore_checkpoint
from wikigpt.cli import UsageError
from wikigpt.files import file_sha256
from wikigpt.runtime import Runtime
from wikigpt.shards import TokenWindows, open_shard
from conftest import (FAST_TRAINING, articles_read, assert_one_clear_error, run_script, script, steps_logged,
                      wait_for_work)
from transformer import GPT

FAST = [*FAST_TRAINING, "--sample-tokens", "0", "--dropout", "0.1"]


def train_command(sample_dir, run, *extra):
    return script("gpt_train.py", "--data", sample_dir, "--out-dir", str(run), *FAST, *extra)


def final_weights(run):
    return load_file(os.path.join(checkpoints_in(str(run))[-1], "model.safetensors"))


def restore(checkpoint):
    """Loads a checkpoint as --resume does (model, optimizer, data position, RNG); returns its trainer state."""
    model = GPT.from_pretrained(checkpoint)
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        name = json.load(f)["train_config"]["optimizer"]
    optimizers = gpt_train.make_optimizers(model, name=name, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                                           device_type="cpu")
    windows = TokenWindows([np.zeros(1000, np.uint16)], 32, 4, seed=0)
    rng = torch.get_rng_state()
    try:
        state = TrainingState(model, optimizers, torch.amp.GradScaler("cuda", enabled=False), windows)
        return restore_checkpoint(checkpoint, state, Runtime(torch.device("cpu")))
    finally:
        torch.set_rng_state(rng)


def checkpoint_fingerprint(checkpoint):
    """What a checkpoint holds of a run, as sha256s: weights, optimizer moments, RNG states, data position."""
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        state = json.load(f)
    files = {n: file_sha256(os.path.join(checkpoint, n)) for n in ["model.safetensors", "optimizer.safetensors",
                                                                      "rng.safetensors"]}
    return {**files, "step": state["step"], "data": state["data"]}


def test_training_killed_20_times_resumes_to_bit_identical_weights(bpe_sample_dir, tmp_path):
    """kill -9 after a random number of steps, checkpoints written every step (so many kills land inside a
    write). After every kill, each complete checkpoint equals the uninterrupted run's of the same step."""
    args = ["--max-steps", "150", "--ckpt-interval", "1", "--eval-interval", "10"]  # 20 kills reach step <= 120
    reference = tmp_path / "reference"
    result = subprocess.run(train_command(bpe_sample_dir, reference, *args, "--keep-last", "1000"), capture_output=True)
    assert result.returncode == 0
    expected = {os.path.basename(c): checkpoint_fingerprint(c) for c in checkpoints_in(str(reference))}
    assert len(expected) == 150

    run = tmp_path / "killed"
    rng = random.Random(1)
    kills = 0
    while kills < 20:
        resume = ["--resume"] if checkpoints_in(str(run)) else []
        process = subprocess.Popen(train_command(bpe_sample_dir, run, *args, "--keep-last", "2", *resume),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_for_work(process, steps_logged(run / "metrics.jsonl"), rng.randint(1, 5)):
            break  # finished before the kill (then the assertion below fails)
        pause = rng.uniform(0.0, 0.02)
        time.sleep(pause)  # into the next checkpoint write or step, at a random point
        process.kill()
        process.wait()
        kills += 1
        newest = checkpoints_in(str(run))
        if newest:  # the newest complete checkpoint always loads, model and training state
            restore(newest[-1])
        for name in os.listdir(run):  # a partial write never carries a checkpoint's name
            if name.startswith("ckpt_"):
                assert os.path.isfile(run / name / "trainer_state.json"), name
        for checkpoint in newest:
            got, name = checkpoint_fingerprint(checkpoint), os.path.basename(checkpoint)
            differing = [k for k in got if got[k] != expected[name][k]]
            assert not differing, f"kill {kills} ({pause * 1000:.1f} ms after a step): {name} differs in {differing}"
    assert kills == 20
    result = subprocess.run(train_command(bpe_sample_dir, run, *args, "--keep-last", "2", "--resume"),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    expected_weights, got = load_file(reference / "ckpt_0000150" / "model.safetensors"), final_weights(run)
    assert checkpoints_in(str(run))[-1].endswith("ckpt_0000150")
    assert all(torch.equal(expected_weights[k], got[k]) for k in expected_weights)


@pytest.mark.parametrize("moment", ["training", "evaluation", "checkpoint write"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_at_any_moment_leaves_a_complete_checkpoint(sample_dir, tmp_path, moment, sig):
    settings = {
        "training": ["--eval-interval", "100000", "--ckpt-interval", "100000"],
        "evaluation": ["--eval-interval", "1", "--eval-steps", "12", "--ckpt-interval", "100000"],
        "checkpoint write": ["--eval-interval", "100000", "--ckpt-interval", "1", "--keep-last", "1"],
    }[moment]
    run = tmp_path / "run"
    process = subprocess.Popen(train_command(sample_dir, run, "--max-steps", "100000", *settings),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert wait_for_work(process, steps_logged(run / "metrics.jsonl"), random.Random(moment).randint(2, 6))
    # Frozen at whatever it is doing, the run gets the signal: it must finish at most the step under way.
    process.send_signal(signal.SIGSTOP)
    steps_done = steps_logged(run / "metrics.jsonl")()
    process.send_signal(sig)
    process.send_signal(signal.SIGCONT)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-2000:]
    assert f"stopped by {sig.name}" in output
    newest = checkpoints_in(str(run))[-1]
    state = restore(newest)
    assert state["step"] == steps_logged(run / "metrics.jsonl")() <= steps_done + 1


def test_dataset_killed_20_times_rebuilds_identical_files(tmp_path):
    args = script("gpt_dataset.py", "--source", "sample", "--shard-tokens", "1000", "--workers", "2",
                  "--batch-chars", "5000")  # a thousand progress records: far more than 20 kills use up
    reference = tmp_path / "reference"
    assert subprocess.run(args + ["--out", str(reference)], capture_output=True).returncode == 0
    expected = {n: file_sha256(reference / n) for n in os.listdir(reference)}

    out = tmp_path / "killed"
    rng = random.Random(2)
    kills = 0
    for _ in range(20):
        process = subprocess.Popen(args + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_for_work(process, articles_read(out / "progress.json"), rng.randint(1, 3)):
            break  # this run wrote a shard of its own before it died, or it finished (then the assertion fails)
        time.sleep(rng.uniform(0, 0.005))
        process.kill()
        process.wait()
        kills += 1
    assert kills == 20
    assert subprocess.run(args + ["--out", str(out)], capture_output=True).returncode == 0
    assert {n: file_sha256(out / n) for n in os.listdir(out)} == expected


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_kill_while_pruning_never_leaves_part_of_a_checkpoint_under_its_name(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        checkpoint = tmp_path / f"ckpt_{step:07d}"
        checkpoint.mkdir()
        for name in ("model.safetensors", "optimizer.safetensors", "trainer_state.json"):
            (checkpoint / name).write_text("{}")
    (tmp_path / ".tmp_ckpt_0000004").mkdir()  # what a kill inside a write leaves

    def killed(path, ignore_errors=False):
        raise KeyboardInterrupt("killed while deleting")
    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(str(tmp_path), keep_last=1)
    assert [os.path.basename(c) for c in checkpoints_in(str(tmp_path))] == ["ckpt_0000003"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt_")) == ["ckpt_0000003"]
    monkeypatch.undo()
    prune_checkpoints(str(tmp_path), keep_last=1)  # the next save's pruning deletes what the kill left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000003"]


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(sample_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    gpt_train.main(["--data", sample_dir, "--out-dir", str(run), *FAST, "--max-steps", "2"])
    before = final_weights(run)
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def save_then_fill_disk(tensors, path, *args, **kwargs):
        if path.endswith("optimizer.safetensors"):
            real_save(tensors, path, *args, **kwargs)  # part of the checkpoint is on disk ...
            disk_full()  # ... when the disk fills up
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fill_disk)
    with pytest.raises(UsageError, match="could not write checkpoint .* earlier checkpoints are intact"):
        gpt_train.main(["--data", sample_dir, "--out-dir", str(run), *FAST, "--max-steps", "4", "--resume"])
    assert [os.path.basename(p) for p in checkpoints_in(str(run))] == ["ckpt_0000002"]
    assert not [n for n in os.listdir(run) if n.startswith(".tmp")]
    after = final_weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_full_disk_during_a_shard_keeps_the_finished_ones(tmp_path, monkeypatch):
    out = tmp_path / "data"
    args = ["--source", "sample", "--out", str(out), "--shard-tokens", "50000", "--max-tokens", "300000",
            "--workers", "1"]
    real_fsync = os.fsync
    calls = {"n": 0}

    def fsync_until_full(fd):
        calls["n"] += 1
        if calls["n"] > 6:
            disk_full()
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_until_full)
    with pytest.raises(UsageError, match="no space left on the device"):
        gpt_dataset.main(args)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    progress = json.loads((out / "progress.json").read_text())
    for split in progress["splits"].values():
        for shard in split["shards"]:  # every shard that progress.json names is whole
            open_shard(str(out / shard["file"]), shard["sha256"])
    gpt_dataset.main(args)  # with space again, the same command finishes the job
    reference = tmp_path / "reference"
    gpt_dataset.main(args[:3] + [str(reference)] + args[4:])
    assert {n: file_sha256(out / n) for n in os.listdir(out)} == \
           {n: file_sha256(reference / n) for n in os.listdir(reference)}


def mount_small_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return result.returncode == 0


def test_a_really_full_disk_gives_a_clear_error(tmp_path, sample_dir):
    """The same on a real 1.2 MB file system (the dataset needs 2 MB), where the suite may mount one (root)."""
    disk = tmp_path / "small_disk"
    if not mount_small_tmpfs(disk, "1200k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated full-disk tests above still ran")
    try:
        result = run_script("gpt_dataset.py", ["--source", "sample", "--out", str(disk / "data"),
                                                "--shard-tokens", "400000"])
        assert result.returncode == 1
        assert_one_clear_error(result, "no space left on the device")
        progress = disk / "data" / "progress.json"
        if progress.exists():
            for split in json.loads(progress.read_text())["splits"].values():
                for shard in split["shards"]:
                    open_shard(str(disk / "data" / shard["file"]), shard["sha256"])
    finally:
        subprocess.run(["umount", str(disk)])
