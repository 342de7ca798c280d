"""The token shards on disk: their format, the manifest that lists them, and reading them back as
the windows that training and evaluation batch.

gpt_dataset.py writes shards (ShardWriter, shard_bytes) and the manifest; gpt_train.py opens the
splits (open_split), identifies the data by the shards' checksums and reads batches through
TokenWindows.

A shard is llm.c's format: a header of 256 int32 (magic 20240520, version 1, token count, and in
the fourth the size of the vocabulary its ids come from), then the tokens as uint16. manifest.json,
written last, marks a dataset as complete and holds each shard's split, file name, token count and
sha256, each split's article, character, byte and token counts, and the tokenizer: its kind (gpt2 or
bpe), file, sha256, vocabulary size and end-of-text id.
"""

import glob
import hashlib
import json
import os

import numpy as np

from wikigpt.cli import DataError
from wikigpt.files import atomic_write_bytes, file_sha256

SHARD_MAGIC = 20240520  # llm.c's token shard format
SHARD_VERSION = 1
HEADER_INTS = 256  # header size in int32 values (1024 bytes)


def shard_bytes(tokens, vocab_size):
    """A shard's bytes: 256 int32 header (magic, version, token count, vocabulary size), then the
    uint16 tokens."""
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:4] = (SHARD_MAGIC, SHARD_VERSION, len(tokens), vocab_size)
    return header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes()


def open_shard(path, sha256=None, vocab_size=None):
    """The tokens of a shard, memory-mapped (nothing is read until used), after checking the header
    and the file size; with `vocab_size`, that the header names that vocabulary; with `sha256`, also
    the checksum and that every token is in the vocabulary."""
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    except OSError as e:
        raise DataError(f"cannot read shard {path} ({e.strerror}); run gpt_dataset.py again") from e
    if len(header) < HEADER_INTS or header[0] != SHARD_MAGIC:
        raise DataError(f"{path} is not a token shard (bad magic number); rebuild it with gpt_dataset.py")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path} has shard version {header[1]}, expected {SHARD_VERSION}; rebuild it with gpt_dataset.py")
    count, header_vocab = int(header[2]), int(header[3])
    if vocab_size is not None and header_vocab not in (0, vocab_size):
        raise DataError(f"{path} holds ids of a {header_vocab:,}-id vocabulary, manifest.json describes a "
                        f"{vocab_size:,}-id tokenizer; the dataset mixes two runs: run gpt_dataset.py again")
    if size != HEADER_INTS * 4 + 2 * count:
        raise DataError(f"{path} holds {(size - HEADER_INTS * 4) // 2} tokens but its header says {count}: "
                        "the file is truncated or damaged; delete it and run gpt_dataset.py again")
    if sha256 is not None and file_sha256(path) != sha256:
        raise DataError(f"{path} does not match its sha256 in manifest.json: the file is damaged; "
                        "delete it and run gpt_dataset.py again")
    tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(count,))
    vocab_size = vocab_size or header_vocab
    if sha256 is not None and count and vocab_size and int(tokens.max()) >= vocab_size:
        raise DataError(f"{path} holds token ids beyond its vocabulary of {vocab_size:,}; the shard is damaged: "
                        "delete it and run gpt_dataset.py again")
    return tokens


def load_manifest(data_dir):
    """The manifest of a finished dataset directory, or a DataError saying how to make one."""
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} does not exist; make it with "
                        f"`python gpt_dataset.py --out {data_dir}` (or --source sample)")
    if not os.path.isfile(path):
        hint = " (an interrupted run: re-run the same gpt_dataset.py command)" if glob.glob(os.path.join(data_dir, "*.bin")) else ""
        raise DataError(f"{data_dir} has no manifest.json{hint}; make the dataset with gpt_dataset.py")
    try:
        with open(path) as f:
            manifest = json.load(f)
        complete = all({"split", "file", "tokens", "sha256"} <= set(s) for s in manifest["shards"])
        complete &= {"kind", "vocab_size", "eot_token"} <= set(manifest["tokenizer"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is damaged ({type(e).__name__}); run gpt_dataset.py again") from e
    if not complete:
        raise DataError(f"{path} lacks a field of a shard or of the tokenizer; run gpt_dataset.py again "
                        "into a new --out")
    return manifest


def open_split(data_dir, split, verify=False):
    """Memory-mapped token arrays of one split ('train' or 'val'), in order, each header checked."""
    manifest = load_manifest(data_dir)
    arrays = []
    for shard in manifest["shards"]:
        if shard["split"] == split:
            tokens = open_shard(os.path.join(data_dir, shard["file"]), shard["sha256"] if verify else None,
                                manifest["tokenizer"]["vocab_size"])
            if len(tokens) != shard["tokens"]:
                raise DataError(f"{shard['file']} holds {len(tokens)} tokens, manifest.json says "
                                f"{shard['tokens']}; the dataset is damaged: run gpt_dataset.py again")
            arrays.append(tokens)
    if not arrays:
        raise DataError(f"{data_dir} has no {split} shards; run gpt_dataset.py again")
    return arrays


# ---- Writing: the shards of one split, with what a restart needs ----


class ShardWriter:
    """Collects the token stream of one split and writes it as full shards, atomically.

    `progress.json` (written after each shard, with the tokens not yet in a shard saved beside it)
    lets a new run continue exactly where an interrupted one stopped.
    """

    def __init__(self, out_dir, split, shard_tokens, vocab_size, state):
        self.out_dir, self.split, self.shard_tokens, self.vocab_size = out_dir, split, shard_tokens, vocab_size
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

    def give_last_articles(self, other, count):
        """Moves this split's last `count` articles, whole, to `other`. Only for a split still all in memory."""
        moved = []
        for _ in range(count):
            size, n = self.held.pop()
            moved.append((size, self.buffer[self.filled - n : self.filled].copy()))
            self.filled -= n
            self.articles, self.tokens = self.articles - 1, self.tokens - n
            self.chars, self.bytes = self.chars - size[0], self.bytes - size[1]
        for size, tokens in reversed(moved):
            other.add(size, tokens)

    def flush(self):
        if self.filled == 0:
            return
        name = f"{self.split}_{len(self.shards):06d}.bin"
        data = shard_bytes(self.buffer[: self.filled], self.vocab_size)
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


def shard_checksums(data_dir):
    """The sha256 of every shard of a dataset, from its manifest: what identifies the data of a run."""
    return [shard["sha256"] for shard in load_manifest(data_dir)["shards"]]


def bytes_per_token(data_dir, split):
    """UTF-8 bytes of text per token of a split, from its manifest: what turns the training loss into
    approximate bits per byte (loss / ln 2 / this). The validation loss gets its exact bytes instead."""
    counts = load_manifest(data_dir)[split]
    return counts["bytes"] / counts["tokens"]


class TokenWindows:
    """Batches of (T + 1)-token windows from memory-mapped shards, for inputs and next-token targets.

    The split is cut into non-overlapping windows; each epoch visits every window once, in an order
    shuffled by (seed, epoch), B windows to a micro-batch. From the second epoch on, a shuffled split
    is also cut elsewhere: its windows start at a shift of 1 to T - 1 tokens drawn by (seed, epoch),
    and the last one runs on from the split's start (another article boundary). On a small split
    read many times, the model then meets each passage with other neighbours and at other
    positions, instead of memorising the same windows again (docs/benchmarks.md measures it).
    The position is one integer, the number of micro-batches consumed, saved in checkpoints: a
    resumed run reads exactly the batches the uninterrupted run would have read. Rank r of N takes
    micro-batches r, r + N, r + 2N, ..., so N processes read the same data as one process
    accumulating N micro-batches.
    """

    def __init__(self, shards, block_size, batch_size, *, seed, rank=0, world_size=1, shuffle=True):
        self.shards, self.T, self.B = shards, block_size, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.offsets = np.cumsum([0] + [len(s) for s in shards])  # where each shard starts in the split
        self.n_windows = int((self.offsets[-1] - 1) // block_size)
        self.batches_per_epoch = self.n_windows // batch_size
        if self.batches_per_epoch < world_size:
            raise DataError(f"the split holds {self.offsets[-1]:,} tokens, fewer than one batch of "
                            f"{batch_size * world_size} x {block_size + 1}; use a smaller --batch-size or --block-size")
        self.batches_done = 0
        self.epoch_plan = (None, None, 0)  # (epoch, its shuffled window order, its shift), computed once per epoch

    def plan(self, epoch):
        """(window order, shift) of an epoch: the order a permutation, the shift 0 in the first epoch."""
        if self.epoch_plan[0] != epoch:
            n = self.batches_per_epoch * self.B
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                order = rng.permutation(n)
                shift = int(rng.integers(1, self.T)) if epoch > 0 and self.T > 1 else 0
            else:
                order, shift = np.arange(n), 0
            self.epoch_plan = (epoch, order, shift)
        return self.epoch_plan[1:]

    def window(self, index, shift=0):
        """Tokens [s, s + T + 1) of the split, s = index * T + shift, which may span two shards; past
        the split's end they continue from its start."""
        start = index * self.T + shift
        end, total = start + self.T + 1, int(self.offsets[-1])
        pieces = []
        while start < end:
            position = start % total
            shard = int(np.searchsorted(self.offsets, position, side="right") - 1)
            local = position - self.offsets[shard]
            take = min(end - start, len(self.shards[shard]) - local)
            pieces.append(self.shards[shard][local : local + take])
            start += take
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def stack(self, indices, shift=0):
        """(len(indices), T + 1) int64 array of those windows."""
        return np.stack([self.window(i, shift) for i in indices]).astype(np.int64)

    def next_batch(self):
        """(B, T + 1) int64 array: this rank's share of the next global micro-batch."""
        epoch, batch = divmod(self.batches_done + self.rank, self.batches_per_epoch)
        self.batches_done += self.world_size
        order, shift = self.plan(epoch)
        return self.stack(order[batch * self.B : (batch + 1) * self.B], shift)

    def state(self):
        return {"batches_done": self.batches_done}

    def load_state(self, state):
        self.batches_done = int(state["batches_done"])
