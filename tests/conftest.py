"""Shared fixtures: the real offline Wikipedia sample, tokenised once per test session."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gpt_dataset  # noqa: E402

GENSIM_DUMP = ("gensim==4.4.0",
               "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
               "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d")


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
