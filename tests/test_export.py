"""GGUF files for llama.cpp (infer.py --export-gguf), read back with the gguf package: metadata,
tokenizer and tensors equal to the checkpoint's. That llama.cpp itself tokenizes and generates the
same is bench/bench_gguf.py's check (building llama.cpp takes minutes)."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_clear_error, checkpoint_of_two_steps, run_script
from wikigpt.tokenizer import byte_characters, model_tokenizer

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def checkpoints(sample_dir, bpe_sample_dir, tmp_path_factory):
    """GPT-2's block on GPT-2's BPE; today's, untied, with heads of 48 beside a stream of 64 (as the
    quickstart's are wider than its stream), on a trained BPE."""
    root = tmp_path_factory.mktemp("runs")
    return {"gpt2": checkpoint_of_two_steps(sample_dir, root / "gpt2", "--sample-tokens", "0", "--arch", "gpt2"),
            "qwen3": checkpoint_of_two_steps(bpe_sample_dir, root / "qwen3", "--sample-tokens", "0", "--arch", "qwen3",
                                             "--no-tie-embeddings", "--n-kv-head", "1", "--head-dim", "48")}


def export(checkpoint, path, *extra):
    result = run_script("infer.py", ["--checkpoint", checkpoint, "--export-gguf", str(path), *extra])
    assert result.returncode == 0, result.stderr[-2000:]
    return gguf.GGUFReader(str(path))


def fields(reader):
    return {name: field.contents() for name, field in reader.fields.items()}


def tensors(reader):
    return {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_gguf_holds_the_checkpoint_s_shape_tokenizer_and_weights(checkpoints, arch, tmp_path):
    checkpoint = checkpoints[arch]
    meta = fields(export(checkpoint, tmp_path / "model.gguf"))
    config = json.loads(open(f"{checkpoint}/config.json").read())
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.block_count"] == 2 and meta[f"{arch}.embedding_length"] == 64
    encoding = model_tokenizer(checkpoint)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == {"gpt2": "gpt-2", "qwen3": "llama-bpe"}[arch]
    assert meta["tokenizer.ggml.eos_token_id"] == encoding.eot_token and not meta["tokenizer.ggml.add_bos_token"]
    tokens, inverse = meta["tokenizer.ggml.tokens"], {c: b for b, c in byte_characters().items()}
    assert len(tokens) == encoding.n_vocab == config["vocab_size"]
    for i in list(range(0, encoding.n_vocab, 997)) + [encoding.n_vocab - 2]:  # each id spells its own bytes
        assert bytes(inverse[c] for c in tokens[i]) == encoding.decode_single_token_bytes(i), i
    assert len(meta["tokenizer.ggml.merges"]) == encoding.n_vocab - 257  # one per token beyond the bytes and EOT
    weights = load_file(f"{checkpoint}/model.safetensors")
    stored = tensors(gguf.GGUFReader(str(tmp_path / "model.gguf")))
    if arch == "gpt2":  # GPT-2's Conv1D weights (in, out) are nn.Linear's (out, in) in GGUF, as llama.cpp wants
        assert meta["gpt2.context_length"] == 32 and meta["gpt2.attention.head_count"] == 2
        pairs = [("transformer.h.1.attn.c_attn.weight", "blk.1.attn_qkv.weight", True),
                 ("transformer.h.0.mlp.c_fc.bias", "blk.0.ffn_up.bias", False),
                 ("transformer.wpe.weight", "position_embd.weight", False),
                 ("transformer.wte.weight", "token_embd.weight", False)]
        assert "output.weight" not in stored  # tied: llama.cpp reuses the embedding
    else:
        assert (meta["qwen3.attention.head_count_kv"], meta["qwen3.attention.key_length"]) == (1, 48)
        assert meta["qwen3.attention.value_length"] == 48 and stored["blk.0.attn_q.weight"].shape == (2 * 48, 64)
        assert meta["qwen3.rope.freq_base"] == 10000.0 and meta["qwen3.feed_forward_length"] == 192
        pairs = [(f"model.layers.1.self_attn.{p}_proj.weight", f"blk.1.attn_{p}.weight", False) for p in "qkv"]
        pairs += [("model.layers.0.self_attn.k_norm.weight", "blk.0.attn_k_norm.weight", False),
                  ("model.layers.0.mlp.gate_proj.weight", "blk.0.ffn_gate.weight", False),
                  ("model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight", False),
                  ("lm_head.weight", "output.weight", False), ("model.norm.weight", "output_norm.weight", False)]
    assert len(stored) == len(weights) - ("transformer.h.0.attn.bias" in weights)
    for hf_name, gguf_name, transposed in pairs:
        expected = weights[hf_name].t() if transposed else weights[hf_name]
        assert np.array_equal(stored[gguf_name], expected.numpy()), gguf_name


def test_bf16_gguf_keeps_norms_in_float32(checkpoints, tmp_path):
    reader = export(checkpoints["qwen3"], tmp_path / "model.gguf", "--gguf-type", "bf16")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.BF16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    bits = np.asarray(next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight").data).view(np.uint16)
    expected = load_file(f"{checkpoints['qwen3']}/model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    widened = torch.from_numpy(bits.astype(np.int32) << 16).view(torch.float32).reshape(expected.shape)
    torch.testing.assert_close(widened, expected, rtol=1 / 128, atol=0)


def test_what_llama_cpp_cannot_run_is_refused_and_nothing_written(checkpoints, sample_dir, tmp_path):
    old = tmp_path / "old-pattern"
    shutil.copytree(checkpoints["qwen3"], old)
    spec = json.loads((old / "tokenizer.json").read_text())
    split = next(p for p in spec["pre_tokenizer"]["pretokenizers"] if p["type"] == "Split")
    split["pattern"]["Regex"] = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[\p{L}\p{M}]+| ?\p{N}{1,3}| ?[^\s\p{L}\p{M}\p{N}]+|\s+(?!\S)|\s+"""
    (old / "tokenizer.json").write_text(json.dumps(spec))
    mixed = checkpoint_of_two_steps(sample_dir, tmp_path / "mixed", "--sample-tokens", "0", "--arch", "gpt2",
                                    "--positions", "rotary")
    for checkpoint, message in [(str(old), "pattern that llama.cpp does not implement"),
                                (mixed, "mixes pieces that no llama.cpp architecture computes")]:
        result = run_script("infer.py", ["--checkpoint", checkpoint, "--export-gguf", str(tmp_path / "x.gguf")])
        assert_one_clear_error(result, message)
    result = run_script("infer.py", ["--checkpoint", mixed, "--export-gguf", str(tmp_path / "x.gguf"), "--gguf-type", "q4"])
    assert_one_clear_error(result, "--gguf-type must be one of f32, f16, bf16")
    assert not list(tmp_path.glob("x.gguf*"))
