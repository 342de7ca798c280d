"""The trained tokenizer, measured: bytes per token by vocabulary and language, BPE training time and
memory by amount of text, and encoding speed of tiktoken and of Hugging Face's encoder.

    python bench/bench_tokenizer.py                       # all three tables
    python bench/bench_tokenizer.py --plot assets/bytes_per_token.png

Text: the offline sample's lead sections (en, fr, es), split as gpt_dataset.py splits them (a hash of
the article id); tokenizers learn from the training articles and are measured on the validation
ones. Training runs in a child process per row, so that its peak resident memory is its own.
"""

import argparse
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gpt_dataset  # noqa: E402
from wikigpt.sources import clean_article, sample_articles  # noqa: E402
from wikigpt.tokenizer import encoding_from_hf_json, gpt2_tokenizer, train_bpe  # noqa: E402


def split_texts(lang):
    """(training texts, validation texts) of a language's sample, cleaned, as gpt_dataset.py keeps them."""
    rows, _ = sample_articles(lang)
    train, val = [], []
    for article_id, _, text, is_wikitext in rows:
        text = clean_article(text, is_wikitext)
        if len(text) >= 100:
            (val if gpt_dataset.is_validation(article_id, 0.05) else train).append(text)
    return train, val


def bytes_per_token(encoding, texts):
    return sum(len(t.encode("utf-8")) for t in texts) / sum(len(encoding.encode_ordinary(t)) for t in texts)


def training_cost(chars, vocab_size, langs):
    """(seconds, characters, peak MiB, growth MiB while training) of a BPE learned from the first
    `chars` characters of the languages' training text, measured in a child process (--child)."""
    command = [sys.executable, os.path.abspath(__file__), "--child", f"{chars},{vocab_size}", "--langs", ",".join(langs)]
    seconds, taken, peak, base = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
    return float(seconds), int(taken), int(peak) / 1024, (int(peak) - int(base)) / 1024


def child(chars, vocab_size, langs):
    """The measured side of training_cost: prints seconds, characters, peak and starting RSS (KiB)."""
    texts, taken = [], 0
    for text in (t for lang in langs for t in split_texts(lang)[0]):
        if taken < chars:
            texts.append(text)
            taken += len(text)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    train_bpe(texts, vocab_size)
    print(time.perf_counter() - start, taken, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, base)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--langs", default="en,fr,es")
    parser.add_argument("--vocab-sizes", default="2048,4096,8192,16384,32768")
    parser.add_argument("--plot", help="write a plot of bytes per token to this PNG file")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # CHARS,VOCAB: one measurement of training_cost
    args = parser.parse_args()
    langs, sizes = args.langs.split(","), [int(v) for v in args.vocab_sizes.split(",")]
    if args.child:
        return child(*map(int, args.child.split(",")), langs)
    print(f"{os.cpu_count()} CPU cores\n")

    print("| language | tokenizer | bytes per token (validation articles) | tokens vs GPT-2 |\n|---|---|---|---|")
    table = {}
    for lang in langs:
        train, val = split_texts(lang)
        gpt2 = bytes_per_token(gpt2_tokenizer(), val)
        print(f"| {lang} | GPT-2 (50,257) | {gpt2:.2f} | 1.00 |")
        for size in sizes:
            table[lang, size] = bytes_per_token(encoding_from_hf_json(train_bpe(train, size)), val)
            print(f"| {lang} | trained, {size:,} | {table[lang, size]:.2f} | {gpt2 / table[lang, size]:.2f} |",
                  flush=True)
        table[lang, "gpt2"] = gpt2

    print("\n| text (characters) | vocabulary | training time | peak memory of the process (growth) |\n|---|---|---|---|")
    for chars in (1_000_000, 4_000_000, 16_000_000):
        seconds, taken, peak, growth = training_cost(chars, 8192, langs)
        print(f"| {taken:,} | 8,192 | {seconds:.1f} s | {peak:,.0f} MiB ({growth:,.0f} MiB) |", flush=True)

    print("\n| encoder | threads | tokens/s |\n|---|---|---|")
    train, val = split_texts("en")
    text = train[:3000]
    spec = train_bpe(train, 8192)
    encoding = encoding_from_hf_json(spec)
    from tokenizers import Tokenizer

    hf = Tokenizer.from_str(spec)
    tokens = sum(len(ids) for ids in encoding.encode_ordinary_batch(text))
    runs = [("tiktoken encode_ordinary, one text at a time", 1, lambda: [encoding.encode_ordinary(t) for t in text]),
            ("tiktoken encode_ordinary_batch", os.cpu_count(), lambda: encoding.encode_ordinary_batch(text)),
            ("tokenizers encode_batch (Rust, threads)", os.cpu_count(),
             lambda: hf.encode_batch(text, add_special_tokens=False))]
    for name, threads, work in runs:
        best = min(timed(work) for _ in range(3))
        print(f"| {name} | {threads} | {tokens / best:,.0f} |", flush=True)
    if args.plot:
        plot(table, langs, sizes, args.plot)


def timed(work):
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def plot(table, langs, sizes, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lang, color in zip(langs, ("C0", "C1", "C2", "C3")):
        ax.plot(sizes, [table[lang, s] for s in sizes], "o-", color=color, label=f"{lang}: trained on {lang}")
        ax.axhline(table[lang, "gpt2"], color=color, ls="--", lw=1, label=f"{lang}: GPT-2's BPE (50,257)")
    ax.set(xscale="log", xlabel="vocabulary size (ids)", ylabel="UTF-8 bytes per token (validation articles)",
           title="What a trained BPE holds per token")
    ax.set_xticks(sizes, [f"{s // 1024}K" for s in sizes])
    ax.minorticks_off()  # the log scale's own ticks would print over the named sizes
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
