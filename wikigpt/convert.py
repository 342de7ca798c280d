"""Hugging Face's GPT-2 layout, both ways: config.json and model.safetensors (plus the
generation_config.json that pipeline() samples with).

Used by transformer.py, whose GPT.save_pretrained and GPT.from_pretrained hand their work to this
module, so that the model file holds the model alone. Module names of the model follow the original
checkpoints (`transformer.h.0.attn.c_attn`, ...), so the weights map one to one, with one documented
change: GPT-2 stores its projection weights as Conv1D, (in, out), where `nn.Linear` keeps (out, in).
The vocabulary is stored with its real rows only; the model pads it to a multiple of 64.

Only JSON and safetensors are read, so nothing in a downloaded checkpoint can run code, and the
safetensors header is checked against config.json before any tensor is read or allocated.
"""

import json
import math
import os

import torch

from wikigpt.cli import CheckpointError
from wikigpt.generation import DEFAULT_TEMPERATURE, DEFAULT_TOP_K
from wikigpt.tokenizer import EOT_TOKEN

# nn.Linear weights that GPT-2 checkpoints store transposed, as Conv1D (in, out).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# ---- Saving ----


def hf_config_dict(config):
    """config.json in the GPT2Config schema; our own fields ride along under their own names."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",  # Hugging Face's name for the tanh approximation
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": config.eot_token,
        "eos_token_id": config.eot_token,
        "padded_vocab_size": config.padded_vocab_size,
        "attention": config.attention,
    }


def write_hf_model(directory, state_dict, config):
    """Writes `config.json`, `model.safetensors` and `generation_config.json` (infer.py's default
    sampling) of a model's state dict, as `GPT2LMHeadModel.from_pretrained` loads them."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight":
            continue  # tied to wte; the HF loader ties it again
        if name == "transformer.wte.weight":
            tensor = tensor[: config.vocab_size]  # padding rows are not part of GPT-2
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()  # nn.Linear (out, in) -> GPT-2 Conv1D (in, out)
        tensors[name] = tensor.detach().to("cpu").contiguous()
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

        return snapshot_download(path_or_name, allow_patterns=["config.json", "model.safetensors"])
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
    """The `config_class` (GPTConfig) of a model directory's config.json, in the GPT2Config schema,
    refusing options this implementation does not compute. `overrides` that are not None win."""
    hf = read_json(os.path.join(directory, "config.json"))
    if hf.get("model_type") != "gpt2":
        raise CheckpointError(f"config.json describes a {hf.get('model_type')!r} model; only 'gpt2' is supported")
    unsupported = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "add_cross_attention": (False,),
        "tie_word_embeddings": (True,),
    }
    for key, allowed in unsupported.items():
        if key in hf and hf[key] not in allowed:
            raise CheckpointError(f"config.json sets {key}={hf[key]!r}, which this GPT-2 does not implement")
    if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)):
        raise CheckpointError("config.json sets n_inner to other than 4 * n_embd, which this GPT-2 does not implement")
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise CheckpointError("config.json sets a layer_norm_epsilon other than 1e-5")
    try:
        vocab_size = int(hf["vocab_size"])
        values = dict(
            block_size=int(hf["n_positions"]),
            vocab_size=vocab_size,
            padded_vocab_size=int(hf.get("padded_vocab_size", math.ceil(vocab_size / 64) * 64)),
            n_layer=int(hf["n_layer"]),
            n_head=int(hf["n_head"]),
            n_embd=int(hf["n_embd"]),
            dropout=float(hf.get("resid_pdrop", 0.0)),
            eot_token=hf["eos_token_id"] if isinstance(hf.get("eos_token_id"), int) else min(EOT_TOKEN, vocab_size - 1),
            attention=str(hf.get("attention", "sdpa")),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return config_class(**values)
    except KeyError as e:
        raise CheckpointError(f"config.json lacks the field {e.args[0]!r}; it is not a GPT-2 config") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json holds an impossible GPT-2 config: {e}") from e


# ---- Loading: the weights ----


def our_name(hf_name):
    """Our parameter name for a tensor name in a GPT-2 safetensors file, or None for what is no weight."""
    if hf_name.endswith((".attn.bias", ".attn.masked_bias")):
        return None  # old causal-mask buffers, not weights
    if not hf_name.startswith("transformer.") and hf_name != "lm_head.weight":
        return "transformer." + hf_name  # hub checkpoints saved from GPT2Model have no prefix
    return hf_name


def stored_shapes(model):
    """{our parameter name: the shape a GPT-2 file stores it in}: Conv1D weights transposed, and the
    token embedding (and the head tied to it) without the padding rows."""
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    for name, shape in shapes.items():
        if name.endswith(CONV1D_WEIGHTS):
            shapes[name] = shape[::-1]
        if name in ("transformer.wte.weight", "lm_head.weight"):
            shapes[name] = (model.config.vocab_size, model.config.n_embd)
    return shapes


def check_safetensors_header(weights_path, model):
    """Refuses a safetensors file whose tensor names or shapes differ from what `model`'s config
    implies, from the file's header alone (a few kilobytes, whatever the file's size)."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(weights_path):
        raise CheckpointError(f"{os.path.dirname(weights_path) or '.'} has no model.safetensors; GPT-2 weights are "
                              "read only from safetensors (convert a pytorch_model.bin with transformers first)")
    try:
        with safe_open(weights_path, framework="pt") as f:
            shapes = {name: tuple(f.get_slice(k).get_shape()) for k in f.keys() if (name := our_name(k))}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path} is damaged or incomplete ({e}); save or copy it again") from e
    implied = stored_shapes(model)
    expected = set(implied) - {"lm_head.weight"}  # the head may be stored or not: it is tied
    missing, unexpected = sorted(expected - set(shapes)), sorted(set(shapes) - expected - {"lm_head.weight"})
    if missing or unexpected:
        raise CheckpointError(f"{weights_path} does not match config.json: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}; the checkpoint is damaged or of another model")
    for name, shape in shapes.items():
        if shape != implied[name]:
            raise CheckpointError(f"{weights_path}: {name} has shape {shape}, config.json implies "
                                  f"{implied[name]}; the checkpoint is damaged or of another model")


def read_weights(directory, model):
    """The state dict for `model` (built on the meta device from the directory's config) from the
    directory's model.safetensors: header checked first, then Conv1D weights transposed, the
    vocabulary padded, and every value checked to be finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = os.path.join(directory, "model.safetensors")
    check_safetensors_header(weights_path, model)
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_path} is damaged or incomplete ({e}); save or copy it again") from e
    return state_dict_from_hf(tensors, model)


def state_dict_from_hf(tensors, model):
    """Our state dict from GPT-2 safetensors whose names and shapes check_safetensors_header has
    accepted: transposes the Conv1D weights, pads the vocabulary, and checks the values."""
    config = model.config
    expected = model.state_dict()
    loaded = {name: v for k, v in tensors.items() if (name := our_name(k))}
    head = loaded.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, loaded["transformer.wte.weight"]):
        raise CheckpointError("lm_head.weight differs from the token embedding; this GPT-2 ties them")
    state = {}
    for name, tensor in loaded.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{name} holds {tensor.dtype} values; weights must be floating point")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{name} contains NaN or infinite values; the checkpoint is damaged")
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        if name == "transformer.wte.weight":
            padding = tensor.new_zeros(config.padded_vocab_size - config.vocab_size, config.n_embd)
            tensor = torch.cat([tensor, padding])
        state[name] = tensor.to(expected[name].dtype).contiguous()  # the model's own layout (transposes copied)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state
