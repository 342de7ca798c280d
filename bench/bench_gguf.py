"""llama.cpp runs what infer.py --export-gguf writes as infer.py runs the checkpoint: the same ids as the
shards on held-out articles, the same greedy continuation, and both speeds side by side.

    pip install llama-cpp-python==0.3.36        # llama.cpp's Python binding, built from source: minutes
    python bench/bench_gguf.py --checkpoint runs/mini --data data/sample_en_bpe16384
    python bench/bench_gguf.py --checkpoint runs/gpt2-run --data data/sample_en_gpt2 --gguf-type f16

The checkpoint is exported to a temporary GGUF file and loaded by llama.cpp (llama_cpp.Llama). Its
tokenizer encodes every validation article of the dataset, which must give the ids the shards hold
for it (they were encoded by tiktoken). Then each prompt is continued greedily by both, up to the
context, and the table gives how many of the tokens agree before the first difference (a near-tie
between two tokens may fall either way in another kernel's rounding) and each one's tokens/s (the
prompt included, one thread per core, batch 1); infer.py decodes in --dtype (auto: as infer.py does,
float16 weights on an x86 CPU). Results are in docs/benchmarks.md.
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import infer  # noqa: E402
from wikigpt.export_gguf import write_gguf  # noqa: E402
from wikigpt.runtime import inference_weight_dtype  # noqa: E402
from wikigpt.shards import open_split  # noqa: E402

PROMPTS = ["The history of", "Paris is the capital", "In mathematics, a prime number", "The river"]


def articles_with_ids(data, tokenizer):
    """[(text, ids)] of the validation split: each article as the shards hold it (after <|endoftext|>)."""
    ids = torch.cat([torch.from_numpy(s.astype("int64")) for s in open_split(data, "val")]).tolist()
    starts = [i for i, t in enumerate(ids) if t == tokenizer.eot_token] + [len(ids)]
    return [(tokenizer.decode(ids[a + 1 : b]), ids[a + 1 : b]) for a, b in zip(starts, starts[1:]) if b > a + 1]


@torch.inference_mode()  # as infer.py decodes
def our_greedy(model, ids, count):
    started = time.perf_counter()
    tokens = [t.item() for t in model.generate(torch.tensor([ids]), count, temperature=0)]
    return tokens, count / (time.perf_counter() - started)


def their_greedy(llama, ids, count):
    started = time.perf_counter()
    tokens = []
    for token in llama.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(token)
        if len(tokens) == count:
            break
    return tokens, count / (time.perf_counter() - started)


def agreeing(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    parser.add_argument("--data", required=True, help="the dataset the model was trained on (its validation split)")
    parser.add_argument("--gguf-type", default="f32", choices=["f32", "f16", "bf16"])
    parser.add_argument("--dtype", default="auto", help="infer.py's weights: auto, float32, bfloat16, float16")
    args = parser.parse_args()
    from llama_cpp import Llama

    directory, _ = infer.resolve_checkpoint(args.checkpoint, "runs")
    tokenizer = infer.load_tokenizer(directory)
    cpu = torch.device("cpu")
    model = infer.load_model(directory, cpu)  # float32: what the GGUF file is written from
    dtype = inference_weight_dtype(args.dtype, cpu)
    ours_model = model if dtype == torch.float32 else infer.load_model(directory, cpu, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.gguf")
        write_gguf(model.state_dict(), model.config, directory, path, args.gguf_type)
        size = os.path.getsize(path)
        llama = Llama(path, n_ctx=model.config.block_size, n_threads=os.cpu_count(), verbose=False)
        articles = articles_with_ids(args.data, tokenizer)
        same = sum(llama.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids for text, ids in articles)
        print(f"{directory} ({model.config.n_layer} layers, width {model.config.n_embd}, "
              f"{'tied' if model.config.tie_embeddings else 'untied'} head); GGUF {args.gguf_type}, {size / 1e6:.1f} MB; "
              f"{os.cpu_count()} CPU cores")
        print(f"llama.cpp's tokenizer gives the shards' ids for {same:,} of {len(articles):,} validation articles "
              f"({sum(len(ids) for _, ids in articles):,} tokens)")
        print(f"| prompt | tokens generated | same greedy tokens | infer.py tokens/s ({str(dtype)[6:]}) | "
              "llama.cpp tokens/s |")
        print("|---|---|---|---|---|")
        for prompt in PROMPTS:
            ids = tokenizer.encode_ordinary(prompt)
            count = model.config.block_size - len(ids)
            ours, our_speed = our_greedy(ours_model, ids, count)
            theirs, their_speed = their_greedy(llama, ids, count)
            print(f"| {prompt} | {count} | {agreeing(ours, theirs)} | {our_speed:,.0f} | {their_speed:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
