"""A checkpoint as one GGUF file, the format of llama.cpp (and of ollama and LM Studio, built on it).

    python infer.py --checkpoint runs/mini --export-gguf model.gguf             # a run's best, float32
    python infer.py --checkpoint runs/mini --export-gguf model.gguf --gguf-type bf16
    llama-cli -m model.gguf -p "The history of" -n 60 --temp 0                  # then, in llama.cpp

A GGUF file holds the architecture's hyperparameters, the tokenizer (each id's bytes, the merges and
the pre-tokenization, by the name llama.cpp knows it under) and the tensors under llama.cpp's names.
It is written with the `gguf` package, llama.cpp's own writer, from a model that infer.py loaded, so
both blocks export: GPT-2's as llama.cpp's "gpt2", today's as "qwen3" (or "llama" and "arcee", whose
rotary pairs llama.cpp interleaves, as its own converter does). The tokenizer's pre-tokenization must be one that
llama.cpp implements: GPT-2's BPE is "gpt-2", a BPE trained by gpt_dataset.py is "llama-bpe" (Llama
3's pattern, wikigpt/tokenizer.py); a BPE trained on the pattern used before is refused, since
llama.cpp would cut its text elsewhere. bench/bench_gguf.py checks the result in llama.cpp itself:
the same ids as the shards on held-out articles, and the same greedy text as infer.py.
Used by infer.py (--export-gguf); tests/test_export.py reads its files back with the gguf package.
"""

import json
import os

from wikigpt.cli import CheckpointError, UsageError
from wikigpt.convert import family_of
from wikigpt.tokenizer import BPE_PATTERN, EOT, hf_vocab_and_merges, is_gpt2, model_tokenizer, split_pattern

# Our tensor names inside block N -> llama.cpp's inside blk.N, by architecture; the embedding, final
# norm, positions and head are the same for all.
TOP_NAMES = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
             "lm_head.weight": "output.weight"}
BLOCK_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "attn.q_norm": "attn_q_norm",
               "attn.k_norm": "attn_k_norm", "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
OUT_TYPES = {"f32": None, "f16": "F16", "bf16": "BF16"}  # 1-D tensors (norms, biases) stay float32 always


def tokenizer_metadata(directory, config):
    """(pre-tokenizer name, [token strings in id order], [token types], [merges]) of the checkpoint's
    tokenizer, in the byte-to-character spelling of Hugging Face's files, which GGUF keeps too."""
    encoding = model_tokenizer(directory)
    if is_gpt2(encoding):
        vocab, merges, pre = *hf_vocab_and_merges(), "gpt-2"
    else:
        with open(os.path.join(directory, "tokenizer.json"), encoding="utf-8") as f:
            spec = json.load(f)
        if split_pattern(spec.get("pre_tokenizer") or {}) != BPE_PATTERN:
            raise UsageError(f"{directory}'s tokenizer cuts text with a pattern that llama.cpp does not implement (it "
                             "was trained before the switch to Llama 3's); make the dataset again with gpt_dataset.py "
                             "and train on it to export to GGUF")
        vocab, pre = spec["model"]["vocab"], "llama-bpe"
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        vocab = {**vocab, EOT: encoding.eot_token}
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    if len(tokens) != config.vocab_size or tokens[encoding.eot_token] != EOT:
        raise CheckpointError(f"{directory}: its tokenizer has {len(tokens):,} ids, config.json {config.vocab_size:,}")
    types = [3 if token == EOT else 1 for token in tokens]  # 3: a control token, never produced by text
    return pre, tokens, types, merges


def gguf_tensors(state_dict, config):
    """{llama.cpp name: float32 array} of our state dict: the padding rows cut, a tied head left out
    (llama.cpp reuses the embedding), the fused q/k/v split for qwen3 and llama, gate and up split."""
    family, V = family_of(config), config.vocab_size
    out = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().float().cpu()
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[:V]
        if name in TOP_NAMES:
            out[TOP_NAMES[name]] = tensor
            continue
        _, _, layer, inner = name.split(".", 3)  # transformer.h.N.<module>.<weight or bias>
        module, kind = inner.rsplit(".", 1)
        prefix = f"blk.{layer}."
        if family != "gpt2" and module == "attn.c_attn":  # separate q, k, v
            q, k, v = tensor.split([config.n_head * config.head_dim] + [config.n_kv_head * config.head_dim] * 2)
            if family != "qwen3":  # llama.cpp's Llama and Arcee rotate interleaved pairs, their files halves
                q, k = rotate_pairs(q, config.n_head), rotate_pairs(k, config.n_kv_head)
            out.update({prefix + f"attn_{n}.{kind}": t for n, t in zip("qkv", (q, k, v))})
        elif family != "gpt2" and module == "mlp.c_fc" and config.mlp == "swiglu":  # the gated MLP: gate, then up
            gate, up = tensor.chunk(2)
            out.update({prefix + f"ffn_gate.{kind}": gate, prefix + f"ffn_up.{kind}": up})
        else:
            out[prefix + f"{BLOCK_NAMES[module]}.{kind}"] = tensor
    return {name: t.contiguous().numpy() for name, t in out.items()}


def rotate_pairs(weight, heads):
    """Rows of each head reordered from (first half, second half) to interleaved pairs, as llama.cpp's
    converter does for Llama: the same rotation under the other convention."""
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def check_exportable(config, directory):
    """Refuses, before anything is written, a model that no llama.cpp architecture computes."""
    if family_of(config) == "wikigpt":
        raise UsageError(f"{directory} mixes pieces that no llama.cpp architecture computes (a measurement); "
                         "train with --arch gpt2, qwen3, llama or arcee to export to GGUF")


def write_gguf(state_dict, config, directory, out_path, outtype="f32"):
    """Writes the GGUF file of a model (its state dict and config, loaded from `directory`, whose
    tokenizer it takes) to out_path, through a temporary name: a file of that name is always whole."""
    import gguf

    check_exportable(config, directory)
    family = family_of(config)
    pre, tokens, types, merges = tokenizer_metadata(directory, config)
    partial = out_path + ".partial"
    writer = gguf.GGUFWriter(partial, family)
    writer.add_name(os.path.basename(os.path.normpath(directory)))
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.mlp_hidden)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    if family == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
    else:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.norm_eps)
    qtype = OUT_TYPES[outtype]
    writer.add_file_type({None: gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                          "BF16": gguf.LlamaFileType.MOSTLY_BF16}[qtype])
    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.eot_token)
    writer.add_eos_token_id(config.eot_token)
    writer.add_add_bos_token(False)  # prompts start as the training text did, without a token in front
    for name, array in gguf_tensors(state_dict, config).items():
        if qtype is None or array.ndim == 1:
            writer.add_tensor(name, array)
        else:
            kind = getattr(gguf.GGMLQuantizationType, qtype)
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, out_path)
