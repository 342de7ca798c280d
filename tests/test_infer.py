"""infer.py: parity with transformers, checkpoint discovery, streaming, safety and bad input."""

import json
import os
import pickle

import pytest
import torch

import infer
from conftest import assert_one_clear_error, run_script
from transformer import GPT, GPTConfig
from wikigpt.checkpoint import best_checkpoint
from wikigpt.cli import CheckpointError, UsageError
from wikigpt.generation import generate_text
from wikigpt.quantize import half_kernel_error
from wikigpt.tokenizer import gpt2_tokenizer

# float16 weights on a CPU go through fbgemm's kernel, which PyTorch builds for x86 only
needs_fbgemm = pytest.mark.skipif(half_kernel_error() is not None, reason="fbgemm's float16 kernel runs on x86 only")


def save_tiny(directory, seed=0, block_size=64):
    torch.manual_seed(seed)
    GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size)).save_pretrained(directory)
    return str(directory)


def run_infer(args):
    return run_script("infer.py", args)


def test_greedy_output_equals_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path)
    prompt = gpt2_tokenizer().encode_ordinary("The river Thames flows through London")
    idx = torch.tensor([prompt])
    expected = hf.generate(idx, max_new_tokens=40, min_new_tokens=40, do_sample=False,
                           attention_mask=torch.ones_like(idx), pad_token_id=50256)[0, len(prompt):].tolist()
    model = infer.load_model(str(tmp_path), torch.device("cpu"))
    text = generate_text(model, gpt2_tokenizer(), prompt, max_new_tokens=40, temperature=0, stop_at_eot=False)
    assert text == gpt2_tokenizer().decode(expected)


def test_cache_and_no_cache_give_the_same_text(tmp_path):
    model = infer.load_model(save_tiny(tmp_path, block_size=32), torch.device("cpu"))
    prompt = gpt2_tokenizer().encode_ordinary("Paris is the capital")
    kwargs = dict(max_new_tokens=20, temperature=0.9, top_k=50, seed=3, stop_at_eot=False)
    tokenizer = gpt2_tokenizer()
    assert generate_text(model, tokenizer, prompt, **kwargs) == generate_text(model, tokenizer, prompt, use_cache=False,
                                                                              **kwargs)


def test_streamed_pieces_join_to_the_returned_text(tmp_path):
    model = infer.load_model(save_tiny(tmp_path), torch.device("cpu"))
    pieces = []
    text = generate_text(model, gpt2_tokenizer(), [50256], max_new_tokens=30, temperature=1.0, seed=1, stop_at_eot=False,
                               on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == text


def test_same_seed_same_text_and_cli_is_reproducible(tmp_path):
    path = save_tiny(tmp_path)
    args = ["--checkpoint", path, "--input", "Hello", "--max-new-tokens", "12", "--no-stop-at-eot"]
    first, second, other = run_infer(args), run_infer(args), run_infer(args + ["--seed", "2"])
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout != other.stdout
    assert first.stdout.startswith("Hello")


def test_empty_prompt_starts_a_new_document_and_long_prompts_keep_their_end():
    assert infer.encode_prompt(gpt2_tokenizer(), "", 64) == ([50256], 0)
    ids = gpt2_tokenizer().encode_ordinary("word " * 100)
    kept, cut = infer.encode_prompt(gpt2_tokenizer(), "word " * 100, 64)
    assert kept == ids[-32:] and cut == len(ids) - 32


def test_long_prompt_is_cut_with_a_note(tmp_path):
    result = run_infer(["--checkpoint", save_tiny(tmp_path), "--input", "word " * 100, "--max-new-tokens", "4"])
    assert result.returncode == 0, result.stderr
    assert "longer than the model's context of 64 tokens" in result.stderr


def test_run_directory_picks_the_best_checkpoint_and_default_picks_the_newest_run(tmp_path):
    runs = tmp_path / "runs"
    for name, loss in (("ckpt_0000010", 3.0), ("ckpt_0000020", 2.5), ("ckpt_0000030", 2.7)):
        save_tiny(runs / "old" / name)
        (runs / "old" / name / "trainer_state.json").write_text(f'{{"val_loss": {loss}}}')
    os.makedirs(runs / "old" / ".tmp_ckpt_0000040")  # a partial write is never chosen
    assert best_checkpoint(str(runs / "old")).endswith("ckpt_0000020")
    save_tiny(runs / "new" / "ckpt_0000005")
    path, note = infer.resolve_checkpoint(None, str(runs))
    assert path.endswith(os.path.join("new", "ckpt_0000005")) and "newest run" in note
    with pytest.raises(UsageError, match="no trained checkpoints"):
        infer.resolve_checkpoint(None, str(tmp_path / "empty"))


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_malicious_pickle_is_never_run(tmp_path):
    path = save_tiny(tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        pickle.dump(Exploit(), f)
    os.remove(os.path.join(path, "model.safetensors"))
    result = run_script("infer.py", ["--checkpoint", path, "--input", "x"], cwd=tmp_path)
    assert result.returncode != 0 and "no model.safetensors" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]), "damaged"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "config.json").write_text((d / "config.json").read_text().replace('"n_layer": 2', '"n_layer": 3')),
     "does not match"),
    (lambda d: (d / "config.json").write_text((d / "config.json").read_text().replace('"n_embd": 32', '"n_embd": 48')),
     "shape"),
    (lambda d: os.remove(d / "config.json"), "config.json not found"),
])
def test_damaged_checkpoints_are_refused(tmp_path, damage, message):
    path = save_tiny(tmp_path / "ckpt")
    damage(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=message):
        infer.load_model(path, torch.device("cpu"))
    result = run_infer(["--checkpoint", path, "--input", "x"])
    assert result.returncode != 0 and "Traceback" not in result.stderr


def test_non_finite_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_tiny(tmp_path / "ckpt")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        infer.load_model(path, torch.device("cpu"))


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--device", "quantum"], "unknown device"),
    (["--checkpoint", "/nonexistent/dir"], "not a model directory"),
    (["--seed", "x"], "invalid int value"),
    (["--quantize", "int4"], "--quantize must be none or int8, got 'int4'"),
])
def test_bad_input_gets_one_clear_line(tmp_path, args, message):
    base = ["--checkpoint", save_tiny(tmp_path), "--input", "x"]
    assert_one_clear_error(run_infer(base + args), message)


@pytest.mark.parametrize("arch, data", [("gpt2", "sample_dir"), ("qwen3", "bpe_sample_dir")])
def test_trained_checkpoint_prints_a_continuation(arch, data, request, tmp_path):
    """Both blocks, each with a tokenizer of its own; 40 tokens, past the context of 32."""
    import gpt_train

    run = tmp_path / "run"
    gpt_train.main(["--data", request.getfixturevalue(data), "--out-dir", str(run), "--preset", "tiny", "--block-size",
                    "32", "--batch-size", "4", "--max-steps", "3", "--sample-tokens", "0", "--eval-steps", "1",
                    "--final-eval-tokens", "2048", "--arch", arch])
    result = run_infer(["--checkpoint", str(run), "--input", "The city", "--max-new-tokens", "40",
                        "--num-samples", "2", "--no-stop-at-eot"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- sample") == 2 and result.stdout.count("The city") == 2
    assert "ckpt_0000003" in result.stderr


def limited_memory():
    """For Popen's preexec_fn: 6 GiB of address space. A model built from the edited config below would
    need hundreds of GiB, so only a check made before anything large is allocated passes under it."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def test_a_config_far_larger_than_its_weights_is_refused_before_allocating(sample_dir, tmp_path):
    """infer.py, --init-from and --resume on a checkpoint whose config.json claims 200 layers of width 8,192."""
    run = tmp_path / "run"
    trained = run_script("gpt_train.py", ["--data", sample_dir, "--out-dir", str(run), "--preset", "tiny",
                                          "--block-size", "32", "--batch-size", "2", "--max-steps", "1",
                                          "--eval-steps", "1", "--sample-tokens", "0", "--final-eval-tokens", "2048"])
    assert trained.returncode == 0, trained.stderr[-2000:]
    checkpoint = run / "ckpt_0000001"
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(n_layer=200, n_embd=8192, n_head=64, num_hidden_layers=200, hidden_size=8192, num_attention_heads=64,
                  head_dim=128)  # GPT-2's keys and Qwen3's, whichever block the default trains
    (checkpoint / "config.json").write_text(json.dumps(config))
    commands = [("infer.py", ["--checkpoint", str(checkpoint), "--input", "x"]),
                ("gpt_train.py", ["--data", sample_dir, "--out-dir", str(tmp_path / "new"), "--init-from",
                                  str(checkpoint), "--max-steps", "1"]),
                ("gpt_train.py", ["--data", sample_dir, "--out-dir", str(run), "--preset", "tiny", "--block-size", "32",
                                  "--batch-size", "2", "--max-steps", "2", "--eval-steps", "1", "--sample-tokens", "0",
                                  "--final-eval-tokens", "2048", "--resume"])]
    for name, args in commands:
        result = run_script(name, args, preexec_fn=limited_memory)
        assert_one_clear_error(result, "does not match config.json")


# ---- Weight-only int8 (--quantize int8) ----

@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_int8_logits_stay_within_the_rounding_of_each_weight_row(arch):
    from transformer import config_from_preset
    from wikigpt.quantize import Int8Linear, quantize_int8

    torch.manual_seed(0)
    model = GPT(config_from_preset("tiny", arch, n_kv_head=1 if arch == "qwen3" else None)).eval().to(torch.bfloat16)
    idx = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        reference = model(idx)[0][..., :50257].float()
        quantize_int8(model)
        logits = model(idx)[0]
    assert logits.shape == (2, 24, 50304) and torch.isneginf(logits[..., 50257:]).all()
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 4 * 2 + 1 and all(m.weight.dtype == torch.int8 for m in linears)
    assert model.transformer.wte.weight.dtype == torch.bfloat16  # the lookup keeps its rows
    error = (logits[..., :50257].float() - reference).abs().max().item()
    assert 0 < error < 0.05 * reference.abs().max().item()  # rounded, and by a small share of the range
    cached = torch.stack(list(model.generate(idx[:1, :5], 80, temperature=0)), dim=1)  # past the context of 64
    assert cached.shape == (1, 80)


def test_int8_decoding_stops_at_end_of_text(tmp_path):
    from wikigpt.quantize import quantize_int8

    model = infer.load_model(save_tiny(tmp_path), torch.device("cpu"), torch.bfloat16)
    quantize_int8(model)
    with torch.no_grad():  # every logit 0 but <|endoftext|>'s, which is made positive: it comes first
        model.lm_head.scale[:50256] = 0
        sign = model(torch.tensor([[464, 2106]]))[0][0, -1, 50256].sign()
        model.lm_head.scale[50256] *= sign
    assert model(torch.tensor([[464, 2106]]))[0][0, -1, :50257].argmax() == 50256
    text = generate_text(model, gpt2_tokenizer(), [464, 2106], max_new_tokens=10, temperature=0)
    assert text == ""
    kept = generate_text(model, gpt2_tokenizer(), [464, 2106], max_new_tokens=3, temperature=0, stop_at_eot=False)
    assert kept.startswith("<|endoftext|>") and len(kept) > len("<|endoftext|>")  # and goes on past it


@pytest.mark.parametrize("weights", [["--quantize", "int8", "--dtype", "bfloat16"],
                                     pytest.param(["--dtype", "float16"], marks=needs_fbgemm)])
@pytest.mark.parametrize("data", ["sample_dir", "bpe_sample_dir"])
def test_int8_and_float16_decode_a_trained_checkpoint_of_each_tokenizer(data, weights, request, tmp_path):
    import gpt_train

    run = tmp_path / "run"
    gpt_train.main(["--data", request.getfixturevalue(data), "--out-dir", str(run), "--preset", "tiny", "--block-size",
                    "32", "--batch-size", "4", "--max-steps", "3", "--sample-tokens", "0", "--eval-steps", "1",
                    "--final-eval-tokens", "2048", "--arch", "qwen3"])
    result = run_infer(["--checkpoint", str(run), "--input", "The city", "--max-new-tokens", "40", "--no-stop-at-eot",
                        *weights])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The city") and len(result.stdout) > len("The city") + 20


def test_the_automatic_weight_dtype_is_float16_on_a_cpu_with_fbgemm_and_gives_int8_bf16_activations(monkeypatch):
    from wikigpt import runtime

    cpu = torch.device("cpu")
    assert runtime.inference_weight_dtype("auto", cpu, "int8") == torch.bfloat16  # int8's fast kernel
    assert runtime.inference_weight_dtype("float32", cpu, "int8") == torch.float32  # asked for: as asked
    assert runtime.inference_weight_dtype("bfloat16", cpu) == torch.bfloat16
    has_fbgemm = half_kernel_error() is None  # x86; ARM CPUs have no fbgemm
    assert runtime.inference_weight_dtype("auto", cpu) == (torch.float16 if has_fbgemm else torch.float32)
    monkeypatch.setattr(runtime, "half_kernel_error", lambda: "RuntimeError: no fbgemm")  # as on ARM
    assert runtime.inference_weight_dtype("auto", cpu) == torch.float32
    assert runtime.inference_weight_dtype("auto", torch.device("cuda")) == torch.bfloat16


# ---- float16 weights on a CPU (fbgemm's kernel, float32 activations) ----

def rounded_to_float16(model):
    """A float32 copy of the model whose linear layers' weights are rounded to float16 and back; a tied
    head gets its own rounded copy, the embedding keeps its rows (as HalfLinear does)."""
    import copy

    rounded = copy.deepcopy(model)
    rounded.lm_head.weight = torch.nn.Parameter(rounded.lm_head.weight.detach().clone())
    with torch.no_grad():
        for linear in (m for m in rounded.modules() if isinstance(m, torch.nn.Linear)):
            linear.weight.copy_(linear.weight.half().float())
    return rounded


@needs_fbgemm
@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_float16_decoding_on_a_cpu_multiplies_the_float16_rounded_weights(arch, tmp_path):
    """infer.load_model with float16 on a CPU: every linear layer (the tied head included) becomes a
    HalfLinear around fbgemm's kernel; logits equal float32 products of the float16-rounded weights, up to
    summation order, and differ from the unrounded model's; greedy tokens, cached or not, are the rounded
    model's; the embedding, norms and cache stay float32."""
    from transformer import config_from_preset
    from wikigpt.quantize import HalfLinear

    torch.manual_seed(0)
    GPT(config_from_preset("tiny", arch)).save_pretrained(tmp_path)
    plain = GPT.from_pretrained(tmp_path).eval()
    reference = rounded_to_float16(plain)
    half = infer.load_model(tmp_path, torch.device("cpu"), torch.float16)
    linears = [m for m in half.modules() if isinstance(m, HalfLinear)]
    assert len(linears) == 4 * 2 + 1 and not any(isinstance(m, torch.nn.Linear) for m in half.modules())
    assert half.transformer.wte.weight.dtype == torch.float32
    idx = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        logits, expected, unrounded = half(idx)[0], reference(idx)[0], plain(idx)[0]
    assert logits.dtype == torch.float32 and logits.shape == (2, 12, 50304)
    assert torch.isneginf(logits[..., 50257:]).all()
    torch.testing.assert_close(logits[..., :50257], expected[..., :50257], rtol=1e-5, atol=1e-5)
    assert (logits[..., :50257] - unrounded[..., :50257]).abs().max() > 1e-6  # the rounding is really there
    greedy = [torch.stack(list(m.generate(idx[:1, :4], 80, temperature=0)), dim=1) for m in (reference, half)]
    assert torch.equal(*greedy)  # 80 tokens: past the context of 64, so the cache slides too
    recomputed = torch.stack(list(half.generate(idx[:1, :4], 30, temperature=0, use_cache=False)), dim=1)
    assert torch.equal(recomputed, greedy[0][:, :30])


@needs_fbgemm
def test_float16_refuses_weights_beyond_its_range_and_a_missing_kernel_in_one_line(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = 1e5  # float16 ends at 65,504
    model.save_pretrained(tmp_path / "wide")
    with pytest.raises(UsageError, match="--dtype float16: this model has weights beyond float16's range .* use --dtype float32"):
        infer.main(["--checkpoint", str(tmp_path / "wide"), "--input", "x", "--dtype", "float16"])

    def missing(*args):
        raise RuntimeError("no fbgemm here")

    monkeypatch.setattr(torch.ops.quantized, "linear_dynamic_fp16", missing)
    with pytest.raises(UsageError, match=r"--dtype float16 on a CPU needs fbgemm's float16 kernel, .*no fbgemm here.*; "
                                         "use --dtype float32"):
        infer.main(["--checkpoint", save_tiny(tmp_path / "tiny"), "--input", "x", "--dtype", "float16"])
    result = infer.main(["--checkpoint", save_tiny(tmp_path / "tiny"), "--input", "x", "--max-new-tokens", "2"])
    assert result is None  # auto falls back to float32 without the kernel


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_float32_decoding_over_every_core_computes_what_the_linear_layers_do(arch, tmp_path):
    """wikigpt/quantize.py: infer.load_model spreads each float32 matrix-vector product over the cores
    (a slice of the weight's rows each, in one batched product); logits and greedy tokens stay those of
    nn.Linear, the tied head keeps sharing the embedding, and bf16 or a single thread change nothing."""
    from transformer import config_from_preset
    from wikigpt.quantize import MatVecLinear, spread_matvecs

    torch.manual_seed(0)
    GPT(config_from_preset("tiny", arch)).save_pretrained(tmp_path)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)  # four slices, whatever the machine has
        plain = GPT.from_pretrained(tmp_path).eval()
        spread = infer.load_model(tmp_path, torch.device("cpu"))
        linears = [m for m in spread.modules() if isinstance(m, MatVecLinear)]
        assert len(linears) == 4 * 2 + 1 and not any(isinstance(m, torch.nn.Linear) for m in spread.modules())
        assert all(m.parts == 4 for m in linears)  # every width here is a multiple of 4
        assert spread.lm_head.weight is spread.transformer.wte.weight  # tied, as the tiny preset is
        idx, row = torch.randint(0, 50257, (1, 12)), torch.randn(1, 1, 64)
        with torch.no_grad():
            torch.testing.assert_close(spread(idx)[0], plain(idx)[0])  # a prompt: F.linear, as before
            torch.testing.assert_close(spread.lm_head(row), plain.lm_head(row))  # one row: the batched slices
        greedy = [torch.stack(list(m.generate(idx[:, :4], 40, temperature=0)), dim=1) for m in (plain, spread)]
        assert torch.equal(*greedy)
        torch.set_num_threads(1)
        assert not any(isinstance(m, MatVecLinear) for m in spread_matvecs(GPT.from_pretrained(tmp_path)).modules())
        torch.set_num_threads(4)
        bf16 = GPT.from_pretrained(tmp_path).to(torch.bfloat16)
        assert not any(isinstance(m, MatVecLinear) for m in spread_matvecs(bf16).modules())
    finally:
        torch.set_num_threads(threads)


def test_int8_without_its_kernel_is_refused_in_one_line(tmp_path, monkeypatch):
    def missing(*args):
        raise NotImplementedError("no kernel")

    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", missing)
    with pytest.raises(UsageError, match="--quantize int8: this PyTorch .* has no int8 weight-only kernel for cpu"):
        infer.main(["--checkpoint", save_tiny(tmp_path), "--input", "x", "--quantize", "int8"])
