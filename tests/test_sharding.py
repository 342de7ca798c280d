"""Sharded training (--fsdp, FSDP2 on the CPU with gloo), activation checkpointing, and sharded
checkpoints: the same training as one process, exact resume, resharding to another number of
processes, the Hugging Face copy, damaged shard files."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST_TRAINING, ROOT, assert_one_clear_error, run_script, steps_logged, wait_for_work
from transformer import GPT, config_from_preset
from wikigpt.checkpoint import checkpoints_in
from wikigpt.runtime import checkpoint_activations

FLAGS = [*FAST_TRAINING, "--sample-tokens", "6", "--dtype", "float32", "--optimizer", "adamw"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(processes, args, **kwargs):
    """gpt_train.py under torchrun with `processes` CPU processes, its output captured as text."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               os.path.join(ROOT, "gpt_train.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=ENV, **kwargs)


def metrics(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def losses(run):
    return [r["loss"] for r in metrics(run) if "loss" in r]


def weights(run, step):
    return load_file(os.path.join(run, f"ckpt_{step:07d}", "model.safetensors"))


def assert_same_training(one, other, step):
    """Equal losses (rel 1e-5) and weights, as tests/test_train.py compares DDP with one process: AdamW
    moves a weight whose gradients are all but zero by a share of the rate set by their last bits, so
    the order of a sum moves a few such weights (rows of rare tokens in the embedding: a few per
    million) by a small part of a step (3e-3). Every other weight agrees to 1e-5; gradients not
    averaged alike would move most of them by a step."""
    assert len(losses(one)) == len(losses(other)) > 0
    for a, b in zip(losses(one), losses(other)):
        assert a == pytest.approx(b, rel=1e-5)
    wa, wb = weights(one, step), weights(other, step)
    differing = sum(int((~torch.isclose(wa[k], wb[k], rtol=1e-4, atol=1e-5)).sum()) for k in wa)
    total = sum(w.numel() for w in wa.values())
    assert differing <= total / 50_000, f"{differing} of {total} weights differ"
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=3e-4)


# GPT-2's block with AdamW, and today's with Muon, whose Newton-Schulz step runs on FSDP's row shards.
BLOCKS = {"gpt2": ["--arch", "gpt2"], "qwen3": ["--arch", "qwen3", "--optimizer", "muon"]}


@pytest.fixture(scope="module", params=list(BLOCKS))
def fsdp_reference(bpe_sample_dir, tmp_path_factory, request):
    """Two processes with --fsdp, 8 steps of 2 x 4 x 32 tokens, a checkpoint every 4 steps. Returns the
    run and the flags of its block, which every resume repeats."""
    run = tmp_path_factory.mktemp("fsdp") / "run"
    block = BLOCKS[request.param]
    result = torchrun(2, ["--data", bpe_sample_dir, "--out-dir", str(run), *FLAGS, *block, "--fsdp", "--max-steps",
                          "8", "--eval-interval", "4", "--ckpt-interval", "4", "--keep-last", "5", "--dropout", "0.1"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run, block


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_two_fsdp_processes_train_as_one_process_accumulating_two_micro_batches(bpe_sample_dir, tmp_path, arch):
    common = ["--data", bpe_sample_dir, *FLAGS, "--arch", arch, "--max-steps", "6", "--eval-interval", "3",
              "--tokens-per-step", str(2 * 4 * 32), "--final-eval-tokens", str(65 * 32)]  # 33 windows and 32
    single = run_script("gpt_train.py", [*common, "--out-dir", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-2000:]
    sharded = torchrun(2, [*common, "--out-dir", str(tmp_path / "fsdp"), "--fsdp"])
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert_same_training(tmp_path / "one", tmp_path / "fsdp", 6)
    # The run's result: the same windows of the validation split (the fixed batches depend on the processes),
    # 9 batches for one process and 8 for the other, which makes a pass that is not counted
    final, expected = metrics(tmp_path / "fsdp")[-1], metrics(tmp_path / "one")[-1]
    assert final["whole_val_tokens"] == expected["whole_val_tokens"] == 65 * 32
    assert final["whole_val_loss"] == pytest.approx(expected["whole_val_loss"], rel=1e-5)
    log = (tmp_path / "fsdp" / "train.log").read_text()
    assert log.count("sample: ") == 3 and "2 process(es)" in log
    # Each process wrote its own part of the training state, and nobody wrote optimizer.safetensors.
    checkpoint = tmp_path / "fsdp" / "ckpt_0000006"
    assert sorted(os.listdir(checkpoint / "sharded")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "optimizer.safetensors").exists()


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_activation_checkpointing_gives_the_same_losses_and_gradients(bpe_sample_dir, tmp_path, arch):
    torch.manual_seed(0)
    plain = GPT(config_from_preset("tiny", arch, vocab_size=512, padded_vocab_size=512, eot_token=511, dropout=0.1))
    recomputed = GPT(plain.config)
    recomputed.load_state_dict(plain.state_dict())
    checkpoint_activations(recomputed)
    idx, targets = torch.randint(0, 511, (2, 64)), torch.randint(0, 511, (2, 64))
    for model in (plain, recomputed):
        torch.manual_seed(1)  # the same dropout masks, which the recomputation must replay
        model(idx, targets)[1].backward()
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
    args = ["--data", bpe_sample_dir, *FLAGS, "--max-steps", "3", "--dropout", "0.1", "--arch", arch]
    for name, extra in (("plain", []), ("recomputed", ["--activation-checkpointing"])):
        assert run_script("gpt_train.py", [*args, *extra, "--out-dir", str(tmp_path / name)]).returncode == 0
    assert losses(tmp_path / "plain") == losses(tmp_path / "recomputed")


def test_fsdp_resumes_bit_for_bit_from_a_sharded_checkpoint(bpe_sample_dir, fsdp_reference, tmp_path):
    fsdp_reference, block = fsdp_reference
    run = tmp_path / "resumed"
    shutil.copytree(fsdp_reference / "ckpt_0000004", run / "ckpt_0000004")
    args = ["--data", bpe_sample_dir, "--out-dir", str(run), *FLAGS, *block, "--fsdp", "--max-steps", "8",
            "--eval-interval", "4", "--ckpt-interval", "4", "--keep-last", "5", "--dropout", "0.1", "--resume"]
    result = torchrun(2, args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(run) == [r for r in losses(fsdp_reference)][4:]
    a, b = weights(fsdp_reference, 8), weights(run, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_stopped_by_sigterm_and_by_kill_resumes_to_the_same_weights(bpe_sample_dir, fsdp_reference, tmp_path):
    fsdp_reference, block = fsdp_reference
    run = tmp_path / "stopped"
    args = ["--data", bpe_sample_dir, "--out-dir", str(run), *FLAGS, *block, "--fsdp", "--max-steps", "8", "--eval-interval",
            "4", "--ckpt-interval", "1", "--keep-last", "5", "--dropout", "0.1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "gpt_train.py"), *args]
    for stop in (signal.SIGTERM, signal.SIGKILL):
        resume = ["--resume"] if checkpoints_in(str(run)) else []
        process = subprocess.Popen(command + resume, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        assert wait_for_work(process, steps_logged(run / "metrics.jsonl"), 2)
        os.killpg(process.pid, stop)  # torchrun and both workers, as a scheduler stops a job
        process.wait(timeout=120)
        newest = checkpoints_in(str(run))[-1]
        assert os.path.isfile(os.path.join(newest, "sharded", ".metadata"))
    result = torchrun(2, args + ["--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = weights(fsdp_reference, 8), weights(run, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_two_process_checkpoint_resumes_in_one_process(bpe_sample_dir, fsdp_reference, tmp_path):
    fsdp_reference, block = fsdp_reference
    run = tmp_path / "one"
    shutil.copytree(fsdp_reference / "ckpt_0000004", run / "ckpt_0000004")
    result = run_script("gpt_train.py", ["--data", bpe_sample_dir, "--out-dir", str(run), *FLAGS, *block, "--fsdp",
                                         "--max-steps", "8", "--eval-interval", "4", "--ckpt-interval", "4",
                                         "--keep-last", "5", "--dropout", "0.1", "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "changed since the run began: processes 2 -> 1" in result.stderr
    assert "1 x 2 micro-batch(es)" in result.stderr  # the same global batch, accumulated
    # The loss curve goes on where it stopped; dropout masks now come from one process's generator.
    reference = losses(fsdp_reference)[4:]
    assert losses(run) == pytest.approx(reference, rel=0.05) and losses(run) != reference


# DCP warns on every load outside a process group; reading all shards in one process is the point here
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_the_hugging_face_copy_of_a_sharded_checkpoint_is_the_trained_model(fsdp_reference):
    transformers = pytest.importorskip("transformers")
    fsdp_reference, _ = fsdp_reference
    from torch.distributed.checkpoint import FileSystemReader, load

    checkpoint = fsdp_reference / "ckpt_0000008"
    ours = GPT.from_pretrained(str(checkpoint)).eval()
    trained = GPT(ours.config)  # the weights as the processes held them, read back from their shards
    state = {"model": trained.state_dict()}
    load(state, storage_reader=FileSystemReader(str(checkpoint / "sharded")))
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, state["model"][name]), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    idx = torch.randint(0, 16383, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0][..., :16384], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("damage", ["missing", "cut short"])
def test_a_damaged_shard_file_is_named_and_nothing_is_overwritten(bpe_sample_dir, fsdp_reference, tmp_path, damage):
    fsdp_reference, block = fsdp_reference
    run = tmp_path / "run"
    shutil.copytree(fsdp_reference / "ckpt_0000004", run / "ckpt_0000004")
    shard = run / "ckpt_0000004" / "sharded" / "__1_0.distcp"
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:1000])
    before = sorted(p.name for p in run.rglob("*"))
    result = run_script("gpt_train.py", ["--data", bpe_sample_dir, "--out-dir", str(run), *FLAGS, *block, "--fsdp",
                                         "--max-steps", "8", "--dropout", "0.1", "--resume"])
    assert_one_clear_error(result, "__1_0.distcp is missing or cut short")
    assert sorted(p.name for p in run.rglob("*")) == before


@pytest.mark.parametrize("args, message", [
    (["--fsdp", "--dtype", "float16"], "--fsdp shards over CUDA GPUs (NCCL) or CPUs (gloo)"),
    (["--fsdp", "--device", "mps"], "--fsdp shards over CUDA GPUs (NCCL) or CPUs (gloo)"),
])
def test_fsdp_where_it_cannot_work_is_one_line(bpe_sample_dir, tmp_path, args, message):
    result = run_script("gpt_train.py", ["--data", bpe_sample_dir, "--out-dir", str(tmp_path / "run"), *FLAGS, *args])
    assert_one_clear_error(result, message)


def test_switching_fsdp_at_a_resume_is_refused(bpe_sample_dir, fsdp_reference, tmp_path):
    fsdp_reference, block = fsdp_reference
    run = tmp_path / "run"
    shutil.copytree(fsdp_reference / "ckpt_0000004", run / "ckpt_0000004")
    result = run_script("gpt_train.py", ["--data", bpe_sample_dir, "--out-dir", str(run), *FLAGS, *block, "--max-steps", "8",
                                         "--dropout", "0.1", "--resume"])
    assert_one_clear_error(result, "--fsdp True -> False")


MUON_CHECK = '''
import torch, torch.distributed as dist, torch.optim._muon as muon
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
def newton_schulz(grad, coefficients, steps, eps):  # torch's iteration, in float64 instead of bf16, so that
    a, b, c = coefficients                          # whole-matrix products agree to rounding wherever computed
    x = grad.double().T if grad.size(0) > grad.size(1) else grad.double()
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if grad.size(0) > grad.size(1) else x).to(grad.dtype)
muon._zeropower_via_newtonschulz = newton_schulz
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False), torch.nn.Linear(48, 32, bias=False))
full, sharded = model(), model()
for layer in sharded:
    fully_shard(layer, mesh=mesh)
fully_shard(sharded, mesh=mesh)
x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
for net in (full, sharded):
    optimizer = torch.optim.Muon(list(net.parameters()), lr=0.02, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        net(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
moved = max((a - b).abs().max().item() for a, b in zip(model().parameters(), full.parameters()))
apart = max((a - b.full_tensor()).abs().max().item() for a, b in zip(full.parameters(), sharded.parameters()))
if dist.get_rank() == 0:
    print(moved, apart)
'''


def test_muon_orthogonalises_whole_matrices_under_fsdp(tmp_path):
    """Muon's Newton-Schulz step on FSDP's row shards computes on the whole matrix (DTensor gathers what
    each product needs): the weights match one process's to rounding. Orthogonalising a shard on its
    own would move them along other directions, by as much as the steps themselves."""
    script = tmp_path / "muon_check.py"
    script.write_text(MUON_CHECK)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    moved, apart = map(float, result.stdout.split()[-2:])
    assert apart < 1e-4 * moved


def test_a_process_that_was_in_a_group_ends_with_its_status_output_and_exit_handlers(tmp_path):
    # end_process leaves by os._exit, so that the group's worker threads never meet Python's shutdown;
    # what a normal exit gives must still happen: the status, buffered output, the exit handlers.
    marker = tmp_path / "exit_handler_ran"
    program = f"""
import atexit, sys, torch
from wikigpt.runtime import end_process, join_process_group, leave_process_group
join_process_group(torch.device("cpu"), 1, sharded=True)
leave_process_group()
atexit.register(lambda: open({str(marker)!r}, "w").write("yes"))
print("buffered", end="")
print("on stderr", end="", file=sys.stderr)
end_process(3)
print("after end_process")
"""
    buffered = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}  # as output to a pipe or file is
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, env=buffered)
    assert (result.returncode, result.stdout, result.stderr) == (3, "buffered", "on stderr")
    assert marker.read_text() == "yes"
