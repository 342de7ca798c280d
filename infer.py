"""Samples text from a trained checkpoint, a run directory, or any Hugging Face GPT-2.

    python infer.py --input "The history of Paris"                 # newest run under runs/
    python infer.py --checkpoint runs/mini --input "Alan Turing"    # that run's best checkpoint
    python infer.py --checkpoint gpt2 --temperature 0 --input "..." # OpenAI's GPT-2 (online)

Tokens are printed as they are generated. Decoding uses the model's key/value cache, so each new
token costs one token's forward pass instead of the whole context's. Checkpoints are read from
JSON and safetensors only, so a downloaded checkpoint cannot run code on this machine.

Checkpoints are found as common.py describes their layout, and loaded by transformer.GPT.from_pretrained,
the one loading path that training (--resume, --init-from) uses too.
"""

import codecs
import glob
import os
import sys
from dataclasses import dataclass

import torch

from common import (EOT_TOKEN, UsageError, best_checkpoint, check_dtype_name, cpu_has_fast_bf16, newest_run,
                    parse_config, pick_device, run_cli)
from gpt_dataset import gpt2_tokenizer
from transformer import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, GPT, check_sampling


@dataclass
class InferConfig:
    input: str = ""  # the prompt; empty starts a new document after <|endoftext|>
    checkpoint: str | None = None  # checkpoint or run directory, HF GPT-2 directory or hub name; default newest run
    runs_dir: str = "runs"  # where to look for the newest run when --checkpoint is not given
    max_new_tokens: int = 200  # tokens to generate per sample
    temperature: float = DEFAULT_TEMPERATURE  # softmax temperature; 0 means greedy (always the most likely token)
    top_k: int | None = DEFAULT_TOP_K  # sample only among the k most likely tokens
    top_p: float | None = None  # sample only among the most likely tokens that hold this much probability
    num_samples: int = 1  # independent continuations of the prompt
    seed: int = 1337  # same seed, same text
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # weights: auto (bfloat16 on CUDA and on CPUs with bf16 instructions), float32, bfloat16
    stop_at_eot: bool = True  # end a sample at <|endoftext|>, where the model starts a new article
    cache: bool = True  # use the key/value cache (--no-cache recomputes the whole context every token)


def pick_dtype(requested, device):
    """Weight dtype for inference. Decoding one token reads every weight once, so it is bound by
    memory bandwidth: bf16 weights halve the bytes read and nearly double the tokens per second."""
    if requested == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
        return torch.bfloat16 if fast else torch.float32
    return getattr(torch, requested)


# ---- Finding checkpoints ----


def resolve_checkpoint(checkpoint, runs_dir):
    """(model directory or hub name, a sentence saying what was chosen)."""
    if checkpoint is None:
        run = newest_run(glob.glob(os.path.join(runs_dir, "*")))
        if run is None:
            raise UsageError(f"no trained checkpoints under {runs_dir}/; train one with gpt_train.py, or pass "
                             "--checkpoint (a checkpoint directory or a GPT-2 name such as gpt2)")
        chosen = best_checkpoint(run)
        return chosen, f"using {chosen}, the best checkpoint of the newest run"
    if os.path.isfile(os.path.join(checkpoint, "config.json")):
        return checkpoint, f"using {checkpoint}"
    if os.path.isdir(checkpoint):
        chosen = best_checkpoint(checkpoint)
        if chosen is None:
            raise UsageError(f"{checkpoint} holds no complete checkpoint (config.json + model.safetensors)")
        return chosen, f"using {chosen} from run {checkpoint}"
    return checkpoint, f"using {checkpoint} from the Hugging Face hub"


def load_model(path_or_name, device, dtype=torch.float32):
    """A model ready for inference: weights from safetensors, config from JSON, checked before use."""
    return GPT.from_pretrained(path_or_name).to(device=device, dtype=dtype).eval()


# ---- Sampling ----


def encode_prompt(prompt, block_size):
    """(token ids, tokens cut from the front). An empty prompt becomes <|endoftext|>, which is how every
    training article starts. A prompt longer than the context keeps its end, leaving room to generate."""
    ids = gpt2_tokenizer().encode_ordinary(prompt) if prompt else [EOT_TOKEN]
    keep = max(1, block_size // 2) if len(ids) >= block_size else len(ids)
    return ids[len(ids) - keep :], len(ids) - keep


@torch.no_grad()
def generate_text(model, prompt_ids, *, max_new_tokens, temperature=DEFAULT_TEMPERATURE, top_k=DEFAULT_TOP_K,
                  top_p=None, seed=None, stop_at_eot=True, use_cache=True, on_text=None):
    """Continues `prompt_ids` and returns the new text; `on_text` receives it piece by piece.

    Pieces are cut on UTF-8 boundaries: one token can hold half of a multi-byte character.
    """
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    token_bytes = gpt2_tokenizer().decode_single_token_bytes
    pieces = []
    tokens = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator, use_cache=use_cache)
    for token in tokens:
        token = token.item()
        if token == EOT_TOKEN and stop_at_eot:
            break
        piece = decoder.decode(token_bytes(token))
        if piece:
            pieces.append(piece)
            if on_text:
                on_text(piece)
    tail = decoder.decode(b"", final=True)
    if tail:
        pieces.append(tail)
        if on_text:
            on_text(tail)
    return "".join(pieces)


def check_settings(config):
    """Refuses impossible settings before anything is loaded."""
    if config.max_new_tokens < 1 or config.num_samples < 1:
        raise UsageError("--max-new-tokens and --num-samples must be at least 1")
    check_dtype_name(config.dtype)
    try:
        check_sampling(config.temperature, config.top_k, config.top_p)
    except ValueError as e:
        raise UsageError(f"--{str(e).replace('_', '-')}") from e


def main(argv=None):
    config = parse_config(InferConfig, argv, description=__doc__.split("\n\n")[0])
    check_settings(config)
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    path, note = resolve_checkpoint(config.checkpoint, config.runs_dir)
    print(note, file=sys.stderr)
    model = load_model(path, device, dtype)
    prompt_ids, cut = encode_prompt(config.input, model.config.block_size)
    if cut:
        print(f"the prompt is longer than the model's context of {model.config.block_size} tokens: "
              f"using its last {len(prompt_ids)} tokens", file=sys.stderr)

    def show(piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    for i in range(config.num_samples):
        if config.num_samples > 1:
            print(f"\n--- sample {i + 1} ---")
        show(config.input)
        generate_text(model, prompt_ids, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                      top_k=config.top_k, top_p=config.top_p, seed=config.seed + i,
                      stop_at_eot=config.stop_at_eot, use_cache=config.cache, on_text=show)
        print()


if __name__ == "__main__":
    run_cli(main)
