"""Rounded weights against the model's own on real text: do int8 or float16 write the same and score the same?

    python bench/bench_quantize.py --checkpoint runs/mini --data data/sample_en_bpe16384 [--weights float16]

For --prompts articles of the validation split (held out from training), the first --prompt-tokens
tokens after <|endoftext|> are continued greedily for --new-tokens tokens by the reference model and by
its rounded copy: with --weights int8 (infer.py --quantize int8) the reference is in the dtype of int8's
activations (bf16 unless --dtype says otherwise); with --weights float16 (infer.py --dtype float16, on a
CPU float16 matrices in a float32 model) it is float32. Either way the two differ by the rounding of
the weights alone; the table
gives how many of the new tokens agree before the first difference and in all. Then both score the
whole validation split (every non-overlapping window at the model's context): the mean
log-likelihood per token of each and their difference. Greedy decoding amplifies one flipped
argmax into a different continuation, so the prefix that agrees is the stricter measure; the
log-likelihood says how much the model itself changed. Results are in docs/benchmarks.md.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gpt_train import ValidationSplit, evaluate, whole_split_batches  # noqa: E402
from infer import load_model, resolve_checkpoint  # noqa: E402
from wikigpt.runtime import Runtime, inference_weight_dtype, pick_device  # noqa: E402
from wikigpt.shards import TokenWindows, open_split  # noqa: E402
from wikigpt.tokenizer import model_tokenizer, token_byte_lengths  # noqa: E402


def article_openings(tokens, eot, count, length):
    """The first `length` tokens of the first `count` articles of a split that are at least that long."""
    starts = np.flatnonzero(tokens == eot)
    openings = [tokens[s : s + length] for s in starts if s + length <= len(tokens)]
    return [[int(t) for t in opening] for opening in openings if eot not in opening[1:]][:count]


def whole_split_loss(model, data, tokenizer, batch_size=8):
    """Mean cross-entropy per token (nats) over every non-overlapping window of the validation split,
    through the trainer's own evaluation (gpt_train.evaluate)."""
    run = Runtime(torch.device("cpu"))
    windows = TokenWindows(open_split(data, "val"), model.config.block_size, batch_size, seed=0, shuffle=False)
    split = ValidationSplit(windows, torch.tensor(token_byte_lengths(tokenizer)))
    return evaluate(model, split, whole_split_batches(windows, batch_size, 10**12, run), run).loss


def greedy(model, prompt, new_tokens):
    idx = torch.tensor([prompt])
    return [int(t) for t in model.generate(idx, new_tokens, temperature=0.0)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    parser.add_argument("--data", required=True, help="the dataset the checkpoint was trained on")
    parser.add_argument("--weights", default="int8", choices=["int8", "float16"], help="the rounded copy's weights")
    parser.add_argument("--dtype", default="auto",
                        help="with int8: the reference's weights and int8's activations: auto, float32, bfloat16")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    device = pick_device("cpu")
    path, _ = resolve_checkpoint(args.checkpoint, "runs")
    if args.weights == "int8":
        dtype = inference_weight_dtype(args.dtype, device, "int8")  # int8's activations, and the reference's weights
        reference, rounded = load_model(path, device, dtype), load_model(path, device, dtype, quantize="int8")
    else:
        dtype = torch.float32  # around the float16 matrices
        reference, rounded = load_model(path, device), load_model(path, device, torch.float16)
    tokenizer = model_tokenizer(path)
    eot = tokenizer.eot_token
    val = np.concatenate(open_split(args.data, "val"))
    print(f"{path}: reference weights {str(dtype)[6:]}, {args.weights} activations {str(dtype)[6:]}; {args.prompts} "
          f"validation articles, {args.prompt_tokens} prompt tokens, {args.new_tokens} greedy tokens")
    agreed_prefix, agreed_tokens, total = [], 0, 0
    for prompt in article_openings(val, eot, args.prompts, args.prompt_tokens):
        a, b = greedy(reference, prompt, args.new_tokens), greedy(rounded, prompt, args.new_tokens)
        agreed_prefix.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)))
        agreed_tokens, total = agreed_tokens + sum(x == y for x, y in zip(a, b)), total + len(a)
    exact = sum(p == args.new_tokens for p in agreed_prefix)
    likelihood = {name: -whole_split_loss(model, args.data, tokenizer)
                  for name, model in (("reference", reference), ("rounded", rounded))}
    print("| continuations identical | mean tokens before the first difference | tokens equal | "
          f"log-likelihood reference | {args.weights} | difference (nats/token) |")
    print("|---|---|---|---|---|---|")
    print(f"| {exact} of {len(agreed_prefix)} | {np.mean(agreed_prefix):.1f} of {args.new_tokens} | "
          f"{agreed_tokens / total:.1%} | {likelihood['reference']:.4f} | {likelihood['rounded']:.4f} | "
          f"{likelihood['rounded'] - likelihood['reference']:+.4f} |")


if __name__ == "__main__":
    main()
