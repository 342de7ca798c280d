"""The tokenizer: GPT-2's byte-pair encoding, loaded through tiktoken, and the same tokenizer written
as Hugging Face's files.

Used by gpt_dataset.py (text into ids), gpt_train.py (checkpoints carry the tokenizer files; text
samples are decoded) and infer.py (prompts in, text out).
"""

import json
import os
from functools import lru_cache

from wikigpt.cli import UsageError
from wikigpt.files import cache_dir, fetch_from_pypi, file_sha256

VOCAB_SIZE = 50257  # BPE tokens of GPT-2, the last one being <|endoftext|>
EOT_TOKEN = 50256  # <|endoftext|>: starts every training article and ends a generated text

R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's r50k_base file
BPE_ON_PYPI = ("openai-whisper==20250625", "whisper/assets/gpt2.tiktoken")  # the same file, in Whisper's sdist


def bpe_cache_dir():
    """Where the GPT-2 BPE file is kept: TIKTOKEN_CACHE_DIR (tiktoken's own setting), else cache_dir()."""
    return os.environ.get("TIKTOKEN_CACHE_DIR") or cache_dir()


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
