"""Tokenising throughput of gpt_dataset.py by worker count, against single-thread tiktoken.

    python bench/bench_tokenize.py [--repeat 3]

Text: the English sample (real Wikipedia lead sections), repeated --repeat times. "tiktoken alone"
is encode_ordinary in a plain loop: the ceiling for one core. Each "pipeline" row runs the real
path of gpt_dataset.py (batching, worker processes, cleaning, NFC, uint16 arrays, ordered results);
efficiency is its rate over workers x the single-thread rate. Writing shards is left out: it is a
memory copy and one sequential write per shard.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gpt_dataset  # noqa: E402
from wikigpt.sources import sample_articles  # noqa: E402
from wikigpt.tokenizer import gpt2_tokenizer  # noqa: E402


def best_time(work, trials):
    """Fastest of `trials` runs, in seconds: the least disturbed by other load on the machine."""
    times = []
    for _ in range(trials):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="passes over the sample")
    parser.add_argument("--trials", type=int, default=5, help="runs per row; the fastest counts")
    parser.add_argument("--max-workers", type=int, default=os.cpu_count(), help="largest worker count measured")
    args = parser.parse_args()

    articles = list(sample_articles("en")[0]) * args.repeat
    texts = [text for _, _, text, _ in articles]
    encoder = gpt2_tokenizer()
    tokens = sum(len(encoder.encode_ordinary(t)) for t in texts)
    single = tokens / best_time(lambda: [encoder.encode_ordinary(t) for t in texts], args.trials)

    print(f"{len(articles):,} articles, {tokens:,} tokens, {os.cpu_count()} CPU cores")
    print(f"| {'what':<22} | {'workers':>7} | {'tokens/s':>12} | {'efficiency':>10} |")
    print(f"|{'-' * 24}|{'-' * 9}|{'-' * 14}|{'-' * 12}|")
    print(f"| {'tiktoken alone':<22} | {1:>7} | {single:>12,.0f} | {'100%':>10} |")
    workers = 1
    while workers <= args.max_workers:
        config = gpt_dataset.DatasetConfig(source="sample", workers=workers, val_fraction=0.05)

        def pipeline():
            tasks = gpt_dataset.batched_tasks(iter(articles), config.batch_chars)
            for _ in gpt_dataset.tokenized_batches(tasks, config):
                pass

        rate = tokens / best_time(pipeline, args.trials)
        print(f"| {'gpt_dataset pipeline':<22} | {workers:>7} | {rate:>12,.0f} | {rate / (workers * single):>10.0%} |")
        workers *= 2


if __name__ == "__main__":
    main()
