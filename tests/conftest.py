"""Shared fixtures (the real offline Wikipedia sample, tokenised once per test session) and helpers
that run the scripts as a user does."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gpt_dataset  # noqa: E402

GENSIM_DUMP = ("gensim==4.4.0",
               "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
               "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d")


def script(name, *args):
    """The command line that runs one of the repository's scripts with this Python."""
    return [sys.executable, os.path.join(ROOT, name), *args]


def run_script(name, args, cwd=ROOT, **kwargs):
    """Runs a script to its end, its output captured as text."""
    return subprocess.run(script(name, *args), capture_output=True, text=True, cwd=cwd, **kwargs)


def assert_one_clear_error(result, message):
    """What bad input must give: a non-zero exit, no traceback, and `message` in the last line."""
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    """The English sample (~1M tokens of real articles) as train and val shards."""
    out = tmp_path_factory.mktemp("data") / "sample_en"
    gpt_dataset.main(["--source", "sample", "--out", str(out), "--workers", "2"])
    return str(out)


@pytest.fixture(scope="session")
def dump_path():
    """A real excerpt of an English Wikipedia XML dump (106 articles), from gensim's wheel."""
    return gpt_dataset.fetch_from_pypi(*GENSIM_DUMP)
