"""Checkpoints in the Hugging Face ecosystem (tokenizer, generation config, pipeline), experiment
trackers, and training across machines through torchrun's rendezvous."""

import json
import sys
import types

import pytest

import gpt_train
from conftest import FAST_TRAINING, checkpoint_of_two_steps
from wikigpt.cli import UsageError
from wikigpt.shards import open_split
from wikigpt.tokenizer import gpt2_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(sample_dir, tmp_path_factory):
    return checkpoint_of_two_steps(sample_dir, tmp_path_factory.mktemp("run") / "run", "--sample-tokens", "0")


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


class FakeTensorBoard:
    """Stands in for torch.utils.tensorboard (not a dependency): records what the trainer sends."""

    scalars = []

    class SummaryWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, key, value, step):
            FakeTensorBoard.scalars.append((key, value, step))

        def flush(self):
            pass


def fake_wandb(calls):
    module = types.ModuleType("wandb")
    module.init = lambda **kwargs: calls.append(("init", kwargs))
    module.log = lambda metrics, step: calls.append(("log", metrics, step))
    return module


def sent_rows(run):
    """metrics.jsonl as (key, value, step) triples, as a tracker should have received them."""
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return [(k, v, r["step"]) for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))]


def test_trackers_receive_what_metrics_jsonl_records(sample_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", FakeTensorBoard)
    FakeTensorBoard.scalars = []
    args = ["--data", sample_dir, *FAST_TRAINING, "--max-steps", "3", "--eval-interval", "2", "--sample-tokens", "0"]
    gpt_train.main([*args, "--out-dir", str(tmp_path / "tb"), "--tracker", "tensorboard"])
    assert FakeTensorBoard.scalars == sent_rows(tmp_path / "tb")
    assert {"loss", "val_loss", "whole_val_loss", "tokens_per_s"} <= {k for k, _, _ in FakeTensorBoard.scalars}

    calls = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    gpt_train.main([*args, "--out-dir", str(tmp_path / "wandb"), "--tracker", "wandb"])
    assert calls[0][0] == "init" and calls[0][1]["config"]["max_steps"] == 3
    assert [(k, v, step) for _, metrics, step in calls[1:] for k, v in metrics.items()] == sent_rows(tmp_path / "wandb")
    run_id = calls[0][1]["id"]
    calls.clear()  # a resumed run continues the same wandb run
    gpt_train.main([*args, "--max-steps", "4", "--out-dir", str(tmp_path / "wandb"), "--tracker", "wandb", "--resume"])
    assert calls[0][1]["id"] == run_id and calls[0][1]["resume"] == "allow"


@pytest.mark.parametrize("name, package", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_tracker_package_is_one_clear_error(sample_dir, tmp_path, monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(UsageError, match=f"--tracker {name} needs the {name} package: pip install {name}"):
        gpt_train.main(["--data", sample_dir, "--out-dir", str(tmp_path / "run"), *FAST_TRAINING, "--tracker", name])
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.fixture(scope="module")
def qwen3_checkpoint(bpe_sample_dir, tmp_path_factory):
    """Today's block, untied head, trained two steps on the sample with its own BPE."""
    return checkpoint_of_two_steps(bpe_sample_dir, tmp_path_factory.mktemp("run") / "run", "--sample-tokens", "0",
                                   "--arch", "qwen3", "--no-tie-embeddings")


def test_today_s_block_runs_in_transformers_as_qwen3_with_its_tokenizer(qwen3_checkpoint, bpe_sample_dir):
    import torch

    from transformer import GPT
    from wikigpt.generation import generate_text
    from wikigpt.shards import load_manifest
    from wikigpt.tokenizer import dataset_tokenizer

    model = transformers.AutoModelForCausalLM.from_pretrained(qwen3_checkpoint).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen3_checkpoint)
    assert type(model).__name__ == "Qwen3ForCausalLM" and not model.config.tie_word_embeddings
    encoder = dataset_tokenizer(bpe_sample_dir, load_manifest(bpe_sample_dir)["tokenizer"])
    val = open_split(bpe_sample_dir, "val")[0]
    articles = encoder.decode(val.tolist()).split("<|endoftext|>")[1:]
    assert len(articles) > 400
    for text in articles:
        assert tokenizer.encode(text) == encoder.encode_ordinary(text), text[:80]
    ours = GPT.from_pretrained(qwen3_checkpoint).eval()
    ids = torch.tensor([encoder.encode_ordinary(articles[0])[:32]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours(ids)[0][..., :16384], rtol=1e-5, atol=1e-5)
    generator = transformers.pipeline("text-generation", model=qwen3_checkpoint, device="cpu")
    greedy = generator("The history of", max_new_tokens=12, min_new_tokens=12, do_sample=False)[0]["generated_text"]
    expected = generate_text(ours, encoder, encoder.encode_ordinary("The history of"), max_new_tokens=12,
                             temperature=0, stop_at_eot=False)
    assert greedy == "The history of" + expected
