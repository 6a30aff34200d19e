"""Prompts for workloads: the ``Prompt`` record, a seeded pool, and a held-out split.

Tasks:

* ``completion``: a news/wiki passage to continue (reference = the real continuation).
* ``summarize``: an instruction wrapped around a news/wiki article.
* ``chat``: the first user turn of a ShareGPT conversation (reference = the reply).

The train/held-out split is a hash of the *source document* id, independent of any
seed, so a held-out evaluation never sees an article or conversation that was used for
training or calibration, under any task and any seed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from helios_rl.workload import texts
from helios_rl.workload.lengths import CountTokens, LengthMatcher

TASKS = ("completion", "summarize", "chat")
SPLITS = ("train", "heldout", "all")
SOURCES = ("news", "wiki", "sharegpt")
DEFAULT_HELDOUT_FRACTION = 0.2

#: Summarization instructions as (head, tail) around the article body.
SUMMARIZE_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("Summarize the following article in a few sentences.\n\n", ""),
    ("Write a short summary of this text:\n\n", ""),
    ("Read the article below and summarize its main points in one paragraph.\n\n", ""),
    ("Article:\n", "\n\nSummarize the article above in three sentences."),
)


@dataclass(frozen=True)
class Prompt:
    """One prompt.

    ``chat`` says the text is a user message meant to go through a chat template;
    ``doc_id`` names the source document (the split key); ``head_chars``/``tail_chars``
    mark fixed instruction text at either end that cropping must keep.
    """

    id: str
    text: str
    task: str
    source: str
    reference: str | None = None
    chat: bool = False
    doc_id: str = ""
    head_chars: int = 0
    tail_chars: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"prompt {self.id!r}: unknown task {self.task!r}; expected one of {TASKS}")
        if self.head_chars < 0 or self.tail_chars < 0 or self.head_chars + self.tail_chars > len(self.text):
            raise ValueError(f"prompt {self.id!r}: head_chars/tail_chars outside the text")

    @property
    def split_key(self) -> str:
        """The key hashed for the train/held-out split."""
        return self.doc_id or self.id


def split_of(key: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> str:
    """``"heldout"`` for about ``heldout_fraction`` of keys, else ``"train"``; stable across runs."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    return "heldout" if u < heldout_fraction else "train"


class PromptError(ValueError):
    """A user prompt file is malformed; the message names the file and line."""


class PromptPool:
    """An immutable set of prompts with seeded sampling, length matching and a split."""

    def __init__(self, prompts: Iterable[Prompt], heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> None:
        if not 0.0 <= heldout_fraction <= 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
        self.prompts: tuple[Prompt, ...] = tuple(prompts)
        self.heldout_fraction = heldout_fraction
        seen: set[str] = set()
        for p in self.prompts:
            if p.id in seen:
                raise ValueError(f"duplicate prompt id {p.id!r}")
            seen.add(p.id)
        self._by_task = {t: tuple(p for p in self.prompts if p.task == t) for t in TASKS}

    @classmethod
    def from_sources(cls, sources: Sequence[str] = SOURCES, *, seed: int = 0,
                     heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                     extra: Iterable[Prompt] = (), max_passage_words: int = 4096,
                     reference_words: int = 256) -> PromptPool:
        """Pool of every task each source supports, plus ``extra`` (e.g. a JSONL file).

        ``seed`` only picks summarization templates; texts and the split do not depend on it.
        """
        unknown = [s for s in sources if s not in SOURCES]
        if unknown:
            raise ValueError(f"unknown prompt source(s) {unknown}; expected some of {SOURCES}")
        built = _build_prompts(tuple(sources), int(seed), int(max_passage_words), int(reference_words))
        return cls(built + tuple(extra), heldout_fraction=heldout_fraction)

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    @property
    def tasks(self) -> tuple[str, ...]:
        """Tasks that have at least one prompt, in :data:`TASKS` order."""
        return tuple(t for t in TASKS if self._by_task[t])

    def by_task(self, task: str) -> tuple[Prompt, ...]:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        return self._by_task[task]

    def split_of(self, prompt: Prompt) -> str:
        return split_of(prompt.split_key, self.heldout_fraction)

    def split(self, name: str) -> PromptPool:
        """The ``train`` or ``heldout`` part (``all``: this pool)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        if name == "all":
            return self
        return PromptPool((p for p in self.prompts if self.split_of(p) == name), self.heldout_fraction)

    def sample(self, task: str, rng: np.random.Generator) -> Prompt:
        """One prompt of ``task``, uniformly at random."""
        pool = self.by_task(task)
        if not pool:
            raise ValueError(f"no prompts for task {task!r} in this pool")
        return pool[int(rng.integers(len(pool)))]

    def matcher(self, task: str, count_tokens: CountTokens, max_candidates: int = 32) -> LengthMatcher:
        """A :class:`LengthMatcher` over this pool's prompts of ``task`` (reuse it for many matches)."""
        pool = self.by_task(task)
        if not pool:
            raise ValueError(f"no prompts for task {task!r} in this pool")
        return LengthMatcher(pool, count_tokens, max_candidates=max_candidates)

    def match_length(self, target_tokens: int, count_tokens: CountTokens, *, task: str = "completion",
                     rng: np.random.Generator | None = None) -> Prompt:
        """A prompt of ``task`` cropped to about ``target_tokens`` (see :meth:`LengthMatcher.match`)."""
        rng = rng if rng is not None else np.random.default_rng(0)
        return self.matcher(task, count_tokens).match(target_tokens, rng)


# --------------------------------------------------------------------------- building


@functools.lru_cache(maxsize=8)
def _build_prompts(sources: tuple[str, ...], seed: int, max_passage_words: int,
                   reference_words: int) -> tuple[Prompt, ...]:
    rng = np.random.default_rng(seed)
    out: list[Prompt] = []
    for source in sources:
        if source == "sharegpt":
            # Split on the conversation, not the chunk: ShareGPT "split" ids are <conv>_<k>.
            out.extend(Prompt(id=f"chat:{c.id}", text=c.human, task="chat", source="sharegpt",
                              reference=c.reply, chat=True, doc_id=re.sub(r"_\d+$", "", c.id))
                       for c in texts.load_sharegpt())
            continue
        for doc in texts.load_source(source):
            out.append(completion_prompt(doc, max_passage_words, reference_words))
            head, tail = SUMMARIZE_TEMPLATES[int(rng.integers(len(SUMMARIZE_TEMPLATES)))]
            out.append(summarize_prompt(doc, head, tail, max_passage_words))
    return tuple(out)


def completion_prompt(doc: texts.TextDoc, max_words: int, reference_words: int) -> Prompt:
    """The first ~70% of ``doc`` (at most ``max_words``), cut at a sentence end; reference follows."""
    words = list(re.finditer(r"\S+", doc.text))
    cut_word = max(1, min(int(0.7 * len(words)), max_words))
    cut = _sentence_cut(doc.text, words[cut_word - 1].end(), min_pos=words[cut_word // 2].start())
    rest = doc.text[cut:].split()
    return Prompt(id=f"completion:{doc.id}", text=doc.text[:cut].rstrip(), task="completion",
                  source=doc.source, reference=" ".join(rest[:reference_words]) or None,
                  chat=False, doc_id=doc.id)


def summarize_prompt(doc: texts.TextDoc, head: str, tail: str, max_words: int) -> Prompt:
    """``head + article + tail``, the article cut to ``max_words`` at a sentence end."""
    words = list(re.finditer(r"\S+", doc.text))
    body = doc.text
    if len(words) > max_words:
        body = doc.text[: _sentence_cut(doc.text, words[max_words - 1].end(),
                                        min_pos=words[max_words // 2].start())].rstrip()
    return Prompt(id=f"summarize:{doc.id}", text=head + body + tail, task="summarize", source=doc.source,
                  reference=None, chat=True, doc_id=doc.id, head_chars=len(head), tail_chars=len(tail))


def _sentence_cut(text: str, pos: int, min_pos: int) -> int:
    """Largest sentence end in ``[min_pos, pos]`` (else ``pos``), as a character offset."""
    best = pos
    for m in re.finditer(r"[.!?][\"')\]]*(?=\s)", text[min_pos:pos + 1]):
        best = min_pos + m.end()
    return best


# --------------------------------------------------------------------------- user files

_JSONL_KEYS = frozenset({"prompt", "task", "id", "reference", "chat"})


def load_prompts_jsonl(path: str | Path, default_task: str = "chat") -> list[Prompt]:
    """Prompts from a JSONL file: one ``{"prompt": ..., "task": ...}`` object per line.

    Optional keys: ``id`` (default ``<file stem>:<line>``), ``reference``, ``chat``
    (default: true unless the task is ``completion``). Blank lines are skipped. Any
    malformed line raises :class:`PromptError` naming the file and the line.
    """
    path = Path(path)
    out: list[Prompt] = []
    seen: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"{path}: cannot read prompt file: {exc}") from exc
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue

        def fail(msg: str) -> PromptError:
            return PromptError(f"{path}:{lineno}: {msg}")

        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise fail(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise fail(f"expected a JSON object, got {type(row).__name__}")
        unknown = sorted(set(row) - _JSONL_KEYS)
        if unknown:
            raise fail(f"unknown key(s) {unknown}; allowed: {sorted(_JSONL_KEYS)}")
        text = row.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise fail("'prompt' must be a non-empty string")
        task = row.get("task", default_task)
        if task not in TASKS:
            raise fail(f"'task' must be one of {list(TASKS)}, got {task!r}")
        pid = row.get("id", f"{path.stem}:{lineno}")
        if not isinstance(pid, str) or not pid:
            raise fail("'id' must be a non-empty string")
        if pid in seen:
            raise fail(f"duplicate id {pid!r}")
        ref = row.get("reference")
        if ref is not None and not isinstance(ref, str):
            raise fail("'reference' must be a string or null")
        chat = row.get("chat", task != "completion")
        if not isinstance(chat, bool):
            raise fail("'chat' must be true or false")
        seen.add(pid)
        out.append(Prompt(id=f"file:{pid}", text=text, task=task, source="file", reference=ref,
                          chat=chat, doc_id=f"file:{pid}"))
    if not out:
        raise PromptError(f"{path}: no prompts in file")
    return out

