"""Shared fixtures (the real offline Wikipedia sample, tokenised once per test session) and helpers
that run the scripts as a user does."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gpt_dataset  # noqa: E402
import gpt_train  # noqa: E402
from wikigpt.files import fetch_from_pypi  # noqa: E402

# Training flags for a model small enough that a step takes tens of milliseconds on a laptop CPU. The
# final evaluation reads 2,048 validation tokens, not the whole split (5 s a run at this size);
# test_the_result_is_the_loss_over_the_whole_validation_split reads it all.
FAST_TRAINING = ["--preset", "tiny", "--block-size", "32", "--batch-size", "4", "--eval-steps", "2",
                 "--warmup-steps", "2", "--lr", "3e-3", "--final-eval-tokens", "2048"]

GENSIM_DUMP = ("gensim==4.4.0",
               "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
               "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d")


def script(name, *args):
    """The command line that runs one of the repository's scripts with this Python."""
    return [sys.executable, os.path.join(ROOT, name), *args]


def run_script(name, args, cwd=ROOT, **kwargs):
    """Runs a script to its end, its output captured as text."""
    return subprocess.run(script(name, *args), capture_output=True, text=True, cwd=cwd, **kwargs)


def as_from_a_shell():
    """For Popen's preexec_fn: the child starts with Ctrl-C (SIGINT) deliverable and at its default, as
    a shell starts a command, whatever the test process has blocked or ignored."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_work(process, read_progress, count):
    """Waits until `process` has done `count` more units of work, as `read_progress()` reports them
    (articles read, steps logged: a number that grows, or None before there is any). Interruption
    tests count work, not seconds, so that a slow or busy machine interrupts them just as often.
    Returns False if the process ended first."""
    last, seen = read_progress(), 0
    while process.poll() is None:
        now = read_progress()
        if now is not None and (last is None or now > last):
            last, seen = now, seen + 1
            if seen >= count:
                return True
        time.sleep(0.002)
    return False


def articles_read(progress_path):
    """How far gpt_dataset.py has got, by its progress record (written atomically after each shard)."""
    def read():
        try:
            with open(progress_path) as f:
                return json.load(f)["articles_read"]
        except (OSError, ValueError, KeyError):
            return None
    return read


def steps_logged(metrics_path):
    """The last training step that gpt_train.py has logged to metrics.jsonl (one line per step)."""
    def read():
        try:
            with open(metrics_path) as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        rows = [json.loads(line) for line in lines if line.endswith("}")]
        return max((r["step"] for r in rows if "loss" in r), default=None)
    return read


def assert_one_clear_error(result, message):
    """What bad input must give: a non-zero exit, no traceback, and `message` in the last line."""
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]


def checkpoint_of_two_steps(data_dir, run, *extra):
    """Trains the tiny model two steps on `data_dir` in this process; returns its checkpoint's path."""
    gpt_train.main(["--data", data_dir, "--out-dir", str(run), *FAST_TRAINING, "--max-steps", "2", *extra])
    return str(run / "ckpt_0000002")


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    """The English sample (~1M tokens of real articles) as train and val shards of GPT-2's BPE."""
    out = tmp_path_factory.mktemp("data") / "sample_en_gpt2"
    gpt_dataset.main(["--source", "sample", "--out", str(out), "--workers", "2", "--tokenizer", "gpt2"])
    return str(out)


@pytest.fixture(scope="session")
def bpe_sample_dir(tmp_path_factory):
    """The English sample with the default tokenizer: a BPE of 16,384 ids trained on its training split."""
    out = tmp_path_factory.mktemp("data") / "sample_en_bpe16384"
    gpt_dataset.main(["--source", "sample", "--out", str(out), "--workers", "2"])
    return str(out)


@pytest.fixture(scope="session")
def french_bpe_dir(tmp_path_factory):
    """The French sample with a BPE trained on its own training split."""
    out = tmp_path_factory.mktemp("data") / "sample_fr_bpe16384"
    gpt_dataset.main(["--source", "sample", "--lang", "fr", "--out", str(out), "--workers", "2"])
    return str(out)


@pytest.fixture(scope="session")
def dump_path():
    """A real excerpt of an English Wikipedia XML dump (106 articles), from gensim's wheel."""
    return fetch_from_pypi(*GENSIM_DUMP)
