"""Loss per minute: trains configurations of gpt_train.py and reports the loss each reaches on the
whole validation split, in bits per byte (comparable across tokenizers) and nats per token, with the
wall time its training process took.

    python bench/bench_quality.py --run "quickstart=" --run "muon=--optimizer muon --lr 4e-3"
    python bench/bench_quality.py --data data/sample_en_bpe16384 --run "deeper=--n-layer 8" --max-steps 500
    python bench/bench_quality.py --run "gpt2=--data data/sample_en_gpt2 --max-steps 590"   # another dataset

Each --run is NAME=FLAGS: gpt_train.py flags on top of the defaults (the quickstart) and of this
script's --max-steps, run as its own process, one after another (never two at once: they would share
the cores and corrupt each other's time). The loss is the run's final evaluation, over every
non-overlapping window of the validation split at the model's context; the time is that of the whole
training process, start-up and evaluations included. Compare configurations at equal time: give each
the steps that fill the budget (tokens/s from a short run tells how many). A run's FLAGS may name
its own --data (another tokenizer). Results are in docs/benchmarks.md.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(flags, data, out_dir):
    """(seconds, final metrics row with the whole-split loss, median tokens/s) of one training run."""
    command = [sys.executable, os.path.join(ROOT, "gpt_train.py"), "--data", data, "--out-dir", out_dir,
               "--sample-tokens", "0", *flags]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"{shlex.join(flags)} failed: {result.stderr.strip().splitlines()[-1]}")
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    final = [r for r in rows if "whole_val_loss" in r][-1]
    speeds = sorted(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
    return seconds, final, speeds[len(speeds) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/sample_en_bpe16384", help="dataset directory of gpt_dataset.py")
    parser.add_argument("--run", action="append", required=True, help="NAME=FLAGS, repeatable")
    parser.add_argument("--max-steps", type=int, help="steps of every run unless its FLAGS set them")
    args = parser.parse_args()

    print(f"data: {args.data}, {os.cpu_count()} CPU cores")
    print("| run | flags | steps | train time | tokens/s | bits/byte, whole val split | nats/token (tokens) |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.run:
        name, _, flag_text = spec.partition("=")
        flags = shlex.split(flag_text)
        if args.max_steps and "--max-steps" not in flags:
            flags += ["--max-steps", str(args.max_steps)]
        with tempfile.TemporaryDirectory() as out_dir:
            seconds, final, tokens_per_s = train(flags, args.data, os.path.join(out_dir, "run"))
        print(f"| {name} | `{shlex.join(flags)}` | {final['step']} | {seconds / 60:.1f} min | {tokens_per_s:,.0f} | "
              f"{final['whole_val_bits_per_byte']:.4f} | {final['whole_val_loss']:.4f} ({final['whole_val_tokens']:,}) |",
              flush=True)


if __name__ == "__main__":
    main()
