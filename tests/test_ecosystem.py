"""Checkpoints in the Hugging Face ecosystem (tokenizer, generation config, pipeline), experiment
trackers, and training across machines through torchrun's rendezvous."""

import json
import os
import socket
import subprocess

import pytest

import gpt_train
from conftest import FAST_TRAINING, ROOT, assert_one_clear_error, run_script, script
from gpt_dataset import gpt2_tokenizer, open_split

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(sample_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    gpt_train.main(["--data", sample_dir, "--out-dir", str(run), *FAST_TRAINING, "--max-steps", "2",
                    "--sample-tokens", "0"])
    return str(run / "ckpt_0000002")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_autotokenizer_encodes_real_articles_as_tiktoken_does(checkpoint, sample_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    encoder = gpt2_tokenizer()
    val = open_split(sample_dir, "val")[0]
    articles = encoder.decode(val.tolist()).split("<|endoftext|>")[1:]
    texts = articles + ["  two spaces,\ttabs\n\nand   runs of space ", "naïve café, 東京, emoji 🙂, ünïcödé 123,456.7"]
    assert len(articles) > 400
    for text in texts:
        assert tokenizer.encode(text) == encoder.encode_ordinary(text), text[:80]
        assert tokenizer.decode(encoder.encode_ordinary(text)) == text
    assert tokenizer.eos_token_id == 50256 and tokenizer.model_max_length == 32
    assert len(tokenizer) == 50257


def test_pipeline_generates_from_a_checkpoint_with_its_generation_config(checkpoint):
    generation = transformers.GenerationConfig.from_pretrained(checkpoint)
    assert (generation.do_sample, generation.temperature, generation.top_k) == (True, 0.8, 200)
    assert generation.eos_token_id == 50256
    generator = transformers.pipeline("text-generation", model=checkpoint, device="cpu")
    transformers.set_seed(0)
    text = generator("The history of", max_new_tokens=8)[0]["generated_text"]
    assert text.startswith("The history of") and len(text) > len("The history of")
    greedy = generator("The history of", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert greedy == generator("The history of", max_new_tokens=8, do_sample=False)[0]["generated_text"]
