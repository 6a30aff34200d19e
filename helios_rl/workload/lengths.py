"""Cropping prompts to a token budget and picking prompts of about a target length.

Token counts come from any ``count_tokens(text) -> int`` so the same code serves tests
(whitespace counting) and real runs (a model tokenizer). Cropping works on
whitespace-delimited chunks with a bracketed binary search, so a crop costs
``O(log target)`` tokenizer calls on strings no longer than about the target.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from helios_rl.workload.prompts import Prompt

CountTokens = Callable[[str], int]

#: Prefilter for :class:`LengthMatcher`: a prompt is a candidate for ``target`` tokens
#: when it has at least this many whitespace words per target token (real tokenizers
#: give >= ~1 token per word, so 0.6 keeps every plausible prompt).
MIN_WORDS_PER_TOKEN = 0.6


def whitespace_tokens(text: str) -> int:
    """Whitespace word count: a tokenizer-free stand-in used by tests and as the default."""
    return len(text.split())


def crop_to_tokens(prompt: Prompt, target_tokens: int, count_tokens: CountTokens) -> Prompt:
    """Return ``prompt`` with its body shortened so the whole text has <= ``target_tokens``.

    Only the body (the text between ``head_chars`` and ``tail_chars``) is cut, so an
    instruction around an article survives. ``completion`` prompts keep the *end* of the
    passage (their reference continuation follows it); other tasks keep the start. A
    prompt already within budget comes back unchanged; if even one word is too many, the
    first word is cut by characters, and a bare head+tail over budget is returned as is.
    """
    return crop_with_count(prompt, target_tokens, count_tokens)[0]


def crop_with_count(prompt: Prompt, target_tokens: int, count_tokens: CountTokens,
                    full_tokens: int | None = None) -> tuple[Prompt, int]:
    """:func:`crop_to_tokens` that also returns the result's token count.

    ``full_tokens`` (the uncropped count, if already known) saves one tokenizer call.
    The search first steps by the prompt's own chunks-per-token ratio (secant-like), so
    it usually needs ~4-6 tokenizer calls on strings of about the target length.
    """
    if target_tokens < 0:
        raise ValueError(f"target_tokens must be >= 0, got {target_tokens}")
    full = count_tokens(prompt.text) if full_tokens is None else full_tokens
    if full <= target_tokens:
        return prompt, full
    text = prompt.text
    head, tail = text[: prompt.head_chars], text[len(text) - prompt.tail_chars:]
    body = text[prompt.head_chars: len(text) - prompt.tail_chars]
    keep_end = prompt.task == "completion"
    starts, ends = _word_spans(text, prompt.head_chars, prompt.tail_chars)
    n = len(starts)
    counts: dict[int, int] = {n: full}

    def assemble(k: int) -> str:
        if k == 0:
            return head + tail
        part = body[int(starts[n - k]):] if keep_end else body[: int(ends[k - 1])]
        return head + part + tail

    def tokens(k: int) -> int:
        if k not in counts:
            counts[k] = count_tokens(assemble(k))
        return counts[k]

    lo, hi = 0, n  # invariant: hi does not fit; lo fits unless lo == 0 (unknown)
    ratio = n / max(full, 1)
    k = min(n - 1, max(1, round(target_tokens * ratio)))
    for _ in range(6):
        if not lo < k < hi:
            break
        c = tokens(k)
        step = round((target_tokens - c) * ratio)
        if c <= target_tokens:
            lo, k = k, k + max(1, step)
        else:
            hi, k = k, k + min(-1, step)
        k = min(max(k, lo + 1), hi - 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tokens(mid) <= target_tokens:
            lo = mid
        else:
            hi = mid
    if lo == 0:
        if n == 0 or tokens(0) > target_tokens:
            return (prompt, full) if n == 0 else (dataclasses.replace(prompt, text=head + tail), tokens(0))
        word = body[int(starts[-1]):] if keep_end else body[: int(ends[0])]
        text = _crop_chars(head, word, tail, keep_end, target_tokens, count_tokens)
        return dataclasses.replace(prompt, text=text), count_tokens(text)
    return dataclasses.replace(prompt, text=assemble(lo)), tokens(lo)


@functools.lru_cache(maxsize=512)
def _word_spans(text: str, head_chars: int, tail_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end offsets of the whitespace-separated words of a prompt's body.

    Cached (keyed by the text, whose hash Python caches) because a workload build crops
    the same few long passages thousands of times and the scan dominated the cost.
    """
    body = text[head_chars: len(text) - tail_chars]
    spans = np.array([m.span() for m in re.finditer(r"\S+", body)], dtype=np.int64).reshape(-1, 2)
    return spans[:, 0], spans[:, 1]


def _crop_chars(head: str, word: str, tail: str, keep_end: bool, target: int,
                count_tokens: CountTokens) -> str:
    """Character-level crop of the single nearest word (a very long unbroken one)."""
    lo, hi = 0, len(word)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        piece = word[len(word) - mid:] if keep_end else word[:mid]
        if count_tokens(head + piece + tail) <= target:
            lo = mid
        else:
            hi = mid
    piece = word[len(word) - lo:] if keep_end else word[:lo]
    return head + piece + tail


class LengthMatcher:
    """Picks prompts of about a target token count from a fixed list, caching counts.

    Why a class: a workload build matches thousands of arrivals against the same pool,
    and full-prompt token counts are the expensive part, so they are counted once.
    """

    def __init__(self, prompts: Sequence[Prompt], count_tokens: CountTokens,
                 max_candidates: int = 32) -> None:
        if not prompts:
            raise ValueError("LengthMatcher needs at least one prompt")
        self.prompts = list(prompts)
        self.count_tokens = count_tokens
        self.max_candidates = max_candidates
        self._words = np.array([len(p.text.split()) for p in self.prompts], dtype=np.int64)
        self._tokens: dict[int, int] = {}
        self._longest = np.argsort(-self._words, kind="stable")[:max_candidates]

    def tokens(self, index: int) -> int:
        """Token count of ``prompts[index]`` (cached)."""
        if index not in self._tokens:
            self._tokens[index] = int(self.count_tokens(self.prompts[index].text))
        return self._tokens[index]

    def match(self, target_tokens: int, rng: np.random.Generator) -> Prompt:
        """A prompt cropped to about ``target_tokens`` (see :meth:`match_with_count`)."""
        return self.match_with_count(target_tokens, rng)[0]

    def match_with_count(self, target_tokens: int, rng: np.random.Generator) -> tuple[Prompt, int]:
        """A prompt cropped to about ``target_tokens``, and its token count.

        Draws up to ``max_candidates`` prompts at random among those long enough by a
        word-count prefilter and crops the first one that has >= target tokens. Failing
        that, the longest prompt by words is used (cropped if it is long enough, else
        whole and shorter than asked: callers can measure it with ``count_tokens``).
        """
        target_tokens = max(1, int(target_tokens))
        eligible = np.flatnonzero(self._words >= MIN_WORDS_PER_TOKEN * target_tokens)
        if eligible.size:
            order = rng.permutation(eligible)[: self.max_candidates]
            for i in order:
                if self.tokens(int(i)) >= target_tokens:
                    return self._crop(int(i), target_tokens)
        best = max((int(i) for i in self._longest), key=lambda i: (self.tokens(i), -i))
        if self.tokens(best) >= target_tokens:
            return self._crop(best, target_tokens)
        return self.prompts[best], self.tokens(best)

    def _crop(self, index: int, target_tokens: int) -> tuple[Prompt, int]:
        return crop_with_count(self.prompts[index], target_tokens, self.count_tokens, self.tokens(index))
