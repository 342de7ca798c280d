"""Peak memory of gpt_dataset.py as the source grows: it should stay flat.

    python bench/bench_dataset_memory.py [--copies 1,10,30] [--shard-tokens 10000000]

The source is the English sample written --copies times into one .jsonl file (each copy with its
own article ids). gpt_dataset.py runs as a subprocess with all cores; every 0.1 s the resident
memory of it and its worker processes is summed (Linux /proc), and the table gives the peak.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from wikigpt.shards import load_manifest  # noqa: E402
from wikigpt.sources import sample_articles  # noqa: E402


def tree_rss_bytes(pid):
    """Resident memory of a process and all its descendants, from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
        stack.extend(children.get(current, []))
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", default="1,10,30")
    parser.add_argument("--shard-tokens", type=int, default=10_000_000)
    args = parser.parse_args()
    articles, _ = sample_articles("en")
    articles = list(articles)
    print(f"{os.cpu_count()} CPU cores; --shard-tokens {args.shard_tokens:,}")
    print("| source | articles | tokens | seconds | peak memory (all processes) |")
    print("|---|---|---|---|---|")
    for copies in map(int, args.copies.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "source.jsonl")
            with open(source, "w") as f:
                for copy in range(copies):
                    for article_id, title, text, _ in articles:
                        f.write(json.dumps({"id": f"{copy}-{article_id}", "title": title, "text": text}) + "\n")
            command = [sys.executable, os.path.join(ROOT, "gpt_dataset.py"), "--source", source,
                       "--out", os.path.join(tmp, "out"), "--shard-tokens", str(args.shard_tokens)]
            started = time.perf_counter()
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            peak = 0
            while process.poll() is None:
                peak = max(peak, tree_rss_bytes(process.pid))
                time.sleep(0.1)
            seconds = time.perf_counter() - started
            manifest = load_manifest(os.path.join(tmp, "out"))
            tokens = manifest["train"]["tokens"] + manifest["val"]["tokens"]
            size_mb = os.path.getsize(source) / 1e6
            print(f"| {size_mb:,.0f} MB jsonl | {copies * len(articles):,} | {tokens:,} | {seconds:.1f} | "
                  f"{peak / 2**20:,.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
