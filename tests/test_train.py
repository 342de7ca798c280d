"""gpt_train.py: schedule, data windows, an end-to-end run, exact resume, signals, NaNs, DDP, bad input."""

import functools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import gpt_dataset
import gpt_train
from conftest import FAST_TRAINING, ROOT, assert_one_clear_error, run_script, script
from gpt_train import lr_at
from wikigpt.budget import TimeBudget, steps_that_fit
from transformer import GPT, config_from_preset
from wikigpt import checkpoint
from wikigpt.cli import UsageError
from wikigpt.muon import Muon, orthogonalise
from wikigpt.runtime import Runtime
from wikigpt.shards import TokenWindows, open_split
from wikigpt.tokenizer import gpt2_tokenizer, token_byte_lengths

FAST = [*FAST_TRAINING, "--sample-tokens", "8"]


def train(sample_dir, out_dir, *extra):
    gpt_train.main(["--data", sample_dir, "--out-dir", str(out_dir), *FAST, *extra])


def metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def weights(checkpoint):
    return load_file(os.path.join(checkpoint, "model.safetensors"))


def test_lr_schedule_boundaries():
    kwargs = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kwargs) == pytest.approx(0.1)  # first step: 1/10 of the peak, never zero
    assert lr_at(9, **kwargs) == pytest.approx(1.0)  # warmup ends at the peak
    assert lr_at(10, **kwargs) == pytest.approx(1.0)
    assert lr_at(60, **kwargs) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(110, **kwargs) == pytest.approx(0.1)
    assert lr_at(500, **kwargs) == pytest.approx(0.1)
    rates = [lr_at(s, **kwargs) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert lr_at(0, max_lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=10) == pytest.approx(1.0)


def test_wsd_schedule_holds_the_peak_then_decays_linearly():
    kwargs = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule="wsd", cooldown_frac=0.5)
    assert lr_at(0, **kwargs) == pytest.approx(0.1)
    assert [lr_at(s, **kwargs) for s in (10, 30, 55)] == [1.0, 1.0, 1.0]  # stable until the last 55 steps
    assert lr_at(55 + 27.5, **kwargs) == pytest.approx(0.55)  # halfway down the straight line
    assert lr_at(110, **kwargs) == pytest.approx(0.1) and lr_at(200, **kwargs) == pytest.approx(0.1)
    rates = [lr_at(s, **kwargs) for s in range(55, 111)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    # a cooldown longer than what follows the warmup starts right after it
    assert lr_at(10, **{**kwargs, "cooldown_frac": 1.0}) == pytest.approx(1.0)
    assert lr_at(11, **{**kwargs, "cooldown_frac": 1.0}) < 1.0


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_optimizers_split_the_parameters(name):
    model = GPT(config_from_preset("tiny"))
    optimizers = gpt_train.make_optimizers(model, name=name, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                                           device_type="cpu")
    groups = [(type(o).__name__, g) for o in optimizers for g in o.param_groups]
    params = [p for _, g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))  # each exactly once
    for kind, group in groups:
        if kind == "Muon":  # the matrices inside the blocks, with decay
            assert all(p.dim() == 2 and p.size(0) != 50304 for p in group["params"]) and group["weight_decay"] == 0.1
        else:  # decay on matrices only
            assert all((p.dim() == 2) == (group["weight_decay"] == 0.1) for p in group["params"])
    embedding = model.transformer.wte.weight
    assert [kind for kind, g in groups if any(p is embedding for p in g["params"])] == ["AdamW"]
    assert [kind for kind, _ in groups].count("Muon") == (1 if name == "muon" else 0)


def test_windows_span_shards_and_cover_each_epoch():
    shards = [np.arange(0, 50, dtype=np.uint16), np.arange(50, 101, dtype=np.uint16)]
    windows = TokenWindows(shards, block_size=10, batch_size=2, seed=0)
    assert windows.batches_per_epoch == 5
    assert windows.window(4).tolist() == list(range(40, 51))  # crosses from shard 0 into shard 1
    first_epoch = np.concatenate([windows.next_batch()[:, 0] for _ in range(5)])
    assert sorted(first_epoch.tolist()) == list(range(0, 100, 10))  # each window once per epoch
    second_epoch = np.concatenate([windows.next_batch() for _ in range(5)])
    shift = int(second_epoch[:, 0].min())
    assert 1 <= shift <= 9  # cut elsewhere: every window moves by the same shift
    assert sorted(second_epoch[:, 0].tolist()) == list(range(shift, 100, 10))
    for row in second_epoch:  # consecutive tokens; the last window runs on from the split's start
        assert row.tolist() == [(row[0] + j) % 101 for j in range(11)]
    assert first_epoch.tolist() != (second_epoch[:, 0] - shift).tolist()  # reshuffled
    assert windows.state() == {"batches_done": 10}
    unshuffled = TokenWindows(shards, block_size=10, batch_size=2, seed=0, shuffle=False)  # validation
    assert [unshuffled.next_batch()[0, 0] for _ in range(10)] == [0, 20, 40, 60, 80] * 2


def test_two_ranks_read_what_one_process_reads_in_two_micro_batches():
    shards = [np.arange(1000, dtype=np.uint16)]
    single = TokenWindows(shards, 10, 3, seed=5)
    ranks = [TokenWindows(shards, 10, 3, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(20):
        expected = np.concatenate([single.next_batch(), single.next_batch()])
        assert np.array_equal(np.concatenate([r.next_batch() for r in ranks]), expected)


def test_end_to_end_run_learns_logs_plots_and_saves_loadable_checkpoints(sample_dir, tmp_path):
    run = tmp_path / "run"
    train(sample_dir, run, "--max-steps", "40", "--eval-interval", "20", "--ckpt-interval", "20")
    rows = metrics(run)
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(losses) == 40 and len(vals) == 3
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    assert vals[-1] < vals[0] - 1.0
    assert all({"lr", "grad_norm", "tokens_per_s", "memory_gib"} <= set(r) for r in rows if "loss" in r)
    png = (run / "plots.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert sorted(os.listdir(run)) == ["ckpt_0000020", "ckpt_0000040", "metrics.jsonl", "plots.png",
                                       "train.log", "train_config.json"]
    assert sorted(os.listdir(run / "ckpt_0000040")) == [
        "config.json", "generation_config.json", "merges.txt", "model.safetensors", "optimizer.safetensors",
        "rng.safetensors", "special_tokens_map.json", "tokenizer_config.json", "trainer_state.json", "vocab.json"]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "ckpt_0000040").eval()
    ours = GPT.from_pretrained(str(run / "ckpt_0000040")).eval()
    idx = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0][..., :50257], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interval_s", [0, 10**9])
def test_plots_are_redrawn_at_most_every_interval_and_always_with_the_last_rows(sample_dir, tmp_path, monkeypatch,
                                                                              interval_s):
    from wikigpt import monitor

    drawn = []  # the rows of metrics.jsonl at each drawing
    monkeypatch.setattr(monitor, "plot_metrics", lambda path, png: drawn.append(len(open(path).readlines())))
    monkeypatch.setattr(monitor, "PLOT_INTERVAL_S", interval_s)
    run = tmp_path / "run"
    train(sample_dir, run, "--max-steps", "30", "--eval-interval", "10", "--sample-tokens", "0")
    rows = open(run / "metrics.jsonl").readlines()
    evaluations = sum("val_loss" in r for r in rows)
    assert evaluations == 4 and drawn[-1] == len(rows)  # at steps 0, 10, 20 and 30
    # Every evaluation draws when the interval is 0 (the end then has nothing new); otherwise only the
    # first one does, and the end draws the rest.
    assert len(drawn) == (evaluations if interval_s == 0 else 2)


def test_the_result_is_the_loss_over_the_whole_validation_split(sample_dir, tmp_path):
    run = tmp_path / "run"
    train(sample_dir, run, "--max-steps", "3", "--dtype", "float32", "--final-eval-tokens", "10000000")
    final = metrics(run)[-1]
    val = np.concatenate(open_split(sample_dir, "val"))
    windows = (len(val) - 1) // 32  # every non-overlapping window of the model's context, 32 tokens
    assert final["whole_val_tokens"] == windows * 32
    model = GPT.from_pretrained(str(run / "ckpt_0000003")).eval()  # computed again, one window at a time
    with torch.no_grad():
        losses = [model(torch.from_numpy(val[i * 32 : i * 32 + 32].astype(np.int64))[None],
                        torch.from_numpy(val[i * 32 + 1 : i * 32 + 33].astype(np.int64))[None])[1].item()
                  for i in range(windows)]
    assert final["whole_val_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert final["whole_val_loss"] != pytest.approx(final["val_loss"], rel=1e-4)  # not the fixed batches'
    # Bits per byte: the summed loss in bits over the UTF-8 bytes of the text the targets spell.
    decode = gpt2_tokenizer().decode_single_token_bytes
    target_bytes = sum(len(decode(int(t))) for t in val[1 : windows * 32 + 1] if t != 50256)
    assert final["whole_val_bits_per_byte"] == pytest.approx(sum(losses) * 32 / math.log(2) / target_bytes, rel=1e-5)
    run = Runtime(torch.device("cpu"))
    split = gpt_train.ValidationSplit(TokenWindows(open_split(sample_dir, "val"), 32, 4, seed=0, shuffle=False),
                                      torch.tensor(token_byte_lengths(gpt2_tokenizer())))
    capped = gpt_train.evaluate(model, split, gpt_train.whole_split_batches(split.windows, 4, 10 * 32, run), run)
    assert capped[:3] == (pytest.approx(np.mean(losses[:10]), rel=1e-5), 10 * 32, False)  # --final-eval-tokens: the first windows


def test_masked_documents_and_z_loss_change_training_but_not_evaluation(sample_dir, tmp_path):
    train(sample_dir, tmp_path / "plain", "--max-steps", "2", "--dtype", "float32")
    train(sample_dir, tmp_path / "masked", "--max-steps", "2", "--dtype", "float32", "--mask-documents")
    train(sample_dir, tmp_path / "z", "--max-steps", "2", "--dtype", "float32", "--z-loss", "0.01")
    plain, masked, z = metrics(tmp_path / "plain"), metrics(tmp_path / "masked"), metrics(tmp_path / "z")
    assert plain[0]["step"] == masked[0]["step"] == z[0]["step"] == 0
    assert plain[0]["val_loss"] == masked[0]["val_loss"] == z[0]["val_loss"]
    assert plain[1]["loss"] != masked[1]["loss"]  # the first training step already sees other attention
    # The first step's logits are near zero, so log Z is near ln(50257) = 10.8: about 0.01 x 117 more
    assert 1.0 < z[1]["loss"] - plain[1]["loss"] < 1.35


RESUME = ["--max-steps", "8", "--ckpt-interval", "4", "--eval-interval", "4", "--dropout", "0.1", "--keep-last", "5"]


def resume_from_step_4(sample_dir, reference, tmp_path, *extra):
    run = tmp_path / "resumed"
    run.mkdir()
    shutil.copytree(reference / "ckpt_0000004", run / "ckpt_0000004")
    train(sample_dir, run, *RESUME, "--resume", *extra)
    return run


@pytest.fixture(scope="module")
def reference_run(sample_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    train(sample_dir, run, *RESUME)
    return run


ARCHS = ["gpt2", "qwen3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_resume_gives_bit_identical_losses_and_weights(sample_dir, reference_run, tmp_path, arch):
    reference = reference_run  # a run of the default block
    if arch != gpt_train.TrainConfig.arch:
        reference = tmp_path / "reference"
        train(sample_dir, reference, *RESUME, "--arch", arch)
    run = resume_from_step_4(sample_dir, reference, tmp_path, "--arch", arch)
    expected = [r["loss"] for r in metrics(reference) if "loss" in r and r["step"] > 4]
    assert [r["loss"] for r in metrics(run) if "loss" in r] == expected
    a, b = weights(reference / "ckpt_0000008"), weights(run / "ckpt_0000008")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("forget", ["data position", "rng state"])
def test_resume_test_notices_a_state_left_unrestored(sample_dir, reference_run, tmp_path, monkeypatch, forget):
    if forget == "data position":
        monkeypatch.setattr(TokenWindows, "load_state", lambda self, state: None)
    else:
        monkeypatch.setattr(torch, "set_rng_state", lambda state: None)  # dropout masks come from it
    run = resume_from_step_4(sample_dir, reference_run, tmp_path)
    expected = [r["loss"] for r in metrics(reference_run) if "loss" in r and r["step"] > 4]
    assert [r["loss"] for r in metrics(run) if "loss" in r] != expected


MUON = ["--optimizer", "muon", "--schedule", "wsd", "--cooldown-frac", "0.5"]


@pytest.fixture(scope="module", params=ARCHS)
def muon_reference_run(sample_dir, tmp_path_factory, request):
    run = tmp_path_factory.mktemp("muon") / "run"
    train(sample_dir, run, *RESUME, *MUON, "--arch", request.param)
    return run, request.param


@pytest.mark.parametrize("forget_momentum", [False, True])
def test_resume_with_muon_is_bit_identical(sample_dir, muon_reference_run, tmp_path, monkeypatch, forget_momentum):
    muon_reference_run, arch = muon_reference_run
    saved = load_file(os.path.join(muon_reference_run, "ckpt_0000004", "optimizer.safetensors"))
    assert any(k.startswith("opt1.") and k.endswith("momentum_buffer") for k in saved)  # Muon's state is kept
    if forget_momentum:  # the test must notice a Muon state left unrestored
        original = checkpoint.unflatten_optimizer_state
        monkeypatch.setattr(checkpoint, "unflatten_optimizer_state",
                            lambda t, meta, i: original(t, meta, i) if i == 0 else {**original(t, meta, i), "state": {}})
    run = tmp_path / "resumed"
    run.mkdir()
    shutil.copytree(muon_reference_run / "ckpt_0000004", run / "ckpt_0000004")
    train(sample_dir, run, *RESUME, *MUON, "--arch", arch, "--resume")
    expected = [r["loss"] for r in metrics(muon_reference_run) if "loss" in r and r["step"] > 4]
    assert ([r["loss"] for r in metrics(run) if "loss" in r] == expected) != forget_momentum
    with pytest.raises(UsageError, match="--optimizer muon -> adamw"):
        train(sample_dir, run, *RESUME, "--arch", arch, "--resume", "--max-steps", "9", "--optimizer", "adamw")


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_is_torch_s_in_bf16_and_orthogonalises_in_float32(nesterov):
    """wikigpt/muon.py: torch.optim.Muon op for op where the run multiplies in bf16; in float32 the same
    update to float32's precision, the momentum left as Muon's own (no in-place step on it). Matrices of
    one shape are orthogonalised in one batch (three here), a shape of its own alone."""
    torch.manual_seed(0)
    start = [torch.randn(48, 16), torch.randn(16, 40), torch.randn(48, 16), torch.randn(48, 16) * 10]
    runs = {"torch": torch.optim.Muon, "bf16": Muon, "float32": functools.partial(Muon, ns_dtype=torch.float32)}
    params, optimizers = {}, {}
    for name, make in runs.items():
        params[name] = [torch.nn.Parameter(p.clone()) for p in start]
        optimizers[name] = make(params[name], lr=0.02, nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        gradients = [torch.randn_like(p) for p in start]
        for name in runs:
            for p, g in zip(params[name], gradients):
                p.grad = g.clone()
            optimizers[name].step()
    assert all(torch.equal(a, b) for a, b in zip(params["torch"], params["bf16"]))
    for a, b, p in zip(params["torch"], params["float32"], start):
        assert not torch.equal(a, b)
        torch.testing.assert_close(b - p, a - p, rtol=0.05, atol=2e-3)  # bf16's 8 bits against float32's 24
    buffers = [[optimizers[n].state[p]["momentum_buffer"] for p in params[n]] for n in ("torch", "float32")]
    assert all(torch.equal(a, b) for a, b in zip(*buffers))
    update = orthogonalise(torch.randn(64, 24), (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float32)
    singular = torch.linalg.svdvals(update)
    assert singular.min() > 0.6 and singular.max() < 1.3  # every direction moved alike, near 1


def poison_training_losses(monkeypatch, poisoned_steps, value):
    """Makes the training loss of the given (1-based) steps `value` (NaN or inf); one micro-batch per step."""
    original = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, cache=None, **options):
        logits, loss = original(self, idx, targets, cache, **options)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] in poisoned_steps:
                loss = loss * value
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)


def test_non_finite_losses_skip_updates_then_stop_with_checkpoint_intact(sample_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    poison_training_losses(monkeypatch, range(4, 100), float("nan"))
    with pytest.raises(UsageError, match="3 non-finite steps in a row"):
        train(sample_dir, run, "--max-steps", "20", "--ckpt-interval", "3", "--eval-interval", "3",
              "--max-bad-steps", "3")
    assert sorted(p for p in os.listdir(run) if p.startswith("ckpt")) == ["ckpt_0000003"]
    saved = weights(run / "ckpt_0000003")
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert len([r for r in metrics(run) if "loss" in r]) == 3  # skipped steps are not logged as trained


def test_skipped_update_leaves_weights_unchanged(sample_dir, tmp_path, monkeypatch):
    """Step 3 sees an infinite loss: the weights saved after it equal those saved after step 2."""
    poison_training_losses(monkeypatch, {3}, float("inf"))
    run = tmp_path / "run"
    train(sample_dir, run, "--max-steps", "3", "--ckpt-interval", "1", "--eval-interval", "10", "--keep-last", "5")
    after_2, after_3 = weights(run / "ckpt_0000002"), weights(run / "ckpt_0000003")
    before = weights(run / "ckpt_0000001")
    assert all(torch.equal(after_2[k], after_3[k]) for k in after_2)
    assert any(not torch.equal(before[k], after_2[k]) for k in before)  # step 2 did update


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_cleanly(sample_dir, tmp_path, sig):
    run = tmp_path / "run"
    process = subprocess.Popen(script("gpt_train.py", "--data", sample_dir, "--out-dir", str(run), *FAST,
                                      "--max-steps", "100000", "--eval-interval", "100000"),
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(sig)
    time.sleep(0.01)
    process.send_signal(sig)  # a second signal must not cut the save short
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert f"stopped by {sig.name}" in output
    checkpoints = [p for p in os.listdir(run) if p.startswith("ckpt")]
    assert len(checkpoints) == 1 and not [p for p in os.listdir(run) if p.startswith(".tmp")]
    step = int(checkpoints[0].split("_")[1])
    assert step == len([r for r in metrics(run) if "loss" in r]) > 0
    GPT.from_pretrained(str(run / checkpoints[0]))


@pytest.mark.parametrize("args, message", [
    (["--preset", "gpt5"], "unknown preset"),
    (["--data", "/nonexistent"], "does not exist"),
    (["--max-steps", "0"], "--max-steps must be at least 1"),
    (["--max-steps", "ten"], "invalid int value"),
    (["--dtype", "float8"], "--dtype must be"),
    (["--dtype", "float16", "--device", "cpu"], "needs a CUDA GPU"),
    (["--device", "tpu"], "unknown device"),
    (["--device", "cuda:7"], "cuda"),
    (["--n-embd", "30", "--n-head", "4"], "divisible"),
    (["--tokens-per-step", "1000"], "must be a multiple"),
    (["--resume"], "holds no complete checkpoint"),
    (["--learning-rate", "1"], "unrecognized arguments"),
    (["--optimizer", "sgd"], "--optimizer must be adamw or muon"),
    (["--schedule", "linear"], "--schedule cosine or wsd"),
    (["--cooldown-frac", "1.5"], "--cooldown-frac must be between 0 and 1"),
    (["--z-loss", "-1"], "--z-loss and --time-limit >= 0"),
    (["--time-limit", "-5"], "--time-limit >= 0"),
    (["--tracker", "mlflow"], "--tracker must be one of none, tensorboard, wandb"),
])
def test_bad_input_gets_one_clear_line(sample_dir, tmp_path, args, message):
    result = run_script("gpt_train.py", ["--data", sample_dir, "--out-dir", str(tmp_path / "run"), *FAST, *args])
    assert_one_clear_error(result, message)


def test_the_steps_that_fit_a_time_limit():
    fit = functools.partial(steps_that_fit, step=10, max_steps=1000, step_seconds=1.0, eval_seconds=5.0,
                            final_eval_seconds=20.0, eval_interval=25)
    # 75 steps: 65 more steps, evaluations at 25, 50 and 75 (the last), the final one: 65 + 15 + 20 = 100 s;
    # 74: 64 + 15 + 20 = 99 s; 76 adds a step and an evaluation (106 s)
    assert (fit(99.9), fit(100.0), fit(105.9), fit(106.0)) == (74, 75, 75, 76)
    assert fit(1e9) == 1000 and fit(-5.0) == 11  # never more than --max-steps; at least one more step
    # from step 0, whose evaluation counts: 9 steps and evaluations at 0, 5 and 9 take 12 s; 10 steps 13 s
    assert steps_that_fit(12.0, step=0, max_steps=10, step_seconds=1.0, eval_seconds=1.0, final_eval_seconds=0.0,
                          eval_interval=5) == 9


def test_a_time_limit_plan_follows_the_pace_both_ways_but_never_past_max_steps(monkeypatch):
    """A run whose first steps were slow gets its steps back at a later plan (wsd, before the decay),
    up to --max-steps as asked; slower again, it loses them. The clock stands still: 588 s are left."""
    import types

    from wikigpt import budget as budget_module

    monkeypatch.setattr(budget_module.time, "perf_counter", lambda: 1000.0)
    budget = TimeBudget(10, max_steps=2000)
    budget.evaluated(3.0)
    config = types.SimpleNamespace(max_steps=2000, eval_interval=250, time_limit=10)
    one_process = types.SimpleNamespace(max_over_processes=lambda value: value)

    def plan(step, seconds_a_step):
        config.max_steps = budget.plan(step, config, [seconds_a_step] * 50, 20, one_process)
        return config.max_steps

    def fit(step, seconds_a_step, most=2000):  # (n - step) steps, 3 s an evaluation, 60 s for the final one in 588 s
        return steps_that_fit(588.0, step=step, max_steps=most, step_seconds=seconds_a_step, eval_seconds=3.0,
                              final_eval_seconds=60.0, eval_interval=250)

    assert plan(30, 0.3) == fit(30, 0.3) < 2000
    assert plan(250, 0.2) == 2000  # 1,750 steps at 0.2 s and 8 evaluations fit: back to --max-steps
    assert plan(500, 0.1) == 2000 < fit(500, 0.1, most=10**6)  # faster still: more would fit, never past it
    assert plan(750, 0.5) == fit(750, 0.5) < 2000  # slower: fewer again


def test_a_time_limit_lowers_max_steps_at_the_end_of_warmup_and_a_resume_keeps_it(sample_dir, tmp_path):
    run = tmp_path / "run"
    # A limit that any machine has used up by the end of warmup (10 timed steps, as FAST warms up for 2):
    # the plan can only keep the one step that must follow.
    train(sample_dir, run, "--max-steps", "40", "--ckpt-interval", "5", "--time-limit", "1e-6")
    rows = metrics(run)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 12))
    assert rows[-1]["step"] == 11 and "whole_val_loss" in rows[-1]  # the run ended as a run does
    final = checkpoint.checkpoints_in(str(run))[-1]
    assert final.endswith("ckpt_0000011")
    recorded = checkpoint.read_trainer_state(final)
    assert recorded["planned_steps"] == 11 and recorded["train_config"]["max_steps"] == 40
    # Resumed from step 10 with the same command, it keeps the 11 steps its plan chose (and plans no
    # more: warmup is behind it), bit for bit; without --time-limit, --max-steps holds again.
    for limit, steps in (["--time-limit", "1e-6"], 11), ([], 13):
        resumed = tmp_path / f"resumed{steps}"
        resumed.mkdir()
        shutil.copytree(run / "ckpt_0000010", resumed / "ckpt_0000010")
        train(sample_dir, resumed, "--max-steps", "40" if limit else "13", "--ckpt-interval", "5", *limit, "--resume")
        assert checkpoint.checkpoints_in(str(resumed))[-1].endswith(f"ckpt_{steps:07d}")
    original, again = weights(run / "ckpt_0000011"), weights(tmp_path / "resumed11" / "ckpt_0000011")
    assert all(torch.equal(original[k], again[k]) for k in original)
    assert checkpoint.read_trainer_state(str(tmp_path / "resumed13" / "ckpt_0000013"))["planned_steps"] is None
    # A limit that is not reached changes nothing.
    train(sample_dir, tmp_path / "roomy", "--max-steps", "12", "--time-limit", "600")
    assert checkpoint.checkpoints_in(str(tmp_path / "roomy"))[-1].endswith("ckpt_0000012")


def test_a_finished_run_is_not_overwritten(sample_dir, tmp_path):
    run = tmp_path / "run"
    train(sample_dir, run, "--max-steps", "2")
    before = weights(run / "ckpt_0000002")
    with pytest.raises(UsageError, match="already holds checkpoints"):
        train(sample_dir, run, "--max-steps", "2")
    after = weights(run / "ckpt_0000002")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_trainer_starts_without_unix_only_modules():
    """Windows has no `resource` (nor `fcntl`): the trainer must still import and parse its flags there."""
    code = ("import sys; sys.modules['resource'] = sys.modules['fcntl'] = None; import gpt_train; "
            "print(gpt_train.resolve_config(gpt_train.TrainConfig(), 1)[2])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "1", result.stderr[-2000:]


def test_help_lists_the_knobs():
    result = run_script("gpt_train.py", ["--help"])
    assert result.returncode == 0
    for flag in ("--preset", "--n-layer", "--tokens-per-step", "--min-lr", "--compile", "--no-compile", "--optimizer",
                 "--schedule", "--cooldown-frac", "--final-eval-tokens", "--mask-documents", "--z-loss", "--tracker",
                 "--resume", "--init-from", "--keep-last", "--dtype", "--device", "--no-reuse-memory"):
        assert flag in result.stdout


@pytest.mark.parametrize("arch", ARCHS)
def test_two_processes_and_two_nodes_match_one_with_the_same_global_batch(sample_dir, tmp_path, arch):
    """torchrun with 2 CPU processes (gloo), and with 2 "nodes" of one process each meeting through
    torchrun's c10d rendezvous as separate machines do, against 1 process accumulating 2 micro-batches."""
    # AdamW: Muon's Newton-Schulz iterations amplify the last-bit differences between one summed and two
    # averaged gradients beyond this test's tolerance, which is about the gradients, not the optimizer.
    common = ["--data", sample_dir, *FAST, "--max-steps", "6", "--eval-interval", "3", "--dtype", "float32",
              "--optimizer", "adamw", "--arch", arch,
              "--tokens-per-step", str(2 * 4 * 32)]
    single = run_script("gpt_train.py", common + ["--out-dir", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "gpt_train.py"), *common, "--out-dir", str(tmp_path / "two")],
                            capture_output=True, text=True, cwd=ROOT, env=env)
    assert double.returncode == 0, double.stderr[-3000:]
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                               "--rdzv_id=test", os.path.join(ROOT, "gpt_train.py"), *common,
                               "--out-dir", str(tmp_path / "nodes")],
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"node{rank}.txt", "w"), cwd=ROOT,
                              env=env)
             for rank in (0, 1)]
    for rank, node in enumerate(nodes):
        assert node.wait(timeout=600) == 0, (tmp_path / f"node{rank}.txt").read_text()[-3000:]
    one = [r for r in metrics(tmp_path / "one") if "loss" in r]
    for other in ("two", "nodes"):
        rows = [r for r in metrics(tmp_path / other) if "loss" in r]
        assert len(one) == len(rows) == 6
        for a, b in zip(one, rows):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        wa, wb = weights(tmp_path / "one" / "ckpt_0000006"), weights(tmp_path / other / "ckpt_0000006")
        # AdamW steps by m / sqrt(v): a weight whose few gradients nearly cancel (a rare token's embedding)
        # moves by a share of the rate set by their last bits, so the order of a sum (one process or two, and
        # the CPU's kernels) can move a handful of such weights by up to a tenth of a step. Every other weight
        # agrees to 1e-5; gradients not averaged alike would move millions of them by a step (3e-3).
        differing = sum(int((~torch.isclose(wa[k], wb[k], rtol=1e-4, atol=1e-5)).sum()) for k in wa)
        assert differing <= 10, f"{differing} weights differ"
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-3)


def test_a_ddp_checkpoint_resumes_in_one_process_with_the_run_s_global_batch(bpe_sample_dir, tmp_path):
    """--tokens-per-step left at its default: the run's own global batch (2 processes x 4 x 32) is kept
    by the resume in one process, as two micro-batches, instead of being refused as a changed setting."""
    common = ["--data", bpe_sample_dir, "--out-dir", str(tmp_path / "run"), *FAST_TRAINING, "--sample-tokens", "0",
              "--eval-interval", "100", "--ckpt-interval", "2", "--optimizer", "adamw"]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "gpt_train.py"), *common, "--max-steps", "2"],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert double.returncode == 0, double.stderr[-3000:]
    resumed = run_script("gpt_train.py", [*common, "--max-steps", "4", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "processes 2 -> 1" in resumed.stderr and "1 x 2 micro-batch(es)" in resumed.stderr
    assert (tmp_path / "run" / "ckpt_0000004").is_dir()


def small_hf_gpt2(directory):
    """A Hugging Face GPT-2 directory written by transformers itself, as the hub's gpt2 is: context 64,
    dropout 0.1 in its config (as GPT-2's), so that the test sees which shape and dropout a run takes."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return str(directory)


FINE_TUNE = ["--lr", "1e-4", "--batch-size", "2", "--eval-steps", "1", "--sample-tokens", "0", "--warmup-steps", "1",
             "--final-eval-tokens", "2048"]


def test_init_from_takes_the_pretrained_shape_dropout_0_and_its_own_run_dir(sample_dir, tmp_path):
    """The README's fine-tuning command, with a local GPT-2 directory for the hub name, in a folder where
    the quickstart has run: it must train the pretrained model's shape in a run directory of its own."""
    pretrained = small_hf_gpt2(tmp_path / "gpt2-local")
    quickstart = run_script("gpt_train.py", ["--data", sample_dir, *FAST_TRAINING, "--preset", "mini",
                                             "--max-steps", "2", "--sample-tokens", "0"], cwd=tmp_path)
    assert quickstart.returncode == 0, quickstart.stderr[-2000:]
    quickstart_files = sorted(os.listdir(tmp_path / "runs" / "mini"))
    command = ["--data", sample_dir, "--init-from", pretrained, *FINE_TUNE, "--max-steps", "2"]
    result = run_script("gpt_train.py", command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "runs" / "gpt2-local-finetune"
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["model"]["block_size"] == 64 and saved["model"]["n_layer"] == 2
    assert saved["train"]["tokens_per_step"] == 2 * 64  # sized for GPT-2's context, not the preset's
    assert "128 tokens per step = 1 x 1 micro-batch(es) x 2 x 64" in result.stderr
    assert "dropout 0.0 (--dropout to change)" in result.stderr
    assert json.loads((run / "ckpt_0000002" / "config.json").read_text())["resid_pdrop"] == 0.0
    assert sorted(os.listdir(tmp_path / "runs" / "mini")) == quickstart_files
    assert not (tmp_path / "runs" / "mini-2").exists()  # the quickstart's run is left alone

    resumed = run_script("gpt_train.py", [*command[:-1], "3", "--resume"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "changed since the run began: --max-steps 2 -> 3" in resumed.stderr
    assert (run / "ckpt_0000003").is_dir()


def test_init_from_a_qwen3_directory_takes_its_shape_and_saves_that_class(sample_dir, tmp_path):
    """A Qwen3 directory written by transformers (grouped keys and values, an untied head): the run trains
    its shape and pieces, and its checkpoints load in transformers as that class."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3Config(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=64, tie_word_embeddings=False, eos_token_id=50256)
    transformers.Qwen3ForCausalLM(config).save_pretrained(tmp_path / "qwen3-local")
    run = tmp_path / "run"
    args = ["--data", sample_dir, "--init-from", str(tmp_path / "qwen3-local"), *FINE_TUNE, "--out-dir", str(run)]
    refused = run_script("gpt_train.py", [*args, "--max-steps", "2", "--n-kv-head", "1"])
    assert_one_clear_error(refused, "--init-from takes the pretrained model's shape and pieces: drop --n-kv-head")
    result = run_script("gpt_train.py", [*args, "--max-steps", "2"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rmsnorm, rotary positions, swiglu MLP, qk-norm True, tied head False" in result.stderr
    saved = json.loads((run / "train_config.json").read_text())["model"]
    assert (saved["n_kv_head"], saved["head_dim"], saved["block_size"]) == (2, 16, 64)
    trained = transformers.AutoModelForCausalLM.from_pretrained(run / "ckpt_0000002")
    assert type(trained).__name__ == "Qwen3ForCausalLM" and trained.config.num_key_value_heads == 2


@pytest.mark.parametrize("change, message", [
    (["--n-layer", "3"], "--n-layer None -> 3"),
    (["--lr", "1e-3"], "--lr 0.003 -> 0.001"),
    (["--batch-size", "8"], "--batch-size 4 -> 8"),
    (["--schedule", "cosine"], "--schedule wsd -> cosine"),
    (["--arch", "llama"], "-> llama differ(s)"),
    (["--data", "OTHER"], "holds other shards than the run was trained on"),
])
def test_resume_refuses_settings_that_make_another_run(sample_dir, reference_run, tmp_path, change, message):
    run = tmp_path / "run"
    shutil.copytree(reference_run / "ckpt_0000004", run / "ckpt_0000004")
    if change[1] == "OTHER":
        gpt_dataset.main(["--source", "sample", "--max-tokens", "100000", "--out", str(tmp_path / "other"),
                          "--tokenizer", "gpt2"])
        change = ["--data", str(tmp_path / "other")]
    args = ["--data", sample_dir, "--out-dir", str(run), *FAST, *RESUME, "--resume", *change]
    result = run_script("gpt_train.py", args)
    assert_one_clear_error(result, message)
    assert sorted(os.listdir(run)) == ["ckpt_0000004"]  # nothing written


def test_resume_follows_a_dataset_that_moved(sample_dir, reference_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference_run / "ckpt_0000004", run / "ckpt_0000004")
    moved = shutil.copytree(sample_dir, tmp_path / "moved")
    train(str(moved), run, *RESUME, "--resume")
    assert f"changed since the run began: --data {sample_dir} -> {moved}" in (run / "train.log").read_text()
    expected = [r["loss"] for r in metrics(reference_run) if "loss" in r and r["step"] > 4]
    assert [r["loss"] for r in metrics(run) if "loss" in r] == expected


def test_the_quickstart_runs_twice_in_the_same_folder(bpe_sample_dir, tmp_path):
    """The one-liner again: a new run beside the first, which infer.py then finds; --resume continues it."""
    shutil.copytree(bpe_sample_dir, tmp_path / "data" / "sample_en_bpe16384")
    train_args = [*FAST_TRAINING, "--sample-tokens", "0", "--time-limit", "10", "--max-steps", "2"]
    for attempt in (1, 2):
        for name, args in [("gpt_dataset.py", ["--source", "sample"]), ("gpt_train.py", train_args),
                           ("infer.py", ["--input", "The history of", "--max-new-tokens", "5"])]:
            result = run_script(name, args, cwd=tmp_path)
            assert result.returncode == 0, (attempt, name, result.stderr[-2000:])
    assert "using runs/tiny-2/ckpt_0000002" in result.stdout + result.stderr
    for run in ("tiny", "tiny-2"):
        assert os.listdir(tmp_path / "runs" / run).count("ckpt_0000002") == 1
        log = (tmp_path / "runs" / run / "train.log").read_text()  # the console's lines, with dates
        assert log.count("| step 2/2 |") == 1 and log.splitlines()[-1].split(" | ")[1].startswith("done: 2 steps")
        assert log.splitlines()[-1].endswith("over 2,048 validation tokens; plots in " + f"runs/{run}/plots.png")
        assert all(line[:4].isdigit() and line[4] == "-" for line in log.splitlines())
    resumed = run_script("gpt_train.py", [*train_args[:-1], "3", "--resume"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (tmp_path / "runs" / "tiny-2" / "ckpt_0000003").is_dir() and not (tmp_path / "runs" / "tiny-3").exists()
