"""Samples text from a trained checkpoint, a run directory, or any Hugging Face GPT-2.

    python infer.py --input "The history of Paris"                 # newest run under runs/
    python infer.py --checkpoint runs/mini --input "Alan Turing"    # that run's best checkpoint
    python infer.py --checkpoint gpt2 --temperature 0 --input "..." # OpenAI's GPT-2 (online)

Tokens are printed as they are generated. Decoding uses the model's key/value cache, so each new
token costs one token's forward pass instead of the whole context's. Checkpoints are read from
JSON and safetensors only, so a downloaded checkpoint cannot run code on this machine.

The functions here are also what gpt_train.py uses to find checkpoints and to print samples
during training, so there is one loading path and one sampling path.
"""

import codecs
import glob
import json
import os
import re
import sys
from dataclasses import dataclass

import torch

from gpt_dataset import UsageError, gpt2_tokenizer, parse_config, run_cli
from transformer import EOT_TOKEN, GPT, CheckpointError

CHECKPOINT_NAME = re.compile(r"^ckpt_(\d{7})$")  # a checkpoint directory, renamed to this only when complete


@dataclass
class InferConfig:
    input: str = ""  # the prompt; empty starts a new document after <|endoftext|>
    checkpoint: str | None = None  # checkpoint or run directory, HF GPT-2 directory or hub name; default newest run
    runs_dir: str = "runs"  # where to look for the newest run when --checkpoint is not given
    max_new_tokens: int = 200  # tokens to generate per sample
    temperature: float = 0.8  # softmax temperature; 0 means greedy (always the most likely token)
    top_k: int | None = 200  # sample only among the k most likely tokens
    top_p: float | None = None  # sample only among the most likely tokens that hold this much probability
    num_samples: int = 1  # independent continuations of the prompt
    seed: int = 1337  # same seed, same text
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # weights: auto (bfloat16 on CUDA and on CPUs with bf16 instructions), float32, bfloat16
    stop_at_eot: bool = True  # end a sample at <|endoftext|>, where the model starts a new article
    cache: bool = True  # use the key/value cache (--no-cache recomputes the whole context every token)


def pick_device(requested):
    """A torch.device from 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', refusing what this machine lacks."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", requested):
        raise UsageError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: this machine has no CUDA GPU visible to PyTorch; use --device cpu")
    if requested.startswith("cuda:") and int(requested[5:]) >= torch.cuda.device_count():
        raise UsageError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: Apple's Metal backend is not available here; use --device cpu")
    return torch.device(requested)


def cpu_has_fast_bf16():
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and
    slower than float32. Linux reports it in /proc/cpuinfo; other systems get float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def pick_dtype(requested, device):
    """Weight dtype for inference. Decoding one token reads every weight once, so it is bound by
    memory bandwidth: bf16 weights halve the bytes read and nearly double the tokens per second."""
    if requested == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
        return torch.bfloat16 if fast else torch.float32
    if requested not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype must be auto, float32, bfloat16 or float16, got {requested!r}")
    return getattr(torch, requested)


# ---- Finding checkpoints ----


def checkpoints_in(run_dir):
    """Complete checkpoint directories of a run, oldest first. Partial ones (a crash mid-write) are
    still under a temporary name and never match."""
    found = [p for p in glob.glob(os.path.join(run_dir, "ckpt_*")) if CHECKPOINT_NAME.match(os.path.basename(p))]
    return sorted(p for p in found if os.path.isfile(os.path.join(p, "model.safetensors")))


def checkpoint_val_loss(checkpoint):
    """The validation loss recorded with a checkpoint, or None."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            return json.load(f).get("val_loss")
    except (OSError, ValueError):
        return None


def best_checkpoint(run_dir):
    """The run's checkpoint with the lowest validation loss, else its newest; None if it has none."""
    checkpoints = checkpoints_in(run_dir)
    scored = [(loss, path) for path in checkpoints if (loss := checkpoint_val_loss(path)) is not None]
    if scored:
        return min(scored)[1]
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(checkpoint, runs_dir):
    """(model directory or hub name, a sentence saying what was chosen)."""
    if checkpoint is None:
        runs = [d for d in glob.glob(os.path.join(runs_dir, "*")) if checkpoints_in(d)]
        if not runs:
            raise UsageError(f"no trained checkpoints under {runs_dir}/; train one with gpt_train.py, or pass "
                             "--checkpoint (a checkpoint directory or a GPT-2 name such as gpt2)")
        run = max(runs, key=lambda d: os.path.getmtime(checkpoints_in(d)[-1]))
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
def generate_text(model, prompt_ids, *, max_new_tokens, temperature=0.8, top_k=200, top_p=None, seed=None,
                  stop_at_eot=True, use_cache=True, on_text=None):
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


def check_sampling(config):
    if config.max_new_tokens < 1 or config.num_samples < 1:
        raise UsageError("--max-new-tokens and --num-samples must be at least 1")
    if config.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 is greedy), got {config.temperature}")
    if config.top_k is not None and config.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {config.top_k}")
    if config.top_p is not None and not 0 < config.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {config.top_p}")


def main(argv=None):
    config = parse_config(InferConfig, argv, description=__doc__.split("\n\n")[0])
    check_sampling(config)
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
    run_cli(main, known_errors=(CheckpointError,))
