"""Hugging Face's layouts, both ways: config.json and model.safetensors (plus the generation_config.json
that pipeline() samples with) of GPT-2, Qwen3, Llama and Arcee.

Used by transformer.py, whose GPT.save_pretrained and GPT.from_pretrained hand their work to this
module, so that the model file holds the model alone. The model's module names follow GPT-2's
checkpoints (`transformer.h.0.attn.c_attn`, ...) whatever its pieces; here they become the names of
the stock class that computes the same (family_of):
    gpt2   GPT2LMHeadModel: the same names; projection weights transposed, as GPT-2 stores them as
           Conv1D, (in, out), where nn.Linear keeps (out, in)
    qwen3  Qwen3ForCausalLM, llama (LlamaForCausalLM: no query/key norms) and arcee (ArceeForCausalLM:
           Llama with a ReLU^2 MLP): `model.layers.N`, c_attn split into q_proj, k_proj and v_proj, the
           gated MLP's c_fc into gate_proj and up_proj (a plain one's is up_proj)
    wikigpt  any other mix of pieces (a measurement: GPT-2 with rotary positions, say), which no stock
           class runs: our own names, and a config.json that only this code reads
The vocabulary is stored with its real rows only; the model pads it to a multiple of 64.

Only JSON and safetensors are read, so nothing in a downloaded checkpoint can run code, and the
safetensors header is checked against config.json before any tensor is read or allocated.
"""

import json
import math
import os
from dataclasses import asdict

import torch

from wikigpt.cli import CheckpointError
from wikigpt.generation import DEFAULT_TEMPERATURE, DEFAULT_TOP_K
from wikigpt.tokenizer import EOT_TOKEN

# nn.Linear weights that GPT-2 checkpoints store transposed, as Conv1D (in, out).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Our names inside block N -> Qwen3's and Llama's inside model.layers.N; the fused matrices are split.
LLAMA_NAMES = {"ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight",
               "attn.c_proj.weight": "self_attn.o_proj.weight", "mlp.c_proj.weight": "mlp.down_proj.weight",
               "attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight"}
LLAMA_SPLITS = {"attn.c_attn.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                "mlp.c_fc.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}
# What each stock class computes, in the pieces of GPTConfig.
FAMILIES = {
    "gpt2": dict(norm="layernorm", positions="learned", qk_norm=False, mlp="gelu", bias=True, tie_embeddings=True),
    "qwen3": dict(norm="rmsnorm", positions="rotary", qk_norm=True, mlp="swiglu", bias=False),
    "llama": dict(norm="rmsnorm", positions="rotary", qk_norm=False, mlp="swiglu", bias=False),
    "arcee": dict(norm="rmsnorm", positions="rotary", qk_norm=False, mlp="relu2", bias=False),
}
CLASS_NAMES = {"gpt2": "GPT2LMHeadModel", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
               "arcee": "ArceeForCausalLM"}
LLAMA_LIKE = ("qwen3", "llama", "arcee")  # the families of model.layers.N


def family_of(config):
    """The Hugging Face family whose stock class computes what `config` does, else "wikigpt"."""
    for family, pieces in FAMILIES.items():
        plain_heads = family != "gpt2" or (config.n_kv_head == config.n_head and config.head_dim * config.n_head
                                           == config.n_embd)
        if plain_heads and all(getattr(config, k) == v for k, v in pieces.items()):
            return family
    return "wikigpt"


# ---- Saving ----


def hf_config_dict(config):
    """config.json in the schema of the config's family; our own fields ride along under their own names."""
    family, eot = family_of(config), config.eot_token
    common = {"architectures": [CLASS_NAMES.get(family, "GPT")], "model_type": family, "vocab_size": config.vocab_size,
              "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": config.tie_embeddings,
              "padded_vocab_size": config.padded_vocab_size, "attention": config.attention}
    if family == "wikigpt":
        return {**common, "architectures": [], "wikigpt_config": asdict(config)}
    if family == "gpt2":
        return {**common, "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
                "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.mlp_hidden,
                "activation_function": "gelu_new",  # Hugging Face's name for the tanh approximation
                "layer_norm_epsilon": config.norm_eps, "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
                "attn_pdrop": config.dropout, "initializer_range": 0.02, "scale_attn_weights": True}
    return {**common, "hidden_size": config.n_embd, "intermediate_size": config.mlp_hidden,
            "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
            "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim,
            "hidden_act": "relu2" if config.mlp == "relu2" else "silu",
            "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
            "rope_theta": config.rope_theta, "rope_scaling": None,  # as transformers 4 and llama.cpp read it
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},  # as transformers 5 does
            "attention_bias": False, "mlp_bias": False, "use_sliding_window": False,
            "attention_dropout": config.dropout, "initializer_range": 0.02, "torch_dtype": "float32"}


def to_hf(state_dict, config):
    """{name in the family's safetensors: tensor} of our state dict: renamed, split or transposed as the
    stock class stores them, the vocabulary without its padding rows, a tied head left out (the
    loader ties it again). Works on meta tensors too, which gives the shapes a file must have."""
    family, V = family_of(config), config.vocab_size
    out = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[:V]  # padding rows are no tokens
        if family == "gpt2" and name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()  # nn.Linear (out, in) -> GPT-2 Conv1D (in, out)
        if family in LLAMA_LIKE:
            for hf_name, part in llama_names(name, tensor, config):
                out[hf_name] = part
        else:
            out[name] = tensor
    return out


def llama_names(name, tensor, config):
    """[(Qwen3/Llama name, tensor)] of one of our tensors: renamed, or split into its parts."""
    top = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
           "lm_head.weight": "lm_head.weight"}
    if name in top:
        return [(top[name], tensor)]
    _, _, layer, inner = name.split(".", 3)  # transformer.h.N.<inner>
    prefix = f"model.layers.{layer}."
    if inner == "mlp.c_fc.weight" and config.mlp != "swiglu":
        return [(prefix + "mlp.up_proj.weight", tensor)]  # a plain MLP: one matrix up
    if inner in LLAMA_SPLITS:
        sizes = (config.n_head * config.head_dim, *[config.n_kv_head * config.head_dim] * 2)
        parts = tensor.split(sizes) if inner.startswith("attn") else tensor.chunk(2)
        return [(prefix + hf, part) for hf, part in zip(LLAMA_SPLITS[inner], parts)]
    return [(prefix + LLAMA_NAMES[inner], tensor)]


def write_hf_model(directory, state_dict, config):
    """Writes `config.json`, `model.safetensors` and `generation_config.json` (infer.py's default
    sampling) of a model's state dict, as the family's `from_pretrained` loads them."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in to_hf(state_dict, config).items()}
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config_dict(config), f, indent=2)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:  # what pipeline() samples with
        eot = config.eot_token
        json.dump({"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
                   "do_sample": True, "temperature": DEFAULT_TEMPERATURE, "top_k": DEFAULT_TOP_K}, f, indent=2)


# ---- Loading: the config ----


def model_directory(path_or_name):
    """A local directory as is; otherwise a Hugging Face hub name, downloaded (weights only) when online."""
    if os.path.isdir(path_or_name):
        return path_or_name
    if os.path.exists(path_or_name) or path_or_name.startswith((".", "/", "~")) or path_or_name.count("/") > 1:
        raise CheckpointError(f"{path_or_name} is not a model directory (config.json + model.safetensors)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path_or_name, allow_patterns=["config.json", "*.safetensors", "tokenizer.json",
                                                               "model.safetensors.index.json"])
    except Exception as e:  # the hub client raises many types: offline, unknown repo, gated, ...
        raise CheckpointError(f"could not fetch {path_or_name!r} from the Hugging Face hub ({type(e).__name__}); "
                              "check the name and the network, or pass a local model directory") from e


def read_json(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found; a model directory holds config.json and model.safetensors")
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; the checkpoint is damaged")
    return value


def read_config(directory, config_class, **overrides):
    """The `config_class` (GPTConfig) of a model directory's config.json (GPT-2's, Qwen3's, Llama's or
    our own schema), refusing options this implementation does not compute. `overrides` that are not
    None win."""
    hf = read_json(os.path.join(directory, "config.json"))
    family = hf.get("model_type")
    readers = {"gpt2": gpt2_fields, **{f: llama_fields for f in LLAMA_LIKE}, "wikigpt": lambda hf: hf["wikigpt_config"]}
    if family not in readers:
        raise CheckpointError(f"config.json describes a {family!r} model; this code runs {', '.join(readers)}")
    try:
        values = dict(readers[family](hf))
        if family != "wikigpt":
            vocab_size = int(hf["vocab_size"])
            values.update(vocab_size=vocab_size, padded_vocab_size=int(hf.get("padded_vocab_size",
                                                                              math.ceil(vocab_size / 64) * 64)),
                          eot_token=hf["eos_token_id"] if isinstance(hf.get("eos_token_id"), int)
                          else min(EOT_TOKEN, vocab_size - 1), attention=str(hf.get("attention", "auto")))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return config_class(**values)
    except KeyError as e:
        raise CheckpointError(f"config.json lacks the field {e.args[0]!r}; it is not a {family} config") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json holds an impossible {family} config: {e}") from e


def refuse_unsupported(hf, unsupported):
    """Refuses config.json settings (`{key: allowed values}`) that this implementation does not compute."""
    for key, allowed in unsupported.items():
        if key in hf and hf[key] not in allowed:
            raise CheckpointError(f"config.json sets {key}={hf[key]!r}, which this model does not implement")


def gpt2_fields(hf):
    refuse_unsupported(hf, {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "scale_attn_weights": (True,),
                            "scale_attn_by_inverse_layer_idx": (False,), "add_cross_attention": (False,),
                            "tie_word_embeddings": (True,)})
    return dict(block_size=int(hf["n_positions"]), n_layer=int(hf["n_layer"]), n_head=int(hf["n_head"]),
                n_embd=int(hf["n_embd"]), mlp_hidden=hf.get("n_inner"), dropout=float(hf.get("resid_pdrop", 0.0)),
                norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), **FAMILIES["gpt2"])


def llama_fields(hf):
    """Our fields of a Qwen3, Llama or Arcee config.json."""
    activation = "relu2" if hf["model_type"] == "arcee" else "silu"
    refuse_unsupported(hf, {"hidden_act": (activation,), "attention_bias": (False,), "mlp_bias": (False,),
                            "use_sliding_window": (False,), "rope_scaling": (None,), "pretraining_tp": (1,)})
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"config.json scales rotary positions ({rope['rope_type']!r}), which this model does "
                              "not implement")
    return dict(block_size=int(hf["max_position_embeddings"]), n_layer=int(hf["num_hidden_layers"]),
                n_head=int(hf["num_attention_heads"]), n_embd=int(hf["hidden_size"]),
                n_kv_head=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
                mlp_hidden=int(hf["intermediate_size"]), dropout=float(hf.get("attention_dropout", 0.0)),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(rope["rope_theta"]),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **FAMILIES[hf["model_type"]])


# ---- Loading: the weights ----


def our_name(hf_name):
    """The name a GPT-2 file's tensor has in the file we expect, or None for what is no weight."""
    if hf_name.endswith((".attn.bias", ".attn.masked_bias")):
        return None  # old causal-mask buffers of GPT-2, not weights
    if not hf_name.startswith(("transformer.", "model.")) and hf_name != "lm_head.weight":
        return "transformer." + hf_name  # GPT-2 hub checkpoints saved from GPT2Model have no prefix
    return hf_name


def weight_files(directory):
    """The safetensors files of a model directory: model.safetensors, or the shards that
    model.safetensors.index.json lists (large hub models)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        return [os.path.join(directory, name) for name in sorted(set(read_json(index).get("weight_map", {}).values()))]
    return [os.path.join(directory, "model.safetensors")]


def check_safetensors_header(directory, model):
    """Refuses safetensors whose tensor names or shapes differ from what `model`'s config implies,
    from the files' headers alone (a few kilobytes, whatever the files' size)."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for path in weight_files(directory):
        if not os.path.isfile(path):
            raise CheckpointError(f"{directory} has no {os.path.basename(path)}; weights are read only from "
                                  "safetensors (convert a pytorch_model.bin with transformers first)")
        try:
            with safe_open(path, framework="pt") as f:
                shapes.update({name: tuple(f.get_slice(k).get_shape()) for k in f.keys() if (name := our_name(k))})
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is damaged or incomplete ({e}); save or copy it again") from e
    implied = {name: tuple(t.shape) for name, t in to_hf(model.state_dict(), model.config).items()}
    optional = {"lm_head.weight"} if model.config.tie_embeddings else set()  # a tied head may be stored or not
    missing, unexpected = sorted(set(implied) - set(shapes)), sorted(set(shapes) - set(implied) - optional)
    weights_path = weight_files(directory)[0]
    if missing or unexpected:
        raise CheckpointError(f"{weights_path} does not match config.json: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}; the checkpoint is damaged or of another model")
    for name, shape in shapes.items():
        if name in implied and shape != implied[name]:
            raise CheckpointError(f"{weights_path}: {name} has shape {shape}, config.json implies "
                                  f"{implied[name]}; the checkpoint is damaged or of another model")


def read_weights(directory, model):
    """The state dict for `model` (built on the meta device from the directory's config) from the
    directory's safetensors: headers checked first, then every value checked to be finite, and the
    tensors put back into our names and layout."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors_header(directory, model)
    tensors = {}
    for path in weight_files(directory):
        try:
            tensors.update({name: t for k, t in load_file(path).items() if (name := our_name(k))})
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is damaged or incomplete ({e}); save or copy it again") from e
    return state_dict_from_hf(tensors, model)


def state_dict_from_hf(tensors, model):
    """Our state dict from a family's tensors whose names and shapes check_safetensors_header has
    accepted: the inverse of to_hf (merged, renamed, transposed), the vocabulary padded again."""
    config, expected = model.config, model.state_dict()
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{name} holds {tensor.dtype} values; weights must be floating point")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{name} contains NaN or infinite values; the checkpoint is damaged")
    family = family_of(config)
    state = {}
    for name, like in expected.items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        if family in LLAMA_LIKE:  # split matrices are joined again
            tensor = torch.cat([tensors[hf_name] for hf_name, _ in llama_names(name, like, config)])
        else:
            tensor = tensors[name]
        if family == "gpt2" and name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = torch.cat([tensor, tensor.new_zeros(config.padded_vocab_size - config.vocab_size, config.n_embd)])
        state[name] = tensor.to(like.dtype).contiguous()  # the model's own layout (transposes copied)
    if config.tie_embeddings:
        head = tensors.get("lm_head.weight")
        embedding = tensors.get("transformer.wte.weight", tensors.get("model.embed_tokens.weight"))
        if head is not None and not torch.equal(head, embedding):
            raise CheckpointError("lm_head.weight differs from the token embedding, but config.json ties them")
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state
