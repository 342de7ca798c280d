"""The tokenizer trained on the corpus: exact round trips in three languages, the same ids from tiktoken
and from Hugging Face's files, a French run end to end, refusals, and interruptions."""

import json
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest

import gpt_dataset
from conftest import (FAST_TRAINING, ROOT, as_from_a_shell, assert_one_clear_error, checkpoint_of_two_steps, run_script,
                      script)
from wikigpt.cli import CheckpointError, DataError
from wikigpt.shards import load_manifest, open_split
from wikigpt.sources import sample_articles
from wikigpt.tokenizer import (dataset_tokenizer, encoding_from_hf_json, gpt2_tokenizer, model_tokenizer, train_bpe,
                               vocabulary_digest)

ODD_STRINGS = ["  two spaces,\ttabs\n\nand   runs of space \n\n\n", "emoji 🙂👍🏽 and flags 🇫🇷 in text",
               "combining accents: Cafe\u0301 e\u0300 n\u0303, and precomposed: café", "a literal <|endoftext|> inside",
               "नमस्ते दुनिया, 東京都 123456789 ١٢٣", "\u200b zero width \ufeff and \x00 control", ""]


def held_out_articles(data_dir):
    """The validation articles of a dataset, as text (decoded from its shards)."""
    tokenizer = dataset_tokenizer(data_dir, load_manifest(data_dir)["tokenizer"])
    tokens = np.concatenate(open_split(data_dir, "val"))
    starts = np.flatnonzero(tokens == tokenizer.eot_token).tolist() + [len(tokens)]
    return [tokenizer.decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts, starts[1:])]


@pytest.mark.parametrize("lang, word", [("en", " the"), ("fr", " les"), ("es", " los")])
def test_a_trained_bpe_round_trips_real_articles_and_odd_strings(lang, word):
    rows, _ = sample_articles(lang)
    texts = [text for _, _, text, _ in rows if text]
    encoding = encoding_from_hf_json(train_bpe(texts[:3000], 2048))
    assert encoding.n_vocab == 2048 and encoding.eot_token == 2047
    for text in texts[3000:3400] + ODD_STRINGS:
        ids = encoding.encode_ordinary(text)
        assert encoding.decode(ids) == text, text[:80]
        assert encoding.eot_token not in ids  # a literal <|endoftext|> is text, never the separator
    assert len(encoding.encode_ordinary(word)) == 1  # the BPE learned the language's words, not only bytes


def test_training_is_deterministic_and_uses_training_articles_only(bpe_sample_dir, tmp_path):
    again = tmp_path / "again"
    gpt_dataset.main(["--source", "sample", "--out", str(again), "--workers", "1"])  # one worker, not two
    for name in os.listdir(bpe_sample_dir):
        assert (again / name).read_bytes() == open(os.path.join(bpe_sample_dir, name), "rb").read(), name
    manifest = load_manifest(bpe_sample_dir)
    assert manifest["tokenizer"]["kind"] == "bpe" and manifest["tokenizer"]["vocab_size"] == 16384
    # Validation articles were never read by the trainer: with only the validation split's text, the
    # merges learned differ from the dataset's.
    rows, _ = sample_articles("en")
    val_only = [text for article_id, _, text, _ in rows if gpt_dataset.is_validation(article_id, 0.05)]
    assert vocabulary_digest(encoding_from_hf_json(train_bpe(val_only, 16384))) != \
        vocabulary_digest(dataset_tokenizer(bpe_sample_dir, manifest["tokenizer"]))


@pytest.fixture(scope="module")
def bpe_checkpoint(bpe_sample_dir, tmp_path_factory):
    return checkpoint_of_two_steps(bpe_sample_dir, tmp_path_factory.mktemp("bpe") / "run", "--sample-tokens", "4")


def test_autotokenizer_of_a_checkpoint_gives_the_shards_ids(bpe_sample_dir, bpe_checkpoint, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = transformers.AutoTokenizer.from_pretrained(bpe_checkpoint)
    assert len(tokenizer) == 16384 and tokenizer.eos_token_id == 16383 and tokenizer.model_max_length == 32
    val = np.concatenate(open_split(bpe_sample_dir, "val"))
    starts = np.flatnonzero(val == 16383).tolist() + [len(val)]
    articles = held_out_articles(bpe_sample_dir)
    assert len(articles) > 400
    for (a, b), text in zip(zip(starts, starts[1:]), articles):
        assert tokenizer.encode(text) == val[a + 1 : b].tolist(), text[:80]  # the shards' ids, exactly
        assert tokenizer.decode(val[a + 1 : b].tolist()) == text
    for text in ODD_STRINGS[:-1]:
        if "<|endoftext|>" not in text:  # transformers reads that literal as the special token, by design
            assert tokenizer.encode(text) == model_tokenizer(bpe_checkpoint).encode_ordinary(text)
    generation = transformers.GenerationConfig.from_pretrained(bpe_checkpoint)
    assert generation.eos_token_id == 16383


def test_bits_per_byte_lead_the_log_and_compare_tokenizers(bpe_checkpoint):
    run = os.path.dirname(bpe_checkpoint)
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    final = rows[-1]
    assert 0 < final["whole_val_bits_per_byte"] < final["whole_val_loss"]
    log = open(os.path.join(run, "train.log")).read().splitlines()
    assert "bits per byte" in log[-1] and "tokenizer bpe-16384: 16,384 ids" in "\n".join(log)
    assert json.loads(open(os.path.join(bpe_checkpoint, "config.json")).read())["vocab_size"] == 16384


def test_a_french_run_end_to_end(french_bpe_dir, tmp_path, monkeypatch):
    """Prepare (fixture), train a tiny model, sample with infer.py, load with transformers."""
    transformers = pytest.importorskip("transformers")
    english = gpt2_tokenizer()
    french = dataset_tokenizer(french_bpe_dir, load_manifest(french_bpe_dir)["tokenizer"])
    articles = held_out_articles(french_bpe_dir)
    gpt2_tokens = sum(len(english.encode_ordinary(t)) for t in articles)
    assert sum(len(french.encode_ordinary(t)) for t in articles) < 0.85 * gpt2_tokens  # French merges pay off
    run = tmp_path / "run"
    trained = run_script("gpt_train.py", ["--data", french_bpe_dir, "--out-dir", str(run), *FAST_TRAINING,
                                          "--max-steps", "3", "--sample-tokens", "0"])
    assert trained.returncode == 0, trained.stderr[-2000:]
    result = run_script("infer.py", ["--checkpoint", str(run), "--input", "L'histoire de la", "--max-new-tokens", "12"])
    assert result.returncode == 0 and result.stdout.startswith("L'histoire de la"), result.stderr[-2000:]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = run / "ckpt_0000003"
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer("L'histoire de la France", return_tensors="pt").input_ids
    assert ids[0].tolist() == french.encode_ordinary("L'histoire de la France")
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(out[0]).startswith("L'histoire de la France")


def test_init_from_a_gpt2_model_refuses_shards_of_another_tokenizer(bpe_sample_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2-local")
    result = run_script("gpt_train.py", ["--data", bpe_sample_dir, "--init-from", str(tmp_path / "gpt2-local"),
                                         "--out-dir", str(tmp_path / "run"), "--max-steps", "1"])
    assert_one_clear_error(result, "learned the ids of GPT-2's BPE (50,257 ids)")
    assert not (tmp_path / "run").exists()


def test_resume_refuses_shards_of_another_tokenizer(sample_dir, bpe_sample_dir, tmp_path):
    run = tmp_path / "run"
    first = run_script("gpt_train.py", ["--data", sample_dir, "--out-dir", str(run), *FAST_TRAINING, "--max-steps", "1",
                                        "--sample-tokens", "0"])
    assert first.returncode == 0, first.stderr[-2000:]
    before = sorted(os.listdir(run))
    result = run_script("gpt_train.py", ["--data", bpe_sample_dir, "--out-dir", str(run), *FAST_TRAINING,
                                         "--max-steps", "2", "--resume"])
    assert_one_clear_error(result, "hold ids of a bpe tokenizer of 16,384 ids, the run was trained on a gpt2")
    assert sorted(os.listdir(run)) == before


def test_a_tokenizer_file_that_does_not_match_the_manifest_is_refused(bpe_sample_dir, tmp_path):
    data = shutil.copytree(bpe_sample_dir, tmp_path / "data")
    spec = json.loads((data / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]  # one merge fewer: another tokenizer
    (data / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match="does not match the sha256 in manifest.json"):
        dataset_tokenizer(str(data), load_manifest(str(data))["tokenizer"])
    result = run_script("gpt_train.py", ["--data", str(data), "--out-dir", str(tmp_path / "run"), *FAST_TRAINING])
    assert_one_clear_error(result, "does not match the sha256 in manifest.json")
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_whose_tokenizer_outgrows_the_model_is_refused(bpe_checkpoint, tmp_path):
    checkpoint = shutil.copytree(bpe_checkpoint, tmp_path / "ckpt")
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(vocab_size=4096, padded_vocab_size=4096, bos_token_id=4095, eos_token_id=4095)
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="its tokenizer has 16,384 ids, but the model only 4,096 rows"):
        __import__("infer").load_tokenizer(str(checkpoint))
    result = run_script("infer.py", ["--checkpoint", str(checkpoint), "--input", "x"])
    assert_one_clear_error(result, "its tokenizer has 16,384 ids, but the model only 4,096 rows")


def wait_for_line(process, text):
    """Reads the process's stderr until a line holds `text`; False if the process ended first."""
    buffer = b""
    while True:
        chunk = os.read(process.stderr.fileno(), 4096)
        if not chunk:
            return False
        buffer += chunk
        if text.encode() in buffer:
            return True


@pytest.mark.parametrize("moment", ["reading its text", "training", "writing shards"])
def test_killed_while_training_the_tokenizer_or_encoding_a_rerun_gives_identical_files(bpe_sample_dir, tmp_path,
                                                                                        moment):
    out = tmp_path / "killed"
    args = ["--source", "sample", "--out", str(out), "--shard-tokens", "100000"]
    signal_line = {"reading its text": "text for the tokenizer", "training": "training a 16,384-id BPE",
                   "writing shards": "trained in"}[moment]
    process = subprocess.Popen(script("gpt_dataset.py", *args), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, preexec_fn=as_from_a_shell)
    assert wait_for_line(process, signal_line), moment
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (out / "tokenizer.json").exists() == (moment == "writing shards")
    assert not (out / "manifest.json").exists()
    assert run_script("gpt_dataset.py", args).returncode == 0
    reference = tmp_path / "reference"
    assert run_script("gpt_dataset.py", [*args[:3], str(reference), *args[4:]]).returncode == 0
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))
    for name in os.listdir(reference):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
